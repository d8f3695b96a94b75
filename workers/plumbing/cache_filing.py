"""The result cache, worker side: ``memq.merge`` files its result under the cache key its request carries.

Only this very request's key is taken, and written only while the tenant's data versions are still the ones it
names (docs/guarantees.md, the result cache).
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
    """Cache ``result`` under ``request``'s cache key for the client's TTL capped by this worker's (0: not cached) and
    drop that key's single-flight lock; a key other than this request's own (forged, or from other settings) is
    refused."""
    key = request.get("cache_key")
    if not enabled(settings) or key is None:
        return False
    fingerprint = cache_fingerprint(settings, request)
    if key != keys.result_key(fingerprint, request["cache_versions"]):
        log.warning("result cache: a merge named a cache key that is not its request's; result not cached")
        return False
    ttl_ms = min(request["cache_ttl_s"], settings.result_cache_ttl_s) * 1000
    if result.get("errors"):
        ttl_ms = min(ttl_ms, PARTIAL_RESULT_TTL_MS)
    version_keys = [keys.tenant_version(request["memory_id"], t) for t in cache_types(request)]
    envelope = {"format": RESULT_FORMAT, "stored_at": time.time(), "memory_id": request["memory_id"]}  # whose answer
    entry = json.dumps({**envelope, "fingerprint": fingerprint, "result": result}, separators=(",", ":"))
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
