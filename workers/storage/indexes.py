"""Index administration: memq's MongoDB indexes and its Atlas Search / Vector Search index definitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import OperationFailure, PyMongoError

from memq.core.memory_types import ROLE_TYPES, MemoryType
from memq.core.settings import get_settings
from memq.workers.storage.mongo import CONTEXT_FIELD, EMBEDDING_FIELD, collection, mongo_client

FILTER_PATHS = ("tags", "created_at", "role")  # what retrieval filters on, besides memory_id


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
