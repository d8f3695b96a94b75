"""MongoDB: one pooled ``MongoClient`` per worker process, built after fork; its collections, its transient errors
and the time limit of an operation. What is written (``memq.workers.writes``), read (``memq.workers.store``) and
indexed (``memq.workers.indexes``) lives beside it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure, ExecutionTimeout

from memq.errors import StoreUnavailable
from memq.memory_types import MemoryType
from memq.process_local import ProcessLocal
from memq.settings import get_settings

EMBEDDING_FIELD = "embedding"
CONTEXT_FIELD = "context"  # text the writer supplied beside the content: searched lexically, never embedded
ITEM_FIELDS_OUT = ("role", "tags", "metadata")  # optional item fields stored and returned as they are


def _connect() -> pymongo.MongoClient:
    settings = get_settings()
    return pymongo.MongoClient(
        settings.mongodb_uri,
        maxPoolSize=settings.mongodb_pool_size,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        connectTimeoutMS=settings.mongodb_timeout_ms,
        socketTimeoutMS=settings.mongodb_timeout_ms * 2,
        tz_aware=True,
        appname="memq",
        event_listeners=_pool_listeners(),
    )


def _pool_listeners() -> list[Any]:
    from memq.workers.mongo_metrics import MongoPoolMetrics

    return [MongoPoolMetrics()]


mongo_client: ProcessLocal[pymongo.MongoClient] = ProcessLocal(_connect, close=lambda client: client.close())


@contextmanager
def transient_errors() -> Iterator[None]:
    """Connection-level MongoDB failures become ``StoreUnavailable`` (retryable)."""
    try:
        yield
    except (ConnectionFailure, ExecutionTimeout) as exc:
        raise StoreUnavailable(f"MongoDB unavailable: {exc}") from exc


_deadline: ContextVar[float | None] = ContextVar("memq_mongo_deadline", default=None)


@contextmanager
def time_limit(budget_s: float | None) -> Iterator[None]:
    """Every MongoDB operation inside takes at most ``budget_s`` in all (pymongo's client-side operation
    timeout: server selection, pool wait and socket reads together); ``None`` keeps the client's timeouts.
    ``budget_left_s`` tells code inside what is left of it."""
    if budget_s is None:
        yield
        return
    token = _deadline.set(time.monotonic() + budget_s)
    try:
        with pymongo.timeout(budget_s):
            yield
    finally:
        _deadline.reset(token)


def budget_left_s() -> float | None:
    """What is left of the innermost ``time_limit`` around this call (``None``: none is set)."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def collection(memory_type: str) -> Collection:
    return mongo_client.get()[get_settings().mongodb_db][MemoryType(memory_type).value]


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
