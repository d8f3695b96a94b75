"""The wire contract: every message a retrieval or an ingestion passes between processes, defined once.

| message          | sent by                  | received by        | built with            | checked on receipt       |
|------------------|--------------------------|--------------------|-----------------------|--------------------------|
| RetrievalRequest | the edge (memq.requests) | the canvas, merge  | ``retrieval_request`` | ``parse_merge_input``    |
| EmbedResult      | memq.embed_query         | each memq.search   | ``embed_result``      | ``parse_embed_result``   |
| SearchCall       | the canvas               | memq.search        | ``search_call``       | ``parse_search_call``    |
| SearchResult     | memq.search              | memq.merge (chord) | ``search_result``     | ``parse_merge_input``    |
| MergeInput       | the chord                | memq.merge         | (the chord)           | ``parse_merge_input``    |
| EmbeddedTexts    | memq.embed_texts         | memq.store         | ``embedded_texts``    | ``parse_embedded_texts`` |

User input is checked once, at the edge (``memq.requests`` with ``memq.validation``: the client, or the
``memq.retrieve`` / ``memq.remember`` tasks that ``send_task`` reaches). A step checks only the shape of what it
receives, here, with ``InvalidInput`` naming the field: a malformed message (a forged one, a broken worker) never
crashes a worker and is never ranked or written.

A request that asks ``memq.merge`` to cache its result carries the cache key the client's look-up built, the data
versions that key names and the client's TTL (``with_cache``); merge files the result under that key only if it is
the key of this request (its tenant and identity, ``memq.workers.result_store``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import numpy as np

from memq import validation
from memq.errors import InvalidInput
from memq.settings import SEARCH_STRATEGIES
from memq.validation import MAX_CACHE_TTL_S, MAX_CANDIDATES, is_finite_number
from memq.vectors import from_wire

MAX_DATA_VERSION = 2**63 - 1  # a Redis INCR counter
MAX_ERROR_CHARS = 500
EMBED_TIMING_FIELDS = ("embed_ms", "embed_started_ts", "embed_ended_ts")
SEARCH_TIMING_FIELDS = ("search_ms", "search_started_ts", *EMBED_TIMING_FIELDS)
MATRIX_CACHE_OUTCOMES = ("hit", "miss", "bypass", "n/a")  # memq.workers.search.SearchOutcome.matrix_cache


# -- the retrieval request ---------------------------------------------------------------------------------------


class RetrievalRequest(TypedDict):
    """A checked retrieval, as the edge builds it and the canvas and merge receive it (JSON-safe)."""

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
    cache_key: NotRequired[str]  # where merge caches the result: the key the client's look-up built
    cache_versions: NotRequired[list[int]]  # the data versions that key names, one per type in cache_types order
    cache_ttl_s: NotRequired[int]  # the client's TTL; merge caps it with its own


def with_cache(request: RetrievalRequest, cache_key: Any, cache_versions: Any, cache_ttl_s: Any) -> RetrievalRequest:
    """The request plus what ``memq.merge`` needs to cache its result: the key the client's look-up built, the data
    versions it names (one per requested type in ``cache_types`` order) and the client's TTL."""
    if not isinstance(cache_key, str) or not cache_key:
        raise InvalidInput("cache_key", "must be a result cache key")
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
    return {**request, "cache_key": cache_key, "cache_versions": list(cache_versions), "cache_ttl_s": cache_ttl_s}


def parse_retrieval_request(request: Any, default_strategy: str = "auto") -> RetrievalRequest:
    """A request as ``memq.merge`` receives it: each field of the right shape (``InvalidInput`` naming it);
    missing optional fields take their defaults. Cache fields are taken only with a ``cache_key`` (then all three
    must be sound); ``memq.workers.result_store`` files the result only under the key of this very request."""
    if not isinstance(request, dict):
        raise InvalidInput("request", "must be an object")
    query = request.get("query")
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query", "must be a non-empty string")
    limits = validation.check_limits(request.get("limits"))
    weights = validation.check_weights(request.get("weights"))
    strategy = request.get("strategy", default_strategy)
    if not isinstance(strategy, str) or strategy not in SEARCH_STRATEGIES:
        raise InvalidInput("strategy", f"must be one of {SEARCH_STRATEGIES}, got {validation.shown(strategy)}")
    parsed: RetrievalRequest = {
        "query": validation.check_utf8(query, "query"),
        "memory_id": validation.check_memory_id(request.get("memory_id")),
        "limits": limits,
        "weights": weights,
        "strategy": strategy,
        "mode": validation.check_mode(request.get("mode")),
        "filters": validation.check_filters(request.get("filters")),
        "candidates": _candidates(request.get("candidates"), limits),
        "timeout_s": _number_or(request, "timeout_s", 0.0),
        "requested_at": _number_or(request, "requested_at", 0.0),
        "deadline_ts": _number_or(request, "deadline_ts", 0.0),
    }
    if request.get("cache_key") is not None:  # without a key (an older client's versions) the result is not cached
        parsed = with_cache(parsed, request["cache_key"], request.get("cache_versions"), request.get("cache_ttl_s"))
    return parsed


def _number_or(message: dict[str, Any], name: str, default: float) -> float:
    """``message[name]`` as a float, ``default`` when it is missing or ``None``; anything but a finite number is
    ``InvalidInput`` naming it."""
    value = message.get(name)
    if value is None:
        return default
    if not is_finite_number(value):
        raise InvalidInput(name, f"must be a finite number, got {validation.shown(value)}")
    return float(value)


def _candidates(candidates: Any, limits: dict[str, int]) -> dict[str, int]:
    """How many candidates each requested type's search returns (missing: none said)."""
    if candidates is None:
        return {}
    if not isinstance(candidates, dict) or not set(candidates) <= set(limits):
        raise InvalidInput("candidates", "must map requested memory types to a number of candidates")
    return {memory_type: _candidate_count(memory_type, k) for memory_type, k in candidates.items()}


def _candidate_count(memory_type: str, k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CANDIDATES:
        raise InvalidInput(f"candidates.{memory_type}", f"must be an integer in 1..{MAX_CANDIDATES}")
    return k


# -- the embed step's result -------------------------------------------------------------------------------------


class EmbedResult(TypedDict):
    """``memq.embed_query``'s result, the first argument of every ``memq.search`` of the chord."""

    vector: str  # memq.vectors.to_wire
    model: str
    embed_ms: float
    embed_cache: str  # hit | miss
    embed_started_ts: float
    embed_ended_ts: float


def embed_result(
    vector: np.ndarray, model: str, embed_ms: float, cache: str, started_ts: float, ended_ts: float
) -> EmbedResult:
    from memq.vectors import to_wire

    return {
        "vector": to_wire(vector),
        "model": model,
        "embed_ms": embed_ms,
        "embed_cache": cache,
        "embed_started_ts": started_ts,
        "embed_ended_ts": ended_ts,
    }


def parse_embed_result(embedded: Any, dimensions: int) -> np.ndarray:
    """The query vector of an ``EmbedResult`` as ``memq.search`` receives it: ``dimensions`` finite values, else
    ``InvalidInput`` on ``embedded``; its other fields, which the search passes on to merge, each of their shape
    (``embedded.model`` a string, ``embedded.embed_ms`` a finite number...) else ``InvalidInput`` naming it."""
    if not isinstance(embedded, dict) or not isinstance(embedded.get("vector"), str):
        raise InvalidInput("embedded", "must be the embed step's result, with a base64 'vector'")
    if embedded.get("model") is not None and not isinstance(embedded["model"], str):
        raise InvalidInput("embedded.model", "must be a string")
    if embedded.get("embed_cache") not in (None, "hit", "miss"):
        raise InvalidInput("embedded.embed_cache", "must be 'hit' or 'miss'")
    for name in EMBED_TIMING_FIELDS:
        if embedded.get(name) is not None and not is_finite_number(embedded[name]):
            raise InvalidInput(f"embedded.{name}", "must be a finite number")
    try:
        vector = from_wire(embedded["vector"])
    except (TypeError, ValueError) as exc:
        raise InvalidInput("embedded", "its 'vector' is not base64 float32") from exc
    if vector.shape != (dimensions,) or not np.isfinite(vector).all():
        raise InvalidInput("embedded", f"its 'vector' must hold {dimensions} finite values")
    return vector


def embed_timings(embedded: Any) -> dict[str, Any]:
    """The embed step's timings, which each search passes on so that merge sees them (none from a malformed one)."""
    if not isinstance(embedded, dict):
        return {}
    return {key: embedded.get(key) for key in EMBED_TIMING_FIELDS}


# -- one type's search -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchCall:
    """What one ``memq.search`` is asked (its arguments after the ``EmbedResult``), checked on receipt."""

    memory_id: str
    memory_type: str
    k: int
    strategy: str
    query: str | None
    mode: str
    filters: dict[str, Any]
    deadline_ts: float | None  # the caller's deadline (wall clock); None: none


def search_call(request: RetrievalRequest, memory_type: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` of ``memq.search`` for one type of ``request`` (after the ``EmbedResult``)."""
    args = (request["memory_id"], memory_type, request["candidates"][memory_type])
    kwargs = {
        "strategy": request["strategy"],
        "deadline_ts": request["deadline_ts"],
        "query": request["query"],
        "mode": request["mode"],
        "filters": request["filters"],
    }
    return args, kwargs


def parse_search_call(
    memory_id: Any,
    memory_type: Any,
    k: Any,
    strategy: Any,
    query: Any,
    mode: Any,
    filters: Any,
    max_query_chars: int,
    deadline_ts: Any = None,
) -> SearchCall:
    """What ``memq.search`` was asked, every argument after the ``EmbedResult`` of its shape, else
    ``InvalidInput`` naming it (the ``EmbedResult`` is ``parse_embed_result``'s)."""
    if not isinstance(strategy, str) or strategy not in SEARCH_STRATEGIES:
        raise InvalidInput("strategy", f"must be one of {SEARCH_STRATEGIES}, got {validation.shown(strategy)}")
    call = SearchCall(
        memory_id=validation.check_memory_id(memory_id),
        memory_type=validation.check_memory_type(memory_type).value,
        k=validation.check_search_k(k),
        strategy=strategy,
        query=None if query is None else validation.check_query(query, max_query_chars),
        mode=validation.check_mode(mode),
        filters=validation.check_filters(filters),
        deadline_ts=None if deadline_ts is None else _number_or({"deadline_ts": deadline_ts}, "deadline_ts", 0.0),
    )
    if call.mode != "vector" and call.query is None:
        raise InvalidInput("query", f"is needed for mode {call.mode!r}")
    return call


class SearchResult(TypedDict):
    """One type's candidates (or its ``error``), a member of the chord's header, with the embed step's timings."""

    type: str
    items: list[dict[str, Any]]
    strategy: NotRequired[str]
    matrix_cache: NotRequired[str | None]
    search_ms: NotRequired[float]
    search_started_ts: NotRequired[float]
    model: NotRequired[str | None]
    served_by: NotRequired[str]
    error: NotRequired[str]
    embed_ms: NotRequired[float | None]
    embed_started_ts: NotRequired[float | None]
    embed_ended_ts: NotRequired[float | None]


def search_result(
    memory_type: str,
    items: list[dict[str, Any]],
    strategy: str,
    matrix_cache: str | None,
    search_ms: float,
    started_ts: float,
    embedded: Any,
) -> SearchResult:
    return {
        "type": memory_type,
        "items": items,
        "strategy": strategy,
        "matrix_cache": matrix_cache,
        "search_ms": search_ms,
        "search_started_ts": started_ts,
        "model": embedded.get("model") if isinstance(embedded, dict) else None,
        **embed_timings(embedded),  # type: ignore[typeddict-item]
    }


def search_failure(memory_type: str, message: str, embedded: Any = None, served_by: str | None = None) -> SearchResult:
    failed: SearchResult = {"type": memory_type, "items": [], "error": message, **embed_timings(embedded)}  # type: ignore[typeddict-item]
    if served_by is not None:
        failed["served_by"] = served_by
    return failed


# -- merge -------------------------------------------------------------------------------------------------------


class MergeInput(TypedDict):
    """What ``memq.merge`` ranks: the request, the well-formed search results of its types, and why any type
    has none (a malformed result or item, named under its type)."""

    request: RetrievalRequest
    results: list[SearchResult]
    errors: dict[str, str]


def parse_merge_input(results: Any, request: Any, default_strategy: str = "auto") -> MergeInput:
    """The chord's results and the request, as merge may rank them. A malformed result is left out and its type
    reported under ``errors``; so is a malformed item, alone (the type's other items are kept, and the type is
    reported); a result naming no requested type is dropped; a malformed list or request is ``InvalidInput``."""
    parsed = parse_retrieval_request(request, default_strategy)
    if not isinstance(results, list | tuple):
        raise InvalidInput("results", "must be a list of search results")
    limits = parsed["limits"]
    kept: list[SearchResult] = []
    errors: dict[str, str] = {}
    for result in results:
        memory_type = result.get("type") if isinstance(result, dict) else None
        if not isinstance(memory_type, str) or memory_type not in limits:
            continue  # names no requested type: nothing to report it under
        problem = _search_result_problem(result)
        if problem is not None:
            errors[memory_type] = f"malformed search result: {problem}"
            continue
        if "items" in result:
            items = [item for item in result["items"] if item_problem(item) is None]
            if len(items) < len(result["items"]):
                dropped = len(result["items"]) - len(items)
                errors[memory_type] = f"malformed search result: {dropped} malformed item(s) left out"
                result = {**result, "items": items}
        kept.append(result)
    return {"request": parsed, "results": kept, "errors": errors}


def _search_result_problem(result: dict[str, Any]) -> str | None:
    for name in SEARCH_TIMING_FIELDS:
        if result.get(name) is not None and not is_finite_number(result[name]):
            return f"{name} is not a finite number"
    for name in ("strategy", "model", "served_by"):
        if result.get(name) is not None and not isinstance(result[name], str):
            return f"{name} is not a string"
    if result.get("matrix_cache") not in (None, *MATRIX_CACHE_OUTCOMES):
        return f"matrix_cache is not one of {MATRIX_CACHE_OUTCOMES}"
    if "error" in result:
        return None if isinstance(result["error"], str) else "error is not a string"
    items = result.get("items")
    if not isinstance(items, list) or len(items) > MAX_CANDIDATES:
        return f"items is not a list of at most {MAX_CANDIDATES}"
    if result.get("search_started_ts") is not None and result.get("search_ms") is None:
        return "search_started_ts without search_ms"
    return None


def item_problem(item: Any) -> str | None:
    """Why one search result item cannot be ranked or returned, or ``None``."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("content"), str):
        return "an item is not an object with string id and content"
    if not is_finite_number(item.get("score")):
        return "an item's score is not a finite number"
    importance = item.get("importance", 0.5)
    if not is_finite_number(importance) or not 0 <= importance <= 1:
        return "an item's importance is not in 0..1"
    if item.get("created_at_ts") is not None and not is_finite_number(item["created_at_ts"]):
        return "an item's created_at_ts is not a finite number"
    scores = item.get("scores", {})
    if not isinstance(scores, dict) or any(v is not None and not is_finite_number(v) for v in scores.values()):
        return "an item's scores are not finite numbers"
    return None


# -- ingestion: the bulk embedding that memq.store writes ---------------------------------------------------------


class EmbeddedTexts(TypedDict):
    """``memq.embed_texts``'s result, the first argument of ``memq.store``."""

    vectors: list[str]  # memq.vectors.to_wire, one per text, in order
    model: str
    embed_ms: float
    embedding_cache: dict[str, int]  # hits, computed


def embedded_texts(vectors: list[np.ndarray], model: str, embed_ms: float, hits: int, computed: int) -> EmbeddedTexts:
    from memq.vectors import to_wire

    return {
        "vectors": [to_wire(vector) for vector in vectors],
        "model": model,
        "embed_ms": embed_ms,
        "embedding_cache": {"hits": hits, "computed": computed},
    }


def parse_embedded_texts(embedded: Any, count: int, dimensions: int, model: str) -> np.ndarray:
    """What ``memq.store`` is asked to write: ``{"vectors": [one base64 float32 vector per item], "model": name}``,
    each vector of exactly ``dimensions`` finite values, ``model`` the embed model's name. Returns the
    ``(count, dimensions)`` float32 matrix; anything else is ``InvalidInput`` naming the field
    (``embedded.vectors[3]``), so that nothing is written."""
    if not isinstance(embedded, Mapping):
        raise InvalidInput("embedded", "must be an object with 'vectors' and 'model'")
    vectors = embedded.get("vectors")
    if not isinstance(vectors, list | tuple) or len(vectors) != count:
        raise InvalidInput("embedded.vectors", f"must be a list of one vector per item ({count})")
    found = embedded.get("model")
    if type(found) is not str:
        raise InvalidInput("embedded.model", f"must be a string, got {type(found).__name__}")
    if found != model:
        raise InvalidInput("embedded.model", f"must be the embed model {model!r} (MEMQ_EMBED_MODEL)")
    wire_chars = 4 * -(-4 * dimensions // 3)  # base64 of dimensions float32 values
    matrix = np.empty((count, dimensions), dtype=np.float32)
    for index, text in enumerate(vectors):
        where = f"embedded.vectors[{index}]"
        if not isinstance(text, str) or len(text) > 2 * wire_chars:
            raise InvalidInput(where, f"must be base64 text of {dimensions} float32 values")
        try:
            vector = from_wire(text)
        except ValueError:  # not base64 (binascii.Error), not ASCII, or not a whole number of float32
            raise InvalidInput(where, f"must be base64 text of {dimensions} float32 values") from None
        if vector.shape != (dimensions,):
            raise InvalidInput(where, f"has {vector.size} values; the embed model has {dimensions} dimensions")
        if not np.isfinite(vector).all():
            raise InvalidInput(where, "must hold finite values only (no NaN or infinity)")
        matrix[index] = vector
    return matrix
