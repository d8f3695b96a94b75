"""Edges an independent probe broke (issue #26): a misspelled remote-control list, ``hello`` revoking tasks, a worker
option without its value, and a resume line past the end of an import file."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError
from faultkit import memq_cli

from memq import names


@pytest.mark.parametrize("setting", ["shutdwon", "ALL", "ping,revok"])
def test_a_worker_with_a_misspelled_remote_control_list_exits_2_naming_the_variable_before_it_starts(
    setting: str,
) -> None:
    started = memq_cli("worker", "search", "-n", f"misspelled-{uuid.uuid4().hex[:6]}@x", env={
        **os.environ, "MEMQ_REMOTE_CONTROL": setting
    })  # fmt: skip

    assert started.returncode == 2, started.stderr[-2000:]
    assert started.stderr.startswith("memq: error: MEMQ_REMOTE_CONTROL names unknown command(s)")
    assert started.stderr.count("\n") == 1 and "Traceback" not in started.stderr


def test_a_worker_device_option_without_its_value_is_a_usage_error_not_a_traceback() -> None:
    started = memq_cli("worker", "embed", "--device")

    assert started.returncode == 2
    assert "--device" in started.stderr and "expected one argument" in started.stderr
    assert "Traceback" not in started.stderr


def test_an_import_resumed_past_the_end_of_its_file_is_refused_naming_skip(tmp_path: Path, tenant: str) -> None:
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"content": f"line {i}"}) + "\n" for i in range(3)), encoding="utf-8")

    resumed = memq_cli("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path), "--skip", "10")
    as_json = memq_cli(
        "remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path), "--skip", "10", "--json"
    )

    assert resumed.returncode == 2 and resumed.stderr.startswith("memq: error: skip: past the end"), resumed.stderr
    assert "3 line(s)" in resumed.stderr and "stored_through" not in resumed.stdout
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["field"] == "skip"


def test_a_hello_broadcast_with_a_revoked_map_is_refused_and_revokes_nothing(fleet: Any, app: Any) -> None:
    task_id = str(uuid.uuid4())

    replies = app.control.broadcast(
        "hello",
        arguments={"from_node": "intruder@elsewhere", "revoked": {task_id: time.time()}},
        reply=True,
        timeout=2.0,
        destination=list(fleet.workers),
    )
    embedded = app.send_task(names.EMBED_QUERY, args=["is this task still allowed to run?"], task_id=task_id)

    answers = {host: answer for reply in replies or [] for host, answer in reply.items()}
    assert set(answers) == set(fleet.workers)
    assert all("disabled" in str(answer.get("error", "")) for answer in answers.values()), answers
    try:
        vector = embedded.get(timeout=60)["vector"]
    except TaskRevokedError:  # what a worker that adopted the map does
        pytest.fail("a hello broadcast revoked a task on a worker")
    assert vector
