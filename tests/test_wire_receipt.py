"""Every field of every internal message is checked on receipt (``memq.core.wire``): a malformed one, sent by
``send_task`` straight to a real worker, is ``InvalidInput`` naming that very field, never a ``TypeError`` or a
silent default. ``memq.search`` never raises: it reports the refusal under its type's ``error``."""

from __future__ import annotations

from typing import Any

import pytest

from memq.core import names
from memq.errors import InvalidInput

pytestmark = pytest.mark.usefixtures("fleet")

TENANT = "wire-receipt-tenant"
REQUEST = {"query": "food", "memory_id": TENANT, "limits": {"long_term_memory": 1}}


def outcome_of(app: Any, task: str, queue: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    result = app.send_task(task, args=args, kwargs=kwargs, queue=queue)
    value = result.get(timeout=60, propagate=False)
    state = result.state
    result.forget()
    return state, value


@pytest.fixture(scope="module")
def embedded(app: Any) -> dict[str, Any]:
    return dict(app.send_task(names.EMBED_QUERY, args=("food",), queue=names.EMBED_QUEUE).get(timeout=60))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strategy": "evil"}, "strategy"),
        ({"strategy": ["auto"]}, "strategy"),
        ({"deadline_ts": "soon"}, "deadline_ts"),
        ({"deadline_ts": [1]}, "deadline_ts"),
        ({"deadline_ts": True}, "deadline_ts"),
        ({"mode": "evil"}, "mode"),
        ({"mode": "hybrid", "query": 5}, "query"),
        ({"filters": "tags=a"}, "filters"),
    ],
)
def test_a_search_call_with_a_malformed_field_reports_invalid_input_naming_it(
    app: Any, embedded: dict[str, Any], kwargs: dict[str, Any], field: str
) -> None:
    state, value = outcome_of(
        app, names.SEARCH, names.SEARCH_QUEUE, embedded, TENANT, "long_term_memory", 3, **{"query": "food", **kwargs}
    )

    assert state == "SUCCESS"
    assert value["items"] == [] and value["error"].startswith(f"invalid input: {field}:"), value["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": 5}, "embedded.model"),
        ({"embed_cache": "sometimes"}, "embedded.embed_cache"),
        ({"embed_ms": "fast"}, "embedded.embed_ms"),
        ({"embed_started_ts": [0]}, "embedded.embed_started_ts"),
        ({"embed_ended_ts": "later"}, "embedded.embed_ended_ts"),
    ],
)
def test_a_search_given_a_malformed_embed_result_field_reports_invalid_input_naming_it(
    app: Any, embedded: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    state, value = outcome_of(
        app, names.SEARCH, names.SEARCH_QUEUE, {**embedded, **change}, TENANT, "long_term_memory", 3, mode="vector"
    )

    assert state == "SUCCESS"
    assert value["items"] == [] and value["error"].startswith(f"invalid input: {field}:"), value["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"deadline_ts": "soon"}, "deadline_ts"),
        ({"timeout_s": "long"}, "timeout_s"),
        ({"requested_at": [1]}, "requested_at"),
        ({"strategy": "evil"}, "strategy"),
        ({"mode": "evil"}, "mode"),
        ({"candidates": "many"}, "candidates"),
        ({"candidates": {"dreams": 3}}, "candidates"),
        ({"candidates": {"long_term_memory": "3"}}, "candidates.long_term_memory"),
        ({"cache_key": "k", "cache_versions": "v", "cache_ttl_s": 60}, "cache_versions"),
    ],
)
def test_a_merge_with_a_malformed_request_field_fails_with_invalid_input_naming_it(
    app: Any, change: dict[str, Any], field: str
) -> None:
    state, value = outcome_of(app, names.MERGE, names.SEARCH_QUEUE, [], {**REQUEST, **change})

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == field, repr(value)


def test_a_merge_of_results_that_are_not_a_list_fails_with_invalid_input_naming_them(app: Any) -> None:
    state, value = outcome_of(app, names.MERGE, names.SEARCH_QUEUE, "results", REQUEST)

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == "results"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"matrix_cache": {"a": 1}}, "matrix_cache"),
        ({"model": ["m"]}, "model"),
        ({"strategy": 5}, "strategy"),
        ({"search_ms": "slow"}, "search_ms"),
    ],
)
def test_a_merged_search_result_with_a_malformed_field_is_left_out_and_reported_under_its_type(
    app: Any, change: dict[str, Any], problem: str
) -> None:
    result = {"type": "long_term_memory", "items": [], "strategy": "exact", "matrix_cache": "hit", **change}

    state, value = outcome_of(app, names.MERGE, names.SEARCH_QUEUE, [result], REQUEST)

    assert state == "SUCCESS"
    assert problem in value["errors"]["long_term_memory"]


@pytest.mark.parametrize(
    ("texts", "field"),
    [
        ("just text", "texts"),
        ([], "texts"),
        (["fine", 5], "texts[1]"),
        (["fine", "   "], "texts[1]"),
        (["fine", "\ud800"], "texts[1]"),
    ],
)
def test_embed_texts_with_a_malformed_text_fails_with_invalid_input_naming_it(app: Any, texts: Any, field: str) -> None:
    state, value = outcome_of(app, names.EMBED_TEXTS, names.EMBED_QUEUE, texts)

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == field, repr(value)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"model": "all-MiniLM-L6-v2"}, "embedded.vectors"),
        ({"vectors": ["$$$"], "model": "all-MiniLM-L6-v2"}, "embedded.vectors[0]"),
        ({"vectors": None, "model": 5}, "embedded.vectors"),
    ],
)
def test_a_store_with_a_malformed_embedding_fails_with_invalid_input_naming_it(
    app: Any, payload: dict[str, Any], field: str
) -> None:
    state, value = outcome_of(app, names.STORE, names.INGEST_QUEUE, payload, TENANT, "semantic", [{"content": "x"}])

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == field, repr(value)


def test_a_store_with_a_vector_of_the_wrong_model_fails_naming_the_model(app: Any, embedded: dict[str, Any]) -> None:
    payload = {"vectors": [embedded["vector"]], "model": 5}

    state, value = outcome_of(app, names.STORE, names.INGEST_QUEUE, payload, TENANT, "semantic", [{"content": "x"}])

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == "embedded.model", repr(value)


@pytest.mark.parametrize(
    ("args", "field"),
    [((TENANT, "dreams", None), "type"), ((TENANT, None, "all"), "ids"), (({"$ne": None}, None, None), "memory_id")],
)
def test_a_forget_with_a_malformed_field_fails_with_invalid_input_naming_it(
    app: Any, args: tuple[Any, ...], field: str
) -> None:
    state, value = outcome_of(app, names.FORGET, names.INGEST_QUEUE, *args)

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == field, repr(value)
