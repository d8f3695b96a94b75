"""The search process's one memory limit (``MEMQ_SEARCH_MAX_RSS_BYTES``, ``memq.workers.search.rss_budget``): the
guard's
rules on a real matrix cache with the resident memory it is given, glibc handing freed pages back, then a real search
worker over its budget."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import faultkit
import numpy as np
import pytest

from memq.core import names
from memq.core.settings import Settings
from memq.errors import WorkerBusy
from memq.ops import services
from memq.workers.search import strategies
from memq.workers.search.rss_budget import HEADROOM_MAX_BYTES, MemoryGuard, headroom_bytes, resident_bytes
from memq.workers.steps import merge_wait_s

MB = 1_000_000


class Process:
    """The resident memory the guard reads: a base plus what the cache holds, and how often it was released."""

    def __init__(self, base_bytes: int, cache: strategies.MatrixCache) -> None:
        self.base_bytes = base_bytes
        self.cache = cache
        self.releases = 0

    def rss(self) -> int:
        return self.base_bytes + self.cache.nbytes

    def release(self) -> None:
        self.releases += 1


def cache_of(tenants: int, content_bytes: int) -> strategies.MatrixCache:
    cache = strategies.MatrixCache()
    for n in range(tenants):
        items = [{"id": f"m{i}", "content": "x" * content_bytes} for i in range(10)]
        cache.put((f"t{n}", "long_term_memory"), strategies.TenantMatrix(1, items, np.zeros((10, 4), dtype=np.float32)))
    return cache


def guard_over(process: Process, max_rss_bytes: int) -> MemoryGuard:
    return MemoryGuard(max_rss_bytes, shed=process.cache.shed, read_rss_bytes=process.rss, release=process.release)


def test_the_headroom_is_256_mib_or_half_of_a_smaller_budget() -> None:
    assert headroom_bytes(3 * 1024**3) == HEADROOM_MAX_BYTES == 256 * 1024**2
    assert headroom_bytes(448 * 1024**2) == 224 * 1024**2
    assert guard_over(Process(0, cache_of(0, 0)), 100 * MB).admit_below_bytes == 50 * MB


def test_under_its_budget_work_is_admitted_at_once_and_nothing_is_shed() -> None:
    process = Process(20 * MB, cache_of(4, 100_000))  # 20 MB + ~4 MB, budget 100 MB (admits below 50)
    guard = guard_over(process, 100 * MB)

    with guard.admitted("merge", wait_s=0):
        assert guard.in_flight == 1

    assert len(process.cache) == 4 and guard.shed_bytes == 0 and guard.waited == 0 and guard.in_flight == 0


def test_over_its_budget_the_least_recently_used_tenants_are_shed_first_and_free_pages_released() -> None:
    process = Process(47_500_000, cache_of(4, 100_000))  # ~51.5 MB: ~1.5 MB over the 50 MB admission level
    process.cache.get(("t0", "long_term_memory"), 1)  # t0 is now the most recently used
    guard = guard_over(process, 100 * MB)

    with guard.admitted("load", wait_s=0):
        pass

    kept = {n for n in range(4) if process.cache.get((f"t{n}", "long_term_memory"), 1) is not None}
    assert kept == {0, 3}  # t1 and t2 (the least recently used) freed what was over
    assert guard.shed_bytes > 1.5 * MB and process.releases >= 1 and guard.waited == 0


def test_still_over_after_shedding_work_waits_for_the_work_running_and_then_runs() -> None:
    process = Process(90 * MB, cache_of(0, 0))  # over, with nothing to shed
    guard = guard_over(process, 100 * MB)
    release, entered = threading.Event(), []

    def first() -> None:
        with guard.admitted("merge", wait_s=0):  # nothing else running: it runs over the budget
            entered.append("first")
            release.wait(30)
            process.base_bytes = 30 * MB  # what it held is freed as it ends

    def second() -> None:
        with guard.admitted("load", wait_s=30):
            entered.append("second")

    while_first_ran, _ = run_first_then_second(guard, first, second, entered, release)

    assert while_first_ran == ["first"]  # waiting: over the budget while the first runs
    assert entered == ["first", "second"]
    assert guard.over_budget_runs == 1 and guard.waited == 2 and guard.in_flight == 0


def test_work_that_cannot_get_under_the_budget_within_its_wait_is_told_the_worker_is_busy() -> None:
    process = Process(90 * MB, cache_of(0, 0))
    guard = guard_over(process, 100 * MB)
    release = threading.Event()
    holder = threading.Thread(target=lambda: hold(guard, release))
    holder.start()
    wait_until(lambda: guard.in_flight == 1)

    busy = pytest.raises(WorkerBusy, match=r"a merge waited 0\.2 s .*\(MEMQ_SEARCH_MAX_RSS_BYTES 100,000,000 less its")
    with busy, guard.admitted("merge", wait_s=0.2):
        pass

    release.set()
    holder.join(30)
    assert guard.in_flight == 0


def test_merges_admitted_together_count_what_each_will_hold_so_they_cannot_all_start_from_one_low_reading() -> None:
    process = Process(20 * MB, cache_of(0, 0))  # 20 MB, budget 100 MB (admits below 50)
    guard = guard_over(process, 100 * MB)
    release, entered = threading.Event(), []

    def first() -> None:
        with guard.admitted("merge", wait_s=30, holds_bytes=20 * MB):
            entered.append("first")
            release.wait(30)

    def second() -> None:
        with guard.admitted("merge", wait_s=30, holds_bytes=20 * MB):  # 20 + 20 held + 20 = 60: over 50
            entered.append("second")

    while_first_ran, held_bytes = run_first_then_second(guard, first, second, entered, release)

    assert while_first_ran == ["first"] and held_bytes == 20 * MB  # the reading alone (20 MB) would have let it in
    assert entered == ["first", "second"] and guard.held_bytes == 0 and guard.over_budget_runs == 0


def test_the_cache_has_no_bound_of_its_own_and_sheds_the_least_recently_used_first() -> None:
    cache = cache_of(20, 100_000)  # ~20 MB: all kept
    cache.get(("t0", "long_term_memory"), 1)

    assert len(cache) == 20
    assert cache.shed(1) > 0 and cache.get(("t1", "long_term_memory"), 1) is None
    assert len(cache) == 19 and cache.get(("t0", "long_term_memory"), 1) is not None


def test_a_merge_waits_at_most_what_is_left_of_its_deadline_and_never_past_half_the_visibility_timeout() -> None:
    settings = Settings(retrieve_timeout_s=10, visibility_timeout_s=300)

    assert 4 < merge_wait_s({"deadline_ts": time.time() + 5}, settings) <= 5
    assert merge_wait_s({"deadline_ts": time.time() - 5}, settings) == 0
    assert merge_wait_s({"deadline_ts": 0.0}, settings) == 10  # a request without a deadline: the default timeout
    assert merge_wait_s({"deadline_ts": time.time() + 3000}, settings) == 150


FREED_BETWEEN_LIVE_BLOCKS = """
import sys
from memq.workers.search.rss_budget import release_free_memory, resident_bytes
blocks = [bytearray(4096) for _ in range(50_000)]  # ~200 MB from the heap, 4 KB at a time
live = blocks[::64]  # one block in 64 stays, so the heap's top never frees and glibc keeps the pages between them
del blocks
before = resident_bytes()
if sys.argv[1] == "release":
    release_free_memory()
print(before, resident_bytes(), len(live))
"""


def fresh_python(code: str, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` run with argument ``mode`` in a fresh interpreter, without glibc's own tunables unless ``env`` sets
    them."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_"))}
    return subprocess.run(
        [sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=60, check=True, env={**clean, **env}
    )


def freed_pages_left(mode: str) -> tuple[int, int]:
    """A fresh process's resident bytes before and after."""
    before, after, _ = (int(value) for value in fresh_python(FREED_BETWEEN_LIVE_BLOCKS, mode).stdout.split())
    return before, after


EIGHT_THREADS_ALLOCATING = """
import ctypes, ctypes.util, sys, threading
from memq.workers.search.rss_budget import configure_allocator
print(configure_allocator() if sys.argv[1] == "configured" else {})
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
    """How many malloc arenas a fresh process's 8 allocating threads used (glibc's ``malloc_stats``)."""
    done = fresh_python(EIGHT_THREADS_ALLOCATING, mode, **env)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines()), done.stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_stats")
def test_a_search_process_allocates_from_at_most_two_arenas_where_glibc_alone_gives_its_threads_more() -> None:
    configured, applied = arenas_used("configured")
    default, _ = arenas_used("default")

    assert applied.strip() == "{'arena_max': 2, 'mmap_threshold': 131072}"
    assert 1 <= configured <= 2 < default


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_stats")
def test_an_operators_own_glibc_variable_wins_and_the_guard_leaves_the_allocator_alone() -> None:
    configured, applied = arenas_used("configured", MALLOC_ARENA_MAX="4")

    assert applied.strip() == "{}"
    assert 2 < configured <= 4


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_releasing_free_memory_hands_back_the_pages_freed_between_live_blocks_where_glibc_alone_keeps_them() -> None:
    kept_before, kept_after = freed_pages_left("keep")
    released_before, released_after = freed_pages_left("release")

    assert kept_before - kept_after < 20 * MB  # glibc alone holds the freed pages
    assert released_before - released_after > 100 * MB  # the guard's release returns them to the system


def test_the_resident_memory_read_is_this_process_s_own() -> None:
    before = resident_bytes()
    block = np.ones(64 * MB // 8)  # 64 MB touched
    after = resident_bytes()
    del block

    assert before is not None and after is not None and after - before > 50 * MB


def run_first_then_second(
    guard: MemoryGuard,
    first: Callable[[], None],
    second: Callable[[], None],
    entered: list[str],
    release: threading.Event,
) -> tuple[list[str], int]:
    """Start ``first``, then once it entered ``second``; what had entered and what the guard held 0.3 s later, while
    ``first`` still ran. Then ``first`` is released and both are waited for."""
    threads = [threading.Thread(target=first)]
    threads[0].start()
    wait_until(lambda: entered == ["first"])
    threads.append(threading.Thread(target=second))
    threads[1].start()
    time.sleep(0.3)
    seen = (list(entered), guard.held_bytes)
    release.set()
    for thread in threads:
        thread.join(30)
    return seen


def hold(guard: MemoryGuard, release: threading.Event) -> None:
    with guard.admitted("load", wait_s=0):
        release.wait(30)


def wait_until(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


# -- a real search worker over its budget ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_fleet() -> Iterator[dict[str, Any]]:
    """Embed, search and ingest workers on a broker of their own; the search worker's budget is 1 byte, so it is
    over it from the start: every load and merge sheds what is cached and runs only when nothing else does."""
    broker = services.start_redis_server()
    env = services.memq_env(
        os.environ, broker.url, os.environ["MEMQ_MONGODB_URI"], MEMQ_METRICS_PORT="0", MEMQ_SEARCH_MAX_RSS_BYTES="1"
    )
    fleet = services.Fleet(env)
    app = faultkit.private_app(broker.url, "memq-tight")
    try:
        hosts = [fleet.start(kind, name=f"tight-{kind}") for kind in ("embed", "search", "ingest")]
        fleet.wait_ready(app, hosts, timeout_s=240)
        yield {"env": env, "app": app, "search": hosts[1]}
    finally:
        fleet.stop_all()
        app.close()
        broker.stop()


def search_info(app: Any, host: str) -> dict[str, Any]:
    replies = app.control.broadcast(names.INFO_COMMAND, destination=[host], reply=True, timeout=5.0) or []
    return next(reply[host] for reply in replies if host in reply)


def test_a_search_worker_over_its_memory_budget_sheds_its_cached_tenants_and_answers_every_retrieval(
    tight_fleet: dict[str, Any],
) -> None:
    tenants = [f"tight-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    code = f"""
        import json
        from concurrent.futures import ThreadPoolExecutor
        from memq import remember, retrieve
        tenants = {tenants!r}
        for n, tenant in enumerate(tenants):
            remember(tenant, "semantic", [{{"content": f"tenant {{n}} plays the cello"}}, {{"content": "likes tea"}}])
        one_by_one = [retrieve("who plays the cello?", t, {{"semantic": 1}}, timeout_s=60) for t in tenants]
        with ThreadPoolExecutor(6) as pool:
            at_once = list(pool.map(lambda i: retrieve(f"cello {{i}}", tenants[i % 3], {{"semantic": 1}},
                                                       timeout_s=60), range(6)))
        print(json.dumps([[r["errors"], [i["content"] for i in r["results"]["long_term_memory"]]]
                          for r in one_by_one + at_once]))
    """
    outcomes = faultkit.run_client(tight_fleet["env"], code)
    info = search_info(tight_fleet["app"], tight_fleet["search"])

    for n, (errors, contents) in enumerate(outcomes):
        assert errors == {} and contents == [f"tenant {n % 3} plays the cello"]
    guard = info["memory_guard"]
    assert guard["max_rss_bytes"] == 1 and guard["shed_bytes"] > 0 and guard["over_budget_runs"] > 0
    assert info["matrix_cache"]["entries"] <= 1  # each load shed the tenants cached before it
    assert guard["in_flight"] == 0
