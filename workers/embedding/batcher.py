"""Dynamic batching: one thread coalesces concurrent encode requests into large forward passes.

Each pass takes everything queued, up to ``max_batch_texts`` texts and ``max_batch_chars`` characters; there is no
timer (docs/architecture.md, "The embed worker"). Generic over ``encode(list[str]) -> np.ndarray``; build it in the
process that uses it (after fork): its thread does not survive a fork.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from memq.workers.plumbing.metrics import EMBED_BATCH_SIZE, EMBED_SECONDS

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]


class BatcherClosed(RuntimeError):
    """The batcher no longer accepts work (``close`` was called, or its thread stopped)."""


@dataclass
class BatcherStats:
    batches: int = 0
    texts: int = 0
    failed_batches: int = 0
    largest_batch_texts: int = 0


@dataclass
class _Request:
    texts: list[str]
    chars: int
    future: Future[np.ndarray]


class DynamicBatcher:
    def __init__(
        self,
        encode: EncodeFn,
        dimensions: int,
        *,
        max_batch_texts: int = 128,
        max_batch_chars: int = 32_768,
        device: str = "cpu",
        name: str = "memq-embed-batcher",
    ) -> None:
        if max_batch_texts < 1 or max_batch_chars < 1:
            raise ValueError("max_batch_texts and max_batch_chars must be >= 1")
        self._encode = encode
        self.dimensions = dimensions
        self.max_batch_texts = max_batch_texts
        self.max_batch_chars = max_batch_chars
        self.device = device
        self.stats = BatcherStats()
        self._queue: deque[_Request] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, texts: Sequence[str]) -> Future[np.ndarray]:
        """Queue ``texts``; the future resolves to their rows (float32, input order) or the batch's error."""
        future: Future[np.ndarray] = Future()
        batch = list(texts)
        if not batch:
            future.set_result(np.zeros((0, self.dimensions), dtype=np.float32))
            return future
        request = _Request(batch, sum(len(text) for text in batch), future)
        with self._ready:
            if self._closing:
                raise BatcherClosed("the embedding batcher is closed")
            self._queue.append(request)
            self._ready.notify()
        return future

    def encode(self, texts: Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        """Submit and wait. On timeout the request is withdrawn if it has not started, then TimeoutError."""
        future = self.submit(texts)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def is_closed(self) -> bool:
        """True once ``close`` was called (queued work may still be finishing)."""
        with self._ready:
            return self._closing

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new work, finish everything already queued, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._process(batch)
        finally:
            self._fail_leftovers()

    def _next_batch(self) -> list[_Request] | None:
        """Block until work or close; None once closed and drained."""
        with self._ready:
            while not self._queue and not self._closing:
                self._ready.wait()
            return self._drain_locked() if self._queue else None

    def _drain_locked(self) -> list[_Request]:
        taken: list[_Request] = []
        texts = chars = 0
        while self._queue:
            head = self._queue[0]
            over_budget = texts + len(head.texts) > self.max_batch_texts or chars + head.chars > self.max_batch_chars
            if taken and over_budget:
                break  # an oversized request still runs, alone
            self._queue.popleft()
            if not head.future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited
            taken.append(head)
            texts += len(head.texts)
            chars += head.chars
        return taken

    def _process(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        started = time.perf_counter()
        try:
            rows = np.asarray(self._encode(texts), dtype=np.float32)
            if rows.shape[0] != len(texts):
                raise RuntimeError(f"encode returned {rows.shape[0]} rows for {len(texts)} texts")
        except Exception as exc:
            self.stats.failed_batches += 1
            log.warning("embedding batch of %d texts failed: %s", len(texts), exc)
            for request in batch:
                request.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.largest_batch_texts = max(self.stats.largest_batch_texts, len(texts))
        EMBED_SECONDS.labels(device=self.device).observe(time.perf_counter() - started)
        EMBED_BATCH_SIZE.labels(device=self.device).observe(len(texts))
        bounds = np.cumsum([len(request.texts) for request in batch])[:-1]
        for request, rows_of_request in zip(batch, np.split(rows, bounds), strict=True):
            request.future.set_result(rows_of_request.copy())

    def _fail_leftovers(self) -> None:
        """If the thread ever stops, nobody waits forever: refuse new work and fail what is queued."""
        with self._ready:
            self._closing = True
            leftovers = list(self._queue)
            self._queue.clear()
        for request in leftovers:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(BatcherClosed("the embedding batcher stopped"))
