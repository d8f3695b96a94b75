"""Hostile input, property-based: through the client, the CLI and raw ``send_task`` payloads that skip the
client's checks. Each is refused with a clear error naming the field, nothing is written or deleted, and
every worker still answers. Plus tenant isolation over random tenants and contents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memq.client import api
from memq.core import names
from memq.errors import InvalidInput, MemqError

pytestmark = pytest.mark.usefixtures("fleet")

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ("long_term_memory", "conversation_memory", "workflow_memory")
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OPERATOR_IDS = st.sampled_from([{"$ne": None}, {"$gt": ""}, {"$regex": ".*"}, {"$exists": True}, {"$in": ["a"]}])
BAD_MEMORY_IDS = st.one_of(
    OPERATOR_IDS,
    st.sampled_from(["", "   ", "$where", "$ne", "a\x00b", "x" * 257, None, 0, 1.5, True, ["tenant"]]),
    st.binary(max_size=16),
)
BAD_QUERIES = st.one_of(
    st.sampled_from(["", "  \n\t ", "nul\x00byte", None, 42, ["list"], {"$ne": None}]),
    st.integers(4097, 50_000).map(lambda n: "q" * n),
    st.binary(min_size=1, max_size=64),
)
BAD_LIMITS = st.one_of(
    st.sampled_from([{}, None, "semantic", [["semantic", 1]], {"$ne": 1}, {"semantic": 1, "long_term_memory": 2}]),
    st.dictionaries(st.sampled_from(["dreams", "$gt", "", "long_term", "semantic.x"]), st.just(1), min_size=1),
    st.builds(
        lambda k: {"semantic": k},
        st.one_of(
            st.integers(max_value=0),
            st.integers(min_value=101),
            st.sampled_from([True, 1.5, "3", None, float("nan"), float("inf")]),
        ),
    ),
)
BAD_WEIGHTS = st.one_of(
    st.sampled_from(["heavy", [1, 2], {"fame": 1}, {"relevance": 0, "recency": 0, "importance": 0}]),
    st.builds(
        lambda v: {"relevance": v},
        st.one_of(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), True, "1", None]),
            st.floats(max_value=-1e-9, allow_nan=False),
            st.floats(min_value=1000.5, allow_nan=False),
        ),
    ),
)
BAD_TIMEOUTS = st.one_of(
    st.sampled_from([0, -1, float("nan"), float("inf"), "5", True, [1]]),
    st.floats(min_value=3600.5, allow_infinity=False, allow_nan=False),
)
BAD_TYPES = st.one_of(
    st.sampled_from(["dreams", "", "$ne", "long_term_memory_x", None, 3, ["semantic"], {"$ne": None}]),
    st.text(alphabet="abcxyz_$.", min_size=1, max_size=12),
)
BAD_ITEMS = st.one_of(
    st.sampled_from([[], None, "just text", {"content": "a dict, not a list"}, [None], [42], [[]]]),
    st.lists(
        st.sampled_from(
            [
                {"content": ""},
                {"content": "   "},
                {"content": 5},
                {"content": "nul\x00"},
                {"content": "x" * 32769},
                {"content": "ok", "importance": 2},
                {"content": "ok", "importance": float("nan")},
                {"content": "ok", "$set": {"memory_id": "other"}},
                {"content": "ok", "metadata": {"$where": "1"}},
                {"content": "ok", "metadata": {"a.b": 1}},
                {"content": "ok", "role": "$admin"},
                {"content": "ok", "tags": "not-a-list"},
                {"content": "ok", "id": ""},
                {"content": "ok", "created_at": "yesterday"},
                {"content": "ok", "created_at": -1},
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    st.integers(1001, 1500).map(lambda n: ["m"] * n),
)


def field_root(field: str) -> str:
    """``limits['semantic']`` → ``limits``; ``items[0].content`` → ``items``."""
    return field.split("[")[0].split(".")[0]


def stored_documents(mongo_db: Any) -> int:
    """Every document in the test process's database, whatever its collection or tenant (collection metadata,
    so a check costs milliseconds however much earlier tests stored)."""
    return sum(mongo_db[name].estimated_document_count() for name in mongo_db.list_collection_names())


def refused(value: Any, *fields: str) -> bool:
    """A worker refused the task with a memq error whose message starts with one of these fields."""
    return isinstance(value, MemqError) and field_root(str(value).partition(":")[0]) in fields


def all_workers_answer(app: Any, fleet: Any) -> bool:
    replies = app.control.ping(destination=list(fleet.workers), timeout=2.0) or []
    return {host for reply in replies for host in reply} == set(fleet.workers)


@pytest.fixture(scope="module")
def victim(mongo_db: Any) -> str:
    """A tenant with memories that a leaked operator (``$ne``, ``$gt``) would read, overwrite or delete."""
    tenant = f"victim-{uuid.uuid4().hex[:8]}"
    api.remember(tenant, "semantic", ["the victim's secret: likes marmite", "the victim's second memory"])
    return tenant


def victim_intact(mongo_db: Any, victim: str) -> bool:
    docs = list(mongo_db["long_term_memory"].find({"memory_id": victim}, {"content": 1}))
    return sorted(d["content"] for d in docs) == ["the victim's second memory", "the victim's secret: likes marmite"]


# -- the client ----------------------------------------------------------------------------------------------


@FEW
@given(data=st.data())
def test_the_client_refuses_any_hostile_retrieval_argument_naming_it(data: st.DataObject) -> None:
    call: dict[str, Any] = {"query": "food", "memory_id": "tenant-ok", "limits": {"semantic": 2}}
    hostile = data.draw(st.sampled_from(["query", "memory_id", "limits", "weights", "timeout_s"]))
    call[hostile] = data.draw(
        {
            "query": BAD_QUERIES,
            "memory_id": BAD_MEMORY_IDS,
            "limits": BAD_LIMITS,
            "weights": BAD_WEIGHTS,
            "timeout_s": BAD_TIMEOUTS,
        }[hostile]
    )

    with pytest.raises(InvalidInput) as caught:
        api.retrieve(**call)

    assert field_root(caught.value.field) == hostile
    assert caught.value.message


@FEW
@given(data=st.data())
def test_the_client_refuses_hostile_memories_and_writes_nothing(data: st.DataObject, mongo_db: Any) -> None:
    tenant = f"hostile-{uuid.uuid4().hex[:8]}"
    call: dict[str, Any] = {"memory_id": tenant, "memory_type": "semantic", "items": ["a fine memory"]}
    hostile = data.draw(st.sampled_from(["memory_id", "memory_type", "items"]))
    call[hostile] = data.draw({"memory_id": BAD_MEMORY_IDS, "memory_type": BAD_TYPES, "items": BAD_ITEMS}[hostile])

    stored = stored_documents(mongo_db)

    with pytest.raises(InvalidInput) as caught:
        api.remember(**call)

    expected = {"memory_id": "memory_id", "memory_type": "type", "items": "items"}[hostile]
    assert field_root(caught.value.field) == expected
    assert stored_documents(mongo_db) == stored


@FEW
@given(memory_id=BAD_MEMORY_IDS, memory_type=st.one_of(st.none(), BAD_TYPES), ids=st.sampled_from([None, ["$ne"]]))
def test_the_client_refuses_a_hostile_forget_and_deletes_nothing(
    memory_id: Any, memory_type: Any, ids: Any, mongo_db: Any, victim: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        api.forget(memory_id, memory_type, ids)

    assert field_root(caught.value.field) in {"memory_id", "type", "ids"}
    assert victim_intact(mongo_db, victim)


# -- the command line ----------------------------------------------------------------------------------------


def memq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
        cwd=ROOT,
    )


CLI_HOSTILE = st.one_of(
    st.tuples(st.just("memory_id"), st.sampled_from(["$ne", "$gt", " ", "x" * 300]).map(lambda v: ["--memory-id", v])),
    st.tuples(
        st.just("limit"),
        st.sampled_from(["semantic", "=3", "semantic=lots", "semantic=1=2"]).map(lambda v: ["--limit", v]),
    ),
    st.tuples(
        st.just("limits"),
        st.sampled_from(["semantic=0", "semantic=999999999999", "dreams=1", "$ne=1"]).map(lambda v: ["--limit", v]),
    ),
    st.tuples(
        st.just("weights"),
        st.sampled_from(["fame=1", "relevance=nan", "relevance=-1", "relevance=1e309", "relevance=x"]).map(
            lambda v: ["--weights", v]
        ),
    ),
    st.tuples(
        st.just("timeout_s"), st.sampled_from(["0", "-5", "nan", "inf", "1e9"]).map(lambda v: ["--timeout-s", v])
    ),
)


@settings(max_examples=8, deadline=None)
@given(case=CLI_HOSTILE)
def test_the_cli_answers_hostile_retrieval_options_with_exit_2_and_one_line_naming_the_field(
    case: tuple[str, list[str]],
) -> None:
    expected, option = case
    args = {"--memory-id": "tenant-ok", "--limit": "semantic=1"}
    args.update({option[0]: option[1]})
    flat = [part for pair in args.items() for part in pair]

    as_json = memq("retrieve", "what do they eat?", *flat, "--json")
    readable = memq("retrieve", "what do they eat?", *flat)

    assert as_json.returncode == 2 and readable.returncode == 2, readable.stderr
    error = json.loads(as_json.stdout)
    assert error["error"] == "invalid_input" and field_root(error["field"]) == expected
    assert "Traceback" not in as_json.stderr + readable.stderr
    lines = readable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memq: error: ")


JSONL_LINES = st.one_of(
    st.sampled_from(
        [
            "{not json}",
            "[1, 2, 3]",
            '"just a string"',
            "42",
            "null",
            '{"content": ""}',
            '{"content": 7}',
            '{"content": "ok", "$set": {"memory_id": "victim"}}',
            '{"content": "ok", "metadata": {"$gt": ""}}',
            '{"content": "ok", "importance": 1e400}',
            '{"memory_id": {"$ne": null}, "content": "ok"}',
        ]
    ),
    st.binary(min_size=1, max_size=40).map(lambda b: b.decode("latin-1")).filter(str.strip),
)


@settings(max_examples=8, deadline=None)
@given(
    good=st.integers(0, 3),
    bad=st.lists(JSONL_LINES, min_size=1, max_size=3),
    invalid_utf8=st.booleans(),
)
def test_malformed_jsonl_is_refused_with_exit_2_and_nothing_is_written(
    good: int, bad: list[str], invalid_utf8: bool, mongo_db: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tenant = f"jsonl-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("jsonl") / "memories.jsonl"
    lines = [json.dumps({"content": f"a good memory {i}"}) for i in range(good)] + bad
    data = "\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines).encode("utf-8", "surrogatepass")
    path.write_bytes(data + (b"\xff\xfe\n" if invalid_utf8 else b"\n"))
    stored = stored_documents(mongo_db)

    shown = memq("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path), "--json")

    assert shown.returncode == 2, shown.stdout + shown.stderr
    error = json.loads(shown.stdout)
    assert error["error"] == "invalid_input" and field_root(error["field"]) in {"file", "items"}
    assert "Traceback" not in shown.stderr
    assert stored_documents(mongo_db) == stored


# -- raw send_task payloads (no client checks) ------------------------------------------------------------------


def embedded_for(app: Any, text: str) -> dict[str, Any]:
    return dict(app.send_task(names.EMBED_QUERY, args=(text,), queue=names.EMBED_QUEUE).get(timeout=60))


@pytest.fixture(scope="module")
def real_embedding(app: Any) -> dict[str, Any]:
    return embedded_for(app, "what does this person like?")


def outcome_of(app: Any, task: str, args: list[Any], queue: str) -> tuple[str, Any]:
    result = app.send_task(task, args=args, queue=queue)
    value = result.get(timeout=60, propagate=False)
    state = result.state
    result.forget()
    return state, value


@FEW
@given(
    memory_id=BAD_MEMORY_IDS,
    memory_type=st.one_of(st.just("semantic"), BAD_TYPES),
    k=st.sampled_from([3, 0, -1, 10**12, True, "5"]),
)
def test_a_raw_search_with_hostile_arguments_reports_an_error_and_reads_no_tenant(
    app: Any, fleet: Any, real_embedding: dict[str, Any], victim: str, memory_id: Any, memory_type: Any, k: Any
) -> None:
    state, value = outcome_of(app, names.SEARCH, [real_embedding, memory_id, memory_type, k], names.SEARCH_QUEUE)

    assert state == "SUCCESS"  # a search never raises: the failure is reported for its type
    assert value["items"] == [] and "invalid input" in value["error"]


@FEW
@given(
    embedded=st.one_of(
        st.none(),
        st.just({}),
        st.just({"vector": "!!not base64!!"}),
        st.just({"vector": [1, 2, 3]}),
        st.binary(max_size=8).map(lambda b: {"vector": b.hex()}),
    )
)
def test_a_raw_search_with_a_garbage_embedding_reports_an_error(
    app: Any, victim: str, embedded: Any, mongo_db: Any
) -> None:
    vector_search = [embedded, victim, "semantic", 3, "auto", None, None, "vector"]
    state, value = outcome_of(app, names.SEARCH, vector_search, names.SEARCH_QUEUE)

    assert state == "SUCCESS"
    assert value["items"] == [] and value["error"]
    assert victim_intact(mongo_db, victim)


@FEW
@given(
    memory_id=st.one_of(BAD_MEMORY_IDS, st.just("ok-tenant")),
    memory_type=st.one_of(BAD_TYPES, st.just("semantic")),
    items=st.one_of(BAD_ITEMS, st.just([{"content": "fine"}])),
    embedded=st.sampled_from(["good", "none", "short", "garbage"]),
)
def test_a_raw_store_with_hostile_arguments_fails_and_writes_nothing(
    app: Any,
    real_embedding: dict[str, Any],
    mongo_db: Any,
    victim: str,
    memory_id: Any,
    memory_type: Any,
    items: Any,
    embedded: str,
) -> None:
    vectors = {"good": [real_embedding["vector"]], "none": [], "short": ["AAAA"], "garbage": ["$$$"]}[embedded]
    all_valid = memory_id == "ok-tenant" and memory_type == "semantic" and items == [{"content": "fine"}]
    if all_valid:
        memory_id = {"$ne": None}  # keep at least one argument hostile
    payload = {"vectors": vectors, "model": "all-MiniLM-L6-v2"}
    stored = stored_documents(mongo_db)

    state, value = outcome_of(app, names.STORE, [payload, memory_id, memory_type, items], names.INGEST_QUEUE)

    assert state == "FAILURE" and refused(value, "memory_id", "type", "items", "embedded")
    assert stored_documents(mongo_db) == stored
    assert victim_intact(mongo_db, victim)


@FEW
@given(
    memory_id=BAD_MEMORY_IDS,
    memory_type=st.one_of(st.none(), st.just("semantic"), BAD_TYPES),
    ids=st.sampled_from([None, [{"$ne": None}], "*", ["$gt"]]),
)
def test_a_raw_forget_with_an_operator_shaped_tenant_deletes_nothing(
    app: Any, mongo_db: Any, victim: str, memory_id: Any, memory_type: Any, ids: Any
) -> None:
    state, value = outcome_of(app, names.FORGET, [memory_id, memory_type, ids], names.INGEST_QUEUE)

    assert state == "FAILURE" and refused(value, "memory_id", "type", "ids")
    assert victim_intact(mongo_db, victim)


@FEW
@given(
    query=BAD_QUERIES,
    memory_id=st.one_of(st.just("tenant-ok"), BAD_MEMORY_IDS),
    limits=st.one_of(st.just({"semantic": 1}), BAD_LIMITS),
)
def test_a_raw_retrieve_with_hostile_arguments_fails_with_invalid_input(
    app: Any, query: Any, memory_id: Any, limits: Any
) -> None:
    state, value = outcome_of(app, names.RETRIEVE, [query, memory_id, limits], names.SEARCH_QUEUE)

    assert state == "FAILURE" and refused(value, "query", "memory_id", "limits")


@pytest.mark.parametrize("arguments", [[], [None], [0], ["384"], [{"vectors": ["!!"], "model": "x"}]])
def test_a_raw_create_indexes_without_a_sound_dimension_fails_with_invalid_input_naming_it(
    app: Any, arguments: list[Any]
) -> None:
    state, value = outcome_of(app, names.CREATE_INDEXES, arguments, names.INGEST_QUEUE)

    assert state == "FAILURE" and isinstance(value, InvalidInput), (state, value)
    assert value.field in ("dimensions", "embedded.model", "embedded.vectors[0]")


BAD_TEXTS = st.one_of(
    st.sampled_from([[], None, "not a list", {"texts": ["a"]}, [""], ["   "], [None], [7], [["nested"]]]),
    st.integers(32769, 40_000).map(lambda n: ["t" * n]),
    st.integers(1001, 1200).map(lambda n: ["t"] * n),
)


@FEW
@given(query=BAD_QUERIES)
def test_a_raw_query_embedding_of_a_hostile_query_fails_with_invalid_input(app: Any, query: Any) -> None:
    state, value = outcome_of(app, names.EMBED_QUERY, [query], names.EMBED_QUEUE)

    assert state == "FAILURE" and refused(value, "query")


@FEW
@given(texts=BAD_TEXTS)
def test_a_raw_bulk_embedding_of_hostile_texts_fails_with_invalid_input(app: Any, texts: Any) -> None:
    state, value = outcome_of(app, names.EMBED_TEXTS, [texts], names.EMBED_QUEUE)

    assert state == "FAILURE" and refused(value, "texts")


def test_a_workers_invalid_input_reaches_the_caller_as_invalid_input_with_its_field(app: Any) -> None:
    state, value = outcome_of(app, names.FORGET, [{"$ne": None}, None, None], names.INGEST_QUEUE)

    assert state == "FAILURE"
    assert isinstance(value, InvalidInput) and value.field == "memory_id"


def test_a_merge_that_lacks_a_requested_type_reports_it_under_errors(app: Any) -> None:
    """What a duplicated or lost chord header delivers: results for some requested types only."""
    request = {"query": "q", "memory_id": "tenant-ok", "limits": {"semantic": 1, "episodic": 1}}
    only_one = [{"type": "long_term_memory", "items": [], "search_ms": 1.0}] * 2

    result = app.send_task(names.MERGE, args=[only_one], kwargs={"request": request}, queue=names.SEARCH_QUEUE)
    merged = result.get(timeout=60)

    assert "conversation_memory" in merged["errors"], merged


def test_every_worker_still_answers_after_the_hostile_payloads(app: Any, fleet: Any) -> None:
    assert all_workers_answer(app, fleet)
    assert all(process.poll() is None for process in fleet.workers.values())


# -- tenant isolation ------------------------------------------------------------------------------------------

WORDS = ["sushi", "tea", "curry", "hiking", "cats", "dogs", "jazz", "chess", "rain", "bread"]
CONTENTS = st.lists(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join), min_size=1, max_size=4, unique=True
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    contents=st.lists(CONTENTS, min_size=2, max_size=3),
    shared_id=st.booleans(),
    query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
    forget_index=st.integers(0, 2),
)
def test_no_retrieval_cache_hit_or_forget_ever_touches_another_tenants_memories(
    contents: list[list[str]], shared_id: bool, query: str, forget_index: int, mongo_db: Any
) -> None:
    tenants = [f"iso-{uuid.uuid4().hex[:8]}" for _ in contents]
    own: dict[str, set[str]] = {}
    for tenant, texts in zip(tenants, contents, strict=True):
        items = [{"content": f"{tenant}: {text}"} for text in texts]
        if shared_id:
            items[0]["id"] = "same-id-everywhere"
        stored = api.remember(tenant, "semantic", items)
        own[tenant] = {item["content"] for item in items}
        assert stored["inserted"] == len(items)

    for _ in range(2):  # the second pass is served from the search workers' matrix caches
        for tenant in tenants:
            found = api.retrieve(query, tenant, {"semantic": 10})["results"]["long_term_memory"]
            assert {item["content"] for item in found} == own[tenant]

    gone = tenants[forget_index % len(tenants)]
    if shared_id:
        deleted = api.forget(gone, "semantic", ids=["same-id-everywhere"])
        own[gone] -= {f"{gone}: {contents[tenants.index(gone)][0]}"}
        assert deleted["deleted"] == {"long_term_memory": 1}
    else:
        api.forget(gone)
        own[gone] = set()
    for tenant in tenants:
        stored = {d["content"] for d in mongo_db["long_term_memory"].find({"memory_id": tenant}, {"content": 1})}
        assert stored == own[tenant]
        found = api.retrieve(query, tenant, {"semantic": 10})["results"]["long_term_memory"]
        assert {item["content"] for item in found} == own[tenant]
