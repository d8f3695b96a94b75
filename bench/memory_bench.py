"""Memory under the heaviest retrievals: 9 memory types x k=100 over memories of ~4 KB, from 16 clients. Fleets in
one run, on the same MongoDB data and request stream: ``unbounded`` (no cache Redis ``maxmemory``, a search worker
resident memory budget far above what it holds, Celery's default prefetch) and ``budgeted`` (a 64 MB cache Redis
and ``MEMQ_SEARCH_MAX_RSS_BYTES``, the search worker's one memory limit). Reports the search worker's resident memory
against its budget and the cache Redis's peak ``used_memory`` against its ``maxmemory``. Prints a table, writes
``bench/results/memory.json`` and ``memory.png``; ``--before FILE`` adds the runs of an earlier ``memory.json`` (the
code before a change, run alike) to the table, the JSON and the plot, labelled ``before:``.

    python -m bench.memory_bench --tenants 12 --requests 160   # the README's run
    python -m bench.memory_bench --tenants 4 --requests 64 --fleets budgeted   # a quick look

Memories are written straight into MongoDB with random unit vectors (what is measured is memory, not ranking);
queries are embedded by the real model. The cache Redis is its own redis-server (``MEMQ_REDIS_URL``), as in the
compose and k8s files, with ``volatile-lru``; the broker is another one, with ``noeviction``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.pipeline_bench import RESULTS, machine, summary
from bench.scale_bench import rss_mb
from memq.core.memory_types import MemoryType
from memq.ops import services

TYPES = tuple(memory_type.value for memory_type in MemoryType)  # all 9
QUERIES = ("what does this person like", "recent plans", "how to book travel", "health notes", "work projects")
MIB = 1024 * 1024
UNBOUNDED = {"cache_maxmemory_mb": 0, "rss_budget_mb": 64 * 1024}
BUDGETED = {"cache_maxmemory_mb": 64, "rss_budget_mb": 448}
FLEETS = {"unbounded": UNBOUNDED, "budgeted": BUDGETED}
UNBOUNDED_SEARCH_ARGS = ("--prefetch-multiplier", "4")  # Celery's default (search workers take 1)


def load_memories(uri: str, db: str, tenants: int, memories: int, content_bytes: int, dimensions: int) -> None:
    import pymongo

    from bench.scale_bench import _dt
    from memq.core.keys import memory_object_id
    from memq.core.vectors import to_bson

    rng = np.random.default_rng(11)
    database = pymongo.MongoClient(uri)[db]
    filler = ("lorem ipsum dolor sit amet " * (content_bytes // 27 + 1))[:content_bytes]
    now = time.time()
    for collection in TYPES:
        database[collection].create_index([("memory_id", 1), ("created_at", -1)])
        database[collection].create_index([("memory_id", 1)])  # nx-27017 plans equality through these only
    for t in range(tenants):
        memory_id = f"mem-{t}"
        for collection in TYPES:
            vectors = rng.standard_normal((memories, dimensions)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            docs = [
                {
                    "_id": memory_object_id(memory_id, f"m{i}"),
                    "memory_id": memory_id,
                    "key": f"m{i}",
                    "content": f"{QUERIES[i % len(QUERIES)]} {i}: {filler}",
                    "embedding": to_bson(vectors[i]),
                    "model": "all-MiniLM-L6-v2",
                    "importance": 0.5,
                    "created_at": _dt(now - i * 3600),
                    "last_accessed_at": _dt(now - i * 3600),
                }
                for i in range(memories)
            ]
            database[collection].insert_many(docs, ordered=False)


def drive(tenants: int, requests: int, clients: int, k: int) -> dict[str, Any]:
    """In a client process: ``requests`` retrievals of all 9 types x ``k`` from ``clients`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from memq import retrieve

    limits = dict.fromkeys(TYPES, k)

    def one(i: int) -> tuple[float, str, int]:
        started = time.perf_counter()
        try:
            result = retrieve(f"{QUERIES[i % len(QUERIES)]} #{i}", f"mem-{i % tenants}", limits, timeout_s=120)
            problem = json.dumps(result["errors"])[:200] if result["errors"] else ""
            size = len(json.dumps(result["results"]))
        except Exception as exc:
            problem, size = f"{type(exc).__name__}: {exc}"[:200], 0
        return (time.perf_counter() - started) * 1000, problem, size

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(requests)))
    problems = [problem for _, problem, _ in outcomes if problem]
    return {
        "latency": summary([ms for ms, problem, _ in outcomes if not problem]),
        "errors": len(problems),
        "error_examples": sorted(set(problems))[:3],
        "result_mb_max": max((size for *_, size in outcomes), default=0) / MIB,
    }


class Sampler:
    """Peak RSS of one process and peak ``used_memory`` of one Redis, sampled every ``interval_s``."""

    def __init__(self, pid: int, cache: redis.Redis, interval_s: float = 0.25) -> None:
        self.pid, self.cache, self.interval_s = pid, cache, interval_s
        self.rss_mb: list[float] = []
        self.redis_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.rss_mb.append(rss_mb(self.pid))
            self.redis_mb.append(int(self.cache.info("memory")["used_memory"]) / MIB)


def run_fleet(base_env: dict[str, str], label: str, budget: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    cache_service = services.start_redis_server()
    cache = redis.Redis.from_url(cache_service.url)
    cache.config_set("maxmemory", f"{budget['cache_maxmemory_mb']}mb")
    cache.config_set("maxmemory-policy", "volatile-lru")
    env = {
        **base_env,
        "MEMQ_REDIS_URL": cache_service.url,
        "MEMQ_SEARCH_MAX_RSS_BYTES": str(budget["rss_budget_mb"] * MIB),
        "MEMQ_SEARCH_STRATEGY": "exact",
    }
    search_args = UNBOUNDED_SEARCH_ARGS if label == "unbounded" else ()
    fleet = services.Fleet(env)
    app = None
    try:
        hosts = [
            fleet.start("embed", name=f"{label}-embed"),
            fleet.start("search", name=f"{label}-search", extra_args=search_args),
        ]
        from celery import Celery

        from memq.config.celery import celery_config
        from memq.core.settings import Settings

        app = Celery("memq-memory-bench", set_as_current=False)
        app.config_from_object(
            celery_config(Settings(broker_url=env["MEMQ_BROKER_URL"], result_backend=env["MEMQ_BROKER_URL"]))
        )
        fleet.wait_ready(app, hosts, timeout_s=240)
        baseline_rss_mb = rss_mb(fleet.workers[hosts[1]].pid)
        code = (
            "import json; from bench.memory_bench import drive; "
            f"print(json.dumps(drive({args.tenants}, {args.requests}, {args.clients}, {args.k})))"
        )
        with Sampler(fleet.workers[hosts[1]].pid, cache) as sampled:
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        driven = json.loads(proc.stdout.strip().splitlines()[-1])
        evicted = int(cache.info("stats")["evicted_keys"])
        guard = search_info(app, hosts[1]).get("memory_guard", {})
    finally:
        fleet.stop_all()
        cache_service.stop()
        if app is not None:
            app.close()
    return {
        "fleet": label,
        **budget,
        **driven,
        "search_rss_mb_at_start": baseline_rss_mb,
        "search_rss_mb_peak": max(sampled.rss_mb, default=float("nan")),
        "cache_redis_mb_peak": max(sampled.redis_mb, default=float("nan")),
        "cache_evicted_keys": evicted,
        "memory_guard": guard,
        "rss_series_mb": sampled.rss_mb,
        "redis_series_mb": sampled.redis_mb,
    }


def search_info(app: Any, host: str) -> dict[str, Any]:
    from memq.core import names

    replies = app.control.broadcast(names.INFO_COMMAND, destination=[host], reply=True, timeout=5.0) or []
    return next((reply[host] for reply in replies if host in reply), {})


def report(runs: list[dict[str, Any]]) -> None:
    print(
        f"{'fleet':<20} {'RSS budget MB':>13} {'RSS start':>9} {'RSS p99':>8} {'RSS peak':>9} {'over budget':>11} "
        f"{'cache maxmem MB':>15} {'Redis peak MB':>13} {'evicted':>8} {'p50 ms':>8} {'errors':>6}"
    )
    for run in runs:
        budget = run["rss_budget_mb"] or "none"
        series = run["rss_series_mb"]
        over = f"{sum(mb > run['rss_budget_mb'] for mb in series) if run['rss_budget_mb'] else 0} of {len(series)}"
        print(
            f"{run['fleet']:<20} {budget!s:>13} {run['search_rss_mb_at_start']:>9.0f} "
            f"{percentile(series, 99):>8.0f} {run['search_rss_mb_peak']:>9.0f} "
            f"{over:>11} {run['cache_maxmemory_mb'] or 'none'!s:>15} "
            f"{run['cache_redis_mb_peak']:>13.1f} {run['cache_evicted_keys']:>8} {run['latency']['p50_ms']:>8.0f} "
            f"{run['errors']:>6}"
        )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        style = ":" if run["fleet"].startswith("before:") else "-"
        left.plot(np.arange(len(run["rss_series_mb"])) * 0.25, run["rss_series_mb"], style, label=run["fleet"])
        right.plot(np.arange(len(run["redis_series_mb"])) * 0.25, run["redis_series_mb"], style, label=run["fleet"])
    budgets = {run["rss_budget_mb"] for run in runs if 0 < run["rss_budget_mb"] < UNBOUNDED["rss_budget_mb"]}
    for budget in sorted(budgets):
        left.axhline(budget, linestyle="--", color="black", label=f"RSS budget {budget} MiB")
    right.axhline(BUDGETED["cache_maxmemory_mb"], linestyle="--", color="grey", label="maxmemory (budgeted)")
    left.set(title="search worker RSS", xlabel="s", ylabel="MiB")
    right.set(title="cache Redis used_memory", xlabel="s", ylabel="MB")
    left.legend(fontsize="small")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def earlier_runs(path: str | None) -> list[dict[str, Any]]:
    """The runs of an earlier ``memory.json``, each fleet labelled ``before:<fleet>``."""
    if path is None:
        return []
    return [{**run, "fleet": f"before:{run['fleet']}"} for run in json.loads(Path(path).read_text())["runs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--memories", type=int, default=300, help="per tenant and type")
    parser.add_argument("--content-bytes", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--fleets", default="unbounded,budgeted", help="comma-separated, run in this order")
    parser.add_argument("--rss-budget-mb", type=int, default=BUDGETED["rss_budget_mb"], help="the budgeted fleet's")
    parser.add_argument("--before", help="an earlier memory.json whose runs are shown beside these")
    args = parser.parse_args()

    broker = services.start_redis_server()
    mongo = services.start_nx27017()
    base_env = services.memq_env(
        {k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")},
        broker.url,
        mongo.url,
        MEMQ_MONGODB_DB="memq_memory_bench",
        MEMQ_RESULT_CACHE_TTL_S="600",
        MEMQ_METRICS_PORT="0",
    )
    try:
        started = time.perf_counter()
        load_memories(mongo.url, "memq_memory_bench", args.tenants, args.memories, args.content_bytes, 384)
        print(f"loaded {args.tenants * 9 * args.memories} memories in {time.perf_counter() - started:.0f} s")
        budgets = {**FLEETS, "budgeted": {**BUDGETED, "rss_budget_mb": args.rss_budget_mb}}
        runs = [run_fleet(base_env, label, budgets[label], args) for label in args.fleets.split(",")]
    finally:
        mongo.stop()
        broker.stop()
    runs = earlier_runs(args.before) + runs
    report(runs)
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": machine(), "args": vars(args), "runs": runs}
    (RESULTS / "memory.json").write_text(json.dumps(out, indent=1))
    plot(runs, RESULTS / "memory.png")
    print(f"wrote {RESULTS / 'memory.json'} and memory.png")


if __name__ == "__main__":
    main()
