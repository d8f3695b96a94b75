"""Canaries for the private parts of Celery and kombu that memq relies on (``memq.celery_internals``, listed in
docs/celery.md). Each fails with a message naming the upstream change to look at: a hook that would silently stop
working, or a workaround that upstream made unnecessary."""

from __future__ import annotations

import ast
import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import celery
import redis
from celery.events.dispatcher import EventDispatcher
from kombu import Connection
from kombu.simple import SimpleQueue
from kombu.transport import redis as kombu_redis

from memq import celery_internals
from memq.app import app
from memq.workers.guard import GuardedRedisTransport

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("memq", "workers", "tasks", "config")
CELERY_57 = tuple(celery.VERSION[:2]) >= celery_internals.LOSSLESS_FLUSH_SINCE


def test_kombus_redis_channel_still_reads_through_the_two_methods_the_guard_wraps() -> None:
    for name in ("_brpop_read", "_receive_one"):
        assert callable(getattr(kombu_redis.Channel, name, None)), (
            f"kombu's Redis Channel has no {name} any more: memq.celery_internals.GuardedRedisChannel no longer "
            "guards that path; find where kombu now reads task queues / pub/sub messages (docs/celery.md)"
        )


def close_a_channel_holding_a_message_after_collect(transport: type[Any]) -> tuple[Any, bool]:
    """What Celery 5.7 does after a connection loss: ``collect()`` (the transport loses its connection's
    parameters: kombu's ``Connection.collect`` sets ``transport.client`` to None) and then ``close()`` the
    consumer's channel, which still holds an unacknowledged message. Returns the message and whether the close
    raised ``AttributeError``."""
    connection = Connection(os.environ["MEMQ_BROKER_URL"], transport=transport)
    channel = connection.channel()
    queue = SimpleQueue(channel, f"canary-{uuid.uuid4().hex[:8]}")
    queue.put({"hello": "canary"})
    message = queue.get(timeout=5)  # delivered, not acknowledged: kombu keeps it in its unacked index
    channel.connection.client = None
    try:
        channel.close()
    except AttributeError:
        return message, True
    return message, False


def ack_on_a_collected_channel(transport: type[Any]) -> tuple[Any, bool]:
    """A task that outlived its connection acknowledges its message on the old channel after ``collect()``."""
    connection = Connection(os.environ["MEMQ_BROKER_URL"], transport=transport)
    channel = connection.channel()
    queue = SimpleQueue(channel, f"canary-{uuid.uuid4().hex[:8]}")
    queue.put({"hello": "canary"})
    message = queue.get(timeout=5)
    channel.connection.client = None
    with contextlib.suppress(AttributeError):  # kombu's own close fails here (the test above)
        channel.close()  # what Celery 5.7 does right after collect(); the task is still running
    try:
        message.ack()  # the task ends after the reconnect
    except AttributeError:
        return message, True
    return message, False


def test_a_task_that_outlived_its_connection_acks_without_stopping_the_worker_and_its_message_is_kept() -> None:
    message, raised = ack_on_a_collected_channel(GuardedRedisTransport)

    assert not raised
    assert redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"]).hexists("unacked", message.delivery_tag)
    forget_unacked(message)


def test_kombus_own_channel_still_fails_to_ack_after_collect() -> None:
    message, raised = ack_on_a_collected_channel(kombu_redis.Transport)
    forget_unacked(message)

    assert raised, (
        "kombu now acknowledges safely on a channel whose connection Celery collected: "
        "GuardedRedisChannel.basic_ack's workaround (memq.celery_internals, docs/celery.md) can go"
    )


def forget_unacked(message: Any) -> None:
    message.channel.qos.restore_at_shutdown = False  # its connection is gone: nothing to restore at exit
    broker = redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"])
    broker.hdel("unacked", message.delivery_tag)
    broker.zrem("unacked_index", message.delivery_tag)


def test_a_guarded_channel_closes_after_its_connection_was_collected_and_keeps_the_message_for_restore() -> None:
    message, raised = close_a_channel_holding_a_message_after_collect(GuardedRedisTransport)

    assert not raised
    assert redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"]).hexists("unacked", message.delivery_tag)
    forget_unacked(message)  # kombu would restore it after visibility_timeout


def test_kombus_own_channel_still_fails_to_close_after_collect_so_the_workaround_is_still_needed() -> None:
    message, raised = close_a_channel_holding_a_message_after_collect(kombu_redis.Transport)
    forget_unacked(message)

    assert raised, (
        "kombu now closes a channel whose connection Celery collected: GuardedRedisChannel.close's workaround "
        "(memq.celery_internals, docs/celery.md) can go"
    )


def flush_while_a_pool_thread_buffers(dispatcher_class: type[EventDispatcher]) -> list[list[str]]:
    published: list[list[str]] = []

    class PoolThreadFinishesMidPublish(dispatcher_class):  # type: ignore[misc,valid-type]
        raced = False

        def _publish(self, event: Any, producer: Any, routing_key: str, **options: Any) -> None:
            published.append([e["uuid"] for e in event])
            super()._publish(event, producer, routing_key, **options)
            if not self.raced:
                self.raced = True
                self.send("task-succeeded", uuid="late")

    with Connection(os.environ["MEMQ_BROKER_URL"]) as connection:
        dispatcher = PoolThreadFinishesMidPublish(connection, hostname="race@test", buffer_group=["task"])
        try:
            dispatcher.send("task-received", uuid="early")
            dispatcher.flush()
            dispatcher.flush()
        finally:
            dispatcher.close()
    return published


def test_memq_uses_its_own_flush_exactly_where_celerys_loses_events() -> None:
    stock_keeps_them = flush_while_a_pool_thread_buffers(EventDispatcher) == [["early"], ["late"]]

    assert stock_keeps_them == CELERY_57, (
        "Celery's EventDispatcher.flush changed (celery#10434): LOSSLESS_FLUSH_SINCE in memq.celery_internals "
        "must name the first Celery that keeps events buffered during a flush"
    )
    expected = celery_internals.HandoverEventDispatcher if CELERY_57 else celery_internals.LosslessEventDispatcher
    assert celery_internals.event_dispatcher_class() is expected
    assert issubclass(app.events.Dispatcher, expected)


def test_celerys_dispatcher_still_drops_the_buffered_task_events_of_the_one_it_replaces() -> None:
    with Connection(os.environ["MEMQ_BROKER_URL"]) as connection:
        old = EventDispatcher(connection, hostname="old@test", buffer_group=["task"])
        old.send("task-succeeded", uuid="buffered")
        new = EventDispatcher(connection, hostname="new@test", buffer_group=["task"])
        new.extend_buffer(old)
        handed_over = any(new._group_buffer.values())
        old.close()
        new.close()

    assert not handed_over, (
        "Celery's EventDispatcher.extend_buffer now hands over buffered task events: "
        "memq.celery_internals.HandoverEventDispatcher can go"
    )


def private_accesses_outside_own_classes(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``, and ``self._name`` in a class that memq did not define
    ``_name`` in (so it is its Celery or kombu base class's)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for cls in [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]:
        own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        own |= {
            target.attr
            for node in ast.walk(cls)
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute)
        }
        own |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(cls):
            is_own_receiver = (
                _is_private(node) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            )
            if is_own_receiver and node.attr not in own:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} self.{node.attr}")
    for node in ast.walk(tree):
        if _is_private(node) and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    return found


def _is_private(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")


def test_no_memq_module_but_celery_internals_touches_a_private_attribute() -> None:
    modules = [p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py") if p.name != "celery_internals.py"]

    found = [hit for module in modules for hit in private_accesses_outside_own_classes(module)]

    assert found == [], "private attributes outside memq/celery_internals.py (move them there, docs/celery.md)"
