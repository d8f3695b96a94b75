"""The worker's guard on RabbitMQ.

1. A delivery whose AMQP header frame cannot be decoded (a header table nested 3,000 deep exhausts py-amqp's
   recursive decoder; on Celery that is "Unrecoverable error: RecursionError", every worker of the queue dies, and
   the message, never acknowledged, kills the next one) is handed on without its properties
   (``memq.client.celery_internals.guarded_amqp_transport``, through py-amqp's documented
   ``Connection(frame_handler=...)``
   argument; ``memq worker`` installs ``GuardedAmqpTransport`` on an ``amqp://`` broker): the guard then finds no
   ``id``/``task`` header and dead-letters it like any malformed message.
2. Dead letters: a message the guard (``memq.workers.plumbing.poison_guard``) refuses is published, whole, to the
broker's ``memq.dead`` exchange (``memq.core.broker``), with headers saying why, before the guard acknowledges it. The
broker keeps it in the ``memq.dead`` quorum queue, replicated like the task queues, beside the letters it
dead-letters itself (past the policy's delivery limit), where ``memq dead-letters`` lists, purges and replays both
(``memq.ops.dead_letters``). Publishing waits for the broker's confirm; if it fails the guard records the letter
in the cache Redis instead, as on the Redis broker, so a refused message is never run and never lost silently. It
declares nothing (``memq broker setup`` did): a worker's broker user may not configure memq's queues.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from memq.client import celery_internals
from memq.core import broker
from memq.workers.plumbing.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}
DETAIL_CHARS = 300
#: The routing-key prefix of Celery's native delayed delivery (one bit a level: ``0.1.0.…1.search``).
DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def on_undecodable_header(detail: str) -> None:
    log.error("a delivery's AMQP header could not be decoded (%s); it is dead-lettered", detail)


#: kombu's py-amqp transport whose connections pass ``Connection(frame_handler=...)``
#: (``memq.client.celery_internals``).
GuardedAmqpTransport = celery_internals.guarded_amqp_transport(on_undecodable_header)


def is_amqp_app(app: Any) -> bool:
    return broker.is_amqp(str(app.conf.broker_url or ""))


def original_queue(message: Any) -> str:
    """The queue a message was routed to: its routing key, less a delayed-delivery prefix (a retry's)."""
    info = getattr(message, "delivery_info", None) or {}
    key = info.get("routing_key") if isinstance(info, dict) else None
    return DELAY_PREFIX.sub("", key, count=1) if isinstance(key, str) else ""


def keep_on_broker(app: Any, message: Any, letter: dict[str, Any]) -> bool:
    """Publishes ``message`` whole to ``memq.dead`` with ``letter``'s id, queue, reason and detail; ``True`` once
    the broker confirmed it. ``False`` (logged) when it could not: the caller records the letter in Redis."""
    queue = original_queue(message) or str(letter["queue"])
    headers = message.headers if isinstance(message.headers, dict) else {}
    dead_headers = {
        **headers,
        "memq_dead_id": letter["id"],
        "memq_dead_queue": queue,
        "memq_dead_reason": letter["reason"],
        "memq_dead_detail": str(letter["detail"])[:DETAIL_CHARS],
        "memq_dead_at": time.time(),
    }
    properties = message.properties if isinstance(message.properties, dict) else {}
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=broker.DEAD_LETTER_EXCHANGE,
                routing_key=queue,
                headers=dead_headers,
                content_type=message.content_type or "application/octet-stream",
                content_encoding=message.content_encoding or "binary",
                delivery_mode=2,
                retry=True,
                retry_policy=PUBLISH_RETRY,
                **{name: properties[name] for name in ("correlation_id", "reply_to") if properties.get(name)},
            )
    except Exception as exc:  # the broker refused or went away: the Redis record takes it
        log.error("could not dead-letter to RabbitMQ (%s: %s); recording it in Redis", type(exc).__name__, exc)
        return False
    DEAD_LETTERS.labels(queue=letter["queue"], reason=letter["reason"]).inc()
    log.error("dead-lettered a message from %s to %s: %s (%s)", queue, broker.DEAD_LETTER_QUEUE, *_why(letter))
    return True


def _why(letter: dict[str, Any]) -> tuple[str, str]:
    return str(letter["reason"]), str(letter["detail"])
