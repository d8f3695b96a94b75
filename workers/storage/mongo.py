"""MongoDB: one pooled ``MongoClient`` per worker process, built after fork; its collections, its transient errors
and the time limit of an operation (writes, reads and indexes live beside it).
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import pymongo
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure, ExecutionTimeout

from memq.core.memory_types import MemoryType
from memq.core.process_local import ProcessLocal
from memq.core.settings import get_settings
from memq.errors import StoreUnavailable

EMBEDDING_FIELD = "embedding"
CONTEXT_FIELD = "context"  # text the writer supplied beside the content: searched lexically, never embedded
ITEM_FIELDS_OUT = ("role", "tags", "metadata")  # optional item fields stored and returned as they are


#: The client options memq sets where ``MEMQ_MONGODB_URI`` does not (its own options win): a pool above the search
#: worker's 8 threads, and timeouts that fail a lost server within a retrieval's default 10 s.
URI_OPTION_DEFAULTS: dict[str, int] = {
    "maxPoolSize": 16,
    "serverSelectionTimeoutMS": 3000,
    "connectTimeoutMS": 3000,
    "socketTimeoutMS": 6000,  # also the most one search attempt may take (memq.tasks.retrieval)
}


def client_options(uri: str) -> dict[str, int]:
    """``URI_OPTION_DEFAULTS`` less the options ``uri`` names itself (option names are case-insensitive)."""
    given = {name.lower() for name in urllib.parse.parse_qs(uri.partition("?")[2], keep_blank_values=True)}
    return {name: value for name, value in URI_OPTION_DEFAULTS.items() if name.lower() not in given}


def socket_timeout_s(uri: str) -> float:
    """The socket timeout the client of ``uri`` gets, in seconds: ``socketTimeoutMS`` from it (0: none), else
    memq's."""
    for name, values in urllib.parse.parse_qs(uri.partition("?")[2]).items():
        if name.lower() == "sockettimeoutms" and values[-1].isdigit():
            return int(values[-1]) / 1000 or math.inf
    return URI_OPTION_DEFAULTS["socketTimeoutMS"] / 1000


def _connect() -> pymongo.MongoClient:
    uri = get_settings().mongodb_uri
    return pymongo.MongoClient(
        uri, tz_aware=True, appname="memq", event_listeners=_pool_listeners(), **client_options(uri)
    )


def _pool_listeners() -> list[Any]:
    from memq.workers.storage.mongo_metrics import MongoPoolMetrics

    return [MongoPoolMetrics()]


mongo_client: ProcessLocal[pymongo.MongoClient] = ProcessLocal(_connect, close=lambda client: client.close())


@contextmanager
def transient_errors() -> Iterator[None]:
    """Connection-level MongoDB failures become ``StoreUnavailable`` (retryable)."""
    try:
        yield
    except (ConnectionFailure, ExecutionTimeout) as exc:
        raise StoreUnavailable(f"MongoDB unavailable: {exc}") from exc


_deadline_ts: ContextVar[float | None] = ContextVar("memq_mongo_deadline_ts", default=None)


@contextmanager
def time_limit(budget_s: float | None) -> Iterator[None]:
    """Every MongoDB operation inside takes at most ``budget_s`` in all (pymongo's client-side operation
    timeout: server selection, pool wait and socket reads together); ``None`` keeps the client's timeouts.
    ``deadline_ts`` tells code inside when it ends."""
    if budget_s is None:
        yield
        return
    token = _deadline_ts.set(time.time() + budget_s)
    try:
        with pymongo.timeout(budget_s):
            yield
    finally:
        _deadline_ts.reset(token)


def deadline_ts() -> float | None:
    """When the innermost ``time_limit`` around this call ends (Unix seconds; ``None``: none is set): what is left
    of it is ``memq.core.deadlines.budget_s`` of it."""
    return _deadline_ts.get()


def collection(memory_type: str) -> Collection:
    return mongo_client.get()[get_settings().mongodb_db][MemoryType(memory_type).value]


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)
