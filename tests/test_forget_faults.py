"""A write that fails part-way still moves the tenant's data versions: nothing it deleted is served again.

The fleet here has its own broker and reaches the session's MongoDB through ``wirecut.WireCut``, a TCP proxy
that cuts the connection of chosen commands: the delete of the second memory type fails every time, the
first type's delete went through, deterministically. The clients run in subprocesses (settings are read once
per process, and this test process talks to the session's Redis).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import faultkit
import pytest
import redis
from wirecut import WireCut

from memq.core import keys
from memq.core.memory_types import MemoryType
from memq.ops import services

SEMANTIC = ["loves spicy Thai green curry", "bakes sourdough bread on Sundays"]
EPISODIC = ["user: book a table for two on Friday", "assistant: booked the Thai place for Friday"]
PROCEDURAL = ["to order food: open the app, pick the curry, pay by card"]
QUERY = "what food does this person like?"


@pytest.fixture(scope="module")
def cut_fleet() -> Iterator[dict[str, Any]]:
    broker = services.start_redis_server()
    proxy = WireCut(faultkit.port_of(os.environ["MEMQ_MONGODB_URI"]))
    env = services.memq_env(os.environ, broker.url, proxy.url, MEMQ_METRICS_PORT="0")
    fleet = services.Fleet(env)
    app = faultkit.private_app(broker.url, "memq-cut")
    try:
        hosts = [fleet.start(kind, name=f"cut-{kind}") for kind in services.WORKER_KINDS]
        fleet.wait_ready(app, hosts, timeout_s=240)
        yield {"env": env, "proxy": proxy, "cache": redis.Redis.from_url(broker.url)}
    finally:
        fleet.stop_all()
        app.close()
        proxy.close()
        broker.stop()


def retrieved(env: dict[str, str], tenant: str, query: str) -> list[str]:
    """The contents a retrieval of the tenant's semantic memories returns (every one of them is asked for)."""
    return faultkit.run_client(
        env,
        f"""
        import json
        from memq import retrieve
        r = retrieve({query!r}, {tenant!r}, {{"semantic": 5}}, weights={{"relevance": 1}})
        assert not r["errors"], r["errors"]
        print(json.dumps([i["content"] for i in r["results"]["long_term_memory"]]))
        """,
    )


def forget_outcome(env: dict[str, str], tenant: str) -> str:
    """``forget`` of every type of the tenant: the name of the error it raised, or ``"ok"``."""
    return faultkit.run_client(
        env,
        f"""
        import json
        from memq import forget
        try:
            forget({tenant!r}, timeout_s=120)
            print(json.dumps("ok"))
        except Exception as exc:
            print(json.dumps(type(exc).__name__))
        """,
    )


def versions(cache: redis.Redis, tenant: str) -> dict[str, int]:
    names = [t.value for t in MemoryType]
    found = cache.mget([keys.tenant_version(tenant, name) for name in names])
    return {name: int(value or 0) for name, value in zip(names, found, strict=True)}


def test_a_forget_that_fails_mid_way_until_its_retries_run_out_leaves_no_deleted_memory_searchable(
    cut_fleet: dict[str, Any], mongo_db: Any
) -> None:
    env, proxy, cache = cut_fleet["env"], cut_fleet["proxy"], cut_fleet["cache"]
    tenant = f"forget-{uuid.uuid4().hex[:8]}"
    faultkit.run_client(
        env,
        f"""
        import json
        from memq import remember
        for memory_type, items in (("semantic", {SEMANTIC!r}), ("episodic", {EPISODIC!r}),
                                   ("procedural", {PROCEDURAL!r})):
            remember({tenant!r}, memory_type, items)
        print(json.dumps(True))
        """,
    )
    assert sorted(retrieved(env, tenant, QUERY)) == sorted(SEMANTIC)  # the search worker now caches them
    before = versions(cache, tenant)

    proxy.cut.add(("delete", MemoryType.CONVERSATION_MEMORY.value))  # the 2nd type's delete fails, every time
    try:
        outcome = forget_outcome(env, tenant)
    finally:
        proxy.cut.clear()

    assert outcome == "StoreUnavailable"  # the retries ran out and the caller sees why
    assert proxy.cuts >= 2  # the forget was retried
    assert faultkit.count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 0  # the 1st type was deleted
    assert faultkit.count_stored(mongo_db["conversation_memory"], {"memory_id": tenant}) == len(EPISODIC)  # not the 2nd
    assert retrieved(env, tenant, QUERY) == []  # the same retrieval as before: not from a cached result
    assert retrieved(env, tenant, "bread baking") == []  # a new one: not from the search worker's cached matrix
    after = versions(cache, tenant)
    assert all(after[name] > before[name] for name in after)  # every type the forget may have touched moved
