"""One retry policy for every task: a ``TransientError`` is retried through ``Task.retry`` after
``RetryPolicy.delay_s(attempt)``, at most ``max_retries`` times and only while the retry can start before the caller's
deadline; anything else (``InvalidInput`` above all) never is. The tasks declare ``max_retries=None``: this decides.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task

from memq.core import broker, deadlines
from memq.errors import TransientError

AMQP_MIN_COUNTDOWN_S = 1.0  # native delayed delivery's unit: shorter waits are slept in the worker

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RetryPolicy:
    """``first_delay_s * factor ** attempt`` capped at ``max_delay_s``; with ``jitter``, a random share of it
    (``[delay / 2, delay]``), so that the retries of a batch of messages that failed together spread out."""

    max_retries: int
    first_delay_s: float
    factor: float = 2.0
    max_delay_s: float = 30.0
    jitter: bool = False

    def delay_s(self, attempt: int) -> float:
        delay = min(self.max_delay_s, self.first_delay_s * self.factor**attempt)
        return random.uniform(delay / 2, delay) if self.jitter else delay


EMBED = RetryPolicy(max_retries=3, first_delay_s=0.1, jitter=True)
INGEST = RetryPolicy(max_retries=5, first_delay_s=0.5, jitter=True)


#: A type's search: short waits (0.05, 0.2, 0.8 s), three times within the caller's deadline (a 10 s retrieval's
#: attempts then take 5, 2.5 and 1.25 s: more retries would get too little time to be worth sending).
SEARCH = RetryPolicy(max_retries=3, first_delay_s=0.05, factor=4.0, max_delay_s=2.0)


def retry_transient(
    task: Task, exc: TransientError, policy: RetryPolicy, deadline_ts: float | None = None, queue: str | None = None
) -> None:
    """Raise ``task.retry`` (to ``queue`` when given) if ``policy`` allows another attempt of ``task`` before
    ``deadline_ts``; return when it does not, and the caller reports or raises the failure."""
    attempt = task.request.retries
    delay_s = policy.delay_s(attempt)
    if attempt >= policy.max_retries:
        return
    left_s = deadlines.budget_s(deadline_ts, margin_s=deadlines.DELIVERY_MARGIN_S)
    if left_s is not None and left_s - delay_s <= deadlines.MIN_ATTEMPT_S:
        return
    options = {} if queue is None else {"queue": queue}
    raise task.retry(countdown=countdown_for(task, delay_s), exc=exc, **options) from exc


def countdown_for(task: Task, delay_s: float) -> float:
    """The countdown to publish a retry with, ``delay_s`` from now: as is on Redis; on RabbitMQ slept here when
    under ``AMQP_MIN_COUNTDOWN_S`` (then 0: republished at once), else whole seconds."""
    if not broker.is_amqp(str(task.app.conf.broker_url or "")):
        return delay_s
    if delay_s < AMQP_MIN_COUNTDOWN_S:
        time.sleep(max(0.0, delay_s))
        return 0
    return float(round(delay_s))


def retrying(policy: RetryPolicy) -> Callable[[F], F]:
    """For a bound task (``bind=True``) that fails as a whole: its ``TransientError`` is retried by ``policy``
    while a retry can start before the message's ``deadline_ts`` argument (when it has one) and, once the policy
    gives up, raised."""

    def decorate(run: F) -> F:
        @functools.wraps(run)
        def wrapper(self: Task, *args: Any, **kwargs: Any) -> Any:
            try:
                return run(self, *args, **kwargs)
            except TransientError as exc:
                retry_transient(self, exc, policy, kwargs.get("deadline_ts"))
                raise

        return wrapper  # type: ignore[return-value]

    return decorate
