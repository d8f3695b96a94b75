"""Task events a worker buffers all go out: a flush on the event loop never drops an event that a pool thread
buffers while it publishes (celery#10434), which Flower showed as tasks that never finished."""

from __future__ import annotations

import os
from typing import Any

from kombu import Connection

from memq.app import app
from memq.events import LosslessEventDispatcher


def test_memq_workers_build_their_event_dispatcher_from_memq_events() -> None:
    assert issubclass(app.events.Dispatcher, LosslessEventDispatcher)


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
