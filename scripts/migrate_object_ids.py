"""One-off: move memories stored under an older ``_id`` format to the current one (``memq.core.keys.OBJECT_ID_FORMAT``).

    python scripts/migrate_object_ids.py [--dry-run] [--type long_term_memory ...]

It reads ``MEMQ_MONGODB_URI`` and ``MEMQ_MONGODB_DB`` like the workers. MongoDB cannot change a document's
``_id``, so every document whose ``_id`` is not ``memory_object_id(memory_id, key)`` is inserted again under that
``_id`` and the old copy deleted. Safe to interrupt and to run again; run it while nothing writes memories (stop the
ingest workers): a memory re-sent meanwhile already has its new ``_id``, and that newer copy wins over the old one.
Afterwards the data version of every (tenant, type) it moved is bumped (``MEMQ_REDIS_URL``), so no search worker keeps a
matrix it loaded mid-move, with both copies in it. Documents without a string ``memory_id`` and ``key`` (not written by
memq) are left alone and counted as ``skipped``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Sequence
from typing import Any

from memq.core.keys import memory_object_id
from memq.core.memory_types import MemoryType


def migrate(database: Any, collections: Sequence[str] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """``{collection: {"moved", "current", "skipped"}}`` for each memory type's collection in ``database``."""
    from pymongo.errors import DuplicateKeyError

    from memq.workers.storage.versions import bump_versions

    report: dict[str, Any] = {}
    for name in collections or [t.value for t in MemoryType]:
        collection = database[name]
        counts = {"moved": 0, "current": 0, "skipped": 0}
        moved_tenants: set[str] = set()
        try:
            # Listed first, so that the copies inserted below are not read again by the same cursor.
            for doc in list(collection.find({}, {"_id": 1, "memory_id": 1, "key": 1})):
                memory_id, key = doc.get("memory_id"), doc.get("key")
                if not isinstance(memory_id, str) or not isinstance(key, str):
                    counts["skipped"] += 1
                    continue
                new_id = memory_object_id(memory_id, key)
                if doc["_id"] == new_id:
                    counts["current"] += 1
                    continue
                counts["moved"] += 1
                if dry_run:
                    continue
                full = collection.find_one({"_id": doc["_id"]})
                if full is None:  # deleted meanwhile
                    continue
                # Written again under the new _id since: that copy is newer.
                with contextlib.suppress(DuplicateKeyError):
                    collection.insert_one({**full, "_id": new_id})
                collection.delete_one({"_id": doc["_id"]})
                moved_tenants.add(memory_id)
        finally:  # a search worker that loaded a tenant mid-move holds both copies: reload it, even after a failure
            for memory_id in moved_tenants:
                bump_versions(memory_id, [name])
        report[name] = counts
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import pymongo

    from memq.core.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="count what would move; change nothing")
    parser.add_argument("--type", action="append", dest="types", help="a memory type's collection (default: all)")
    args = parser.parse_args(argv)
    settings = get_settings()
    client = pymongo.MongoClient(settings.mongodb_uri, tz_aware=True)
    try:
        types = [MemoryType(t).value for t in args.types] if args.types else None
        print(json.dumps(migrate(client[settings.mongodb_db], types, args.dry_run)))
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
