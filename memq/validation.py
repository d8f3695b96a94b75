"""Input checks shared by the client (before anything is sent) and the tasks (again, on arrival).

Each check returns the normalised value or raises ``InvalidInput`` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from memq.errors import InvalidInput
from memq.memory_types import ALIASES, MemoryType, known_type_names

MAX_MEMORY_ID_CHARS = 256
MAX_LIMIT = 100  # results per memory type
MAX_CANDIDATES = 1000  # candidates one type's search may return for re-ranking
MAX_OVERSAMPLE = MAX_CANDIDATES // MAX_LIMIT  # so that every limit's candidates fit
MAX_TAGS = 64
MAX_TAG_CHARS = 128
MAX_ROLE_CHARS = 64
MODES = ("hybrid", "vector", "lexical")
DEFAULT_MODE = "hybrid"
FILTER_FIELDS = ("tags", "tags_match", "created_after", "created_before", "role")
TAG_MATCHES = ("any", "all")
WEIGHT_NAMES = ("relevance", "recency", "importance")
# Chosen on LoCoMo (README, "Retrieval quality"): recency and importance break near-ties of relevance without
# swamping it (recency 0.1 costs LoCoMo at most half a point of recall; 0.5 costs four).
DEFAULT_WEIGHTS = {"relevance": 1.0, "recency": 0.1, "importance": 0.1}
ITEM_FIELDS = frozenset({"content", "context", "id", "importance", "created_at", "role", "tags", "metadata"})


def check_query(query: Any, max_chars: int) -> str:
    if not isinstance(query, str):
        raise InvalidInput("query", f"must be a string, got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise InvalidInput("query", "must not be empty")
    if len(text) > max_chars:
        raise InvalidInput("query", f"is {len(text)} characters; the limit is {max_chars}")
    if "\x00" in text:
        raise InvalidInput("query", "must not contain NUL characters")
    return text


def check_memory_id(memory_id: Any) -> str:
    if not isinstance(memory_id, str):
        raise InvalidInput("memory_id", f"must be a string, got {type(memory_id).__name__}")
    if not memory_id or not memory_id.strip():
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
    if name in ALIASES:
        return ALIASES[name]
    try:
        return MemoryType(name)
    except ValueError:
        raise InvalidInput(
            field, f"unknown memory type {memory_type!r}; known: {', '.join(known_type_names())}"
        ) from None


def check_limits(limits: Any) -> dict[str, int]:
    """``{type or alias: k}`` → ``{type value: k}``, k in 1..100."""
    if not isinstance(limits, Mapping) or not limits:
        raise InvalidInput("limits", "must be a non-empty mapping of memory type to k")
    checked: dict[str, int] = {}
    for name, k in limits.items():
        memory_type = check_memory_type(name, field=f"limits[{name!r}]" if isinstance(name, str) else "limits")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_LIMIT:
            raise InvalidInput(f"limits[{name!r}]", f"must be an integer in 1..{MAX_LIMIT}, got {k!r}")
        if memory_type.value in checked:
            raise InvalidInput("limits", f"memory type {memory_type.value!r} is named twice")
        checked[memory_type.value] = k
    return checked


def check_search_k(k: Any) -> int:
    """How many candidates one type's search returns."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CANDIDATES:
        raise InvalidInput("k", f"must be an integer in 1..{MAX_CANDIDATES}, got {k!r}")
    return k


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
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"weights[{name!r}]", f"must be a finite number, got {value!r}")
        if not 0 <= value <= 1000:
            raise InvalidInput(f"weights[{name!r}]", f"must be in 0..1000, got {value!r}")
        checked[name] = float(value)
    if sum(checked.values()) <= 0:
        raise InvalidInput("weights", "at least one weight must be positive")
    return checked


def check_timeout(timeout_s: Any) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not math.isfinite(timeout_s):
        raise InvalidInput("timeout_s", f"must be a number of seconds, got {timeout_s!r}")
    if not 0 < timeout_s <= 3600:
        raise InvalidInput("timeout_s", f"must be in (0, 3600], got {timeout_s!r}")
    return float(timeout_s)


def check_items(items: Any, max_items: int, max_content_chars: int) -> list[dict[str, Any]]:
    """Normalise memories to store; every item is checked before anything is written."""
    if isinstance(items, Mapping | str) or not isinstance(items, list | tuple):
        raise InvalidInput("items", "must be a list of memories")
    if not items:
        raise InvalidInput("items", "must not be empty")
    if len(items) > max_items:
        raise InvalidInput("items", f"has {len(items)} memories; the limit per call is {max_items}")
    return [_check_item(i, item, max_content_chars) for i, item in enumerate(items)]


def _check_item(index: int, item: Any, max_content_chars: int) -> dict[str, Any]:
    where = f"items[{index}]"
    if isinstance(item, str):
        item = {"content": item}
    if not isinstance(item, Mapping):
        raise InvalidInput(where, "must be an object with 'content' or a string")
    unknown = set(item) - ITEM_FIELDS
    if unknown:
        raise InvalidInput(where, f"unknown field(s) {sorted(map(str, unknown))}; known: {sorted(ITEM_FIELDS)}")
    content = item.get("content")
    if not isinstance(content, str) or not content.strip():
        raise InvalidInput(f"{where}.content", "must be a non-empty string")
    if len(content) > max_content_chars:
        raise InvalidInput(f"{where}.content", f"is {len(content)} characters; the limit is {max_content_chars}")
    if "\x00" in content:
        raise InvalidInput(f"{where}.content", "must not contain NUL characters")
    checked: dict[str, Any] = {"content": content}
    if item.get("context") is not None:
        context = item["context"]
        if not isinstance(context, str) or len(context) > max_content_chars or "\x00" in context:
            raise InvalidInput(f"{where}.context", f"must be a string of at most {max_content_chars} characters")
        checked["context"] = context
    if item.get("id") is not None:
        key = item["id"]
        if not isinstance(key, str | int) or isinstance(key, bool) or not str(key).strip() or len(str(key)) > 256:
            raise InvalidInput(f"{where}.id", "must be a non-empty string of at most 256 characters")
        checked["id"] = str(key)
    importance = item.get("importance", 0.5)
    if isinstance(importance, bool) or not isinstance(importance, int | float) or not 0 <= importance <= 1:
        raise InvalidInput(f"{where}.importance", f"must be a number in 0..1, got {importance!r}")
    checked["importance"] = float(importance)
    if item.get("created_at") is not None:
        checked["created_at"] = check_timestamp(item["created_at"], f"{where}.created_at")
    if item.get("role") is not None:
        checked["role"] = check_role(item["role"], f"{where}.role")
    if item.get("tags") is not None:
        checked["tags"] = check_tags(item["tags"], f"{where}.tags")
    if item.get("metadata") is not None:
        metadata = item["metadata"]
        if not isinstance(metadata, Mapping):
            raise InvalidInput(f"{where}.metadata", "must be an object")
        _check_no_operator_keys(metadata, f"{where}.metadata")
        checked["metadata"] = dict(metadata)
    return checked


def _check_no_operator_keys(value: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        raise InvalidInput(where, "is nested too deeply")
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not isinstance(key, str) or key.startswith("$") or "." in key or "\x00" in key:
                raise InvalidInput(where, f"key {key!r} is not allowed (no '$' prefix, '.', or NUL)")
            _check_no_operator_keys(inner, f"{where}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for inner in value:
            _check_no_operator_keys(inner, where, depth + 1)


def check_timestamp(value: Any, field: str) -> float:
    """Unix seconds (number) or ISO-8601 text → Unix seconds."""
    if isinstance(value, bool):
        raise InvalidInput(field, "must be Unix seconds or an ISO-8601 timestamp")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(field, f"must be non-negative Unix seconds, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput(field, f"is not an ISO-8601 timestamp: {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    raise InvalidInput(field, "must be Unix seconds or an ISO-8601 timestamp")


def check_role(role: Any, field: str) -> str:
    if not isinstance(role, str) or not role or len(role) > MAX_ROLE_CHARS or role.startswith("$") or "\x00" in role:
        raise InvalidInput(field, "must be a short string such as 'user' or 'assistant' (no '$' prefix)")
    return role


def check_tags(tags: Any, field: str) -> list[str]:
    if (
        not isinstance(tags, list | tuple)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and t and len(t) <= MAX_TAG_CHARS and "\x00" not in t for t in tags)
    ):
        raise InvalidInput(field, f"must be a list of at most {MAX_TAGS} non-empty strings of {MAX_TAG_CHARS} at most")
    if any(t.startswith("$") for t in tags):
        raise InvalidInput(field, "must not hold values starting with '$'")
    return list(tags)


def check_mode(mode: Any) -> str:
    """How each type is searched: ``hybrid`` (lexical and vector, fused), ``vector`` or ``lexical``."""
    if mode is None:
        return DEFAULT_MODE
    if mode not in MODES:
        raise InvalidInput("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


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
    if isinstance(ids, str) or not isinstance(ids, list | tuple) or not ids:
        raise InvalidInput("ids", "must be a non-empty list of memory ids")
    if not all(isinstance(i, str) and i and not i.startswith("$") for i in ids):
        raise InvalidInput("ids", "must be strings, none starting with '$'")
    return list(ids)
