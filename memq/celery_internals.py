"""The one module of memq that touches private parts of Celery and kombu. Each hook is small, says why it exists,
and has a canary test (tests/test_celery_internals.py) that fails with a message naming the upstream change that
would break or obsolete it. docs/celery.md lists them with their upstream issues.

1. ``GuardedRedisChannel`` (kombu's Redis channel, installed by ``memq worker`` as the broker transport):
   - ``_brpop_read``: an envelope popped from a task queue that cannot be decoded or made a message of (a
     100,000-deep JSON header exhausts the decoder's stack) goes to ``on_undecodable_envelope`` and is dropped,
     instead of stopping the worker. kombu has no hook between the pop and the message.
   - ``_receive_one``: the same for the pub/sub channels a worker listens on (remote control ``*.pidbox``, the
     ``celeryev`` events gossip and mingle read): whatever a published message makes fail after it was read, in
     kombu or in Celery's handler, goes to ``on_poison_broadcast``; only a connection error propagates.
   - ``close``: Celery 5.7 closes a broker connection right after ``collect()``-ing it (consumer
     ``on_connection_error_after_connected``); kombu's channel close then restores unacknowledged messages through
     the collected connection, and the worker exits with ``AttributeError``. Here a channel whose connection was
     collected closes without that restore: the messages stay in kombu's unacked index, and kombu restores them
     after ``visibility_timeout``, as it did on Celery 5.6, which only collects.
   - ``basic_ack`` / ``basic_reject``: a task that started before the connection was lost and ends after the
     reconnect acknowledges on its old, collected channel; kombu then fails the same way and the worker exits.
     Here that acknowledgement is skipped: the message stays unacknowledged and is redelivered after
     ``visibility_timeout`` (memq's tasks are idempotent).
2. ``event_dispatcher_class``: Celery's ``EventDispatcher`` before 5.7 publishes its buffered task events and then
   empties the buffer, dropping an event a pool thread buffers during the publish (celery#10434, fixed in 5.7).
   On Celery < 5.7 the flush here, under the dispatcher's lock, removes exactly what it published. On every
   version, a dispatcher replaced after a reconnect hands its *buffered task events* (not only its parked ones)
   to the new one (``extend_buffer``), which Celery 5.7 still does not do.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import celery
import redis
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Celery from which ``EventDispatcher.flush`` keeps what it did not publish (celery#10434's fix).
LOSSLESS_FLUSH_SINCE = (5, 7)
#: Errors of the connection itself, which kombu must see to reconnect (kombu 5.7 also lists ``KeyError`` among
#: the transport's connection errors, which a handler's bug must not pass for).
IO_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError, EOFError)
DECODE_ERRORS: tuple[type[BaseException], ...] = (RecursionError, json.JSONDecodeError, UnicodeDecodeError)


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel; subclasses override the two public hooks."""

    #: Also raised by the subclass's ``Message`` for an envelope it refuses.
    poison_errors: tuple[type[BaseException], ...] = DECODE_ERRORS

    def on_undecodable_envelope(self, detail: str) -> None:
        log.error("dropped a task-queue envelope that cannot be read: %s", detail)

    def on_poison_broadcast(self, detail: str) -> None:
        log.error("dropped a broadcast message that cannot be handled: %s", detail)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except self.poison_errors as exc:
            self.on_undecodable_envelope(_detail(exc))
            return True  # one message was consumed (and is dropped): it was never recorded as unacknowledged

    def _receive_one(self, c: Any) -> Any:
        try:
            return super()._receive_one(c)
        except (*IO_ERRORS, kombu_redis.Empty):
            raise
        except Exception as exc:  # RecursionError included; never BaseException (SystemExit of a shutdown)
            self.on_poison_broadcast(_detail(exc))
            return True

    def close(self) -> None:
        if not self.connection_collected():
            super().close()
            return
        # Collected: restoring would need the connection's parameters, which collect() dropped (kombu's QoS has a
        # public switch for that, which its exit-time finalizer honours too).
        if self._qos is not None:
            self._qos.restore_at_shutdown = False
        super().close()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if self.connection_gone():  # a task that outlived its connection: kombu restores the message
            log.info("not acknowledging %s on a collected connection; it is redelivered", delivery_tag)
            return
        super().basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self.connection_gone():
            log.info("not rejecting %s on a collected connection; it is redelivered", delivery_tag)
            return
        super().basic_reject(delivery_tag, requeue=requeue)

    def connection_collected(self) -> bool:
        """Whether Celery collected this channel's connection after a connection loss (``collect()`` drops the
        transport's ``client``): nothing can reach Redis through it any more."""
        return self.connection is not None and getattr(self.connection, "client", True) is None

    def connection_gone(self) -> bool:
        """Collected, or closed since (closing drops the channel's transport)."""
        return self.connection is None or self.connection_collected()


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:300] if text and not isinstance(exc, RecursionError) else type(exc).__name__


def guarded_transport(channel_class: type[GuardedRedisChannel]) -> type[kombu_redis.Transport]:
    """A Redis transport whose channels are ``channel_class``."""
    return type("GuardedRedisTransport", (kombu_redis.Transport,), {"Channel": channel_class})


class HandoverEventDispatcher(EventDispatcher):  # type: ignore[misc]
    def extend_buffer(self, other: EventDispatcher) -> None:
        super().extend_buffer(other)
        for group, events in list(other._group_buffer.items()):
            taken = events[:]
            self._group_buffer[group].extend(taken)
            del events[: len(taken)]


class LosslessEventDispatcher(HandoverEventDispatcher):
    """Celery < 5.7 only: a flush that removes exactly what it published."""

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        with self.mutex:
            if errors:
                self._flush_parked()
            if groups:
                self._flush_groups()

    def _flush_parked(self) -> None:
        """The events parked while the broker was down, oldest first; one parked again goes to the back."""
        for _ in range(len(self._outbound_buffer)):
            event, routing_key, *_error = self._outbound_buffer[0]
            self._publish(event, self.producer, routing_key)  # raises (leaving it first) or parks a copy at the back
            self._outbound_buffer.popleft()

    def _flush_groups(self) -> None:
        for group, events in self._group_buffer.items():
            taken: list[Any] = events[:]  # a copy: appends from other threads go past its end
            if not taken:
                continue
            self._publish(taken, self.producer, f"{group}.multi")
            del events[: len(taken)]


def event_dispatcher_class(version: tuple[int, ...] = tuple(celery.VERSION[:2])) -> type[EventDispatcher]:
    return HandoverEventDispatcher if version >= LOSSLESS_FLUSH_SINCE else LosslessEventDispatcher


class MemqEvents(Events):  # type: ignore[misc]
    """The app's ``events`` class (Celery's documented ``Celery(events=...)`` argument)."""

    dispatcher_cls = f"{__name__}:{event_dispatcher_class().__name__}"
