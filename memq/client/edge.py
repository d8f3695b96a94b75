"""The edge: the caller's arguments read as the messages of ``memq.core.wire`` (each field by its one rule), by the
client before anything is sent, or by the ``memq.retrieve`` / ``memq.remember`` / ``memq.forget`` tasks that
``send_task`` reaches; and what names a retrieval's cached result (``cache_identity``)."""

from __future__ import annotations

import time
from typing import Any

from memq.core import deadlines, field_rules, keys
from memq.core.settings import Settings
from memq.core.wire import (
    FORGET_REQUEST,
    REMEMBER_REQUEST,
    ForgetRequest,
    RememberRequest,
    RetrievalRequest,
    parse,
    parse_retrieval_request,
)

RESULT_FORMAT = 4  # bump when the result's or its cache envelope's shape changes: old entries are then never read


def retrieval_request(
    settings: Settings,
    query: Any,
    memory_id: Any,
    limits: Any,
    weights: Any = None,
    timeout_s: Any = None,
    strategy: Any = None,
    mode: Any = None,
    filters: Any = None,
) -> RetrievalRequest:
    """A new retrieval: its deadline is ``timeout_s`` (``None``: ``MEMQ_RETRIEVE_TIMEOUT_S``) from now."""
    arguments = {"query": query, "memory_id": memory_id, "limits": limits, "weights": weights}
    options = {"timeout_s": timeout_s, "strategy": strategy, "mode": mode, "filters": filters}
    return parse_retrieval_request({**arguments, **options}, settings)


def cache_identity(settings: Settings, request: RetrievalRequest) -> dict[str, Any]:
    """Everything that decides a retrieval's result, apart from the tenant's data versions (and the
    clock, through recency, which moves little within a cache TTL). ``timeout_s`` is not in it."""
    return {
        "format": RESULT_FORMAT,
        "query": " ".join(request["query"].split()),  # its text form (check_query), whitespace runs as one space
        "memory_id": request["memory_id"],
        "limits": sorted(request["limits"].items()),
        "weights": sorted(request["weights"].items()),
        "strategy": request["strategy"],
        "mode": request["mode"],
        "filters": sorted(request["filters"].items()),
        "model": settings.embed_model,
        "recency_half_life_s": settings.recency_half_life_s,
        "vector_index": settings.vector_index,
        "text_index": settings.text_index,
    }


def cache_fingerprint(settings: Settings, request: RetrievalRequest) -> str:
    return keys.fingerprint(cache_identity(settings, request))


def cache_types(request: RetrievalRequest) -> list[str]:
    """The requested types in the order their data versions appear in a result key (sorted, so that the
    order of ``limits`` cannot make two different sets of versions name one key)."""
    return sorted(request["limits"])


def remember_request(
    settings: Settings, memory_id: Any, memory_type: Any, items: Any, timeout_s: Any = None
) -> RememberRequest:
    """New memories: their deadline is ``timeout_s`` (``None``: ``deadlines.INGEST_TIMEOUT_S``) from now."""
    deadline_ts = time.time() + field_rules.check_timeout(timeout_s, deadlines.INGEST_TIMEOUT_S)
    request = {"memory_id": memory_id, "memory_type": memory_type, "items": items, "deadline_ts": deadline_ts}
    return parse(REMEMBER_REQUEST, request, settings)


def forget_request(memory_id: Any, memory_type: Any = None, ids: Any = None, timeout_s: Any = None) -> ForgetRequest:
    """A forget: its deadline is ``timeout_s`` (``None``: ``deadlines.FORGET_TIMEOUT_S``) from now."""
    deadline_ts = time.time() + field_rules.check_timeout(timeout_s, deadlines.FORGET_TIMEOUT_S)
    request = {"memory_id": memory_id, "memory_type": memory_type, "ids": ids, "deadline_ts": deadline_ts}
    return parse(FORGET_REQUEST, request)
