"""Is an Atlas Search / Vector Search index there and queryable? Checked beside the stage probe, because
``$vectorSearch`` without its index (missing or building) returns nothing and no error. Looked up with
``list_search_indexes`` every ``INDEX_STATE_TTL_S``: ``ready``; ``building`` (``auto`` searches exactly meanwhile, an
explicit ``vector_search`` gets an error); ``missing`` / ``failed`` (``IndexNotReady`` naming ``memq indexes``);
``unknown`` (the server cannot list search indexes: mongod, nx-27017; nothing changes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pymongo.errors import OperationFailure, PyMongoError

from memq.errors import IndexNotReady
from memq.workers.storage.mongo import collection

log = logging.getLogger(__name__)

IndexState = Literal["ready", "building", "missing", "failed", "unknown"]
INDEX_STATE_TTL_S = 30.0
BUILDING_STATUSES = frozenset({"PENDING", "BUILDING"})
FAILED_STATUSES = frozenset({"FAILED"})
GONE_STATUSES = frozenset({"DOES_NOT_EXIST", "DELETING"})

_states: dict[tuple[str, str], tuple[IndexState, float]] = {}


def state_from_documents(documents: Iterable[Mapping[str, Any]], name: str) -> IndexState:
    """The state of index ``name`` from ``list_search_indexes`` documents (``name``, ``status``, ``queryable``)."""
    found = next((doc for doc in documents if doc.get("name") == name), None)
    if found is None:
        return "missing"
    status = str(found.get("status", "")).upper()
    if found.get("queryable") is True:
        return "ready"
    if status in GONE_STATUSES:
        return "missing"
    if status in FAILED_STATUSES:
        return "failed"
    if status == "READY":  # older servers report no ``queryable`` field
        return "ready" if "queryable" not in found else "building"
    return "building" if status in BUILDING_STATUSES or not status else "failed"


def index_state(memory_type: str, name: str) -> IndexState:
    """This collection's index ``name``, remembered for ``INDEX_STATE_TTL_S``."""
    key = (memory_type, name)
    cached = _states.get(key)
    now = time.monotonic()
    if cached is not None and now - cached[1] < INDEX_STATE_TTL_S:
        return cached[0]
    state = _look_up(memory_type, name)
    _states[key] = (state, now)
    return state


def _look_up(memory_type: str, name: str) -> IndexState:
    try:
        return state_from_documents(collection(memory_type).list_search_indexes(name), name)
    except OperationFailure as exc:
        log.info("cannot list search indexes on %s (%s)", memory_type, str(exc).splitlines()[0][:160])
        return "unknown"
    except PyMongoError as exc:  # the server did not answer: say nothing new, check again next time
        log.warning("search index look-up on %s failed: %s", memory_type, exc)
        return "unknown"


def require_ready(memory_type: str, name: str, kind: str) -> IndexState:
    """The index's state; raises ``IndexNotReady`` when it is missing or failed."""
    state = index_state(memory_type, name)
    if state in ("missing", "failed"):
        raise IndexNotReady(
            f"the {kind} index {name!r} on {memory_type} is {state}: run `memq indexes` and wait until "
            "`memq status` shows it ready"
        )
    return state
