"""Bulk ingest through the real pipeline (issue #18): ``remember_many`` over a generator of short memories, in
batches of ``memq.core.field_rules.MAX_BATCH_ITEMS`` with a bounded number in flight. Prints a table, writes
``bench/results/ingest.json``.

    python -m bench.ingest_bench                    # 100,000 memories, 4 batches in flight
    python -m bench.ingest_bench --count 20000      # a smaller run
    python -m bench.ingest_bench --in-flight 1,4    # several settings, one after the other, each on its own tenant

It starts what it needs, as the other benchmarks do: a private redis-server, nx-27017 (or ``MEMQ_MONGODB_URI``),
and one embed, one search and one ingest worker. The client's peak RSS is reported beside the rate: the input is
streamed, so it stays flat whatever ``--count``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memq.core import field_rules
from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"


def short_memories(count: int, run: str) -> Iterator[dict[str, Any]]:
    """Chat-history-like lines of about 12 words, generated lazily, distinct within and across runs (``run``): the
    embedding cache never answers for one."""
    topics = ["dinner", "the trip", "a meeting", "the report", "running", "her sister", "the garden", "a movie"]
    verbs = ["mentioned", "asked about", "planned", "cancelled", "enjoyed", "worried about"]
    for n in range(count):
        content = f"{run} message {n}: the user {verbs[n % 6]} {topics[n % 8]} on day {n // 48}"
        yield {"content": content, "role": "user"}


def run_one(count: int, in_flight: int, tenant: str) -> dict[str, Any]:
    from memq.client.api import IngestProgress, remember_many

    started = time.perf_counter()
    last = [started]

    def show(progress: IngestProgress) -> None:
        now = time.perf_counter()
        if now - last[0] >= 2 or progress.items == count:
            rate = progress.items / (now - started)
            print(f"\r  {progress.items:,}/{count:,} memories, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)
            last[0] = now

    items = short_memories(count, tenant)
    summary = remember_many(tenant, "episodic", items, max_in_flight=in_flight, on_progress=show)
    seconds = time.perf_counter() - started
    print(file=sys.stderr)
    return {
        "memories": summary["items"],
        "batches": summary["batches"],
        "max_in_flight": in_flight,
        "seconds": seconds,
        "memories_per_s": summary["items"] / seconds,
        "client_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def stored_count(mongodb_uri: str, tenant: str) -> int:
    import pymongo

    client = pymongo.MongoClient(mongodb_uri)
    try:
        return int(client["memq_bench_ingest"]["conversation_memory"].count_documents({"memory_id": tenant}))
    finally:
        client.close()


def run(args: argparse.Namespace, fleet: services.Fleet, mongodb_uri: str) -> dict[str, Any]:
    from memq.client.api import remember
    from memq.client.app import app

    hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
    fleet.wait_ready(app, hosts)
    remember("ingest-bench-warm-up", "episodic", list(short_memories(200, "warm-up")))  # model loaded, pools open
    rows = []
    for in_flight in args.in_flight:
        tenant = f"ingest-bench-{in_flight}-{int(time.time())}"
        print(f"remember_many: {args.count:,} memories, {in_flight} batch(es) in flight", file=sys.stderr)
        row = run_one(args.count, in_flight, tenant)
        row["stored_in_mongodb"] = stored_count(mongodb_uri, tenant)
        rows.append(row)
    return {
        "config": {"count": args.count, "batch_items": field_rules.MAX_BATCH_ITEMS, "in_flight": args.in_flight},
        "runs": rows,
    }


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
    print(f"\nmachine: {report['machine']}")
    print(f"batch: {report['config']['batch_items']} memories (memq.core.field_rules.MAX_BATCH_ITEMS)\n")
    header = f"{'memories':>10}{'in flight':>11}{'batches':>9}{'seconds':>10}{'memories/s':>12}{'stored':>10}"
    print(header + f"{'client RSS MiB':>16}")
    for row in report["runs"]:
        print(
            f"{row['memories']:>10,}{row['max_in_flight']:>11}{row['batches']:>9}{row['seconds']:>10.1f}"
            f"{row['memories_per_s']:>12.0f}{row['stored_in_mongodb']:>10,}{row['client_peak_rss_mib']:>16.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--in-flight", default="4", help="comma-separated max_in_flight values, one run each")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = parser.parse_args(argv)
    args.in_flight = [int(v) for v in args.in_flight.split(",")]

    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    env = services.memq_env(os.environ, redis_service.url, mongo_service.url, MEMQ_MONGODB_DB="memq_bench_ingest")
    os.environ.update(env)
    fleet = services.Fleet(env)
    with services.running(redis_service, mongo_service):
        try:
            report = run(args, fleet, mongo_service.url)
        finally:
            fleet.stop_all()
            gc.collect()  # release pending AsyncResults while their Redis is still up
    report["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
