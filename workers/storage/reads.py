"""What the search reads from MongoDB: a tenant's documents (exact search), the server-side searches (Atlas
``$vectorSearch``, ``$search``, ``$rankFusion``) and the probes that find out whether a server runs them. Every query
filters on ``memory_id`` in the database query itself, so a tenant's request never reads another tenant's documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pymongo.errors import OperationFailure

from memq.core.settings import get_settings
from memq.core.vectors import to_bson
from memq.workers.storage.mongo import (
    CONTEXT_FIELD,
    EMBEDDING_FIELD,
    ITEM_FIELDS_OUT,
    collection,
    to_datetime,
    transient_errors,
)

log = logging.getLogger(__name__)

NUM_CANDIDATES_FACTOR = 20  # `$vectorSearch` numCandidates per result: Atlas's advice (10-20 x k), recall near exact


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def to_item(doc: dict[str, Any], score: float) -> dict[str, Any]:
    """A stored document → a JSON-safe result item (no embedding)."""
    created_ts = _timestamp(doc.get("created_at"))
    item: dict[str, Any] = {
        "id": doc.get("key", doc["_id"]),
        "content": doc.get("content", ""),
        "score": float(score),
        "created_at": None if created_ts is None else to_datetime(created_ts).isoformat(),
        "importance": float(doc.get("importance", 0.5)),
        "created_at_ts": created_ts,
    }
    for name in ITEM_FIELDS_OUT:
        if doc.get(name) is not None:
            item[name] = doc[name]
    return item


# Documents per cursor batch of a tenant load: small enough that each read stays well inside the socket timeout on a
# busy server (a 1,000-document batch of 384-d vectors passed 3 s on a loaded nx-27017).
LOAD_BATCH_ROWS = 250


def load_tenant(memory_id: str, memory_type: str) -> Iterator[dict[str, Any]]:
    """Every document of this tenant and type, embeddings included, streamed from the cursor a batch at a time."""
    with transient_errors():
        yield from collection(memory_type).find({"memory_id": memory_id}, batch_size=LOAD_BATCH_ROWS)


def load_ids(memory_id: str, memory_type: str, object_ids: list[str]) -> list[dict[str, Any]]:
    """The documents of this tenant among the stored ``_id`` s ``object_ids`` (those deleted since: absent)."""
    with transient_errors():
        return list(collection(memory_type).find({"memory_id": memory_id, "_id": {"$in": object_ids}}))


def vector_filter(memory_id: str, filters: dict[str, Any]) -> dict[str, Any]:
    """The ``$vectorSearch`` pre-filter: ``memory_id`` and every filter, inside the stage (never after)."""
    clauses = _filter_clauses(
        memory_id,
        filters,
        equals=lambda path, value: {path: {"$eq": value}},
        one_of=lambda path, values: {path: {"$in": values}},
        within=lambda path, bounds: {path: {f"${name}": value for name, value in bounds.items()}},
    )
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def search_filter(memory_id: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The same filters as Atlas Search ``compound.filter`` clauses."""
    return _filter_clauses(
        memory_id,
        filters,
        equals=lambda path, value: {"equals": {"path": path, "value": value}},
        one_of=lambda path, values: {"in": {"path": path, "value": values}},
        within=lambda path, bounds: {"range": {"path": path, **bounds}},
    )


Clause = Callable[[str, Any], dict[str, Any]]


def _filter_clauses(
    memory_id: str, filters: dict[str, Any], equals: Clause, one_of: Clause, within: Clause
) -> list[dict[str, Any]]:
    """``memory_id`` and every filter as clauses, in the dialect that ``equals``, ``one_of`` and ``within`` (a
    ``{"gte": ..., "lte": ...}`` range) write."""
    clauses = [equals("memory_id", memory_id)]
    if "tags" in filters:
        if filters.get("tags_match") == "all":
            clauses += [equals("tags", tag) for tag in filters["tags"]]
        else:
            clauses.append(one_of("tags", list(filters["tags"])))
    bounds = {
        name: to_datetime(filters[field])
        for name, field in (("gte", "created_after"), ("lte", "created_before"))
        if field in filters
    }
    if bounds:
        clauses.append(within("created_at", bounds))
    if "role" in filters:
        clauses.append(equals("role", filters["role"]))
    return clauses


def _vector_stage(
    memory_id: str, query: np.ndarray, limit: int, num_candidates: int, filters: dict[str, Any]
) -> dict[str, Any]:
    return {
        "$vectorSearch": {
            "index": get_settings().vector_index,
            "path": EMBEDDING_FIELD,
            "queryVector": to_bson(query),
            "numCandidates": max(num_candidates, limit),
            "limit": limit,
            "filter": vector_filter(memory_id, filters),
        }
    }


def _text_stage(memory_id: str, text: str, filters: dict[str, Any]) -> dict[str, Any]:
    must = [{"text": {"query": text, "path": ["content", CONTEXT_FIELD]}}]
    compound = {"must": must, "filter": search_filter(memory_id, filters)}
    return {"$search": {"index": get_settings().text_index, "compound": compound}}


def _aggregate(memory_type: str, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with transient_errors():
        return list(collection(memory_type).aggregate([*pipeline, {"$project": {EMBEDDING_FIELD: 0}}]))


def searchable(memory_type: str, scored: list[tuple[dict[str, Any], Any, Any, Any]]) -> list[dict[str, Any]]:
    """Result items of the documents a server-side search returned, with their (fused, vector, lexical) scores; one
    that cannot make a valid item is left out and counted, as the exact path does."""
    from memq.core.wire import item_problem
    from memq.workers.plumbing.metrics import BAD_STORED_ROWS

    items = []
    for doc, fused, vector, lexical in scored:
        try:
            item = _scored_item(doc, float(fused), vector, lexical)
        except (TypeError, ValueError, KeyError, OverflowError):
            item = None
        if item is None or item_problem(item) is not None:
            BAD_STORED_ROWS.labels(memory_type=memory_type).inc()
            continue
        items.append(item)
    return items


def _scored_item(doc: dict[str, Any], fused: float, vector: float | None, lexical: float | None) -> dict[str, Any]:
    return {**to_item(doc, fused), "scores": {"vector": vector, "lexical": lexical, "fused": fused}}


def vector_search(
    memory_id: str, memory_type: str, query: np.ndarray, limit: int, filters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Atlas ``$vectorSearch`` with ``memory_id`` and the filters as a pre-filter inside the stage."""
    stage = _vector_stage(memory_id, query, limit, limit * NUM_CANDIDATES_FACTOR, filters or {})
    docs = _aggregate(memory_type, [stage, {"$set": {"_vector_score": {"$meta": "vectorSearchScore"}}}])
    # Atlas reports cosine as (1 + cos) / 2; memq reports the cosine itself.
    cosines = [2.0 * float(doc.get("_vector_score", 0.5)) - 1.0 for doc in docs]
    return searchable(memory_type, [(doc, cos, cos, None) for doc, cos in zip(docs, cosines, strict=True)])


def text_search(
    memory_id: str, memory_type: str, text: str, limit: int, filters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Atlas Search (BM25) over ``content``, ``memory_id`` and the filters as ``compound.filter`` clauses."""
    stage = _text_stage(memory_id, text, filters or {})
    docs = _aggregate(memory_type, [stage, {"$limit": limit}, {"$set": {"_text_score": {"$meta": "searchScore"}}}])
    return searchable(memory_type, [(doc, doc.get("_text_score"), None, doc.get("_text_score")) for doc in docs])


def rank_fusion_search(
    memory_id: str, memory_type: str, query: np.ndarray, text: str, limit: int, filters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Hybrid in the server: ``$rankFusion`` (MongoDB 8.1+) of ``$vectorSearch`` and ``$search``, each with
    ``memory_id`` and the filters inside."""
    pipelines = _fusion_pipelines(memory_id, query, text, limit, limit * NUM_CANDIDATES_FACTOR, filters or {})
    fusion = {"$rankFusion": {"input": {"pipelines": pipelines}, "scoreDetails": True}}
    docs = _aggregate(memory_type, [fusion, {"$limit": limit}, {"$set": {"_fusion": {"$meta": "scoreDetails"}}}])
    fused = [doc["_fusion"].get("value") if isinstance(doc.get("_fusion"), dict) else None for doc in docs]
    return searchable(memory_type, [(doc, score, None, None) for doc, score in zip(docs, fused, strict=True)])


def _fusion_pipelines(
    memory_id: str, query: np.ndarray, text: str, limit: int, num_candidates: int, filters: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    depth = max(limit, num_candidates // 2)
    return {
        "vector": [_vector_stage(memory_id, query, depth, num_candidates, filters)],
        "text": [_text_stage(memory_id, text, filters), {"$limit": depth}],
    }


PROBE_COLLECTION = "memq_stage_probe"  # never written: a probe reads nothing, whatever the tenants' sizes


def probe_stage(stage: str, memory_type: str, dimensions: int) -> bool:
    """Does this server run ``stage``? Found out by trying it on a collection memq never writes (a server that reads
    documents before it checks the stages, nx-27017, would otherwise read the tenant's: 2.7 s at 50,000 memories);
    one that does not run it refuses it (``OperationFailure``). Whether the index is ready: ``index_readiness``."""
    nobody = "\x1fmemq-probe"
    vector = np.zeros(dimensions, dtype=np.float32)
    vector[-1] = 1.0
    pipelines = _fusion_pipelines(nobody, vector, "probe", 1, 1, {})
    stages = {
        "$vectorSearch": pipelines["vector"][0],
        "$search": pipelines["text"][0],
        "$rankFusion": {"$rankFusion": {"input": {"pipelines": pipelines}}},
    }
    try:
        with transient_errors():
            probe = collection(memory_type).database[PROBE_COLLECTION]
            list(probe.aggregate([stages[stage], {"$limit": 1}]))
    except OperationFailure as exc:
        log.info("%s not usable on %s (%s)", stage, memory_type, str(exc).splitlines()[0][:160])
        return False
    return True
