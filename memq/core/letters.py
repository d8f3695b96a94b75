"""A dead letter as the operator's tools see it, on either broker, and the one check a kept message must pass before
``memq dead-letters --replay`` republishes it (``parse_kept``); the listing shows that parsed message, so what the
operator reads is what replay publishes. Import-light: no Celery, no kombu, no Redis.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from memq.core import names

JSON = "application/json"
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5}
#: Headers a dead letter gathered on its way (memq's and RabbitMQ's), never republished.
DEAD_HEADER_PREFIXES = ("memq_dead_", "x-death", "x-first-death-", "x-last-death-", "x-delivery-count")
#: Dead letters kept in ``memq:v1:dead``, newest first: a bad day's worth, a few MB of previews in Redis.
DEAD_LETTER_MAX = 10_000
#: A letter's whole message is kept (for ``--replay``) up to this size; larger ones keep previews only, so a flood of
#: oversized messages cannot fill the cache Redis (10,000 letters x 1 MiB at most).
DEAD_LETTER_MAX_BYTES = 1024 * 1024
DEAD_LETTER_TTL_S = 7 * 24 * 3600  # how long a whole message is kept: a week to notice and replay it


class NotReplayable(ValueError):
    """Why a kept message is not republished (one line)."""


@dataclass(frozen=True)
class Letter:
    fields: dict[str, Any]  # id, queue, reason, detail, headers, body, replayable, at (+ task, task_id, replay)
    raw: bytes = b""  # Redis: the list entry exactly as stored, what a purge removes

    @property
    def id(self) -> str:
        return str(self.fields.get("id", ""))


@dataclass(frozen=True)
class Replayed:
    id: str
    outcome: str  # "replayed" | "not_found" | "not_replayable" | "failed"
    queue: str = ""
    task_id: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Kept:
    """A task message exactly as a replay publishes it (``published`` headers)."""

    queue: str
    headers: dict[str, Any]
    body: bytes
    content_type: str = JSON
    content_encoding: str = "utf-8"
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.headers["task"])

    @property
    def task_id(self) -> str:
        return str(self.headers["id"])

    def published(self) -> dict[str, Any]:
        """The headers of the replayed message: the original ones, less what dead-lettering added, stamped with a
        new publish time (a replay is a new delivery)."""
        kept = {name: value for name, value in self.headers.items() if not name.startswith(DEAD_HEADER_PREFIXES)}
        return {**kept, names.PUBLISHED_AT_HEADER: time.time()}

    def shown(self) -> dict[str, Any]:
        """What the listing says replay would publish."""
        return {"task": self.task, "task_id": self.task_id, "replay": f"{self.task} -> {self.queue}"}


def parse_kept(
    queue: Any,
    headers: Any,
    body: bytes,
    content_type: Any = JSON,
    properties: Any = None,
    content_encoding: Any = None,
) -> Kept:
    """The message as a replay would publish it, or ``NotReplayable`` saying why not."""
    if not isinstance(queue, str) or not names.is_memq_queue(queue):
        raise NotReplayable(f"queue {str(queue)[:60]!r} is not one of memq's queues")
    if not isinstance(headers, dict):
        raise NotReplayable("headers are not an object")
    task, task_id = headers.get("task"), headers.get("id")
    if not isinstance(task, str) or task not in names.ROUTES:
        raise NotReplayable(f"task {str(task)[:60]!r} is not a memq task")
    if not isinstance(task_id, str) or not task_id:
        raise NotReplayable("header 'id' is not a non-empty string")
    if not routed_to(task, queue):
        raise NotReplayable(f"{task} is not routed to queue {queue!r}")
    if content_type != JSON:
        raise NotReplayable(f"content type {str(content_type)[:60]!r} is not {JSON}")
    _check_body(body)
    shown = properties if isinstance(properties, dict) else {}
    kept_properties = {name: shown[name] for name in ("correlation_id", "reply_to") if isinstance(shown.get(name), str)}
    encoding = content_encoding if isinstance(content_encoding, str) and content_encoding else "utf-8"
    return Kept(queue, dict(headers), body, JSON, encoding, kept_properties)


def routed_to(task: str, queue: str) -> bool:
    """Whether memq sends ``task`` to ``queue`` (a search may go to any search shard)."""
    route = names.ROUTES[task]
    return queue == route or (route == names.SEARCH_QUEUE and queue.startswith(f"{names.SEARCH_QUEUE}."))


def _check_body(body: bytes) -> None:
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        raise NotReplayable("body is not JSON") from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise NotReplayable("body is not [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise NotReplayable("body is not [list, object, object]")


def printable(text: Any, limit: int = 160) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes, carriage returns, NULs) shown escaped."""
    shown = str(text)[: limit * 4]
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in shown)
    return escaped[:limit]


def publish(producer: Any, kept: Kept) -> None:
    """The kept message, to its queue through the default exchange, as a new delivery (a kombu producer on either
    broker; on RabbitMQ with publisher confirms, so a return means the broker has it)."""
    producer.publish(
        kept.body,
        exchange="",
        routing_key=kept.queue,
        headers=kept.published(),
        content_type=kept.content_type,
        content_encoding=kept.content_encoding,
        delivery_mode=2,
        retry=True,
        retry_policy=PUBLISH_RETRY,
        **kept.properties,
    )
