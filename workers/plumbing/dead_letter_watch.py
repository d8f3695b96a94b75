"""On RabbitMQ, a task message the broker itself dead-letters fails its caller at once, as one memq's guard refuses
does (``memq.workers.plumbing.poison_guard.fail_caller``): ``DeadLettered``, into its chord and chain, not a wait to the
timeout.

RabbitMQ dead-letters a message past the policy's delivery limit (it killed, or was returned by, its consumers again
and again) to the fanout exchange ``memq.dead`` with ``x-first-death-reason: delivery_limit`` (or ``rejected``,
``expired``). The exchange puts one copy in ``memq.dead``, the letter ``memq dead-letters`` lists and replays, and
one in ``memq.dead.watch`` (``memq.core.broker``), which every worker consumes through a Celery consumer bootstep
(``memq.client.celery_internals.queue_consumer_step``, added to the app's consumer steps by ``memq.client.app``). Each
copy is
acknowledged once read. The letters memq's guard publishes (headers ``memq_dead_*``) reach it too and are only
acknowledged: the guard failed their callers already. Without ``memq.dead.watch`` on the broker (a topology set up
before it existed) the worker logs that ``memq broker setup`` is due and serves as before.
"""

from __future__ import annotations

import logging
from typing import Any

from memq.client import celery_internals
from memq.core import broker
from memq.workers.plumbing import amqp_poison_guard, poison_guard

log = logging.getLogger(__name__)

PREFETCH = 16


def broker_death(headers: Any) -> poison_guard.Problem | None:
    """Why the broker dead-lettered this message, or ``None`` for a letter memq's guard wrote (or none at all)."""
    if not isinstance(headers, dict) or "memq_dead_reason" in headers:
        return None
    reason, queue = headers.get("x-first-death-reason"), headers.get("x-first-death-queue")
    if not isinstance(reason, str) or not reason:
        return None
    return poison_guard.Problem(reason, f"dead-lettered by RabbitMQ from {queue if isinstance(queue, str) else '?'}")


def on_letter(app: Any, message: Any) -> None:
    """Fails the caller of a message the broker dead-lettered, then acknowledges the copy, whatever happened."""
    try:
        problem = broker_death(message.headers)
        if problem is not None:
            log.error("RabbitMQ dead-lettered %s: %s (%s)", message.headers.get("id"), problem.reason, problem.detail)
            poison_guard.fail_caller(app, message, problem)
    except Exception:
        log.exception("could not fail the caller of a message RabbitMQ dead-lettered")
    finally:
        message.ack()


def on_undecodable(message: Any, exc: Exception) -> None:
    log.error("a copy on %s could not be read (%s); acknowledged", broker.DEAD_LETTER_WATCH_QUEUE, exc)
    message.ack()


#: Consumes ``memq.dead.watch`` on the worker's own broker connection (RabbitMQ only).
DeadLetterWatch = celery_internals.queue_consumer_step(
    broker.DEAD_LETTER_WATCH_QUEUE, amqp_poison_guard.is_amqp_app, on_letter, on_undecodable, PREFETCH
)
