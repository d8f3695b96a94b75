"""On RabbitMQ, a task message the broker itself dead-letters fails its caller at once, as one memq's guard refuses
does: each worker consumes ``memq.dead.watch`` (a copy of each letter) and acknowledges every copy once read; the
letters memq's guard wrote (headers ``memq_dead_*``) are only acknowledged (docs/celery.md, docs/guarantees.md).
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
