"""What memq writes to MongoDB: idempotent upserts of a tenant's memories, and deletes.

Every write filters on ``memory_id`` in the database query itself, so a tenant's request can never overwrite or
delete another tenant's documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from memq.core import keys
from memq.core.vectors import to_bson
from memq.errors import StoreUnavailable
from memq.workers.storage import mongo

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


def memory_key(item: dict[str, Any]) -> str:
    """The id a caller sees: theirs if they gave one, else a digest of the content."""
    return item.get("id") or keys.content_key(item["content"])


def build_writes(
    memory_id: str, memory_type: str, items: Sequence[dict[str, Any]], vectors: np.ndarray, model: str, now_ts: float
) -> list[UpdateOne]:
    """Idempotent upserts: ``_id`` derives from (memory_id, key), so a redelivered write never duplicates;
    ``created_at`` (the item's own, else now) is set only on insert, so a re-sent memory never becomes recent."""
    writes = []
    for item, vector in zip(items, vectors, strict=True):
        inserted = inserted_document(memory_id, item, vector, model, now_ts)
        object_id, created_at = inserted.pop("_id"), inserted.pop("created_at")
        update = {"$set": inserted, "$setOnInsert": {"created_at": created_at}}
        writes.append(UpdateOne({"_id": object_id, "memory_id": memory_id}, update, upsert=True))
    return writes


def inserted_document(
    memory_id: str, item: dict[str, Any], vector: np.ndarray, model: str, now_ts: float
) -> dict[str, Any]:
    """The whole stored document an upsert of ``item`` inserts when its ``_id`` is new (a re-sent memory keeps
    its ``created_at`` and any field it does not send again)."""
    key = memory_key(item)
    fields: dict[str, Any] = {
        "_id": keys.memory_object_id(memory_id, key),
        "memory_id": memory_id,
        "key": key,
        "content": item["content"],
        mongo.EMBEDDING_FIELD: to_bson(vector),
        "model": model,
        "importance": item.get("importance", 0.5),
        "updated_at": mongo.to_datetime(now_ts),
    }
    for name in (*mongo.ITEM_FIELDS_OUT, mongo.CONTEXT_FIELD):
        if name in item:
            fields[name] = item[name]
    fields["created_at"] = mongo.to_datetime(item.get("created_at", now_ts))
    return fields


def upsert(memory_type: str, writes: list[UpdateOne]) -> tuple[dict[str, Any], list[int]]:
    """One unordered bulk write: ``{"inserted", "updated", "failed"}``, and the positions in ``writes`` of those
    that inserted a new document (none after a partly failed batch). A partly failed batch is no exception: each
    failed write is ``{"index": its position, "reason": write_error_reason}`` (never the document nor the server's
    message; README, "Writes"). A write-concern error alone raises ``StoreUnavailable`` (the store is retried)."""
    try:
        with mongo.transient_errors():
            result = mongo.collection(memory_type).bulk_write(writes, ordered=False)
    except BulkWriteError as exc:
        details = exc.details or {}
        failed = [
            {"index": _as_int(error.get("index"), -1), "reason": write_error_reason(error)}
            for error in details.get("writeErrors") or []
        ]
        if not failed:
            raise StoreUnavailable("MongoDB did not confirm the write concern of the batch") from None
        counts = {
            "inserted": int(details.get("nUpserted") or 0),
            "updated": int(details.get("nMatched") or 0),
            "failed": sorted(failed, key=lambda entry: entry["index"]),
        }
        return counts, []
    counts = {"inserted": result.upserted_count, "updated": result.matched_count, "failed": []}
    return counts, sorted(result.upserted_ids)


def write_error_reason(error: Mapping[str, Any]) -> str:
    """A short reason for one failed write of a bulk write, from its code alone."""
    code = _as_int(error.get("code"), None)
    return "write error" if code is None else WRITE_ERROR_REASONS.get(code, f"write error {code}")


def _as_int(value: Any, default: int | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def delete(memory_id: str, memory_type: str, ids: Sequence[str] | None) -> int:
    query: dict[str, Any] = {"memory_id": memory_id}
    if ids is not None:
        query["_id"] = {"$in": [keys.memory_object_id(memory_id, key) for key in ids]}
    with mongo.transient_errors():
        return mongo.collection(memory_type).delete_many(query).deleted_count
