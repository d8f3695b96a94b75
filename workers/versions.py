"""Tenant data versions: a Redis counter per (memory_id, type), bumped after every write.

Readers that cache derived data (the exact-search matrices, the result cache) key it on the
version, so a write makes old entries unreachable at once, without scanning or deleting.
If Redis cannot be read, callers get ``None`` and must not use a cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from memq import keys
from workers.redis_conn import cache_redis

log = logging.getLogger(__name__)


def read_versions(memory_id: str, memory_types: Iterable[str]) -> dict[str, int] | None:
    names = list(memory_types)
    try:
        raw = cache_redis.get().mget([keys.tenant_version(memory_id, t) for t in names])
    except redis.RedisError as exc:
        log.warning("tenant versions unavailable (%s); caches bypassed", exc)
        return None
    return {t: int(v or 0) for t, v in zip(names, raw, strict=True)}


def bump_versions(memory_id: str, memory_types: Iterable[str]) -> None:
    """Called after a write has been acknowledged by MongoDB. Raises on Redis errors: a write whose
    invalidation failed must be retried, or caches would serve stale memories."""
    client = cache_redis.get()
    pipe = client.pipeline(transaction=False)
    for t in memory_types:
        pipe.incr(keys.tenant_version(memory_id, t))
    pipe.execute()
