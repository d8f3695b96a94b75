"""Edges an independent probe broke (issue #26): a misspelled remote-control list, ``hello`` revoking tasks, a worker
option without its value, a resume line past the end of an import file (or a file that cannot be read), and a far-future
``eta`` held unacknowledged."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import TaskRevokedError
from faultkit import memq_cli

from memq.client import api
from memq.core import keys, names
from memq.workers.plumbing.remote_control import DEFAULT_ALLOWED_COMMANDS

SEARCH_WORKER = ["search", "-n", f"misspelled-{uuid.uuid4().hex[:6]}@x"]


@pytest.mark.parametrize(
    ("setting", "worker"),
    [
        ("shutdwon", SEARCH_WORKER),
        ("ALL", SEARCH_WORKER),
        ("ping,revok", SEARCH_WORKER),
        ("shutdwon", ["embed", "--gpus", "0"]),  # one worker per GPU: none starts
    ],
)
def test_a_worker_with_a_misspelled_remote_control_list_exits_2_naming_the_variable_before_it_starts(
    setting: str, worker: list[str]
) -> None:
    started = memq_cli("worker", *worker, env={**os.environ, "MEMQ_REMOTE_CONTROL": setting})

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


def test_an_import_of_a_file_that_cannot_be_read_is_refused_naming_it(tmp_path: Path, tenant: str) -> None:
    missing = tmp_path / "missing.jsonl"

    refused = memq_cli("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(missing))

    assert refused.returncode == 2 and refused.stderr.startswith(f"memq: error: file: cannot read {missing}")
    assert "Traceback" not in refused.stderr


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


def broker() -> redis.Redis:
    return redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"])


def dead_letter_of(task_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for raw in broker().lrange(keys.DEAD_LETTERS, 0, -1):
            letter = json.loads(raw)
            if task_id in letter["headers"]:
                return letter
        time.sleep(0.1)
    raise AssertionError(f"no dead letter for {task_id} within {timeout_s:g} s")


def held_unacknowledged(task_id: str, settle_s: float = 10.0) -> bool:
    """Whether a worker still holds the message after ``settle_s`` (a dead letter is recorded, then acknowledged)."""
    deadline = time.monotonic() + settle_s
    while any(task_id in raw.decode("utf-8", "replace") for raw in broker().hvals("unacked")):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
    return False


FAR_FUTURE_TASKS = {
    names.EMBED_QUEUE: (names.EMBED_QUERY, ["a message for the year 2036"]),
    names.SEARCH_QUEUE: (names.MERGE, [[]]),
    names.INGEST_QUEUE: (names.FORGET, ["far-future-tenant-nobody-uses"]),
}


@pytest.mark.parametrize("queue", names.QUEUES)
def test_a_message_with_an_eta_ten_years_ahead_is_dead_lettered_not_held_and_the_worker_keeps_serving(
    queue: str, fleet: Any, app: Any, tenant: str
) -> None:
    task, args = FAR_FUTURE_TASKS[queue]

    sent = app.send_task(task, args=args, queue=queue, eta=datetime.now(UTC) + timedelta(days=3653))

    letter = dead_letter_of(sent.id)
    assert letter["reason"] == "eta_too_far" and letter["queue"] == queue
    assert "MEMQ_VISIBILITY_TIMEOUT_S" in letter["detail"]
    assert not held_unacknowledged(sent.id)
    assert all(process.poll() is None for process in fleet.workers.values())
    api.remember(tenant, "semantic", ["keeps bees in the garden"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]


def test_a_message_whose_eta_is_after_its_own_expiry_is_dead_lettered_naming_both(fleet: Any, app: Any) -> None:
    now = datetime.now(UTC)

    sent = app.send_task(
        names.EMBED_QUERY, args=["too late"], eta=now + timedelta(seconds=60), expires=now + timedelta(seconds=30)
    )

    letter = dead_letter_of(sent.id)
    assert letter["reason"] == "eta_after_deadline"
    assert "expires" in letter["detail"] and "eta" in letter["detail"]
    assert not held_unacknowledged(sent.id)


def test_no_command_allowed_by_default_revokes_or_rate_limits_a_task_and_every_worker_keeps_serving(
    fleet: Any, app: Any
) -> None:
    victim = str(uuid.uuid4())
    hostile = {
        "from_node": "intruder@elsewhere",
        "revoked": {victim: time.time()},
        "ids": [victim],
        "task_id": victim,
        "task_name": names.EMBED_QUERY,
        "rate_limit": "1/h",
    }

    for command in sorted(DEFAULT_ALLOWED_COMMANDS):
        app.control.broadcast(command, arguments=hostile, reply=True, timeout=1.0, destination=list(fleet.workers))
    first = app.send_task(names.EMBED_QUERY, args=["the task someone tried to revoke"], task_id=victim)
    second = app.send_task(names.EMBED_QUERY, args=["a second one, past a 1/h rate limit"])

    revoked = app.control.inspect(destination=list(fleet.workers), timeout=2.0).revoked() or {}
    assert all(victim not in ids for ids in revoked.values()), revoked
    assert first.get(timeout=60)["vector"] and second.get(timeout=60)["vector"]
    pings = app.control.ping(destination=list(fleet.workers), timeout=2.0)
    assert {host for reply in pings for host in reply} == set(fleet.workers)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ([], {}, "memory_id"),
        ([{}, "tenant", "semantic", 3, "auto", None, "q", "vector", None, "one too many"], {}, "args"),
        ([], {"bogus": 1}, "bogus"),
    ],
)
def test_a_raw_search_with_wrong_arguments_reports_invalid_input_naming_the_field_and_never_raises(
    args: list[Any], kwargs: dict[str, Any], field: str, fleet: Any, app: Any
) -> None:
    result = app.send_task(names.SEARCH, args=args, kwargs=kwargs, queue=names.SEARCH_QUEUE).get(timeout=60)

    assert result["items"] == [] and result["error"].startswith(f"invalid input: {field}: "), result
    assert app.control.ping(destination=list(fleet.workers), timeout=2.0)


def test_a_raw_search_without_a_mode_is_a_hybrid_search_like_a_retrieval(fleet: Any, app: Any) -> None:
    result = app.send_task(names.SEARCH, args=[{}, "tenant", "semantic", 3], queue=names.SEARCH_QUEUE).get(timeout=60)

    assert result["error"] == "invalid input: query: is needed for mode 'hybrid'", result
