"""The API a web app calls. Import-light: no torch, no pymongo, no worker code.

    from memq.client import retrieve, aretrieve, remember, forget

Every call checks its input before anything is sent (``InvalidInput`` names the field), and waits at
most ``timeout_s`` (``RetrievalTimeout``). ``aretrieve``/``aremember`` never block the event loop.

``retrieve`` asks the result cache first (``memq.result_cache``): a hit returns with no task sent
(``cached: true``); identical concurrent misses share one chord (single-flight); Redis errors there
degrade to an uncached retrieval.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from memq import names, result_cache
from memq.app import app
from memq.canvas import remember_canvas, retrieval_canvas
from memq.errors import MemqError, RetrievalTimeout, TaskFailed, TransientError
from memq.requests import forget_request, remember_request, retrieval_request
from memq.settings import Settings, get_settings
from memq.validation import is_finite_number
from memq.waiting import ResultWaiter
from memq.wire import RetrievalRequest, with_cache

log = logging.getLogger(__name__)
T = TypeVar("T")
ASYNC_THREADS = 64
ASYNC_MARGIN_S = 0.25  # how far past its timeout_s an aretrieve may end (the thread's own wait ends at timeout_s)
INGEST_TIMEOUT_S = 300.0
CONNECTION_ERRORS = (OperationalError, RedisError, OSError)
RESULT_STORE_OUTAGE = "result backend unavailable: Celery could not reconnect to the result store"

_executor: ThreadPoolExecutor | None = None
_waiter = ResultWaiter(app)


def retrieve(
    query: str,
    memory_id: str,
    limits: dict[str, int],
    weights: dict[str, float] | None = None,
    timeout_s: float | None = None,
    strategy: str | None = None,
    mode: str | None = None,
    filters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Relevant memories of each requested type, ranked; see the README for the result's shape.

    ``mode``: ``hybrid`` (default: BM25 and cosine fused), ``vector`` or ``lexical``. ``filters``: ``tags`` (with
    ``tags_match`` ``any`` (default) or ``all``), ``created_after``, ``created_before``, ``role``; applied in
    the search, before its top k."""
    settings = get_settings()
    request = retrieval_request(settings, query, memory_id, limits, weights, timeout_s, strategy, mode, filters)
    found = result_cache.lookup(settings, request)
    if found.outcome == "wait":
        found = result_cache.wait(settings, request, found)
    log.debug("retrieval %s: cache %s in %.3f ms", memory_id, found.outcome, found.cache_ms)
    if found.result is not None:
        return found.result
    if found.outcome == "timeout":
        raise RetrievalTimeout(f"retrieval did not finish within {request['timeout_s']:g} s (an identical one ran)")
    return _run_chord(settings, request, found)


def _run_chord(settings: Settings, request: RetrievalRequest, found: result_cache.Lookup) -> dict[str, Any]:
    """The chord, asking ``memq.merge`` to cache its result when the cache answered (the key the look-up built
    and the data versions it names travel with the request); ``timings_ms`` gets the cache's share."""
    if found.cache_key is not None and found.versions is not None:
        request = with_cache(request, found.cache_key, found.versions, settings.result_cache_ttl_s)
    try:
        result = _send(lambda: retrieval_canvas(request).apply_async())
        timeout_s = request["deadline_ts"] - time.time()  # what sending and the cache look-up left of it
        if timeout_s <= 0:
            raise RetrievalTimeout(f"retrieval did not finish within {request['timeout_s']:g} s (sending took it all)")
        payload = _wait(result, timeout_s, what="retrieval")
    finally:
        result_cache.release(settings, found)
    timings = payload.setdefault("timings_ms", {})
    timings["cache_ms"] = found.cache_ms
    if found.wait_ms:
        timings["wait_ms"] = found.wait_ms
    return payload


def remember(
    memory_id: str, memory_type: str, items: list[dict[str, Any] | str], timeout_s: float = INGEST_TIMEOUT_S
) -> dict[str, Any]:
    """Embed and store memories in bulk (idempotent); returns their ids and insert/update counts."""
    request = remember_request(get_settings(), memory_id, memory_type, items)
    result = _send(lambda: remember_canvas(request).apply_async())
    return _wait(result, timeout_s, what="remember")


def forget(
    memory_id: str, memory_type: str | None = None, ids: list[str] | None = None, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Delete this tenant's memories (of one type, or all; all of them, or these ids)."""
    request = forget_request(memory_id, memory_type, ids)
    result = _send(
        lambda: app.send_task(
            names.FORGET, args=(request["memory_id"], request["memory_type"], request["ids"]), queue=names.INGEST_QUEUE
        )
    )
    return _wait(result, timeout_s, what="forget")


def create_indexes(dimensions: int | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Create memq's indexes (idempotent); ``dimensions``: the vector index's, by default the model's."""
    result = _send(lambda: app.send_task(names.CREATE_INDEXES, args=(dimensions,), queue=names.INGEST_QUEUE))
    return _wait(result, timeout_s, what="create_indexes")


async def aretrieve(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``retrieve`` for asyncio (same arguments): the wait runs on a dedicated thread pool, never on the event loop.
    The deadline starts now, not when a pool thread is free: a call that waited for a thread gets only what is left,
    and the caller gets ``RetrievalTimeout`` by ``timeout_s`` + ``ASYNC_MARGIN_S`` whatever the pool is doing."""
    call = inspect.signature(retrieve).bind(*args, **kwargs)  # a wrong argument raises TypeError here, as in retrieve
    timeout_s = call.arguments.get("timeout_s")
    budget_s = get_settings().retrieve_timeout_s if timeout_s is None else timeout_s
    if not (is_finite_number(budget_s) and budget_s > 0):  # retrieve names the bad timeout_s
        return await _in_thread(functools.partial(retrieve, *call.args, **call.kwargs))
    deadline = time.monotonic() + budget_s

    def run() -> dict[str, Any]:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise RetrievalTimeout(f"retrieval did not start within {budget_s:g} s (every client thread was busy)")
        call.arguments["timeout_s"] = left_s
        return retrieve(*call.args, **call.kwargs)

    try:
        return await asyncio.wait_for(_in_thread(run), timeout=budget_s + ASYNC_MARGIN_S)
    except TimeoutError:
        raise RetrievalTimeout(f"retrieval did not finish within {budget_s:g} s") from None


async def aremember(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return await _in_thread(functools.partial(remember, *args, **kwargs))


async def aforget(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return await _in_thread(functools.partial(forget, *args, **kwargs))


async def _in_thread(call: Callable[[], T]) -> T:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=ASYNC_THREADS, thread_name_prefix="memq-client")
    return await asyncio.get_running_loop().run_in_executor(_executor, call)


def _send(send: Callable[[], AsyncResult]) -> AsyncResult:
    try:
        return send()
    except (OperationalError, RedisError, OSError) as exc:
        raise TransientError(f"broker unavailable: {exc}") from exc
    except RuntimeError as exc:
        if is_result_store_outage(exc):
            raise TransientError(RESULT_STORE_OUTAGE) from exc
        raise


def _wait(result: AsyncResult, timeout_s: float, what: str) -> dict[str, Any]:
    try:
        payload = _waiter.wait(result, timeout_s)
    except CeleryTimeoutError:
        raise RetrievalTimeout(f"{what} did not finish within {timeout_s:g} s") from None
    except (OperationalError, RedisError, OSError) as exc:
        raise TransientError(f"result backend unavailable: {exc}") from exc
    except MemqError:
        raise  # InvalidInput from a worker arrives rebuilt as itself, its field intact
    except Exception as exc:
        if is_result_store_outage(exc):
            raise TransientError(RESULT_STORE_OUTAGE) from exc
        raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc
    else:
        with contextlib.suppress(RedisError, OSError):
            result.forget()  # the caller has it; don't leave it in Redis until result_expires
        return payload


def is_result_store_outage(exc: BaseException) -> bool:
    """Celery's result consumer gives up reconnecting with a bare ``RuntimeError`` raised from the connection
    error (``celery.backends.asynchronous``); the next call in the same process reconnects, so to the caller
    this is a transient outage, not a crash. Recognised by its cause, never by its text."""
    return isinstance(exc, RuntimeError) and isinstance(exc.__cause__, CONNECTION_ERRORS)
