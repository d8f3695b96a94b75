"""The process's Redis client for caches and tenant data versions (not the broker's connection)."""

from __future__ import annotations

import redis

from config import get_settings
from workers.process_local import ProcessLocal


def _connect() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().cache_redis_url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=30,
    )


cache_redis: ProcessLocal[redis.Redis] = ProcessLocal(_connect, close=lambda client: client.close())
