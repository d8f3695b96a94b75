"""The validation cost per request, before (the hand-written checks of ``memq/wire.py``, ``memq/validation.py`` and
``memq/requests.py`` at commit ``BEFORE``) and after (one pydantic model per message, ``memq.core.wire``), in one run.
Prints a table, writes ``bench/results/validation.json`` and ``validation.png``.

    python -m bench.validation_bench            # ~1 min on 2 cores
    python -m bench.validation_bench --quick

No services: each series checks one message as its receiver does. The old revision's whole ``memq`` package (its
own settings, layout and API) is read from git (``git archive BEFORE memq``) and measured in a process of its own,
round by round in turn with this one, so that machine noise hits each alike. Series:
  - retrieve: the edge building a retrieval request from the caller's arguments;
  - search: ``memq.search`` reading its call and the embed step's result;
  - merge: ``memq.merge`` reading the request and two types' search results of 10 items;
  - remember: the edge reading 10 memories to store.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memq.client import edge
from memq.core import wire
from memq.core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
ROOT = Path(__file__).resolve().parent.parent
BEFORE = "2a7e796"  # main before one model per message (#26 point 2)
OLD_MODULES = ("validation", "wire", "requests")  # in import order


# Run with the old revision's package first on sys.path: one round of every series, printed as JSON (µs per call).
BEFORE_ROUND = """
import json, sys, time
import numpy as np
from memq import requests, wire
from memq.settings import Settings

repeat = int(sys.argv[1])
settings = Settings()
limits = {"semantic": 10, "episodic": 10}
request = requests.retrieval_request(settings, "what does the user like to eat?", "tenant-1", limits)
embedded = wire.embed_result(np.full(384, 0.05, np.float32), "m", 1.0, "miss", 1.0, 2.0)
items = [
    {"id": f"m{i}", "content": f"memory {i}", "score": 0.5, "importance": 0.5, "scores": {"relevance": 0.5}}
    for i in range(10)
]
results = [
    {"type": t, "items": items, "strategy": "exact", "matrix_cache": "hit", "search_ms": 1.0} for t in request["limits"]
]
memories = [{"content": f"the user likes dish {i}", "tags": ["food"], "importance": 0.7} for i in range(10)]
call = (request["memory_id"], "long_term_memory", 30, "auto", request["query"], "hybrid", {})
series = {
    "retrieve": lambda: requests.retrieval_request(settings, request["query"], "tenant-1", limits),
    "search": lambda: (
        wire.parse_search_call(*call, settings.max_query_chars, request["deadline_ts"]),
        wire.parse_embed_result(embedded, 384),
    ),
    "merge": lambda: wire.parse_merge_input(results, request, settings.search_strategy),
    "remember": lambda: requests.remember_request(settings, "tenant-1", "semantic", memories),
}
out = {}
for name, call_once in series.items():
    started = time.perf_counter()
    for _ in range(repeat):
        call_once()
    out[name] = (time.perf_counter() - started) / repeat * 1e6
print(json.dumps(out))
"""


def extract_before(into: Path) -> None:
    """The old revision's ``memq`` package, whole, under ``into``."""
    archive = subprocess.run(["git", "archive", BEFORE, "memq"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def before_round(tree: Path, repeat: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", BEFORE_ROUND, str(repeat)],
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return {name: float(us) for name, us in json.loads(done.stdout).items()}


def messages(settings: Settings) -> dict[str, Any]:
    limits = {"semantic": 10, "episodic": 10}
    request = edge.retrieval_request(settings, "what does the user like to eat?", "tenant-1", limits)
    embedded = wire.embed_result(np.full(DIMENSIONS, 0.05, np.float32), "m", 1.0, "miss", 1.0, 2.0)
    items = [
        {"id": f"m{i}", "content": f"memory {i}", "score": 0.5, "importance": 0.5, "scores": {"relevance": 0.5}}
        for i in range(10)
    ]
    results = [
        {"type": memory_type, "items": items, "strategy": "exact", "matrix_cache": "hit", "search_ms": 1.0}
        for memory_type in request["limits"]
    ]
    memories = [{"content": f"the user likes dish {i}", "tags": ["food"], "importance": 0.7} for i in range(10)]
    return {"request": request, "embedded": embedded, "results": results, "memories": memories, "limits": limits}


def after_series(settings: Settings, m: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    request = m["request"]
    call = {"memory_id": request["memory_id"], "memory_type": "long_term_memory", "k": 30, "strategy": "auto"}
    call |= {"query": request["query"], "mode": "hybrid", "filters": {}, "deadline_ts": request["deadline_ts"]}
    return {
        "retrieve": lambda: edge.retrieval_request(settings, request["query"], "tenant-1", m["limits"]),
        "search": lambda: (
            wire.parse(wire.SEARCH_CALL, call, settings),
            wire.parse_embed_result(m["embedded"], DIMENSIONS),
        ),
        "merge": lambda: wire.parse_merge_input(m["results"], request, settings),
        "remember": lambda: edge.remember_request(settings, "tenant-1", "semantic", m["memories"]),
    }


def per_call_us(call: Callable[[], Any], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1e6


def measure(rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    settings = Settings()
    new = after_series(settings, messages(settings))
    samples: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name in new}
    with tempfile.TemporaryDirectory() as scratch:
        extract_before(Path(scratch))
        for _ in range(rounds):
            for name, us in before_round(Path(scratch), repeat).items():
                samples[name]["before"].append(us)
            for name in new:
                samples[name]["after"].append(per_call_us(new[name], repeat))
    return {
        name: {side: round(statistics.median(values), 2) for side, values in sides.items()}
        for name, sides in samples.items()
    }


def plot(figures: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, side in ((-0.2, "before"), (0.2, "after")):
        ax.bar(x + offset, [figures[n][side] for n in names], 0.4, label=side)
    ax.set_xticks(x, names)
    ax.set_ylabel("µs per request (median)")
    ax.set_title(f"Validation per request: hand-written checks ({BEFORE}) vs one model per message", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds, repeat = (5, 200) if args.quick else (21, 1000)
    figures = measure(rounds, repeat)
    print(f"{'series':10} {'before µs':>10} {'after µs':>10}")
    for name, sides in figures.items():
        print(f"{name:10} {sides['before']:>10.1f} {sides['after']:>10.1f}")
    RESULTS.mkdir(exist_ok=True)
    report = {
        "before_commit": BEFORE,
        "rounds": rounds,
        "calls_per_round": repeat,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "median_us_per_request": figures,
    }
    (RESULTS / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(figures, RESULTS / "validation.png")


if __name__ == "__main__":
    main()
