"""Faults with RabbitMQ as the broker, on a node of the test's own (``rabbitmq.Node``: its own node name, ports and
data directory, never the shared broker): a worker of each kind SIGKILLed under 16 clients, and the broker itself
restarted in the middle of the load. The client driver, the accounting of outcomes and the rig are
tests/test_faults.py's (there on Redis); here the rig's broker is the node, Redis is its result backend and cache.
Runs in ``bash scripts/test_rabbitmq.sh``."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import rabbitkit
import test_faults
from test_faults import CLEAR, HANG_MARGIN_S, Rig, running_rig, tally, wait_for

from memq.ops import services

pytestmark = pytest.mark.skipif(
    not rabbitkit.wanted(), reason="RabbitMQ broker tests: bash scripts/test_rabbitmq.sh (MEMQ_TEST_BROKER=rabbitmq)"
)
TIMEOUT_S = 20


def amqp_app(broker_url: str, result_backend: str) -> Any:
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    app = Celery("memq-rabbitmq-faults", set_as_current=False)
    app.config_from_object(celery_config(Settings(broker_url=broker_url, result_backend=result_backend)))
    return app


@pytest.fixture(scope="module")
def node() -> Iterator[rabbitkit.Node]:
    node = rabbitkit.own_node()
    node.start()
    try:
        yield node
    finally:
        node.remove()


@pytest.fixture(scope="module")
def rig(node: rabbitkit.Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    redis_service = services.start_redis_server()
    mongo = services.start_nx27017()
    env = services.memq_env(
        os.environ,
        node.url,
        services.mongodb_timeouts(mongo.url, 1000),
        MEMQ_RESULT_BACKEND=redis_service.url,
        MEMQ_REDIS_URL=redis_service.url,
        MEMQ_MONGODB_DB="memq_rabbitmq_faults",
        MEMQ_METRICS_PORT="0",
        MEMQ_RESULT_CACHE_TTL_S="0",  # every retrieval goes through the broker
    )
    rabbitkit.setup_topology(env, rabbitmqctl=node.ctl_command())
    app = amqp_app(node.url, redis_service.url)
    workers = dict.fromkeys(services.WORKER_KINDS, 2)
    with running_rig(redis_service, mongo, env, app, workers, tmp_path_factory.mktemp("rmq"), "rmq") as rig:
        yield rig


@pytest.fixture(scope="module")
def seeded(rig: Rig) -> list[str]:
    return rig.seed_tenants("rmq-load")


def start_load(rig: Rig, tenants: list[str], seconds: float) -> tuple[test_faults.Driver, Any]:
    stop_file = rig.tmp / f"stop-{uuid.uuid4().hex[:8]}"
    load = rig.client(
        "load", "--tenants", json.dumps(tenants), "--seconds", str(seconds), "--threads", "16",
        "--timeout-s", str(TIMEOUT_S), "--stop-file", str(stop_file),
    )  # fmt: skip
    return load, stop_file


def assert_every_request_accounted_for(summary: dict[str, Any]) -> Any:
    outcomes = tally(summary["records"])
    assert summary["hung"] == 0, outcomes
    assert outcomes["silent"] == 0 and outcomes["crash"] == 0, [
        r for r in summary["records"] if r["outcome"] in {"silent", "crash"}
    ]
    assert summary["sent"] == len(summary["records"]) == sum(outcomes[o] for o in CLEAR), outcomes
    return outcomes


@pytest.mark.parametrize("kind", ["search", "embed", "ingest"])
def test_a_worker_killed_under_load_has_its_messages_run_elsewhere_at_once_and_every_memory_stored_once(
    rig: Rig, seeded: list[str], kind: str
) -> None:
    load, stop_file = start_load(rig, seeded, 120)
    writer = f"rmq-writer-{uuid.uuid4().hex[:6]}"
    contents = [f"memory number {i} of {writer}" for i in range(400)]
    wait_for(lambda: len(load.seen()) >= 32, 120, "the load to reach a steady state")
    remember = rig.client("remember", "--tenants", json.dumps([writer]), "--contents", json.dumps(contents))
    victim = rig.hosts[kind][0]

    test_faults.faultkit.kill_worker(rig.fleet, victim)  # kill -9, mid-load and mid-write
    try:
        done_at_kill = len(load.seen())
        wait_for(lambda: len(load.seen()) >= done_at_kill + 48, 120, "the surviving worker to keep serving")
        stop_file.touch()
        summary = load.result(120 + TIMEOUT_S + HANG_MARGIN_S + 60)
        written = remember.result(240)
    finally:
        rig.revive()

    outcomes = assert_every_request_accounted_for(summary)
    print(f"kill -9 {kind} on RabbitMQ: sent {summary['sent']}, {dict(outcomes)}")
    # The victim's messages went to the other worker when its connection closed, not after a visibility timeout
    # (300 s on Redis): at most the requests in flight at the kill (one per client thread) timed out.
    assert outcomes["timeout"] <= 16, [r["detail"] for r in summary["records"] if r["outcome"] == "timeout"]
    assert max(r["elapsed_s"] for r in summary["records"]) <= TIMEOUT_S + HANG_MARGIN_S
    assert written["ok"]["inserted"] + written["ok"]["updated"] == len(contents), written
    assert rig.mongo_count(writer) == len(contents)  # each remembered memory stored once


def test_a_broker_restart_mid_load_ends_every_request_clearly_and_the_fleet_recovers_without_restarts(
    rig: Rig, seeded: list[str], node: rabbitkit.Node
) -> None:
    load, stop_file = start_load(rig, seeded, 150)
    wait_for(lambda: len(load.seen()) >= 32, 120, "the load to reach a steady state")
    pids = {host: process.pid for host, process in rig.fleet.workers.items()}

    node.stop()
    time.sleep(3)
    node.start()
    restarted = len(load.seen())
    wait_for(lambda: tally_of(load.seen()).get("complete", 0) >= 16 + restarted, 180, "retrievals to complete again")
    stop_file.touch()
    summary = load.result(150 + TIMEOUT_S + HANG_MARGIN_S + 60)

    outcomes = assert_every_request_accounted_for(summary)
    print(f"broker restart on RabbitMQ: sent {summary['sent']}, {dict(outcomes)}")
    assert {host: process.pid for host, process in rig.fleet.workers.items()} == pids
    assert all(process.poll() is None for process in rig.fleet.workers.values())
    wait_for(lambda: rig.answering() == set(rig.all_hosts()), 120, "every worker to answer again")
    after = rig.client("load", "--tenants", json.dumps(seeded), "--seconds", "3", "--threads", "16")
    assert tally(after.result(120)["records"]).keys() == {"complete"}


def tally_of(outcomes: list[Any]) -> dict[str, int]:
    return {outcome: outcomes.count(outcome) for outcome in set(outcomes) if isinstance(outcome, str)}
