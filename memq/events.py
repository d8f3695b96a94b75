"""Celery's task events, without the lost ones: the app's ``events`` class (``memq.app``).

A worker whose transport has an event loop (Redis does) buffers its ``task-*`` events and publishes the buffer from
the loop. Celery 5.6's ``EventDispatcher.flush`` publishes the buffer and then empties it, while pool threads append
to it without its lock: an event a thread buffers during that publish is dropped (celery#10434). With the threads
pool memq's workers run, a quick task's ``task-succeeded`` often lands in that window, and Flower then showed a task
that finished as only received. Here every flush, under the dispatcher's lock, publishes what it took and removes
exactly that from its buffer: what arrives meanwhile, or is parked again because the broker is down
(``buffer_while_offline``), waits for the next flush. A dispatcher replaced after a broker reconnect hands its
buffered task events to the new one, not only its parked ones.

Still not delivered: events buffered in the last loop tick before a worker stops (Celery closes the connection
before the dispatcher), and Redis pub/sub delivers to the subscribers connected at the time, at most once.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher


class LosslessEventDispatcher(EventDispatcher):  # type: ignore[misc]
    def flush(self, errors: bool = True, groups: bool = True) -> None:
        with self.mutex:
            if errors:
                self._flush_parked()
            if groups:
                self._flush_groups()

    def _flush_parked(self) -> None:
        """The events parked while the broker was down, oldest first; one parked again goes to the back."""
        for _ in range(len(self._outbound_buffer)):
            event, routing_key, _error = self._outbound_buffer[0]
            self._publish(event, self.producer, routing_key)  # raises (leaving it first) or parks a copy at the back
            self._outbound_buffer.popleft()

    def _flush_groups(self) -> None:
        for group, events in self._group_buffer.items():
            taken: list[Any] = events[:]  # a copy: appends from other threads go past its end
            if not taken:
                continue
            self._publish(taken, self.producer, f"{group}.multi")
            del events[: len(taken)]

    def extend_buffer(self, other: EventDispatcher) -> None:
        super().extend_buffer(other)
        for group, events in list(other._group_buffer.items()):
            taken = events[:]
            self._group_buffer[group].extend(taken)
            del events[: len(taken)]


class MemqEvents(Events):  # type: ignore[misc]
    dispatcher_cls = "memq.events:LosslessEventDispatcher"
