"""Checked, JSON-safe request payloads, built once in the client and checked again in the tasks."""

from __future__ import annotations

import time
import unicodedata
from typing import Any, NotRequired, TypedDict

from memq import keys, validation
from memq.errors import InvalidInput
from memq.ranking import candidates_for
from memq.settings import SEARCH_STRATEGIES, Settings
from memq.validation import MAX_CACHE_TTL_S

RESULT_FORMAT = 3  # bump when the result's or its cache envelope's shape changes: old entries are then never read
MAX_DATA_VERSION = 2**63 - 1  # a Redis INCR counter


class RetrievalRequest(TypedDict):
    """A checked retrieval, as the client builds it and the canvas and merge receive it (JSON-safe)."""

    query: str
    memory_id: str
    limits: dict[str, int]  # memory type -> k
    weights: dict[str, float]  # relevance, recency, importance
    strategy: str  # auto | exact | vector_search
    mode: str  # hybrid | vector | lexical
    filters: dict[str, Any]  # see memq.validation.check_filters
    candidates: dict[str, int]  # memory type -> how many candidates its search returns
    timeout_s: float
    requested_at: float
    deadline_ts: float
    cache_versions: NotRequired[list[int]]  # the data versions the client read (see cache_types): cache the result
    cache_ttl_s: NotRequired[int]  # the client's TTL; memq.merge caps it with its own


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


def recheck_retrieval_request(settings: Settings, request: Any) -> RetrievalRequest:
    """A worker's second look at a request that arrived over the wire."""
    if not isinstance(request, dict):
        raise InvalidInput("request", "must be an object")
    checked = retrieval_request(
        settings,
        request.get("query"),
        request.get("memory_id"),
        request.get("limits"),
        request.get("weights"),
        request.get("timeout_s"),
        request.get("strategy"),
        request.get("mode"),
        request.get("filters"),
    )
    for field in ("requested_at", "deadline_ts"):
        if isinstance(request.get(field), int | float):
            checked[field] = float(request[field])
    if request.get("cache_versions") is not None:  # a ``cache_key`` (older clients) is never taken: not cached
        checked = with_cache(checked, request["cache_versions"], request.get("cache_ttl_s"))
    return checked


def normalise_query(query: str) -> str:
    """The query as the result cache sees it: Unicode NFC, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFC", query).split())


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


def cache_key_of(settings: Settings, request: RetrievalRequest) -> str:
    """Where the result of a request carrying ``cache_versions`` is cached: its fingerprint with these
    settings and the data versions the client read. Derived, never taken from a message."""
    versions = ".".join(str(version) for version in request["cache_versions"])
    return keys.result_cache(f"{cache_fingerprint(settings, request)}:{versions}")


def with_cache(request: RetrievalRequest, cache_versions: Any, cache_ttl_s: Any) -> RetrievalRequest:
    """The request plus what ``memq.merge`` needs to cache its result: the data versions the client read, one
    per requested type in ``cache_types`` order, and the client's TTL. The message names no key: merge derives
    it (``cache_key_of``) with its own settings, so a request can only fill its own tenant's entries, and a
    client whose settings differ from the workers' (another model name) only misses."""
    if (
        not isinstance(cache_versions, list)
        or len(cache_versions) != len(request["limits"])
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DATA_VERSION for v in cache_versions
        )
    ):
        raise InvalidInput(
            "cache_versions", f"must be a list of one data version (0..{MAX_DATA_VERSION}) per requested memory type"
        )
    if isinstance(cache_ttl_s, bool) or not isinstance(cache_ttl_s, int) or not 1 <= cache_ttl_s <= MAX_CACHE_TTL_S:
        raise InvalidInput("cache_ttl_s", f"must be an integer number of seconds in 1..{MAX_CACHE_TTL_S}")
    return {**request, "cache_versions": list(cache_versions), "cache_ttl_s": cache_ttl_s}


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
