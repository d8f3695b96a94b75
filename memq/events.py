"""Celery's task events, without the lost ones: the app's ``events`` class (``memq.app``).

A worker whose transport has an event loop (Redis does) buffers its ``task-*`` events and publishes the buffer from
the loop. Celery 5.6's ``EventDispatcher.flush`` publishes the buffer and then empties it, while pool threads append
to it without its lock: an event a thread buffers during that publish is dropped (celery#10434). With the threads
pool memq's workers run, a quick task's ``task-succeeded`` often lands in that window, and Flower then shows a task
that finished as only received. Here a flush publishes what it took and removes exactly that from the buffer; what
arrived meanwhile waits for the next flush.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher


class LosslessEventDispatcher(EventDispatcher):  # type: ignore[misc]
    def flush(self, errors: bool = True, groups: bool = True) -> None:
        super().flush(errors=errors, groups=False)
        if not groups:
            return
        with self.mutex:
            for group, events in self._group_buffer.items():
                taken: list[Any] = events[:]  # a copy: appends from other threads go past its end
                if not taken:
                    continue
                self._publish(taken, self.producer, f"{group}.multi")
                del events[: len(taken)]


class MemqEvents(Events):  # type: ignore[misc]
    dispatcher_cls = "memq.events:LosslessEventDispatcher"
