"""Keeps a search process's resident memory under its budget (``MEMQ_SEARCH_MAX_RSS_BYTES``).

The bounds before it each cover one kind of work: the matrix cache its bytes, loads their number, merges their
content bytes. What they hold together, with what the allocator keeps after a burst, is what a pod's memory limit
meets. The guard watches that sum, the process's resident memory, at the one place memq can still say no: before
a tenant load or a merge begins (``admitted``). Where the resident memory is above the budget less its headroom
(``MEMQ_SEARCH_RSS_HEADROOM_BYTES``), the admission level:

1. the least recently used tenant matrices are dropped from the cache, as many bytes as the excess (``shed``), and
   the C allocator hands its free pages back to the system (``allocator.release_free_memory``);
2. if it is still above, the work waits (its own deadline at most) while other admitted work finishes and frees
   what it held, looking again every ``POLL_S``;
3. work that finds nothing else admitted runs whatever the reading: what holds the memory then is not memq's work
   in flight, and waiting would not free it (so the fleet never stalls on a budget set too low).

The headroom is for what no one admits: the messages a worker has received and decoded (at most its concurrency,
with prefetch 1, each merge message carrying every type's results), its chord joins (the last search of a
retrieval reads every type's results and publishes the merge message) and Celery's encoding of a merge's result
after the merge returns. At 9 types x k = 100 over 4 KB memories with 8 threads, those reached 154 MiB above the
admission level at the worst 0.25 s sample of a 10-minute run (README, "Memory under the heaviest retrievals"):
about concurrency x 5 x the largest merge message (3.8 MB there).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from memq.errors import WorkerBusy
from memq.workers.metrics import MEMORY_SHED_BYTES, MEMORY_WAITS

POLL_S = 0.05


class MemoryGuard:
    """``max_rss_bytes`` 0: no budget (everything is admitted at once); work is admitted below ``max_rss_bytes -
    headroom_bytes``. ``shed(nbytes)`` frees about that many bytes
    of cache and returns what it freed; ``read_rss_bytes()`` reads the process's RSS (``None``: unknown, admit);
    ``release()`` returns the allocator's free pages."""

    def __init__(
        self,
        max_rss_bytes: int,
        headroom_bytes: int,
        shed: Callable[[int], int],
        read_rss_bytes: Callable[[], int | None],
        release: Callable[[], None],
    ) -> None:
        self.max_rss_bytes = max_rss_bytes
        self.admit_below_bytes = max(0, max_rss_bytes - headroom_bytes)
        self._shed = shed
        self._read_rss_bytes = read_rss_bytes
        self._release = release
        self._changed = threading.Condition()
        self.in_flight = 0
        self._released_at = float("-inf")
        self.shed_bytes = 0  # cache bytes dropped to stay under the budget, in all
        self.waited = 0  # admissions that had to wait
        self.over_budget_runs = 0  # admitted over the budget because nothing else was in flight

    @contextmanager
    def admitted(self, work: str, wait_s: float | None) -> Iterator[None]:
        """Run the block (``work``: ``load`` or ``merge``) once the process is under the budget, or nothing else
        admitted is running; ``WorkerBusy`` when ``wait_s`` ran out first."""
        if self.max_rss_bytes:
            self._admit(work, wait_s)
        else:
            with self._changed:
                self.in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    def info(self) -> dict[str, int]:
        return {
            "max_rss_bytes": self.max_rss_bytes,
            "admit_below_bytes": self.admit_below_bytes,
            "in_flight": self.in_flight,
            "shed_bytes": self.shed_bytes,
            "waited": self.waited,
            "over_budget_runs": self.over_budget_runs,
        }

    def _admit(self, work: str, wait_s: float | None) -> None:
        deadline = None if wait_s is None else time.monotonic() + max(0.0, wait_s)
        with self._changed:
            waited_before = self.waited
            over = self._settle()
            if over > 0:
                self.waited += 1
            while over > 0 and self.in_flight > 0:
                left_s = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if left_s <= 0:
                    MEMORY_WAITS.labels(work=work, outcome="timed_out").inc()
                    raise WorkerBusy(
                        f"search worker memory: a {work} waited {wait_s:.3g} s for the process to fall under "
                        f"{self.admit_below_bytes:,} bytes resident (MEMQ_SEARCH_MAX_RSS_BYTES "
                        f"{self.max_rss_bytes:,} less MEMQ_SEARCH_RSS_HEADROOM_BYTES; {over:,} over, "
                        f"{self.in_flight} other loads and merges running)"
                    )
                self._changed.wait(left_s)
                over = self._settle()
            if over > 0:
                self.over_budget_runs += 1
            if self.waited > waited_before:
                MEMORY_WAITS.labels(work=work, outcome="over_budget" if over > 0 else "admitted").inc()
            self.in_flight += 1

    def _settle(self) -> int:
        """The bytes still over the admission level after shedding cache and releasing free pages."""
        over = self._over_bytes()
        if over > 0:
            freed = self._shed(over)
            self.shed_bytes += freed
            MEMORY_SHED_BYTES.inc(freed)
            now = time.monotonic()
            if now - self._released_at >= POLL_S:  # one release per poll, however many are waiting
                self._released_at = now
                self._release()
            over = self._over_bytes()
        return over

    def _over_bytes(self) -> int:
        resident = self._read_rss_bytes()
        return 0 if resident is None else resident - self.admit_below_bytes


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
