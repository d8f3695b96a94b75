"""The Redis caches, measured side by side in one run. Prints a table, writes ``bench/results/cache.json``
and ``cache.png``.

    python -m bench.cache_bench                  # ~2 min on 2 cores
    python -m bench.cache_bench --quick

Series (interleaved, so machine noise hits each alike):
  - cold: a retrieval whose result is not cached (a distinct query each time: a full chord);
  - cached: the same retrieval repeated (result cache hit: one Redis round trip, no task);
  - lookup: the cache round trip alone (``memq.client.result_cache.lookup``), for the floor of a hit.
Bursts: N identical concurrent cold retrievals with single-flight, and with the result cache off (N chords).
Embedding cache: ``memq.embed_texts`` on the same texts, first (computed) and again (served by MGET).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus
from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"
LIMITS = {"semantic": 5, "episodic": 5, "procedural": 5}
GOAL_HIT_P50_MS = 1.0
GOAL_SPEEDUP = 20.0


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(values_ms),
        "p50_ms": float(np.percentile(values_ms, 50)),
        "p95_ms": float(np.percentile(values_ms, 95)),
        "mean_ms": statistics.fmean(values_ms),
    }


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = call()
    return (time.perf_counter() - started) * 1000, out


def merges_run(app: Any) -> int:
    replies = app.control.inspect(timeout=2.0).stats() or {}
    return sum(int(stats.get("total", {}).get("memq.merge", 0)) for stats in replies.values())


def set_result_cache_ttl_s(ttl_s: int) -> None:
    """Settings are read once per process; the bench switches the cache off and on between phases."""
    from memq.core.settings import get_settings

    os.environ["MEMQ_RESULT_CACHE_TTL_S"] = str(ttl_s)
    get_settings.cache_clear()


def ingest(tenant: str, per_type: int) -> None:
    from memq.client import api

    for memory_type in ("long_term_memory", "conversation_memory", "workflow_memory"):
        items = corpus.memories(memory_type, per_type, seed=len(memory_type))
        for start in range(0, len(items), 250):
            api.remember(tenant, memory_type, items[start : start + 250])


def latency_series(tenant: str, iterations: int, queries: Any) -> dict[str, list[float]]:
    from memq.client import api, result_cache
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    hot = next(queries)
    api.retrieve(hot, tenant, LIMITS)
    series: dict[str, list[float]] = {"cold": [], "cached": [], "lookup": [], "cache_ms_in_hit": []}
    settings = get_settings()
    for _ in range(iterations):
        ms, _ = timed(lambda: api.retrieve(next(queries), tenant, LIMITS))
        series["cold"].append(ms)
        ms, hit = timed(lambda: api.retrieve(hot, tenant, LIMITS))
        assert hit["cached"], "the repeated retrieval missed the cache"
        series["cached"].append(ms)
        series["cache_ms_in_hit"].append(hit["timings_ms"]["cache_ms"])
        request = retrieval_request(settings, hot, tenant, LIMITS)
        series["lookup"].append(timed(lambda r=request: result_cache.lookup(settings, r))[0])
    return series


def burst(app: Any, tenant: str, size: int, rounds: int, queries: Any) -> dict[str, Any]:
    from memq.client import api

    latencies: list[float] = []
    merges_before = merges_run(app)
    for _ in range(rounds):
        query = next(queries)
        start = threading.Barrier(size)

        def one(_: int, q: str = query, barrier: threading.Barrier = start) -> float:
            barrier.wait()
            return timed(lambda: api.retrieve(q, tenant, LIMITS, timeout_s=60))[0]

        with ThreadPoolExecutor(max_workers=size) as pool:
            latencies.extend(pool.map(one, range(size)))
    chords = merges_run(app) - merges_before
    return summary(latencies) | {"requests": size * rounds, "chords": chords, "chords_per_burst": chords / rounds}


def embedding_cache_series(app: Any, texts: int, rounds: int) -> dict[str, Any]:
    from memq.core import names

    def embed(batch: list[str]) -> dict[str, Any]:
        return dict(app.send_task(names.EMBED_TEXTS, args=(batch,), queue=names.EMBED_QUEUE).get(timeout=120))

    first: list[float] = []
    again: list[float] = []
    for r in range(rounds):
        batch = [f"{text} (round {r})" for text in corpus.queries(texts, seed=100 + r)]
        ms, out = timed(lambda b=batch: embed(b))
        first.append(ms)
        assert out["embedding_cache"]["computed"] == len(set(batch))
        ms, out = timed(lambda b=batch: embed(b))
        assert out["embedding_cache"]["hits"] == len(batch)
        again.append(ms)
    return {"texts": texts, "computed": summary(first), "from_cache": summary(again)}


def run(args: argparse.Namespace, fleet: services.Fleet) -> dict[str, Any]:
    from memq.client import result_cache
    from memq.client.app import app

    hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
    fleet.wait_ready(app, hosts)
    tenant = "cache-bench"
    print(f"ingesting {3 * args.per_type} memories ...", file=sys.stderr)
    ingest(tenant, args.per_type)
    queries = iter(corpus.queries(100_000, seed=11))
    from memq.client import api

    for _ in range(3):  # steady state: model warm, tenant matrices loaded in the search worker
        api.retrieve(next(queries), tenant, LIMITS)
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "limits": LIMITS}
    print("latency series ...", file=sys.stderr)
    series = latency_series(tenant, args.iterations, queries)
    report["latency"] = {name: summary(values) for name, values in series.items()}
    print("bursts ...", file=sys.stderr)
    report["burst_single_flight"] = burst(app, tenant, args.burst, args.burst_rounds, queries)
    set_result_cache_ttl_s(0)
    report["burst_cache_off"] = burst(app, tenant, args.burst, args.burst_rounds, queries)
    set_result_cache_ttl_s(300)
    print("embedding cache ...", file=sys.stderr)
    report["embedding_cache"] = embedding_cache_series(app, args.embed_texts, args.embed_rounds)
    report["client_lookups"] = result_cache.counts()
    lat = report["latency"]
    report["ratios"] = {
        "cold_over_cached_p50": lat["cold"]["p50_ms"] / lat["cached"]["p50_ms"],
        "cold_over_cached_p95": lat["cold"]["p95_ms"] / lat["cached"]["p95_ms"],
        "burst_cache_off_over_single_flight_p50": report["burst_cache_off"]["p50_ms"]
        / report["burst_single_flight"]["p50_ms"],
        "embed_computed_over_cached_p50": report["embedding_cache"]["computed"]["p50_ms"]
        / report["embedding_cache"]["from_cache"]["p50_ms"],
    }
    report["goals"] = [
        {"goal": "cached p50 < 1 ms", "value": lat["cached"]["p50_ms"], "met": lat["cached"]["p50_ms"] < 1.0},
        {
            "goal": "cached >= 20x faster than cold (p50)",
            "value": report["ratios"]["cold_over_cached_p50"],
            "met": report["ratios"]["cold_over_cached_p50"] >= GOAL_SPEEDUP,
        },
        {
            "goal": "a burst of identical requests runs one chord",
            "value": report["burst_single_flight"]["chords_per_burst"],
            "met": report["burst_single_flight"]["chords_per_burst"] == 1,
        },
    ]
    return report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'series':<22}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    rows = dict(report["latency"])
    rows |= {"burst_single_flight": report["burst_single_flight"], "burst_cache_off": report["burst_cache_off"]}
    rows |= {f"embed_{k}": v for k, v in report["embedding_cache"].items() if isinstance(v, dict)}
    for name, s in rows.items():
        print(f"{name:<22}{s['n']:>6}{s['p50_ms']:>10.3f}{s['p95_ms']:>10.3f}{s['mean_ms']:>10.3f}")
    for name in ("burst_single_flight", "burst_cache_off"):
        print(f"{name}: {report[name]['chords_per_burst']:.1f} chords per burst of {report['config']['burst']}")
    print("\nratios:")
    for name, value in report["ratios"].items():
        print(f"  {name:<42}{value:>9.1f}x")
    print(f"client look-ups: {report['client_lookups']}")
    print("\ngoals:")
    for g in report["goals"]:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.3g}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    names = ["cold", "cached", "lookup"]
    x = np.arange(len(names))
    left.bar(x - 0.2, [report["latency"][n]["p50_ms"] for n in names], 0.4, label="p50")
    left.bar(x + 0.2, [report["latency"][n]["p95_ms"] for n in names], 0.4, label="p95")
    left.axhline(GOAL_HIT_P50_MS, color="grey", ls="--", label="1 ms goal")
    left.set_yscale("log")
    left.set_xticks(x, ["cold (chord)", "cached (client)", "cache round trip"])
    left.set_ylabel("latency (ms, log)")
    left.set_title(f"retrieval, cold vs cached: {report['ratios']['cold_over_cached_p50']:.0f}x at p50")
    left.legend()
    bursts = ["burst_single_flight", "burst_cache_off"]
    bx = np.arange(len(bursts))
    right.bar(bx - 0.2, [report[b]["p50_ms"] for b in bursts], 0.4, label="p50 ms")
    right.bar(bx + 0.2, [report[b]["p95_ms"] for b in bursts], 0.4, label="p95 ms")
    labels = [f"{b.removeprefix('burst_')}\n{report[b]['chords_per_burst']:.0f} chords/burst" for b in bursts]
    right.set_xticks(bx, labels)
    right.set_ylabel("latency (ms)")
    right.set_title(f"{report['config']['burst']} identical concurrent requests")
    right.legend()
    fig.suptitle(f"memq caches on {report['machine']['cpu']} ({report['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="flushed first")
    parser.add_argument("--per-type", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--burst-rounds", type=int, default=5)
    parser.add_argument("--embed-texts", type=int, default=256)
    parser.add_argument("--embed-rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_type, args.iterations, args.burst_rounds, args.embed_rounds = 200, 50, 2, 1

    import redis

    redis_service = services.ensure_redis(args.redis_url)
    redis.Redis.from_url(redis_service.url).flushdb()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    env = services.memq_env(
        os.environ,
        redis_service.url,
        mongo_service.url,
        MEMQ_MONGODB_DB="memq_cache_bench",
        MEMQ_REDIS_URL="",
        MEMQ_RESULT_CACHE_TTL_S="300",
    )
    os.environ.update(env)
    fleet = services.Fleet(env)
    with services.running(redis_service, mongo_service):
        try:
            report = run(args, fleet)
        finally:
            fleet.stop_all()
    report["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
