"""Hybrid lexical + vector retrieval, filters and modes, on real workers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memq.client import api
from memq.errors import InvalidInput
from memq.workers.search.lexical import BM25_B, BM25_K1, analyse

pytestmark = pytest.mark.usefixtures("fleet")
FILTER_FLAGS = ["--tag", "work", "--tag", "plans", "--all-tags", "--role", "user"]
RETRIEVE_CLI = [sys.executable, "-m", "memq.ops.cli", "retrieve"]
RELEVANCE_ONLY = {"relevance": 1, "recency": 0, "importance": 0}
TRAVEL = [
    "booked flights to Lisbon for the spring holiday",
    "prefers window seats on long flights",
    "wants a hotel near the old town with a rooftop bar",
    "travel insurance renewed with the usual provider",
    "the passport expires in two years",
    "asked for a rental car with automatic gearbox",
]
RARE = "the storage unit gate code is QX7731"


def memories(tenant: str, memory_type: str, items: list[dict[str, Any]]) -> None:
    api.remember(tenant, memory_type, items)


def ids(result: dict[str, Any], memory_type: str = "long_term_memory") -> list[str]:
    return [item["id"] for item in result["results"][memory_type]]


def test_hybrid_finds_a_memory_by_a_rare_code_that_cosine_ranks_low(tenant: str) -> None:
    memories(tenant, "semantic", [{"id": f"t{i}", "content": text} for i, text in enumerate(TRAVEL)])
    memories(tenant, "semantic", [{"id": "rare", "content": RARE}])
    query = "vacation airfare and lodging QX7731"  # paraphrases the travel memories; the code is only in one

    vector = api.retrieve(query, tenant, {"semantic": 3}, weights=RELEVANCE_ONLY, mode="vector")
    hybrid = api.retrieve(query, tenant, {"semantic": 1}, weights=RELEVANCE_ONLY)

    assert "rare" not in ids(vector)  # cosine ranks the travel memories above it
    assert ids(hybrid) == ["rare"]
    scores = hybrid["results"]["long_term_memory"][0]["scores"]
    assert scores["lexical"] > 0 and set(scores) == {"vector", "lexical", "fused", "recency", "importance"}


def independent_bm25(corpus: list[str], query: str) -> list[float]:
    """Lucene's BM25 (which drops the constant (k1 + 1) factor of the numerator), written out here over the same
    analysis (lowercase, stop words, Snowball stems)."""
    docs = analyse(corpus)
    terms = analyse([query])[0]
    average = sum(len(doc) for doc in docs) / len(docs)
    frequency = Counter(term for doc in docs for term in set(doc))
    scores = []
    for doc in docs:
        counts = Counter(doc)
        score = 0.0
        for term in terms:
            if counts[term] == 0:
                continue
            idf = math.log(1 + (len(docs) - frequency[term] + 0.5) / (frequency[term] + 0.5))
            norm = counts[term] + BM25_K1 * (1 - BM25_B + BM25_B * len(doc) / average)
            score += idf * counts[term] / norm
        scores.append(score)
    return scores


def test_lexical_mode_equals_an_independent_bm25(tenant: str) -> None:
    corpus = [*TRAVEL, "flights and more flights: flights every week", "a quiet week at home"]
    memories(tenant, "semantic", [{"id": f"d{i}", "content": text} for i, text in enumerate(corpus)])
    query = "long flights this week"

    result = api.retrieve(query, tenant, {"semantic": 5}, weights=RELEVANCE_ONLY, mode="lexical")

    expected = independent_bm25(corpus, query)
    got = result["results"]["long_term_memory"]
    best = [i for i in sorted(range(len(corpus)), key=lambda i: (-expected[i], f"d{i}")) if expected[i] > 0][:5]
    assert [item["scores"]["lexical"] for item in got] == pytest.approx([expected[i] for i in best], rel=1e-4)
    assert {item["id"] for item in got} == {f"d{i}" for i in best}  # lexical mode: matches only


def test_a_write_is_visible_to_lexical_search_at_once_and_rebuilds_only_what_it_wrote(tenant: str) -> None:
    memories(tenant, "semantic", [{"id": "a", "content": "grows basil on the balcony"}])
    memories(tenant, "episodic", [{"id": "b", "content": "user: remind me about the dentist"}])
    limits = {"semantic": 2, "episodic": 2}
    api.retrieve("warm up", tenant, limits, mode="lexical")

    memories(tenant, "semantic", [{"id": "c", "content": "bought a kumquat tree"}])
    result = api.retrieve("kumquat", tenant, limits, mode="lexical")

    assert ids(result)[0] == "c"
    assert result["timings_ms"]["matrix_cache"] == {"long_term_memory": "miss", "conversation_memory": "hit"}


TAGS = ["work", "home", "health"]
ROLES = ["user", "assistant"]


@pytest.fixture(scope="module")
def two_tenants() -> dict[str, list[dict[str, Any]]]:
    tenants: dict[str, list[dict[str, Any]]] = {}
    for t in range(2):
        name = f"filters-{t}-{os.getpid()}"
        items = [
            {
                "id": f"{name}-{i}",
                "content": f"note {i} about the weekly planning meeting and errands",
                "tags": [TAGS[i % 3], *([TAGS[(i + 1) % 3]] if i % 2 else [])],
                "role": ROLES[i % 2],
                "created_at": 1_700_000_000 + i * 86_400,
            }
            for i in range(12)
        ]
        api.forget(name)
        api.remember(name, "episodic", items)
        tenants[name] = items
    return tenants


def passes(item: dict[str, Any], filters: dict[str, Any]) -> bool:
    if "tags" in filters:
        wanted = set(filters["tags"])
        have = set(item["tags"])
        if filters.get("tags_match") == "all" and not wanted <= have:
            return False
        if filters.get("tags_match") != "all" and not wanted & have:
            return False
    if "role" in filters and item["role"] != filters["role"]:
        return False
    if "created_after" in filters and item["created_at"] < filters["created_after"]:
        return False
    return not ("created_before" in filters and item["created_at"] > filters["created_before"])


filter_sets = st.fixed_dictionaries(
    {},
    optional={
        "tags": st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True),
        "role": st.sampled_from(ROLES),
        "created_after": st.integers(0, 11).map(lambda d: 1_700_000_000 + d * 86_400),
        "created_before": st.integers(0, 11).map(lambda d: 1_700_000_000 + d * 86_400),
    },
).flatmap(
    lambda f: (
        st.just(f) if "tags" not in f else st.sampled_from(["any", "all"]).map(lambda match: {**f, "tags_match": match})
    )
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filters=filter_sets, mode=st.sampled_from(["hybrid", "vector", "lexical"]))
def test_filters_never_return_a_row_outside_them_or_another_tenants(
    two_tenants: dict[str, list[dict[str, Any]]], filters: dict[str, Any], mode: str
) -> None:
    if filters.get("created_after", 0) > filters.get("created_before", math.inf):
        return
    for tenant, items in two_tenants.items():
        result = api.retrieve("planning meeting", tenant, {"episodic": 12}, mode=mode, filters=filters)
        expected = {item["id"] for item in items if passes(item, filters)}
        assert set(ids(result, "conversation_memory")) == expected


BAD_FILTERS = [
    ({"tags": {"$in": ["work"]}}, "filters.tags"),
    ({"tags": ["$where"]}, "filters.tags"),
    ({"role": {"$ne": "user"}}, "filters.role"),
    ({"role": "$user"}, "filters.role"),
    ({"created_after": "yesterday"}, "filters.created_after"),
    ({"created_after": 20, "created_before": 10}, "filters.created_after"),
    ({"tags_match": "all"}, "filters.tags_match"),
    ({"colour": "red"}, "filters"),
    ("tags=work", "filters"),
]


@pytest.mark.parametrize(("filters", "field"), BAD_FILTERS)
def test_bad_filters_are_refused_by_the_client_naming_the_field(tenant: str, filters: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        api.retrieve("anything", tenant, {"semantic": 1}, filters=filters)
    assert caught.value.field == field


def test_an_unknown_mode_is_refused_by_the_client_the_cli_and_send_task(tenant: str, app: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        api.retrieve("anything", tenant, {"semantic": 1}, mode="fuzzy")
    assert caught.value.field == "mode"

    cli = subprocess.run(
        [*RETRIEVE_CLI, "anything", "--memory-id", tenant, "--limit", "semantic=1", "--mode", "fuzzy", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert cli.returncode == 2 and json.loads(cli.stdout)["field"] == "mode"

    sent = app.send_task("memq.retrieve", args=["anything", tenant, {"semantic": 1}], kwargs={"mode": "fuzzy"})
    with pytest.raises(InvalidInput) as raised:
        sent.get(timeout=30)
    assert raised.value.field == "mode"


def test_cli_filter_flags_reach_the_search(tenant: str) -> None:
    memories(
        tenant,
        "episodic",
        [
            {"id": "u", "content": "user: plan the team offsite", "role": "user", "tags": ["work", "plans"]},
            {"id": "a", "content": "assistant: offsite plan drafted", "role": "assistant", "tags": ["work"]},
        ],
    )
    cli = subprocess.run(
        [*RETRIEVE_CLI, "offsite plan", "--memory-id", tenant, "--limit", "episodic=5", *FILTER_FLAGS, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )

    assert cli.returncode == 0, cli.stderr
    assert ids(json.loads(cli.stdout), "conversation_memory") == ["u"]


def test_send_task_by_name_takes_mode_and_filters(tenant: str, app: Any) -> None:
    memories(
        tenant,
        "semantic",
        [{"id": "x", "content": "likes jazz", "tags": ["music"]}, {"id": "y", "content": "likes jazz bars"}],
    )

    sent = app.send_task(
        "memq.retrieve",
        args=["jazz", tenant, {"semantic": 5}],
        kwargs={"mode": "lexical", "filters": {"tags": ["music"]}},
    )

    assert ids(sent.get(timeout=30)) == ["x"]


@pytest.mark.skipif(not os.environ.get("MEMQ_TEST_REAL_MONGODB"), reason="$search needs a real Atlas/mongot")
def test_hybrid_in_atlas_finds_the_rare_code_and_keeps_filters_inside_both_pipelines(tenant: str) -> None:
    """On Atlas: ``$rankFusion`` of ``$vectorSearch`` and ``$search`` (or both lists fused in the worker)."""
    created = api.create_indexes()
    assert created["text_index_definition"]["type"] == "search"
    memories(tenant, "semantic", [{"id": f"t{i}", "content": text} for i, text in enumerate(TRAVEL)])
    memories(tenant, "semantic", [{"id": "rare", "content": RARE, "tags": ["storage"]}])
    other = {"id": "rare", "content": "locker QX7731 of another tenant", "tags": ["storage"]}
    memories(f"{tenant}-other", "semantic", [other])
    time.sleep(5)  # Atlas indexes asynchronously
    query = "vacation airfare and lodging QX7731"

    atlas = api.retrieve(query, tenant, {"semantic": 1}, weights=RELEVANCE_ONLY, strategy="vector_search")
    filtered = api.retrieve(
        query, tenant, {"semantic": 5}, weights=RELEVANCE_ONLY, strategy="vector_search", filters={"tags": ["work"]}
    )

    assert [item["content"] for item in atlas["results"]["long_term_memory"]] == [RARE]
    assert ids(filtered) == []


@pytest.mark.parametrize(
    ("flags", "field"),
    [(["--after", "yesterday"], "filters.created_after"), (["--role", "$admin"], "filters.role")],
)
def test_bad_filter_flags_are_refused_by_the_cli_in_one_line(tenant: str, flags: list[str], field: str) -> None:
    cli = subprocess.run(
        [*RETRIEVE_CLI, "anything", "--memory-id", tenant, "--limit", "semantic=1", *flags, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )

    assert cli.returncode == 2 and json.loads(cli.stdout)["field"] == field


@pytest.mark.parametrize(("filters", "field"), BAD_FILTERS[:4])
def test_bad_filters_sent_by_task_name_are_refused_naming_the_field(
    app: Any, tenant: str, filters: Any, field: str
) -> None:
    sent = app.send_task("memq.retrieve", args=["anything", tenant, {"semantic": 1}], kwargs={"filters": filters})

    with pytest.raises(InvalidInput) as raised:
        sent.get(timeout=30)
    assert raised.value.field == field
