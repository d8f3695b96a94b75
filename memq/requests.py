"""The edge: user input checked once (``memq.validation``) into the JSON-safe requests of ``memq.wire``, by the
client before anything is sent, or by the ``memq.retrieve`` / ``memq.remember`` / ``memq.forget`` tasks that
``send_task`` reaches; and what names a retrieval's cached result (``cache_identity``)."""

from __future__ import annotations

import time
from typing import Any

from memq import keys, validation
from memq.errors import InvalidInput
from memq.ranking import candidates_for
from memq.settings import SEARCH_STRATEGIES, Settings
from memq.wire import RetrievalRequest

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
    checked_query = validation.check_query(query, settings.max_query_chars)
    checked_memory_id = validation.check_memory_id(memory_id)
    checked_limits = validation.check_limits(limits)
    checked_weights = validation.check_weights(weights)
    checked_timeout_s = validation.check_timeout(settings.retrieve_timeout_s if timeout_s is None else timeout_s)
    chosen_strategy = settings.search_strategy if strategy is None else strategy
    if chosen_strategy not in SEARCH_STRATEGIES:
        raise InvalidInput("strategy", f"must be one of {SEARCH_STRATEGIES}, got {chosen_strategy!r}")
    now = time.time()
    return {
        "query": checked_query,
        "memory_id": checked_memory_id,
        "limits": checked_limits,
        "weights": checked_weights,
        "strategy": chosen_strategy,
        "mode": validation.check_mode(mode),
        "filters": validation.check_filters(filters),
        "candidates": {
            t: candidates_for(k, checked_weights, settings.candidate_oversample) for t, k in checked_limits.items()
        },
        "timeout_s": checked_timeout_s,
        "requested_at": now,
        "deadline_ts": now + checked_timeout_s,
    }


def normalise_query(query: str) -> str:
    """The query as the result cache sees it: its text form (as the edge already made it, ``check_query``), runs of
    whitespace as one space."""
    return " ".join(validation.text_form(query).split())


def cache_identity(settings: Settings, request: RetrievalRequest) -> dict[str, Any]:
    """Everything that decides a retrieval's result, apart from the tenant's data versions (and the
    clock, through recency, which moves little within a cache TTL). ``timeout_s`` is not in it."""
    return {
        "format": RESULT_FORMAT,
        "query": normalise_query(request["query"]),
        "memory_id": request["memory_id"],
        "limits": sorted(request["limits"].items()),
        "weights": sorted(request["weights"].items()),
        "strategy": request["strategy"],
        "mode": request["mode"],
        "filters": sorted(request["filters"].items()),
        "model": settings.embed_model,
        "candidate_oversample": settings.candidate_oversample,
        "num_candidates_factor": settings.num_candidates_factor,
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


def remember_request(settings: Settings, memory_id: Any, memory_type: Any, items: Any) -> dict[str, Any]:
    return {
        "memory_id": validation.check_memory_id(memory_id),
        "memory_type": validation.check_memory_type(memory_type).value,
        "items": validation.check_items(items, settings.max_batch_items, settings.max_content_chars),
    }


def forget_request(memory_id: Any, memory_type: Any = None, ids: Any = None) -> dict[str, Any]:
    return {
        "memory_id": validation.check_memory_id(memory_id),
        "memory_type": None if memory_type is None else validation.check_memory_type(memory_type).value,
        "ids": validation.check_ids(ids),
    }
