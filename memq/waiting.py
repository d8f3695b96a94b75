"""Waiting for many task results at once in one client process, with one reader of the result store.

Celery's default way to wait (``AsyncResult.get``) has every waiting thread drain a pub/sub connection of
its own and, for a chain, read each parent task's state with a Redis GET on every wake-up: milliseconds of
client CPU per retrieval, growing with the number of threads a web app waits on.

``ResultWaiter`` owns a private result backend (its own pub/sub connection, which nothing else reads) and
one daemon thread per process that drains it. A caller registers the id of the result it wants (a
SUBSCRIBE) and sleeps on its own event, which the drain thread sets when that result, and only it, arrives.
It also subscribes to the chain's earlier steps: Celery stores a failed step's error on that step and on the
chord header after it, not on the last step (the embed steps store their errors although their results are not
stored), so a failure ends the wait at once without polling the parents. ``AsyncResult.get`` elsewhere in the
process keeps working as before: it never touches this backend.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery, states
from celery.backends.base import Backend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from memq.process_local import ProcessLocal

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 1.0  # the drain thread's longest sleep on the socket
RETRY_AFTER_S = 0.5  # pause after a failed drain (the result store is down)


class ResultWaiter:
    def __init__(self, app: Celery) -> None:
        self._app = app
        self._lock = threading.Lock()  # SUBSCRIBE/UNSUBSCRIBE go out one at a time on the private connection
        # This process's private backend (built again after a fork) and its drain thread (started lazily).
        self._backend: ProcessLocal[Backend] = ProcessLocal(app._get_backend)  # a new instance, not the app's
        self._drain_thread: ProcessLocal[threading.Thread] = ProcessLocal(self._start_draining)

    def wait(self, sent: AsyncResult, timeout_s: float) -> Any:
        """The task's return value; raises its exception, or that of an earlier step of its chain that failed,
        or ``celery.exceptions.TimeoutError`` after ``timeout_s`` (the subscriptions are then dropped)."""
        ended = threading.Event()
        failed: list[AsyncResult] = []

        def on_earlier_step(step: AsyncResult) -> None:
            if step.state in states.PROPAGATE_STATES:  # a failed step is marked on its chain's header, not here
                failed.append(step)
                ended.set()

        with self._lock:
            backend = self._backend.get()
            last = AsyncResult(sent.id, backend=backend, app=self._app)
            earlier = [AsyncResult(step.id, backend=backend, app=self._app) for step in _earlier_steps(sent)]
            last.then(lambda _: ended.set())
            for step in earlier:
                step.then(on_earlier_step)
            # After the first SUBSCRIBE: the consumer has its pub/sub connection, so the drain thread blocks on
            # it instead of sleeping a whole drain timeout on a consumer that has none yet.
            self._drain_thread.get()
        try:
            self._read_once(backend, [last, *earlier])
            if not ended.wait(timeout_s):
                raise CeleryTimeoutError(f"the result did not arrive within {timeout_s:g} s")
            if failed:
                failed[0].maybe_throw()
            return last.get(timeout=timeout_s, propagate=True, follow_parents=False)  # cached by now: no wait
        finally:
            with self._lock:
                for result in (last, *earlier):
                    backend.remove_pending_result(result)  # no-op for those already fulfilled

    @staticmethod
    def _read_once(backend: Backend, results: list[AsyncResult]) -> None:
        """Results stored before the SUBSCRIBE went out were published to no one: one MGET finds them, and
        they go through the same callbacks as a published one."""
        stored = backend.client.mget([backend.get_key_for_task(result.id) for result in results])
        for raw in stored:
            if raw is not None:
                meta = backend.decode_result(raw)
                if meta["status"] in states.READY_STATES:
                    backend.result_consumer.on_state_change(meta, None)

    def _start_draining(self) -> threading.Thread:
        thread = threading.Thread(
            target=self._drain_forever, args=(self._backend.get(),), name="memq-result-drain", daemon=True
        )
        thread.start()
        return thread

    @staticmethod
    def _drain_forever(backend: Backend) -> None:
        while True:
            try:
                backend.result_consumer.drain_events(timeout=DRAIN_TIMEOUT_S)
            except Exception as exc:  # the store is down or reconnecting: callers time out, never hang
                log.warning("result store unavailable while waiting for results: %s", exc)
                time.sleep(RETRY_AFTER_S)


def _earlier_steps(result: Any) -> list[Any]:
    """The results of the steps before ``result`` in its chain (a chord's header counts as one step)."""
    steps = []
    parent = result.parent
    while parent is not None and getattr(parent, "id", None):
        steps.append(parent)
        parent = parent.parent
    return steps
