"""Security settings: no pickle accepted by any worker, credentials never in logs or error output.

Flower behind basic auth is covered in ``tests/test_operations.py`` (the real Flower refuses its API without
the configured credentials, and ``memq flower`` refuses to start without them).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faultkit
import pytest
from kombu import Exchange, Producer

from memq.client import api
from memq.core import names
from memq.ops import services

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = f"pw-{uuid.uuid4().hex}"
REFUSED = "Refusing to deserialize untrusted content of type pickle"


class MakesADirectoryWhenUnpickled:
    """What an attacker would send: unpickling it runs ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def publish_pickle(app: Any, task: str, queue: str, args: tuple[Any, ...]) -> str:
    """A Celery protocol-2 message for ``task`` whose body is pickle, published straight to ``queue``."""
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test_security",
    }
    body = pickle.dumps((args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    with app.connection_for_write() as connection:
        producer = Producer(connection.default_channel)
        producer.publish(
            body,
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers=headers,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            properties={"correlation_id": task_id, "reply_to": ""},
            delivery_mode=2,
        )
    return task_id


def worker_log(fleet: services.Fleet, kind: str) -> str:
    host = next(h for h in fleet.workers if h.startswith(f"{kind}@"))
    return fleet.log_tail(host, 100_000)


@pytest.mark.parametrize(
    ("kind", "task"),
    [("ingest", names.FORGET), ("search", names.SEARCH), ("embed", names.EMBED_QUERY)],
)
def test_a_pickle_message_is_refused_by_every_worker_kind_and_never_unpickled(
    app: Any, fleet: services.Fleet, tenant: str, mongo_db: Any, tmp_path: Path, kind: str, task: str
) -> None:
    api.remember(tenant, "semantic", ["a memory that a forged forget would delete"])
    marker = tmp_path / "unpickled"
    refusals_before = worker_log(fleet, kind).count(REFUSED)

    task_id = publish_pickle(app, task, kind, (tenant, MakesADirectoryWhenUnpickled(str(marker))))

    services.wait_until(lambda: worker_log(fleet, kind).count(REFUSED) > refusals_before, 60, "the refusal")
    assert not marker.exists()  # the body was never unpickled
    # The task never ran: its caller was told at once that it was dead-lettered (memq's guard), not left PENDING.
    services.wait_until(lambda: app.AsyncResult(task_id).state == "FAILURE", 30, "the caller's failure")
    assert "was dead-lettered: undecodable" in str(app.AsyncResult(task_id).result)
    assert faultkit.count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 1
    # The worker is alive and still serves JSON tasks.
    host = next(h for h in fleet.workers if h.startswith(f"{kind}@"))
    assert fleet.workers[host].poll() is None
    assert len(api.retrieve("memory", tenant, {"semantic": 1})["results"]["long_term_memory"]) == 1


def test_the_celery_config_accepts_json_only_in_both_directions(app: Any) -> None:
    assert list(app.conf.accept_content) == ["json"]
    assert list(app.conf.result_accept_content) == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"


# -- credentials ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[services.Service]:
    service = services.start_redis_server(password=PASSWORD)
    try:
        yield service
    finally:
        service.stop()


def test_a_worker_with_a_password_in_its_broker_url_never_logs_the_password(
    protected_redis: services.Service,
) -> None:
    assert PASSWORD in protected_redis.url
    env = services.memq_env(os.environ, protected_redis.url, os.environ["MEMQ_MONGODB_URI"])
    fleet = services.Fleet(env)
    app = faultkit.private_app(protected_redis.url)
    try:
        host = fleet.start("search", name="secret-search", extra_args=["--loglevel", "DEBUG"])
        fleet.wait_ready(app, [host])
        # Real work and a failing task, so the log holds connection lines, task lines and an error.
        assert app.send_task(names.SEARCH, args=("x",), queue=names.SEARCH_QUEUE).get(timeout=60) is not None
        failed = app.send_task(names.SEARCH, args=({}, "tenant", "dreams", 1), queue=names.SEARCH_QUEUE)
        assert "error" in failed.get(timeout=60)
        status = subprocess.run(
            [sys.executable, "-m", "memq.ops.cli", "status", "--json", "--timeout-s", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        fleet.stop_all()
        app.close()
    log = Path(fleet.logdir, "secret-search.log").read_text(errors="replace")

    assert re.search(r"Connected to \S*://:\*\*@", log)  # the URL is shown with its password masked
    assert PASSWORD not in log
    assert PASSWORD not in status.stdout + status.stderr and '"reachable": true' in status.stdout


def retrieve_through(broker_url: str) -> subprocess.CompletedProcess[str]:
    env = services.memq_env(os.environ, broker_url, os.environ["MEMQ_MONGODB_URI"])
    command = ["retrieve", "q", "--memory-id", "a", "--limit", "semantic=1", "--timeout-s", "5", "--json"]
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *command], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_a_client_error_for_an_unreachable_broker_never_shows_the_password() -> None:
    shown = retrieve_through(f"redis://:{PASSWORD}@127.0.0.1:{services.free_port()}/0")

    assert shown.returncode != 0
    assert PASSWORD not in shown.stdout + shown.stderr


def test_an_unreachable_broker_is_a_one_line_error_with_exit_code_2() -> None:
    shown = retrieve_through(f"redis://127.0.0.1:{services.free_port()}/0")

    assert shown.returncode == 2, shown.stderr[-2000:]
    assert "Traceback" not in shown.stderr
