"""The byte budget merges share in a search process (``memq.workers.work_budget``), without services."""

from __future__ import annotations

import threading
import time

import pytest

from memq.errors import RetrievalTimeout
from memq.workers.work_budget import ByteBudget


def hold_in_thread(budget: ByteBudget, nbytes: int, release: threading.Event, entered: list[int]) -> threading.Thread:
    def work() -> None:
        with budget.hold(nbytes, wait_s=30):
            entered.append(nbytes)
            release.wait(30)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def wait_until(condition: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_work_enters_only_while_what_is_held_fits_the_budget() -> None:
    budget = ByteBudget(max_bytes=10)
    release, entered = threading.Event(), []
    threads = [hold_in_thread(budget, 4, release, entered) for _ in range(4)]
    wait_until(lambda: len(entered) == 2)
    time.sleep(0.2)

    assert entered == [4, 4] and budget.held_bytes == 8  # a third 4 would make 12 > 10
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(entered) == 4 and budget.held_bytes == 0 and budget.peak_bytes == 8


def test_work_larger_than_the_budget_runs_alone_and_later_work_waits_its_turn() -> None:
    budget = ByteBudget(max_bytes=10)
    release_small, release_big, entered = threading.Event(), threading.Event(), []
    small = hold_in_thread(budget, 3, release_small, entered)
    wait_until(lambda: entered == [3])
    big = hold_in_thread(budget, 50, release_big, entered)
    wait_until(lambda: len(budget._turns) == 1)  # the big one is queued before the later one arrives
    later = hold_in_thread(budget, 1, release_small, entered)  # fits, but arrived after the big one
    time.sleep(0.2)
    assert entered == [3]

    release_small.set()
    wait_until(lambda: 50 in entered)
    time.sleep(0.1)
    assert entered == [3, 50] and budget.held_bytes == 50
    release_big.set()
    for thread in (small, big, later):
        thread.join(30)
    assert entered == [3, 50, 1] and budget.held_bytes == 0


def test_work_that_finds_no_room_within_its_wait_raises_a_timeout_and_holds_nothing() -> None:
    budget = ByteBudget(max_bytes=10, name="merges in flight")
    release, entered = threading.Event(), []
    holder = hold_in_thread(budget, 8, release, entered)
    wait_until(lambda: entered == [8])

    with (
        pytest.raises(RetrievalTimeout, match=r"merges in flight: no room for 5 bytes within 0\.1 s"),
        budget.hold(5, wait_s=0.1),
    ):
        pass
    release.set()
    holder.join(30)
    with budget.hold(5, wait_s=1):
        assert budget.held_bytes == 5
    assert budget.held_bytes == 0


def test_a_merge_waits_at_most_what_is_left_of_its_deadline_and_never_past_half_the_visibility_timeout() -> None:
    from memq.settings import Settings
    from memq.workers.steps import merge_wait_s

    settings = Settings(retrieve_timeout_s=10, visibility_timeout_s=300)

    assert 4 < merge_wait_s({"deadline_ts": time.time() + 5}, settings) <= 5
    assert merge_wait_s({"deadline_ts": time.time() - 5}, settings) == 0
    assert merge_wait_s({"deadline_ts": 0.0}, settings) == 10  # a request without a deadline: the default timeout
    assert merge_wait_s({"deadline_ts": time.time() + 3000}, settings) == 150
