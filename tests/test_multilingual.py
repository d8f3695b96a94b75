"""Lexical search beyond English: Chinese, Japanese, Korean, emoji and accented text are found by their own words,
however the text is spelled (NFC, NFD, full-width, case), and lexical mode returns only what matches."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest

from memq.client import api
from memq.workers.search.lexical import LexicalIndex, analyse

pytestmark = pytest.mark.usefixtures("fleet")

#: A small multilingual set: each query must find its memory by lexical search alone.
MEMORIES = [
    "我喜欢吃泰国咖喱",  # Chinese: I like Thai curry
    "私は毎朝コーヒーを飲みます",  # Japanese: I drink coffee every morning
    "저는 주말마다 등산을 합니다",  # Korean: I go hiking every weekend
    "Friday night is 🍕 night with the kids",
    unicodedata.normalize("NFD", "Zoë moved to Köln last spring"),  # decomposed accents
    "Ｒｅｓｅｒｖｅｄ a table at Ｌｅ Ｂｅｒｎａｒｄｉｎ",  # full-width Latin
    "Он любит кататься на лыжах",  # Russian: he likes skiing
    "The runners were running through the park",
]
QUERIES = {
    "咖喱": 0,
    "コーヒー": 1,
    "등산": 2,
    "🍕": 3,
    "Köln": 4,  # NFC query, NFD memory
    "zoë": 4,
    "reserved bernardin": 5,
    "лыжах": 6,
    "RUN": 7,
}


def test_each_script_is_analysed_into_terms_that_its_queries_share() -> None:
    index = LexicalIndex(MEMORIES)

    for query, expected in QUERIES.items():
        scores = index.scores(query)
        assert int(scores.argmax()) == expected and scores[expected] > 0, (query, analyse([query]))


def test_english_analysis_is_unchanged_stop_words_dropped_and_stemmed() -> None:
    assert analyse(["The runners were running quickly"]) == [["runner", "run", "quick"]]


@pytest.fixture(scope="module")
def multilingual_tenant() -> str:
    import uuid

    tenant = f"multilingual-{uuid.uuid4().hex[:8]}"
    api.remember(tenant, "semantic", MEMORIES)
    return tenant


@pytest.mark.parametrize("query", list(QUERIES))
def test_a_lexical_retrieval_finds_the_memory_in_its_own_script(query: str, multilingual_tenant: str) -> None:
    result = api.retrieve(query, multilingual_tenant, {"semantic": 3}, mode="lexical")

    found = result["results"]["long_term_memory"]
    assert found, result["errors"]
    assert unicodedata.normalize("NFC", found[0]["content"]) == unicodedata.normalize("NFC", MEMORIES[QUERIES[query]])
    assert all(item["scores"]["lexical"] > 0 for item in found)  # only matches, never zero-score padding


def test_a_lexical_query_that_matches_nothing_returns_nothing(multilingual_tenant: str) -> None:
    result = api.retrieve("submarine", multilingual_tenant, {"semantic": 3}, mode="lexical")

    assert result["results"]["long_term_memory"] == [] and result["errors"] == {}


def test_an_nfd_and_an_nfc_query_are_one_query(multilingual_tenant: str, cache_redis: Any) -> None:
    nfc = api.retrieve("Köln", multilingual_tenant, {"semantic": 1}, mode="lexical")
    nfd = api.retrieve(unicodedata.normalize("NFD", "Köln"), multilingual_tenant, {"semantic": 1}, mode="lexical")

    assert nfd["cached"] is True and nfd["results"] == nfc["results"]


#: Memories whose text changes under the text form (``memq.core.field_rules.text_form``), beside plain near-twins.
UNUSUAL_FORMS = [
    "Ｒｅｓｅｒｖｅｄ ｔａｂｌｅ ａｔ ｔｅｎ",  # full-width Latin
    "The ﬁnal ﬁle is ready",  # ligatures
    "Meet in room Ⅻ at ⑩, it is 5 ㎞ from the ㍿ office",  # compatibility characters
]
PLAIN_NEIGHBOURS = [
    "Reserved a table at nine",
    "The first draft of the file is ready",
    "Meet in room 11 at nine, it is 4 km from the office",
    "Booked seats for ten at the theatre",
]


@pytest.fixture(scope="module")
def unusual_forms_tenant() -> str:
    import uuid

    tenant = f"forms-{uuid.uuid4().hex[:8]}"
    api.remember(tenant, "semantic", [*UNUSUAL_FORMS, *PLAIN_NEIGHBOURS])
    return tenant


@pytest.mark.parametrize("text", UNUSUAL_FORMS)
def test_a_memory_searched_with_its_own_text_scores_one_and_ranks_first_whatever_its_unicode_form(
    text: str, unusual_forms_tenant: str
) -> None:
    result = api.retrieve(
        text,
        unusual_forms_tenant,
        {"semantic": 3},
        mode="vector",
        weights={"relevance": 1, "recency": 0, "importance": 0},
    )

    [first, *_] = result["results"]["long_term_memory"]
    assert first["content"] == text  # stored and returned as written
    assert first["scores"]["vector"] == pytest.approx(1.0, abs=1e-3)
