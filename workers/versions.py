"""Tenant data versions: a Redis counter per (memory_id, type), bumped after every write.

Readers that cache derived data (the exact-search matrices, the result cache) key it on the
version, so a write makes old entries unreachable at once, without scanning or deleting.
If Redis cannot be read, callers get ``None`` and must not use a cache.

Every write (store, forget, a migration) runs inside ``bumped_whatever_happens``: the one place that bumps the
versions of every type the write touched or may have touched, whether it succeeded, failed part-way or raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import redis

from memq import keys
from memq.cache_redis import cache_redis
from memq.errors import TransientError
from memq.workers.metrics import VERSION_BUMP_FAILURES

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
    """Called after a write has been acknowledged by MongoDB. A Redis error is a ``TransientError``, so the
    store / forget task retries (the write is idempotent): a write whose invalidation failed must not pass
    for done, or every cache would go on serving the tenant's data from before it."""
    names = list(memory_types)
    try:
        pipe = cache_redis.get().pipeline(transaction=False)
        for t in names:
            pipe.incr(keys.tenant_version(memory_id, t))
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        VERSION_BUMP_FAILURES.inc()
        raise TransientError(
            f"the write reached MongoDB but the data version of {', '.join(names)} could not be bumped in Redis "
            f"({exc}); until it is, caches may serve this tenant's memories from before the write"
        ) from exc


@contextmanager
def bumped_whatever_happens(memory_id: str, memory_types: Iterable[str]) -> Iterator[None]:
    """Run a write to MongoDB, then bump the data versions of ``memory_types`` (every type the write touches or may
    touch) however it ended, so no cache goes on serving what the write changed, even part of it.

    - The write succeeded: a failed bump is a ``TransientError`` (counted in ``VERSION_BUMP_FAILURES``), so the
      task is retried and re-runs its idempotent write and the bump; once its retries run out the task fails with
      that error, visible to the caller.
    - The write raised (MongoDB lost mid-way: a delete of a later type failed, a batch was written in part): the
      versions are bumped before its error goes up; a bump that fails then is counted, logged and noted on the
      write's error, which is the one that goes up (the retried task bumps again).
    """
    names = list(memory_types)
    try:
        yield
    except BaseException as exc:
        try:
            bump_versions(memory_id, names)
        except TransientError as bump_error:
            log.error("a write failed and so did its version bump: %s", bump_error)
            exc.add_note(f"and its version bump failed: {bump_error}")
        raise
    bump_versions(memory_id, names)
