"""The result cache: a repeated retrieval costs one Redis round trip and no task at all.

``lookup`` (one Lua script, one round trip) reads the requested types' data versions, builds the key
``memq:v1:res:<fingerprint>:<versions>`` and GETs it; on a miss it tries the single-flight lock (``SET NX PX``): its
holder runs the chord, whose merge files the result under that key (``memq.core.wire.with_cache``), while identical
callers ``wait``, polling the same script. An entry is served only if its envelope names this tenant and request
(else ``foreign``). A Redis error degrades to a miss and opens the breaker a while (``memq.client.cache_redis``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import REGISTRY, Counter, Histogram
from redis.commands.core import Script

from memq.client.cache_redis import breaker, cache_redis
from memq.client.edge import RESULT_FORMAT, cache_fingerprint, cache_types
from memq.core import deadlines, keys
from memq.core.settings import Settings
from memq.core.wire import RetrievalRequest

log = logging.getLogger(__name__)

POLL_FIRST_S = 0.002
POLL_MAX_S = 0.010

OUTCOMES = ("hit", "shared", "miss", "wait", "stale", "foreign", "error", "disabled", "timeout")  # Lookup.outcome's
LOOKUPS_TOTAL = "memq_result_cache_lookups_total"
LOOKUPS = Counter(
    LOOKUPS_TOTAL.removesuffix("_total"),
    f"Client result-cache look-ups by outcome ({', '.join(OUTCOMES)})",
    ["outcome"],
)
LOOKUP_SECONDS = Histogram(
    "memq_result_cache_lookup_seconds",
    "One result-cache round trip, client side",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25),
)
# KEYS: the requested types' version keys. ARGV: fingerprint, result prefix, lock prefix, token, lock ms.
# Returns {suffix, versions, "hit", value} | {suffix, versions, "leader"} | {suffix, versions, "wait"}. The result
# and lock keys are built here from the versions (so one round trip suffices); they are not declared, which a Redis
# Cluster refuses. The client carries the key and its versions to memq.merge (memq.core.wire.with_cache).
LOOKUP_LUA = """
local versions = {}
for i, key in ipairs(KEYS) do versions[i] = redis.call('GET', key) or '0' end
local suffix = ARGV[1] .. ':' .. table.concat(versions, '.')
local value = redis.call('GET', ARGV[2] .. suffix)
if value then return {suffix, versions, 'hit', value} end
if redis.call('SET', ARGV[3] .. suffix, ARGV[4], 'NX', 'PX', ARGV[5]) then return {suffix, versions, 'leader'} end
return {suffix, versions, 'wait'}
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Lookup:
    """What the cache said. ``outcome``: hit | shared (a hit after waiting) | miss (``leader``: this caller holds the
    single-flight lock: run the chord, then ``release``) | wait (an identical retrieval is in flight) | stale (another
    format) or foreign (another tenant or request: never served): run the chord, overwrite it | error | disabled
    (run it uncached) | timeout (waited until the caller's deadline)."""

    outcome: str
    cache_key: str | None = None
    versions: list[int] | None = None  # the data versions ``cache_key`` names, as the look-up read them
    result: dict[str, Any] | None = None
    token: str = ""
    leader: bool = False
    cache_ms: float = 0.0
    wait_ms: float = 0.0


LOOKUP = Script(None, LOOKUP_LUA.encode())  # run with ``client=``: EVALSHA, falling back to EVAL once per server
RELEASE = Script(None, RELEASE_LUA.encode())


def enabled(settings: Settings) -> bool:
    return settings.result_cache_ttl_s > 0


def lookup(settings: Settings, request: RetrievalRequest) -> Lookup:
    """One round trip: a hit (``result`` set, marked ``cached: true``), the lock (``leader``), or ``wait``."""
    if not enabled(settings):
        return _count(Lookup("disabled"))
    if breaker.is_open():
        return _count(Lookup("error"))
    return _count(_attempt(settings, request, os.urandom(8).hex()))


def wait(settings: Settings, request: RetrievalRequest, first: Lookup) -> Lookup:
    """Poll until the in-flight identical retrieval's result is cached (``shared``), the lock is ours
    (``leader``: its holder died or its result was not cacheable), Redis fails, or the deadline passes."""
    started = time.perf_counter()
    cache_ms = first.cache_ms
    interval_s = POLL_FIRST_S
    while True:
        remaining_s = deadlines.budget_s(request["deadline_ts"]) or 0.0
        if remaining_s <= 0:
            found = Lookup("timeout", first.cache_key, first.versions, cache_ms=cache_ms)
            break
        time.sleep(min(interval_s, remaining_s))
        interval_s = min(interval_s * 1.5, POLL_MAX_S)
        found = _attempt(settings, request, first.token)
        cache_ms += found.cache_ms
        if found.outcome != "wait":
            found.outcome = "shared" if found.outcome == "hit" else found.outcome
            break
    found.cache_ms = cache_ms
    found.wait_ms = _elapsed_ms(started)
    if found.result is not None:
        found.result["timings_ms"].update(cache_ms=found.cache_ms, wait_ms=found.wait_ms)
    return _count(found)


def release(settings: Settings, found: Lookup) -> None:
    """Drop our single-flight lock if it is still ours (``memq.merge`` normally dropped it already)."""
    if not found.leader or found.cache_key is None:
        return
    try:
        RELEASE(keys=[keys.lock_of(found.cache_key)], args=[found.token], client=cache_redis.get())
    except (redis.RedisError, OSError) as exc:
        log.warning("result cache: could not release the single-flight lock (%s); it expires by itself", exc)


def decode_entry(raw: bytes | str, memory_id: str, fingerprint: str) -> tuple[str, dict[str, Any] | None]:
    """``("hit", result)`` for an entry of this format whose envelope names ``memory_id`` and ``fingerprint``
    and whose result names ``memory_id``; ``("stale", None)`` for an unreadable entry or one of another format
    (an older or newer deploy); ``("foreign", None)`` for one that answers another tenant or request."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return "stale", None
    if not isinstance(entry, dict) or entry.get("format") != RESULT_FORMAT or not isinstance(entry.get("result"), dict):
        return "stale", None
    result = entry["result"]
    owner = (entry.get("memory_id"), entry.get("fingerprint"), result.get("memory_id"))
    if owner != (memory_id, fingerprint, memory_id):
        return "foreign", None
    return "hit", result


def counts() -> dict[str, float]:
    """This process's look-ups by outcome (the Prometheus counters' values), e.g. for a hit ratio."""
    return {outcome: REGISTRY.get_sample_value(LOOKUPS_TOTAL, {"outcome": outcome}) or 0.0 for outcome in OUTCOMES}


def _attempt(settings: Settings, request: RetrievalRequest, token: str) -> Lookup:
    started = time.perf_counter()
    version_keys = [keys.tenant_version(request["memory_id"], t) for t in cache_types(request)]
    # Identical misses wait on the one chord at most the fleet's default timeout (their own, if shorter): a holder
    # that died leaves the others waiting no longer than a retrieval normally takes.
    lock_ms = max(1, int(min(request["timeout_s"], settings.retrieve_timeout_s) * 1000))
    fingerprint = cache_fingerprint(settings, request)
    args = [fingerprint, keys.RESULT_PREFIX, keys.LOCK_PREFIX, token, lock_ms]
    try:
        reply = LOOKUP(keys=version_keys, args=args, client=cache_redis.get())
    except (redis.RedisError, OSError) as exc:
        breaker.trip(exc)
        return Lookup("error", cache_ms=_elapsed_ms(started))
    cache_key = keys.result_cache(reply[0].decode())
    versions = [int(version) for version in reply[1]]
    kind = reply[2].decode()
    if kind != "hit":
        leader = kind == "leader"
        outcome = "miss" if leader else "wait"
        return Lookup(outcome, cache_key, versions, token=token, leader=leader, cache_ms=_elapsed_ms(started))
    outcome, stored = decode_entry(reply[3], request["memory_id"], fingerprint)
    cache_ms = _elapsed_ms(started)
    if stored is None:
        return Lookup(outcome, cache_key, versions, cache_ms=cache_ms)
    return Lookup("hit", cache_key, versions, _served(stored, request, cache_ms), cache_ms=cache_ms)


def _served(stored: dict[str, Any], request: RetrievalRequest, cache_ms: float) -> dict[str, Any]:
    timings = {"cache_ms": cache_ms, "total_ms": (time.time() - request["requested_at"]) * 1000}
    return {**stored, "query": request["query"], "cached": True, "timings_ms": timings}


def _count(found: Lookup) -> Lookup:
    LOOKUPS.labels(outcome=found.outcome).inc()
    LOOKUP_SECONDS.observe(found.cache_ms / 1000)
    return found


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
