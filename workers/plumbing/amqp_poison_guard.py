"""The worker's guard on RabbitMQ: deliveries with undecodable headers, and dead letters kept by the broker.

A delivery whose header frame py-amqp cannot decode is handed on without its properties (``GuardedAmqpTransport``,
docs/celery.md), so the guard dead-letters it like any malformed message. A message the guard refuses is published
whole to ``memq.dead``, confirmed, before the guard acknowledges it; failing that it is recorded in the cache Redis
(docs/guarantees.md). Nothing is declared here: ``memq broker setup`` did that.
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
    why = (letter["reason"], letter["detail"])
    log.error("dead-lettered a message from %s to %s: %s (%s)", queue, broker.DEAD_LETTER_QUEUE, *why)
    return True
