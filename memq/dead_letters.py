"""The dead-letter list, as an operator sees it: list, count, purge exactly what was shown, replay.

Workers write it (``memq.workers.guard``): each letter (``memq:v1:dead``, newest first) is a short JSON record with
an ``id``, and, where the worker had a whole message, the message itself under ``memq:v1:dead:msg:<id>`` (at most
``MEMQ_DEAD_LETTER_MAX_BYTES``, kept ``MEMQ_DEAD_LETTER_TTL_S``). ``replay`` republishes that message to its
original queue as a new delivery: its started-deliveries count starts again from zero, and its publish time is
now. Replaying a ``memq.store`` batch writes each memory once (stores are idempotent upserts).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from kombu import Connection

from memq import keys, names
from memq.cache_redis import cache_redis
from memq.settings import get_settings

PUBLISH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Letter:
    raw: bytes  # the list entry exactly as stored: what a purge removes
    fields: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.fields.get("id", ""))


def listed(limit: int = 100) -> list[Letter]:
    """The newest ``limit`` letters."""
    raws = cache_redis.get().lrange(keys.DEAD_LETTERS, 0, max(0, limit - 1))
    return [Letter(raw, _fields(raw)) for raw in raws]


def _fields(raw: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(raw)
    except ValueError:
        return {"reason": "unreadable", "detail": "", "queue": "?", "headers": "", "body": "", "at": 0.0}
    return fields if isinstance(fields, dict) else {"reason": "unreadable", "queue": "?", "at": 0.0}


def count() -> int | None:
    try:
        return int(cache_redis.get().llen(keys.DEAD_LETTERS))
    except (redis.RedisError, OSError):
        return None


def purge(letters: Iterable[Letter]) -> int:
    """Removes exactly these letters (and their messages); letters that arrived since are kept."""
    chosen = list(letters)
    pipe = cache_redis.get().pipeline(transaction=True)
    for letter in chosen:
        pipe.lrem(keys.DEAD_LETTERS, 1, letter.raw)
    for letter in chosen:
        if letter.id:
            pipe.delete(keys.dead_message(letter.id))
    replies = pipe.execute()
    return sum(int(reply) for reply in replies[: len(chosen)])


def purge_all() -> int:
    """Removes every letter (and every kept message); returns how many letters there were."""
    client = cache_redis.get()
    pipe = client.pipeline(transaction=True)
    pipe.lrange(keys.DEAD_LETTERS, 0, -1)
    pipe.delete(keys.DEAD_LETTERS)
    raws = pipe.execute()[0]
    ids = [letter_id for raw in raws if (letter_id := str(_fields(raw).get("id", "")))]
    if ids:
        client.delete(*(keys.dead_message(letter_id) for letter_id in ids))
    return len(raws)


@dataclass(frozen=True)
class Replayed:
    id: str
    outcome: str  # "replayed" | "not_found" | "not_replayable"
    queue: str = ""
    task_id: str = ""


def replay(ids: Iterable[str] | None) -> list[Replayed]:
    """Republishes the kept messages of these letters (``None``: every letter) to their original queues, each as
    a new delivery, and removes the letters replayed."""
    letters = listed(limit=get_settings().dead_letter_max)
    wanted = None if ids is None else set(ids)
    chosen = [letter for letter in letters if wanted is None or letter.id in wanted]
    outcomes = [Replayed(letter_id, "not_found") for letter_id in sorted((wanted or set()) - {x.id for x in chosen})]
    with Connection(get_settings().broker_url, connect_timeout=PUBLISH_TIMEOUT_S) as connection:
        producer = connection.Producer()
        for letter in chosen:
            outcomes.append(_replay_one(letter, producer))
    return outcomes


def _replay_one(letter: Letter, producer: Any) -> Replayed:
    client = cache_redis.get()
    raw = client.get(keys.dead_message(letter.id)) if letter.id else None
    if raw is None:
        return Replayed(letter.id, "not_replayable")  # never kept (too large, undecodable) or expired
    message = json.loads(raw)
    queue, headers = str(message["queue"]), dict(message.get("headers") or {})
    task_id = str(headers.get("id", ""))
    headers[names.PUBLISHED_AT_HEADER] = time.time()
    if task_id:
        client.delete(keys.started_count(task_id))  # a fresh count of started deliveries
    producer.publish(
        base64.b64decode(message["body"]),
        exchange="",
        routing_key=queue,
        headers=headers,
        content_type=message.get("content_type") or "application/json",
        content_encoding=message.get("content_encoding") or "utf-8",
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        **_properties(message.get("properties") or {}),
    )
    purge([letter])
    return Replayed(letter.id, "replayed", queue, task_id)


def _properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The AMQP-style properties Celery sets on a task message (its caller's reply address among them)."""
    kept = {name: properties[name] for name in ("correlation_id", "reply_to") if isinstance(properties.get(name), str)}
    if isinstance(properties.get("priority"), int):
        kept["priority"] = properties["priority"]
    return kept


def printable(text: Any, limit: int = 160) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes, carriage returns, NULs) shown escaped."""
    shown = str(text)[: limit * 4]
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in shown)
    return escaped[:limit]
