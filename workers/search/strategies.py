"""Search strategies for one (tenant, memory type).

- ``exact``: in this worker, over the tenant's rows (``RowStore``: cosine matrix, BM25 index, filter columns) loaded
  once per process and data version, then kept in step with writes by applying the change log (``catch_up``).
- ``vector_search``: Atlas ``$vectorSearch`` with ``memory_id`` as a pre-filter.
- ``auto``: ``vector_search`` where the server runs the stage, ``exact`` elsewhere (nx-27017, mongod).

How and why: docs/architecture.md, "Inside a search worker".
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memq.core import deadlines, ranking
from memq.core.process_local import ProcessLocal
from memq.core.settings import get_settings
from memq.core.vectors import from_stored, normalise
from memq.errors import IndexNotReady, InvalidInput, StoreUnavailable, WorkerBusy
from memq.workers.plumbing.metrics import BAD_STORED_ROWS, CACHE_REQUESTS, MATRIX_LOADS, SEARCH_SECONDS
from memq.workers.search import index_readiness
from memq.workers.search.lexical import LexicalIndex, LexicalWriter
from memq.workers.search.rss_budget import MemoryGuard, release_free_memory, resident_bytes
from memq.workers.search.single_flight import FlightTimeout, SingleFlight
from memq.workers.storage import mongo, reads, versions

log = logging.getLogger(__name__)

PROBE_TTL_S = 60.0
# One cached result item besides its strings: the dict, its floats and ISO dates (measured with tracemalloc on items
# from reads.to_item, CPython 3.11: about 450 bytes with no tags or metadata).
ITEM_OVERHEAD_BYTES = 480
MIN_CAPACITY_ROWS = 1024  # rows a RowStore holds at least, and grows by at least
GROWTH_FRACTION = 0.5  # a full RowStore grows by this fraction of its capacity (a copy into a new buffer)
LOAD_CHUNK_ROWS = 1000  # documents taken from the cursor at a time by a load
CATCH_UP_MAX_FRACTION = 0.25  # more changed ids than this fraction of the tenant (and CATCH_UP_MIN_IDS): reload
CATCH_UP_MIN_IDS = 256  # changed ids a catch-up always takes, however small the tenant
COMPACT_DEAD_FRACTION = 0.5  # tombstoned rows past this fraction of the rows (and MIN_CAPACITY_ROWS): reload
ROW_COLUMNS = ("vectors", "created_ts", "roles", "tags", "alive", "half")  # a RowStore's buffers, one entry per row
LOADS_IN_FLIGHT = 2  # tenant loads a process builds at once (a small one beside a large one); a catch-up takes no slot
HALF_SCORING_MIN_ROWS = 65_536  # from here a tenant's rows are kept in fp16 too, for a first pass over half the bytes
EXACT_CHUNK_ROWS = 8192
HALF_SCORE_ERROR = 4e-3  # |fp16 - float32 cosine| of unit rows at most: inputs and result rounded, sums in fp32


@dataclass
class TenantMatrix:
    """What an exact search of one (tenant, type) at one data version needs: row i of ``matrix``, ``items``,
    ``created_ts``, ``roles``, ``tags`` and the BM25 index is one stored memory. A snapshot of a ``RowStore``
    (``store``) shares its ``items`` list, which may hold later rows; ``alive``: its rows still current (None: all)."""

    version: int
    items: list[dict[str, Any]]
    matrix: np.ndarray  # (n, d) float32, rows L2-normalised
    lexical: LexicalIndex | None = None  # BM25 over the items' content
    created_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Unix seconds, NaN where unknown
    roles: Sequence[str | None] = field(default_factory=list)
    tags: Sequence[frozenset[str]] = field(default_factory=list)
    alive: np.ndarray | None = None
    store: RowStore | None = None
    half: np.ndarray | None = None  # ``matrix`` in fp16, from ``HALF_SCORING_MIN_ROWS`` rows (``half_scores``)

    @property
    def rows(self) -> int:
        return int(self.matrix.shape[0]) if self.matrix.ndim == 2 else 0

    @property
    def alive_rows(self) -> int:
        return self.rows if self.alive is None else int(np.count_nonzero(self.alive))

    @property
    def dimensions(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix.ndim == 2 else 0


class RowStore:
    """The rows of one (tenant, type), append-only: an update appends a new row and tombstones the old one. A row is
    never modified and a full buffer is replaced by a larger copy, so every snapshot stays valid. One writer
    (``lock``)."""

    def __init__(self, dimensions: int, capacity_rows: int) -> None:
        capacity_rows = max(capacity_rows, MIN_CAPACITY_ROWS)
        self.dimensions = dimensions
        self.vectors = np.empty((capacity_rows, dimensions), dtype=np.float32)
        self.created_ts = np.empty(capacity_rows, dtype=np.float64)
        self.roles = np.empty(capacity_rows, dtype=object)
        self.tags = np.empty(capacity_rows, dtype=object)
        self.alive = np.zeros(capacity_rows, dtype=bool)
        self.half: np.ndarray | None = None
        self.items: list[dict[str, Any]] = []
        self.row_of: dict[Any, int] = {}  # stored _id -> its alive row
        self.rows = 0
        self.item_bytes = 0
        self.lexical = LexicalWriter()
        self.lock = threading.Lock()
        self.latest: TenantMatrix | None = None
        self.broken = False  # a change failed half-applied: the next one reloads the tenant

    @property
    def dead_rows(self) -> int:
        return self.rows - len(self.row_of)

    def append(self, docs: Sequence[dict[str, Any]]) -> list[Any]:
        """Each searchable document as a new row (replacing the row of the same ``_id``); the ``_id`` s of those
        that cannot be searched (``usable_row``, or a vector not finite)."""
        usable, skipped = [], []
        for doc in docs:
            row = usable_row(doc, self.dimensions)
            if row is None:
                skipped.append(doc.get("_id"))
            else:
                usable.append((doc, row[0], row[1]))
        if not usable:
            return skipped
        block = np.array([vector for _, vector, _ in usable], dtype=np.float32)  # a chunk (LOAD_CHUNK_ROWS at most)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            skipped += [usable[i][0].get("_id") for i in np.flatnonzero(~finite)]
            usable, block = [usable[i] for i in np.flatnonzero(finite)], block[finite]
        start, end = self.rows, self.rows + len(usable)
        self._reserve(end)
        self.vectors[start:end] = normalise(block)
        if self.half is None and end >= HALF_SCORING_MIN_ROWS and half_precision_torch.get():
            self.half = np.zeros(self.vectors.shape, dtype=np.float16)
            self.half[:start] = self.vectors[:start]
        if self.half is not None:
            self.half[start:end] = self.vectors[start:end]
        for row, (doc, _, item) in enumerate(usable, start):
            self.remove(doc["_id"])
            self.created_ts[row] = np.nan if item["created_at_ts"] is None else item["created_at_ts"]
            self.roles[row] = item.get("role")
            self.tags[row] = frozenset(item.get("tags") or ())
            self.items.append(item)
            self.item_bytes += item_nbytes(item)
            self.row_of[doc["_id"]] = row
        self.alive[start:end] = True
        self.lexical.add(start, [lexical_text(doc) for doc, _, _ in usable])
        self.rows = end
        return skipped

    def remove(self, object_id: Any) -> None:
        """Tombstone the row of ``object_id`` (if it has one)."""
        row = self.row_of.pop(object_id, None)
        if row is not None:
            self.alive[row] = False
            self.lexical.remove(row)

    def snapshot(self, version: int) -> TenantMatrix:
        """The rows as they are now, for searches at ``version`` (becomes ``latest``)."""
        rows = self.rows
        self.lexical.commit(self.alive[:rows])
        alive = None if self.dead_rows == 0 else self.alive[:rows].copy()  # tombstones come later: the rest never moves
        columns = (self.vectors[:rows], self.lexical.view(rows, alive), self.created_ts[:rows], self.roles[:rows])
        half = None if self.half is None else self.half[:rows]
        self.latest = TenantMatrix(version, self.items, *columns, self.tags[:rows], alive, self, half)
        return self.latest

    def nbytes(self) -> int:
        """What the rows hold besides the BM25 index: the buffers (their whole capacity) and the items."""
        columns = (getattr(self, name) for name in ROW_COLUMNS)
        return sum(column.nbytes for column in columns if column is not None) + self.item_bytes

    def _reserve(self, rows: int) -> None:
        capacity = self.vectors.shape[0]
        if rows <= capacity:
            return
        grown = max(rows, capacity + max(MIN_CAPACITY_ROWS, int(capacity * GROWTH_FRACTION)))
        for name in ROW_COLUMNS:
            old = getattr(self, name)
            if old is None:
                continue
            new = np.zeros((grown, *old.shape[1:]), dtype=old.dtype)
            new[: self.rows] = old[: self.rows]
            setattr(self, name, new)


def lexical_text(doc: dict[str, Any]) -> str:
    """What BM25 indexes of a stored memory: its content and the context its writer supplied."""
    return f"{doc.get('content', '')} {doc.get(reads.CONTEXT_FIELD) or ''}"


@dataclass(frozen=True)
class Wanted:
    """What a search is asked for beyond the vector: the query text, the mode and the filters."""

    query: str | None = None
    mode: str = "vector"
    filters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchOutcome:
    items: list[dict[str, Any]]
    strategy: str
    matrix_cache: str  # "hit" | "miss" | "bypass" | "n/a"


class MatrixCache:
    """LRU of tenant matrices with the bytes each holds (``entry_nbytes``), unbounded: the memory guard sheds the
    least recently used (``shed``) before a load or merge that finds the process over its budget."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str], TenantMatrix] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self.vectors = 0
        self.nbytes = 0
        self._lock = threading.Lock()
        self.loads = 0  # matrices loaded from MongoDB and built by this process (single-flight: one per version)
        self.catch_ups = 0  # versions reached by applying the change log instead of a load

    def get(self, key: tuple[str, str], version: int, dimensions: int = 0) -> TenantMatrix | None:
        """The entry of ``key`` at ``version`` (and of ``dimensions``, the query's, unless 0), else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version or dimensions not in (0, entry.dimensions):
                return None
            self._entries.move_to_end(key)
            return entry

    def held(self, key: tuple[str, str]) -> TenantMatrix | None:
        """The entry of ``key`` at whatever version it holds (what a catch-up starts from)."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: tuple[str, str], entry: TenantMatrix, *, loaded: bool = False, caught_up: bool = False) -> None:
        """Cache ``entry`` (counted in ``loads`` / ``catch_ups`` when ``loaded`` / ``caught_up``)."""
        size = entry_nbytes(entry)
        with self._lock:
            self._drop(key)
            self._entries[key], self._sizes[key] = entry, size
            self.vectors += entry.rows
            self.nbytes += size
            self.loads += loaded
            self.catch_ups += caught_up

    def shed(self, nbytes: int) -> int:
        """Drop the least recently used entries until at least ``nbytes`` are freed (or the cache is empty); the
        bytes dropped. (Memory comes back once no search still holds a dropped entry.)"""
        freed = 0
        with self._lock:
            while self._entries and freed < nbytes:
                key = next(iter(self._entries))
                freed += self._sizes[key]
                self._drop(key)
        return freed

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.vectors -= old.rows
            self.nbytes -= self._sizes.pop(key)

    def __len__(self) -> int:
        return len(self._entries)


matrix_cache: ProcessLocal[MatrixCache] = ProcessLocal(MatrixCache)
# One load per (tenant, type, data version) at a time in this process, whatever the number of searches asking.
matrix_loads: ProcessLocal[SingleFlight[tuple[str, str, int, int], TenantMatrix]] = ProcessLocal(
    lambda: SingleFlight("matrix")
)
# Loads (their documents and the build) in this process at once; the others wait for a slot in their load thread.
load_slots: ProcessLocal[threading.BoundedSemaphore] = ProcessLocal(lambda: threading.BoundedSemaphore(LOADS_IN_FLIGHT))
# Loads and merges start only while this process is under MEMQ_SEARCH_MAX_RSS_BYTES (shedding this cache first).
memory_guard: ProcessLocal[MemoryGuard] = ProcessLocal(
    lambda: MemoryGuard(
        get_settings().search_max_rss_bytes,
        shed=lambda nbytes: matrix_cache.get().shed(nbytes),
        read_rss_bytes=resident_bytes,
        release=release_free_memory,
    )
)
# One load or catch-up per (tenant, type) at a time in this process, whatever the versions asked for.
tenant_locks: ProcessLocal[KeyedLocks] = ProcessLocal(lambda: KeyedLocks())
# What each load under way is doing, for the error a search gets when it stops waiting for it.
load_phases: dict[tuple[str, str, int, int], str] = {}
READING = "reading MongoDB"
_probe_results: dict[str, tuple[bool, float]] = {}
_probe_locks: dict[str, threading.Lock] = {}


class KeyedLocks:
    """A lock per key, held only while someone holds or waits for it (no entry is kept for idle keys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Any, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def held(self, key: Any, blocking: bool = True) -> Iterator[bool]:
        """Holds the lock of ``key`` while the block runs; with ``blocking=False`` it yields ``False`` (and the
        lock is not held) when someone else holds it."""
        with self._lock:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        acquired = False
        try:
            acquired = lock.acquire(blocking)
            yield acquired
        finally:
            if acquired:
                lock.release()
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


def entry_nbytes(entry: TenantMatrix) -> int:
    """The memory one cached entry holds: its matrix and filter columns (a ``RowStore``'s whole buffers), its BM25
    index and its items (``item_nbytes``)."""
    lexical = entry.lexical.nbytes() if entry.lexical is not None else 0
    if entry.store is not None:
        return entry.store.nbytes() + lexical
    columns = entry.matrix.nbytes + entry.created_ts.nbytes + (0 if entry.half is None else entry.half.nbytes)
    return columns + lexical + sum(item_nbytes(item) for item in entry.items)


def item_nbytes(item: dict[str, Any]) -> int:
    size = ITEM_OVERHEAD_BYTES + len(str(item.get("content", "")).encode("utf-8", "replace"))
    size += len(str(item.get("id", "")))
    for name in ("tags", "metadata"):
        if item.get(name):
            size += len(json.dumps(item[name], default=str))
    return size


def build_matrix(
    docs: Iterable[dict[str, Any]],
    version: int,
    memory_type: str = "unknown",
    expected_rows: int = 0,
    *,
    dimensions: int,
) -> TenantMatrix:
    """The snapshot of a ``RowStore`` sized for ``expected_rows``, filled from ``docs`` (a cursor)
    ``LOAD_CHUNK_ROWS`` at a time (never all held at once); rows that cannot be searched (``dimensions``: the
    query's) are left out, counted and logged once."""
    rows = RowStore(dimensions, expected_rows + expected_rows // 8)
    skipped: list[Any] = []
    seen = 0
    cursor = iter(docs)
    while chunk := list(itertools.islice(cursor, LOAD_CHUNK_ROWS)):
        seen += len(chunk)
        skipped += rows.append(chunk)
    count_skipped(skipped, seen, memory_type, dimensions)
    return rows.snapshot(version)


def count_skipped(skipped: list[Any], seen: int, memory_type: str, dimensions: int) -> None:
    if not skipped:
        return
    BAD_STORED_ROWS.labels(memory_type=memory_type).inc(len(skipped))
    log.warning(
        "skipped %d of %d stored memories of %s that cannot be searched (embedding missing, undecodable, not "
        "%d-dimensional or not finite, or fields unreadable); _id %s",
        len(skipped),
        seen,
        memory_type,
        dimensions,
        ", ".join(repr(_id)[:40] for _id in skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
    )


def usable_row(doc: dict[str, Any], dimensions: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A stored document's vector and result item, or ``None`` when its embedding is missing, undecodable or not
    ``dimensions`` long, or its fields cannot make a JSON-safe item (finiteness: ``RowStore.append``)."""
    try:
        vector = from_stored(doc[reads.EMBEDDING_FIELD])
        item = reads.to_item(doc, 0.0)
        frozenset(item.get("tags") or ())
    except Exception:  # whatever a hand-written row holds: KeyError, TypeError, ValueError, OverflowError...
        return None
    if vector.shape != (dimensions,):
        return None
    if not isinstance(item["id"], str) or not isinstance(item["content"], str):
        return None
    if not math.isfinite(item["importance"]) or not 0 <= item["importance"] <= 1:
        return None
    return vector, item


def filter_mask(entry: TenantMatrix, filters: dict[str, Any]) -> np.ndarray:
    """Which rows are alive and pass every filter (all alive rows when there is none)."""
    rows = entry.rows
    mask = np.ones(rows, dtype=bool) if entry.alive is None else entry.alive.copy()
    if "created_after" in filters:
        mask &= entry.created_ts[:rows] >= filters["created_after"]  # NaN (unknown) compares False: left out
    if "created_before" in filters:
        mask &= entry.created_ts[:rows] <= filters["created_before"]
    if "role" in filters:
        mask &= np.asarray(entry.roles[:rows], dtype=object) == filters["role"]
    if "tags" in filters:
        named = frozenset(filters["tags"])
        left = np.flatnonzero(mask)  # only the rows still in: a tag test is one Python call per row
        if filters.get("tags_match") == "all":
            passes = [named <= entry.tags[row] for row in left]
        else:
            passes = [not named.isdisjoint(entry.tags[row]) for row in left]
        mask[left] = np.array(passes, dtype=bool)
    return mask


def top_k(entry: TenantMatrix, query: np.ndarray, k: int, wanted: Wanted | None = None) -> list[dict[str, Any]]:
    """The k best alive rows that pass the filters, by the mode's score (``memq.core.ranking.fuse``), ties broken by
    cosine then id (deterministic whatever the rows' order); each item with its ``scores``."""
    wanted = wanted or Wanted()
    if entry.rows == 0 or k <= 0:
        return []
    if not np.isfinite(query).all():  # a forged query vector: no NaN scores (stored rows are finite, see build_matrix)
        query = np.zeros_like(query)
    query = normalise(query.astype(np.float32))
    lexical_used = wanted.mode != "vector" and wanted.query is not None and entry.lexical is not None
    lexical = np.zeros(entry.rows, dtype=np.float32)
    if lexical_used and entry.lexical is not None and wanted.query is not None:
        lexical = entry.lexical.scores(wanted.query)
    eligible = np.flatnonzero(filter_mask(entry, wanted.filters))
    if wanted.mode == "lexical":  # only memories the query's terms match, as Atlas $search returns
        eligible = eligible[lexical[eligible] > 0]
    if eligible.size == 0:
        return []
    k = min(k, eligible.size)
    rows, cosine, fused = scored_rows(entry, query, eligible, lexical, k, wanted.mode)
    order = sorted(
        candidates(fused, cosine, k).tolist(),
        key=lambda i: (-float(fused[i]), -float(cosine[i]), str(entry.items[rows[i]]["id"])),
    )[:k]
    return [
        _scored(
            entry.items[rows[i]],
            float(cosine[i]),
            float(lexical[rows[i]]) if lexical_used else None,
            float(fused[i]),
        )
        for i in order
    ]


def scored_rows(
    entry: TenantMatrix, query: np.ndarray, eligible: np.ndarray, lexical: np.ndarray, k: int, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``eligible`` among which the k best are, with their exact cosines (``exact_cosines``) and fused
    scores, as if every eligible row were scored exactly. Only the rows an estimate (``estimated_cosines``) cannot
    rule out are (``shortlist``); hybrid's min-max scaling takes the exact extremes of all eligible cosines, found so.
    In lexical mode the cosine only breaks the ties at the k-th BM25 score."""
    if mode == "lexical":
        rows = eligible[shortlist(lexical[eligible], k, 0.0)]
        cosine = exact_cosines(entry.matrix, rows, query)
        return rows, cosine, ranking.fuse(cosine, lexical[rows], mode)
    all_estimated, error = estimated_cosines(entry, query)
    estimate = all_estimated[eligible]
    ranges: tuple[tuple[float, float] | None, ...] = (None, None)
    if mode == "vector":
        rows = eligible[shortlist(estimate, k, error)]
    else:
        top = eligible[estimate >= estimate.max() - 2 * error]
        bottom = eligible[estimate <= estimate.min() + 2 * error]
        low, high = exact_cosines(entry.matrix, bottom, query).min(), exact_cosines(entry.matrix, top, query).max()
        ranges = (float(low), float(high)), (float(lexical[eligible].min()), float(lexical[eligible].max()))
        rows = eligible
        if high > low:  # (else every row's scaled cosine is 1)
            fused_estimate = ranking.fuse(estimate, lexical[eligible], mode, *ranges)
            rows = eligible[shortlist(fused_estimate, k, ranking.HYBRID_VECTOR_WEIGHT * error / (high - low))]
    cosine = exact_cosines(entry.matrix, rows, query)
    return rows, cosine, ranking.fuse(cosine, lexical[rows], mode, *ranges)


def estimated_cosines(entry: TenantMatrix, query: np.ndarray) -> tuple[np.ndarray, float]:
    """Every row's cosine with ``query`` and a bound on its error: from the fp16 copy where there is one
    (``half_scores``), else the float32 product (its sums err by at most d x 2^-24 on unit rows; 4 times that)."""
    estimate = half_scores(entry.half, query) if entry.half is not None else None
    if estimate is not None:
        return estimate, HALF_SCORE_ERROR
    return entry.matrix @ query, query.size * 2.0**-22


def exact_cosines(matrix: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The cosines of ``rows`` in float64, row by row: the same value for a row wherever it sits, so equal rows tie
    and the id decides between them. ``EXACT_CHUNK_ROWS`` rows copied at a time (a shortlist of ties can be long)."""
    chunks = np.array_split(rows, max(1, rows.size // EXACT_CHUNK_ROWS))
    return np.concatenate([np.einsum("ij,j->i", matrix[chunk], query, dtype=np.float64) for chunk in chunks])


def shortlist(estimate: np.ndarray, k: int, error: float) -> np.ndarray:
    """Positions that can hold the k best of scores ``estimate`` gives within ``error``: the true k-th best is at
    least the estimated k-th best less ``error``, and a row of the true top k is estimated at least that less
    ``error`` again."""
    kth_best = -np.partition(-estimate, k - 1)[k - 1]
    return np.flatnonzero(estimate >= kth_best - 2 * error)


def half_scores(half: np.ndarray, query: np.ndarray) -> np.ndarray | None:
    """Every row's cosine with ``query`` from the fp16 copy, within ``HALF_SCORE_ERROR``: torch's CPU kernel reads
    half the bytes of a float32 product (numpy has no fast fp16 one). ``None`` without such a torch."""
    torch = half_precision_torch.get()
    if not torch:
        return None
    scores = torch.mv(torch.from_numpy(half), torch.from_numpy(query.astype(np.float16)))
    return np.asarray(scores.float().numpy())


def _torch_summing_in_fp32() -> Any:
    """torch, if its fp16 product sums in fp32 (``HALF_SCORE_ERROR`` assumes it): 1 + 383 x 2^-11 summed in fp16
    stays 1.0. ``False`` (kept: not probed again) where torch is missing or sums otherwise."""
    try:
        import torch
    except ImportError:
        return False
    probe = np.full((4096, 384), 2.0**-11, dtype=np.float16)
    probe[:, 0] = 1.0
    total = torch.mv(torch.from_numpy(probe), torch.ones(384, dtype=torch.float16)).float().numpy()
    return torch if np.allclose(total, 1 + 383 * 2.0**-11, atol=2e-3) else False


half_precision_torch: ProcessLocal[Any] = ProcessLocal(_torch_summing_in_fp32)


def candidates(fused: np.ndarray, cosine: np.ndarray, k: int) -> np.ndarray:
    """The rows that can be among the k best by (fused desc, cosine desc, id), by partial selection: every row better
    than the k-th best fused score, and of those tied with it the ones that can win the cosine tie-break (so a
    lexical query matching fewer than k memories sorts a few rows, not every zero-score row)."""
    if k >= fused.size:
        return np.arange(fused.size)
    kth_best = np.partition(-fused, k - 1)[k - 1]
    better = np.flatnonzero(-fused < kth_best)
    tied = np.flatnonzero(-fused == kth_best)
    needed = k - better.size
    if tied.size > needed:
        tied_cosine = -cosine[tied]
        kth_cosine = np.partition(tied_cosine, needed - 1)[needed - 1]
        tied = tied[tied_cosine <= kth_cosine]
    return np.concatenate([better, tied])


def _scored(item: dict[str, Any], vector: float, lexical: float | None, fused: float) -> dict[str, Any]:
    return {**item, "score": fused, "scores": {"vector": vector, "lexical": lexical, "fused": fused}}


def exact_search(memory_id: str, memory_type: str, query: np.ndarray, k: int, wanted: Wanted) -> SearchOutcome:
    key = (memory_id, memory_type)
    cache = matrix_cache.get()
    dimensions = int(query.size)  # the embed model's: stored vectors of another dimension are not searched
    held = cache.held(key)
    if held is not None and held.rows and held.dimensions != dimensions:  # (a new model means new workers)
        raise InvalidInput("embedded", f"has {dimensions} values; the tenant's stored vectors have {held.dimensions}")
    known = versions.read_version_and_log(memory_id, memory_type, held.version if held is not None else -1)
    if known is None:  # Redis down: never trust a cached matrix
        entry = load_uncached(memory_id, memory_type, dimensions)
        outcome = "bypass"
    else:
        version, tail = known
        entry = cache.get(key, version, dimensions)
        outcome = "hit"
        if entry is None:
            entry = caught_up_here(memory_id, memory_type, version, tail, dimensions)
            entry = entry or load_shared(memory_id, memory_type, version, dimensions)
            outcome = "miss"
    CACHE_REQUESTS.labels(cache="matrix", outcome=outcome).inc()
    return SearchOutcome(top_k(entry, query, k, wanted), "exact", outcome)


def load_shared(memory_id: str, memory_type: str, version: int, dimensions: int) -> TenantMatrix:
    """The tenant's matrix at ``version``, from the one load under way for it in this process or a new one, waited for
    at most this search's budget (``load_wait_s``); then ``StoreUnavailable`` if the load was reading MongoDB, else
    ``WorkerBusy`` (the load goes on under the client's own timeouts and fills the cache)."""
    wait_s = load_wait_s()
    flight_key = (memory_id, memory_type, version, dimensions)
    try:
        return matrix_loads.get().run(
            flight_key, lambda: load_into_cache(memory_id, memory_type, version, dimensions), wait_s
        )
    except FlightTimeout as exc:
        phase = load_phases.get(flight_key, READING)
        waited = f"loading the tenant's {memory_type} memories timed out after {wait_s:.3g} s of this search's budget"
        goes_on = "the load goes on and fills this worker's cache"
        if phase == READING:
            raise StoreUnavailable(f"MongoDB unavailable: {waited} ({goes_on})") from exc
        raise WorkerBusy(f"search worker busy: {waited}, the load still {phase} ({goes_on})") from exc


def caught_up_here(
    memory_id: str, memory_type: str, version: int, tail: list[bytes], dimensions: int
) -> TenantMatrix | None:
    """The tenant at ``version`` caught up in the search's own thread when that waits for nothing: the process holds
    the tenant, no load or catch-up of it is under way, and ``tail`` (the log's entries read with the version)
    carries the state of every changed id. ``None`` otherwise (the search then goes through ``load_shared``)."""
    key = (memory_id, memory_type)
    held = matrix_cache.get().held(key)
    if held is None or held.store is None or held.dimensions != dimensions:
        return None
    with tenant_locks.get().held(key, blocking=False) as acquired:
        return apply_catch_up(memory_id, memory_type, held, version, tail) if acquired else None


def apply_catch_up(
    memory_id: str, memory_type: str, held: TenantMatrix | None, version: int, tail: list[bytes] | None
) -> TenantMatrix | None:
    """``catch_up`` of the held entry's store, its snapshot put in the cache (the caller holds the tenant's lock)."""
    if held is None or held.store is None:
        return None
    caught_up = catch_up(memory_id, memory_type, held.store, version, tail)
    if caught_up is not None and caught_up is not held:  # changes applied (else: the held entry, newer)
        matrix_cache.get().put((memory_id, memory_type), caught_up, caught_up=True)
    return caught_up


def load_into_cache(memory_id: str, memory_type: str, version: int, dimensions: int) -> TenantMatrix:
    """The tenant at ``version`` put in the cache: caught up from the entry the cache holds where the change log
    bridges the versions, else loaded from MongoDB (no overall limit: the client's own timeouts) once one of the
    process's load slots and then the memory guard admit it; a catch-up waits for neither."""
    cache = matrix_cache.get()
    key = (memory_id, memory_type)
    flight_key = (memory_id, memory_type, version, dimensions)
    if (entry := cache.get(key, version, dimensions)) is not None:
        return entry
    load_phases[flight_key] = "waiting for the load of an earlier version of this tenant"
    try:
        with tenant_locks.get().held(key):  # a version that changed during a load is caught up from that load
            if (entry := cache.get(key, version, dimensions)) is not None:
                return entry
            held = cache.held(key)
            same_dimensions = held is not None and held.dimensions == dimensions
            caught_up = apply_catch_up(memory_id, memory_type, held, version, None) if same_dimensions else None
            if caught_up is not None:
                return caught_up
            load_phases[flight_key] = "waiting for a load slot"
            with load_slots.get():  # at most LOADS_IN_FLIGHT loads hold their documents at once
                if (entry := cache.get(key, version, dimensions)) is not None:  # a load of this version just ended
                    return entry
                load_phases[flight_key] = "waiting for memory (MEMQ_SEARCH_MAX_RSS_BYTES)"
                with memory_guard.get().admitted("load", deadlines.LOAD_WAIT_WITHOUT_DEADLINE_S):
                    load_phases[flight_key] = READING
                    expected_rows = held.alive_rows if held is not None else 0
                    entry = load_tenant(memory_id, memory_type, version, expected_rows, dimensions=dimensions)
                cache.put(key, entry, loaded=True)
    finally:
        load_phases.pop(flight_key, None)
    MATRIX_LOADS.labels(memory_type=memory_type).inc()
    return entry


def load_tenant(
    memory_id: str, memory_type: str, version: int, expected_rows: int = 0, *, dimensions: int
) -> TenantMatrix:
    """The whole tenant from MongoDB, streamed into a ``RowStore`` sized for ``expected_rows`` (the rows of the entry
    it replaces: a count would read every document on some servers)."""
    return build_matrix(
        reads.load_tenant(memory_id, memory_type), version, memory_type, expected_rows, dimensions=dimensions
    )


def catch_up(
    memory_id: str, memory_type: str, rows: RowStore, version: int, tail: list[bytes] | None = None
) -> TenantMatrix | None:
    """The snapshot of ``rows`` at ``version`` or later, reached by applying the changes the log names since the
    store's latest snapshot (each changed ``_id``'s state from the log where it carries it, else read from MongoDB);
    ``None`` when only a full load can tell, or, given a ``tail`` (the log's entries read with the version), when
    some state must be read (nothing is applied then). A latest snapshot newer than ``version`` is returned once
    Redis confirms its version (a counter reset means a reload). One catch-up per store at a time (``rows.lock``)."""
    with rows.lock:
        latest = rows.latest
        if latest is None or rows.broken:
            return None
        if latest.version >= version:
            return latest if latest.version == version or confirmed(memory_id, memory_type, latest.version) else None
        changes = versions.changes_between(memory_id, memory_type, latest.version, version, tail)
        if changes is None or len(changes.ids) > max(CATCH_UP_MIN_IDS, CATCH_UP_MAX_FRACTION * latest.alive_rows):
            return None
        docs = [doc for doc in changes.known.values() if doc is not None]
        unknown = sorted(changes.ids - changes.known.keys())
        if unknown and tail is not None:
            return None
        if unknown:
            docs += reads.load_ids(memory_id, memory_type, unknown)
        try:
            for object_id in changes.ids:
                rows.remove(object_id)
            count_skipped(
                rows.append(sorted(docs, key=lambda doc: str(doc["_id"]))), len(docs), memory_type, rows.dimensions
            )
        except BaseException:
            rows.broken = True
            raise
        if rows.dead_rows > max(MIN_CAPACITY_ROWS, COMPACT_DEAD_FRACTION * rows.rows):
            rows.broken = True  # compacted by the full load that follows
            return None
        return rows.snapshot(version)


def confirmed(memory_id: str, memory_type: str, version: int) -> bool:
    """Is the tenant's data version in Redis at least ``version`` (so a snapshot of it is not from before a reset)?"""
    known = versions.read_versions(memory_id, [memory_type])
    return known is not None and known[memory_type] >= version


def load_uncached(memory_id: str, memory_type: str, dimensions: int) -> TenantMatrix:
    """The tenant's matrix built for this search alone (Redis is down, so no data version can key a cache entry),
    under the same load slots and memory guard as a cached load, within this search's budget."""
    wait_s = load_wait_s()
    slots = load_slots.get()
    if not slots.acquire(timeout=max(0.0, wait_s)):
        raise WorkerBusy(
            f"search worker busy: no load slot for the tenant's {memory_type} memories within {wait_s:.3g} s "
            f"(all {LOADS_IN_FLIGHT} busy)"
        )
    try:
        with memory_guard.get().admitted("load", load_wait_s()):
            return load_tenant(memory_id, memory_type, -1, dimensions=dimensions)
    finally:
        slots.release()


def load_wait_s() -> float:
    """How long this search may wait for a tenant load: what is left of the MongoDB budget its task set with
    ``mongo.time_limit``, or ``deadlines.LOAD_WAIT_WITHOUT_DEADLINE_S`` when it set none."""
    return deadlines.budget_s(mongo.deadline_ts(), default_s=deadlines.LOAD_WAIT_WITHOUT_DEADLINE_S) or 0.0


def cache_info() -> dict[str, Any]:
    """What this process's matrix cache holds, for ``memq_info`` (nothing is built to answer)."""
    cache = matrix_cache.get() if matrix_cache.is_built() else MatrixCache()
    in_flight = matrix_loads.get().in_flight() if matrix_loads.is_built() else 0
    counts = (len(cache), cache.vectors, cache.nbytes, cache.loads, cache.catch_ups, in_flight)
    return dict(zip(("entries", "vectors", "bytes", "loads", "catch_ups", "loads_in_flight"), counts, strict=True))


def guard_info() -> dict[str, Any]:
    """What this process's memory guard has done, for ``memq_info``."""
    if not memory_guard.is_built():
        return {"max_rss_bytes": get_settings().search_max_rss_bytes, "in_flight": 0, "shed_bytes": 0}
    return memory_guard.get().info()


def supports(stage: str, memory_type: str, dimensions: int) -> bool:
    """Does this server run ``stage`` ($vectorSearch, $search, $rankFusion) here? Found out by trying it, remembered
    for ``PROBE_TTL_S``. One search at a time probes (it can take seconds); the others wait for a first answer, or
    go on with the last one while it is refreshed."""
    key = f"{stage}:{memory_type}"
    known = _probe_results.get(key)
    if known is not None and time.monotonic() - known[1] <= PROBE_TTL_S:
        return known[0]
    lock = _probe_locks.setdefault(key, threading.Lock())
    if known is not None and not lock.acquire(blocking=False):
        return known[0]  # a refresh is under way: the last answer meanwhile
    if known is None:
        lock.acquire()
    try:
        known = _probe_results.get(key)
        if known is None or time.monotonic() - known[1] > PROBE_TTL_S:
            _probe_results[key] = known = (reads.probe_stage(stage, memory_type, dimensions), time.monotonic())
        return known[0]
    finally:
        lock.release()


def resolve_strategy(requested: str, memory_type: str, dimensions: int) -> str:
    if requested != "auto":
        return requested
    return "vector_search" if supports("$vectorSearch", memory_type, dimensions) else "exact"


def vector_index_building(memory_type: str, explicit: bool) -> bool:
    """Whether the vector index is still building (``auto`` then searches exactly); raises ``IndexNotReady`` when
    it is missing or failed, or building while ``vector_search`` was asked for by name."""
    name = get_settings().vector_index
    building = index_readiness.require_ready(memory_type, name, "vector") == "building"
    if building and explicit:
        raise IndexNotReady(f"the vector index {name!r} on {memory_type} is still building: retry when it is ready")
    return building


def search(
    memory_id: str, memory_type: str, query: np.ndarray, k: int, strategy: str, wanted: Wanted | None = None
) -> SearchOutcome:
    wanted = wanted or Wanted()
    dimensions = int(query.shape[0])
    chosen = resolve_strategy(strategy, memory_type, dimensions)
    note = None
    if chosen == "vector_search" and vector_index_building(memory_type, explicit=strategy == "vector_search"):
        chosen, note = "exact", "exact (vector index building)"
    started = time.perf_counter()
    outcome = None
    if chosen == "vector_search":
        outcome = server_search(memory_id, memory_type, query, k, wanted, dimensions)
    if outcome is None:  # exact asked for, or the server lacks the stage (or a ready index) this mode needs
        outcome = exact_search(memory_id, memory_type, query, k, wanted)
        outcome.strategy = note or outcome.strategy
    SEARCH_SECONDS.labels(memory_type=memory_type, strategy=outcome.strategy).observe(time.perf_counter() - started)
    return outcome


def server_search(
    memory_id: str, memory_type: str, query: np.ndarray, k: int, wanted: Wanted, dimensions: int
) -> SearchOutcome | None:
    """The search in MongoDB Atlas, ``memory_id`` and every filter inside each stage: ``$vectorSearch``;
    ``$search``; for hybrid ``$rankFusion`` of both (MongoDB 8.1+), else both lists fused here. ``None`` when the
    server lacks what the mode needs (the caller then searches exactly)."""
    if wanted.mode == "vector":
        items = reads.vector_search(memory_id, memory_type, query, k, wanted.filters)
        return SearchOutcome(items, "vector_search", "n/a")
    if wanted.query is None or not supports("$search", memory_type, dimensions):
        return None
    if index_readiness.require_ready(memory_type, get_settings().text_index, "search") == "building":
        return None  # searched exactly until the text index is queryable
    if wanted.mode == "lexical":
        items = reads.text_search(memory_id, memory_type, wanted.query, k, wanted.filters)
        return SearchOutcome(items, "text_search", "n/a")
    if supports("$rankFusion", memory_type, dimensions):
        items = reads.rank_fusion_search(memory_id, memory_type, query, wanted.query, k, wanted.filters)
        return SearchOutcome(items, "rank_fusion", "n/a")
    vector_items = reads.vector_search(memory_id, memory_type, query, k, wanted.filters)
    text_items = reads.text_search(memory_id, memory_type, wanted.query, k, wanted.filters)
    return SearchOutcome(ranking.fuse_lists(vector_items, text_items, k), "vector_search+text_search", "n/a")
