"""Tenant-affinity shards of the search pool: with ``MEMQ_SEARCH_SHARDS=N`` > 1 every search of a ``memory_id`` goes
to queue ``search.<s>``, ``s`` its jump consistent hash (Lamping & Veach, 2014; never Python's salted ``hash()``:
every process must agree), so going to N + 1 shards moves about 1/(N + 1) of the tenants. With N = 1 searches use
the shared ``search`` queue; merge always does. README, "Scaling the search pool: tenant-affinity shards".
"""

from __future__ import annotations

import hashlib

from memq.core import names

MAX_SHARDS = 1024
_JUMP_MULTIPLIER = 2862933555777941757
_UINT64 = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in ``range(buckets)`` of a 64-bit ``key``: consistent, with no table (Lamping & Veach)."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * _JUMP_MULTIPLIER + 1) & _UINT64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(memory_id: str, shards: int) -> int:
    """The tenant's shard: the jump hash of a stable 64-bit key, the first 8 bytes of its SHA-256."""
    return jump_hash(int.from_bytes(hashlib.sha256(memory_id.encode("utf-8")).digest()[:8], "big"), shards)


def shard_queue(shard: int) -> str:
    return f"{names.SEARCH_QUEUE}.{shard}"


def search_queue_for(memory_id: str, shards: int) -> str:
    """Where the searches of ``memory_id`` go: ``search`` without shards, else its shard's queue."""
    if shards <= 1:
        return names.SEARCH_QUEUE
    return shard_queue(shard_of(memory_id, shards))


def search_queues(shards: int) -> list[str]:
    """Every queue searches may be routed to with ``shards`` shards."""
    return [names.SEARCH_QUEUE] if shards <= 1 else [shard_queue(s) for s in range(shards)]


def parse_shards(spec: str, shards: int | None = None) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``; distinct, non-negative, below ``shards`` when it is given."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    try:
        chosen = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--shards expects comma-separated shard numbers, e.g. 0,2; got {spec!r}") from None
    if not chosen or len(set(chosen)) != len(chosen) or any(s < 0 or s >= MAX_SHARDS for s in chosen):
        raise ValueError(f"--shards expects distinct shard numbers in 0..{MAX_SHARDS - 1}, got {spec!r}")
    if shards == 1:
        raise ValueError(
            f"--shards {spec}: MEMQ_SEARCH_SHARDS is 1 (no shards), so searches use the shared search queue; "
            "set MEMQ_SEARCH_SHARDS to the fleet's shard count"
        )
    if shards is not None and any(s >= shards for s in chosen):
        raise ValueError(f"--shards {spec}: MEMQ_SEARCH_SHARDS is {shards}, so shards are 0..{shards - 1}")
    return chosen
