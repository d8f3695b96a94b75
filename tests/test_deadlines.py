"""Every public call returns or raises within its ``timeout_s`` plus a stated margin, whatever is down: the broker,
a paused Redis, a saturated asyncio client pool. (A paused MongoDB: tests/test_faults.py.)

The clients run in subprocesses, because settings are read once per process and these point at services that
are down or paused on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import faultkit
import pytest

from memq.ops import services

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
