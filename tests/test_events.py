"""Task events a worker buffers all go out: a flush on the event loop never drops an event that a pool thread
buffers while it publishes (celery#10434), which Flower showed as tasks that never finished."""

from __future__ import annotations

import os
from typing import Any

from kombu import Connection

from memq.client.app import app
from memq.client.celery_internals import HandoverEventDispatcher


def test_memq_workers_build_their_event_dispatcher_from_memq_events() -> None:
    assert issubclass(app.events.Dispatcher, HandoverEventDispatcher)


def test_an_event_buffered_while_a_flush_publishes_goes_out_with_the_next_flush() -> None:
    published: list[list[str]] = []

    class PoolThreadFinishesMidPublish(app.events.Dispatcher):  # type: ignore[misc,name-defined]
        raced = False

        def _publish(self, event: Any, producer: Any, routing_key: str, **options: Any) -> None:
            published.append([e["uuid"] for e in event])
            super()._publish(event, producer, routing_key, **options)  # to the real broker
            if not self.raced:  # a task finishes on a pool thread right after the batch went out
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

    assert published == [["early"], ["late"]]


class BrokerDown:
    def publish(self, *_: Any, **__: Any) -> None:
        raise ConnectionError("broker down")


def test_events_parked_while_the_broker_is_down_go_out_once_it_answers_even_after_two_failed_flushes() -> None:
    published: list[list[str]] = []

    class BrokerDownForTwoPublishes(app.events.Dispatcher):  # type: ignore[misc,name-defined]
        failures_left = 2

        def _publish(self, event: Any, producer: Any, routing_key: str, **options: Any) -> None:
            if self.failures_left:  # the broker is down: Celery parks the event (buffer_while_offline)
                self.failures_left -= 1
                super()._publish(event, BrokerDown(), routing_key, **options)
                return
            published.append([e["uuid"] for e in event])
            super()._publish(event, producer, routing_key, **options)

    with Connection(os.environ["MEMQ_BROKER_URL"]) as connection:
        dispatcher = BrokerDownForTwoPublishes(
            connection, hostname="offline@test", buffer_group=["task"], buffer_while_offline=True
        )
        try:
            dispatcher.send("task-succeeded", uuid="parked")
            for _ in range(3):
                dispatcher.flush()
        finally:
            dispatcher.close()

    assert published == [["parked"]]


def test_a_dispatcher_replaced_after_a_reconnect_hands_over_its_buffered_task_events() -> None:
    published: list[list[str]] = []

    class Recording(app.events.Dispatcher):  # type: ignore[misc,name-defined]
        def _publish(self, event: Any, producer: Any, routing_key: str, **options: Any) -> None:
            published.append([e["uuid"] for e in event])
            super()._publish(event, producer, routing_key, **options)

    with Connection(os.environ["MEMQ_BROKER_URL"]) as connection:
        old = Recording(connection, hostname="old@test", buffer_group=["task"])
        old.send("task-succeeded", uuid="buffered-before-the-reconnect")
        old.close()
        new = Recording(connection, hostname="new@test", buffer_group=["task"])
        try:
            new.extend_buffer(old)  # what Celery's Events bootstep does when the consumer reconnects
            new.flush()
        finally:
            new.close()

    assert published == [["buffered-before-the-reconnect"]]
