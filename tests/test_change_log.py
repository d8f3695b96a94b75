"""The change log beside each tenant data version (``workers.storage.versions``), and the incremental BM25 index
(``workers.search.lexical``) that applies changes exactly: real Redis, real nx-27017, the real write path
(``steps.store_memories`` / ``steps.forget``), ``bm25s`` as the reference for the scores."""

from __future__ import annotations

import base64
import json
import random
import uuid
from typing import Any

import bm25s
import bson
import numpy as np
import pytest
import redis
import Stemmer

from bench import corpus
from memq.core import keys
from memq.core.settings import get_settings
from memq.core.vectors import from_stored, to_wire
from memq.errors import StoreUnavailable
from memq.ops import services
from memq.workers import steps
from memq.workers.search import lexical
from memq.workers.search.lexical import BM25_B, BM25_K1, STOPWORDS, LexicalIndex, LexicalWriter, analyse
from memq.workers.storage import reads, versions

LTM = "long_term_memory"


def change_log(memory_id: str, memory_type: str) -> list[dict[str, Any]]:
    raw = versions.cache_redis.get().lrange(keys.change_log(memory_id, memory_type), 0, -1)
    return [json.loads(line) for line in raw]


def version_of(memory_id: str, memory_type: str) -> int:
    known = versions.read_versions(memory_id, [memory_type])
    assert known is not None
    return known[memory_type]


def embedded(count: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, 384)).astype(np.float32)
    return {"vectors": [to_wire(vector) for vector in vectors], "model": get_settings().embed_model}


def ids_between(memory_id: str, held_version: int, version: int) -> set[str] | None:
    changes = versions.changes_between(memory_id, LTM, held_version, version)
    return None if changes is None else changes.ids


def fresh_tenant() -> str:
    return f"log-{uuid.uuid4().hex[:10]}"


# -- the log itself --------------------------------------------------------------------------------------------


def test_a_bump_logs_the_ids_it_touched_under_the_version_it_made_in_every_type() -> None:
    tenant = fresh_tenant()
    types = [LTM, "conversation_memory"]
    with versions.bumped_whatever_happens(tenant, types, ["b", "a"]):
        pass
    with versions.bumped_whatever_happens(tenant, types, ["c"]):
        pass

    for memory_type in types:
        assert version_of(tenant, memory_type) == 2
        assert change_log(tenant, memory_type) == [{"v": 1, "ids": ["a", "b"]}, {"v": 2, "ids": ["c"]}]
    assert ids_between(tenant, 0, 2) == {"a", "b", "c"}
    assert ids_between(tenant, 1, 2) == {"c"}
    assert ids_between(tenant, 2, 2) == set()


def test_a_search_holding_the_current_version_reads_no_log_entry_and_one_behind_reads_just_the_newer_ones() -> None:
    tenant = fresh_tenant()
    for touched in (["a"], ["b"], ["c"]):
        with versions.bumped_whatever_happens(tenant, [LTM], touched):
            pass

    assert versions.read_version_and_log(tenant, LTM, 3) == (3, [])
    version, tail = versions.read_version_and_log(tenant, LTM, 1) or (None, [])
    assert version == 3 and [json.loads(entry)["ids"] for entry in tail] == [["b"], ["c"]]


def test_a_write_that_fails_part_way_still_logs_the_ids_it_may_have_touched() -> None:

    tenant = fresh_tenant()
    with pytest.raises(StoreUnavailable), versions.bumped_whatever_happens(tenant, [LTM], ["x1", "x2"]):
        raise StoreUnavailable("MongoDB unavailable: the batch was written in part")

    assert change_log(tenant, LTM) == [{"v": 1, "ids": ["x1", "x2"]}]


def test_without_ids_or_with_more_than_the_cap_the_log_says_anything_changed_and_cannot_bridge() -> None:
    tenant = fresh_tenant()
    with versions.bumped_whatever_happens(tenant, [LTM], ["a"]):
        pass
    with versions.bumped_whatever_happens(tenant, [LTM]):
        pass
    with versions.bumped_whatever_happens(tenant, [LTM], [f"id{i}" for i in range(versions.CHANGE_LOG_MAX_IDS + 1)]):
        pass

    assert [entry["ids"] for entry in change_log(tenant, LTM)][1:] == [None, None]
    assert ids_between(tenant, 0, 1) == {"a"}
    assert versions.changes_between(tenant, LTM, 0, 2) is None
    assert versions.changes_between(tenant, LTM, 2, 3) is None


def test_the_log_is_bounded_expires_and_a_version_it_no_longer_holds_cannot_be_bridged() -> None:
    tenant = fresh_tenant()
    for n in range(versions.CHANGE_LOG_MAX_ENTRIES + 3):
        with versions.bumped_whatever_happens(tenant, [LTM], [f"m{n}"]):
            pass

    logged = change_log(tenant, LTM)
    assert len(logged) == versions.CHANGE_LOG_MAX_ENTRIES
    assert logged[-1] == {"v": versions.CHANGE_LOG_MAX_ENTRIES + 3, "ids": [f"m{versions.CHANGE_LOG_MAX_ENTRIES + 2}"]}
    ttl_ms = versions.cache_redis.get().pttl(keys.change_log(tenant, LTM))
    assert 0 < ttl_ms <= versions.CHANGE_LOG_TTL_MS
    assert versions.changes_between(tenant, LTM, 0, 5) is None  # versions 1..3 were trimmed
    assert ids_between(tenant, 3, 5) == {"m3", "m4"}
    versions.cache_redis.get().delete(keys.change_log(tenant, LTM))  # evicted, or expired
    assert versions.changes_between(tenant, LTM, 3, 5) is None


def test_with_redis_unreachable_the_log_cannot_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{services.free_port()}/0", socket_connect_timeout=0.25)
    monkeypatch.setattr(versions.cache_redis, "get", lambda: dead)

    assert versions.changes_between("t", LTM, 0, 1) is None


def test_store_and_forget_log_the_stored_ids_of_their_memories_and_forget_all_logs_everything() -> None:
    tenant = fresh_tenant()
    items = [{"content": "grows tomatoes", "id": "garden"}, {"content": "plays the cello"}]
    steps.store_memories(embedded(2), tenant, LTM, items)
    stored = sorted(keys.memory_object_id(tenant, key) for key in ("garden", keys.content_key("plays the cello")))
    steps.forget(tenant, LTM, ["garden"])
    steps.forget(tenant, None, None)

    assert [{"v": entry["v"], "ids": entry["ids"]} for entry in change_log(tenant, LTM)] == [
        {"v": 1, "ids": stored},
        {"v": 2, "ids": [keys.memory_object_id(tenant, "garden")]},
        {"v": 3, "ids": None},
    ]
    assert change_log(tenant, "workflow_memory") == [{"v": 1, "ids": None}]


def as_read(doc: dict[str, Any] | None) -> dict[str, Any]:
    """A stored document with its embedding decoded (nx-27017 returns the vector's raw bytes, not ``Binary``)."""
    assert doc is not None
    return {**doc, "embedding": from_stored(doc["embedding"]).tolist()}


def test_a_store_logs_the_documents_it_inserted_as_mongodb_holds_them_and_a_forget_the_ids_it_deleted() -> None:
    tenant = fresh_tenant()
    garden, cello = (keys.memory_object_id(tenant, key) for key in ("garden", "cello"))
    steps.store_memories(embedded(1), tenant, LTM, [{"content": "grows tomatoes", "id": "garden", "tags": ["g"]}])
    first = reads.load_ids(tenant, LTM, [garden])[0]
    steps.store_memories(embedded(1, seed=1), tenant, LTM, [{"content": "grows basil", "id": "garden"}])  # re-sent
    steps.store_memories(embedded(1, seed=2), tenant, LTM, [{"content": "plays the cello", "id": "cello"}])

    inserted = versions.changes_between(tenant, LTM, 0, 1)
    assert inserted is not None and set(inserted.known) == {garden}
    assert as_read(inserted.known[garden]) == as_read(first)
    re_sent = versions.changes_between(tenant, LTM, 1, 2)
    assert re_sent is not None and re_sent.ids == {garden} and re_sent.known == {}  # it kept its tags: read back
    both = versions.changes_between(tenant, LTM, 0, 3)
    assert both is not None and both.ids == {garden, cello} and set(both.known) == {cello}  # the latest entry decides
    assert as_read(both.known[cello]) == as_read(reads.load_ids(tenant, LTM, [cello])[0])

    steps.forget(tenant, LTM, ["garden"])
    assert versions.changes_between(tenant, LTM, 3, 4) == versions.Changes(ids={garden}, known={garden: None})


def test_a_forget_strips_every_memorys_content_from_the_log_and_later_searches_read_mongodb() -> None:
    """A forgotten memory's content and vector do not outlive the forget in Redis, even when it failed part-way."""
    tenant = fresh_tenant()
    steps.store_memories(
        embedded(2),
        tenant,
        LTM,
        [{"content": "secret: the safe's code is 4711", "id": "safe"}, {"content": "likes jazz", "id": "jazz"}],
    )
    assert "known" in change_log(tenant, LTM)[0]

    steps.forget(tenant, LTM, ["safe"])

    log = change_log(tenant, LTM)
    assert [entry["v"] for entry in log] == [1, 2]
    assert "known" not in log[0]  # the store's documents (content and vector) are gone from Redis
    safe, jazz = (keys.memory_object_id(tenant, key) for key in ("safe", "jazz"))
    assert versions.changes_between(tenant, LTM, 0, 2) == versions.Changes(ids={safe, jazz}, known={safe: None})

    steps.store_memories(embedded(1, seed=3), tenant, LTM, [{"content": "plays chess", "id": "chess"}])
    with pytest.raises(StoreUnavailable), versions.bumped_whatever_happens(tenant, [LTM], [jazz], deletes=True):
        raise StoreUnavailable("MongoDB unavailable: connection reset during the delete")
    assert not any("known" in entry for entry in change_log(tenant, LTM))


def test_a_write_another_bump_of_the_tenant_overtook_logs_its_ids_alone() -> None:
    """Two writes whose spans overlap may reach MongoDB in one order and Redis in the other: the later bump sees a
    version it did not read before it began, and leaves out what it knows, so the reader reads MongoDB."""
    tenant = fresh_tenant()
    with versions.bumped_whatever_happens(tenant, [LTM], ["a"]) as write:
        steps.store_memories(embedded(1), tenant, LTM, [{"content": "in between", "id": "b"}])
        write.known = {"a": None}
    log = change_log(tenant, LTM)
    assert [entry["v"] for entry in log] == [1, 2] and "known" in log[0] and "known" not in log[1]
    assert versions.changes_between(tenant, LTM, 1, 2) == versions.Changes(ids={"a"}, known={})


def test_a_write_that_failed_or_knows_too_much_logs_its_ids_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = fresh_tenant()
    with pytest.raises(StoreUnavailable), versions.bumped_whatever_happens(tenant, [LTM], ["a"]) as write:
        write.known = {"a": None}
        raise StoreUnavailable("MongoDB unavailable: connection reset after the delete")
    monkeypatch.setattr(versions, "CHANGE_LOG_MAX_KNOWN_BYTES", 100)
    steps.store_memories(embedded(1), tenant, LTM, [{"content": "a long memory " * 20, "id": "b"}])

    assert ["known" in entry for entry in change_log(tenant, LTM)] == [False, False]


# -- BM25 applied change by change equals bm25s and a fresh index ------------------------------------------------


def corpus_texts(count: int, seed: int) -> list[str]:
    texts = [str(memory["content"]) for memory in corpus.memories(LTM, count, seed)]
    texts += ["", "the a of", "我喜欢吃泰国咖喱", "ramen ramen ramen ramen in Kyoto", "🍜 Ramen!"]
    return texts


QUERIES = ["Thai curry", "ramen in Kyoto", "violin lessons Lisbon", "咖喱", "🍜", "the", "running running", "zzz"]


def bm25s_scores(texts: list[str], query: str) -> np.ndarray:
    reference = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
    reference.index(analyse(texts), show_progress=False)
    terms = [term for term in analyse([query])[0] if term in reference.vocab_dict]
    return np.asarray(reference.get_scores(terms), dtype=np.float64) if terms else np.zeros(len(texts))


def test_ascii_text_is_analysed_as_bm25s_tokenizes_it_punctuation_splitting_words() -> None:
    texts = [
        "Don't stop-believing: it's 3pm, e-mail me@example.com!",
        "snake_case and CamelCase (v2.0) -- ok? #tags",
        "The runners were running quickly; RAN, runs...",
        "a I x y",
        "",
        "C++/C# and Node.js <3 ~~ ^_^ $5 100%",
    ]
    stemmer = Stemmer.Stemmer("english")
    expected = bm25s.tokenize(texts, stopwords=list(STOPWORDS), stemmer=stemmer, return_ids=False, show_progress=False)

    assert analyse(texts) == expected


def test_bm25_scores_equal_bm25s_lucene_on_a_corpus() -> None:
    texts = corpus_texts(400, seed=3)
    index = LexicalIndex(texts)
    for query in QUERIES:
        np.testing.assert_allclose(index.scores(query), bm25s_scores(texts, query), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail_max_postings", [lexical.TAIL_MAX_POSTINGS, 40])  # 40: most commits make a segment
def test_bm25_after_random_adds_and_removes_equals_a_fresh_index_of_the_alive_rows_and_bm25s(
    tail_max_postings: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lexical, "TAIL_MAX_POSTINGS", tail_max_postings)
    rng = random.Random(11)
    pool = corpus_texts(600, seed=5)
    writer = LexicalWriter()
    texts: list[str] = []  # row -> text
    alive = np.zeros(0, dtype=bool)
    for step in range(60):
        added = [rng.choice(pool) for _ in range(rng.randint(0, 12))]
        writer.add(len(texts), added)
        texts += added
        alive = np.concatenate([alive, np.ones(len(added), dtype=bool)])
        for row in rng.sample(list(np.flatnonzero(alive)), k=min(rng.randint(0, 6), int(alive.sum()))):
            alive[row] = False
            writer.remove(int(row))
        writer.commit(alive)
        view = writer.view(len(texts), alive.copy())
        if step % 6 or not alive.any():
            continue
        kept = [texts[row] for row in np.flatnonzero(alive)]
        fresh = LexicalIndex(kept)
        assert len(writer.segments) <= 8
        for query in QUERIES:
            got = view.scores(query)
            assert not got[~alive].any()
            np.testing.assert_allclose(got[alive], fresh.scores(query), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got[alive], bm25s_scores(kept, query), rtol=1e-5, atol=1e-6)


def test_a_snapshot_of_the_index_is_unmoved_by_changes_applied_after_it() -> None:
    writer = LexicalWriter()
    texts = corpus_texts(200, seed=8)
    writer.add(0, texts)
    writer.commit(None)
    before = writer.view(len(texts), None)
    expected = {query: before.scores(query) for query in QUERIES}

    alive = np.ones(len(texts) + 50, dtype=bool)
    writer.add(len(texts), corpus_texts(45, seed=9))
    for row in range(0, 100, 3):
        alive[row] = False
        writer.remove(row)
    writer.commit(alive)

    for query in QUERIES:
        np.testing.assert_array_equal(before.scores(query), expected[query])


def entry_knowing(docs: list[dict[str, Any]]) -> bytes:
    known = base64.b64encode(bson.encode({"docs": docs, "gone": []}))
    return b'{"v": 2, "ids": ["m1"], "known": "' + known + b'"}'


@pytest.mark.parametrize(
    "hostile",
    [
        b"not json",
        b"[1]",
        b'{"v": "2", "ids": []}',
        b'{"v": 2, "ids": [1]}',
        b'{"v": 2}',
        b"\xff\x00",
        b'{"v": 2, "ids": ["m1"], "known": "not base64!"}',
        b'{"v": 2, "ids": ["m1"], "known": "AAAA"}',
        entry_knowing([{"_id": "not-in-ids", "memory_id": "t"}]),
        b'{"v": 2, "ids": ["m1"], "known": 7}',
        entry_knowing([{"_id": "m1", "memory_id": "another tenant"}]),  # applied unread: must be this tenant's
    ],
)
def test_a_change_log_entry_memq_did_not_write_makes_the_log_unbridgeable_not_a_search_error(hostile: bytes) -> None:
    tenant = fresh_tenant()
    with versions.bumped_whatever_happens(tenant, [LTM], ["m1"]):
        pass
    versions.cache_redis.get().rpush(keys.change_log(tenant, LTM), hostile)  # anyone with access to the cache Redis

    assert versions.changes_between(tenant, LTM, 0, 2) is None  # the search reloads the tenant instead
