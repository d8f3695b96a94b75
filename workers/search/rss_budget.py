"""The one memory limit of a search process: its resident memory budget (``MEMQ_SEARCH_MAX_RSS_BYTES``).

Before a tenant load or a merge (``admitted``), a process above the budget less its headroom sheds the least
recently used cached tenants and returns free pages (``malloc_trim``), then waits while admitted work finishes;
work that finds nothing else admitted runs anyway, work whose wait runs out gets ``WorkerBusy``. The allocator is
fixed at start (``configure_allocator``) so that the reading falls when memory is freed. Why and the measurements:
README, "One memory limit per search process".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from memq.errors import WorkerBusy
from memq.workers.plumbing.metrics import MEMORY_SHED_BYTES, MEMORY_WAITS

POLL_S = 0.05
HEADROOM_MAX_BYTES = 256 * 1024**2
HEADROOM_MAX_FRACTION = 0.5
MERGE_HOLDS_INPUT_TIMES = 6  # a merge ranks, copies and encodes its items: about 6 times their content (measured)
ARENA_MAX = 2
MMAP_THRESHOLD_BYTES = 128 * 1024
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's malloc.h
OPERATOR_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def headroom_bytes(max_rss_bytes: int) -> int:
    """The part of the budget kept for what the guard cannot hold back (received messages, encoding results)."""
    return min(HEADROOM_MAX_BYTES, int(max_rss_bytes * HEADROOM_MAX_FRACTION))


class MemoryGuard:
    """Work is admitted below ``max_rss_bytes - headroom_bytes(max_rss_bytes)``. ``shed(nbytes)`` frees about that
    many bytes of cache and returns what it freed; ``read_rss_bytes()`` reads the process's RSS (``None``: unknown,
    admit); ``release()`` returns the allocator's free pages."""

    def __init__(
        self,
        max_rss_bytes: int,
        shed: Callable[[int], int],
        read_rss_bytes: Callable[[], int | None],
        release: Callable[[], None],
    ) -> None:
        self.max_rss_bytes = max_rss_bytes
        self.admit_below_bytes = max_rss_bytes - headroom_bytes(max_rss_bytes)
        self._shed = shed
        self._read_rss_bytes = read_rss_bytes
        self._release = release
        self._changed = threading.Condition()
        self.in_flight = 0
        self.held_bytes = 0  # what admitted work said it would hold, counted as resident until it ends
        self._released_at = float("-inf")
        self.shed_bytes = 0  # cache bytes dropped to stay under the budget, in all
        self.waited = 0  # admissions that had to wait
        self.over_budget_runs = 0  # admitted over the budget because nothing else was in flight

    @contextmanager
    def admitted(self, work: str, wait_s: float | None, holds_bytes: int = 0) -> Iterator[None]:
        """Run the block (``work``: ``load`` or ``merge``, which will hold about ``holds_bytes``) once the process,
        with what it will hold, is under the admission level, or nothing else admitted is running; ``WorkerBusy``
        when ``wait_s`` ran out first."""
        holds_bytes = max(0, holds_bytes)
        self._admit(work, wait_s, holds_bytes)
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= 1
                self.held_bytes -= holds_bytes
                self._changed.notify_all()

    def info(self) -> dict[str, int]:
        names = ("max_rss_bytes", "admit_below_bytes", "in_flight", "held_bytes", "shed_bytes", "waited")
        return {name: getattr(self, name) for name in (*names, "over_budget_runs")}

    def _admit(self, work: str, wait_s: float | None, holds_bytes: int) -> None:
        deadline = None if wait_s is None else time.monotonic() + max(0.0, wait_s)
        with self._changed:
            waited_before = self.waited
            over = self._settle(holds_bytes)
            if over > 0:
                self.waited += 1
            while over > 0 and self.in_flight > 0:
                left_s = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if left_s <= 0:
                    MEMORY_WAITS.labels(work=work, outcome="timed_out").inc()
                    raise WorkerBusy(
                        f"search worker memory: a {work} waited {wait_s:.3g} s for the process to fall under "
                        f"{self.admit_below_bytes:,} bytes resident (MEMQ_SEARCH_MAX_RSS_BYTES "
                        f"{self.max_rss_bytes:,} less its headroom; {over:,} over, "
                        f"{self.in_flight} other loads and merges running)"
                    )
                self._changed.wait(left_s)
                over = self._settle(holds_bytes)
            if over > 0:
                self.over_budget_runs += 1
            if self.waited > waited_before:
                MEMORY_WAITS.labels(work=work, outcome="over_budget" if over > 0 else "admitted").inc()
            self.in_flight += 1
            self.held_bytes += holds_bytes

    def _settle(self, holds_bytes: int) -> int:
        """The bytes still over the admission level, with ``holds_bytes`` more, after shedding cache and releasing
        free pages."""
        over = self._over_bytes(holds_bytes)
        if over > 0:
            freed = self._shed(over)
            self.shed_bytes += freed
            MEMORY_SHED_BYTES.inc(freed)
            now = time.monotonic()
            if now - self._released_at >= POLL_S:  # one release per poll, however many are waiting
                self._released_at = now
                self._release()
            over = self._over_bytes(holds_bytes)
        return over

    def _over_bytes(self, holds_bytes: int) -> int:
        resident = self._read_rss_bytes()
        return 0 if resident is None else resident + self.held_bytes + holds_bytes - self.admit_below_bytes


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def configure_allocator() -> dict[str, int]:
    """Two malloc arenas and a fixed memory-map threshold in this process, before any thread starts; what was set
    (nothing where the C library is not glibc or the operator set glibc's own variables)."""
    libc = _glibc()
    if libc is None or any(os.environ.get(name) for name in OPERATOR_VARIABLES):
        return {}
    wanted = {"arena_max": (M_ARENA_MAX, ARENA_MAX), "mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)}
    return {name: value for name, (option, value) in wanted.items() if libc.mallopt(option, value) == 1}


def release_free_memory() -> None:
    """Hand the free pages of every malloc arena back to the system (glibc's ``malloc_trim(0)``); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c") if platform.libc_ver()[0] == "glibc" else None
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc
