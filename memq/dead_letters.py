"""Dead letters: the messages the workers quarantined (``memq.workers.guard``) in ``memq:v1:dead``, newest first;
``memq dead-letters`` lists (and purges) them, ``memq status`` counts them."""

from __future__ import annotations

import json
from typing import Any

import redis

from memq import keys
from memq.cache_redis import cache_redis


def dead_letters(limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` messages the workers quarantined (``memq.workers.guard``)."""
    return [json.loads(raw) for raw in cache_redis.get().lrange(keys.DEAD_LETTERS, 0, max(0, limit - 1))]


def dead_letter_count() -> int | None:
    try:
        return int(cache_redis.get().llen(keys.DEAD_LETTERS))
    except (redis.RedisError, OSError):
        return None


def purge_dead_letters() -> int:
    pipe = cache_redis.get().pipeline(transaction=True)
    pipe.llen(keys.DEAD_LETTERS)
    pipe.delete(keys.DEAD_LETTERS)
    return int(pipe.execute()[0])
