"""A worker's C allocator is tuned at start (``memq.workers.allocator``): checked in fresh processes, where glibc
reports its arenas (``malloc_stats``), with and without the tuning."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from memq.workers import allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_stats")

EIGHT_THREADS_ALLOCATING = """
import ctypes, ctypes.util, sys, threading
from memq.workers import allocator
if sys.argv[1] == "tuned":
    print(allocator.tune(arena_max=2, mmap_threshold_bytes=131072))
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    kept = [bytearray(4096) for _ in range(2000)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()
"""


def arenas_used(mode: str, **env: str) -> tuple[int, str]:
    clean = {name: value for name, value in os.environ.items() if name not in allocator.OPERATOR_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_THREADS_ALLOCATING, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**clean, **env},
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines()), done.stdout


def test_a_tuned_process_allocates_from_at_most_two_arenas_where_glibc_alone_gives_its_threads_more() -> None:
    tuned, applied = arenas_used("tuned")
    untuned, _ = arenas_used("default")

    assert "'arena_max': 2" in applied and "'mmap_threshold_bytes': 131072" in applied
    assert 1 <= tuned <= 2
    assert untuned > 2


def test_an_operators_own_glibc_variable_wins_and_memq_changes_nothing() -> None:
    tuned, applied = arenas_used("tuned", MALLOC_ARENA_MAX="4")

    assert applied.strip() == "{}"
    assert 2 < tuned <= 4
