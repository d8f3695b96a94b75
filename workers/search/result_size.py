"""The byte budget of one retrieval's result (``MAX_RESULT_BYTES``), applied by merge after ranking.

An item's size is its ``content`` in UTF-8 plus its ``metadata`` as JSON. Items are taken rank by rank across the
types (each type's best, then each one's second, ...) until one does not fit: it and all ranked after it are dropped,
so each type keeps a prefix of its ranking. The result says so (``"truncated"``, ``"truncated_items"`` per type).
"""

from __future__ import annotations

import json
from typing import Any

#: Bytes of items one retrieval returns (contents in UTF-8, metadata as JSON): the merged result travels through the
#: result backend and the caller's memory, so it stays well under Redis's 512 MB value while no sane k reaches it.
MAX_RESULT_BYTES = 8 * 1024 * 1024


def item_bytes(item: dict[str, Any]) -> int:
    size = len(str(item.get("content", "")).encode("utf-8", "replace"))
    if item.get("metadata") is not None:
        size += len(json.dumps(item["metadata"], default=str).encode("utf-8", "replace"))
    return size


def bound_result_bytes(merged: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``merged`` with ``results`` cut to ``max_bytes`` as described above, and ``truncated`` set."""
    results: dict[str, list[dict[str, Any]]] = merged["results"]
    kept = {memory_type: 0 for memory_type in results}
    total_bytes = 0
    deepest = max((len(items) for items in results.values()), default=0)
    full = False
    for rank in range(deepest):
        for memory_type, items in results.items():
            if rank >= len(items):
                continue
            size = item_bytes(items[rank])
            if total_bytes + size > max_bytes:
                full = True
                break
            total_bytes += size
            kept[memory_type] += 1
        if full:
            break
    dropped = {memory_type: len(items) - kept[memory_type] for memory_type, items in results.items()}
    if not any(dropped.values()):
        return {**merged, "truncated": False}
    cut = {memory_type: items[: kept[memory_type]] for memory_type, items in results.items()}
    counts = {memory_type: count for memory_type, count in dropped.items() if count}
    return {**merged, "results": cut, "truncated": True, "truncated_items": counts}
