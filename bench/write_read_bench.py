"""Write, then read: what a write costs the next search of its tenant, at 1,000 to 200,000 memories of one type,
with the incremental path (the change log applied: ``workers.search.catch_up``) and a forced full reload side by
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
- ``cold``: the first load of the tenant in a fresh process.

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
from memq import services

LTM = "long_term_memory"
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
K = 30
SIZES = (1_000, 10_000, 50_000)
WRITE_BATCH = 1_000  # upserts per bulk write: each well within the MongoDB client's socket timeout
CONCURRENT = 8


def unit_vectors(rng: np.random.Generator, count: int, dimensions: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_tenant(tenant: str, size: int, dimensions: int) -> float:
    """The tenant's memories written straight through the write functions; the seconds it took."""
    from memq import keys
    from memq.errors import StoreUnavailable
    from memq.settings import get_settings
    from memq.workers import versions, writes

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
        from memq.settings import get_settings
        from memq.vectors import to_wire
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
        from memq.workers import search

        query = self.queries[int(self.rng.integers(len(self.queries)))]
        vector = unit_vectors(self.rng, 1, self.dimensions)[0]
        started = time.perf_counter()
        search.exact_search(self.name, LTM, vector, K, search.Wanted(query=query, mode="hybrid"))
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


def full_reloads(enabled: bool) -> None:
    """Disable (or restore) the catch-up: with it off, every search after a write reloads the tenant."""
    from memq.workers import search

    search.CATCH_UP_MIN_IDS, search.CATCH_UP_MAX_FRACTION = (-1, -1.0) if enabled else (256, 0.25)


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


def measure_size(size: int, dimensions: int, repeats: int) -> dict[str, Any]:
    from memq.process_local import ProcessLocal
    from memq.workers import search

    search.matrix_cache = ProcessLocal(search.MatrixCache)  # a fresh process
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
    entry = search.matrix_cache.get().held((tenant.name, LTM))
    row["bytes"] = search.entry_nbytes(entry) if entry is not None else None
    print_row(row)
    gc.collect()
    return row


HEADER = (
    f"{'memories':>9} {'write s':>8} {'cold':>8} {'warm':>6} │ {'after 1':>15} {'after 100':>17} "
    f"{'8 concurrent':>17} │ {'1 / warm':>8}"
)


def print_row(row: dict[str, Any]) -> None:
    def pair(name: str) -> str:
        return f"{row[f'{name}_incremental_ms']:>7.1f} / {row[f'{name}_full_reload_ms']:<7.0f}"

    print(
        f"{row['memories']:>9,} {row['write_s']:>8.1f} {row['cold_ms']:>8.0f} {row['warm_ms']:>6.1f} │ "
        f"{pair('after_1')} {pair('after_100'):>17} {pair('concurrent'):>17} │ "
        f"{row['after_1_incremental_to_warm']:>7.2f}x",
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
    ]
    for key, label, style in series:
        ax.plot(sizes, [row[key] for row in rows], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memories of the type")
    ax.set_ylabel("search step, hybrid, k = 30 (ms, median)")
    ax.set_title("memq: the search after a write (nx-27017, in-process search step)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(str(size) for size in SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS / "write_read.json")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    sizes = [int(size) for size in args.sizes.split(",")]

    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    env = services.memq_env(os.environ, redis_service.url, mongo_service.url, MEMQ_MONGODB_DB="memq_write_read_bench")
    os.environ.update(env)
    from memq.workers import mongo

    report: dict[str, Any] = {"config": {"sizes": sizes, "repeats": repeats, "k": K, "mode": "hybrid"}, "rows": []}
    with services.running(redis_service, mongo_service):
        mongo.collection(LTM).drop()
        mongo.collection(LTM).create_index([("memory_id", 1)])  # nx-27017 plans equality through this index
        print(HEADER)
        print("(ms, median; incremental / full reload)")
        for size in sizes:
            report["rows"].append(measure_size(size, DIMENSIONS, repeats))
    report["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
