"""The pipeline's logic as plain functions; the Celery tasks in ``tasks/`` only wrap these.

Each step takes and returns JSON-safe values, so it runs the same in a test, a worker or a benchmark.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from memq.client.cache_redis import cache_redis
from memq.core import deadlines, keys, ranking, wire
from memq.core.field_rules import text_form
from memq.core.settings import get_settings
from memq.workers.embedding import embedding_cache
from memq.workers.embedding.embedder import embedder
from memq.workers.plumbing import cache_filing
from memq.workers.plumbing.metrics import EMBED_BATCH_SIZE, EMBED_SECONDS, MERGE_SECONDS, STORE_WRITES
from memq.workers.search import strategies as search_strategies
from memq.workers.search.result_size import MAX_RESULT_BYTES, bound_result_bytes, item_bytes
from memq.workers.search.rss_budget import MERGE_HOLDS_INPUT_TIMES
from memq.workers.search.strategies import Wanted
from memq.workers.storage import mongo, versions, writes

INTERNAL_ITEM_FIELDS = ("created_at_ts",)


def embed_query(query: str, wait_s: float | None = None) -> dict[str, Any]:
    """The query's vector (of its text form, as a memory's): from the embedding cache when this model embedded
    this text before, else from the batcher's forward pass, waited for at most ``wait_s``."""
    started_ts = time.time()  # wall clock: merge turns the steps' stamps into queue waits
    query = text_form(query)
    model = embedder.get()
    started = time.perf_counter()
    vector = embedding_cache.lookup(model.model_name, [query])[0]
    cache = "hit" if vector is not None else "miss"
    if vector is None:
        # Through the process's batcher: concurrent embed tasks share forward passes (it records the metrics).
        vector = model.encode_queries([query], wait_s)[0]
        embedding_cache.store(model.model_name, [query], [vector])
    elapsed_ms = (time.perf_counter() - started) * 1000
    return wire.embed_result(vector, model.model_name, elapsed_ms, cache, started_ts, time.time())


def embed_texts(texts: Sequence[str], on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Vectors for ``texts`` (their text form, as a query's) in order: cached ones from one MGET, the rest (each
    distinct text once) through the model in chunks, then cached."""
    model = embedder.get()
    texts = [text_form(text) for text in texts]
    vectors = embedding_cache.lookup(model.model_name, texts)
    missing = list(dict.fromkeys(text for text, vector in zip(texts, vectors, strict=True) if vector is None))
    hits = len(texts) - sum(vector is None for vector in vectors)
    started = time.perf_counter()
    if missing:
        progress = None if on_progress is None else (lambda done, _: on_progress(hits + done, len(texts)))
        rows = model.encode_in_chunks(missing, progress)
        EMBED_SECONDS.labels(device=model.device).observe(time.perf_counter() - started)
        EMBED_BATCH_SIZE.labels(device=model.device).observe(len(missing))
        embedding_cache.store(model.model_name, missing, list(rows))
        computed = dict(zip(missing, rows, strict=True))
        vectors = [computed[text] if vector is None else vector for text, vector in zip(texts, vectors, strict=True)]
    elapsed_ms = (time.perf_counter() - started) * 1000
    return wire.embedded_texts(vectors, model.model_name, elapsed_ms, hits, len(missing))


def search_type(
    embedded: wire.EmbedResult,
    memory_id: str,
    memory_type: str,
    k: int,
    strategy: str,
    wanted: Wanted | None = None,
    budget_s: float | None = None,
) -> wire.SearchResult:
    """One type's ranked candidates; MongoDB work takes at most ``budget_s`` (``None``: the client's timeouts)."""
    started_ts = time.time()
    started = time.perf_counter()
    vector = wire.parse_embed_result(embedded, embedding_cache.model_dimensions(get_settings().embed_model))
    with mongo.time_limit(budget_s):
        outcome = search_strategies.search(memory_id, memory_type, vector, k, strategy, wanted)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return wire.search_result(
        memory_type, outcome.items, outcome.strategy, outcome.matrix_cache, elapsed_ms, started_ts, embedded
    )


def merge(results: Any, request: Any) -> dict[str, Any]:
    """Rank each type's candidates by memory_signal, keep its k, report per-type errors and timings. ``results``
    and ``request`` as they arrived: their shape is checked here, once (``wire.parse_merge_input``)."""
    started_ts, started = time.time(), time.perf_counter()
    settings = get_settings()
    merge_input = wire.parse_merge_input(results, request, settings)
    items = (item for result in merge_input["results"] for item in result.get("items", ()))
    holds_bytes = MERGE_HOLDS_INPUT_TIMES * sum(item_bytes(item) for item in items)
    guard = search_strategies.memory_guard.get()
    with guard.admitted("merge", merge_wait_s(merge_input["request"], settings), holds_bytes=holds_bytes):
        return _merge(merge_input, started, started_ts)


def merge_wait_s(request: dict[str, Any], settings: Any) -> float:
    """How long a merge may wait for the memory guard: what is left of its retrieval's deadline
    (``MEMQ_RETRIEVE_TIMEOUT_S`` for a request without one), never more than half the visibility timeout (a message
    held longer is delivered again)."""
    cap_s = settings.visibility_timeout_s * deadlines.MERGE_WAIT_SHARE
    default_s = settings.retrieve_timeout_s
    return deadlines.budget_s(request.get("deadline_ts") or None, cap_s=cap_s, default_s=default_s) or 0.0


def _merge(merge_input: wire.MergeInput, started: float, started_ts: float) -> dict[str, Any]:
    settings = get_settings()
    request, results, errors = merge_input["request"], merge_input["results"], merge_input["errors"]
    limits: dict[str, int] = request["limits"]
    ranked: dict[str, list[dict[str, Any]]] = {t: [] for t in limits}
    timings: dict[str, Any] = {"search_ms": {}, "matrix_cache": {}, "served_by": {}}
    for result in results:
        memory_type = result["type"]
        if result.get("embed_ms") is not None:
            timings["embed_ms"] = result["embed_ms"]
        if isinstance(result.get("served_by"), str):
            timings["served_by"][memory_type] = result["served_by"][:255]
        if "error" in result:
            errors[memory_type] = result["error"][: wire.MAX_ERROR_CHARS]
            continue
        timings["search_ms"][memory_type] = result.get("search_ms", 0.0)
        timings["matrix_cache"][memory_type] = result.get("matrix_cache")
        best = ranking.rank_type(
            result["items"], limits[memory_type], request["weights"], started_ts, settings.recency_half_life_s
        )
        ranked[memory_type] = [{k: v for k, v in item.items() if k not in INTERNAL_ITEM_FIELDS} for item in best]
    answered = {result["type"] for result in results} | errors.keys()  # a lost chord header: never silently empty
    errors.update({t: "no search result arrived for this type" for t in limits if t not in answered})
    merge_s = time.perf_counter() - started
    MERGE_SECONDS.observe(merge_s)
    timings["merge_ms"] = merge_s * 1000
    if request.get("requested_at"):
        timings["total_ms"] = (time.time() - request["requested_at"]) * 1000
    timings["queue_ms"] = queue_waits_ms(results, request.get("requested_at"), started_ts)
    merged = {"query": request["query"], "memory_id": request["memory_id"], "results": ranked, "errors": errors}
    merged = bound_result_bytes({**merged, "timings_ms": timings, "cached": False}, MAX_RESULT_BYTES)
    if request.get("cache_key") is not None:  # filed only under the key of this very request
        cache_filing.store_merged(cache_redis.get(), settings, request, merged)
    return merged


def queue_waits_ms(
    results: Sequence[wire.SearchResult], requested_at: float | None, merge_started_ts: float
) -> dict[str, Any]:
    """How long each step waited between the previous one and its start (queue, prefetch, chord bookkeeping),
    from the steps' wall-clock stamps; a stamp that is missing leaves its wait out. Across hosts these include
    clock skew."""
    embed = next((r for r in results if r.get("embed_started_ts")), {})
    waits: dict[str, Any] = {"search": {}}
    if requested_at and embed:
        waits["embed"] = (embed["embed_started_ts"] - requested_at) * 1000
    searched = [r for r in results if r.get("search_started_ts")]
    for result in searched:
        if result.get("embed_ended_ts"):
            waits["search"][result["type"]] = (result["search_started_ts"] - result["embed_ended_ts"]) * 1000
    if searched:
        last_search_ended_ts = max(r["search_started_ts"] + r.get("search_ms", 0.0) / 1000 for r in searched)
        waits["merge"] = (merge_started_ts - last_search_ended_ts) * 1000
    return waits


def store_memories(
    embedded: dict[str, Any], memory_id: str, memory_type: str, items: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Write checked ``items`` with their vectors (a bad vector is ``InvalidInput`` before anything is written), then
    bump the tenant's data version whatever the write's outcome (``versions.bumped_whatever_happens``)."""
    settings = get_settings()
    dimensions = embedding_cache.model_dimensions(settings.embed_model)
    vectors = wire.parse_embedded_texts(embedded, len(items), settings.embed_model, dimensions)
    now_ts = time.time()
    batch = writes.build_writes(memory_id, memory_type, items, vectors, embedded["model"], now_ts)
    touched = [keys.memory_object_id(memory_id, writes.memory_key(item)) for item in items]
    with versions.bumped_whatever_happens(memory_id, [memory_type], touched) as write:
        counts, inserted = writes.upsert(memory_type, batch)
        write.known = inserted_documents(memory_id, items, vectors, embedded["model"], now_ts, inserted)
    STORE_WRITES.labels(memory_type=memory_type).inc(len(batch) - len(counts["failed"]))
    return {"memory_id": memory_id, "type": memory_type, "ids": [writes.memory_key(i) for i in items], **counts}


def inserted_documents(
    memory_id: str, items: Sequence[dict[str, Any]], vectors: Any, model: str, now_ts: float, inserted: list[int]
) -> dict[str, dict[str, Any] | None]:
    """The stored documents the upsert inserted, by ``_id``, for the change log (``versions.Write.known``): an id
    sent twice in one batch is left out (which of its two writes MongoDB applied last is not known)."""
    sent = Counter(keys.memory_object_id(memory_id, writes.memory_key(item)) for item in items)
    docs = (writes.inserted_document(memory_id, items[i], vectors[i], model, now_ts) for i in inserted)
    return {doc["_id"]: doc for doc in docs if sent[doc["_id"]] == 1}


def forget(memory_id: str, memory_type: str | None, ids: Sequence[str] | None) -> dict[str, Any]:
    from memq.core.memory_types import MemoryType

    types = [memory_type] if memory_type else [t.value for t in MemoryType]
    deleted: dict[str, int] = {}
    # Type by type: when MongoDB fails at one, the types deleted before it must not stay cached either.
    touched = None if ids is None else [keys.memory_object_id(memory_id, key) for key in ids]
    with versions.bumped_whatever_happens(memory_id, types, touched, deletes=True) as write:
        for memory_type_name in types:
            deleted[memory_type_name] = writes.delete(memory_id, memory_type_name, ids)
        write.known = None if touched is None else dict.fromkeys(touched)  # gone from every type
    return {"memory_id": memory_id, "deleted": deleted}
