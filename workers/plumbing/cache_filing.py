"""The result cache, worker side: ``memq.merge`` files its result under the cache key its request carries.

The key is the one the client's look-up built (``memq.client.result_cache``) and travels with the request, with the data
versions it names (``memq.core.wire.with_cache``). It is taken only if it is this very request's key: its fingerprint
with this worker's settings (so its tenant and identity) and the versions it carries. So a request can only fill
its own tenant's entries, and a client whose settings differ from the workers' (another model name) only misses.
The entry is written for at most the worker's TTL, only while the tenant's data versions are still the ones the
key names, and that key's single-flight lock is dropped, in one script.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from redis.commands.core import Script

from memq.client.edge import RESULT_FORMAT, cache_fingerprint, cache_types
from memq.client.result_cache import enabled
from memq.core import keys
from memq.core.settings import Settings
from memq.core.wire import RetrievalRequest

log = logging.getLogger(__name__)

PARTIAL_RESULT_TTL_MS = 250  # a result with per-type errors is kept only for the callers waiting on it

# KEYS: the requested types' version keys, the result key, its lock. ARGV: how many version keys, the versions the
# client read, the entry, its TTL in ms. Stores only while every version is still the one the client read (else a
# result computed before a write, or a forged one naming future versions, could be served after it); drops the lock.
STORE_IF_CURRENT_LUA = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if (redis.call('GET', KEYS[i]) or '0') ~= ARGV[i + 1] then
    redis.call('DEL', KEYS[n + 2])
    return 0
  end
end
redis.call('SET', KEYS[n + 1], ARGV[n + 2], 'PX', ARGV[n + 3])
redis.call('DEL', KEYS[n + 2])
return 1
"""
STORE_IF_CURRENT = Script(None, STORE_IF_CURRENT_LUA.encode())  # run with ``client=``


def store_merged(client: redis.Redis, settings: Settings, request: RetrievalRequest, result: dict[str, Any]) -> bool:
    """Worker side: cache ``memq.merge``'s ``result`` of a ``request`` that carries a cache key, under that key, for
    the client's TTL capped by this worker's ``result_cache_ttl_s`` (0: not cached), and drop that key's
    single-flight lock. Only the key of this very request is taken: its fingerprint with this worker's settings (so
    its tenant and identity) and the versions it carries; any other (a forged key naming another tenant's entry, a
    client whose settings differ) is refused, and the result is not cached."""
    key = request.get("cache_key")
    if not enabled(settings) or key is None:
        return False
    fingerprint = cache_fingerprint(settings, request)
    if key != keys.result_key(fingerprint, request["cache_versions"]):
        log.warning("result cache: a merge named a cache key that is not its request's; result not cached")
        return False
    ttl_ms = _ttl_ms(result, min(request["cache_ttl_s"], settings.result_cache_ttl_s))
    version_keys = [keys.tenant_version(request["memory_id"], t) for t in cache_types(request)]
    entry = encode_entry(result, request["memory_id"], fingerprint)
    versions = [str(v) for v in request["cache_versions"]]
    try:
        stored = STORE_IF_CURRENT(
            keys=[*version_keys, key, keys.lock_of(key)],
            args=[len(version_keys), *versions, entry, ttl_ms],
            client=client,
        )
    except (redis.RedisError, OSError) as exc:
        log.warning("result cache unavailable (%s); result not cached", exc)
        return False
    return bool(stored)


def _ttl_ms(result: dict[str, Any], ttl_s: int) -> int:
    return ttl_s * 1000 if not result.get("errors") else min(ttl_s * 1000, PARTIAL_RESULT_TTL_MS)


def encode_entry(result: dict[str, Any], memory_id: str | None, fingerprint: str | None) -> str:
    """The envelope: format, time, and whose answer it is (tenant and request fingerprint)."""
    entry = {
        "format": RESULT_FORMAT,
        "stored_at": time.time(),
        "memory_id": memory_id,
        "fingerprint": fingerprint,
        "result": result,
    }
    return json.dumps(entry, separators=(",", ":"))
