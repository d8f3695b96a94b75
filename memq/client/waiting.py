"""Waiting for many task results at once in one client process, with one reader of the result store.

``ResultWaiter`` keeps, per process, one Redis pub/sub connection to the result store and one daemon thread (the
drain thread) that alone touches it; a caller hands it its chain's result keys and sleeps on its own event. Results
stored before the SUBSCRIBE took effect are read with one MGET after its confirmation; an earlier step's failure
ends the wait at once; a chord's ``ChordError`` becomes its failed part's own error. Why: README, "How it works".
Public Celery API only: the result backend's ``get_key_for_task``, ``decode_result`` and ``exception_to_python``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import ChordError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from memq.core.deadlines import CLIENT_SOCKET_TIMEOUT_S
from memq.core.process_local import ProcessLocal

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 1.0  # the drain thread's longest sleep on the socket
RETRY_AFTER_S = 0.5  # pause after a failed drain (the result store is down)


@dataclass(eq=False)  # compared and hashed by identity: each caller's wait is its own
class _Wait:
    """One caller's wait: the keys it watches and what has arrived for them."""

    last_key: bytes
    keys: list[bytes]
    ended: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    outcome: dict[str, Any] | None = None  # the meta that ended the wait
    problem: BaseException | None = None  # the result store's error, if the drain thread could not subscribe

    def offer(self, key: bytes, meta: dict[str, Any]) -> None:
        # An earlier step's failure ends the wait too: the last step will never run.
        if meta.get("status") in (states.READY_STATES if key == self.last_key else states.PROPAGATE_STATES):
            self._end(meta)

    def _end(self, meta: dict[str, Any]) -> None:
        if self.outcome is None:
            self.outcome = meta
        self.ended.set()


class _Drain:
    """A process's pub/sub connection and the thread that owns it."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        url = str(app.conf.result_backend)
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=CLIENT_SOCKET_TIMEOUT_S, socket_timeout=CLIENT_SOCKET_TIMEOUT_S
        )
        self.wake_channel = f"memq:waiter:wake:{uuid.uuid4().hex}".encode()
        self.commands: queue.SimpleQueue[tuple[str, _Wait]] = queue.SimpleQueue()
        self.waits: dict[bytes, set[_Wait]] = {}  # the drain thread's own, as are the next two
        self.pending_confirm: dict[bytes, _Wait] = {}  # the last key of a SUBSCRIBE -> the wait it confirms
        self.thread = threading.Thread(target=self._run, name="memq-result-drain", daemon=True)
        self.thread.start()

    def submit(self, command: str, wait: _Wait, wake: bool = True) -> None:
        self.commands.put((command, wait))
        if wake:
            self.client.publish(self.wake_channel, b"")  # wakes the drain thread out of its socket read

    def _run(self) -> None:
        down = False  # one warning per outage, not one per reconnection attempt
        while True:
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.wake_channel, *self.waits)
                if down:
                    log.warning("result store reachable again")
                    down = False
                if self.waits:
                    self._read_stored(list(self.waits))  # published while the connection was down
                while True:
                    self._apply_commands(pubsub)
                    message = pubsub.get_message(timeout=DRAIN_TIMEOUT_S)
                    if message is not None:
                        self._on_message(pubsub, message)
            except Exception as exc:  # the store is down or reconnecting: callers time out, never hang
                log.log(logging.DEBUG if down else logging.WARNING, "result store unavailable: %s", exc)
                down = True
                self._fail_unconfirmed(exc)
                time.sleep(RETRY_AFTER_S)
            finally:
                with contextlib.suppress(Exception):  # the connection is already gone
                    pubsub.close()

    def _apply_commands(self, pubsub: Any) -> None:
        while True:
            try:
                command, wait = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(pubsub, command, wait)
            except Exception as exc:
                self._fail(wait, exc)
                raise

    def _apply(self, pubsub: Any, command: str, wait: _Wait) -> None:
        if command == "watch":
            new = [key for key in wait.keys if key not in self.waits]
            for key in wait.keys:
                self.waits.setdefault(key, set()).add(wait)
            if new:
                pubsub.subscribe(*new)  # confirmed when its last reply arrives (``_on_message``)
                self.pending_confirm[new[-1]] = wait
            else:
                wait.subscribed.set()
            return
        gone = []
        for key in wait.keys:
            watchers = self.waits.get(key)
            if watchers is not None:
                watchers.discard(wait)
                if not watchers:
                    del self.waits[key]
                    gone.append(key)
        if gone:
            pubsub.unsubscribe(*gone)

    def _on_message(self, pubsub: Any, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if message.get("type") == "subscribe":
            wait = self.pending_confirm.pop(channel, None)
            if wait is not None:
                wait.subscribed.set()
            return
        if message.get("type") != "message" or channel == self.wake_channel:
            return
        self._deliver(channel, message.get("data"))

    def _deliver(self, key: bytes, raw: Any) -> None:
        watchers = self.waits.get(key)
        if not watchers or raw is None:
            return
        try:
            meta = self.app.backend.decode_result(raw)
        except Exception as exc:  # a foreign publisher on a result channel: not a result
            log.warning("ignored an undecodable message on %r: %s", key[:80], exc)
            return
        if not isinstance(meta, dict):
            return
        for wait in list(watchers):
            wait.offer(key, meta)

    def _read_stored(self, keys: list[bytes]) -> None:
        for key, raw in zip(keys, self.client.mget(keys), strict=True):
            self._deliver(key, raw)

    def _fail_unconfirmed(self, exc: BaseException) -> None:
        for wait in self.pending_confirm.values():
            self._fail(wait, exc)
        self.pending_confirm.clear()

    @staticmethod
    def _fail(wait: _Wait, exc: BaseException) -> None:
        wait.problem = exc
        wait.subscribed.set()


class ResultWaiter:
    def __init__(self, app: Celery) -> None:
        self._app = app
        self._drain: ProcessLocal[_Drain] = ProcessLocal(lambda: _Drain(app))  # built again after a fork

    def wait(self, sent: AsyncResult, timeout_s: float) -> Any:
        """The task's return value; raises its exception, or that of an earlier step of its chain that failed,
        or ``celery.exceptions.TimeoutError`` after ``timeout_s`` (the subscriptions are then dropped)."""
        deadline = time.monotonic() + timeout_s
        backend = self._app.backend
        keys = [_key(backend, sent.id), *(_key(backend, step.id) for step in _earlier_steps(sent))]
        wait = _Wait(last_key=keys[0], keys=keys)
        drain = self._drain.get()
        drain.submit("watch", wait)
        try:
            if not wait.subscribed.wait(_left(deadline)):
                raise CeleryTimeoutError(f"the result did not arrive within {timeout_s:g} s")
            if wait.problem is not None:
                raise wait.problem
            _offer_stored(drain.client, wait, backend)
            if not wait.ended.wait(_left(deadline)):
                raise CeleryTimeoutError(f"the result did not arrive within {timeout_s:g} s")
            try:
                return _outcome(backend, wait.outcome or {})
            except ChordError as exc:
                part_error = _failed_part(drain.client, backend, sent)
                if part_error is None:
                    raise
                raise part_error from exc
        finally:
            drain.submit("forget", wait, wake=False)  # done at the drain thread's next wake-up (1 s at most)


def _offer_stored(client: redis.Redis, wait: _Wait, backend: Any) -> None:
    """Results stored before the SUBSCRIBE took effect, read by the caller itself (one MGET)."""
    for key, raw in zip(wait.keys, client.mget(wait.keys), strict=True):
        if raw is not None:
            meta = backend.decode_result(raw)
            if isinstance(meta, dict):
                wait.offer(key, meta)


def _outcome(backend: Any, meta: dict[str, Any]) -> Any:
    if meta.get("status") == states.SUCCESS:
        return meta.get("result")
    raise backend.exception_to_python(meta.get("result"))


def _failed_part(client: redis.Redis, backend: Any, sent: AsyncResult) -> BaseException | None:
    """The error of the first failed part of the chord whose body is ``sent`` (Celery's ``ChordError`` names it only
    in its text), so that the caller gets the part's own error, a ``DeadLettered`` search step's for one."""
    parts = list(getattr(sent.parent, "results", None) or [])
    keys = [_key(backend, part.id) for part in parts]
    for raw in client.mget(keys) if keys else []:
        meta = backend.decode_result(raw) if raw is not None else None
        if isinstance(meta, dict) and meta.get("status") in states.PROPAGATE_STATES:
            error = backend.exception_to_python(meta.get("result"))
            return error if isinstance(error, BaseException) else None
    return None


def _key(backend: Any, task_id: str) -> bytes:
    key = backend.get_key_for_task(task_id)
    return key if isinstance(key, bytes) else str(key).encode()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _earlier_steps(result: Any) -> Iterable[Any]:
    """The results of the steps before ``result`` in its chain (a chord's header counts as one step)."""
    parent = result.parent
    while parent is not None and getattr(parent, "id", None):
        yield parent
        parent = parent.parent
