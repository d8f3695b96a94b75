"""Canaries for the private parts of Celery and kombu that memq relies on (``memq.client.celery_internals``, listed in
docs/celery.md). Each fails with a message naming the upstream change to look at: a hook that would silently stop
working, or a workaround that upstream made unnecessary."""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import re
import uuid
from pathlib import Path
from typing import Any

import celery
import celery.backends.redis
import celery.worker.loops
import celery.worker.pidbox
import pytest
import redis
from celery.events.dispatcher import EventDispatcher
from celery.exceptions import NotRegistered
from celery.result import AsyncResult
from kombu import Connection
from kombu.simple import SimpleQueue
from kombu.transport import redis as kombu_redis

from memq.client import celery_internals
from memq.client.app import app
from memq.workers.plumbing.poison_guard import GuardedRedisTransport

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("memq", "workers", "tasks", "config")
CELERY_57 = tuple(celery.VERSION[:2]) >= celery_internals.LOSSLESS_FLUSH_SINCE


def test_kombus_redis_channel_still_reads_through_the_two_methods_the_guard_wraps() -> None:
    for name in ("_brpop_read", "_receive_one"):
        assert callable(getattr(kombu_redis.Channel, name, None)), (
            f"kombu's Redis Channel has no {name} any more: memq.client.celery_internals.GuardedRedisChannel no longer "
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
        "GuardedRedisChannel.basic_ack's workaround (memq.client.celery_internals, docs/celery.md) can go"
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
        "(memq.client.celery_internals, docs/celery.md) can go"
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
        "Celery's EventDispatcher.flush changed (celery#10434): LOSSLESS_FLUSH_SINCE in memq.client.celery_internals "
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
        "memq.client.celery_internals.HandoverEventDispatcher can go"
    )


def test_kombus_redis_channel_still_makes_its_messages_with_the_channels_message_class() -> None:
    dropped: list[str] = []
    refusing = celery_internals.ChannelGuard(lambda payload: "refused by the canary", dropped.append, dropped.append)
    connection = Connection(os.environ["MEMQ_BROKER_URL"], transport=celery_internals.guarded_transport(refusing))
    queue = SimpleQueue(connection.channel(), f"canary-{uuid.uuid4().hex[:8]}")
    queue.put({"hello": "canary"})

    with pytest.raises(queue.Empty):
        queue.get(timeout=2)
    connection.release()

    assert dropped == ["PoisonEnvelope: refused by the canary"], (
        "kombu's Redis channel no longer builds its messages with Channel.Message, or no longer reads them through "
        "_brpop_read: memq.client.celery_internals.GuardedMessage no longer refuses poison envelopes (docs/celery.md)"
    )


def test_celerys_event_loops_still_take_the_task_handler_from_create_task_handler() -> None:
    source = inspect.getsource(celery.worker.loops)

    assert source.count("obj.create_task_handler()") == 2, (
        "Celery's worker loops no longer take their task handler from Consumer.create_task_handler: "
        "memq.client.celery_internals.screened_consumer no longer screens task messages (docs/celery.md)"
    )


def test_celerys_pidbox_still_dispatches_through_the_panel_table_memq_rewrites() -> None:
    assert "handlers=control.Panel.data" in inspect.getsource(celery.worker.pidbox), (
        "Celery's pidbox no longer dispatches remote control through Panel.data: "
        "memq.client.celery_internals.refuse_control_commands no longer refuses anything (docs/celery.md)"
    )


def test_celerys_result_consumer_still_gives_up_with_a_runtime_error_raised_from_the_connection_error() -> None:
    source = inspect.getsource(celery.backends.redis.ResultConsumer.reconnect_on_error)  # 5.7: its base class's

    assert re.search(r"raise RuntimeError\(E_RETRY_LIMIT_EXCEEDED\) from \w+", source), (
        "Celery's result consumer gives up reconnecting differently: "
        "memq.client.celery_internals.is_result_store_outage must recognise the new error (docs/celery.md)"
    )


def test_a_task_id_marked_not_registered_fails_with_not_registered_for_its_caller() -> None:
    task_id = uuid.uuid4().hex

    celery_internals.mark_not_registered(app, {"id": task_id, "task": "memq.nope"}, {})

    result = AsyncResult(task_id, app=app)
    assert result.state == "FAILURE"
    assert isinstance(result.result, NotRegistered)
    result.forget()


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


def celery_names(tree: ast.Module) -> set[str]:
    """The names a module binds to Celery or kombu objects: what it imports from ``celery``, ``kombu``, memq's
    Celery app and ``memq.client.celery_internals``; arguments annotated with one of those; names assigned an alias of
    one
    (``table = Panel.data``); and module-level names assigned anything made from one (``GuardedConsumer =
    celery_internals.screened_consumer(...)``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if _is_celery_module(a.name)}
        elif isinstance(node, ast.ImportFrom) and _is_celery_module(node.module or ""):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "memq":
            names |= {a.asname or a.name for a in node.names if a.name in ("app", "celery_internals")}
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None and _uses(node.annotation, names):
            names.add(node.arg)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        if _aliases(node.value, names) or (node in tree.body and _uses(node.value, names)):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _is_celery_module(module: str) -> bool:
    return module.split(".")[0] in ("celery", "kombu") or module in ("memq.client.app", "memq.client.celery_internals")


def _uses(expression: ast.AST, names: set[str]) -> bool:
    return any(isinstance(node, ast.Name) and node.id in names for node in ast.walk(expression))


def _aliases(value: ast.AST, names: set[str]) -> bool:
    """Whether ``value`` may be one of those objects itself (``Panel.data``, ``x if c else Panel.data``)."""
    if isinstance(value, ast.IfExp):
        return _aliases(value.body, names) or _aliases(value.orelse, names)
    if isinstance(value, ast.BoolOp):
        return any(_aliases(operand, names) for operand in value.values)
    root = _root(value)
    return isinstance(root, ast.Name) and root.id in names


def _root(target: ast.AST) -> ast.AST:
    while isinstance(target, ast.Attribute | ast.Subscript):
        target = target.value
    return target


def _is_app_setting(target: ast.AST) -> bool:
    """``app.conf.name = value``: a setting, through Celery's documented configuration object."""
    return isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) and target.value.attr == "conf"


def overrides_outside_internals(path: Path) -> list[str]:
    """Subclasses of a Celery or kombu class, and assignments to an attribute or item of a Celery or kombu object
    (a class, a module, a table such as ``Panel.data``), in one product module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = celery_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_uses(base, names) for base in node.bases):
            found.append(f"{path.name}:{node.lineno} class {node.name} subclasses Celery/kombu")
        for target in _assigned(node):
            root = _root(target)
            if target is not root and isinstance(root, ast.Name) and root.id in names and not _is_app_setting(target):
                found.append(f"{path.name}:{node.lineno} assigns to {ast.unparse(target)}")
    return found


def _assigned(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
        name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
        return [ast.Attribute(value=node.args[0], attr=str(name))]
    return []


def product_modules_but_internals() -> list[Path]:
    return [p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py") if p.name != "celery_internals.py"]


def test_no_memq_module_but_celery_internals_touches_a_private_attribute() -> None:
    found = [hit for module in product_modules_but_internals() for hit in private_accesses_outside_own_classes(module)]

    assert found == [], "private attributes outside memq/client/celery_internals.py (move them there, docs/celery.md)"


def test_no_memq_module_but_celery_internals_subclasses_or_assigns_into_celery_or_kombu() -> None:
    found = [hit for module in product_modules_but_internals() for hit in overrides_outside_internals(module)]

    assert found == [], (
        "overrides of Celery or kombu outside memq/client/celery_internals.py (move them there, docs/celery.md)"
    )


OVERRIDES = """
from celery import Task
from celery.worker.consumer import Consumer
from celery.worker.control import Panel
from kombu.transport import redis as kombu_redis
from memq import celery_internals
from memq.client.app import app

class Screened(Consumer): pass
class Channel(celery_internals.GuardedRedisChannel): pass
kombu_redis.Channel.Message = object
table = Panel.data
table["shutdown"] = None
def tag(task: Task) -> None:
    task.request.tagged = True
setattr(app, "tagged", True)
app.conf.broker_transport = "allowed: a setting"
"""


def test_the_override_check_finds_subclasses_and_assignments_into_celery_and_kombu_objects(tmp_path: Path) -> None:
    module = tmp_path / "overrides.py"
    module.write_text(OVERRIDES)

    found = overrides_outside_internals(module)

    assert {hit.split(" ", 1)[1] for hit in found} == {
        "class Screened subclasses Celery/kombu",
        "class Channel subclasses Celery/kombu",
        "assigns to kombu_redis.Channel.Message",
        "assigns to table['shutdown']",
        "assigns to task.request.tagged",
        "assigns to app.tagged",
    }
    assert len(found) == 6
