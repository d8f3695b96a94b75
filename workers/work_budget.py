"""A byte budget for the work a process does at once (``MEMQ_MERGE_IN_FLIGHT_MAX_BYTES`` for merges).

A merge of 9 types x k = 100 over memories of ~4 KB ranks 3.6 MB of content and encodes its result for the result
cache; Celery then encodes it again for the result backend, after the merge returns and outside the budget. Eight
search threads doing this at once held ~200 MB beyond the matrix cache. ``ByteBudget.hold(nbytes)`` lets work in
only while the bytes already held plus its own fit the budget; the rest wait (in arrival order) at most ``wait_s``.
Work larger than the whole budget runs alone: it waits until nothing else is held. Merges are CPU-bound Python
(the GIL), so waiting costs them little.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from memq.errors import WorkerBusy


class ByteBudget:
    def __init__(self, max_bytes: int, name: str = "work") -> None:
        self.max_bytes = max_bytes
        self.name = name
        self.held_bytes = 0
        self.peak_bytes = 0
        self._turns: list[object] = []  # waiting work, first come first served
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int, wait_s: float | None) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the block; ``WorkerBusy`` (a ``RetrievalTimeout``) when no room was
        made within ``wait_s`` seconds (``None``: no limit)."""
        nbytes = max(0, nbytes)
        turn = object()
        with self._changed:
            self._turns.append(turn)
            try:
                if not self._changed.wait_for(lambda: self._fits(turn, nbytes), timeout=wait_s):
                    raise WorkerBusy(
                        f"{self.name}: no room for {nbytes:,} bytes within {wait_s:.3g} s "
                        f"({self.held_bytes:,} of {self.max_bytes:,} held)"
                    )
            finally:
                self._turns.remove(turn)
                self._changed.notify_all()
            self.held_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        try:
            yield
        finally:
            with self._changed:
                self.held_bytes -= nbytes
                self._changed.notify_all()

    def _fits(self, turn: object, nbytes: int) -> bool:
        if self._turns[0] is not turn:
            return False
        return self.held_bytes == 0 or self.held_bytes + nbytes <= self.max_bytes
