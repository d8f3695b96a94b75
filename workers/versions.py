"""Tenant data versions: a Redis counter per (memory_id, type), bumped after every write, and its change log.

Readers that cache derived data (the exact-search matrices, the result cache) key it on the
version, so a write makes old entries unreachable at once, without scanning or deleting.
If Redis cannot be read, callers get ``None`` and must not use a cache.

Each bump also appends ``{"v": <the new version>, "ids": [<stored _id>, ...]}`` to the (tenant, type)'s change log
(``keys.change_log``), in the same Lua script as the INCR, so no version exists without its entry: the stored
``_id`` s (``keys.memory_object_id``) the write touched, or ``"ids": null`` for "anything may have changed" (a
forget without ids, a migration, more than ``CHANGE_LOG_MAX_IDS`` ids). The log keeps the last
``CHANGE_LOG_MAX_ENTRIES`` entries and expires ``CHANGE_LOG_TTL_MS`` after its last write. A search process that
holds a tenant at version v and finds V re-reads just the ids of v+1..V (``changes_between``) when the log still
holds all of them, and reloads the tenant otherwise (``workers.search``). The ids are recorded even when the write
failed part-way: the reader reads their current state, whatever it is.

Every write (store, forget, a migration) runs inside ``bumped_whatever_happens``: the one place that bumps the
versions of every type the write touched or may have touched, whether it succeeded, failed part-way or raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

import redis

from memq import keys
from memq.cache_redis import cache_redis
from memq.errors import TransientError
from memq.workers.metrics import VERSION_BUMP_FAILURES

log = logging.getLogger(__name__)

CHANGE_LOG_MAX_ENTRIES = 64  # versions a search process can be behind and still catch up without a reload
CHANGE_LOG_MAX_IDS = 1000  # ids one entry names (validation.MAX_BATCH_ITEMS); more are logged as "anything changed"
CHANGE_LOG_TTL_MS = 24 * 3600 * 1000
# KEYS: the version, its change log. ARGV: the ids as a JSON array (or "null": anything changed), the log's length
# bound, its TTL in ms. The INCR and the entry of the version it made happen in one step.
BUMP_SCRIPT = """
local version = redis.call('INCR', KEYS[1])
redis.call('RPUSH', KEYS[2], '{"v":' .. version .. ',"ids":' .. ARGV[1] .. '}')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return version
"""


def read_versions(memory_id: str, memory_types: Iterable[str]) -> dict[str, int] | None:
    names = list(memory_types)
    try:
        raw = cache_redis.get().mget([keys.tenant_version(memory_id, t) for t in names])
    except redis.RedisError as exc:
        log.warning("tenant versions unavailable (%s); caches bypassed", exc)
        return None
    return {t: int(v or 0) for t, v in zip(names, raw, strict=True)}


def bump_versions(memory_id: str, memory_types: Iterable[str], touched_ids: Collection[str] | None = None) -> None:
    """Called after a write has been acknowledged by MongoDB: bumps each type's version and logs the stored
    ``_id`` s the write touched in every one of ``memory_types`` (``None``: anything may have changed). A Redis
    error is a ``TransientError``, so the store / forget task retries (the write is idempotent): a write whose
    invalidation failed must not pass for done, or every cache would go on serving the tenant's data from before
    it."""
    names = list(memory_types)
    logged = "null" if touched_ids is None or len(touched_ids) > CHANGE_LOG_MAX_IDS else json.dumps(sorted(touched_ids))
    try:
        client = cache_redis.get()
        bump = client.register_script(BUMP_SCRIPT)
        pipe = client.pipeline(transaction=False)
        for t in names:
            bump(
                keys=[keys.tenant_version(memory_id, t), keys.change_log(memory_id, t)],
                args=[logged, CHANGE_LOG_MAX_ENTRIES, CHANGE_LOG_TTL_MS],
                client=pipe,
            )
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        VERSION_BUMP_FAILURES.inc()
        raise TransientError(
            f"the write reached MongoDB but the data version of {', '.join(names)} could not be bumped in Redis "
            f"({exc}); until it is, caches may serve this tenant's memories from before the write"
        ) from exc


def changes_between(memory_id: str, memory_type: str, held_version: int, version: int) -> set[str] | None:
    """The stored ``_id`` s that versions ``held_version + 1 .. version`` of (tenant, type) touched, or ``None``
    when the log cannot say: an entry is missing (evicted, expired, Redis flushed or unreachable, or written by a
    bump without a log) or one of them says anything may have changed."""
    if version <= held_version:
        return set()
    wanted = version - held_version
    try:
        # The newest entries first: the list ends with the latest version, which is ``version`` unless writes
        # landed since it was read; the whole log only when those are not enough.
        client, log_key = cache_redis.get(), keys.change_log(memory_id, memory_type)
        touched = _logged_ids(client.lrange(log_key, -(wanted + 4), -1), held_version, version)
        if touched is None:
            touched = _logged_ids(client.lrange(log_key, 0, -1), held_version, version)
    except (redis.RedisError, OSError) as exc:
        log.warning("change log unavailable (%s); the tenant is reloaded", exc)
        return None
    return touched


def _logged_ids(raw: list[bytes], held_version: int, version: int) -> set[str] | None:
    """The ids of versions ``held_version + 1 .. version`` in ``raw`` entries, ``None`` unless all are there and
    none says anything may have changed."""
    touched: set[str] = set()
    seen: set[int] = set()
    for line in raw:
        entry = _entry(line)
        if entry is None:  # not an entry memq wrote: the log cannot bridge, the tenant is reloaded
            return None
        logged_version, ids = entry
        if held_version < logged_version <= version:
            if ids is None:
                return None
            seen.add(logged_version)
            touched.update(ids)
    return touched if len(seen) == version - held_version else None


def _entry(line: bytes) -> tuple[int, list[str] | None] | None:
    """One change-log entry as (version, ids or ``None``), or ``None`` when it is not what ``BUMP_SCRIPT`` writes."""
    try:
        entry = json.loads(line)
        logged_version, ids = entry["v"], entry["ids"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(logged_version, int) or not (ids is None or all(isinstance(i, str) for i in ids)):
        return None
    return logged_version, ids


@contextmanager
def bumped_whatever_happens(
    memory_id: str, memory_types: Iterable[str], touched_ids: Collection[str] | None = None
) -> Iterator[None]:
    """Run a write to MongoDB, then bump the data versions of ``memory_types`` (every type the write touches or may
    touch) however it ended, so no cache goes on serving what the write changed, even part of it. ``touched_ids``:
    the stored ``_id`` s (``keys.memory_object_id``) the write touches in those types, logged with the bump so a
    search process re-reads just those (``None``: anything may have changed, the tenant is reloaded).

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
            bump_versions(memory_id, names, touched_ids)
        except TransientError as bump_error:
            log.error("a write failed and so did its version bump: %s", bump_error)
            exc.add_note(f"and its version bump failed: {bump_error}")
        raise
    bump_versions(memory_id, names, touched_ids)
