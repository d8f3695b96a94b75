"""One type's warm search inside a search worker, per mode, side by side: what a search costs once the tenant's
matrix and BM25 index are cached (no MongoDB, no broker). Prints a table, writes ``bench/results/search.json``
and ``search.png``.

    python -m bench.search_bench            # 1,000 and 10,000 memories, 300 queries per mode
    python -m bench.search_bench --quick    # 60 queries per mode
    python -m bench.search_bench --few-matches   # lexical top-k, few vs many matches at 50,000 memories

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
from memq.workers.search.lexical import LexicalIndex
from memq.workers.search.strategies import TenantMatrix, Wanted, top_k

SIZES = (1_000, 10_000)
DIMENSIONS = 384  # all-MiniLM-L6-v2's: the random vectors stand in for its embeddings
MODES = ("vector", "lexical", "hybrid")
K = 30  # a limit of 10 with the default oversample of 3


def tenant(size: int, dimensions: int, seed: int = 7) -> tuple[TenantMatrix, float]:
    """A cached entry as ``workers.search.strategies.build_matrix`` makes it, and the seconds building it took."""
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


FEW_MATCHES_SIZE = 50_000
RARE_WORD = "zephyrine"  # in 5 memories: a lexical query for it matches fewer than K


def full_sort_top_k(entry: TenantMatrix, query: np.ndarray, k: int, wanted: Wanted) -> list[int]:
    """The selection ``top_k`` made before partial selection: every row tied with the k-th best fused score sorted
    in Python (with few matches, every zero-score row). Kept here as the baseline."""
    from memq.core import ranking
    from memq.core.vectors import normalise

    vector = entry.matrix @ normalise(query.astype(np.float32))
    lexical = entry.lexical.scores(wanted.query or "") if entry.lexical else np.zeros(len(entry.items))
    fused = ranking.fuse(vector, lexical, wanted.mode)
    kth_best = np.partition(-fused, k - 1)[k - 1]
    picked = np.flatnonzero(-fused <= kth_best)
    key = lambda i: (-float(fused[i]), -float(vector[i]), str(entry.items[i]["id"]))  # noqa: E731
    return sorted(picked.tolist(), key=key)[:k]


def few_matches(count: int, dimensions: int) -> dict[str, Any]:
    """Lexical top-k at 50,000 memories: a query matching 5 memories vs queries matching many, partial selection
    (``top_k``) beside the full sort it replaced."""
    entry, _ = tenant(FEW_MATCHES_SIZE, dimensions)
    for i in range(0, 5 * 9973, 9973):
        entry.items[i]["content"] += f" {RARE_WORD}"
    entry.lexical = LexicalIndex([item["content"] for item in entry.items])
    vectors = np.random.default_rng(3).standard_normal((count, dimensions)).astype(np.float32)
    many = corpus.queries(count, seed=11)
    cases = {"few (5 matches)": [RARE_WORD] * count, "many (corpus queries)": many}
    report: dict[str, Any] = {"machine": _machine(), "k": K, "memories": FEW_MATCHES_SIZE, "queries": count}
    print(f"{'lexical query':>22} {'matches':>8} {'top_k p50':>10} {'p95':>8} {'full sort p50':>14} {'p95':>8}")
    for name, queries in cases.items():
        matches = float(np.median([np.count_nonzero(entry.lexical.scores(q)) for q in queries[:20]]))
        row: dict[str, Any] = {"median_matches": matches}
        for label, select in (("top_k", top_k), ("full_sort", full_sort_top_k)):
            select(entry, vectors[0], K, Wanted(query=queries[0], mode="lexical"))  # warm-up
            times_ms = []
            for query, vector in zip(queries, vectors, strict=True):
                started = time.perf_counter()
                select(entry, vector, K, Wanted(query=query, mode="lexical"))
                times_ms.append((time.perf_counter() - started) * 1000)
            row[label] = summary(times_ms)
        report[name] = row
        top, full = row["top_k"], row["full_sort"]
        print(
            f"{name:>22} {matches:>8.0f} {top['p50_ms']:>10.2f} {top['p95_ms']:>8.2f} "
            f"{full['p50_ms']:>14.2f} {full['p95_ms']:>8.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_few_matches.json").write_text(json.dumps(report, indent=2))
    return report


def _machine() -> str:
    return f"{platform.machine()} {platform.processor()} cpus={_cpus()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--few-matches", action="store_true", help="lexical top-k with few vs many matches only")
    args = parser.parse_args()
    if args.few_matches:
        few_matches(60 if args.quick else 200, DIMENSIONS)
        return
    dimensions = DIMENSIONS
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
