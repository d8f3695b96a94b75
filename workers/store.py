"""MongoDB access: one pooled ``MongoClient`` per worker process, built after fork.

Every query filters on ``memory_id`` in the database query itself, so a tenant's request can never
read, rank or delete another tenant's documents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pymongo
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, ConnectionFailure, ExecutionTimeout, OperationFailure, PyMongoError

from memq import keys
from memq.errors import StoreUnavailable
from memq.memory_types import ROLE_TYPES, MemoryType
from memq.process_local import ProcessLocal
from memq.settings import Settings, get_settings
from memq.vectors import to_bson

log = logging.getLogger(__name__)

EMBEDDING_FIELD = "embedding"
CONTEXT_FIELD = "context"  # text the writer supplied beside the content: searched lexically, never embedded
FILTER_PATHS = ("tags", "created_at", "role")  # what retrieval filters on, besides memory_id
ITEM_FIELDS_OUT = ("role", "tags", "metadata")
# A failed write's reason as ``upsert`` reports it: by the server's error code, never its message (which quotes
# the document).
WRITE_ERROR_REASONS = {
    11000: "duplicate key",
    11001: "duplicate key",
    121: "document failed validation",
    10334: "document too large",
    17419: "document too large",
    17280: "index key too large",
}


def _connect() -> pymongo.MongoClient:
    settings = get_settings()
    return pymongo.MongoClient(
        settings.mongodb_uri,
        maxPoolSize=settings.mongodb_pool_size,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        connectTimeoutMS=settings.mongodb_timeout_ms,
        socketTimeoutMS=settings.mongodb_timeout_ms * 2,
        tz_aware=True,
        appname="memq",
        event_listeners=_pool_listeners(),
    )


def _pool_listeners() -> list[Any]:
    from memq.workers.mongo_metrics import MongoPoolMetrics

    return [MongoPoolMetrics()]


mongo_client: ProcessLocal[pymongo.MongoClient] = ProcessLocal(_connect, close=lambda client: client.close())


@contextmanager
def transient_errors() -> Iterator[None]:
    """Connection-level MongoDB failures become ``StoreUnavailable`` (retryable)."""
    try:
        yield
    except (ConnectionFailure, ExecutionTimeout) as exc:
        raise StoreUnavailable(f"MongoDB unavailable: {exc}") from exc


@contextmanager
def time_limit(budget_s: float | None) -> Iterator[None]:
    """Every MongoDB operation inside takes at most ``budget_s`` in all (pymongo's client-side operation
    timeout: server selection, pool wait and socket reads together); ``None`` keeps the client's timeouts."""
    if budget_s is None:
        yield
        return
    with pymongo.timeout(budget_s):
        yield


def collection(memory_type: str) -> Collection:
    return mongo_client.get()[get_settings().mongodb_db][MemoryType(memory_type).value]


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def _iso(value: Any) -> str | None:
    ts = _timestamp(value)
    return None if ts is None else to_datetime(ts).isoformat()


def to_item(doc: dict[str, Any], score: float) -> dict[str, Any]:
    """A stored document → a JSON-safe result item (no embedding)."""
    item: dict[str, Any] = {
        "id": doc.get("key", doc["_id"]),
        "content": doc.get("content", ""),
        "score": float(score),
        "created_at": _iso(doc.get("created_at")),
        "last_accessed_at": _iso(doc.get("last_accessed_at")),
        "importance": float(doc.get("importance", 0.5)),
        "created_at_ts": _timestamp(doc.get("created_at")),
        "last_accessed_at_ts": _timestamp(doc.get("last_accessed_at")),
    }
    for name in ITEM_FIELDS_OUT:
        if doc.get(name) is not None:
            item[name] = doc[name]
    return item


def memory_key(item: dict[str, Any]) -> str:
    """The id a caller sees: theirs if they gave one, else a digest of the content."""
    return item.get("id") or keys.content_key(item["content"])


def build_writes(
    memory_id: str, memory_type: str, items: Sequence[dict[str, Any]], vectors: np.ndarray, model: str, now_ts: float
) -> list[UpdateOne]:
    """Idempotent upserts: ``_id`` is derived from (memory_id, key), so a redelivered write never
    duplicates, and ``created_at`` is set only when the memory is first inserted."""
    writes = []
    for item, vector in zip(items, vectors, strict=True):
        key = memory_key(item)
        fields: dict[str, Any] = {
            "memory_id": memory_id,
            "key": key,
            "content": item["content"],
            EMBEDDING_FIELD: to_bson(vector),
            "model": model,
            "importance": item.get("importance", 0.5),
            "last_accessed_at": to_datetime(item.get("created_at", now_ts)),
            "updated_at": to_datetime(now_ts),
        }
        for name in (*ITEM_FIELDS_OUT, CONTEXT_FIELD):
            if name in item:
                fields[name] = item[name]
        on_insert = {"created_at": to_datetime(item.get("created_at", now_ts))}
        if "created_at" in item:
            fields["created_at"] = on_insert.pop("created_at")
        update: dict[str, Any] = {"$set": fields}
        if on_insert:
            update["$setOnInsert"] = on_insert
        writes.append(
            UpdateOne({"_id": keys.memory_object_id(memory_id, key), "memory_id": memory_id}, update, upsert=True)
        )
    return writes


def upsert(memory_type: str, writes: list[UpdateOne]) -> dict[str, Any]:
    """One unordered bulk write: ``{"inserted", "updated", "failed"}``.

    A partly failed batch (``BulkWriteError``: a unique index the operator added, a schema validator) is not an
    exception: the other writes are in MongoDB, so it returns their counts and, under ``failed``, each failed
    write as ``{"index": its position in the batch, "reason": a short reason}`` (``write_error_reason``: never
    the document nor the server's message, which quotes it). The caller (``steps.store_memories``) bumps the
    tenant's data version either way, and ``memq.store`` returns this result rather than failing, so the caller
    learns what was written and which items to fix or re-send (the write is idempotent). A write-concern error
    alone (written, durability unconfirmed) raises ``StoreUnavailable``, so the store is retried."""
    try:
        with transient_errors():
            result = collection(memory_type).bulk_write(writes, ordered=False)
    except BulkWriteError as exc:
        details = exc.details or {}
        failed = [
            {"index": _write_index(error), "reason": write_error_reason(error)}
            for error in details.get("writeErrors") or []
        ]
        if not failed:
            raise StoreUnavailable("MongoDB did not confirm the write concern of the batch") from None
        return {
            "inserted": int(details.get("nUpserted") or 0),
            "updated": int(details.get("nMatched") or 0),
            "failed": sorted(failed, key=lambda entry: entry["index"]),
        }
    return {"inserted": result.upserted_count, "updated": result.matched_count, "failed": []}


def write_error_reason(error: Mapping[str, Any]) -> str:
    """A short reason for one failed write of a bulk write, from its code alone."""
    try:
        code = int(error.get("code"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "write error"
    return WRITE_ERROR_REASONS.get(code, f"write error {code}")


def _write_index(error: Mapping[str, Any]) -> int:
    try:
        return int(error.get("index"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -1


def load_tenant(memory_id: str, memory_type: str) -> list[dict[str, Any]]:
    """Every document of this tenant and type, embeddings included (exact search)."""
    with transient_errors():
        return list(collection(memory_type).find({"memory_id": memory_id}))


def vector_filter(memory_id: str, filters: dict[str, Any]) -> dict[str, Any]:
    """The ``$vectorSearch`` pre-filter: ``memory_id`` and every filter, inside the stage (never after)."""
    clauses: list[dict[str, Any]] = [{"memory_id": {"$eq": memory_id}}]
    if "tags" in filters:
        if filters.get("tags_match") == "all":
            clauses += [{"tags": {"$eq": tag}} for tag in filters["tags"]]
        else:
            clauses.append({"tags": {"$in": list(filters["tags"])}})
    created: dict[str, Any] = {}
    if "created_after" in filters:
        created["$gte"] = to_datetime(filters["created_after"])
    if "created_before" in filters:
        created["$lte"] = to_datetime(filters["created_before"])
    if created:
        clauses.append({"created_at": created})
    if "role" in filters:
        clauses.append({"role": {"$eq": filters["role"]}})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def search_filter(memory_id: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The same filters as Atlas Search ``compound.filter`` clauses."""
    clauses: list[dict[str, Any]] = [{"equals": {"path": "memory_id", "value": memory_id}}]
    if "tags" in filters:
        if filters.get("tags_match") == "all":
            clauses += [{"equals": {"path": "tags", "value": tag}} for tag in filters["tags"]]
        else:
            clauses.append({"in": {"path": "tags", "value": list(filters["tags"])}})
    created: dict[str, Any] = {}
    if "created_after" in filters:
        created["gte"] = to_datetime(filters["created_after"])
    if "created_before" in filters:
        created["lte"] = to_datetime(filters["created_before"])
    if created:
        clauses.append({"range": {"path": "created_at", **created}})
    if "role" in filters:
        clauses.append({"equals": {"path": "role", "value": filters["role"]}})
    return clauses


def _vector_stage(
    memory_id: str, query: np.ndarray, limit: int, num_candidates: int, index: str, filters: dict[str, Any]
) -> dict[str, Any]:
    return {
        "$vectorSearch": {
            "index": index,
            "path": EMBEDDING_FIELD,
            "queryVector": to_bson(query),
            "numCandidates": max(num_candidates, limit),
            "limit": limit,
            "filter": vector_filter(memory_id, filters),
        }
    }


def _text_stage(memory_id: str, text: str, index: str, filters: dict[str, Any]) -> dict[str, Any]:
    must = [{"text": {"query": text, "path": ["content", CONTEXT_FIELD]}}]
    return {"$search": {"index": index, "compound": {"must": must, "filter": search_filter(memory_id, filters)}}}


def _aggregate(memory_type: str, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with transient_errors():
        return list(collection(memory_type).aggregate([*pipeline, {"$project": {EMBEDDING_FIELD: 0}}]))


def searchable(memory_type: str, scored: list[tuple[dict[str, Any], Any, Any, Any]]) -> list[dict[str, Any]]:
    """Result items of the documents a server-side search returned, with their (fused, vector, lexical) scores;
    a document that cannot make a valid item (a row written by hand, a score missing) is left out and counted, as
    the exact path does, so one bad row never fails its tenant's search."""
    from memq.wire import item_problem
    from memq.workers.metrics import BAD_STORED_ROWS

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
    memory_id: str,
    memory_type: str,
    query: np.ndarray,
    limit: int,
    num_candidates: int,
    settings: Settings,
    filters: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Atlas ``$vectorSearch`` with ``memory_id`` and the filters as a pre-filter inside the stage."""
    stage = _vector_stage(memory_id, query, limit, num_candidates, settings.vector_index, filters or {})
    docs = _aggregate(memory_type, [stage, {"$set": {"_vector_score": {"$meta": "vectorSearchScore"}}}])
    # Atlas reports cosine as (1 + cos) / 2; memq reports the cosine itself.
    cosines = [2.0 * float(doc.get("_vector_score", 0.5)) - 1.0 for doc in docs]
    return searchable(memory_type, [(doc, cos, cos, None) for doc, cos in zip(docs, cosines, strict=True)])


def text_search(
    memory_id: str, memory_type: str, text: str, limit: int, settings: Settings, filters: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Atlas Search (BM25) over ``content``, ``memory_id`` and the filters as ``compound.filter`` clauses."""
    stage = _text_stage(memory_id, text, settings.text_index, filters or {})
    docs = _aggregate(memory_type, [stage, {"$limit": limit}, {"$set": {"_text_score": {"$meta": "searchScore"}}}])
    return searchable(memory_type, [(doc, doc.get("_text_score"), None, doc.get("_text_score")) for doc in docs])


def rank_fusion_search(
    memory_id: str,
    memory_type: str,
    query: np.ndarray,
    text: str,
    limit: int,
    num_candidates: int,
    settings: Settings,
    filters: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Hybrid in the server: ``$rankFusion`` (MongoDB 8.1+) of ``$vectorSearch`` and ``$search``, each with
    ``memory_id`` and the filters inside."""
    fusion = {
        "$rankFusion": {
            "input": {
                "pipelines": _fusion_pipelines(memory_id, query, text, limit, num_candidates, settings, filters or {})
            },
            "scoreDetails": True,
        }
    }
    docs = _aggregate(memory_type, [fusion, {"$limit": limit}, {"$set": {"_fusion": {"$meta": "scoreDetails"}}}])
    scored = [
        (doc, (doc.get("_fusion") or {}).get("value") if isinstance(doc.get("_fusion"), dict) else None) for doc in docs
    ]
    return searchable(memory_type, [(doc, fused, None, None) for doc, fused in scored])


def _fusion_pipelines(
    memory_id: str,
    query: np.ndarray,
    text: str,
    limit: int,
    num_candidates: int,
    settings: Settings,
    filters: dict[str, Any],
) -> dict[str, list[dict[str, Any]]]:
    depth = max(limit, num_candidates // 2)
    return {
        "vector": [_vector_stage(memory_id, query, depth, num_candidates, settings.vector_index, filters)],
        "text": [_text_stage(memory_id, text, settings.text_index, filters), {"$limit": depth}],
    }


def probe_stage(stage: str, memory_type: str, dimensions: int) -> bool:
    """Does this server run ``stage`` on this collection? Found out by trying it on a tenant that cannot exist."""
    settings = get_settings()
    nobody = "\x1fmemq-probe"
    vector = np.zeros(dimensions, dtype=np.float32)
    vector[-1] = 1.0
    pipelines = _fusion_pipelines(nobody, vector, "probe", 1, 1, settings, {})
    stages = {
        "$vectorSearch": pipelines["vector"][0],
        "$search": pipelines["text"][0],
        "$rankFusion": {"$rankFusion": {"input": {"pipelines": pipelines}}},
    }
    try:
        with transient_errors():
            list(collection(memory_type).aggregate([stages[stage], {"$limit": 1}]))
    except OperationFailure as exc:
        log.info("%s not usable on %s (%s)", stage, memory_type, str(exc).splitlines()[0][:160])
        return False
    return True


def delete(memory_id: str, memory_type: str, ids: Sequence[str] | None) -> int:
    query: dict[str, Any] = {"memory_id": memory_id}
    if ids is not None:
        query["_id"] = {"$in": [keys.memory_object_id(memory_id, key) for key in ids]}
    with transient_errors():
        return collection(memory_type).delete_many(query).deleted_count


def ensure_indexes(memory_types: Sequence[str]) -> dict[str, list[str]]:
    """Idempotent: creating an index that exists with the same keys is a no-op in MongoDB."""
    created: dict[str, list[str]] = {}
    for memory_type in memory_types:
        coll = collection(memory_type)
        names = [
            coll.create_index([("memory_id", 1), ("created_at", -1)], name="memory_id_created_at"),
            coll.create_index([("tags", 1)], name="tags", sparse=True),
            _create_text_index(coll),
        ]
        if MemoryType(memory_type) in ROLE_TYPES:
            names.append(coll.create_index([("memory_id", 1), ("role", 1)], name="memory_id_role"))
        created[memory_type] = names
    return created


def _create_text_index(coll: Collection) -> str:
    try:
        return coll.create_index([("content", "text")], name="content_text")
    except OperationFailure as exc:
        # nx-27017 workaround: re-creating an existing text index fails there with "constraint failed"
        # (MongoDB treats it as a no-op). Anything else is a real error.
        if "constraint failed" in str(exc):
            return "content_text"
        raise


def vector_index_definition(dimensions: int, index: str) -> dict[str, Any]:
    """The Atlas Vector Search index, with ``memory_id`` and every filter's field declared as filter fields."""
    filter_fields = [{"type": "filter", "path": path} for path in ("memory_id", *FILTER_PATHS)]
    vector = {"type": "vector", "path": EMBEDDING_FIELD, "numDimensions": dimensions, "similarity": "cosine"}
    return {"name": index, "type": "vectorSearch", "definition": {"fields": [vector, *filter_fields]}}


def text_index_definition(index: str) -> dict[str, Any]:
    """The Atlas Search index: ``content`` analysed in English (BM25), the filter fields as tokens and a date."""
    fields: dict[str, Any] = {
        "content": {"type": "string", "analyzer": "lucene.english"},
        CONTEXT_FIELD: {"type": "string", "analyzer": "lucene.english"},
        "memory_id": {"type": "token"},
        "role": {"type": "token"},
        "tags": {"type": "token"},
        "created_at": {"type": "date"},
    }
    return {"name": index, "type": "search", "definition": {"mappings": {"dynamic": False, "fields": fields}}}


def ensure_search_indexes(memory_types: Sequence[str], definition: dict[str, Any]) -> dict[str, str]:
    """Create an Atlas search index (``vectorSearch`` or ``search``) where the server supports them; report
    otherwise."""
    from pymongo.operations import SearchIndexModel

    outcome: dict[str, str] = {}
    index = definition["name"]
    database = mongo_client.get()[get_settings().mongodb_db]
    for memory_type in memory_types:
        coll = collection(memory_type)
        try:
            if memory_type not in database.list_collection_names():
                database.create_collection(memory_type)  # Atlas indexes only existing collections
            existing = {ix.get("name"): ix for ix in coll.list_search_indexes()}
            if index in existing:
                current = existing[index].get("latestDefinition")
                if current is not None and current != definition["definition"]:
                    # An index from an older memq lacks fields this one filters on: bring it up to date (Atlas
                    # rebuilds it in the background and keeps serving the old one meanwhile).
                    coll.update_search_index(index, definition["definition"])
                    outcome[memory_type] = "updated"
                else:
                    outcome[memory_type] = "exists"
                continue
            coll.create_search_index(
                SearchIndexModel(definition=definition["definition"], name=index, type=definition["type"])
            )
            outcome[memory_type] = "created"
        except PyMongoError as exc:
            outcome[memory_type] = f"unsupported: {str(exc).splitlines()[0][:120]}"
    return outcome
