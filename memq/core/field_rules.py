"""User input checks, made once at the edge (``memq.client.edge``: the client, or a task that ``send_task`` reaches);
``memq.core.wire`` builds the checks of received messages from these.

Each check returns the normalised value or raises ``InvalidInput`` naming the field. Every string accepted must be
valid UTF-8 (``check_utf8``: no lone surrogates); timestamps lie in 1970-01-01T00:00:00Z..9999-12-31T23:59:59Z.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memq.core.memory_types import BY_NAME, MemoryType, known_type_names
from memq.errors import InvalidInput

MAX_MEMORY_ID_CHARS = 256
MAX_CACHE_TTL_S = 30 * 24 * 3600  # the longest a retrieval result may be cached
MAX_LIMIT = 100  # results per memory type
MAX_CANDIDATES = 1000  # candidates one type's search may return for re-ranking
MAX_OVERSAMPLE = MAX_CANDIDATES // MAX_LIMIT  # so that every limit's candidates fit
MAX_TIMEOUT_S = 3600.0  # the longest a caller may wait for one call
#: Cosine candidates per k a search returns when recency or importance re-rank them: 3 lets an older or more
#: important memory from a little below the top k win (MAX_LIMIT times it must fit in MAX_CANDIDATES).
CANDIDATE_OVERSAMPLE = 3
MAX_QUERY_CHARS = 4096  # a query is a question, not a document; longer ones cost the embed worker for nothing
MAX_CONTENT_CHARS = 32768  # one memory; the model reads its first 256 tokens, MongoDB holds 16 MB a document
#: Memories per remember call (one message, one forward pass chain): a few MB of JSON at most. Bulk imports go
#: through ``remember_numbered``, which sends batches of this size.
MAX_BATCH_ITEMS = 1000
MAX_VECTOR_DIMENSIONS = 8192  # the most dimensions an Atlas vector index takes
MAX_TAGS = 64
MAX_FLOAT_INT = 10**308  # larger ints do not convert to float
MAX_TAG_CHARS = 128
MAX_ROLE_CHARS = 64
DEFAULT_MODE = "hybrid"  # of memq.core.wire.ModeName
FILTER_FIELDS = ("tags", "tags_match", "created_after", "created_before", "role")
TAG_MATCHES = ("any", "all")
WEIGHT_NAMES = ("relevance", "recency", "importance")
# Chosen on LoCoMo (README, "Retrieval quality"): recency and importance break near-ties of relevance without
# swamping it (recency 0.1 costs LoCoMo at most half a point of recall; 0.5 costs four).
DEFAULT_WEIGHTS = {"relevance": 1.0, "recency": 0.1, "importance": 0.1}
ITEM_FIELDS = frozenset({"content", "context", "id", "importance", "created_at", "role", "tags", "metadata"})
MIN_TIMESTAMP = 0.0  # 1970-01-01T00:00:00Z
MAX_TIMESTAMP = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last second a datetime (and so the store) holds
TIMESTAMP_RANGE = "1970-01-01T00:00:00Z..9999-12-31T23:59:59Z"


def check_utf8(text: str, field: str) -> str:
    """``text`` if it encodes as UTF-8. A lone surrogate (``"\\ud800"`` from JSON, ``"\\udcff"`` for an undecodable
    byte of a command-line argument) can be neither sent, stored nor printed; the message never quotes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(field, f"must be valid UTF-8 text (a lone surrogate at character {exc.start})") from None
    return text


def shown(value: Any) -> str:
    """A caller's value as an error message may quote it: short, and never too large to print."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return "a very large integer"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float: ``10**400`` is not (``float()`` overflows)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not (isinstance(value, int) and abs(value) > MAX_FLOAT_INT) and math.isfinite(value)


def text_form(text: str) -> str:
    """The one form in which search compares texts: Unicode NFKC (full-width letters, ligatures meet their plain
    spellings), for the embedding and BM25 of queries and memories alike, and the result cache's key. A memory is
    stored and returned as written."""
    return unicodedata.normalize("NFKC", text)


def check_query(query: Any) -> str:
    """A query in its text form, stripped (one spelling for cache and search), by the rule of a memory's text, at
    most ``MAX_QUERY_CHARS``."""
    if not isinstance(query, str):
        raise InvalidInput("query", f"must be a string, got {type(query).__name__}")
    return check_content(text_form(check_utf8(query, "query")).strip(), "query", MAX_QUERY_CHARS)


def check_memory_id(memory_id: Any) -> str:
    if not isinstance(memory_id, str):
        raise InvalidInput("memory_id", f"must be a string, got {type(memory_id).__name__}")
    check_utf8(memory_id, "memory_id")
    if not memory_id.strip():
        raise InvalidInput("memory_id", "must not be empty")
    if len(memory_id) > MAX_MEMORY_ID_CHARS:
        raise InvalidInput("memory_id", f"must be at most {MAX_MEMORY_ID_CHARS} characters")
    if memory_id.startswith("$") or "\x00" in memory_id:
        raise InvalidInput("memory_id", "must not start with '$' or contain NUL characters")
    return memory_id


def check_memory_type(memory_type: Any, field: str = "type") -> MemoryType:
    if not isinstance(memory_type, str):
        raise InvalidInput(field, f"must be a string, got {type(memory_type).__name__}")
    name = memory_type.strip().lower()
    if name not in BY_NAME:
        raise InvalidInput(field, f"unknown memory type {memory_type!r}; known: {', '.join(known_type_names())}")
    return BY_NAME[name]


def check_limits(limits: Any) -> dict[str, int]:
    """``{type or alias: k}`` → ``{type value: k}``, k in 1..100."""
    if not isinstance(limits, Mapping) or not limits:
        raise InvalidInput("limits", "must be a non-empty mapping of memory type to k")
    checked: dict[str, int] = {}
    for name, k in limits.items():
        memory_type = check_memory_type(name, field=f"limits[{name!r}]" if isinstance(name, str) else "limits")
        if memory_type.value in checked:
            raise InvalidInput("limits", f"memory type {memory_type.value!r} is named twice")
        checked[memory_type.value] = check_count(k, f"limits[{name!r}]", MAX_LIMIT)
    return checked


def check_count(count: Any, field: str, most: int) -> int:
    """An integer in ``1..most``: a limit (``MAX_LIMIT``), a search's candidates (``MAX_CANDIDATES``), a TTL."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
        raise InvalidInput(field, f"must be an integer in 1..{most}, got {shown(count)}")
    return count


def check_weights(weights: Any) -> dict[str, float]:
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise InvalidInput("weights", "must be a mapping like {'relevance': 1, 'recency': 0, 'importance': 0}")
    unknown = set(weights) - set(WEIGHT_NAMES)
    if unknown:
        raise InvalidInput("weights", f"unknown weight(s) {sorted(map(str, unknown))}; known: {WEIGHT_NAMES}")
    checked = dict.fromkeys(WEIGHT_NAMES, 0.0)
    for name, value in weights.items():
        if not is_finite_number(value) or not 0 <= value <= 1000:
            raise InvalidInput(f"weights[{name!r}]", f"must be a number in 0..1000, got {shown(value)}")
        checked[name] = float(value)
    if sum(checked.values()) <= 0:
        raise InvalidInput("weights", "at least one weight must be positive")
    return checked


def check_timeout(timeout_s: Any, default_s: float | None = None) -> float:
    """How long a caller waits; ``None``: ``default_s`` (``MEMQ_RETRIEVE_TIMEOUT_S`` for a retrieval)."""
    timeout_s = default_s if timeout_s is None else timeout_s
    if not is_finite_number(timeout_s) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise InvalidInput("timeout_s", f"must be seconds in (0, {MAX_TIMEOUT_S:g}], got {shown(timeout_s)}")
    return float(timeout_s)


def check_batch(values: Any, field: str) -> list[Any] | tuple[Any, ...]:
    """A non-empty list of at most ``MAX_BATCH_ITEMS`` values (memories, or their texts)."""
    if not isinstance(values, list | tuple):
        raise InvalidInput(field, "must be a list of memories")
    if not values:
        raise InvalidInput(field, "must not be empty")
    if len(values) > MAX_BATCH_ITEMS:
        raise InvalidInput(field, f"has {len(values)} memories; the limit per call is {MAX_BATCH_ITEMS}")
    return values


def check_content(content: Any, field: str, max_chars: int = MAX_CONTENT_CHARS) -> str:
    """A memory's text (or a query): non-empty, valid UTF-8, at most ``max_chars``, no NUL."""
    if not isinstance(content, str) or not content.strip():
        raise InvalidInput(field, "must be a non-empty string")
    check_utf8(content, field)
    if len(content) > max_chars:
        raise InvalidInput(field, f"is {len(content)} characters; the limit is {max_chars}")
    if "\x00" in content:
        raise InvalidInput(field, "must not contain NUL characters")
    return content


def check_texts(texts: Any) -> list[str]:
    """The texts ``memq.embed_texts`` embeds: the contents of a batch of memories."""
    return [check_content(text, f"texts[{i}]") for i, text in enumerate(check_batch(texts, "texts"))]


def check_items(items: Any) -> list[dict[str, Any]]:
    """Normalise memories to store; every item is checked before anything is written."""
    return [_check_item(i, item) for i, item in enumerate(check_batch(items, "items"))]


def _check_item(index: int, item: Any) -> dict[str, Any]:
    where = f"items[{index}]"
    if isinstance(item, str):
        item = {"content": item}
    if not isinstance(item, Mapping):
        raise InvalidInput(where, "must be an object with 'content' or a string")
    unknown = set(item) - ITEM_FIELDS
    if unknown:
        raise InvalidInput(where, f"unknown field(s) {sorted(map(str, unknown))}; known: {sorted(ITEM_FIELDS)}")
    content = check_content(item.get("content"), f"{where}.content")
    checked: dict[str, Any] = {"content": content}
    if item.get("context") is not None:
        context = item["context"]
        if not isinstance(context, str) or len(context) > MAX_CONTENT_CHARS or "\x00" in context:
            raise InvalidInput(f"{where}.context", f"must be a string of at most {MAX_CONTENT_CHARS} characters")
        checked["context"] = check_utf8(context, f"{where}.context")
    if item.get("id") is not None:
        key = item["id"]
        small_int = isinstance(key, int) and not isinstance(key, bool) and abs(key) < 10**256  # str(10**5000) raises
        text = key if isinstance(key, str) else str(key) if small_int else ""
        if not text.strip() or len(text) > 256:
            raise InvalidInput(f"{where}.id", "must be a non-empty string of at most 256 characters")
        checked["id"] = check_utf8(text, f"{where}.id")
    importance = item.get("importance", 0.5)
    if isinstance(importance, bool) or not isinstance(importance, int | float) or not 0 <= importance <= 1:
        raise InvalidInput(f"{where}.importance", f"must be a number in 0..1, got {shown(importance)}")
    checked["importance"] = float(importance)
    for name, check in (("created_at", check_timestamp), ("role", check_role), ("tags", check_tags)):
        if item.get(name) is not None:
            checked[name] = check(item[name], f"{where}.{name}")
    if item.get("metadata") is not None:
        metadata = item["metadata"]
        if not isinstance(metadata, Mapping):
            raise InvalidInput(f"{where}.metadata", "must be an object")
        _check_no_operator_keys(metadata, f"{where}.metadata")
        checked["metadata"] = dict(metadata)
    return checked


def _check_no_operator_keys(value: Any, where: str, depth: int = 0) -> None:
    """Metadata: JSON values only (objects, arrays, strings, finite numbers, 64-bit integers, booleans, null), no
    operator-shaped or dotted keys, at most 16 levels, every key and string value UTF-8."""
    if depth > 16:
        raise InvalidInput(where, "is nested too deeply")
    if isinstance(value, str):
        check_utf8(value, where)
    elif value is None or isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInput(where, "holds an integer outside the 64-bit range MongoDB stores")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(where, "holds a number that is not finite")
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str) or key.startswith("$") or "." in key or "\x00" in key:
                raise InvalidInput(where, f"key {key!r} is not allowed (no '$' prefix, '.', or NUL)")
            check_utf8(key, where)  # before the key joins a field name
            _check_no_operator_keys(inner, f"{where}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for inner in value:
            _check_no_operator_keys(inner, where, depth + 1)
    else:
        raise InvalidInput(where, f"holds a {type(value).__name__}; metadata takes JSON values only")


def check_timestamp(value: Any, field: str) -> float:
    """Unix seconds (number) or ISO-8601 text (UTC without an offset) → Unix seconds, within ``TIMESTAMP_RANGE``
    once the offset is applied: ``1e20`` or ``"9999-12-31T23:00:00-05:00"`` (10000-01-01 in UTC) are refused."""
    if isinstance(value, str):
        check_utf8(value, field)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput(field, f"is not an ISO-8601 timestamp: {value[:64]!r}") from None
        value = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(field, "must be Unix seconds or an ISO-8601 timestamp")
    if not MIN_TIMESTAMP <= value <= MAX_TIMESTAMP:  # NaN too; compared before any conversion: 10**400 is refused too
        raise InvalidInput(field, f"must lie within {TIMESTAMP_RANGE} (Unix seconds 0..{MAX_TIMESTAMP:.0f})")
    return float(value)


def check_role(role: Any, field: str) -> str:
    if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS or role.startswith("$") or "\x00" in role:
        raise InvalidInput(field, "must be a short string such as 'user' or 'assistant' (no '$' prefix)")
    return check_utf8(role, field)


def check_tags(tags: Any, field: str) -> list[str]:
    if (
        not isinstance(tags, list | tuple)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and t and len(t) <= MAX_TAG_CHARS and "\x00" not in t for t in tags)
    ):
        raise InvalidInput(field, f"must be a list of at most {MAX_TAGS} non-empty strings of {MAX_TAG_CHARS} at most")
    if any(t.startswith("$") for t in tags):
        raise InvalidInput(field, "must not hold values starting with '$'")
    return [check_utf8(t, field) for t in tags]


def check_filters(filters: Any) -> dict[str, Any]:
    """``{"tags": [...], "tags_match": "any"|"all", "created_after": ts, "created_before": ts, "role": str}``,
    every key optional; timestamps as Unix seconds or ISO-8601 (returned as Unix seconds)."""
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise InvalidInput("filters", "must be an object such as {'tags': ['work'], 'role': 'user'}")
    unknown = set(filters) - set(FILTER_FIELDS)
    if unknown:
        raise InvalidInput("filters", f"unknown filter(s) {sorted(map(str, unknown))}; known: {list(FILTER_FIELDS)}")
    checked: dict[str, Any] = {}
    if filters.get("tags") is not None:
        checked["tags"] = sorted(set(check_tags(filters["tags"], "filters.tags")))
        if not checked["tags"]:
            raise InvalidInput("filters.tags", "must name at least one tag")
    if filters.get("tags_match") is not None:
        if filters["tags_match"] not in TAG_MATCHES or "tags" not in checked:
            raise InvalidInput("filters.tags_match", f"must be one of {TAG_MATCHES}, with filters.tags")
        checked["tags_match"] = filters["tags_match"]
    for bound in ("created_after", "created_before"):
        if filters.get(bound) is not None:
            checked[bound] = check_timestamp(filters[bound], f"filters.{bound}")
    if checked.get("created_after", -math.inf) > checked.get("created_before", math.inf):
        raise InvalidInput("filters.created_after", "must not be later than filters.created_before")
    if filters.get("role") is not None:
        checked["role"] = check_role(filters["role"], "filters.role")
    return checked


def check_ids(ids: Any) -> list[str] | None:
    if ids is None:
        return None
    if not isinstance(ids, list | tuple) or not ids:
        raise InvalidInput("ids", "must be a non-empty list of memory ids")
    if not all(isinstance(i, str) and i and not i.startswith("$") for i in ids):
        raise InvalidInput("ids", "must be strings, none starting with '$'")
    return [check_utf8(i, "ids") for i in ids]
