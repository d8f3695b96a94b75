"""Write, then read: what a write costs the next search of its tenant, at 1,000 to 200,000 memories of one type,
with the incremental path (the change log applied: ``workers.search.strategies.catch_up``) and a forced full reload side
by
side, in one run. Prints a table, writes ``bench/results/write_read.json`` and ``write_read.png``.

    python -m bench.write_read_bench                          # 1,000, 10,000 and 50,000 memories
    python -m bench.write_read_bench --sizes 1000,10000,50000,200000
    python -m bench.write_read_bench --quick                  # fewer repetitions

It starts a private redis-server and nx-27017 (or uses ``MEMQ_MONGODB_URI``). Each tenant is written directly
with the real write functions (``writes.build_writes`` + ``writes.upsert`` in batches, then one version bump), with
``bench.corpus`` texts and random unit vectors (the vectors' values do not change the cost), instead of embedding
every text. The searches are the search worker's own functions called in this process (``search.exact_search``,
hybrid, k = 30: a limit of 10 with the default oversample): what ``timings_ms.search_ms`` measures on a worker,
without the broker, the embedding and the merge. Each write is ``steps.store_memories``, the ingest worker's step
(upserts, then the bump that logs the written ids).

Measured per size, each a median over repetitions:

- ``warm``: the tenant cached at its current version;
- ``after 1`` / ``after 100``: the first search after a write of 1 / 100 memories (half of them new, half
  re-sent), incremental vs full reload (the catch-up disabled, as before the change log: every write reloads),
  and ``1 / warm``: the median ratio of the search after a write of 1 to a warm search measured just before that
  write (each pair shares the load of the moment: this machine is shared and noisy);
- ``8 concurrent``: the slowest of 8 searches started together right after a write of 1 memory (one catch-up or
  one load shared by all of them), incremental vs full reload;
- ``cold``: the first load of the tenant in a fresh process;
- through a fleet (``--client``, on by default): the same tenant through ``memq.client.api`` and real ``memq worker``
  processes (embed, search, ingest; exact search): the client time of ``client.retrieve`` (its embedding, the
  broker, the search, the merge) and its ``timings_ms.search_ms``, warm, right after a ``client.remember`` of 1 and
  of 100 memories, and the slowest of 8 concurrent retrievals right after a remember of 1; incremental vs full
  reload (the tenant's change log deleted after each write, so the search worker cannot bridge and reloads, as
  before the change log). Every retrieval asks a query not asked before, so no result cache answers it.

Goals: the search right after a write within 2x the warm search; a warm search of 200,000 memories within 20 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus
from bench.pipeline_bench import RESULTS, machine
from memq.ops import services

LTM = "long_term_memory"
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
K = 30
CLIENT_LIMITS = {"semantic": 10}  # k = 30 in the search, with the default oversample: as the in-process searches
CLIENT_TIMEOUT_S = 120.0
SIZES = (1_000, 10_000, 50_000)
WRITE_BATCH = 1_000  # upserts per bulk write: each well within the MongoDB client's socket timeout
CONCURRENT = 8
BLOCK_SEARCHES = 10


def unit_vectors(rng: np.random.Generator, count: int, dimensions: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_tenant(tenant: str, size: int, dimensions: int) -> float:
    """The tenant's memories written straight through the write functions; the seconds it took."""
    from memq.core import keys
    from memq.core.settings import get_settings
    from memq.errors import StoreUnavailable
    from memq.workers.storage import versions, writes

    rng = np.random.default_rng(size)
    texts = corpus.memories(LTM, size, seed=size)
    started = time.perf_counter()
    touched: list[str] = []
    for start in range(0, size, WRITE_BATCH):
        items = [
            {"id": f"m{i}", "content": str(texts[i]["content"]), "importance": texts[i]["importance"]}
            for i in range(start, min(size, start + WRITE_BATCH))
        ]
        vectors = unit_vectors(rng, len(items), dimensions)
        batch = writes.build_writes(tenant, LTM, items, vectors, get_settings().embed_model, time.time())
        for attempt in range(3):  # idempotent: a batch that timed out on a busy server is sent again
            try:
                writes.upsert(LTM, batch)
                break
            except StoreUnavailable:
                if attempt == 2:
                    raise
        touched += [keys.memory_object_id(tenant, item["id"]) for item in items]
        print(f"\r{tenant}: {start + len(items):,}/{size:,} written", end="", file=sys.stderr, flush=True)
    versions.bump_versions(tenant, [LTM], touched)
    print(file=sys.stderr)
    return time.perf_counter() - started


class Tenant:
    """One benchmark tenant: its writes and its searches, in this process."""

    def __init__(self, name: str, size: int, dimensions: int) -> None:
        self.name, self.size, self.dimensions = name, size, dimensions
        self.rng = np.random.default_rng(size + 1)
        self.queries = corpus.queries(2000, seed=size)
        self.written = 0

    def write(self, count: int) -> None:
        """``count`` memories through the ingest step: half new, half re-sent with new content."""
        from memq.core.settings import get_settings
        from memq.core.vectors import to_wire
        from memq.workers import steps

        items = []
        for n in range(count):
            key = f"m{int(self.rng.integers(self.size))}" if n % 2 else f"new{self.written + n}"
            items.append({"id": key, "content": self.queries[(self.written + n) % len(self.queries)]})
        self.written += count
        vectors = unit_vectors(self.rng, count, self.dimensions)
        embedded = {"vectors": [to_wire(vector) for vector in vectors], "model": get_settings().embed_model}
        steps.store_memories(embedded, self.name, LTM, items)

    def search_ms(self) -> float:
        from memq.workers.search import strategies

        query = self.queries[int(self.rng.integers(len(self.queries)))]
        vector = unit_vectors(self.rng, 1, self.dimensions)[0]
        started = time.perf_counter()
        strategies.exact_search(self.name, LTM, vector, K, strategies.Wanted(query=query, mode="hybrid"))
        return (time.perf_counter() - started) * 1000

    def concurrent_ms(self) -> float:
        """The slowest of ``CONCURRENT`` searches started together."""
        times: list[float] = []
        barrier = threading.Barrier(CONCURRENT)

        def one() -> None:
            barrier.wait()
            times.append(self.search_ms())

        threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return max(times)


class Client:
    """The tenant through a running fleet and ``memq.client.api``: what a caller waits for."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.asked = 0
        self.full_reload = False
        self.errors: list[str] = []

    def retrieve(self) -> tuple[float, float]:
        """One retrieval of a query not asked before: (client ms, the search step's ms)."""
        from memq.client import api

        self.asked += 1
        queries = self.tenant.queries
        query = f"{queries[self.asked % len(queries)]} ({self.asked})"
        started = time.perf_counter()
        result = api.retrieve(query, self.tenant.name, CLIENT_LIMITS, timeout_s=CLIENT_TIMEOUT_S, strategy="exact")
        client_ms = (time.perf_counter() - started) * 1000
        if result.get("errors"):  # kept in the report: a retrieval that failed has no search time
            self.errors.append(json.dumps(result["errors"], default=str)[:300])
            return client_ms, float("nan")
        return client_ms, float(result["timings_ms"]["search_ms"][LTM])

    def write(self, count: int) -> None:
        """``count`` memories through ``api.remember`` (half new, half re-sent), then, for a full reload, the
        change log dropped."""
        from memq.client import api
        from memq.client.cache_redis import cache_redis
        from memq.core import keys

        rng = self.tenant.rng
        items = [
            {"id": f"m{int(rng.integers(self.tenant.size))}" if n % 2 else f"client{self.asked}-{n}", "content": text}
            for n, text in enumerate(self.tenant.queries[self.asked % 1000 : self.asked % 1000 + count])
        ]
        api.remember(self.tenant.name, "semantic", items)
        if self.full_reload:
            cache_redis.get().delete(keys.change_log(self.tenant.name, LTM))

    def concurrent(self) -> tuple[float, float]:
        """The slowest of ``CONCURRENT`` retrievals started together: (client ms, its search step's ms)."""
        results: list[tuple[float, float]] = []
        barrier = threading.Barrier(CONCURRENT)

        def one() -> None:
            barrier.wait()
            results.append(self.retrieve())

        threads = [threading.Thread(target=one) for _ in range(CONCURRENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return max(results)


def measure_client(tenant: Tenant, repeats: int) -> dict[str, Any]:
    """Client and search-step times through the fleet, incremental and full reload, medians."""
    fleet_client = Client(tenant)
    row: dict[str, Any] = {"client_cold_ms": fleet_client.retrieve()[0]}
    warm = [fleet_client.retrieve() for _ in range(max(10, repeats * 2))]
    row["client_warm_ms"] = statistics.median(client_ms for client_ms, _ in warm)
    row["client_warm_search_ms"] = statistics.median(search_ms for _, search_ms in warm)
    reload_repeats = 1 if tenant.size >= 50_000 else max(1, repeats // 2)
    for label, full_reload, times in (("incremental", False, repeats), ("full_reload", True, reload_repeats)):
        fleet_client.full_reload = full_reload
        for name, count, measure in (
            ("after_1", 1, fleet_client.retrieve),
            ("after_100", 100, fleet_client.retrieve),
            ("concurrent", 1, fleet_client.concurrent),
        ):
            measured = []
            for _ in range(times):
                fleet_client.write(count)
                measured.append(measure())
            row[f"client_{name}_{label}_ms"] = statistics.median(client_ms for client_ms, _ in measured)
            row[f"client_{name}_{label}_search_ms"] = statistics.median(search_ms for _, search_ms in measured)
    row["client_errors"] = fleet_client.errors
    return row


def start_fleet(env: dict[str, str]) -> Any:
    """An embed, a search and an ingest worker on the bench's Redis and MongoDB, answering pings."""
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    fleet = services.Fleet({**env, "MEMQ_SEARCH_STRATEGY": "exact"})
    hosts = [fleet.start(kind, name=f"write-read-{kind}") for kind in services.WORKER_KINDS]
    app = Celery("memq-write-read-bench", set_as_current=False)
    app.config_from_object(celery_config(Settings(broker_url=env["MEMQ_BROKER_URL"])))
    try:
        fleet.wait_ready(app, hosts, timeout_s=240)
    finally:
        app.close()
    return fleet


def warm_without_and_with_fp16(tenant: Tenant, repeats: int) -> tuple[float, float]:
    """Warm searches estimating in float32, then with the fp16 copy (where the tenant is past
    ``HALF_SCORING_MIN_ROWS``), in alternating blocks of ``BLOCK_SEARCHES`` (a switch costs the first search of a
    block its caches), medians of all but each block's first."""
    from memq.core.process_local import ProcessLocal
    from memq.workers.search import strategies

    with_fp16 = strategies.half_precision_torch
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(max(1, repeats // BLOCK_SEARCHES)):
        for fp16 in (False, True):
            strategies.half_precision_torch = with_fp16 if fp16 else ProcessLocal(lambda: False)
            times[fp16] += [tenant.search_ms() for _ in range(BLOCK_SEARCHES + 1)][1:]
    strategies.half_precision_torch = with_fp16
    return statistics.median(times[False]), statistics.median(times[True])


def full_reloads(enabled: bool) -> None:
    """Disable (or restore) the catch-up: with it off, every search after a write reloads the tenant."""
    from memq.workers.search import strategies

    strategies.CATCH_UP_MIN_IDS, strategies.CATCH_UP_MAX_FRACTION = (-1, -1.0) if enabled else (256, 0.25)


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def after_write(tenant: Tenant, count: int, repeats: int, measure: Callable[[], float]) -> tuple[float, float]:
    """The median of ``measure()`` right after a write of ``count`` memories, and the median ratio of each to a
    warm search measured just before its write (the pair shares the machine's load of the moment)."""
    after, ratios = [], []
    for _ in range(repeats):
        warm_ms = tenant.search_ms()
        tenant.write(count)
        after.append(measure())
        ratios.append(after[-1] / warm_ms)
    return statistics.median(after), statistics.median(ratios)


def measure_size(size: int, dimensions: int, repeats: int, client: bool) -> dict[str, Any]:
    from memq.core.process_local import ProcessLocal
    from memq.workers.search import strategies

    strategies.matrix_cache = ProcessLocal(strategies.MatrixCache)  # a fresh process
    tenant = Tenant(f"write-read-{size}", size, dimensions)
    row: dict[str, Any] = {"memories": size, "write_s": write_tenant(tenant.name, size, dimensions)}
    row["cold_ms"] = tenant.search_ms()
    row["warm_ms"] = median_of(max(20, repeats * 4), tenant.search_ms)
    tenant.concurrent_ms()  # warm-up: the threads' first Redis and MongoDB connections
    reload_repeats = max(1, repeats // 2) if size >= 50_000 else repeats
    for label, enabled, times in (("incremental", False, repeats), ("full_reload", True, reload_repeats)):
        full_reloads(enabled)
        tenant.search_ms()  # at the current version either way
        for name, count, measure, rounds in (
            ("after_1", 1, tenant.search_ms, times),
            ("after_100", 100, tenant.search_ms, times),
            ("concurrent", 1, tenant.concurrent_ms, max(1, times // 2)),
        ):
            row[f"{name}_{label}_ms"], row[f"{name}_{label}_to_warm"] = after_write(tenant, count, rounds, measure)
    full_reloads(False)
    row["warm_after_ms"] = median_of(max(20, repeats * 4), tenant.search_ms)
    row["warm_float32_ms"], row["warm_fp16_first_ms"] = warm_without_and_with_fp16(tenant, max(20, repeats * 4))
    entry = strategies.matrix_cache.get().held((tenant.name, LTM))
    row["bytes"] = strategies.entry_nbytes(entry) if entry is not None else None
    strategies.matrix_cache = ProcessLocal(
        strategies.MatrixCache
    )  # this process's copy freed before the fleet's is loaded
    gc.collect()
    if client:
        row.update(measure_client(tenant, repeats))
    print_row(row)
    return row


HEADER = (
    f"{'memories':>9} {'write s':>8} {'':>6} {'cold':>8} {'warm':>6} │ {'after 1':>17} {'after 100':>17} "
    f"{'8 concurrent':>17} │ {'1 / warm':>8}"
)


def print_row(row: dict[str, Any]) -> None:
    def pair(prefix: str, name: str, suffix: str = "ms") -> str:
        incremental, full = row[f"{prefix}{name}_incremental_{suffix}"], row[f"{prefix}{name}_full_reload_{suffix}"]
        return f"{incremental:>7.1f} / {full:<7.0f}"

    print(
        f"{row['memories']:>9,} {row['write_s']:>8.1f} {'step':>6} {row['cold_ms']:>8.0f} {row['warm_ms']:>6.1f} │ "
        f"{pair('', 'after_1')} {pair('', 'after_100'):>17} {pair('', 'concurrent'):>17} │ "
        f"{row['after_1_incremental_to_warm']:>7.2f}x │ warm float32 {row['warm_float32_ms']:.1f}, "
        f"fp16 first {row['warm_fp16_first_ms']:.1f}",
        flush=True,
    )
    if "client_warm_ms" not in row:
        return
    for label, suffix, cold, warm in (
        ("client", "ms", row["client_cold_ms"], row["client_warm_ms"]),
        ("(step)", "search_ms", float("nan"), row["client_warm_search_ms"]),
    ):
        print(
            f"{'':>9} {'':>8} {label:>6} {cold:>8.0f} {warm:>6.1f} │ {pair('client_', 'after_1', suffix)} "
            f"{pair('client_', 'after_100', suffix):>17} {pair('client_', 'concurrent', suffix):>17} │",
            flush=True,
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    sizes = [row["memories"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [
        ("warm_ms", "warm", "-"),
        ("after_1_incremental_ms", "after a write of 1, incremental", "-"),
        ("after_100_incremental_ms", "after a write of 100, incremental", "-"),
        ("after_1_full_reload_ms", "after a write of 1, full reload", "--"),
        ("concurrent_incremental_ms", "8 concurrent after a write, incremental (slowest)", ":"),
        ("client_warm_ms", "client: warm retrieval", "-."),
        ("client_after_1_incremental_ms", "client: retrieval after a remember of 1, incremental", "-."),
        ("client_after_1_full_reload_ms", "client: retrieval after a remember of 1, full reload", "-."),
    ]
    for key, label, style in series:
        if all(key in row for row in rows):
            ax.plot(sizes, [row[key] for row in rows], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memories of the type")
    ax.set_ylabel("ms, median (hybrid, k = 30)")
    ax.set_title("memq: the search after a write (nx-27017; search step in process, client through a fleet)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(str(size) for size in SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS / "write_read.json")
    parser.add_argument("--no-client", action="store_true", help="the in-process search step only, no fleet")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    sizes = [int(size) for size in args.sizes.split(",")]

    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    # nx-27017 slows as the collection grows: at 200,000 memories one 250-document batch of a tenant load passed
    # the default 6 s socket timeout under load, so the bench gives MongoDB reads more time (its own and the fleet's).
    mongodb_uri = services.mongodb_timeouts(mongo_service.url, 15_000)
    env = services.memq_env(os.environ, redis_service.url, mongodb_uri, MEMQ_MONGODB_DB="memq_write_read_bench")
    os.environ.update(env)
    from memq.workers.storage import mongo

    config = {"sizes": sizes, "repeats": repeats, "k": K, "mode": "hybrid", "client": not args.no_client}
    report: dict[str, Any] = {"config": config, "rows": []}
    with services.running(redis_service, mongo_service):
        mongo.collection(LTM).drop()
        mongo.collection(LTM).create_index([("memory_id", 1)])  # nx-27017 plans equality through this index
        fleet = None if args.no_client else start_fleet(env)
        try:
            print(HEADER)
            print("(ms, median; incremental / full reload; step: the search step in process; client: memq.client.api")
            print(" through the fleet, and (step) that retrieval's timings_ms.search_ms)")
            for size in sizes:
                report["rows"].append(measure_size(size, DIMENSIONS, repeats, fleet is not None))
                save(report, args.out)  # each size as it is done: a later size that fails leaves the earlier ones
        finally:
            if fleet is not None:
                fleet.stop_all()
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def save(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "machine": machine()}, indent=2))
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    raise SystemExit(main())
