"""Which worker settings make a cold retrieval cheaper on this machine: variants side by side, in one run.

    python -m bench.tuning [--rounds 2] [--iterations 30] [--variants default,no_gossip,...]

Each variant starts a fresh fleet (embed, search, ingest) with its own worker flags, then measures, interleaved:
the floor (memq's canvas with a real embedding and no-op searches and merge, on a floor worker with the search
variant's flags: ``bench.floor``) and a cold 3-type retrieval (a
query never seen before, warm matrix caches). Variants run in alternating rounds (A B C A B C) so that the
machine's noise falls on all of them; the table reports the p50 over all rounds and the ratio to ``default``.
Writes ``bench/results/tuning.json`` and ``tuning.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus
from bench.pipeline_bench import machine, timed
from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"
TYPES3 = {"semantic": 5, "episodic": 5, "procedural": 5}
LEAN = ["--without-gossip", "--without-mingle"]
# Extra `memq worker KIND` arguments per variant and worker kind (memq's defaults come first on the command line).
VARIANTS: dict[str, dict[str, list[str]]] = {
    "default": {},
    "no_gossip_mingle": {"embed": LEAN, "search": LEAN, "ingest": LEAN},
    "prefetch_1": {"embed": ["--prefetch-multiplier", "1"], "search": ["--prefetch-multiplier", "1"]},
    "search_solo": {"search": ["--pool", "solo"]},
    "embed_concurrency_1": {"embed": ["--concurrency", "1"]},
}


def run_variant(env: dict[str, str], flags: dict[str, list[str]], tenant: str, iterations: int) -> dict[str, list]:
    from bench.floor import THREADS, floor_canvas, start_floor_worker
    from memq.client import api
    from memq.client.app import app
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    fleet = services.Fleet(env)
    run = uuid.uuid4().hex[:8]  # rounds share one Redis: no query may repeat across fleets (cache hits)
    queries = iter(f"{q} ({run})" for q in corpus.queries(iterations * 4 + 10, seed=7))
    settings = get_settings()

    def floor() -> Any:
        result = floor_canvas(retrieval_request(settings, next(queries), tenant, TYPES3)).apply_async()
        try:
            return result.get(timeout=30)
        finally:
            result.forget()

    try:
        hosts = [fleet.start(kind, extra_args=flags.get(kind, [])) for kind in services.WORKER_KINDS]
        hosts.append(start_floor_worker(fleet, pool_args=[*THREADS, *flags.get("search", [])]))
        fleet.wait_ready(app, hosts)
        for _ in range(3):  # load the tenant's matrices and warm the model in this fleet
            api.retrieve(next(queries), tenant, TYPES3)
            floor()
        samples: dict[str, list[float]] = {"floor_3": [], "memq_cold_3": []}
        for _ in range(iterations):
            samples["floor_3"].append(timed(floor)[0])
            samples["memq_cold_3"].append(timed(lambda: api.retrieve(next(queries), tenant, TYPES3))[0])
        return samples
    finally:
        fleet.stop_all()
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--per-type", type=int, default=500)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "tuning.json")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")

    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    env = services.memq_env(os.environ, redis_service.url, mongo_service.url, MEMQ_MONGODB_DB="memq_tuning")
    os.environ.update(env)
    tenant = "tuning-tenant"
    samples: dict[str, dict[str, list[float]]] = {name: {"floor_3": [], "memq_cold_3": []} for name in names}
    with services.running(redis_service, mongo_service):
        seed_corpus(env, tenant, args.per_type)
        for round_index in range(args.rounds):
            for name in names:
                got = run_variant(env, VARIANTS[name], tenant, args.iterations)
                for series, values in got.items():
                    samples[name][series].extend(values)
                print(
                    f"round {round_index + 1} {name}: floor p50 {np.median(got['floor_3']):.1f} ms, "
                    f"cold p50 {np.median(got['memq_cold_3']):.1f} ms",
                    file=sys.stderr,
                )
    report = summarise(samples, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def seed_corpus(env: dict[str, str], tenant: str, per_type: int) -> None:
    from memq.client import api

    fleet = services.Fleet(env)
    try:
        from memq.client.app import app

        fleet.wait_ready(app, [fleet.start(kind) for kind in services.WORKER_KINDS])
        api.forget(tenant)
        for index, memory_type in enumerate(("long_term_memory", "conversation_memory", "workflow_memory")):
            items = corpus.memories(memory_type, per_type, seed=index)
            for start in range(0, len(items), 250):
                api.remember(tenant, memory_type, items[start : start + 250])
    finally:
        fleet.stop_all()


def summarise(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict[str, Any]:
    rows = {
        name: {
            series: {"n": len(v), "p50_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))}
            for series, v in by_series.items()
        }
        for name, by_series in samples.items()
    }
    base = rows.get("default")
    for row in rows.values():
        for series, stats in row.items():
            stats["vs_default_p50"] = stats["p50_ms"] / base[series]["p50_ms"] if base else None
    return {
        "what": "p50 of the floor and of a cold 3-type retrieval per worker-flag variant, alternating rounds",
        "variants": {name: VARIANTS[name] for name in samples},
        "rounds": args.rounds,
        "iterations_per_round": args.iterations,
        "per_type": args.per_type,
        "results": rows,
        "machine": machine(),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']}")
    print(f"{'variant':<22}{'floor p50':>11}{'vs default':>12}{'cold p50':>11}{'vs default':>12}{'cold p95':>11}")
    for name, row in report["results"].items():
        floor, cold = row["floor_3"], row["memq_cold_3"]
        print(
            f"{name:<22}{floor['p50_ms']:>9.1f}ms{floor['vs_default_p50'] or 0:>11.2f}x"
            f"{cold['p50_ms']:>9.1f}ms{cold['vs_default_p50'] or 0:>11.2f}x{cold['p95_ms']:>9.1f}ms"
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for offset, series in ((-0.2, "floor_3"), (0.2, "memq_cold_3")):
        ax.bar(x + offset, [report["results"][n][series]["p50_ms"] for n in names], 0.4, label=series)
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylabel("p50 latency, ms")
    ax.set_title(f"worker settings, side by side ({report['machine']['cpu']}, {report['machine']['cores']} cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
