"""The ``memq`` command line against the real fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("fleet")


def memq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.cli", *args], capture_output=True, text=True, timeout=120, env=os.environ
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
    assert mongo_db["long_term_memory"].count_documents({"memory_id": tenant}) == 0  # type: ignore[index]
