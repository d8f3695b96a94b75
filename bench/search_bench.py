"""One type's warm search inside a search worker, per mode, side by side: what a search costs once the tenant's
matrix and BM25 index are cached (no MongoDB, no broker). Prints a table, writes ``bench/results/search.json``
and ``search.png``.

    python -m bench.search_bench            # 1,000 and 10,000 memories, 300 queries per mode
    python -m bench.search_bench --quick    # 60 queries per mode

The tenant's memories are the generated corpus of ``bench.corpus`` with random unit vectors (the vectors' values do
not change the cost); queries are held-out generated queries. It also reports the BM25 index's memory beside the
float32 cosine matrix's, and how long building both takes (a cold load's CPU share, after the ``find``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np

from bench import corpus
from bench.pipeline_bench import RESULTS, summary
from memq.settings import get_settings
from memq.workers.lexical import LexicalIndex
from memq.workers.search import TenantMatrix, Wanted, top_k

SIZES = (1_000, 10_000)
MODES = ("vector", "lexical", "hybrid")
K = 30  # a limit of 10 with the default oversample of 3


def tenant(size: int, dimensions: int, seed: int = 7) -> tuple[TenantMatrix, float]:
    """A cached entry as ``workers.search.build_matrix`` makes it, and the seconds building it took."""
    rng = np.random.default_rng(seed)
    rows = corpus.memories("long_term_memory", size, seed)
    items: list[dict[str, Any]] = [
        {"id": f"m{i}", "content": str(row["content"]), "created_at_ts": 1.7e9 + i, "importance": 0.5}
        for i, row in enumerate(rows)
    ]
    started = time.perf_counter()
    matrix = rng.standard_normal((size, dimensions)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    lexical = LexicalIndex([item["content"] for item in items])
    built_s = time.perf_counter() - started
    created = np.array([item["created_at_ts"] for item in items])
    entry = TenantMatrix(1, items, matrix, lexical, created, [None] * size, [frozenset()] * size)
    return entry, built_s


def measure(entry: TenantMatrix, queries: list[str], vectors: np.ndarray, mode: str) -> dict[str, float]:
    times_ms = []
    for query, vector in zip(queries, vectors, strict=True):
        started = time.perf_counter()
        top_k(entry, vector, K, Wanted(query=query, mode=mode))
        times_ms.append((time.perf_counter() - started) * 1000)
    return summary(times_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    dimensions = get_settings().embed_dimensions
    count = 60 if args.quick else 300
    queries = corpus.queries(count, seed=11)
    vectors = np.random.default_rng(3).standard_normal((count, dimensions)).astype(np.float32)
    report: dict[str, Any] = {"machine": f"{platform.machine()} {platform.processor()} cpus={_cpus()}", "k": K}
    print(f"{'memories':>9} {'mode':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for size in SIZES:
        entry, built_s = tenant(size, dimensions)
        for mode in MODES:
            top_k(entry, vectors[0], K, Wanted(query=queries[0], mode=mode))  # warm-up
            row = measure(entry, queries, vectors, mode)
            report[f"{size}:{mode}"] = row
            print(f"{size:>9} {mode:>8} {row['p50_ms']:>8.3f} {row['p95_ms']:>8.3f}")
        lexical_bytes = entry.lexical.nbytes() if entry.lexical else 0
        report[f"{size}:memory"] = {
            "matrix_bytes": entry.matrix.nbytes,
            "lexical_bytes": lexical_bytes,
            "lexical_to_matrix": lexical_bytes / entry.matrix.nbytes,
            "build_s": built_s,
        }
        print(f"{size:>9} BM25 index {lexical_bytes / 1e6:.2f} MB vs matrix {entry.matrix.nbytes / 1e6:.2f} MB")
        hybrid, vector = report[f"{size}:hybrid"]["p50_ms"], report[f"{size}:vector"]["p50_ms"]
        print(f"{size:>9} hybrid / vector p50: {hybrid / vector:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(report, indent=2))
    plot(report)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def plot(report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, mode in enumerate(MODES):
        values = [report[f"{size}:{mode}"]["p50_ms"] for size in SIZES]
        ax.bar(np.arange(len(SIZES)) + i * width, values, width, label=mode)
    ax.set_xticks(np.arange(len(SIZES)) + width, [f"{size:,} memories" for size in SIZES])
    ax.set_ylabel("warm search of one type, p50 (ms)")
    ax.set_title("memq search worker, one type, k = 30")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "search.png", dpi=120)


if __name__ == "__main__":
    main()
