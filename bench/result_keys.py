"""Does Redis grow without bound under retrievals? Counts the keys Celery and memq leave behind.

Runs N retrievals (default 10,000) through ``memq.retrieve`` on a private fleet (its own redis-server,
nx-27017, one embed, one search and one ingest worker) with a short result expiry (twice
``MEMQ_VISIBILITY_TIMEOUT_S``, which it sets to half of ``--expires-s``), and counts
Redis keys by kind: before, right after, and once the expiry has passed. Also checks that every result key
carries a TTL. Prints a table and writes ``bench/results/result_keys.json``.

    python -m bench.result_keys                  # 10,000 retrievals, result_expires 60 s
    python -m bench.result_keys --n 500 --expires-s 20 --out bench/results/result_keys_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"
LIMITS = {"semantic": 2, "episodic": 1}
KINDS = (
    ("celery-task-meta-", "task results"),
    ("celery-taskset-meta-", "group results"),
    ("chord-unlock-", "chord unlock"),
    ("memq:v1:ver:", "tenant versions"),
    ("memq:v1:", "other memq keys"),
    ("_kombu.binding.", "kombu bindings"),
)


def kind_of(key: str) -> str:
    if key.startswith("celery-taskset-meta-") and key.endswith(".c"):
        return "chord done markers"
    for prefix, kind in KINDS:
        if key.startswith(prefix):
            return kind
    if key.endswith((".j", ".t", ".s")):
        return "chord counters"
    return "other"


def census(client: Any) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    no_ttl: Counter[str] = Counter()
    for raw in client.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        kind = kind_of(key)
        counts[kind] += 1
        if kind in ("task results", "group results", "chord counters", "chord done markers") and client.ttl(raw) == -1:
            no_ttl[kind] += 1
    info = client.info("memory")
    return {
        "keys": sum(counts.values()),
        "by_kind": dict(sorted(counts.items())),
        "result_keys_without_ttl": dict(no_ttl),
        "used_memory_bytes": int(info["used_memory"]),
    }


def wait_for_expiry(client: Any, kind: str, until: float) -> dict[str, Any]:
    snapshot = census(client)
    while time.monotonic() < until and snapshot["by_kind"].get(kind, 0) > 0:
        time.sleep(2.0)
        snapshot = census(client)
    return snapshot


def run_retrievals(n: int, threads: int, tenants: list[str]) -> dict[str, Any]:
    from memq.client import api
    from memq.errors import MemqError

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    remaining = [n]

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            try:
                result = api.retrieve(f"query {rng.random()}", rng.choice(tenants), LIMITS, timeout_s=30)
                outcome = "complete" if not result["errors"] else "reported"
            except MemqError as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1

    started = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {"outcomes": dict(outcomes), "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--expires-s", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS / "result_keys.json")
    args = parser.parse_args()
    if args.expires_s < 20 or args.expires_s % 2:
        parser.error("--expires-s must be even and at least 20 (twice the 10 s retrieve timeout)")

    redis_service = services.start_redis_server()
    mongo = services.start_nx27017()
    env = services.memq_env(
        os.environ, redis_service.url, mongo.url, MEMQ_MONGODB_DB="memq_bench_keys",
        MEMQ_VISIBILITY_TIMEOUT_S=str(args.expires_s // 2),  # result keys expire after twice it
    )  # fmt: skip
    os.environ.update(env)  # before anything reads the settings
    import redis

    from memq.client import api
    from memq.client.app import app

    fleet = services.Fleet(env)
    try:
        hosts = [fleet.start(kind, name=f"keys-{kind}") for kind in services.WORKER_KINDS]
        fleet.wait_ready(app, hosts, timeout_s=240)
        tenants = [f"keys-tenant-{i}" for i in range(8)]
        for tenant in tenants:
            api.remember(tenant, "semantic", [f"{tenant} likes {food}" for food in ("tea", "curry", "bread")])
            api.remember(tenant, "episodic", [f"user: {tenant} books a table"])
        r = redis.Redis.from_url(redis_service.url)
        before = census(r)
        run = run_retrievals(args.n, args.threads, tenants)
        after = census(r)
        ended = time.monotonic()
        # Result keys carry a TTL of result_expires; Celery's chord "done" markers (``<group>.c``) a fixed
        # max(2 x claim, 300 s). Wait for each (plus slack), stopping early once none is left.
        expired = wait_for_expiry(r, "task results", ended + args.expires_s + 10)
        markers_gone = wait_for_expiry(r, "chord done markers", ended + max(args.expires_s, 300) + 15)
    finally:
        fleet.stop_all()
        mongo.stop()
        redis_service.stop()

    report = {
        "what": "Redis keys by kind before, right after N retrievals, and after result_expires",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (2-core CPU dev machine)",
        "python": sys.version.split()[0],
        "n": args.n,
        "threads": args.threads,
        "limits": LIMITS,
        "result_expires_s": args.expires_s,
        "run": run,
        "before": before,
        "after": after,
        "after_result_expires": expired,
        "after_chord_marker_ttl": markers_gone,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.n} retrievals in {run['seconds']:.0f} s: {run['outcomes']}")
    snapshots = (before, after, expired, markers_gone)
    print(f"{'kind':<20} {'before':>8} {'after':>8} {'+expires':>9} {'+300 s':>8}")
    for kind in sorted(set().union(*(snapshot["by_kind"] for snapshot in snapshots))):
        row = [snapshot["by_kind"].get(kind, 0) for snapshot in snapshots]
        print(f"{kind:<20} {row[0]:>8} {row[1]:>8} {row[2]:>9} {row[3]:>8}")
    print(f"result keys without a TTL right after: {after['result_keys_without_ttl'] or 'none'}")
    print("used_memory bytes: " + " -> ".join(str(snapshot["used_memory_bytes"]) for snapshot in snapshots))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
