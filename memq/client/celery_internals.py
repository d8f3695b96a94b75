"""The one module of memq that overrides or touches private parts of Celery and kombu: every subclass of theirs,
every method or table of theirs that memq replaces. docs/celery.md lists each hook, why it exists, its upstream issue
and its canary test (tests/test_celery_internals.py). What a hook decides (which message is poison, which command is
refused) lives with the worker (``memq.workers.plumbing.poison_guard``, ``.remote_control``) and is passed in.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import celery
import redis
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

log = logging.getLogger(__name__)

#: Celery from which ``EventDispatcher.flush`` keeps what it did not publish (celery#10434's fix).
LOSSLESS_FLUSH_SINCE = (5, 7)
#: Errors of the connection itself, which kombu must see to reconnect (kombu 5.7 also lists ``KeyError`` among
#: the transport's connection errors, which a handler's bug must not pass for).
IO_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError, EOFError)
DECODE_ERRORS: tuple[type[BaseException], ...] = (RecursionError, json.JSONDecodeError, UnicodeDecodeError)
#: What the cause of Celery's bare ``RuntimeError`` is when the result store was unreachable.
RESULT_STORE_ERRORS: tuple[type[BaseException], ...] = (OperationalError, redis.RedisError, OSError)


class PoisonEnvelope(Exception):
    """An envelope kombu could not make a message of (its reason is the exception's text)."""


@dataclass(frozen=True)
class ChannelGuard:
    """What a guarded channel does with an envelope: why it is poison (``None``: it is not), and what becomes of
    one from a task queue and of one from a broadcast channel (each is dropped after that)."""

    envelope_problem: Callable[[Any], str | None]
    on_undecodable_envelope: Callable[[str], None]
    on_poison_broadcast: Callable[[str], None]


class GuardedMessage(kombu_virtual.Message):
    """kombu's message, refusing (``PoisonEnvelope``) an envelope it would choke on, before it is recorded."""

    guard: ChannelGuard  # set by guarded_transport

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        problem = self.guard.envelope_problem(payload)
        if problem is not None:
            raise PoisonEnvelope(problem)
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as exc:
            raise PoisonEnvelope(f"{type(exc).__name__}: {exc}"[:200]) from exc


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel: an envelope that cannot be decoded or made a message of, on a task queue or on a
    broadcast channel (remote control, events), goes to its guard and is dropped, not fatal."""

    guard: ChannelGuard  # set by guarded_transport
    Message = GuardedMessage
    poison_errors: tuple[type[BaseException], ...] = (*DECODE_ERRORS, PoisonEnvelope)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except self.poison_errors as exc:
            self.guard.on_undecodable_envelope(_detail(exc))
            return True  # one message was consumed (and is dropped): it was never recorded as unacknowledged

    def _receive_one(self, c: Any) -> Any:
        try:
            return super()._receive_one(c)
        except (*IO_ERRORS, kombu_redis.Empty):
            raise
        except Exception as exc:  # RecursionError included; never BaseException (SystemExit of a shutdown)
            self.guard.on_poison_broadcast(_detail(exc))
            return True

    def close(self) -> None:
        if self.connection_collected() and self._qos is not None:  # restoring needs what collect() dropped
            self._qos.restore_at_shutdown = False  # kombu's QoS switch, which its exit-time finalizer honours too
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


def guarded_transport(guard: ChannelGuard) -> type[kombu_redis.Transport]:
    """A Redis transport whose channels and messages are guarded by ``guard``."""
    message = type("GuardedMessage", (GuardedMessage,), {"guard": guard})
    channel = type("GuardedRedisChannel", (GuardedRedisChannel,), {"guard": guard, "Message": message})
    return type("GuardedRedisTransport", (kombu_redis.Transport,), {"Channel": channel})


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


# The worker-side hooks below import Celery's worker modules when called: a web process imports this module (for
# ``is_result_store_outage``) and never builds a consumer.

#: ``screen(consumer, message, handle)``: what becomes of one task message; ``handle`` is Celery's own handler.
Screen = Callable[[Any, Any, Callable[[Any], Any]], Any]


def screened_consumer(screen: Screen) -> type[Any]:
    """Celery's worker consumer class, whose task handler passes every task message through ``screen``."""
    from celery.worker.consumer import Consumer

    class ScreenedConsumer(Consumer):  # type: ignore[misc]
        def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
            handle = super().create_task_handler(*args, **kwargs)
            return lambda message: screen(self, message, handle)

    return ScreenedConsumer


def queue_consumer_step(
    queue: str,
    enabled: Callable[[celery.Celery], bool],
    on_message: Callable[[celery.Celery, Any], None],
    on_decode_error: Callable[[Any, Exception], None],
    prefetch: int,
) -> type[Any]:
    """A consumer bootstep that consumes ``queue`` (JSON only; never declared: without it the step logs and consumes
    nothing) where ``enabled(app)``, handing each message to ``on_message(app, message)``."""
    import amqp.exceptions
    from celery import bootsteps
    from kombu import Consumer, Queue

    class QueueConsumerStep(bootsteps.ConsumerStep):  # type: ignore[misc]
        def __init__(self, parent: Any, **kwargs: Any) -> None:
            self.app = parent.app
            super().__init__(parent, **kwargs)

        def include_if(self, parent: Any) -> bool:
            return enabled(parent.app)

        def get_consumers(self, channel: Any) -> list[Any]:
            try:  # a passive declare needs no permission
                channel.queue_declare(queue=queue, passive=True)
            except amqp.exceptions.NotFound:
                log.error("no queue %s on the broker: run `memq broker setup`", queue)
                return []
            app = self.app
            return [
                Consumer(
                    channel,
                    queues=[Queue(queue, no_declare=True)],
                    on_message=lambda message: on_message(app, message),
                    on_decode_error=on_decode_error,
                    accept=["json"],
                    prefetch_count=prefetch,
                )
            ]

    return QueueConsumerStep


def mark_not_registered(app: celery.Celery, headers: dict[str, Any], properties: dict[str, Any]) -> None:
    """As Celery does for a task name no worker knows: the caller gets ``NotRegistered`` at once instead of waiting
    out its timeout. ``headers`` has string ``id`` and ``task``."""
    from celery.exceptions import NotRegistered

    mark_failed(app, headers, properties, NotRegistered(headers["task"]))


def mark_failed(
    app: celery.Celery,
    headers: dict[str, Any],
    properties: dict[str, Any],
    error: Exception,
    embed: dict[str, Any] | None = None,
    delivery_info: Any = None,
) -> None:
    """Fails the task ``headers`` names with ``error`` where its own failure would go: its result, and, from the
    message's ``embed``, its chord's counter (a chord part: the chord body fails once every part is in) and the rest
    of its chain. ``headers`` has string ``id`` and ``task``."""
    from celery.utils.objects import Bunch

    embed = embed or {}
    request = Bunch(
        id=headers["id"],
        name=headers["task"],
        chord=embed.get("chord") if isinstance(embed.get("chord"), dict) else None,
        chain=embed.get("chain") if isinstance(embed.get("chain"), list) else None,
        group=headers.get("group") if isinstance(headers.get("group"), str) else None,
        group_index=headers.get("group_index") if isinstance(headers.get("group_index"), int) else None,
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"),
        errbacks=None,
        delivery_info=delivery_info,
        ignore_result=False,
    )
    app.backend.mark_as_failure(headers["id"], error, request=request)


def control_command_names() -> frozenset[str]:
    """The remote-control commands this process's workers know (Celery's ``Panel.data``)."""
    from celery.worker.control import Panel

    return frozenset(Panel.data)


def refuse_control_commands(allowed: frozenset[str], refusal: Callable[[str], Callable[..., Any]]) -> list[str]:
    """Replaces each command of Celery's command table outside ``allowed`` by ``refusal(name)``; the names."""
    from celery.worker.control import Panel

    refused = sorted(name for name in Panel.data if name not in allowed)
    for name in refused:
        Panel.data[name] = refusal(name)
    return refused


def is_result_store_outage(exc: BaseException) -> bool:
    """Celery's result consumer's bare ``RuntimeError`` on giving up reconnecting (the next call reconnects): a
    transient outage, recognised by its cause, never by its text."""
    return isinstance(exc, RuntimeError) and isinstance(exc.__cause__, RESULT_STORE_ERRORS)


#: What py-amqp raises for a content-header frame it cannot decode (never a connection's own error; ValueError
#: includes UnicodeDecodeError).
UNDECODABLE_HEADER_ERRORS = (RecursionError, struct.error, ValueError, KeyError, IndexError)
AMQP_HEADER_FRAME = 2


def guarded_amqp_transport(on_undecodable: Callable[[str], None]) -> type[Any]:
    """kombu's py-amqp transport (through py-amqp's documented ``Connection(frame_handler=...)``) reading a
    content-header frame it cannot decode as the same header with no properties, which the guard dead-letters."""
    from amqp.method_framing import frame_handler
    from kombu.transport import pyamqp

    def guarded_frame_handler(connection: Any, callback: Callable[..., Any], **options: Any) -> Callable[[Any], bool]:
        on_frame = frame_handler(connection, callback, **options)

        def on_guarded_frame(frame: Any) -> bool:
            try:
                return bool(on_frame(frame))
            except UNDECODABLE_HEADER_ERRORS as exc:
                frame_type, channel, buf = frame
                if frame_type != AMQP_HEADER_FRAME:
                    raise
                on_undecodable(type(exc).__name__)
                class_id, body_size = struct.unpack_from(">HxxQ", buf, 0)
                return bool(on_frame((frame_type, channel, struct.pack(">HxxQH", class_id, body_size, 0))))

        return on_guarded_frame

    class GuardedAmqpConnection(pyamqp.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("frame_handler", guarded_frame_handler)
            super().__init__(*args, **kwargs)

    return type("GuardedAmqpTransport", (pyamqp.Transport,), {"Connection": GuardedAmqpConnection})
