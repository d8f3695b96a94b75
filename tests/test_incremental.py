"""A search after a write applies what changed, not the tenant (``workers.search.strategies.catch_up``), and answers
exactly
what a fresh full load answers: real Redis, real nx-27017, the real write path (``steps.store_memories``,
``steps.forget``) and the exact search functions in this process, no Celery; the last tests go through the
session fleet with ``memq.retrieve``."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from memq.core import keys
from memq.core.process_local import ProcessLocal
from memq.core.settings import get_settings
from memq.core.vectors import to_wire
from memq.workers import steps
from memq.workers.search import strategies
from memq.workers.search.single_flight import SingleFlight
from memq.workers.storage import reads, versions, writes

LTM = "long_term_memory"
DIMENSIONS = 384  # all-MiniLM-L6-v2
WORDS = [
    "ramen",
    "curry",
    "lighthouse",
    "violin",
    "marathon",
    "sourdough",
    "kyoto",
    "lisbon",
    "chess",
    "pottery",
    "tax",
    "jazz",
    "garden",
    "tomato",
    "cello",
    "sailing",
    "budget",
    "deadline",
    "meeting",
    "puppy",
]
TAGS = ("red", "blue", "green")
ROLES = ("user", "assistant", None)
MODES = ("vector", "lexical", "hybrid")
T0 = 1_700_000_000.0
FILTERS: list[dict[str, Any]] = [
    {},
    {"tags": ["red"]},
    {"tags": ["red", "blue"], "tags_match": "all"},
    {"role": "user"},
    {"created_after": T0 + 40 * 86400},
    {"created_before": T0 + 60 * 86400, "tags": ["green", "blue"]},
]


@pytest.fixture(autouse=True)
def fresh_process_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's own matrix cache and loads, as a fresh search process has."""
    monkeypatch.setattr(strategies, "matrix_cache", ProcessLocal(strategies.MatrixCache))
    monkeypatch.setattr(strategies, "matrix_loads", ProcessLocal(lambda: SingleFlight("matrix")))
    monkeypatch.setattr(strategies, "tenant_locks", ProcessLocal(lambda: strategies.KeyedLocks()))


def unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(DIMENSIONS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def memory(key: str, rng: random.Random) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": key,
        "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))),
        "importance": round(rng.random(), 2),
        "created_at": T0 + rng.randint(0, 100) * 86400,
        "tags": rng.sample(TAGS, k=rng.randint(0, 3)),
    }
    role = rng.choice(ROLES)
    if role is not None:
        item["role"] = role
    if rng.random() < 0.3:
        item["context"] = " ".join(rng.choice(WORDS) for _ in range(3))
    return item


def remember(tenant: str, items: list[dict[str, Any]], vectors: np.ndarray) -> None:
    """``memq.store``'s own step: the upserts, then the version bump that logs their ids."""
    embedded = {"vectors": [to_wire(vector) for vector in vectors], "model": get_settings().embed_model}
    steps.store_memories(embedded, tenant, LTM, items)


def fresh_full_load(tenant: str) -> strategies.TenantMatrix:
    """What a process that never saw the tenant loads: the whole tenant, now."""
    return strategies.load_tenant(tenant, LTM, -1, dimensions=DIMENSIONS)


def ranked(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (item["id"], item["content"], item.get("role"), tuple(item.get("tags") or ()), round(item["score"], 5))
        for item in items
    ]


def assert_same_as_a_fresh_load(tenant: str, queries: list[tuple[np.ndarray, str]], k: int = 8) -> None:
    fresh = fresh_full_load(tenant)
    for vector, text in queries:
        for mode in MODES:
            for filters in FILTERS:
                wanted = strategies.Wanted(query=text, mode=mode, filters=filters)
                got = strategies.exact_search(tenant, LTM, vector, k, wanted).items
                assert ranked(got) == ranked(strategies.top_k(fresh, vector, k, wanted)), (mode, filters)


def counts() -> tuple[int, int]:
    cache = strategies.matrix_cache.get()
    return cache.loads, cache.catch_ups


@pytest.fixture
def tenant() -> str:
    return f"incr-{uuid.uuid4().hex[:10]}"


def seeded_tenant(tenant: str, size: int, seed: int) -> tuple[random.Random, np.random.Generator, list[str]]:
    rng, vectors_rng = random.Random(seed), np.random.default_rng(seed)
    keys_pool = [f"m{i}" for i in range(size)]
    remember(tenant, [memory(key, rng) for key in keys_pool], np.stack([unit(vectors_rng) for _ in keys_pool]))
    return rng, vectors_rng, keys_pool


def queries_of(rng: random.Random, vectors_rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, str]]:
    return [(unit(vectors_rng), " ".join(rng.choice(WORDS) for _ in range(2))) for _ in range(count)]


# -- every search of the incremental path equals a fresh full load -----------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_random_remember_forget_and_re_remember_each_search_equals_a_fresh_full_load_in_every_mode_and_filter(
    tenant: str, seed: int
) -> None:
    rng, vectors_rng, pool = seeded_tenant(tenant, 120, seed)
    pool += [f"new{i}" for i in range(60)]
    queries = queries_of(rng, vectors_rng, 2)
    assert_same_as_a_fresh_load(tenant, queries)  # the cold load
    operations = 30
    for _ in range(operations):
        roll = rng.random()
        chosen = rng.sample(pool, k=rng.randint(1, 4))
        if roll < 0.55:  # new memories and re-sent ones (changed content, vector, tags, role)
            remember(tenant, [memory(key, rng) for key in chosen], np.stack([unit(vectors_rng) for _ in chosen]))
        elif roll < 0.85:  # some of these may not exist
            steps.forget(tenant, LTM, chosen)
        else:  # forgotten, then re-remembered under the same id
            steps.forget(tenant, LTM, chosen[:1])
            remember(tenant, [memory(chosen[0], rng)], unit(vectors_rng)[None, :])
        assert_same_as_a_fresh_load(tenant, queries)

    loads, catch_ups = counts()
    assert loads == 1  # the cold load; every write after it was applied
    assert catch_ups == operations


def test_new_memories_and_forgets_are_applied_from_the_log_and_only_re_sent_memories_are_read_back(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vectors_rng, pool = seeded_tenant(tenant, 50, 3)
    queries = queries_of(rng, vectors_rng, 2)
    assert_same_as_a_fresh_load(tenant, queries)
    read_back: list[list[str]] = []
    load_ids = reads.load_ids
    monkeypatch.setattr(
        reads,
        "load_ids",
        lambda memory_id, memory_type, ids: read_back.append(ids) or load_ids(memory_id, memory_type, ids),
    )

    remember(tenant, [memory(f"new{n}", rng) for n in range(3)], np.stack([unit(vectors_rng) for _ in range(3)]))
    assert_same_as_a_fresh_load(tenant, queries)
    steps.forget(tenant, LTM, [pool[0], "new1", "never-stored"])
    assert_same_as_a_fresh_load(tenant, queries)
    assert read_back == []  # the inserted documents and the deleted ids came with the change log

    remember(tenant, [memory(pool[1], rng), memory("new4", rng)], np.stack([unit(vectors_rng) for _ in range(2)]))
    assert_same_as_a_fresh_load(tenant, queries)
    assert read_back == [[keys.memory_object_id(tenant, pool[1])]]  # the re-sent one keeps fields it did not send
    assert counts() == (1, 3)


def test_a_write_overtaken_by_a_later_write_of_the_same_memory_is_read_back_not_replayed(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes of one memory whose spans overlap reach MongoDB in one order and Redis in the other: the earlier
    write's document must not be replayed over the later one's (``versions.BUMP_SCRIPT``)."""
    _, vectors_rng, _ = seeded_tenant(tenant, 20, 13)
    queries = [(unit(vectors_rng), "lighthouse")]
    assert_same_as_a_fresh_load(tenant, queries)
    upsert, overtaken = writes.upsert, []

    def then_a_later_write(memory_type: str, batch: list[Any]) -> Any:
        result = upsert(memory_type, batch)
        if not overtaken:  # between this write's upsert and its bump, another writer writes and bumps
            overtaken.append(True)
            remember(tenant, [{"id": "x", "content": "the later lighthouse write"}], unit(vectors_rng)[None, :])
        return result

    monkeypatch.setattr(writes, "upsert", then_a_later_write)
    remember(tenant, [{"id": "x", "content": "the earlier lighthouse write"}], queries[0][0][None, :])

    assert_same_as_a_fresh_load(tenant, queries)
    assert "the later lighthouse write" in {item["content"] for item in fresh_full_load(tenant).items}
    assert counts() == (1, 1)


def test_a_write_that_touches_nothing_searchable_and_a_bad_row_are_applied_as_a_reload_would(
    tenant: str, mongo_db: Any
) -> None:
    rng, vectors_rng, _ = seeded_tenant(tenant, 30, 4)
    queries = queries_of(rng, vectors_rng, 1)
    assert_same_as_a_fresh_load(tenant, queries)
    mongo_db[LTM].update_one({"_id": keys.memory_object_id(tenant, "m3")}, {"$set": {"embedding": "not a vector"}})
    with versions.bumped_whatever_happens(tenant, [LTM], [keys.memory_object_id(tenant, "m3")]):
        pass  # a hand edit that names what it touched
    steps.forget(tenant, LTM, ["never-stored"])

    assert_same_as_a_fresh_load(tenant, queries)
    assert "m3" not in {item["id"] for item in fresh_full_load(tenant).items}
    assert counts() == (1, 1)  # both versions in one catch-up


# -- what cannot be bridged is loaded whole -----------------------------------------------------------------------


def test_a_version_the_log_no_longer_holds_is_a_full_reload(tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng, vectors_rng, _ = seeded_tenant(tenant, 40, 5)
    queries = queries_of(rng, vectors_rng, 1)
    assert_same_as_a_fresh_load(tenant, queries)
    monkeypatch.setattr(versions, "CHANGE_LOG_MAX_ENTRIES", 2)
    for key in ("a", "b", "c"):  # three versions, the log keeps two
        remember(tenant, [memory(key, rng)], unit(vectors_rng)[None, :])

    assert_same_as_a_fresh_load(tenant, queries)
    assert counts() == (2, 0)
    remember(tenant, [memory("d", rng)], unit(vectors_rng)[None, :])
    assert_same_as_a_fresh_load(tenant, queries)
    assert counts() == (2, 1)  # caught up from the reloaded entry


def test_forget_without_ids_and_a_migration_say_everything_changed_and_reload(tenant: str) -> None:
    rng, vectors_rng, _ = seeded_tenant(tenant, 20, 6)
    queries = queries_of(rng, vectors_rng, 1)
    assert_same_as_a_fresh_load(tenant, queries)

    versions.bump_versions(tenant, [LTM])  # what scripts/migrate_object_ids.py does after moving a tenant
    assert_same_as_a_fresh_load(tenant, queries)
    steps.forget(tenant, LTM, None)
    assert_same_as_a_fresh_load(tenant, queries)

    assert counts() == (3, 0)
    assert strategies.exact_search(tenant, LTM, queries[0][0], 5, strategies.Wanted()).items == []


def test_more_changed_ids_than_a_fraction_of_the_tenant_reload_and_so_do_too_many_tombstones(
    tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategies, "CATCH_UP_MIN_IDS", 4)
    monkeypatch.setattr(strategies, "MIN_CAPACITY_ROWS", 8)
    rng, vectors_rng, pool = seeded_tenant(tenant, 40, 7)
    queries = queries_of(rng, vectors_rng, 1)
    assert_same_as_a_fresh_load(tenant, queries)

    many = pool[:12]  # more than a quarter of 40
    remember(tenant, [memory(key, rng) for key in many], np.stack([unit(vectors_rng) for _ in many]))
    assert_same_as_a_fresh_load(tenant, queries)
    assert counts() == (2, 0)

    for n in range(45):  # one at a time: caught up until the tombstones pass half the rows (the 41st update)
        remember(tenant, [memory(pool[n % 40], rng)], unit(vectors_rng)[None, :])
        assert_same_as_a_fresh_load(tenant, queries)
    assert counts() == (3, 44)


def test_a_cached_entry_newer_than_the_version_read_is_used_only_while_redis_still_holds_that_version(
    tenant: str,
) -> None:
    rng, vectors_rng, _ = seeded_tenant(tenant, 20, 8)
    vector = unit(vectors_rng)
    strategies.exact_search(tenant, LTM, vector, 3, strategies.Wanted())
    remember(tenant, [memory("late", rng)], unit(vectors_rng)[None, :])
    strategies.exact_search(tenant, LTM, vector, 3, strategies.Wanted())  # caught up to version 2
    assert strategies.load_shared(tenant, LTM, 1, DIMENSIONS).version == 2  # a search that read version 1 meanwhile
    assert counts() == (1, 1)

    versions.cache_redis.get().delete(keys.tenant_version(tenant, LTM))  # Redis lost its versions: 0 now
    assert strategies.load_shared(tenant, LTM, 0, DIMENSIONS).version == 0
    assert counts() == (2, 1)


# -- concurrent readers: older snapshots unmoved, forget exact ---------------------------------------------------


def test_a_search_holding_an_older_snapshot_is_unmoved_by_changes_applied_after_it(tenant: str) -> None:
    rng, vectors_rng, pool = seeded_tenant(tenant, 60, 9)
    queries = queries_of(rng, vectors_rng, 2)
    version = versions.read_versions(tenant, [LTM])[LTM]  # type: ignore[index]
    old = strategies.load_shared(tenant, LTM, version, DIMENSIONS)
    wanted = [strategies.Wanted(query=text, mode=mode) for _, text in queries for mode in MODES]
    before = [ranked(strategies.top_k(old, vector, 10, w)) for (vector, _) in queries for w in wanted]

    for n in range(40):  # enough appends to grow the buffers past their spare capacity
        chosen = rng.sample(pool, 3)
        steps.forget(tenant, LTM, chosen[:1])
        remember(tenant, [memory(key, rng) for key in [*chosen[1:], f"x{n}"]], np.stack([unit(vectors_rng)] * 3))
        strategies.exact_search(tenant, LTM, queries[0][0], 5, strategies.Wanted(query="ramen", mode="hybrid"))

    assert [ranked(strategies.top_k(old, vector, 10, w)) for (vector, _) in queries for w in wanted] == before
    assert counts()[1] == 40


def test_after_forget_returns_a_forgotten_memory_is_never_found_by_concurrent_readers_of_the_incremental_path(
    tenant: str,
) -> None:
    _, vectors_rng, _ = seeded_tenant(tenant, 150, 10)
    secret = {"id": "secret", "content": "the lighthouse keeper's secret code", "tags": ["red"], "role": "user"}
    secret_vector = unit(vectors_rng)
    wanted = [
        strategies.Wanted(query="lighthouse secret code", mode=mode, filters=filters)
        for mode in MODES
        for filters in ({}, {"tags": ["red"]}, {"role": "user"})
    ]
    state = {"generation": 0, "forgotten": True, "stop": False}
    lock = threading.Lock()
    violations: list[str] = []
    searches = [0]

    def read() -> None:
        n = 0
        while not state["stop"]:
            with lock:
                generation, forgotten = state["generation"], state["forgotten"]
            one = wanted[n % len(wanted)]
            found = {item["id"] for item in strategies.exact_search(tenant, LTM, secret_vector, 3, one).items}
            with lock:
                unchanged = state["generation"] == generation
                searches[0] += 1
            if forgotten and unchanged and "secret" in found:
                violations.append(f"{one} found it after forget returned")
            n += 1

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(15):
            with lock:
                state["generation"] += 1
                state["forgotten"] = False
            remember(tenant, [secret], secret_vector[None, :])
            found = strategies.exact_search(tenant, LTM, secret_vector, 3, wanted[0]).items
            assert "secret" in {item["id"] for item in found}
            steps.forget(tenant, LTM, ["secret"])
            with lock:
                state["forgotten"] = True
            for one in wanted:
                assert "secret" not in {
                    item["id"] for item in strategies.exact_search(tenant, LTM, secret_vector, 3, one).items
                }
            time.sleep(0.02)
    finally:
        state["stop"] = True
        for reader in readers:
            reader.join(30)

    assert violations == []
    assert searches[0] > 30
    loads, catch_ups = counts()
    assert loads == 1 and catch_ups >= 15


# -- cold loads stream: no list of every document ---------------------------------------------------------------


def test_a_cold_load_streams_the_cursor_into_growing_buffers(tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seeded_tenant(tenant, 2500, 12)
    largest_chunk = [0]
    real_append = strategies.RowStore.append

    def append(self: strategies.RowStore, docs: Any) -> list[Any]:
        largest_chunk[0] = max(largest_chunk[0], len(docs))
        return real_append(self, docs)

    monkeypatch.setattr(strategies.RowStore, "append", append)
    loaded_from = []
    real_load = reads.load_tenant
    monkeypatch.setattr(reads, "load_tenant", lambda *a: loaded_from.append(real_load(*a)) or loaded_from[-1])

    entry = strategies.load_tenant(tenant, LTM, 1, dimensions=DIMENSIONS)

    assert isinstance(loaded_from[0], Iterator)  # a cursor, never a list of the tenant's documents
    assert largest_chunk[0] == strategies.LOAD_CHUNK_ROWS
    assert entry.rows == 2500 and entry.store is not None
    assert entry.store.vectors.shape[0] < 2 * 2500  # grown by half its capacity at a time
    assert entry.matrix.base is entry.store.vectors or entry.matrix.base is entry.store.vectors.base


# -- through the fleet: memq.retrieve ----------------------------------------------------------------------------


def search_worker_info(app: Any, fleet: Any) -> dict[str, Any]:
    from memq.core import names

    host = next(host for host in fleet.workers if host.startswith("search@"))
    replies = app.control.broadcast(names.INFO_COMMAND, destination=[host], reply=True, timeout=5.0) or []
    return next(reply[host] for reply in replies if host in reply)["matrix_cache"]


def test_through_the_fleet_each_retrieval_after_a_remember_or_forget_is_caught_up_not_reloaded(
    app: Any, fleet: Any, tenant: str
) -> None:
    from memq.client import api

    api.remember(tenant, "semantic", [{"content": f"note {i} about {WORDS[i]}", "id": f"n{i}"} for i in range(20)])
    ask = {"weights": {"relevance": 1}, "timeout_s": 60}
    api.retrieve("ramen", tenant, {"semantic": 3}, **ask)
    before = search_worker_info(app, fleet)

    api.remember(tenant, "semantic", [{"content": "slurped ramen in Kyoto last night", "id": "kyoto"}])
    first = api.retrieve("ramen Kyoto", tenant, {"semantic": 3}, **ask)
    api.forget(tenant, "semantic", ids=["kyoto"])
    second = api.retrieve("ramen Kyoto night", tenant, {"semantic": 3}, **ask)

    assert first["results"]["long_term_memory"][0]["id"] == "kyoto"
    assert "kyoto" not in {item["id"] for item in second["results"]["long_term_memory"]}
    after = search_worker_info(app, fleet)
    assert after["loads"] == before["loads"]
    assert after["catch_ups"] - before["catch_ups"] == 2


MEMORIES_50K = 50_000


def write_directly(tenant: str, count: int, seed: int) -> None:
    """The real write functions (``writes.build_writes``, ``writes.upsert``, the version bump) with random unit
    vectors, so that the test does not embed 50,000 texts; one bump, as after an import."""
    rng = np.random.default_rng(seed)
    touched = []
    for start in range(0, count, 1000):  # each bulk write well within the client's socket timeout
        size = min(1000, count - start)
        vectors = rng.standard_normal((size, DIMENSIONS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [
            {"id": f"m{i}", "content": f"memory {i} about {WORDS[i % len(WORDS)]}"} for i in range(start, start + size)
        ]
        batch = writes.build_writes(tenant, LTM, items, vectors, get_settings().embed_model, time.time())
        writes.upsert(LTM, batch)
        touched += [keys.memory_object_id(tenant, item["id"]) for item in items]
    versions.bump_versions(tenant, [LTM], touched)  # more ids than the log takes: "anything changed"


def test_eight_concurrent_first_retrievals_of_a_50000_memory_tenant_right_after_its_import_all_answer_in_30_s(
    app: Any, fleet: Any, tenant: str, mongo_db: Any
) -> None:
    from memq.client import api

    mongo_db[LTM].create_index([("memory_id", 1)])  # nx-27017 plans an equality through a single-field index only
    write_directly(tenant, MEMORIES_50K, seed=13)
    api.remember(tenant, "semantic", [{"content": "the newest memory: a trip to Lisbon in May"}])
    outcomes: list[Any] = [None] * 8

    def retrieve(i: int) -> None:
        started = time.monotonic()
        try:
            result = api.retrieve(f"{WORDS[i]} question {i}", tenant, {"semantic": 5}, timeout_s=30)
        except Exception as exc:
            result = exc
        outcomes[i] = (result, time.monotonic() - started)

    threads = [threading.Thread(target=retrieve, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    failures = [outcome for outcome in outcomes if not isinstance(outcome[0], dict) or outcome[0]["errors"]]
    assert failures == []
    assert all(len(result["results"]["long_term_memory"]) == 5 for result, _ in outcomes)

    before = search_worker_info(app, fleet)
    api.remember(tenant, "semantic", [{"content": "a later memory: ferry to Porto", "id": "porto"}])
    result = api.retrieve("ferry to Porto", tenant, {"semantic": 5}, weights={"relevance": 1}, timeout_s=30)
    assert result["errors"] == {} and result["results"]["long_term_memory"][0]["id"] == "porto"
    after = search_worker_info(app, fleet)
    assert after["loads"] == before["loads"] and after["catch_ups"] == before["catch_ups"] + 1
