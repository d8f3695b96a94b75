"""Every public call returns or raises within its ``timeout_s`` plus a stated margin, whatever is down: the broker,
a paused Redis, a saturated asyncio client pool. (A paused MongoDB: tests/test_faults.py.) Every message carries its
call's one deadline, and a message past it is not run; each hop's budget is ``deadlines.budget_s`` of it.

The clients of the timing tests run in subprocesses, because settings are read once per process and these point at
services that are down or paused on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import faultkit
import pytest
from faultkit import count_stored

from memq.client import api, canvas, edge
from memq.core import deadlines, names
from memq.core.settings import Settings
from memq.errors import RetrievalTimeout
from memq.ops import services
from memq.workers.search import strategies
from memq.workers.storage import mongo

#: What a call may take past its timeout_s: connection and socket timeouts that cannot be cut shorter (docs).
SYNC_MARGIN_S = 0.75
ASYNC_MARGIN_S = 0.75

SYNC_CLIENT = """
import json, sys, time
from memq import client
timeout_s = float(sys.argv[1])
started = time.monotonic()
try:
    limits = {"semantic": 2, "episodic": 1}
    client.retrieve("what does this person eat?", "deadline-tenant", limits, timeout_s=timeout_s)
    outcome = "result"
except Exception as exc:
    outcome = type(exc).__name__
print(json.dumps({"outcome": outcome, "elapsed_s": time.monotonic() - started}))
"""

ASYNC_CLIENT = """
import asyncio, json, sys, time
from memq import client
timeout_s, calls = float(sys.argv[1]), int(sys.argv[2])

async def one():
    started = time.monotonic()
    try:
        await client.aretrieve(f"query {started}", "deadline-tenant", {"semantic": 1}, timeout_s=timeout_s)
        outcome = "result"
    except Exception as exc:
        outcome = type(exc).__name__
    return {"outcome": outcome, "elapsed_s": time.monotonic() - started}

async def main():
    return await asyncio.gather(*(one() for _ in range(calls)))

print(json.dumps(asyncio.run(main())))
"""


def run_client(code: str, env: dict[str, str], *args: str) -> object:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def client_env(broker_url: str) -> dict[str, str]:
    return services.memq_env(os.environ, broker_url, os.environ["MEMQ_MONGODB_URI"], MEMQ_REDIS_URL="")


@pytest.fixture
def unserved_redis() -> Iterator[services.Service]:
    """A Redis no worker listens on: every retrieval sent there waits until its deadline."""
    service = services.start_redis_server()
    try:
        yield service
    finally:
        service.stop()


@pytest.mark.parametrize("timeout_s", [0.3, 1.0])
def test_a_retrieval_with_the_broker_down_fails_within_its_timeout(timeout_s: float) -> None:
    env = client_env(f"redis://127.0.0.1:{services.free_port()}/0")  # nothing listens there

    seen = run_client(SYNC_CLIENT, env, str(timeout_s))

    assert seen["outcome"] in ("TransientError", "RetrievalTimeout"), seen
    assert seen["elapsed_s"] <= timeout_s + SYNC_MARGIN_S, seen


def test_a_retrieval_nobody_serves_times_out_at_its_timeout(unserved_redis: services.Service) -> None:
    seen = run_client(SYNC_CLIENT, client_env(unserved_redis.url), "1.0")

    assert seen["outcome"] == "RetrievalTimeout", seen
    assert 1.0 <= seen["elapsed_s"] <= 1.0 + SYNC_MARGIN_S, seen


def test_a_retrieval_with_redis_paused_fails_within_its_timeout(unserved_redis: services.Service) -> None:
    assert unserved_redis.process is not None
    faultkit.pause(unserved_redis.process)
    try:
        seen = run_client(SYNC_CLIENT, client_env(unserved_redis.url), "1.0")
    finally:
        faultkit.resume(unserved_redis.process)

    assert seen["outcome"] in ("TransientError", "RetrievalTimeout"), seen
    assert seen["elapsed_s"] <= 1.0 + SYNC_MARGIN_S, seen


def test_256_concurrent_aretrieves_on_a_pool_of_64_threads_all_end_by_their_timeout(
    unserved_redis: services.Service,
) -> None:
    seen = run_client(ASYNC_CLIENT, client_env(unserved_redis.url), "1.0", "256")

    assert len(seen) == 256
    assert {call["outcome"] for call in seen} == {"RetrievalTimeout"}, seen[:3]
    assert max(call["elapsed_s"] for call in seen) <= 1.0 + ASYNC_MARGIN_S, max(c["elapsed_s"] for c in seen)


# -- one deadline in each message ---------------------------------------------------------------------------------


def test_each_message_of_a_remember_a_forget_and_a_retrieval_carries_the_calls_deadline_and_expires_at_it() -> None:
    settings = Settings()
    remember = edge.remember_request(settings, "tenant-a", "semantic", ["likes tea"], timeout_s=5)
    forget = edge.forget_request("tenant-a", "semantic", timeout_s=7)
    retrieval = edge.retrieval_request(settings, "what do they drink?", "tenant-a", {"semantic": 2}, timeout_s=3)

    embed_texts, store = canvas.remember_canvas(remember).tasks
    embed_query = canvas.retrieval_canvas(retrieval).tasks[0]
    messages = [(embed_texts, remember), (store, remember), (canvas.forget_signature(forget), forget)]

    assert time.time() + 4 < remember["deadline_ts"] <= time.time() + 5
    assert time.time() + 6 < forget["deadline_ts"] <= time.time() + 7
    for message, request in [*messages, (embed_query, retrieval)]:
        assert message.kwargs["deadline_ts"] == request["deadline_ts"], message
        assert message.options["expires"].timestamp() == pytest.approx(request["deadline_ts"], abs=1e-5), message


def test_a_search_waits_for_a_tenant_load_only_what_deadlines_budget_s_leaves_of_its_mongodb_budget() -> None:
    with mongo.time_limit(2.0):
        inside_s = strategies.load_wait_s()
        assert inside_s == pytest.approx(deadlines.budget_s(mongo.deadline_ts()), abs=0.05)

    assert 1.5 < inside_s <= 2.0
    assert strategies.load_wait_s() == deadlines.LOAD_WAIT_WITHOUT_DEADLINE_S


PAST_DEADLINE_MESSAGES = {
    names.EMBED_QUERY: (["what do they drink?"], names.EMBED_QUEUE),
    names.EMBED_TEXTS: ([["likes green tea"]], names.EMBED_QUEUE),
    names.FORGET: (["{tenant}", "semantic", None], names.INGEST_QUEUE),
}


@pytest.mark.usefixtures("fleet")
@pytest.mark.parametrize("task", list(PAST_DEADLINE_MESSAGES))
def test_a_raw_message_received_past_its_deadline_is_not_run_and_fails_saying_so(
    app: Any, mongo_db: Any, tenant: str, task: str
) -> None:
    api.remember(tenant, "semantic", ["likes green tea"], timeout_s=60)
    args, queue = PAST_DEADLINE_MESSAGES[task]
    args = [tenant if arg == "{tenant}" else arg for arg in args]

    sent = app.send_task(task, args=args, kwargs={"deadline_ts": time.time() - 1}, queue=queue)
    value = sent.get(timeout=60, propagate=False)

    assert sent.state == "FAILURE" and isinstance(value, RetrievalTimeout), (sent.state, value)
    assert f"{task} not run: its deadline passed" in str(value)
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 1  # the forget did not run


@pytest.mark.usefixtures("fleet")
def test_a_raw_store_received_past_its_deadline_writes_nothing(app: Any, mongo_db: Any, tenant: str) -> None:
    embedded = app.send_task(names.EMBED_TEXTS, args=(["likes green tea"],), queue=names.EMBED_QUEUE).get(timeout=60)
    items = [{"content": "likes green tea"}]

    sent = app.send_task(
        names.STORE, args=[embedded, tenant, "semantic", items], kwargs={"deadline_ts": 1.0}, queue=names.INGEST_QUEUE
    )
    value = sent.get(timeout=60, propagate=False)

    assert sent.state == "FAILURE" and isinstance(value, RetrievalTimeout), (sent.state, value)
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 0


@pytest.mark.usefixtures("fleet")
def test_a_remember_that_reaches_its_workers_after_its_deadline_stores_nothing_and_its_caller_is_told(
    mongo_db: Any, tenant: str
) -> None:
    request = edge.remember_request(Settings(), tenant, "semantic", ["reached the worker too late"], timeout_s=0.001)
    time.sleep(0.01)

    with pytest.raises(RetrievalTimeout, match="remember not run: a step reached its worker after the call's deadline"):
        api._wait(canvas.remember_canvas(request).apply_async(), 30, what="remember")
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 0
