"""The validation cost per request, before (the hand-written checks of ``memq.core.wire``, ``memq.core.field_rules`` and
``memq.client.edge`` at commit ``BEFORE``) and after (one pydantic model per message, ``memq.core.wire``), in one run.
Prints a table, writes ``bench/results/field_rules.json`` and ``field_rules.png``.

    python -m bench.validation_bench            # ~1 min on 2 cores
    python -m bench.validation_bench --quick

No services: each series checks one message as its receiver does, in this process. The old modules are read
from git (``git show BEFORE:memq/...``) into a package of their own, so both run side by side on the same
interpreter, interleaved round by round so that machine noise hits each alike. Series:
  - retrieve: the edge building a retrieval request from the caller's arguments;
  - search: ``memq.search`` reading its call and the embed step's result;
  - merge: ``memq.merge`` reading the request and two types' search results of 10 items;
  - remember: the edge reading 10 memories to store.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from memq.client import edge
from memq.core import field_rules, wire
from memq.core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
ROOT = Path(__file__).resolve().parent.parent
BEFORE = "2a7e796"  # main before one model per message (#26 point 2)
OLD_MODULES = ("validation", "wire", "requests")  # in import order


def load_before(into: Path) -> dict[str, ModuleType]:
    """The old ``memq.core.field_rules``, ``memq.core.wire`` and ``memq.client.edge`` as ``memq_before.*``."""
    package = into / "memq_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    loaded: dict[str, ModuleType] = {}
    for name in OLD_MODULES:
        source = subprocess.run(
            ["git", "show", f"{BEFORE}:memq/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for old in OLD_MODULES:
            source = source.replace(f"from memq.{old} import", f"from memq_before.{old} import")
        source = source.replace(
            "from memq import keys, validation", "from memq import keys\nfrom memq_before import validation"
        )
        source = source.replace("from memq import validation", "from memq_before import validation")
        path = package / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"memq_before.{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


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


def before_series(old: dict[str, ModuleType], settings: Settings, m: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    wire_before, requests_before = old["wire"], old["requests"]
    request = m["request"]
    call = (request["memory_id"], "long_term_memory", 30, "auto", request["query"], "hybrid", {})
    return {
        "retrieve": lambda: requests_before.retrieval_request(settings, request["query"], "tenant-1", m["limits"]),
        "search": lambda: (
            wire_before.parse_search_call(*call, field_rules.MAX_QUERY_CHARS, request["deadline_ts"]),
            wire_before.parse_embed_result(m["embedded"], DIMENSIONS),
        ),
        "merge": lambda: wire_before.parse_merge_input(m["results"], request, settings.search_strategy),
        "remember": lambda: requests_before.remember_request(settings, "tenant-1", "semantic", m["memories"]),
    }


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
    m = messages(settings)
    with tempfile.TemporaryDirectory() as scratch:
        sys.path.insert(0, scratch)
        old = before_series(load_before(Path(scratch)), settings, m)
        new = after_series(settings, m)
        samples: dict[str, dict[str, list[float]]] = {name: {"before": [], "after": []} for name in new}
        for _ in range(rounds):
            for name in new:
                samples[name]["before"].append(per_call_us(old[name], repeat))
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
    (RESULTS / "field_rules.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(figures, RESULTS / "field_rules.png")


if __name__ == "__main__":
    main()
