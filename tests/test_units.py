"""Plain functions, no services: validation, ranking, vector codecs, settings, the matrix cache."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from memq.core import field_rules, ranking, wire
from memq.core.memory_types import MemoryType
from memq.core.settings import Settings
from memq.core.vectors import from_stored, from_wire, to_bson, to_wire
from memq.errors import ConfigError, InvalidInput
from memq.workers.search.strategies import MatrixCache, TenantMatrix, top_k

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("alias", "expected"),
    [("semantic", "long_term_memory"), ("episodic", "conversation_memory"), ("procedural", "workflow_memory")],
)
def test_aliases_name_memorizz_types(alias: str, expected: str) -> None:
    assert field_rules.check_memory_type(alias) is MemoryType(expected)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: field_rules.check_query(""), "query"),
        (lambda: field_rules.check_query("   "), "query"),
        (lambda: field_rules.check_query("x" * (field_rules.MAX_QUERY_CHARS + 1)), "query"),
        (lambda: field_rules.check_query(b"bytes"), "query"),
        (lambda: field_rules.check_memory_id({"$ne": None}), "memory_id"),
        (lambda: field_rules.check_memory_id({"$gt": ""}), "memory_id"),
        (lambda: field_rules.check_memory_id("$where"), "memory_id"),
        (lambda: field_rules.check_memory_id(""), "memory_id"),
        (lambda: field_rules.check_memory_id(42), "memory_id"),
        (lambda: field_rules.check_memory_type("dreams"), "type"),
        (lambda: field_rules.check_limits({}), "limits"),
        (lambda: field_rules.check_limits({"semantic": 0}), "limits['semantic']"),
        (lambda: field_rules.check_limits({"semantic": 101}), "limits['semantic']"),
        (lambda: field_rules.check_limits({"semantic": True}), "limits['semantic']"),
        (lambda: field_rules.check_limits({"semantic": 1, "long_term_memory": 2}), "limits"),
        (lambda: field_rules.check_limits({"nightmares": 1}), "limits['nightmares']"),
        (lambda: field_rules.check_weights({"relevance": -1}), "weights['relevance']"),
        (lambda: field_rules.check_weights({"relevance": math.nan}), "weights['relevance']"),
        (lambda: field_rules.check_weights({"relevance": 0, "recency": 0, "importance": 0}), "weights"),
        (lambda: field_rules.check_weights({"fame": 1}), "weights"),
        (lambda: field_rules.check_weights([1, 2]), "weights"),
        (lambda: field_rules.check_timeout(0), "timeout_s"),
        (lambda: field_rules.check_items([]), "items"),
        (lambda: field_rules.check_items("text"), "items"),
        (lambda: field_rules.check_items([{"content": ""}]), "items[0].content"),
        (lambda: field_rules.check_items([{"content": "x", "importance": 2}]), "items[0].importance"),
        (lambda: field_rules.check_items([{"content": "x", "metadata": {"$set": 1}}]), "items[0].metadata"),
        (lambda: field_rules.check_items([{"content": "x", "colour": "red"}]), "items[0]"),
        (lambda: field_rules.check_items([{"content": "x"}] * (field_rules.MAX_BATCH_ITEMS + 1)), "items"),
        (
            lambda: field_rules.check_items([{"content": "x", "created_at": "yesterday"}]),
            "items[0].created_at",
        ),
        (lambda: field_rules.check_ids("abc"), "ids"),
    ],
)
def test_bad_input_names_the_field(call: object, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        call()  # type: ignore[operator]
    assert caught.value.field == field
    assert str(caught.value).startswith(field)


def test_limits_accept_aliases_and_values() -> None:
    assert field_rules.check_limits({"semantic": 3, "toolbox": 1}) == {"long_term_memory": 3, "toolbox": 1}


def test_items_are_normalised_with_defaults() -> None:
    [item] = field_rules.check_items([{"content": "hi", "id": 7, "created_at": "2026-01-01T00:00:00"}])
    assert item == {"content": "hi", "id": "7", "importance": 0.5, "created_at": 1767225600.0}


def test_relevance_only_ranking_keeps_cosine_order() -> None:
    items = [
        {"id": str(i), "score": s, "importance": imp} for i, (s, imp) in enumerate([(0.9, 0), (0.5, 1), (-0.2, 1)])
    ]
    ranked = ranking.rank_type(items, 3, {"relevance": 1, "recency": 0, "importance": 0}, 0.0, 3600)
    assert [i["id"] for i in ranked] == ["0", "1", "2"]


def test_recency_halves_every_half_life() -> None:
    assert ranking.recency(0, 3600, 3600) == pytest.approx(0.5)
    assert ranking.recency(0, 7200, 3600) == pytest.approx(0.25)
    assert ranking.recency(100, 50, 3600) == 1.0


def test_recency_is_the_age_since_created_at_whatever_else_an_item_carries() -> None:
    old = {"id": "old", "score": 0.5, "created_at_ts": 0.0, "last_accessed_at_ts": 7200.0, "updated_at_ts": 7200.0}
    new = {"id": "new", "score": 0.5, "created_at_ts": 3600.0}

    ranked = ranking.rank_type([old, new], 2, {"relevance": 0, "recency": 1, "importance": 0}, 7200, 3600)

    assert [item["id"] for item in ranked] == ["new", "old"]
    assert ranked[1]["scores"]["recency"] == pytest.approx(0.25)


def test_a_memory_without_created_at_counts_as_old_never_as_recent() -> None:
    assert ranking.item_recency({"id": "hand-written", "score": 0.5}, 7200, 3600) == 0.0


def test_memory_signal_is_the_weighted_mean_of_its_terms_each_normalised_over_the_candidates() -> None:
    items = [
        {"id": "a", "score": 0.8, "importance": 0.2, "created_at_ts": 0.0},
        {"id": "b", "score": 0.4, "importance": 0.6, "created_at_ts": 3600.0},
        {"id": "c", "score": 0.6, "importance": 0.4, "created_at_ts": 3600.0},
    ]
    weights = {"relevance": 1.0, "recency": 1.0, "importance": 2.0}

    ranked = {item["id"]: item for item in ranking.rank_type(items, 3, weights, 3600, 3600)}

    assert ranked["a"]["memory_signal"] == pytest.approx((1.0 + 0.0 + 0.0) / 4)
    assert ranked["b"]["memory_signal"] == pytest.approx((0.0 + 1.0 + 2 * 1.0) / 4)
    assert ranked["c"]["memory_signal"] == pytest.approx((0.5 + 1.0 + 2 * 0.5) / 4)
    assert ranked["a"]["scores"]["recency"] == pytest.approx(0.5) and ranked["b"]["scores"]["importance"] == 0.6


def test_a_barely_related_important_memory_does_not_outrank_a_clearly_relevant_one_under_default_weights() -> None:
    same_day = 1_000_000.0
    barely = {"id": "barely", "score": 0.10, "importance": 0.9, "created_at_ts": same_day}
    clearly = {"id": "clearly", "score": 0.50, "importance": 0.3, "created_at_ts": same_day}

    ranked = ranking.rank_type([barely, clearly], 2, field_rules.check_weights(None), same_day, 7 * 24 * 3600)

    assert [item["id"] for item in ranked] == ["clearly", "barely"]


def test_hybrid_fusion_ranks_a_memory_strong_on_both_signals_first_and_keeps_each_mode_pure() -> None:
    vector = np.array([0.9, 0.2, 0.6])
    lexical = np.array([0.0, 9.0, 5.0])

    assert np.argmax(ranking.fuse(vector, lexical, "hybrid")) == 2
    assert ranking.fuse(vector, lexical, "vector").tolist() == vector.tolist()
    assert ranking.fuse(vector, lexical, "lexical").tolist() == lexical.tolist()


def test_candidates_are_oversampled_only_when_other_signals_count() -> None:
    assert ranking.candidates_for(5, {"relevance": 1, "recency": 0, "importance": 0}, 3) == 5
    assert ranking.candidates_for(5, {"relevance": 1, "recency": 1, "importance": 0}, 3) == 15


def test_vectors_round_trip_on_the_wire_and_at_rest() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    assert np.array_equal(from_wire(to_wire(vector)), vector)
    stored = to_bson(vector)
    assert np.array_equal(from_stored(stored), vector)
    assert np.array_equal(from_stored(bytes(stored)), vector)  # nx-27017 returns plain bytes
    assert np.allclose(from_stored(vector.tolist()), vector)


def test_exact_top_k_is_sorted_by_cosine_with_id_tie_break() -> None:
    matrix = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    entry = TenantMatrix(1, [{"id": i} for i in ("b", "c", "a", "d")], matrix)
    got = top_k(entry, np.array([1, 0], dtype=np.float32), 3)
    assert [i["id"] for i in got] == ["a", "b", "d"]
    assert [i["score"] for i in got] == pytest.approx([1, 1, 0.6])


def test_the_matrix_cache_serves_an_entry_only_at_its_own_data_version() -> None:
    cache = MatrixCache()
    cache.put(("a", "t"), TenantMatrix(1, [{"id": "0"}], np.zeros((1, 2), dtype=np.float32)))

    assert cache.get(("a", "t"), 1) is not None
    assert cache.get(("a", "t"), 2) is None  # a newer tenant version never reads the old matrix


def test_settings_parse_types_and_refuse_bad_values() -> None:
    settings = Settings.from_env({"MEMQ_SEARCH_SHARDS": "32", "MEMQ_RECENCY_HALF_LIFE_S": "60.5"})
    assert settings.search_shards == 32 and settings.recency_half_life_s == 60.5
    assert settings.cache_redis_url == settings.broker_url
    with pytest.raises(ConfigError, match="MEMQ_SEARCH_STRATEGY"):
        Settings.from_env({"MEMQ_SEARCH_STRATEGY": "fuzzy"})
    with pytest.raises(ConfigError, match="MEMQ_SEARCH_SHARDS"):
        Settings.from_env({"MEMQ_SEARCH_SHARDS": "many"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEMQ_RETRIEVE_TIMEOUT_S", "0"),
        ("MEMQ_RETRIEVE_TIMEOUT_S", "-inf"),
        ("MEMQ_MAX_DELIVERIES", "-5"),
        ("MEMQ_RESULT_CACHE_TTL_S", "-1"),
        ("MEMQ_RECENCY_HALF_LIFE_S", "nan"),
        ("MEMQ_RECENCY_HALF_LIFE_S", "inf"),
        ("MEMQ_SEARCH_MAX_RSS_BYTES", "0"),
        ("MEMQ_EMBED_DEVICE", "tpu"),
        ("MEMQ_EMBED_DEVICE", "cuda:x"),
        ("MEMQ_METRICS_PORT", "65536"),
        ("MEMQ_VISIBILITY_TIMEOUT_S", "0"),
    ],
)
def test_a_setting_out_of_its_range_is_refused_naming_the_variable_and_what_it_accepts(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})

    assert str(caught.value).startswith(f"{variable} must be ")
    assert repr(value) in str(caught.value)


def test_the_range_in_the_message_is_the_fields_own() -> None:
    with pytest.raises(ConfigError, match=r"MEMQ_RETRIEVE_TIMEOUT_S must be in \(0, 3600\] \(a finite number\)"):
        Settings.from_env({"MEMQ_RETRIEVE_TIMEOUT_S": "0"})
    with pytest.raises(ConfigError, match=r"MEMQ_MAX_DELIVERIES must be in 1\.\.1000 \(a whole number\)"):
        Settings.from_env({"MEMQ_MAX_DELIVERIES": "-5"})


@pytest.mark.parametrize(
    ("variable", "replacement"),
    [
        ("MEMQ_EXACT_CACHE_MAX_BYTES", "MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("MEMQ_EXACT_CACHE_MAX_VECTORS", "MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("MEMQ_MERGE_IN_FLIGHT_MAX_BYTES", "MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("MEMQ_SEARCH_RSS_HEADROOM_BYTES", "derived from MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("MEMQ_MALLOC_ARENA_MAX", "glibc's own MALLOC_ARENA_MAX"),
        ("MEMQ_MALLOC_MMAP_THRESHOLD_BYTES", "glibc's own MALLOC_MMAP_THRESHOLD_"),
        ("MEMQ_MONGODB_POOL_SIZE", "`maxPoolSize` in MEMQ_MONGODB_URI"),
        ("MEMQ_MONGODB_TIMEOUT_MS", "`socketTimeoutMS` in MEMQ_MONGODB_URI"),
        ("MEMQ_EMBED_DIMENSIONS", "taken from the embed model's vectors"),
        ("MEMQ_EMBED_BATCH_SIZE", "now a constant of the code (64 texts per forward pass"),
        ("MEMQ_NUM_CANDIDATES_FACTOR", "now a constant of the code (numCandidates = 20 x k"),
        ("MEMQ_CANDIDATE_OVERSAMPLE", "now a constant of the code (3 candidates per k"),
        ("MEMQ_EXACT_LOADS_IN_FLIGHT", "memory is bounded by MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("MEMQ_EXACT_LOAD_TIMEOUT_S", "as long as its own deadline allows"),
        ("MEMQ_MAX_QUERY_CHARS", "now a constant of the code (4096 characters"),
        ("MEMQ_MAX_CONTENT_CHARS", "now a constant of the code (32768 characters"),
        ("MEMQ_MAX_BATCH_ITEMS", "`remember_numbered` and `memq remember --file` take any number"),
        ("MEMQ_MAX_RESULT_BYTES", "now a constant of the code (8 MiB of items per retrieval"),
        ("MEMQ_EMBEDDING_CACHE_TTL_S", "MEMQ_RESULT_CACHE_TTL_S=0 turns both off"),
        ("MEMQ_SINGLE_FLIGHT_LOCK_S", "derived from MEMQ_RETRIEVE_TIMEOUT_S"),
        ("MEMQ_RESULT_EXPIRES_S", "MEMQ_VISIBILITY_TIMEOUT_S and MEMQ_RETRIEVE_TIMEOUT_S"),
        ("MEMQ_SEARCH_MAX_RETRIES", "now a constant of the code (3 retries"),
        ("MEMQ_DEAD_LETTER_MAX", "now a constant of the code (10000 dead letters"),
        ("MEMQ_DEAD_LETTER_MAX_BYTES", "now a constant of the code (whole messages of at most 1 MiB"),
        ("MEMQ_DEAD_LETTER_TTL_S", "now a constant of the code (whole messages kept 7 days"),
    ],
)
def test_a_removed_setting_still_set_is_refused_naming_what_replaced_it(variable: str, replacement: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: "2", "MEMQ_RETRIEVE_TIMEOUT_S": "5"})

    assert str(caught.value).startswith(f"{variable} was removed: ")
    assert replacement in str(caught.value)


def test_a_removed_setting_set_empty_counts_as_unset_like_any_other() -> None:
    assert Settings.from_env({"MEMQ_MALLOC_ARENA_MAX": ""}).search_max_rss_bytes == 3 * 1024**3


def test_no_removed_setting_is_a_setting_again() -> None:
    from memq.core.settings import REMOVED_SETTINGS, variables

    assert set(REMOVED_SETTINGS).isdisjoint(variables())


def test_an_operator_has_at_most_20_settings_each_saying_when_to_change_it() -> None:
    from memq.core.settings import markdown_table

    rows = markdown_table().splitlines()[2:]

    assert 0 < len(rows) <= 20
    assert all(
        re.search(r"\b(Set|Change|Raise|Lower)\b", info.description or "") for info in Settings.model_fields.values()
    )


def test_every_memq_variable_the_code_names_is_a_setting_a_removed_one_or_a_test_one() -> None:
    from memq.core.settings import REMOVED_SETTINGS, variables

    product = [p for folder in ("memq", "workers", "tasks", "config") for p in (ROOT / folder).rglob("*.py")]
    named = {name for p in product for name in re.findall(r"MEMQ_[A-Z0-9_]*[A-Z0-9]", p.read_text())}

    assert named - set(variables()) - set(REMOVED_SETTINGS) == set()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_every_device_the_embedder_knows_is_accepted(device: str) -> None:
    assert Settings.from_env({"MEMQ_EMBED_DEVICE": device}).embed_device == device


def test_keyword_construction_validates_like_the_environment_and_keeps_the_defaults() -> None:
    settings = Settings(broker_url="redis://broker:6379/1", result_backend="redis://broker:6379/1")

    assert settings.broker_url == "redis://broker:6379/1" and settings.mongodb_db == Settings().mongodb_db
    with pytest.raises(ConfigError, match="MEMQ_RECENCY_HALF_LIFE_S"):
        Settings(recency_half_life_s=math.nan)
    with pytest.raises(ConfigError, match="unknown setting 'brokr_url'"):
        Settings(brokr_url="redis://broker:6379/1")
    with pytest.raises(ValueError, match="frozen"):
        settings.broker_url = "redis://elsewhere:6379/0"  # type: ignore[misc]


def test_a_secret_setting_is_never_echoed_in_its_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(flower_basic_auth=["admin:hunter2"])  # type: ignore[arg-type]

    assert "MEMQ_FLOWER_BASIC_AUTH" in str(caught.value) and "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(Settings(flower_basic_auth="admin:hunter2"))


def test_an_empty_variable_counts_as_unset() -> None:
    assert Settings.from_env({"MEMQ_RETRIEVE_TIMEOUT_S": "", "MEMQ_EMBED_DEVICE": ""}) == Settings()


def test_every_number_setting_has_a_lower_and_an_upper_bound() -> None:
    from memq.core.settings import number_range

    numbers = [name for name, info in Settings.model_fields.items() if info.annotation in (int, float)]

    assert numbers and all("None" not in number_range(name) for name in numbers)


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(MEMQ_[A-Z0-9_]+)`", readme))
    fields = {f"MEMQ_{name.upper()}" for name in Settings.model_fields}
    assert fields - documented == set()


def test_the_readme_configuration_table_is_the_one_the_settings_model_generates() -> None:
    from memq.core.settings import markdown_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| variable | default | allowed | meaning |")
    table = readme[start : readme.index("\n\n", start) + 1]

    assert table == markdown_table(), "regenerate it: python -m memq.core.settings --markdown"


def test_the_celery_config_accepts_json_only() -> None:
    from memq.config.celery import celery_config

    config = celery_config(Settings())
    assert config["accept_content"] == ["json"] and config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == "json" and config["result_serializer"] == "json"
    assert {q.name for q in config["task_queues"]} == {"embed", "search", "ingest"}
    assert config["worker_send_task_events"] and config["task_send_sent_event"]


def test_queue_waits_are_the_gaps_between_each_steps_stamps() -> None:
    from memq.workers.steps import queue_waits_ms

    embed = {"embed_started_ts": 100.010, "embed_ended_ts": 100.020}
    results = [
        {"type": "long_term_memory", "search_started_ts": 100.023, "search_ms": 1.0, **embed},
        {"type": "workflow_memory", "search_started_ts": 100.025, "search_ms": 4.0, **embed},
        {"type": "conversation_memory", "items": [], "error": "down", **embed},
    ]

    waits = queue_waits_ms(results, requested_at=100.000, merge_started_ts=100.035)

    assert waits["embed"] == pytest.approx(10.0)
    assert waits["search"] == pytest.approx({"long_term_memory": 3.0, "workflow_memory": 5.0})
    assert waits["merge"] == pytest.approx(6.0)  # after the last search to end (100.029)


def test_queue_waits_leave_out_what_has_no_stamp() -> None:
    from memq.workers.steps import queue_waits_ms

    assert queue_waits_ms([{"type": "long_term_memory", "items": [], "search_ms": 0.0}], None, 1.0) == {"search": {}}


def test_the_largest_limit_under_the_oversample_still_fits_one_search() -> None:
    weights = field_rules.check_weights(None)

    candidates = ranking.candidates_for(field_rules.MAX_LIMIT, weights, field_rules.CANDIDATE_OVERSAMPLE)

    assert field_rules.CANDIDATE_OVERSAMPLE <= field_rules.MAX_OVERSAMPLE
    assert candidates == field_rules.check_count(candidates, "k", field_rules.MAX_CANDIDATES)


def test_a_search_of_more_candidates_than_allowed_names_k() -> None:
    with pytest.raises(InvalidInput) as caught:
        call = {
            "memory_id": "tenant",
            "memory_type": "semantic",
            "k": field_rules.MAX_CANDIDATES + 1,
            "strategy": "auto",
        }
        wire.parse(wire.SEARCH_CALL, {**call, "query": "q", "mode": None, "filters": None, "deadline_ts": None})
    assert caught.value.field == "k"


def test_a_result_store_outage_is_recognised_by_its_cause_not_its_text() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from memq.client.celery_internals import is_result_store_outage

    def raised_from(cause: BaseException, text: str) -> RuntimeError:
        try:
            raise RuntimeError(text) from cause
        except RuntimeError as exc:
            return exc

    assert is_result_store_outage(raised_from(RedisConnectionError("refused"), "Retry limit exceeded"))
    assert is_result_store_outage(raised_from(ConnectionRefusedError(), "anything at all"))
    assert not is_result_store_outage(raised_from(ValueError("bad"), "the result store said no"))
    assert not is_result_store_outage(RuntimeError("result store"))


# -- issue #13, parts 3, 4 and 6: what a producer may write ----------------------------------------------------

SURROGATE = "mid-\ud800"


def test_a_lone_surrogate_cannot_be_encoded_as_utf8() -> None:
    with pytest.raises(UnicodeEncodeError):
        "x\ud800".encode("utf-8")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: field_rules.check_query(SURROGATE), "query"),
        (lambda: field_rules.check_memory_id(SURROGATE), "memory_id"),
        (lambda: field_rules.check_items([{"content": SURROGATE}]), "items[0].content"),
        (lambda: field_rules.check_items([SURROGATE]), "items[0].content"),
        (lambda: field_rules.check_items([{"content": "x", "context": SURROGATE}]), "items[0].context"),
        (lambda: field_rules.check_items([{"content": "x", "id": SURROGATE}]), "items[0].id"),
        (lambda: field_rules.check_items([{"content": "x", "role": SURROGATE}]), "items[0].role"),
        (lambda: field_rules.check_items([{"content": "x", "tags": ["a", SURROGATE]}]), "items[0].tags"),
        (lambda: field_rules.check_items([{"content": "x", "metadata": {SURROGATE: 1}}]), "items[0].metadata"),
        (
            lambda: field_rules.check_items([{"content": "x", "metadata": {"a": {"b": [SURROGATE]}}}]),
            "items[0].metadata.a.b",
        ),
        (lambda: field_rules.check_filters({"tags": [SURROGATE]}), "filters.tags"),
        (lambda: field_rules.check_filters({"role": SURROGATE}), "filters.role"),
        (lambda: field_rules.check_ids(["ok", SURROGATE]), "ids"),
        (lambda: field_rules.check_utf8("\udcff", "anything"), "anything"),
    ],
)
def test_every_accepted_string_must_be_valid_utf8(call: object, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        call()  # type: ignore[operator]
    assert caught.value.field == field
    str(caught.value).encode("utf-8")  # the message never carries the surrogate itself


@pytest.mark.parametrize(
    "value",
    [1e20, -1, -0.5, 10**400, 253402300800, "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+01:00",
     "1969-12-31T23:59:59+00:00", "1970-01-01T00:00:00+00:01"],
)  # fmt: skip
def test_timestamps_outside_1970_to_9999_in_utc_are_refused(value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        field_rules.check_timestamp(value, "items[0].created_at")
    assert caught.value.field == "items[0].created_at"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        ("1970-01-01T00:00:00+00:00", 0.0),
        (253402300799, 253402300799.0),
        ("9999-12-31T23:59:59+00:00", 253402300799.0),
        ("9999-12-31T18:59:59-05:00", 253402300799.0),
    ],
)
def test_timestamps_at_the_edges_of_the_range_are_accepted_and_storable(value: object, expected: float) -> None:
    from memq.workers.storage.mongo import to_datetime

    assert field_rules.check_timestamp(value, "created_at") == expected
    to_datetime(expected)  # what the store does with it


def test_stored_ids_digest_an_unambiguous_encoding_of_the_tenant_and_the_key() -> None:
    import hashlib
    import json

    from memq.core import keys

    assert keys.memory_object_id("p", "q\x1fnotes") != keys.memory_object_id("p\x1fq", "notes")
    assert keys.memory_object_id("a", "bc") != keys.memory_object_id("ab", "c")
    pair = json.dumps(["p", "q\x1fnotes"], ensure_ascii=True, separators=(",", ":"))
    assert keys.memory_object_id("p", "q\x1fnotes") == hashlib.sha256(pair.encode("ascii")).hexdigest()[:32]


def _embedded(*vectors: object, model: object = "all-MiniLM-L6-v2") -> dict[str, object]:
    return {"vectors": list(vectors), "model": model}


GOOD = to_wire(np.full(384, 0.05, dtype=np.float32))


@pytest.mark.parametrize(
    ("embedded", "field"),
    [
        (None, "embedded"),
        ("vectors", "embedded"),
        (_embedded(GOOD), "embedded.vectors"),
        ({"vectors": GOOD, "model": "all-MiniLM-L6-v2"}, "embedded.vectors"),
        (_embedded(GOOD, to_wire(np.ones(383, dtype=np.float32))), "embedded.vectors[1]"),
        (_embedded(to_wire(np.ones(385, dtype=np.float32)), GOOD), "embedded.vectors[1]"),  # not the first's 385
        (_embedded(to_wire(np.ones(8193, dtype=np.float32)), GOOD), "embedded.vectors[0]"),
        (_embedded(GOOD, ""), "embedded.vectors[1]"),
        (_embedded(GOOD, to_wire(np.full(384, np.nan, dtype=np.float32))), "embedded.vectors[1]"),
        (_embedded(GOOD, to_wire(np.array([np.inf] + [0.0] * 383, dtype=np.float32))), "embedded.vectors[1]"),
        (_embedded(GOOD, [0.1] * 384), "embedded.vectors[1]"),
        (_embedded(GOOD, "%%%"), "embedded.vectors[1]"),
        (_embedded(GOOD, "A" * 10_000_000), "embedded.vectors[1]"),
        (_embedded(GOOD, "é" * 2048), "embedded.vectors[1]"),
        (_embedded(GOOD, GOOD, model=["all-MiniLM-L6-v2"]), "embedded.model"),
        (_embedded(GOOD, GOOD, model=None), "embedded.model"),
        (_embedded(GOOD, GOOD, model="other-model"), "embedded.model"),
    ],
)
def test_the_store_refuses_unsound_vectors_and_models_naming_the_field(embedded: object, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        wire.parse_embedded_texts(embedded, 2, "all-MiniLM-L6-v2")
    assert caught.value.field == field


def test_once_the_model_s_dimension_is_known_the_store_names_the_first_vector_of_another() -> None:
    odd_first = _embedded(to_wire(np.ones(385, dtype=np.float32)), GOOD)

    with pytest.raises(InvalidInput) as caught:
        wire.parse_embedded_texts(odd_first, 2, "all-MiniLM-L6-v2", dimensions=384)

    assert caught.value.field == "embedded.vectors[0]" and "the embed model has 384 dimensions" in caught.value.message


def test_the_store_decodes_sound_vectors_into_one_matrix() -> None:
    matrix = wire.parse_embedded_texts(_embedded(GOOD, GOOD), 2, "all-MiniLM-L6-v2")
    assert matrix.shape == (2, 384) and matrix.dtype == np.float32 and np.allclose(matrix, 0.05)


def _row(key: str, embedding: object, **fields: object) -> dict[str, object]:
    row = {"_id": f"id-{key}", "memory_id": "t", "key": key, "content": f"content of {key}", "importance": 0.5}
    if embedding is not None:
        row["embedding"] = embedding
    return {**row, **fields}


def test_building_a_tenant_matrix_skips_and_counts_bad_rows_keeping_every_column_aligned() -> None:
    from prometheus_client import REGISTRY

    from memq.workers.search.strategies import Wanted, build_matrix

    rng = np.random.default_rng(7)
    good = {key: rng.standard_normal(384).astype(np.float32) for key in ("g1", "g2", "g3")}
    docs = [
        _row("bad-short", to_bson(np.ones(383, dtype=np.float32)), role="user", tags=["x"]),
        _row("g1", to_bson(good["g1"]), role="assistant", tags=["one"]),
        _row("bad-nan", to_bson(np.full(384, np.nan, dtype=np.float32)), role="user", tags=["x"]),
        _row("bad-missing", None, role="user"),
        _row("g2", bytes(to_bson(good["g2"])), role="user", tags=["two"]),  # as nx-27017 returns it
        _row("bad-garbage", b"\x01\x02\x03", role="user"),
        _row("bad-text", "not a vector"),
        _row("bad-importance", to_bson(good["g1"]), importance=float("nan")),
        _row("bad-date", to_bson(good["g1"]), created_at=1e300),
        _row("g3", good["g3"].tolist(), role="system", tags=["three"]),
    ]
    labels = {"memory_type": "long_term_memory"}
    before = REGISTRY.get_sample_value("memq_bad_stored_rows_total", labels) or 0.0

    entry = build_matrix(docs, 1, "long_term_memory", dimensions=384)

    assert REGISTRY.get_sample_value("memq_bad_stored_rows_total", labels) == before + 7
    assert [item["id"] for item in entry.items] == ["g1", "g2", "g3"]
    assert entry.matrix.shape == (3, 384)
    assert list(entry.roles) == ["assistant", "user", "system"]
    assert list(entry.tags) == [frozenset({"one"}), frozenset({"two"}), frozenset({"three"})]
    for key, vector in good.items():
        [found] = top_k(entry, vector, 1, Wanted(query=f"content of {key}", mode="hybrid"))
        assert found["id"] == key and all(math.isfinite(v) for v in found["scores"].values())
    [lexical] = top_k(entry, good["g1"], 1, Wanted(query="content of g2", mode="lexical"))
    assert lexical["id"] == "g2"  # the BM25 index holds the same rows in the same order
    [user] = top_k(entry, good["g1"], 1, Wanted(filters={"role": "user"}))
    assert user["id"] == "g2"


def test_a_query_vector_that_is_not_finite_never_yields_nan_scores() -> None:
    entry = TenantMatrix(1, [{"id": "a"}, {"id": "b"}], np.eye(2, dtype=np.float32))
    got = top_k(entry, np.array([np.nan, 1.0], dtype=np.float32), 2)
    assert all(math.isfinite(item["score"]) for item in got)


class _FailingCollection:
    """A collection whose unordered bulk write fails for some items, as MongoDB reports it."""

    def __init__(self, failed: list[int], code: object = 11000) -> None:
        self.failed = failed
        self.code = code

    def bulk_write(self, writes: list[object], ordered: bool) -> object:
        from pymongo.errors import BulkWriteError

        assert ordered is False
        errors = [
            {
                "index": index,
                "code": self.code,
                "errmsg": "E11000 duplicate key error collection: memq.long_term_memory dup key: { content: 'SECRET' }",
                "op": {"q": {"_id": "x"}, "u": {"$set": {"content": "SECRET"}}},
            }
            for index in self.failed
        ]
        written = len(writes) - len(self.failed)
        raise BulkWriteError(
            {"writeErrors": errors, "writeConcernErrors": [], "nUpserted": written, "nMatched": 0, "upserted": []}
        )


def test_a_partly_failed_batch_reports_its_failed_items_without_the_write_and_still_bumps_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from memq.workers import steps
    from memq.workers.storage import mongo, versions

    bumped: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(mongo, "collection", lambda memory_type: _FailingCollection([1, 3]))
    monkeypatch.setattr(
        versions, "bump_versions", lambda memory_id, types, *_, **__: bumped.append((memory_id, list(types)))
    )
    items = [{"content": f"memory {i}", "importance": 0.5} for i in range(4)]

    result = steps.store_memories(_embedded(*[GOOD] * 4), "tenant", "long_term_memory", items)

    assert result["failed"] == [{"index": 1, "reason": "duplicate key"}, {"index": 3, "reason": "duplicate key"}]
    assert result["inserted"] == 2
    assert bumped == [("tenant", ["long_term_memory"])]
    assert "SECRET" not in json.dumps(result)


def test_a_failed_write_reason_is_short_and_never_quotes_the_write() -> None:
    from memq.workers.storage.writes import write_error_reason

    assert write_error_reason({"code": "11000", "errmsg": "E11000 dup key: { content: 'SECRET' }"}) == "duplicate key"
    assert (
        write_error_reason({"code": 121, "errmsg": "Document failed validation: SECRET"})
        == "document failed validation"
    )
    assert "SECRET" not in write_error_reason({"code": 2, "errmsg": "SECRET"})
    assert "SECRET" not in write_error_reason({"errmsg": "SECRET"})


def test_a_store_that_fails_before_writing_still_bumps_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection lost mid-batch may have written part of it: the version is bumped before the error goes up."""
    from memq.errors import StoreUnavailable
    from memq.workers import steps
    from memq.workers.storage import versions, writes

    bumped: list[str] = []

    def lost(memory_type: str, writes: list[object]) -> dict[str, object]:
        raise StoreUnavailable("MongoDB unavailable: connection reset")

    monkeypatch.setattr(writes, "upsert", lost)
    monkeypatch.setattr(versions, "bump_versions", lambda memory_id, types, *_, **__: bumped.append(memory_id))

    with pytest.raises(StoreUnavailable):
        steps.store_memories(_embedded(GOOD), "tenant", "long_term_memory", [{"content": "x", "importance": 0.5}])
    assert bumped == ["tenant"]


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_a_jsonl_line_nested_deeper_than_32_is_refused_naming_the_line(depth: int, tmp_path: Path) -> None:
    from memq.ops.cli import MAX_JSONL_DEPTH, iter_jsonl

    path = tmp_path / "memories.jsonl"
    deep = '{"content": "x", "metadata": {"a": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"
    path.write_text('{"content": "fine"}\n\n' + deep + "\n", encoding="utf-8")

    with pytest.raises(InvalidInput) as caught:
        list(iter_jsonl(path))

    assert MAX_JSONL_DEPTH == 32
    assert caught.value.field == "file" and str(caught.value).startswith("file: line 3: ")


def test_a_jsonl_line_nested_32_deep_is_read(tmp_path: Path) -> None:
    from memq.ops.cli import iter_jsonl, json_depth

    path = tmp_path / "memories.jsonl"
    path.write_text('{"content": "x", "metadata": {"a": ' + "[" * 30 + "]" * 30 + "}}\n", encoding="utf-8")
    [(_, item)] = iter_jsonl(path)
    assert json_depth(item) == 32

    line = {"content": "x", "metadata": {"a": [[[]]]}}
    assert json_depth(line) == 5
    assert json_depth([[[[]]]] * 3) == 4 and json_depth("text") == 0 and json_depth({}) == 1


def test_merge_names_the_worker_of_every_type_even_one_that_failed() -> None:
    from memq.client.edge import retrieval_request
    from memq.workers import steps

    request = retrieval_request(Settings(), "hobbies", "tenant-a", {"semantic": 2, "episodic": 1})
    answered = {"type": "long_term_memory", "items": [], "search_ms": 0.4, "served_by": "search.0@host-a"}
    failed = wire.search_failure("conversation_memory", "unavailable after 4 attempt(s)", None, "search.1@host-b")

    merged = steps.merge([answered, failed], request)

    assert merged["errors"] == {"conversation_memory": "unavailable after 4 attempt(s)"}
    assert merged["timings_ms"]["served_by"] == {
        "long_term_memory": "search.0@host-a",
        "conversation_memory": "search.1@host-b",
    }


EDGE_ARGUMENTS = {"query": "what do I eat?", "memory_id": "tenant-a", "limits": {"semantic": 2}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"query": "x" * 5000}, "query"),
        ({"query": "a\x00b"}, "query"),
        ({"query": "   "}, "query"),
        ({"memory_id": "$where"}, "memory_id"),
        ({"limits": {"semantic": 0}}, "limits['semantic']"),
        ({"weights": {"fame": 1}}, "weights"),
        ({"strategy": "fastest"}, "strategy"),
        ({"mode": "telepathy"}, "mode"),
        ({"filters": {"colour": "red"}}, "filters"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 10**6}, "timeout_s"),
    ],
)
def test_the_edge_and_merge_refuse_a_bad_retrieval_field_with_one_and_the_same_error(
    change: dict[str, object], field: str
) -> None:
    from memq.client.edge import retrieval_request

    settings = Settings()
    arguments = {**EDGE_ARGUMENTS, **change}
    with pytest.raises(InvalidInput) as at_the_edge:
        retrieval_request(settings, **arguments)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as on_receipt:
        wire.parse_merge_input([], arguments, settings)

    assert at_the_edge.value.field == on_receipt.value.field == field
    assert at_the_edge.value.message == on_receipt.value.message


def test_a_request_read_again_on_receipt_is_the_request_the_edge_built() -> None:
    from memq.client.edge import retrieval_request

    settings = Settings()
    built = retrieval_request(
        settings, "Ｒｅｓｅｒｖｅｄ ﬁle", "tenant-a", {"semantic": 2, "episodic": 1}, mode="lexical"
    )

    assert wire.parse_retrieval_request(json.loads(json.dumps(built)), settings) == built
    assert built["query"] == "Reserved file" and built["deadline_ts"] == built["requested_at"] + built["timeout_s"]


@pytest.mark.parametrize("text", ["fine\x00hidden", "x" * (field_rules.MAX_CONTENT_CHARS + 1)])
def test_embed_texts_refuses_a_text_that_remember_would_refuse_as_content(text: str) -> None:
    with pytest.raises(InvalidInput) as as_content:
        field_rules.check_items([{"content": text}])
    with pytest.raises(InvalidInput) as as_text:
        wire.parse(wire.EMBED_TEXTS, {"texts": ["ok", text], "deadline_ts": None}, Settings())

    assert as_content.value.field == "items[0].content" and as_text.value.field == "texts[1]"
    assert as_content.value.message == as_text.value.message


def test_a_search_attempt_takes_half_of_what_is_left_of_the_deadline_while_retries_remain() -> None:
    from memq.core import deadlines
    from memq.tasks.retrieval import attempt_budget_s

    settings = Settings(mongodb_uri="mongodb://127.0.0.1:27017/?socketTimeoutMS=60000")
    deadline_ts = time.time() + 10 + deadlines.DELIVERY_MARGIN_S

    assert 4.9 < attempt_budget_s(deadline_ts, settings, attempts_left=2) <= 5.0  # type: ignore[operator]
    assert 9.9 < attempt_budget_s(deadline_ts, settings, attempts_left=1) <= 10.0  # type: ignore[operator]
    assert attempt_budget_s(time.time() - 1, settings, attempts_left=1) == deadlines.MIN_ATTEMPT_S
    assert attempt_budget_s(None, settings, attempts_left=1) is None


def test_a_search_attempt_never_outlasts_the_socket_timeout_the_mongodb_uri_gives() -> None:
    from memq.tasks.retrieval import attempt_budget_s

    far_deadline_ts = time.time() + 600
    given = Settings(mongodb_uri="mongodb://db:27017/?sockettimeoutms=2500&maxPoolSize=4")

    assert attempt_budget_s(far_deadline_ts, given, attempts_left=1) == 2.5
    assert attempt_budget_s(far_deadline_ts, Settings(), attempts_left=1) == 6.0  # memq's default, 6000 ms


def test_the_mongodb_uri_s_own_options_win_and_memq_s_defaults_fill_the_rest() -> None:
    from memq.workers.storage.mongo import URI_OPTION_DEFAULTS, client_options

    assert client_options("mongodb://db:27017") == URI_OPTION_DEFAULTS
    assert client_options("mongodb://db:27017/memq?MAXPOOLSIZE=64&socketTimeoutMS=0") == {
        "serverSelectionTimeoutMS": 3000,
        "connectTimeoutMS": 3000,
    }


def test_result_keys_outlive_a_redelivery_and_a_caller_s_wait() -> None:
    assert Settings().result_expires_s == 600  # 2 x the visibility timeout's 300 s
    assert Settings(visibility_timeout_s=30, retrieve_timeout_s=45.5).result_expires_s == 91


def test_embeddings_are_cached_exactly_while_results_are() -> None:
    from memq.core.settings import EMBEDDING_CACHE_TTL_S

    assert Settings().embedding_cache_ttl_s == EMBEDDING_CACHE_TTL_S
    assert Settings(result_cache_ttl_s=0).embedding_cache_ttl_s == 0


def test_every_margin_taken_from_a_deadline_is_named_in_memq_deadlines_alone() -> None:
    margin = re.compile(r"^[A-Z_]*(MARGIN|SHARE|MIN_ATTEMPT)[A-Z_]* = ", re.MULTILINE)
    product = [p for folder in ("memq", "workers", "tasks", "config") for p in (ROOT / folder).rglob("*.py")]

    elsewhere = [str(p.relative_to(ROOT)) for p in product if p.name != "deadlines.py" and margin.search(p.read_text())]

    assert elsewhere == []


def test_the_api_names_still_resolve_from_memq_client_where_they_lived_before_the_folders() -> None:
    from memq import client
    from memq.client import api

    assert client.retrieve is api.retrieve and client.aforget is api.aforget
    with pytest.raises(AttributeError, match="no_such_name"):
        client.no_such_name  # noqa: B018
