"""The wire contract: every message a retrieval or an ingestion passes between processes, defined once.

Each message is one model: a ``TypedDict`` whose fields carry their rule (``memq.core.field_rules``), read by
``parse`` at the edge (``memq.client.edge``) and again on receipt. A malformed field is ``InvalidInput`` naming it:
a forged message or a broken worker never crashes a worker and is never ranked or written.

| message          | sent by                  | received by          | model (read by ``parse``)  | built with         |
|------------------|--------------------------|----------------------|----------------------------|---------------------|
| RetrievalRequest | the edge                 | the canvas, merge    | ``RETRIEVAL_REQUEST``      | retrieval_request  |
| EmbedQuery       | the canvas               | memq.embed_query     | ``EMBED_QUERY``            | retrieval_canvas   |
| EmbedResult      | memq.embed_query         | each memq.search     | ``EMBED_RESULT``           | embed_result       |
| SearchCall       | the canvas               | memq.search          | ``SEARCH_CALL``            | search_call        |
| SearchResult     | memq.search              | memq.merge (chord)   | ``SEARCH_RESULT``          | search_result      |
| RememberRequest  | the edge                 | memq.remember, store | ``REMEMBER_REQUEST``       | remember_request   |
| EmbedTexts       | the ingest canvas        | memq.embed_texts     | ``EMBED_TEXTS``            | remember_canvas    |
| EmbeddedTexts    | memq.embed_texts         | memq.store           | ``parse_embedded_texts``   | embedded_texts     |
| ForgetRequest    | the edge                 | memq.forget          | ``FORGET_REQUEST``         | forget_request     |
"""

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NotRequired, TypeVar

import numpy as np
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    with_config,
)
from typing_extensions import TypedDict  # pydantic reads a TypedDict of typing_extensions before Python 3.12

from memq.core import field_rules
from memq.core.field_rules import MAX_CACHE_TTL_S, MAX_CANDIDATES, is_finite_number
from memq.core.ranking import candidates_for
from memq.core.settings import SearchStrategy, Settings, get_settings
from memq.core.vectors import from_wire, to_wire
from memq.errors import InvalidInput

MAX_DATA_VERSION = 2**63 - 1  # a Redis INCR counter
MAX_ERROR_CHARS = 500
Message = TypeVar("Message")


# -- reading a message: one model, at the edge and on receipt ------------------------------------------------------


def parse(model: TypeAdapter[Message], message: Any, settings: Settings | None = None, where: str = "") -> Message:
    """``message`` as ``model`` defines it, at the edge and on receipt alike, else the ``InvalidInput`` of the first
    bad field (under ``where``: ``embedded.model``)."""
    try:
        return model.validate_python(message, context=settings or get_settings())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        error = first.get("ctx", {}).get("error")
        if isinstance(error, InvalidInput):
            field, message = error.field, error.message
        else:  # a type pydantic checks itself: named by its field, with pydantic's words
            field = ".".join(part for part in first["loc"] if isinstance(part, str))  # candidates.semantic
            message = "is required" if first["type"] == "missing" else first["msg"]
        raise InvalidInput(".".join(filter(None, (where, field))) or "message", message) from None


def _settings(info: ValidationInfo) -> Settings:
    return info.context if isinstance(info.context, Settings) else get_settings()


def _rule(check: Any, optional: bool = False) -> PlainValidator:
    """A field checked by ``check(value)``; ``optional``: ``None`` too, as it is."""
    return PlainValidator(lambda value: None if optional and value is None else check(value))


def _type_value(memory_type: Any) -> str:
    return field_rules.check_memory_type(memory_type).value


Text = Annotated[str, Strict()]
OptionalText = Annotated[str | None, Strict()]
Seconds = Annotated[float | None, Strict(), AllowInfNan(False)]  # Unix seconds or a duration; None: not said


Query = Annotated[str, _rule(field_rules.check_query)]
MemoryId = Annotated[str, _rule(field_rules.check_memory_id)]
TypeName = Annotated[str, _rule(_type_value)]
ModeName = Literal["hybrid", "vector", "lexical"]  # hybrid: lexical and vector relevance fused (memq.core.ranking)
Mode = Annotated[ModeName, BeforeValidator(lambda mode: field_rules.DEFAULT_MODE if mode is None else mode)]
Filters = Annotated[dict[str, Any], _rule(field_rules.check_filters)]
Candidates = Annotated[int, Strict(), Field(ge=1, le=MAX_CANDIDATES)]  # what one type's search returns


# -- the retrieval request ---------------------------------------------------------------------------------------


class RetrievalRequest(TypedDict):
    """A checked retrieval, as the edge builds it and the canvas and merge receive it (JSON-safe)."""

    query: Query
    memory_id: MemoryId
    limits: Annotated[dict[str, int], _rule(field_rules.check_limits)]  # memory type -> k
    weights: Annotated[dict[str, float], _rule(field_rules.check_weights)]  # relevance, recency, importance
    strategy: SearchStrategy  # auto | exact | vector_search
    mode: Mode  # hybrid | vector | lexical
    filters: Filters  # see memq.core.field_rules.check_filters
    candidates: dict[str, Candidates] | None  # how many each type's search returns
    timeout_s: Annotated[
        float, PlainValidator(lambda value, info: field_rules.check_timeout(value, _settings(info).retrieve_timeout_s))
    ]
    requested_at: Seconds  # when the edge made it (Unix seconds; derived when not said)
    deadline_ts: Seconds  # when the caller stops waiting (Unix seconds; derived when not said)
    cache_key: NotRequired[Annotated[str, Strict(), Field(min_length=1)]]  # where merge caches the result
    cache_versions: NotRequired[list[Annotated[int, Strict(), Field(ge=0, le=MAX_DATA_VERSION)]]]  # one per type
    cache_ttl_s: NotRequired[Annotated[int, Strict(), Field(ge=1, le=MAX_CACHE_TTL_S)]]


OPTIONAL_FIELDS = ("weights", "strategy", "mode", "filters", "candidates", "timeout_s", "requested_at", "deadline_ts")
CACHE_FIELDS = ("cache_key", "cache_versions", "cache_ttl_s")


def _with_defaults(request: Any, info: ValidationInfo) -> Any:
    """Optional fields left out take their defaults (each rule's ``None``; the strategy ``MEMQ_SEARCH_STRATEGY``);
    cache fields count only with a key."""
    if not isinstance(request, Mapping):
        raise InvalidInput("request", "must be an object")
    if request.get("cache_key") is None:  # without a key (an older client's versions) the result is not cached
        request = {name: value for name, value in request.items() if name not in CACHE_FIELDS}
    filled = {**dict.fromkeys(OPTIONAL_FIELDS), **request}
    return {**filled, "strategy": _settings(info).search_strategy if filled["strategy"] is None else filled["strategy"]}


def _derived(request: RetrievalRequest, info: ValidationInfo) -> RetrievalRequest:
    """What follows from the checked fields: the candidates each type's search returns, when the request was made
    and its deadline; a cache key's versions, one per requested type."""
    if not set(request["candidates"] or ()) <= set(request["limits"]):
        raise InvalidInput("candidates", "must map requested memory types to a number of candidates")
    if "cache_key" in request and len(request["cache_versions"]) != len(request["limits"]):
        raise InvalidInput("cache_versions", "must name one data version per requested memory type")
    request["candidates"] = request["candidates"] or {
        memory_type: candidates_for(k, request["weights"], field_rules.CANDIDATE_OVERSAMPLE)
        for memory_type, k in request["limits"].items()
    }
    request["requested_at"] = request["requested_at"] or time.time()
    request["deadline_ts"] = request["deadline_ts"] or request["requested_at"] + request["timeout_s"]
    return request


RETRIEVAL_REQUEST: TypeAdapter[RetrievalRequest] = TypeAdapter(
    Annotated[RetrievalRequest, BeforeValidator(_with_defaults), AfterValidator(_derived)]
)


def parse_retrieval_request(request: Any, settings: Settings | None = None) -> RetrievalRequest:
    """A retrieval request, as the edge builds it and ``memq.merge`` receives it: each field by its rule; missing
    optional fields take their defaults; cache fields count only with a ``cache_key`` (then all three must be sound)."""
    return parse(RETRIEVAL_REQUEST, request, settings)


def with_cache(request: RetrievalRequest, cache_key: Any, cache_versions: Any, cache_ttl_s: Any) -> RetrievalRequest:
    """The request plus what ``memq.merge`` needs to cache its result: the key the client's look-up built, the data
    versions it names (one per requested type, in ``cache_types`` order) and the client's TTL (merge caps it); merge
    files the result only under the key of this very request (``memq.workers.plumbing.cache_filing``)."""
    cache = {"cache_key": cache_key, "cache_versions": cache_versions, "cache_ttl_s": cache_ttl_s}
    return parse_retrieval_request({**request, **cache})


# -- the embed step -----------------------------------------------------------------------------------------------


class EmbedQuery(TypedDict):
    """What ``memq.embed_query`` embeds, and the retrieval's deadline (``None``: none)."""

    query: Query
    deadline_ts: Seconds


EMBED_QUERY: TypeAdapter[EmbedQuery] = TypeAdapter(EmbedQuery)


class EmbedTimings(TypedDict):
    """The embed step's timings, which each search passes on so that merge sees them."""

    embed_ms: NotRequired[Seconds]
    embed_started_ts: NotRequired[Seconds]
    embed_ended_ts: NotRequired[Seconds]


EMBED_TIMING_FIELDS = tuple(EmbedTimings.__annotations__)


class EmbedResult(EmbedTimings):
    """``memq.embed_query``'s result, the first argument of every ``memq.search`` of the chord."""

    vector: Annotated[str, PlainValidator(lambda text: text)]  # memq.core.vectors.to_wire, decoded by check_vector
    model: NotRequired[OptionalText]
    embed_cache: NotRequired[Literal["hit", "miss", None]]


def embed_result(
    vector: np.ndarray, model: str, embed_ms: float, cache: str, started_ts: float, ended_ts: float
) -> EmbedResult:
    return {
        "vector": to_wire(vector),
        "model": model,
        "embed_ms": embed_ms,
        "embed_cache": cache,
        "embed_started_ts": started_ts,
        "embed_ended_ts": ended_ts,
    }


def parse_embed_result(embedded: Any, dimensions: int | None) -> np.ndarray:
    """The query vector of an ``EmbedResult`` as ``memq.search`` receives it, every field checked (the ones the
    search passes on to merge too), else ``InvalidInput`` naming it (``embedded.model``; ``embedded``: the vector).
    ``dimensions``: the model's as its embed workers published it (``None`` while unknown)."""
    return check_vector(parse(EMBED_RESULT, embedded, where="embedded")["vector"], "embedded", dimensions)


def check_vector(text: Any, field: str, dimensions: int | None = None) -> np.ndarray:
    """A vector as ``memq.core.vectors.to_wire`` writes it: base64 of 1..``MAX_VECTOR_DIMENSIONS`` finite float32
    values, exactly ``dimensions`` of them when given (the model's: there is no setting for it)."""
    expected = f"base64 text of 1..{field_rules.MAX_VECTOR_DIMENSIONS} float32 values"
    if not isinstance(text, str) or len(text) > 2 * 4 * -(-4 * field_rules.MAX_VECTOR_DIMENSIONS // 3):
        raise InvalidInput(field, f"must be {expected}")
    try:
        vector = from_wire(text)
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not a whole number of float32
        raise InvalidInput(field, f"must be {expected}") from None
    if not 1 <= vector.size <= field_rules.MAX_VECTOR_DIMENSIONS:
        raise InvalidInput(field, f"must be {expected}, got {vector.size}")
    if dimensions is not None and vector.size != dimensions:
        raise InvalidInput(field, f"has {vector.size} values; the embed model has {dimensions} dimensions")
    if not np.isfinite(vector).all():
        raise InvalidInput(field, "must hold finite values only (no NaN or infinity)")
    return vector


EMBED_RESULT: TypeAdapter[EmbedResult] = TypeAdapter(EmbedResult)


def embed_timings(embedded: Any) -> dict[str, Any]:
    """The ``EmbedTimings`` of an ``EmbedResult`` (none from a malformed one)."""
    return {key: embedded.get(key) for key in EMBED_TIMING_FIELDS} if isinstance(embedded, dict) else {}


# -- one type's search -------------------------------------------------------------------------------------------


class SearchCall(TypedDict):
    """What one ``memq.search`` is asked (its arguments after the ``EmbedResult``), checked on receipt."""

    memory_id: MemoryId
    memory_type: TypeName
    k: Candidates
    strategy: SearchStrategy
    query: Annotated[str | None, _rule(field_rules.check_query, optional=True)]
    mode: Mode
    filters: Filters
    deadline_ts: Seconds  # the caller's deadline (Unix seconds); None: none


def search_call(request: RetrievalRequest, memory_type: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` of ``memq.search`` for one type of ``request`` (after the ``EmbedResult``)."""
    args = (request["memory_id"], memory_type, request["candidates"][memory_type])
    return args, {name: request[name] for name in ("strategy", "deadline_ts", "query", "mode", "filters")}


def _needs_query(call: SearchCall) -> SearchCall:
    if call["mode"] != "vector" and call["query"] is None:
        raise InvalidInput("query", f"is needed for mode {call['mode']!r}")
    return call


SEARCH_CALL: TypeAdapter[SearchCall] = TypeAdapter(Annotated[SearchCall, AfterValidator(_needs_query)])


@with_config(ConfigDict(extra="allow"))
class SearchResult(EmbedTimings):
    """One type's candidates (or its ``error``), a member of the chord's header, with the embed step's timings."""

    type: str
    items: NotRequired[Annotated[list[Any], Strict(), Field(max_length=MAX_CANDIDATES)]]  # checked by item_problem
    strategy: NotRequired[OptionalText]
    matrix_cache: NotRequired[Literal["hit", "miss", "bypass", "n/a", None]]  # strategies.SearchOutcome
    search_ms: NotRequired[Seconds]
    search_started_ts: NotRequired[Seconds]
    model: NotRequired[OptionalText]
    served_by: NotRequired[OptionalText]
    error: NotRequired[Text]


def _complete(result: SearchResult) -> SearchResult:
    if "error" not in result and "items" not in result:
        raise InvalidInput("items", "is required without an error")
    if result.get("search_started_ts") is not None and result.get("search_ms") is None:
        raise InvalidInput("search_started_ts", "is given without search_ms")
    return result


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


SEARCH_RESULT: TypeAdapter[SearchResult] = TypeAdapter(Annotated[SearchResult, AfterValidator(_complete)])


# -- merge -------------------------------------------------------------------------------------------------------


class MergeInput(TypedDict):
    """What ``memq.merge`` ranks: the request, the well-formed search results of its types, and why any type
    has none (a malformed result or item, named under its type)."""

    request: RetrievalRequest
    results: list[SearchResult]
    errors: dict[str, str]


def parse_merge_input(results: Any, request: Any, settings: Settings | None = None) -> MergeInput:
    """The chord's results and the request, as merge may rank them. A malformed result is left out and its type
    reported under ``errors``; so is a malformed item, alone (the type's other items are kept, and the type is
    reported); a result naming no requested type is dropped; a malformed list or request is ``InvalidInput``."""
    parsed = parse_retrieval_request(request, settings)
    if not isinstance(results, list | tuple):
        raise InvalidInput("results", "must be a list of search results")
    limits = parsed["limits"]
    kept: list[SearchResult] = []
    errors: dict[str, str] = {}
    for result in results:
        memory_type = result.get("type") if isinstance(result, dict) else None
        if not isinstance(memory_type, str) or memory_type not in limits:
            continue  # names no requested type: nothing to report it under
        try:
            result = parse(SEARCH_RESULT, result)
        except InvalidInput as exc:
            errors[memory_type] = f"malformed search result: {exc}"
            continue
        items = [item for item in result.get("items", []) if item_problem(item) is None]
        if dropped := len(result.get("items", [])) - len(items):
            errors[memory_type] = f"malformed search result: {dropped} malformed item(s) left out"
            result["items"] = items
        kept.append(result)
    return {"request": parsed, "results": kept, "errors": errors}


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


# -- ingestion ---------------------------------------------------------------------------------------------------


class RememberRequest(TypedDict):
    """Memories to store, as ``memq.remember`` (the client, ``send_task``) and ``memq.store`` take them."""

    memory_id: MemoryId
    memory_type: TypeName
    items: Annotated[list[dict[str, Any]], _rule(field_rules.check_items)]
    deadline_ts: Seconds  # when the caller stops waiting (Unix seconds; None: none)


class ForgetRequest(TypedDict):
    """What ``memq.forget`` deletes: a tenant's memories, of one type or all, by id or all."""

    memory_id: MemoryId
    memory_type: Annotated[str | None, _rule(_type_value, optional=True)]
    ids: Annotated[list[str] | None, _rule(field_rules.check_ids)]
    deadline_ts: Seconds


class EmbedTexts(TypedDict):
    """What ``memq.embed_texts`` embeds: the contents of one batch of memories."""

    texts: Annotated[list[str], _rule(field_rules.check_texts)]
    deadline_ts: Seconds


REMEMBER_REQUEST: TypeAdapter[RememberRequest] = TypeAdapter(RememberRequest)
FORGET_REQUEST: TypeAdapter[ForgetRequest] = TypeAdapter(ForgetRequest)
EMBED_TEXTS: TypeAdapter[EmbedTexts] = TypeAdapter(EmbedTexts)


# -- ingestion: the bulk embedding that memq.store writes ---------------------------------------------------------


class EmbeddedTexts(TypedDict):
    """``memq.embed_texts``'s result, the first argument of ``memq.store``."""

    vectors: list[str]  # memq.core.vectors.to_wire, one per text, in order
    model: str
    embed_ms: float
    embedding_cache: dict[str, int]  # hits, computed


def embedded_texts(vectors: list[np.ndarray], model: str, embed_ms: float, hits: int, computed: int) -> EmbeddedTexts:
    return {
        "vectors": [to_wire(vector) for vector in vectors],
        "model": model,
        "embed_ms": embed_ms,
        "embedding_cache": {"hits": hits, "computed": computed},
    }


def parse_embedded_texts(embedded: Any, count: int, model: str, dimensions: int | None = None) -> np.ndarray:
    """The ``(count, dimensions)`` float32 matrix of the ``EmbeddedTexts`` ``memq.store`` is asked to write: one vector
    per item by ``check_vector`` (all of one dimension, the model's once known), of the embed model ``model``; else
    ``InvalidInput`` naming the field (``embedded.vectors[3]``), so nothing is written."""
    if not isinstance(embedded, Mapping):
        raise InvalidInput("embedded", "must be an object with 'vectors' and 'model'")
    vectors = embedded.get("vectors")
    if not isinstance(vectors, list | tuple) or len(vectors) != count:
        raise InvalidInput("embedded.vectors", f"must be a list of one vector per item ({count})")
    if type(embedded.get("model")) is not str or embedded["model"] != model:
        shown = field_rules.shown(embedded.get("model"))
        raise InvalidInput("embedded.model", f"must be the embed model {model!r} (MEMQ_EMBED_MODEL), got {shown}")
    checked = [check_vector(text, f"embedded.vectors[{index}]", dimensions) for index, text in enumerate(vectors)]
    for index, vector in enumerate(checked):
        if vector.size != checked[0].size:
            raise InvalidInput(
                f"embedded.vectors[{index}]", f"has {vector.size} values; embedded.vectors[0] has {checked[0].size}"
            )
    return np.array(checked, dtype=np.float32).reshape(count, checked[0].size if checked else 0)
