"""The API a web app calls. Import-light: no torch, no pymongo, no worker code. Every call checks its input before
anything is sent (``InvalidInput`` names the field) and waits at most ``timeout_s`` (``RetrievalTimeout``);
``aretrieve``/``aremember`` never block the event loop; ``retrieve`` asks the result cache first
(``memq.client.result_cache``: a hit sends no task; identical concurrent misses share one chord).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celery.canvas import Signature
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from memq.client import bulk_items, result_cache
from memq.client.app import app
from memq.client.bulk_items import IngestProgress
from memq.client.canvas import forget_signature, indexes_canvas, remember_canvas, retrieval_canvas
from memq.client.celery_internals import is_result_store_outage
from memq.client.edge import forget_request, remember_request, retrieval_request
from memq.client.waiting import ResultWaiter
from memq.core import deadlines, field_rules
from memq.core.settings import Settings, get_settings
from memq.core.wire import RememberRequest, RetrievalRequest, with_cache
from memq.errors import IngestStopped, InvalidInput, MemqError, RetrievalTimeout, TaskFailed, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")
ASYNC_THREADS = 64
MAX_IN_FLIGHT = 4  # remember_many: batches sent and not yet stored
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
    """Relevant memories of each requested type, ranked (README, "Usage": the arguments and the result's shape);
    ``filters`` apply in the search, before its top k."""
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
        result = _send(retrieval_canvas(request))
        timeout_s = deadlines.budget_s(request["deadline_ts"]) or 0.0  # what sending and the cache look-up left
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
    memory_id: str, memory_type: str, items: list[dict[str, Any] | str], timeout_s: float = deadlines.INGEST_TIMEOUT_S
) -> dict[str, Any]:
    """Embed and store memories in bulk (idempotent); returns their ids and insert/update counts."""
    request = remember_request(get_settings(), memory_id, memory_type, items, timeout_s)
    return _wait(_send(remember_canvas(request)), timeout_s, what="remember")


def forget(
    memory_id: str,
    memory_type: str | None = None,
    ids: list[str] | None = None,
    timeout_s: float = deadlines.FORGET_TIMEOUT_S,
) -> dict[str, Any]:
    """Delete this tenant's memories (of one type, or all; all of them, or these ids)."""
    request = forget_request(memory_id, memory_type, ids, timeout_s)
    return _wait(_send(forget_signature(request)), timeout_s, what="forget")


def create_indexes(dimensions: int | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Create memq's indexes (idempotent); ``dimensions``: the vector index's, by default the model's (an embed
    worker embeds one probe text first)."""
    return _wait(_send(indexes_canvas(dimensions)), timeout_s, what="create_indexes")


async def aretrieve(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``retrieve`` for asyncio (same arguments), waiting on a dedicated thread pool. The deadline starts now, not
    when a pool thread is free: ``RetrievalTimeout`` by ``timeout_s`` + ``ASYNC_MARGIN_S`` whatever the pool does."""
    call = inspect.signature(retrieve).bind(*args, **kwargs)  # a wrong argument raises TypeError here, as in retrieve
    budget_s = field_rules.check_timeout(call.arguments.get("timeout_s"), get_settings().retrieve_timeout_s)
    deadline_ts = time.time() + budget_s

    def run() -> dict[str, Any]:
        left_s = deadlines.budget_s(deadline_ts) or 0.0
        if left_s <= 0:
            raise RetrievalTimeout(f"retrieval did not start within {budget_s:g} s (every client thread was busy)")
        call.arguments["timeout_s"] = left_s
        return retrieve(*call.args, **call.kwargs)

    try:
        return await asyncio.wait_for(_in_thread(run), timeout=budget_s + deadlines.ASYNC_MARGIN_S)
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


def _send(canvas: Signature) -> AsyncResult:
    try:
        return canvas.apply_async()
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
    except TaskRevokedError as exc:
        if str(exc) != "expired":
            raise TaskFailed(f"{what} was revoked: {exc}") from exc
        raise RetrievalTimeout(f"{what} not run: a step reached its worker after the call's deadline") from None
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
        if not isinstance(payload, dict):
            raise TaskFailed(f"{what} returned {type(payload).__name__}, not an object")
        return payload


# Bulk import: any number of memories, in batches of at most field_rules.MAX_BATCH_ITEMS, a bounded number in flight.


@dataclasses.dataclass
class _Batch:
    positions: list[int] = dataclasses.field(default_factory=list)  # its items' input positions, in order
    items: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # checked; dropped once sent
    result: AsyncResult | None = None


def remember_many(
    memory_id: str,
    memory_type: str,
    items: Iterable[dict[str, Any] | str],
    batch_items: int | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    on_progress: Callable[[IngestProgress], None] | None = None,
    skip: int = 0,
    timeout_s: float = deadlines.INGEST_TIMEOUT_S,
) -> dict[str, Any]:
    """Store any number of memories from ``items``, read lazily: one ``remember`` chain per batch of ``batch_items``
    (default and most ``MAX_BATCH_ITEMS``), each checked before it is sent, at most ``max_in_flight`` not yet stored.
    Any failure raises ``IngestStopped`` (``InvalidItem`` for a bad item): ``skip=stored_through`` resumes.
    ``on_progress`` gets an ``IngestProgress`` per stored batch; returns its ``summary()`` (README, "Usage")."""
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise InvalidInput("skip", f"must be an integer >= 0, got {field_rules.shown(skip)}")
    if isinstance(items, dict | str | bytes) or not isinstance(items, Iterable):
        raise InvalidInput("items", "must be an iterable of memories (a list, a generator)")
    numbered = itertools.islice(enumerate(items, start=1), skip, None)
    return remember_numbered(
        memory_id,
        memory_type,
        numbered,
        stored_through=skip,
        batch_items=batch_items,
        max_in_flight=max_in_flight,
        on_progress=on_progress,
        timeout_s=timeout_s,
    )


def remember_numbered(
    memory_id: str,
    memory_type: str,
    numbered: Iterable[tuple[int, Any]],
    *,
    stored_through: int = 0,
    unit: str = "item",
    batch_items: int | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    on_progress: Callable[[IngestProgress], None] | None = None,
    timeout_s: float = deadlines.INGEST_TIMEOUT_S,
) -> dict[str, Any]:
    """``remember_many`` over ``(position, item)`` pairs, positions increasing (``memq remember --file`` passes line
    numbers, blank lines left out); ``stored_through``: the position already stored before the first pair. A bad
    item is ``InvalidItem("items[<position - 1>]...", "<unit> <position>: ...")``."""
    most_items = field_rules.MAX_BATCH_ITEMS
    run = _BulkImport(
        progress=bulk_items.progress_before(memory_id, memory_type, stored_through),
        batch_items=field_rules.check_count(batch_items or most_items, "batch_items", most_items),
        max_in_flight=field_rules.check_count(max_in_flight, "max_in_flight", 1024),
        unit=unit,
        on_progress=on_progress,
        timeout_s=field_rules.check_timeout(timeout_s),
    )
    return run.over(numbered)


@dataclasses.dataclass
class _BulkImport:
    """One ``remember_many`` call: reads, checks and sends batches, and settles them in order."""

    progress: IngestProgress
    batch_items: int
    max_in_flight: int
    unit: str
    on_progress: Callable[[IngestProgress], None] | None
    timeout_s: float
    pending: deque[_Batch] = dataclasses.field(default_factory=deque)

    def over(self, numbered: Iterable[tuple[int, Any]]) -> dict[str, Any]:
        batches = self._checked_batches(numbered)
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # a bad item, or the input itself failed (e.g. a file that cannot be read)
                self._settle_all()  # the batches before it count: they move stored_through on
                raise self._stopped(exc) from exc
            if batch is None:
                break
            if len(self.pending) >= self.max_in_flight:
                self._settle(self.pending.popleft())
            self.pending.append(self._send(batch))
        self._settle_all()
        return self.progress.summary()

    def _checked_batches(self, numbered: Iterable[tuple[int, Any]]) -> Iterator[_Batch]:
        """Batches of checked items: each is read and checked whole before it is sent."""
        batch = _Batch()
        for position, item in numbered:
            batch.items.append(bulk_items.checked_item(position, item, self.unit))
            batch.positions.append(position)
            if len(batch.items) == self.batch_items:
                yield batch
                batch = _Batch()
        if batch.items:
            yield batch

    def _send(self, batch: _Batch) -> _Batch:
        # The items are checked (field_rules.check_items, one by one): this is remember_request's output, with the
        # batch's own deadline, timeout_s from its sending (a long import is many calls of timeout_s each).
        request: RememberRequest = {
            "memory_id": self.progress.memory_id,
            "memory_type": self.progress.type,
            "items": batch.items,
            "deadline_ts": time.time() + self.timeout_s,
        }
        try:
            batch.result = _send(remember_canvas(request))
        except MemqError as exc:
            raise self._stopped(exc) from exc
        batch.items = []
        return batch

    def _settle_all(self) -> None:
        while self.pending:
            self._settle(self.pending.popleft())

    def _settle(self, batch: _Batch) -> None:
        """Waits for the oldest batch; on success moves ``stored_through`` to its last item."""
        assert batch.result is not None
        try:
            result = _wait(batch.result, self.timeout_s, what="remember")
        except MemqError as exc:
            raise self._stopped(exc) from exc
        failed = result.get("failed") or []
        stored = batch.positions[: _first_failed(failed, len(batch.positions))]
        progress = self.progress
        progress.items += len(stored)
        progress.inserted += int(result.get("inserted", 0))
        progress.updated += int(result.get("updated", 0))
        progress.stored_through = stored[-1] if stored else progress.stored_through
        if failed:
            refused = ", ".join(self._name_failed(entry, batch.positions) for entry in failed[:5])
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise IngestStopped(f"MongoDB refused {refused}{more}", progress.stored_through, progress.summary())
        progress.batches += 1
        if self.on_progress is not None:
            self.on_progress(dataclasses.replace(progress))

    def _name_failed(self, entry: dict[str, Any], positions: list[int]) -> str:
        index = entry.get("index")
        if isinstance(index, int) and 0 <= index < len(positions):
            return f"{self.unit} {positions[index]} ({entry.get('reason')})"
        return f"an item of {self.unit}s {positions[0]}..{positions[-1]} ({entry.get('reason')})"

    def _stopped(self, exc: BaseException) -> IngestStopped:
        progress = self.progress
        if isinstance(exc, IngestStopped):
            return exc
        if isinstance(exc, InvalidInput):
            return bulk_items.invalid_item(exc, progress)
        reason = str(exc) if isinstance(exc, MemqError) else f"{type(exc).__name__}: {exc}"
        return IngestStopped(reason, progress.stored_through, progress.summary())


def _first_failed(failed: list[dict[str, Any]], size: int) -> int:
    """How many items of a batch come before its first refused one (all of them when none was refused; none when
    a refused item's position is unknown)."""
    indexes = [i for entry in failed if isinstance(i := entry.get("index"), int) and 0 <= i < size]
    return min(indexes, default=size) if len(indexes) == len(failed) else 0
