"""The channels a worker listens on besides its queues (remote control, events) take hostile messages too: a
malformed one is dropped and counted, never fatal, and remote control obeys only what memq needs."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from memq.client import api
from memq.core import keys
from memq.ops import services

pytestmark = pytest.mark.usefixtures("fleet")
DEEP = 100_000


@pytest.fixture
def broker() -> redis.Redis:
    return redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"])


@pytest.fixture(autouse=True)
def empty_dead_letters(broker: redis.Redis) -> Iterator[None]:
    broker.delete(keys.DEAD_LETTERS)
    yield
    broker.delete(keys.DEAD_LETTERS)


def db_of(broker: redis.Redis) -> int:
    return int(broker.connection_pool.connection_kwargs.get("db", 0))


def every_worker_answers(app: Any, fleet: services.Fleet) -> bool:
    replies = app.control.ping(destination=list(fleet.workers), timeout=2.0) or []
    return {host for reply in replies for host in reply} == set(fleet.workers)


def poison_broadcast_letters(broker: redis.Redis) -> list[dict[str, Any]]:
    letters = [json.loads(raw) for raw in broker.lrange(keys.DEAD_LETTERS, 0, -1)]
    return [letter for letter in letters if letter["reason"] == "poison_broadcast"]


def wait_for(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def still_serving(app: Any, fleet: services.Fleet, tenant: str) -> None:
    assert all(process.poll() is None for process in fleet.workers.values()), "a worker exited"
    assert every_worker_answers(app, fleet)
    api.remember(tenant, "semantic", ["keeps bees in the garden"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]


RAW_PIDBOX_PAYLOADS = ["[1]", "[" * DEEP + "]" * DEEP, '{"body": 5}', "null", '"text"', "\x00\xff"]


@pytest.mark.parametrize("payload", RAW_PIDBOX_PAYLOADS, ids=["list", "deep", "object", "null", "string", "bytes"])
def test_a_raw_publish_on_the_remote_control_channel_is_dropped_and_every_worker_keeps_serving(
    payload: str, broker: redis.Redis, app: Any, fleet: services.Fleet, tenant: str
) -> None:
    listeners = broker.publish(f"/{db_of(broker)}.celery.pidbox", payload)

    assert listeners >= len(fleet.workers)  # every worker received it
    wait_for(lambda: len(poison_broadcast_letters(broker)) >= len(fleet.workers) or payload == "\x00\xff")
    still_serving(app, fleet, tenant)


def event_envelope(body: bytes, routing_key: str) -> str:
    """What kombu publishes on a fanout channel: a well-formed envelope around ``body``."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "delivery_mode": 2,
                "delivery_info": {"exchange": "celeryev", "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


@pytest.mark.parametrize("body", [b"[1]", b'{"type": 5}', b'"x"', b"null", b"[" * DEEP + b"]" * DEEP])
def test_a_well_formed_event_with_a_garbage_body_on_the_gossip_channel_is_dropped(
    body: bytes, broker: redis.Redis, app: Any, fleet: services.Fleet, tenant: str
) -> None:
    listeners = broker.publish(f"/{db_of(broker)}.celeryev/worker.heartbeat", event_envelope(body, "worker.heartbeat"))

    assert listeners >= len(fleet.workers)
    time.sleep(1.0)  # gossip reads it on each worker's event loop
    still_serving(app, fleet, tenant)


def test_a_remote_shutdown_is_refused_by_default_with_a_reply_that_says_why(
    app: Any, fleet: services.Fleet, tenant: str
) -> None:
    replies = app.control.broadcast("shutdown", reply=True, timeout=2.0, destination=list(fleet.workers)) or []

    answers = {host: answer for reply in replies for host, answer in reply.items()}
    assert set(answers) == set(fleet.workers)
    assert all("disabled" in answer.get("error", "") for answer in answers.values())
    time.sleep(1.0)
    still_serving(app, fleet, tenant)


def test_read_only_inspection_still_answers(app: Any, fleet: services.Fleet) -> None:
    stats = app.control.inspect(destination=list(fleet.workers), timeout=2.0).stats() or {}
    queues = app.control.inspect(destination=list(fleet.workers), timeout=2.0).active_queues() or {}

    assert set(stats) == set(fleet.workers) and set(queues) == set(fleet.workers)
