"""The search worker's bounds, without services: single-flight loads, the matrix cache's byte budget, the result's
byte budget, and lexical top-k by partial selection."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from memq.core.vectors import normalise
from memq.errors import InvalidInput, StoreUnavailable, WorkerBusy
from memq.workers.search import strategies
from memq.workers.search.result_size import bound_result_bytes, item_bytes
from memq.workers.search.single_flight import FlightTimeout, SingleFlight
from memq.workers.storage import mongo

# -- single-flight ---------------------------------------------------------------------------------------------


class Gate:
    """A load that blocks until released, counting its calls."""

    def __init__(self, value: Any = "matrix") -> None:
        self.value = value
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.deadline_seen: list[float | None] = []

    def __call__(self) -> Any:
        self.calls += 1
        self.deadline_seen.append(mongo.deadline_ts())
        self.entered.set()
        assert self.release.wait(30)
        return self.value


def run_in_threads(count: int, call: Any) -> list[Any]:
    outcomes: list[Any] = [None] * count

    def one(i: int) -> None:
        try:
            outcomes[i] = call()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return [threads, outcomes]


def test_eight_threads_asking_for_the_same_key_share_one_load() -> None:
    flights: SingleFlight[str, Any] = SingleFlight()
    gate = Gate(value=object())
    threads, outcomes = run_in_threads(8, lambda: flights.run("tenant/v1", gate, wait_s=30))
    assert gate.entered.wait(10)
    time.sleep(0.2)  # let every thread reach the flight
    gate.release.set()
    for thread in threads:
        thread.join(30)

    assert gate.calls == 1 and flights.started == 1
    assert all(outcome is gate.value for outcome in outcomes)
    assert flights.in_flight() == 0


def test_a_waiter_whose_deadline_passes_times_out_while_the_load_goes_on_and_fills_the_cache() -> None:
    flights: SingleFlight[str, Any] = SingleFlight()
    cache: dict[str, str] = {}
    gate = Gate()

    def load() -> str:
        value = gate()
        cache["tenant/v1"] = value
        return value

    patient_threads, patient = run_in_threads(1, lambda: flights.run("tenant/v1", load, wait_s=30))
    assert gate.entered.wait(10)

    with pytest.raises(FlightTimeout):
        flights.run("tenant/v1", load, wait_s=0.05)
    assert flights.in_flight() == 1 and cache == {}  # the impatient caller left; the load did not

    gate.release.set()
    patient_threads[0].join(30)
    assert patient == ["matrix"] and cache == {"tenant/v1": "matrix"} and gate.calls == 1


def test_the_caller_that_started_a_load_may_give_up_without_cutting_it_short() -> None:
    flights: SingleFlight[str, Any] = SingleFlight()
    gate = Gate()
    with pytest.raises(FlightTimeout):
        flights.run("tenant/v1", gate, wait_s=0.05)
    gate.release.set()
    assert flights.run("tenant/v1", lambda: "second load", wait_s=10) in {"matrix", "second load"}
    assert gate.calls == 1


def test_the_load_runs_without_the_callers_mongodb_budget() -> None:
    flights: SingleFlight[str, Any] = SingleFlight()
    gate = Gate()
    gate.release.set()
    with mongo.time_limit(5):
        assert mongo.deadline_ts() is not None
        flights.run("tenant/v1", gate, wait_s=10)
    assert gate.deadline_seen == [None]


def test_a_failed_load_fails_every_waiter_and_the_next_call_loads_again() -> None:
    flights: SingleFlight[str, Any] = SingleFlight()
    release = threading.Event()

    def failing() -> str:
        assert release.wait(30)
        raise StoreUnavailable("MongoDB unavailable: connection refused")

    threads, outcomes = run_in_threads(3, lambda: flights.run("k", failing, wait_s=30))
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(30)

    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
    assert flights.run("k", lambda: "loaded", wait_s=10) == "loaded"
    assert flights.started == 2


def test_a_search_whose_budget_runs_out_waiting_gets_mongodb_unavailable_and_the_load_fills_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(strategies, "matrix_loads", strategies.ProcessLocal(lambda: SingleFlight("matrix")))
    monkeypatch.setattr(strategies, "matrix_cache", strategies.ProcessLocal(strategies.MatrixCache))
    entry = strategies.TenantMatrix(3, [{"id": "a"}], np.ones((1, 2), dtype=np.float32))
    gate = Gate(entry)

    def load(memory_id: str, memory_type: str, version: int, dimensions: int) -> strategies.TenantMatrix:
        loaded = gate()
        strategies.matrix_cache.get().put((memory_id, memory_type), loaded)
        return loaded

    monkeypatch.setattr(strategies, "load_into_cache", load)

    with pytest.raises(StoreUnavailable, match=r"MongoDB unavailable: .* timed out"), mongo.time_limit(0.1):
        strategies.load_shared("tenant", "long_term_memory", 3, 2)
    gate.release.set()
    deadline = time.monotonic() + 10
    while strategies.matrix_cache.get().get(("tenant", "long_term_memory"), 3) is None and time.monotonic() < deadline:
        time.sleep(0.01)

    assert strategies.matrix_cache.get().get(("tenant", "long_term_memory"), 3) is entry
    assert gate.calls == 1


# -- the model's dimension, from the query vector -----------------------------------------------------------------


def test_a_query_vector_of_another_dimension_than_a_cached_tenant_s_is_refused_and_the_entry_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(strategies, "matrix_cache", strategies.ProcessLocal(strategies.MatrixCache))
    monkeypatch.setattr(strategies.versions, "read_versions", lambda memory_id, types: dict.fromkeys(types, 1))
    entry = strategies.TenantMatrix(1, [{"id": "a"}], np.ones((1, 384), dtype=np.float32))
    strategies.matrix_cache.get().put(("tenant", "long_term_memory"), entry)

    with pytest.raises(InvalidInput) as refused:
        strategies.exact_search("tenant", "long_term_memory", np.ones(5, dtype=np.float32), 3, strategies.Wanted())

    assert refused.value.field == "embedded" and "stored vectors have 384" in refused.value.message
    assert strategies.matrix_cache.get().get(("tenant", "long_term_memory"), 1, 384) is entry


def test_a_cached_entry_of_another_dimension_is_not_the_matrix_of_a_query() -> None:
    cache = strategies.MatrixCache()
    cache.put(("tenant", "long_term_memory"), strategies.TenantMatrix(1, [], np.zeros((0, 5), dtype=np.float32)))

    assert cache.get(("tenant", "long_term_memory"), 1, 384) is None  # reloaded at the query's dimension
    assert cache.get(("tenant", "long_term_memory"), 1, 5) is not None


# -- the matrix cache's byte budget ------------------------------------------------------------------------------


def cached_entry(rows: int, content_bytes: int = 10, version: int = 1) -> strategies.TenantMatrix:
    items = [{"id": f"m{i}", "content": "x" * content_bytes} for i in range(rows)]
    return strategies.TenantMatrix(version, items, np.zeros((rows, 8), dtype=np.float32))


def test_an_entry_counts_its_vectors_its_items_content_and_its_bm25_index() -> None:
    plain = cached_entry(4, content_bytes=10)
    wordy = cached_entry(4, content_bytes=1010)
    indexed = strategies.build_matrix([], 1, dimensions=8)
    indexed.lexical = strategies.LexicalIndex([f"memory {i} about hiking and jazz" for i in range(50)])

    assert strategies.entry_nbytes(plain) == 4 * 8 * 4 + 4 * (strategies.ITEM_OVERHEAD_BYTES + 10 + 2)
    assert strategies.entry_nbytes(wordy) - strategies.entry_nbytes(plain) == 4 * 1000
    assert strategies.entry_nbytes(indexed) >= indexed.lexical.nbytes() > 0


def test_a_replaced_entry_frees_its_bytes() -> None:
    cache = strategies.MatrixCache()
    cache.put(("a", "t"), cached_entry(10, version=1))
    cache.put(("a", "t"), cached_entry(5, version=2))

    assert cache.nbytes == strategies.entry_nbytes(cached_entry(5)) and cache.get(("a", "t"), 2) is not None
    assert len(cache) == 1 and cache.vectors == 5


# -- the result's byte budget ------------------------------------------------------------------------------------


def ranked(prefix: str, sizes: list[int]) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{rank}", "content": "x" * size} for rank, size in enumerate(sizes)]


def merged_with(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"query": "q", "memory_id": "t", "results": results, "errors": {}, "cached": False}


def test_a_result_within_its_byte_budget_is_returned_whole_and_says_it_is_not_truncated() -> None:
    results = {"long_term_memory": ranked("s", [100, 100]), "conversation_memory": ranked("e", [50])}
    bounded = bound_result_bytes(merged_with(results), max_bytes=250)
    assert bounded["results"] == results and bounded["truncated"] is False and "truncated_items" not in bounded


def test_past_the_byte_budget_the_lowest_ranked_items_are_dropped_rank_by_rank_across_types() -> None:
    results = {"long_term_memory": ranked("s", [100, 100, 100, 100]), "conversation_memory": ranked("e", [100, 100])}
    bounded = bound_result_bytes(merged_with(results), max_bytes=450)

    assert [i["id"] for i in bounded["results"]["long_term_memory"]] == ["s0", "s1"]
    assert [i["id"] for i in bounded["results"]["conversation_memory"]] == ["e0", "e1"]
    assert bounded["truncated"] is True
    assert bounded["truncated_items"] == {"long_term_memory": 2}


def test_an_item_that_does_not_fit_drops_everything_ranked_after_it_so_no_type_has_a_gap() -> None:
    results = {"long_term_memory": ranked("s", [10, 1000, 10]), "conversation_memory": ranked("e", [10, 10, 10])}
    bounded = bound_result_bytes(merged_with(results), max_bytes=500)

    assert [i["id"] for i in bounded["results"]["long_term_memory"]] == ["s0"]
    assert [i["id"] for i in bounded["results"]["conversation_memory"]] == ["e0"]
    assert bounded["truncated_items"] == {"long_term_memory": 2, "conversation_memory": 2}


def test_content_is_counted_in_utf8_bytes_and_metadata_as_json() -> None:
    assert item_bytes({"content": "é" * 10}) == 20
    assert item_bytes({"content": "ab", "metadata": {"k": "v"}}) == 2 + len('{"k": "v"}')


def test_merge_applies_the_byte_budget_after_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    from memq.workers import steps

    monkeypatch.setattr(steps, "MAX_RESULT_BYTES", 250)
    items = [
        {"id": f"m{i}", "content": "x" * 100, "score": 1.0 - i / 10, "importance": 0.5, "created_at_ts": None}
        for i in range(4)
    ]
    search_result = {"type": "long_term_memory", "items": items, "search_ms": 1.0}
    request = {
        "query": "q",
        "memory_id": "t",
        "limits": {"long_term_memory": 4},
        "weights": {"relevance": 1.0, "recency": 0.0, "importance": 0.0},
    }

    merged = steps.merge([search_result], request)  # type: ignore[arg-type]

    assert [item["id"] for item in merged["results"]["long_term_memory"]] == ["m0", "m1"]
    assert merged["truncated"] is True and merged["truncated_items"] == {"long_term_memory": 2}


# -- top-k by partial selection ----------------------------------------------------------------------------------


def full_sort_top_k(entry: strategies.TenantMatrix, query: np.ndarray, k: int, wanted: strategies.Wanted) -> list[str]:
    """The ranking as top_k defines it, without any selection: every row's exact cosine, every row sorted by (fused,
    cosine, id)."""
    vector = entry.matrix.astype(np.float64) @ normalise(query).astype(np.float64)
    lexical = entry.lexical.scores(wanted.query) if wanted.mode != "vector" else np.zeros(len(entry.items))
    fused = strategies.ranking.fuse(vector, lexical, wanted.mode)
    rows = [i for i in range(len(entry.items)) if wanted.mode != "lexical" or lexical[i] > 0]  # lexical: matches only
    order = sorted(rows, key=lambda i: (-fused[i], -vector[i], entry.items[i]["id"]))
    return [entry.items[i]["id"] for i in order[:k]]


def lexical_tenant(size: int, seed: int) -> strategies.TenantMatrix:
    rng = np.random.default_rng(seed)
    words = ["alpine", "hiking", "sourdough", "piano", "jazz", "taxes", "marathon", "curry"]
    texts = [" ".join(rng.choice(words, 2)) if i % 50 == 0 else f"note {i}" for i in range(size)]
    matrix = rng.standard_normal((size, 8)).astype(np.float32)
    matrix[::7] = matrix[0]  # many rows tied on cosine too
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = [f"m{(i * 7919) % size:05d}" for i in range(size)]  # ids out of row order
    return strategies.TenantMatrix(
        1, [{"id": i, "content": t} for i, t in zip(ids, texts, strict=True)], matrix, strategies.LexicalIndex(texts)
    )


@pytest.mark.parametrize("k", [1, 5, 30, 200])
@pytest.mark.parametrize("query", ["jazz piano", "sourdough", "no such word", "hiking alpine curry"])
@pytest.mark.parametrize("mode", ["lexical", "vector", "hybrid"])
def test_top_k_by_partial_selection_ranks_as_a_full_sort_ties_included(k: int, query: str, mode: str) -> None:
    entry = lexical_tenant(2000, seed=k)
    vector = entry.matrix[3] + 0.0  # the query points exactly at a row that 1 in 7 rows share
    wanted = strategies.Wanted(query=query, mode=mode)

    got = [item["id"] for item in strategies.top_k(entry, vector, k, wanted)]

    assert got == full_sort_top_k(entry, vector, k, wanted)


def test_a_lexical_query_with_fewer_matches_than_k_returns_only_the_matches() -> None:
    entry = lexical_tenant(2000, seed=1)
    wanted = strategies.Wanted(query="sourdough", mode="lexical")

    got = strategies.top_k(entry, entry.matrix[3] + 0.0, 100, wanted)

    assert 0 < len(got) < 100 and all(item["scores"]["lexical"] > 0 for item in got)


def stored_doc(key: str, vector: np.ndarray) -> dict[str, Any]:
    return {"_id": f"id-{key}", "memory_id": "t", "key": key, "content": f"about {key}", "embedding": vector.tolist()}


def near_twins_tenant(size: int, seed: int) -> strategies.TenantMatrix:
    """Rows in clusters of near twins (apart by less than fp16 can tell), with words, roles, tags and dates to filter
    on, ids out of row order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((size // 20, 384)).astype(np.float32)
    matrix = centres[rng.integers(len(centres), size=size)] + rng.standard_normal((size, 384)).astype(np.float32) * 1e-4
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    words = ["alpine", "hiking", "sourdough", "piano", "jazz", "taxes"]
    texts = [" ".join(rng.choice(words, 2)) if i % 3 else f"note {i}" for i in range(size)]
    items = [{"id": f"m{(i * 7919) % size:05d}", "content": text} for i, text in enumerate(texts)]
    return strategies.TenantMatrix(
        1,
        items,
        matrix,
        strategies.LexicalIndex(texts),
        created_ts=np.arange(size, dtype=np.float64),
        roles=[("user", "assistant", None)[i % 3] for i in range(size)],
        tags=[frozenset({f"t{i % 4}"}) for i in range(size)],
    )


@pytest.mark.parametrize("mode", ["vector", "hybrid", "lexical"])
@pytest.mark.parametrize(
    "filters", [{}, {"role": "user"}, {"tags": ["t1", "t2"]}, {"created_after": 2500.0, "tags": ["t3"]}]
)
def test_the_fp16_and_float32_estimates_leave_out_only_rows_that_cannot_be_in_the_top_k(
    mode: str, filters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = near_twins_tenant(4000, seed=len(filters))
    halved = dataclasses.replace(entry, half=entry.matrix.astype(np.float16))
    queries = [entry.matrix[5] + 0.0, entry.matrix[17] + 1e-4, np.random.default_rng(3).standard_normal(384)]
    for query in queries:
        for k in (1, 10, 100):
            wanted = strategies.Wanted(query="jazz piano", mode=mode, filters=filters)
            with monkeypatch.context() as every_row_scored:
                every_row_scored.setattr(strategies, "HALF_SCORE_ERROR", 10.0)
                expected = strategies.top_k(halved, query.astype(np.float32), k, wanted)

            assert strategies.top_k(halved, query.astype(np.float32), k, wanted) == expected
            assert strategies.top_k(entry, query.astype(np.float32), k, wanted) == expected  # float32 estimate


def test_equal_memories_tie_and_the_id_decides_in_every_mode_wherever_their_rows_sit() -> None:
    rng = np.random.default_rng(0)
    matrix = normalise(rng.standard_normal((1003, 384)).astype(np.float32))
    matrix[1::2] = normalise(rng.standard_normal(384).astype(np.float32))  # one memory, written 501 times
    texts = ["jazz" if i % 2 else "other words" for i in range(1003)]
    items = [{"id": f"m{i:05d}", "content": text} for i, text in enumerate(texts)]
    entry = strategies.TenantMatrix(1, items, matrix, strategies.LexicalIndex(texts))

    for _ in range(10):
        query = rng.standard_normal(384).astype(np.float32)
        for mode in ("vector", "hybrid", "lexical"):
            wanted = strategies.Wanted(query="jazz", mode=mode)
            equal = [item for item in strategies.top_k(entry, query, 5, wanted) if item["content"] == "jazz"]

            assert [item["id"] for item in equal] == sorted(item["id"] for item in equal), mode
            assert len({json.dumps(item["scores"]) for item in equal}) <= 1, mode


def test_a_query_whose_squares_underflow_float32_is_still_scored_as_a_unit_vector() -> None:
    entry = near_twins_tenant(2000, seed=9)
    halved = dataclasses.replace(entry, half=entry.matrix.astype(np.float16))
    tiny = (entry.matrix[7] * 1e-22).astype(np.float32)  # finite, but its squares are below float32's range

    assert np.isclose(np.linalg.norm(normalise(tiny).astype(np.float64)), 1.0)
    for mode in ("vector", "hybrid"):
        wanted = strategies.Wanted(query="jazz", mode=mode)
        got, expected = (
            strategies.top_k(halved, tiny, 5, wanted),
            strategies.top_k(entry, entry.matrix[7] + 0.0, 5, wanted),
        )

        assert [item["id"] for item in got] == [item["id"] for item in expected], mode
        assert np.allclose([item["score"] for item in got], [item["score"] for item in expected], atol=1e-6), mode


def test_the_fp16_first_pass_scores_exactly_only_a_shortlist() -> None:
    entry = near_twins_tenant(4000, seed=0)
    query = normalise(np.random.default_rng(3).standard_normal(384).astype(np.float32))
    everything = np.arange(entry.rows)
    lexical = entry.lexical.scores("jazz piano") if entry.lexical is not None else np.zeros(entry.rows)
    halved = dataclasses.replace(entry, half=entry.matrix.astype(np.float16))

    for mode in ("vector", "hybrid"):
        rows, _, _ = strategies.scored_rows(halved, query, everything, lexical, 10, mode)

        assert 10 <= rows.size < entry.rows // 10, mode


def test_a_tenant_past_the_fp16_threshold_keeps_an_fp16_copy_in_step_with_its_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(strategies, "HALF_SCORING_MIN_ROWS", 30)
    rows = strategies.RowStore(dimensions=8, capacity_rows=0)
    vectors = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    docs = [stored_doc(f"m{i}", vectors[i]) for i in range(2000)]

    rows.append(docs[:20])
    assert rows.snapshot(1).half is None
    for start in range(20, 2000, 300):  # past the threshold, then past the first capacity
        rows.append(docs[start : start + 300])
    snapshot = rows.snapshot(2)

    assert snapshot.half is not None and snapshot.half.dtype == np.float16
    assert np.array_equal(snapshot.half, snapshot.matrix.astype(np.float16))


# -- loads in flight -----------------------------------------------------------------------------------------------


def test_loads_of_five_cold_tenants_run_at_most_two_at_a_time_and_each_fills_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(strategies, "matrix_loads", strategies.ProcessLocal(lambda: SingleFlight("matrix")))
    monkeypatch.setattr(strategies, "matrix_cache", strategies.ProcessLocal(strategies.MatrixCache))
    monkeypatch.setattr(strategies, "load_slots", strategies.ProcessLocal(lambda: threading.BoundedSemaphore(2)))
    lock = threading.Lock()
    running, most_at_once = [0], [0]

    def load_tenant(memory_id: str, memory_type: str) -> list[dict[str, Any]]:
        with lock:
            running[0] += 1
            most_at_once[0] = max(most_at_once[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return []

    monkeypatch.setattr(strategies.reads, "load_tenant", load_tenant)
    outcomes: list[strategies.TenantMatrix] = []
    threads = [
        threading.Thread(
            target=lambda n=n: outcomes.append(strategies.load_shared(f"t{n}", "long_term_memory", 1, 384))
        )
        for n in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(outcomes) == 5
    assert most_at_once[0] == 2
    assert all(strategies.matrix_cache.get().get((f"t{n}", "long_term_memory"), 1) is not None for n in range(5))


def test_a_search_whose_load_still_waits_for_a_slot_is_told_the_worker_is_busy_not_that_mongodb_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(strategies, "matrix_loads", strategies.ProcessLocal(lambda: SingleFlight("matrix")))
    monkeypatch.setattr(strategies, "matrix_cache", strategies.ProcessLocal(strategies.MatrixCache))
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(strategies, "load_slots", strategies.ProcessLocal(lambda: slots))
    monkeypatch.setattr(strategies.reads, "load_tenant", lambda memory_id, memory_type: [])
    slots.acquire()  # another tenant's load holds the only slot

    busy = pytest.raises(WorkerBusy, match=r"search worker busy: .* still waiting for a load slot")
    with busy, mongo.time_limit(0.2):
        strategies.load_shared("tenant", "long_term_memory", 1, 384)
    slots.release()
    deadline = time.monotonic() + 10
    while strategies.matrix_cache.get().get(("tenant", "long_term_memory"), 1) is None and time.monotonic() < deadline:
        time.sleep(0.01)

    assert strategies.matrix_cache.get().get(("tenant", "long_term_memory"), 1) is not None  # the load went on
    assert strategies.load_phases == {}


def test_with_redis_down_an_uncached_load_also_waits_for_a_slot_within_the_search_s_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(strategies, "load_slots", strategies.ProcessLocal(lambda: slots))
    loaded: list[str] = []
    monkeypatch.setattr(strategies.reads, "load_tenant", lambda memory_id, memory_type: loaded.append(memory_id) or [])
    slots.acquire()

    with pytest.raises(WorkerBusy, match=r"no load slot .* within 0\.2 s"), mongo.time_limit(0.2):
        strategies.load_uncached("tenant", "long_term_memory", 384)
    assert loaded == []
    slots.release()

    with mongo.time_limit(5):
        assert strategies.load_uncached("tenant", "long_term_memory", 384).items == []
    assert loaded == ["tenant"] and slots.acquire(blocking=False)  # the slot was given back
