"""Producers cannot corrupt a tenant (issue #13, parts 3, 4 and 6), on real workers:

- ``memq.store`` writes only vectors of the model's dimension, finite, from the embed model; anything else is
  ``InvalidInput`` naming the field, and nothing is written;
- a bad row written into MongoDB by hand never breaks its tenant's search (it is skipped and counted);
- stored ``_id``s digest an unambiguous encoding of (memory_id, id); a partly failed batch still bumps the
  tenant's data version and reports the failed items without echoing the write; old ``_id``s migrate;
- every string must be valid UTF-8, dates lie in 1970..9999 UTC, JSONL lines are nested at most 32 deep:
  through the client, the CLI and raw ``send_task``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bson.binary import Binary
from faultkit import count_stored, memq_cli
from test_hostile_input import outcome_of

from memq.client import api
from memq.core import names
from memq.core.vectors import to_bson, to_wire
from memq.errors import InvalidInput

pytestmark = pytest.mark.usefixtures("fleet")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"
DIMENSIONS = 384
SURROGATE = "mid-\ud800"
TOO_LATE = "9999-12-31T23:00:00-05:00"  # 10000-01-01T04:00 in UTC


def stored_count(mongo_db: Any, memory_id: str, collection: str = "long_term_memory") -> int:
    return count_stored(mongo_db[collection], {"memory_id": memory_id})


def one_error_line(shown: subprocess.CompletedProcess[str]) -> str:
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memq: error: "), shown.stderr
    return lines[0].removeprefix("memq: error: ")


# -- part 3: the store writes only sound vectors -----------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_pair(app: Any) -> dict[str, Any]:
    texts = ["likes green tea in the morning", "walks the dog at night"]
    return dict(app.send_task(names.EMBED_TEXTS, args=(texts,), queue=names.EMBED_QUEUE).get(timeout=120))


def _vector(values: Any) -> str:
    return to_wire(np.asarray(values, dtype=np.float32))


NAN_VECTOR = _vector(np.full(DIMENSIONS, np.nan))
ONE_INF = _vector([*([0.1] * (DIMENSIONS - 1)), np.inf])
BAD_STORES = {
    "383 floats": ({"vectors": [None, _vector(np.ones(DIMENSIONS - 1))]}, "embedded.vectors[1]"),
    "385 floats": ({"vectors": [_vector(np.ones(DIMENSIONS + 1)), None]}, "embedded.vectors[0]"),
    "8193 floats": ({"vectors": [_vector(np.ones(8193)), None]}, "embedded.vectors[0]"),
    "empty vector": ({"vectors": [None, ""]}, "embedded.vectors[1]"),
    "NaN vector": ({"vectors": [None, NAN_VECTOR]}, "embedded.vectors[1]"),
    "one infinity": ({"vectors": [ONE_INF, None]}, "embedded.vectors[0]"),
    "a list of floats": ({"vectors": [None, [0.1] * DIMENSIONS]}, "embedded.vectors[1]"),
    "not base64": ({"vectors": [None, "!!!not*base64!!!"]}, "embedded.vectors[1]"),
    "model a list": ({"model": [MODEL]}, "embedded.model"),
    "model a number": ({"model": 384}, "embedded.model"),
    "model missing": ({"model": None}, "embedded.model"),
    "another model": ({"model": "all-mpnet-base-v2"}, "embedded.model"),
}


@pytest.mark.parametrize("case", list(BAD_STORES))
def test_a_raw_store_of_an_unsound_vector_or_model_is_refused_naming_the_field_and_writes_nothing(
    app: Any, mongo_db: Any, tenant: str, embedded_pair: dict[str, Any], case: str
) -> None:
    change, field = BAD_STORES[case]
    embedded = {"vectors": list(embedded_pair["vectors"]), "model": embedded_pair["model"]}
    if "vectors" in change:
        embedded["vectors"] = [
            v if v is not None else good for v, good in zip(change["vectors"], embedded["vectors"], strict=True)
        ]
    if "model" in change:
        embedded["model"] = change["model"]
    items = [{"content": "likes green tea in the morning"}, {"content": "walks the dog at night"}]

    state, value = outcome_of(app, names.STORE, [embedded, tenant, "semantic", items], names.INGEST_QUEUE)

    assert state == "FAILURE" and isinstance(value, InvalidInput), (state, value)
    assert value.field == field, value
    assert stored_count(mongo_db, tenant) == 0


def test_a_raw_store_of_sound_vectors_is_written(
    app: Any, mongo_db: Any, tenant: str, embedded_pair: dict[str, Any]
) -> None:
    items = [{"content": "likes green tea in the morning"}, {"content": "walks the dog at night"}]

    state, value = outcome_of(app, names.STORE, [embedded_pair, tenant, "semantic", items], names.INGEST_QUEUE)

    assert state == "SUCCESS" and value["inserted"] == 2 and value["failed"] == [], value
    assert stored_count(mongo_db, tenant) == 2


def test_rows_written_bad_by_hand_never_break_the_tenants_search(mongo_db: Any, tenant: str) -> None:
    api.remember(
        tenant,
        "semantic",
        [{"id": "tea", "content": "drinks green tea every morning"}, {"id": "cats", "content": "has two cats"}],
    )
    collection = mongo_db["long_term_memory"]
    good = collection.find_one({"memory_id": tenant, "key": "tea"})
    bad_embeddings: dict[str, Any] = {
        "short": to_bson(np.ones(DIMENSIONS - 1)),
        "long": to_bson(np.ones(DIMENSIONS + 7)),
        "nan": to_bson(np.full(DIMENSIONS, np.nan)),
        "inf": to_bson(np.array([np.inf] * DIMENSIONS)),
        "garbage": Binary(b"\x01\x02\x03"),
        "text": "not a vector at all",
        "number": 42,
        "floats-with-text": [0.5] * (DIMENSIONS - 1) + ["x"],
    }
    for name, embedding in bad_embeddings.items():
        row = {key: value for key, value in good.items() if key != "_id"}
        collection.insert_one({**row, "_id": f"bad-{tenant}-{name}", "key": f"bad-{name}", "embedding": embedding})
    missing = {key: value for key, value in good.items() if key not in ("_id", "embedding")}
    collection.insert_one({**missing, "_id": f"bad-{tenant}-missing", "key": "bad-missing"})

    for mode in ("hybrid", "vector", "lexical"):
        result = api.retrieve("green tea", tenant, {"semantic": 20}, mode=mode)

        assert result["errors"] == {}, result["errors"]
        expected = {"tea"} if mode == "lexical" else {"tea", "cats"}  # lexical mode returns only matches
        assert {item["id"] for item in result["results"]["long_term_memory"]} == expected
        json.dumps(result, allow_nan=False)  # no NaN anywhere in the result


# -- part 4: unambiguous ids, partial failures, migration ---------------------------------------------------


def test_the_unit_separator_pair_writes_two_memories_one_per_tenant(mongo_db: Any) -> None:
    first = f"sep-{uuid.uuid4().hex[:8]}"
    second = f"{first}\x1fq"

    stored_first = api.remember(first, "semantic", [{"id": "q\x1fnotes", "content": "first tenant sails boats"}])
    stored_second = api.remember(second, "semantic", [{"id": "notes", "content": "second tenant climbs rocks"}])

    assert stored_first["inserted"] == 1 and stored_second["inserted"] == 1, stored_second
    docs = list(mongo_db["long_term_memory"].find({"memory_id": {"$in": [first, second]}}))
    assert sorted(doc["memory_id"] for doc in docs) == sorted([first, second])
    assert len({doc["_id"] for doc in docs}) == 2
    for tenant, content in ((first, "first tenant sails boats"), (second, "second tenant climbs rocks")):
        found = api.retrieve("what does this tenant do?", tenant, {"semantic": 5})
        assert [item["content"] for item in found["results"]["long_term_memory"]] == [content]


def test_a_partly_failed_batch_bumps_the_version_and_reports_the_failed_items_without_the_write(
    mongo_db: Any, tenant: str
) -> None:
    """A unique index the operator added makes one write of an unordered batch fail: the others are written,
    the tenant's caches see them at once, and the failure names the item's index, not its content."""
    collection = mongo_db["toolbox"]
    index = collection.create_index(
        [("content", 1)],
        unique=True,
        name=f"unique_content_{tenant.replace('-', '_')}",
        partialFilterExpression={"memory_id": tenant},
    )
    try:
        api.remember(tenant, "toolbox", [{"id": "a", "content": "the secret sauce alpha"}])
        weights = {"relevance": 1, "recency": 0, "importance": 0}
        before = api.retrieve("secret sauce", tenant, {"toolbox": 10}, weights=weights)  # warms every cache
        assert [item["id"] for item in before["results"]["toolbox"]] == ["a"]

        stored = api.remember(
            tenant,
            "toolbox",
            [
                {"id": "b", "content": "the secret sauce beta"},
                {"id": "c", "content": "the secret sauce alpha"},  # same content as a: the unique index refuses it
                {"id": "d", "content": "the secret sauce delta"},
            ],
        )

        assert stored["failed"] == [{"index": 1, "reason": "duplicate key"}], stored
        assert stored["inserted"] == 2
        assert "alpha" not in json.dumps(stored)  # the failed write is not echoed
        after = api.retrieve("secret sauce", tenant, {"toolbox": 10}, weights=weights)
        assert not after["cached"]
        assert {item["id"] for item in after["results"]["toolbox"]} == {"a", "b", "d"}
    finally:
        collection.drop_index(index)


def _load_migration() -> Any:
    spec = importlib.util.spec_from_file_location("migrate_object_ids", ROOT / "scripts" / "migrate_object_ids.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_migration_moves_memories_stored_under_the_old_id_format(mongo_db: Any, tenant: str) -> None:
    api.remember(tenant, "semantic", [{"id": "kept", "content": "remembers the old format"}])
    collection = mongo_db["long_term_memory"]
    doc = collection.find_one({"memory_id": tenant, "key": "kept"})
    old_id = hashlib.sha256(f"{tenant}\x1fkept".encode()).hexdigest()[:32]
    collection.delete_one({"_id": doc["_id"]})
    collection.insert_one({**doc, "_id": old_id})  # as a memq before the fix wrote it

    moved = _load_migration().migrate(mongo_db, ["long_term_memory"])

    assert moved["long_term_memory"]["moved"] >= 1
    assert [d["_id"] for d in collection.find({"memory_id": tenant})] == [doc["_id"]]
    again = api.remember(tenant, "semantic", [{"id": "kept", "content": "remembers the old format"}])
    assert again["inserted"] == 0 and again["updated"] == 1
    assert api.forget(tenant, "semantic", ids=["kept"])["deleted"] == {"long_term_memory": 1}


# -- part 6: text and dates ------------------------------------------------------------------------------------

BAD_RETRIEVALS = {
    "query": ({"query": SURROGATE}, "query"),
    "memory_id": ({"memory_id": SURROGATE}, "memory_id"),
    "filter tag": ({"filters": {"tags": ["ok", SURROGATE]}}, "filters.tags"),
    "filter role": ({"filters": {"role": SURROGATE}}, "filters.role"),
    "created_after 1e20": ({"filters": {"created_after": 1e20}}, "filters.created_after"),
    "created_before past 9999": ({"filters": {"created_before": TOO_LATE}}, "filters.created_before"),
}
BAD_MEMORIES = {
    "content": ({"content": SURROGATE}, "items[0].content"),
    "context": ({"context": SURROGATE}, "items[0].context"),
    "id": ({"id": SURROGATE}, "items[0].id"),
    "role": ({"role": SURROGATE}, "items[0].role"),
    "tag": ({"tags": ["fine", SURROGATE]}, "items[0].tags"),
    "metadata key": ({"metadata": {SURROGATE: 1}}, "items[0].metadata"),
    "metadata value": ({"metadata": {"notes": ["fine", {"deep": SURROGATE}]}}, "items[0].metadata.notes.deep"),
    "created_at 1e20": ({"created_at": 1e20}, "items[0].created_at"),
    "created_at past 9999": ({"created_at": TOO_LATE}, "items[0].created_at"),
    "created_at before 1970": ({"created_at": "1969-12-31T23:59:59+00:00"}, "items[0].created_at"),
}


@pytest.mark.parametrize("case", list(BAD_RETRIEVALS))
def test_the_client_refuses_a_lone_surrogate_or_an_out_of_range_date_in_a_retrieval(case: str) -> None:
    change, field = BAD_RETRIEVALS[case]
    call: dict[str, Any] = {"query": "what do they drink?", "memory_id": "tenant-ok", "limits": {"semantic": 2}}

    with pytest.raises(InvalidInput) as caught:
        api.retrieve(**{**call, **change})

    assert caught.value.field == field
    str(caught.value).encode("utf-8")  # the message itself is printable


@pytest.mark.parametrize("case", list(BAD_MEMORIES))
def test_the_client_refuses_a_lone_surrogate_or_an_out_of_range_date_in_a_memory(
    case: str, mongo_db: Any, tenant: str
) -> None:
    change, field = BAD_MEMORIES[case]

    with pytest.raises(InvalidInput) as caught:
        api.remember(tenant, "semantic", [{"content": "a fine memory", **change}])

    assert caught.value.field == field
    str(caught.value).encode("utf-8")
    assert stored_count(mongo_db, tenant) == 0


def test_the_client_refuses_a_lone_surrogate_in_the_ids_to_forget() -> None:
    with pytest.raises(InvalidInput) as caught:
        api.forget("tenant-ok", "semantic", ids=["fine", SURROGATE])
    assert caught.value.field == "ids"


@pytest.mark.parametrize("case", list(BAD_RETRIEVALS))
def test_a_raw_retrieve_with_a_lone_surrogate_or_an_out_of_range_date_fails_with_invalid_input(
    app: Any, case: str
) -> None:
    change, field = BAD_RETRIEVALS[case]
    call: dict[str, Any] = {"query": "what do they drink?", "memory_id": "tenant-ok", "limits": {"semantic": 2}}
    call.update(change)
    args = [call["query"], call["memory_id"], call["limits"], None, None, None, call.get("filters")]

    state, value = outcome_of(app, names.RETRIEVE, args, names.SEARCH_QUEUE)

    assert state == "FAILURE" and isinstance(value, InvalidInput), (state, value)
    assert value.field == field


@pytest.mark.parametrize("case", list(BAD_MEMORIES))
def test_a_raw_remember_with_a_lone_surrogate_or_an_out_of_range_date_fails_with_invalid_input(
    app: Any, mongo_db: Any, tenant: str, case: str
) -> None:
    change, field = BAD_MEMORIES[case]
    items = [{"content": "a fine memory", **change}]

    state, value = outcome_of(app, names.REMEMBER, [tenant, "semantic", items], names.INGEST_QUEUE)

    assert state == "FAILURE" and isinstance(value, InvalidInput), (state, value)
    assert value.field == field
    assert stored_count(mongo_db, tenant) == 0


RETRIEVE = [b"retrieve", b"what do they drink?", b"--limit", b"semantic=1"]
REMEMBER = [b"remember", b"--type", b"semantic"]
CLI_CASES = {
    "query": ([b"retrieve", b"mid-\xff", b"--memory-id", b"t", b"--limit", b"semantic=1"], "query"),
    "memory_id": ([*RETRIEVE, b"--memory-id", b"t\xff"], "memory_id"),
    "tag": ([*RETRIEVE, b"--memory-id", b"t", b"--tag", b"\xfe"], "filters.tags"),
    "role": ([*RETRIEVE, b"--memory-id", b"t", b"--role", b"\xfe"], "filters.role"),
    "after": ([*RETRIEVE, b"--memory-id", b"t", b"--after", b"1e20"], "filters.created_after"),
    "before": ([*RETRIEVE, b"--memory-id", b"t", b"--before", TOO_LATE.encode()], "filters.created_before"),
    "text": ([*REMEMBER, b"--memory-id", b"t", b"--text", b"caf\xe9"], "items[0].content"),
    "remember memory_id": ([*REMEMBER, b"--memory-id", b"t\x80", b"--text", b"ok"], "memory_id"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_cli_answers_a_lone_surrogate_or_an_out_of_range_date_with_exit_2_and_one_line(case: str) -> None:
    args, field = CLI_CASES[case]

    line = one_error_line(memq_cli(*args))
    as_json = memq_cli(*args, "--json")

    assert line.startswith(f"{field}: "), line
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["field"] == field


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (json.dumps({"content": SURROGATE}), "items[1].content"),
        (json.dumps({"content": "ok", "tags": [SURROGATE]}), "items[1].tags"),
        (json.dumps({"content": "ok", "created_at": 1e20}), "items[1].created_at"),
        (json.dumps({"content": "ok", "created_at": TOO_LATE}), "items[1].created_at"),
    ],
)
def test_a_jsonl_file_with_a_lone_surrogate_or_an_out_of_range_date_is_refused_and_writes_nothing(
    line: str, field: str, tmp_path: Path, mongo_db: Any, tenant: str
) -> None:
    path = tmp_path / "memories.jsonl"
    path.write_text(json.dumps({"content": "a good memory"}) + "\n" + line + "\n", encoding="utf-8")

    shown = one_error_line(memq_cli("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path)))

    assert shown.startswith(f"{field}: "), shown
    assert stored_count(mongo_db, tenant) == 0


@pytest.mark.parametrize("depth", [33, 100_000])
def test_a_jsonl_line_nested_too_deeply_is_refused_with_exit_2_and_one_line_naming_it(
    depth: int, tmp_path: Path, mongo_db: Any, tenant: str
) -> None:
    path = tmp_path / "memories.jsonl"
    deep = '{"content": "x", "metadata": {"a": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"
    path.write_text(json.dumps({"content": "a good memory"}) + "\n" + deep + "\n", encoding="utf-8")
    args = ("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path))

    line = one_error_line(memq_cli(*args))
    as_json = memq_cli(*args, "--json")

    assert line.startswith("file: line 2: ") and "32" in line, line
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["field"] == "file"
    assert stored_count(mongo_db, tenant) == 0
