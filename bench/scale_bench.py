"""The search pool scaled out, with tenant-affinity shards on and off, side by side in one run: matrix-cache hit
ratio, cold loads from MongoDB, resident memory of each search worker, copies of the busy tenants' matrices held
across workers, 3-type retrieval p50 / p95 and throughput. Prints a table, writes ``bench/results/scale.json`` and
``scale.png``.

    python -m bench.scale_bench                                   # 2,000 tenants x 3 types x 300 memories
    python -m bench.scale_bench --tenants 400 --memories 100 --requests 1500   # what fits a 2-core machine

Tenant popularity is Zipf-distributed (s = 1.1); every configuration replays the same request stream, with the
result cache off (every retrieval runs its chord). Memories are written straight into MongoDB with random unit
vectors: the vectors' values do not change what the caches do, and embedding millions of texts is not what is
measured. Configurations: 1 search worker, then 2 and 4 with shards off (one shared ``search`` queue) and on
(``MEMQ_SEARCH_SHARDS`` = the worker count, one shard per worker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline_bench import RESULTS, machine, summary
from memq.ops import services

TYPES = ("semantic", "episodic", "procedural")
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
COLLECTIONS = ("long_term_memory", "conversation_memory", "workflow_memory")
QUERIES = ("what does this person like", "recent plans", "how to book travel", "health notes", "work projects")


def load_memories(
    uri: str, db: str, tenants: int, memories: int, dimensions: int, model: str, nx_27017: bool = False
) -> None:
    import pymongo

    from memq.core.keys import memory_object_id
    from memq.core.vectors import to_bson

    rng = np.random.default_rng(5)
    database = pymongo.MongoClient(uri)[db]
    for collection in COLLECTIONS:
        database[collection].create_index([("memory_id", 1), ("created_at", -1)])
        if nx_27017:
            # nx-27017 (neosqlite) plans an equality through a single-field index only; through the compound index
            # above a cold load scans the whole collection (measured: 12 ms vs 1.5 s per load at 2,000 tenants).
            # A real MongoDB uses the compound index's prefix, so this index is made for nx-27017 alone.
            database[collection].create_index([("memory_id", 1)])
    now = time.time()
    for t in range(tenants):
        memory_id = f"scale-{t}"
        vectors = rng.standard_normal((len(COLLECTIONS) * memories, dimensions)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for c, collection in enumerate(COLLECTIONS):
            docs = []
            for i in range(memories):
                key = f"m{i}"
                docs.append(
                    {
                        "_id": memory_object_id(memory_id, key),
                        "memory_id": memory_id,
                        "key": key,
                        "content": f"memory {i} of {memory_id} about {QUERIES[i % len(QUERIES)]}",
                        "embedding": to_bson(vectors[c * memories + i]),
                        "model": model,
                        "importance": 0.5,
                        "created_at": _dt(now - i * 3600),
                        "last_accessed_at": _dt(now - i * 3600),
                    }
                )
            database[collection].insert_many(docs, ordered=False)


def _dt(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC)


def request_stream(tenants: int, requests: int, zipf_s: float, seed: int = 9) -> list[str]:
    """Tenants drawn by rank with probability proportional to 1 / rank^s (the most popular first)."""
    ranks = np.arange(1, tenants + 1, dtype=np.float64)
    weights = 1.0 / ranks**zipf_s
    drawn = np.random.default_rng(seed).choice(tenants, size=requests, p=weights / weights.sum())
    return [f"scale-{int(t)}" for t in drawn]


def drive(stream: list[str], clients: int) -> dict[str, Any]:
    """In a client process of the fleet: replay ``stream`` with ``clients`` threads; latencies and throughput."""
    from concurrent.futures import ThreadPoolExecutor

    from memq import retrieve

    limits = dict.fromkeys(TYPES, 5)

    def one(i: int) -> tuple[float, str]:
        """Milliseconds and "" on success; else what went wrong (counted, never hidden, never fatal)."""
        started = time.perf_counter()
        try:
            result = retrieve(QUERIES[i % len(QUERIES)], stream[i], limits, timeout_s=60)
            problem = json.dumps(result["errors"]) if result["errors"] else ""
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        return (time.perf_counter() - started) * 1000, problem

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(len(stream))))
    wall_s = time.perf_counter() - started
    problems = [problem for _, problem in outcomes if problem]
    return {
        "latency": summary([ms for ms, problem in outcomes if not problem]),
        "errors": len(problems),
        "error_examples": sorted(set(problems))[:3],
        "throughput_rps": (len(stream) - len(problems)) / wall_s,
    }


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counts = {}
    for outcome in ("hit", "miss", "bypass"):
        found = re.search(rf'memq_cache_requests_total{{cache="matrix",outcome="{outcome}"}} ([0-9.e+]+)', text)
        counts[outcome] = float(found.group(1)) if found else 0.0
    return counts


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_config(env: dict[str, str], workers: int, sharded: bool, stream: list[str], clients: int) -> dict[str, Any]:
    shards = workers if sharded else 1
    fleet_env = {**env, "MEMQ_SEARCH_SHARDS": str(shards)}
    fleet = services.Fleet(fleet_env)
    ports: dict[str, int] = {}
    try:
        hosts = [fleet.start("embed", name="scale-embed")]
        for w in range(workers):
            port = services.free_port()
            fleet.env = {**fleet_env, "MEMQ_METRICS_PORT": str(port)}
            extra = ["--shards", str(w)] if sharded else []
            host = fleet.start("search", name=f"scale-search{w}", extra_args=extra)
            ports[host] = port
            hosts.append(host)
        fleet.env = fleet_env
        from celery import Celery

        from memq.config.celery import celery_config
        from memq.core.settings import Settings

        app = Celery("memq-scale", set_as_current=False)
        app.config_from_object(
            celery_config(Settings(broker_url=env["MEMQ_BROKER_URL"], result_backend=env["MEMQ_BROKER_URL"]))
        )
        fleet.wait_ready(app, hosts, timeout_s=240)
        app.close()
        code = f"import json, sys; from bench.scale_bench import drive; print(json.dumps(drive({stream!r}, {clients})))"
        proc = subprocess.run([sys.executable, "-c", code], env=fleet_env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[:3000])
        driven = json.loads(proc.stdout.strip().splitlines()[-1])
        per_worker = {host: {**scrape(port), "rss_mb": rss_mb(fleet.workers[host].pid)} for host, port in ports.items()}
    finally:
        fleet.stop_all()
    hits = sum(w["hit"] for w in per_worker.values())
    misses = sum(w["miss"] for w in per_worker.values())
    distinct = len({(tenant, c) for tenant in set(stream) for c in COLLECTIONS})
    return {
        "workers": workers,
        "shards": sharded,
        **driven,
        "matrix_hit_ratio": hits / max(1.0, hits + misses),
        "cold_loads": misses,
        "copies_of_busy_matrices": misses / distinct,
        "per_worker": per_worker,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=2000)
    parser.add_argument("--memories", type=int, default=300, help="per tenant and type")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--configs", default="1off,2off,2on,4off,4on", help="search workers and shards off/on, comma-separated"
    )
    parser.add_argument(
        "--nx-dir",
        type=Path,
        help="keep nx-27017's data here and reuse it when a later run asks for the same corpus (loading 1.8 M "
        "memories takes ~6 min on 2 cores)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    configs = [(int(c[:-3] if c.endswith("off") else c[:-2]), c.endswith("on")) for c in args.configs.split(",")]
    redis_service = services.start_redis_server()
    given_mongodb_uri = os.environ.get("MEMQ_MONGODB_URI")
    corpus_name = f"memq_scale_{args.tenants}x{args.memories}"
    reuse = False
    if args.nx_dir and not given_mongodb_uri:
        args.nx_dir.mkdir(parents=True, exist_ok=True)
        reuse = (args.nx_dir / f"{corpus_name}.loaded").exists()
        (args.nx_dir / "nx.pid").unlink(missing_ok=True)  # left by an earlier run that was killed
        mongo = services.start_nx27017(workdir=str(args.nx_dir))
        mongo.workdir = None  # kept for the next run
    else:
        mongo = services.ensure_mongodb(given_mongodb_uri)
    db = corpus_name if args.nx_dir else f"memq_scale_{int(time.time())}"
    # The matrix cache measured here is the exact path's: no probing for $vectorSearch (on nx-27017 each probe
    # reads the whole collection: ~20 s at 600,000 memories).
    env = services.memq_env(
        os.environ,
        redis_service.url,
        mongo.url,
        MEMQ_MONGODB_DB=db,
        MEMQ_RESULT_CACHE_TTL_S="0",
        MEMQ_SEARCH_STRATEGY="exact",
    )
    os.environ.update(env)
    from memq.core.settings import get_settings

    settings = get_settings()
    shown_args = {**vars(args), "nx_dir": None, "out": str(args.out)}
    report: dict[str, Any] = {"machine": machine(), "args": shown_args, "configs": []}
    with services.running(redis_service, mongo):
        started = time.perf_counter()
        if not reuse:
            load_memories(
                mongo.url,
                db,
                args.tenants,
                args.memories,
                DIMENSIONS,
                settings.embed_model,
                nx_27017=not given_mongodb_uri,
            )
            if args.nx_dir:
                (args.nx_dir / f"{corpus_name}.loaded").touch()
            report["load_s"] = time.perf_counter() - started
        stream = request_stream(args.tenants, args.requests, args.zipf)
        report["distinct_tenants_requested"] = len(set(stream))
        print(
            f"{'reused' if reuse else 'loaded'} {args.tenants * 3 * args.memories:,} memories "
            f"({report.get('load_s', 0):.0f} s); "
            f"{len(set(stream))} distinct tenants in {len(stream)} requests"
        )
        print(
            f"{'workers':>7} {'shards':>6} {'hit %':>6} {'loads':>6} {'copies':>6} {'RSS MB/worker':>14} "
            f"{'p50 ms':>7} {'p95 ms':>7} {'req/s':>6} {'errors':>6}"
        )
        for workers, sharded in configs:
            row = run_config(env, workers, sharded, stream, args.clients)
            report["configs"].append(row)
            rss = "/".join(f"{w['rss_mb']:.0f}" for w in row["per_worker"].values())
            print(
                f"{workers:>7} {'on' if sharded else 'off':>6} {100 * row['matrix_hit_ratio']:>6.1f} "
                f"{row['cold_loads']:>6.0f} {row['copies_of_busy_matrices']:>6.2f} {rss:>14} "
                f"{row['latency']['p50_ms']:>7.1f} {row['latency']['p95_ms']:>7.1f} {row['throughput_rps']:>6.1f}"
                f" {row['errors']:>6}"
            )
            for example in row["error_examples"]:
                print(f"    error: {example[:300]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["configs"]
    labels = [f"{r['workers']}w {'shards' if r['shards'] else 'shared'}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [100 * r["matrix_hit_ratio"] for r in rows])
    left.set_ylabel("matrix-cache hit ratio (%)")
    right.bar(labels, [r["copies_of_busy_matrices"] for r in rows], color="tab:orange")
    right.set_ylabel("copies of each busy tenant's matrices")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle(f"memq search pool, {report['args']['tenants']} tenants, Zipf s={report['args']['zipf']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
