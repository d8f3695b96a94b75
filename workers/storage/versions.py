"""Tenant data versions: a Redis counter per (memory_id, type), bumped after every write, and its change log.

Readers that cache derived data (the exact-search matrices, the result cache) key it on the version, so a write makes
old entries unreachable at once; if Redis cannot be read, callers get ``None`` and must not use a cache. Each bump
appends the stored ``_id`` s the write touched (or "anything changed"), and possibly their new state (``"known"``),
to the (tenant, type)'s change log, so a search process catches up on just those (``changes_between``). Every write
runs inside ``bumped_whatever_happens``. The log's format and rules: docs/architecture.md, "Inside a search worker".
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import bson
import redis
from bson.codec_options import CodecOptions
from bson.errors import BSONError

from memq.client.cache_redis import cache_redis
from memq.core import keys
from memq.errors import TransientError
from memq.workers.plumbing.metrics import VERSION_BUMP_FAILURES

log = logging.getLogger(__name__)

CHANGE_LOG_MAX_ENTRIES = 64  # versions a search process can be behind and still catch up without a reload
CHANGE_LOG_MAX_IDS = 1000  # ids one entry names (validation.MAX_BATCH_ITEMS); more are logged as "anything changed"
CHANGE_LOG_TTL_MS = 24 * 3600 * 1000
CHANGE_LOG_MAX_KNOWN_BYTES = 64 * 1024  # an entry's "known" documents (base64) past this are left out: read back
# Stored documents as the MongoDB client decodes them (``mongo._connect``: tz_aware, UTC).
STORED_CODEC = CodecOptions(tz_aware=True)
# KEYS: the version, its change log. ARGV: the ids as a JSON array (or "null": anything changed), the log's length
# bound, its TTL in ms, the version the write read before it began ("" if unknown), its "known" (base64, or ""),
# "1" if the write deletes. The INCR and the entry of the version it made happen in one step; "known" only when no
# bump came in between; a deleting write strips the earlier entries' "known" (base64 holds no quote) first.
BUMP_SCRIPT = """
if ARGV[6] == '1' then
  local entries = redis.call('LRANGE', KEYS[2], 0, -1)
  for i, entry in ipairs(entries) do
    local stripped = string.gsub(entry, ',"known":"[^"]*"}$', '}')
    if stripped ~= entry then redis.call('LSET', KEYS[2], i - 1, stripped) end
  end
end
local version = redis.call('INCR', KEYS[1])
local known = ''
if ARGV[5] ~= '' and tonumber(ARGV[4]) == version - 1 then known = ',"known":"' .. ARGV[5] .. '"' end
redis.call('RPUSH', KEYS[2], '{"v":' .. version .. ',"ids":' .. ARGV[1] .. known .. '}')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return version
"""


# KEYS: the version, its change log. ARGV: the version the reader holds (-1: none), the log's length bound. The
# version, and the log's entries after the held version when the reader is behind by what the log can bridge (read
# in the same step as the version: its last version - held entries, if the log holds them all).
READ_SCRIPT = """
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local held = tonumber(ARGV[1])
if held < 0 or version <= held or version - held > tonumber(ARGV[2]) then return {version, {}} end
return {version, redis.call('LRANGE', KEYS[2], -(version - held), -1)}
"""


def read_version_and_log(memory_id: str, memory_type: str, held_version: int) -> tuple[int, list[bytes]] | None:
    """The (tenant, type)'s version and, when ``held_version`` is behind it, the change log's newest entries (what
    ``changes_between`` reads first), in one round trip; ``None`` when Redis cannot be read."""
    try:
        client = cache_redis.get()
        version, tail = client.register_script(READ_SCRIPT)(
            keys=[keys.tenant_version(memory_id, memory_type), keys.change_log(memory_id, memory_type)],
            args=[held_version, CHANGE_LOG_MAX_ENTRIES],
        )
    except (redis.RedisError, OSError, ValueError) as exc:
        log.warning("tenant version unavailable (%s); caches bypassed", exc)
        return None
    return int(version), list(tail)


def read_versions(memory_id: str, memory_types: Iterable[str]) -> dict[str, int] | None:
    names = list(memory_types)
    try:
        raw = cache_redis.get().mget([keys.tenant_version(memory_id, t) for t in names])
    except redis.RedisError as exc:
        log.warning("tenant versions unavailable (%s); caches bypassed", exc)
        return None
    return {t: int(v or 0) for t, v in zip(names, raw, strict=True)}


@dataclass
class Write:
    """What a write tells its bump: the versions it read before it began, and (once MongoDB acknowledged all of it)
    the state it left some of its ids in: the stored document, or ``None`` for deleted."""

    read_before: dict[str, int] | None = None
    known: dict[str, dict[str, Any] | None] | None = None
    deletes: bool = False


@dataclass
class Changes:
    """What versions v+1..V changed: the stored ``_id`` s, and the current state of those whose latest entry said
    it (``known``: the stored document, or ``None`` for deleted); the others must be read from MongoDB."""

    ids: set[str] = field(default_factory=set)
    known: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def encode_known(known: Mapping[str, dict[str, Any] | None] | None) -> str:
    """The ``"known"`` of an entry, or "" when there is none or it is over ``CHANGE_LOG_MAX_KNOWN_BYTES``."""
    if not known:
        return ""
    docs = [doc for doc in known.values() if doc is not None]
    gone = [object_id for object_id, doc in known.items() if doc is None]
    encoded = base64.b64encode(bson.encode({"docs": docs, "gone": gone})).decode("ascii")
    return encoded if len(encoded) <= CHANGE_LOG_MAX_KNOWN_BYTES else ""


def bump_versions(
    memory_id: str, memory_types: Iterable[str], touched_ids: Collection[str] | None = None, write: Write | None = None
) -> None:
    """Bump each type's version and log the stored ``_id`` s the write touched (``None``: anything may have changed)
    with what ``write`` knows of them. A Redis error is a ``TransientError``, so the idempotent write is retried: a
    write whose invalidation failed must not pass for done."""
    names = list(memory_types)
    logged = "null" if touched_ids is None or len(touched_ids) > CHANGE_LOG_MAX_IDS else json.dumps(sorted(touched_ids))
    read_before = write.read_before if write is not None and logged != "null" else None
    known = encode_known(write.known) if write is not None and read_before is not None else ""
    deletes = "1" if write is not None and write.deletes else ""
    try:
        client = cache_redis.get()
        bump = client.register_script(BUMP_SCRIPT)
        pipe = client.pipeline(transaction=False)
        for t in names:
            before = "" if read_before is None or t not in read_before else str(read_before[t])
            args = [logged, CHANGE_LOG_MAX_ENTRIES, CHANGE_LOG_TTL_MS, before, known if before else "", deletes]
            bump(keys=[keys.tenant_version(memory_id, t), keys.change_log(memory_id, t)], args=args, client=pipe)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        VERSION_BUMP_FAILURES.inc()
        raise TransientError(
            f"the write reached MongoDB but the data version of {', '.join(names)} could not be bumped in Redis "
            f"({exc}); until it is, caches may serve this tenant's memories from before the write"
        ) from exc


def changes_between(
    memory_id: str, memory_type: str, held_version: int, version: int, tail: list[bytes] | None = None
) -> Changes | None:
    """What versions ``held_version + 1 .. version`` of (tenant, type) changed, or ``None`` when the log cannot say
    (an entry missing, saying anything may have changed, or not what memq writes). ``tail``: the entries
    ``read_version_and_log`` read, used when they bridge the versions."""
    if version <= held_version:
        return Changes()
    wanted = version - held_version
    touched = _logged_ids(tail, held_version, version) if tail else None
    if touched is not None:
        return _of_tenant(touched, memory_id)
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
    return None if touched is None else _of_tenant(touched, memory_id)


def _of_tenant(changes: Changes, memory_id: str) -> Changes | None:
    """``changes``, or ``None`` when a document it carries is not this tenant's (not what memq writes)."""
    return changes if all(doc is None or doc.get("memory_id") == memory_id for doc in changes.known.values()) else None


def _logged_ids(raw: list[bytes], held_version: int, version: int) -> Changes | None:
    """The changes of versions ``held_version + 1 .. version`` in ``raw`` entries (in version order, as the bump
    script appends them), ``None`` unless all are there, none says anything may have changed and each is what memq
    writes. An id's state is known when its latest entry says it."""
    changes = Changes()
    seen: set[int] = set()
    for line in raw:
        entry = _entry(line)
        if entry is None:  # not an entry memq wrote: the log cannot bridge, the tenant is reloaded
            return None
        logged_version, ids, encoded = entry
        if held_version < logged_version <= version:
            known = _known(encoded, ids)
            if ids is None or known is None:
                return None
            seen.add(logged_version)
            changes.ids.update(ids)
            for object_id in ids:
                changes.known.pop(object_id, None)
            changes.known.update(known)
    return changes if len(seen) == version - held_version else None


def _entry(line: bytes) -> tuple[int, list[str] | None, Any] | None:
    """One change-log entry as (version, ids or ``None``, its "known" still encoded), or ``None`` when it is not
    what ``BUMP_SCRIPT`` writes."""
    try:
        entry = json.loads(line)
        logged_version, ids = entry["v"], entry["ids"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(logged_version, int) or not (ids is None or all(isinstance(i, str) for i in ids)):
        return None
    return logged_version, ids, entry.get("known")


def _known(encoded: Any, ids: list[str] | None) -> dict[str, dict[str, Any] | None] | None:
    """An entry's ``"known"`` decoded: ``_id`` -> stored document or ``None`` (deleted), each among ``ids``;
    ``None`` when it is anything else."""
    if encoded is None:
        return {}
    try:
        payload = bson.decode(base64.b64decode(encoded, validate=True), codec_options=STORED_CODEC)
        known: dict[str, dict[str, Any] | None] = {doc["_id"]: doc for doc in payload["docs"]}
        known.update(dict.fromkeys(payload["gone"]))
    except (ValueError, TypeError, KeyError, AttributeError, BSONError):
        return None
    return known if ids is not None and set(known) <= set(ids) else None


@contextmanager
def bumped_whatever_happens(
    memory_id: str, memory_types: Iterable[str], touched_ids: Collection[str] | None = None, deletes: bool = False
) -> Iterator[Write]:
    """Run a write to MongoDB, then bump the versions of ``memory_types`` (every type it touches or may touch)
    however it ended, logging ``touched_ids`` (stored ``_id`` s; ``None``: anything may have changed) and the
    ``known`` the write set on the ``Write`` it is given. ``deletes``: a forget (its bump strips the log's content).
    After a successful write a failed bump raises ``TransientError`` (the task retries); after a failed write, a
    failed bump is logged and noted on the write's error, which goes up."""
    names = list(memory_types)
    write = Write(read_before=read_versions(memory_id, names) if touched_ids is not None else None, deletes=deletes)
    try:
        yield write
    except BaseException as exc:
        try:
            bump_versions(memory_id, names, touched_ids, Write(deletes=deletes))
        except TransientError as bump_error:
            log.error("a write failed and so did its version bump: %s", bump_error)
            exc.add_note(f"and its version bump failed: {bump_error}")
        raise
    bump_versions(memory_id, names, touched_ids, write)
