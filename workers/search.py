"""Search strategies for one (tenant, memory type).

- ``exact``: cosine over the tenant's vectors in this worker. The (memory_id, type) → float32 matrix is
  cached per process and keyed on the tenant's data version (``workers.versions``), so a write makes
  the cached matrix unreachable at once; a warm search is one matrix-vector product.
- ``vector_search``: Atlas ``$vectorSearch`` with ``memory_id`` as a pre-filter.
- ``auto``: ``vector_search`` where the server runs the stage, ``exact`` elsewhere (nx-27017, mongod).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from config import get_settings
from memq.vectors import from_stored, normalise
from workers import store, versions
from workers.metrics import CACHE_REQUESTS, SEARCH_SECONDS
from workers.process_local import ProcessLocal

PROBE_TTL_S = 60.0


@dataclass
class TenantMatrix:
    version: int
    items: list[dict[str, Any]]
    matrix: np.ndarray  # (n, d) float32, rows L2-normalised


@dataclass
class SearchOutcome:
    items: list[dict[str, Any]]
    strategy: str
    matrix_cache: str  # "hit" | "miss" | "bypass" | "n/a"


class MatrixCache:
    """LRU of tenant matrices, bounded by the total number of vectors held."""

    def __init__(self, max_vectors: int) -> None:
        self.max_vectors = max_vectors
        self._entries: OrderedDict[tuple[str, str], TenantMatrix] = OrderedDict()
        self._vectors = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], version: int) -> TenantMatrix | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version:
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, str], entry: TenantMatrix) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._vectors -= len(old.items)
            if len(entry.items) > self.max_vectors:
                return
            self._entries[key] = entry
            self._vectors += len(entry.items)
            while self._vectors > self.max_vectors:
                _, evicted = self._entries.popitem(last=False)
                self._vectors -= len(evicted.items)

    def __len__(self) -> int:
        return len(self._entries)


matrix_cache: ProcessLocal[MatrixCache] = ProcessLocal(lambda: MatrixCache(get_settings().exact_cache_max_vectors))
_probe_results: dict[str, tuple[bool, float]] = {}


def build_matrix(docs: list[dict[str, Any]], version: int) -> TenantMatrix:
    items = [store.to_item(doc, 0.0) for doc in docs]
    if not docs:
        return TenantMatrix(version, items, np.zeros((0, 0), dtype=np.float32))
    matrix = normalise(np.stack([from_stored(doc[store.EMBEDDING_FIELD]) for doc in docs]))
    return TenantMatrix(version, items, matrix)


def top_k(entry: TenantMatrix, query: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Exact cosine top-k; ties broken by id so results are deterministic."""
    if not entry.items or k <= 0:
        return []
    scores = entry.matrix @ normalise(query.astype(np.float32))
    k = min(k, len(scores))
    picked = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = sorted(picked.tolist(), key=lambda i: (-float(scores[i]), str(entry.items[i]["id"])))
    return [{**entry.items[i], "score": float(scores[i])} for i in order]


def exact_search(memory_id: str, memory_type: str, query: np.ndarray, k: int) -> SearchOutcome:
    known = versions.read_versions(memory_id, [memory_type])
    key = (memory_id, memory_type)
    cache = matrix_cache.get()
    if known is None:  # Redis down: never trust a cached matrix
        entry = build_matrix(store.load_tenant(memory_id, memory_type), -1)
        outcome = "bypass"
    else:
        version = known[memory_type]
        entry = cache.get(key, version)
        outcome = "hit"
        if entry is None:
            entry = build_matrix(store.load_tenant(memory_id, memory_type), version)
            cache.put(key, entry)
            outcome = "miss"
    CACHE_REQUESTS.labels(cache="matrix", outcome=outcome).inc()
    return SearchOutcome(top_k(entry, query, k), "exact", outcome)


def resolve_strategy(requested: str, memory_type: str, dimensions: int) -> str:
    if requested != "auto":
        return requested
    settings = get_settings()
    cached = _probe_results.get(memory_type)
    now = time.monotonic()
    if cached is None or now - cached[1] > PROBE_TTL_S:
        supported = store.probe_vector_search(memory_type, settings.vector_index, dimensions)
        _probe_results[memory_type] = (supported, now)
        cached = _probe_results[memory_type]
    return "vector_search" if cached[0] else "exact"


def search(memory_id: str, memory_type: str, query: np.ndarray, k: int, strategy: str) -> SearchOutcome:
    settings = get_settings()
    chosen = resolve_strategy(strategy, memory_type, int(query.shape[0]))
    started = time.perf_counter()
    if chosen == "vector_search":
        items = store.vector_search(
            memory_id, memory_type, query, k, k * settings.num_candidates_factor, settings.vector_index
        )
        outcome = SearchOutcome(items, "vector_search", "n/a")
    else:
        outcome = exact_search(memory_id, memory_type, query, k)
    SEARCH_SECONDS.labels(memory_type=memory_type, strategy=outcome.strategy).observe(time.perf_counter() - started)
    return outcome
