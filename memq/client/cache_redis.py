"""The process's Redis client for caches and tenant data versions (not the broker's connection), with one
timeout policy (``CACHE_SOCKET_TIMEOUT_S``: a slow cache costs a caller at most that a reply) and one circuit breaker
(``breaker``: after an error the caches leave Redis alone for ``RETRY_AFTER_S``) for everything that treats Redis as
optional. Tenant data versions do not use the breaker: a failed version bump is retried (``TransientError``).
"""

from __future__ import annotations

import logging
import time

import redis

from memq.core.deadlines import CACHE_SOCKET_TIMEOUT_S
from memq.core.process_local import ProcessLocal
from memq.core.settings import get_settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
HEALTH_CHECK_INTERVAL_S = 30


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=CACHE_SOCKET_TIMEOUT_S,
        socket_connect_timeout=CACHE_SOCKET_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


cache_redis: ProcessLocal[redis.Redis] = ProcessLocal(
    lambda: connect(get_settings().cache_redis_url), close=lambda client: client.close()
)


class Breaker:
    """Open (skip the cache) for ``retry_after_s`` after each failure; closed again by itself."""

    def __init__(self, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        self._open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def trip(self, exc: BaseException) -> None:
        self._open_until = time.monotonic() + self.retry_after_s
        log.warning("cache Redis unavailable (%s); caching off for the next %g s", exc, self.retry_after_s)

    def reset(self) -> None:
        self._open_until = 0.0


breaker = Breaker()  # one per process, for the one cache Redis
