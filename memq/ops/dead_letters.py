"""The dead letters, as an operator sees them: list, count, purge exactly what was shown, replay; on either broker.

On Redis, workers write them (``memq.workers.plumbing.poison_guard``): each letter (``memq:v1:dead``, newest first) is a
short JSON
record with an ``id``, and, where the worker had a whole message, the message itself under
``memq:v1:dead:msg:<id>`` (at most ``DEAD_LETTER_MAX_BYTES``, kept ``DEAD_LETTER_TTL_S``: ``memq.core.letters``). On
RabbitMQ
the broker keeps them, whole, in its ``memq.dead`` queue (``memq.ops.amqp_dead_letters``).

``replay`` republishes a kept message to its original queue as a new delivery, only if it parses as a memq task
message for that queue (``memq.core.letters.parse_kept``): its started-deliveries count starts again from zero, and its
publish time is now. A replay claims its letter atomically first (Redis: ``GET`` and ``DEL`` in one transaction;
RabbitMQ: the letter is held unacknowledged by the one replaying it), so two concurrent replays of one letter
publish it once. Every failure is one outcome with a one-line reason; ``replay(None)`` goes on past it. Replaying a
``memq.store`` batch writes each memory once (stores are idempotent upserts).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

import redis
from kombu import Connection

from memq.client.cache_redis import cache_redis
from memq.core import broker, keys
from memq.core.letters import (
    DEAD_LETTER_MAX,
    DEAD_LETTER_TTL_S,
    Kept,
    Letter,
    NotReplayable,
    Replayed,
    parse_kept,
    printable,
    publish,
)
from memq.core.settings import get_settings
from memq.ops import amqp_dead_letters

__all__ = ["Letter", "Replayed", "count", "listed", "printable", "purge", "purge_all", "replay"]

PUBLISH_TIMEOUT_S = 5.0


def _on_amqp() -> bool:
    return broker.is_amqp(get_settings().broker_url)


def listed(limit: int = 100) -> list[Letter]:
    """The newest ``limit`` letters, each showing the message a replay would publish (or why it would not)."""
    if _on_amqp():
        return amqp_dead_letters.listed(get_settings().broker_url, limit)
    client = cache_redis.get()
    raws = client.lrange(keys.DEAD_LETTERS, 0, max(0, limit - 1))
    letters = [Letter(_fields(raw), raw) for raw in raws]
    stored = client.mget([keys.dead_message(letter.id) for letter in letters]) if letters else []
    return [_with_kept(letter, message) for letter, message in zip(letters, stored, strict=True)]


def _fields(raw: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(raw)
    except ValueError:
        return {"reason": "unreadable", "detail": "", "queue": "?", "headers": "", "body": "", "at": 0.0}
    return fields if isinstance(fields, dict) else {"reason": "unreadable", "queue": "?", "at": 0.0}


def _with_kept(letter: Letter, message: bytes | None) -> Letter:
    if message is None:
        return Letter({**letter.fields, "replayable": False}, letter.raw)
    try:
        kept = kept_of(message)
    except NotReplayable as exc:
        return Letter({**letter.fields, "replayable": False, "replay": f"refused: {exc}"}, letter.raw)
    shown = {"queue": kept.queue, "headers": printable(kept.headers, 512), "replayable": True, **kept.shown()}
    return Letter({**letter.fields, **shown}, letter.raw)


def kept_of(stored: bytes) -> Kept:
    """The kept message of a Redis letter, parsed (``NotReplayable`` if it is not a memq message)."""
    try:
        message = json.loads(stored)
    except (ValueError, RecursionError):
        raise NotReplayable("stored message is not JSON") from None
    if not isinstance(message, dict):
        raise NotReplayable("stored message is not an object")
    try:
        body = base64.b64decode(str(message.get("body", "")), validate=True)
    except (binascii.Error, ValueError):
        raise NotReplayable("stored body is not base64") from None
    return parse_kept(
        message.get("queue"),
        message.get("headers"),
        body,
        message.get("content_type"),
        message.get("properties"),
        message.get("content_encoding"),
    )


def count() -> int | None:
    try:
        if _on_amqp():
            return amqp_dead_letters.count(get_settings().broker_url)
        return int(cache_redis.get().llen(keys.DEAD_LETTERS))
    except (redis.RedisError, OSError):
        return None


def purge(letters: Iterable[Letter]) -> int:
    """Removes exactly these letters (and their messages); letters that arrived since are kept."""
    chosen = list(letters)
    if _on_amqp():
        return amqp_dead_letters.purge(get_settings().broker_url, {letter.id for letter in chosen})
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
    if _on_amqp():
        return amqp_dead_letters.purge_all(get_settings().broker_url)
    client = cache_redis.get()
    pipe = client.pipeline(transaction=True)
    pipe.lrange(keys.DEAD_LETTERS, 0, -1)
    pipe.delete(keys.DEAD_LETTERS)
    raws = pipe.execute()[0]
    ids = [letter_id for raw in raws if (letter_id := str(_fields(raw).get("id", "")))]
    if ids:
        client.delete(*(keys.dead_message(letter_id) for letter_id in ids))
    return len(raws)


def replay(ids: Iterable[str] | None) -> list[Replayed]:
    """Republishes the kept messages of these letters (``None``: every letter) to their original queues, each as
    a new delivery, and removes the letters replayed; one outcome per letter, a failure never stops the rest."""
    settings = get_settings()
    wanted = None if ids is None else set(ids)
    if _on_amqp():
        return amqp_dead_letters.replay(settings.broker_url, wanted, DEAD_LETTER_MAX)
    letters = [Letter(_fields(raw), raw) for raw in cache_redis.get().lrange(keys.DEAD_LETTERS, 0, -1)]
    chosen = [letter for letter in letters if wanted is None or letter.id in wanted]
    outcomes = [Replayed(letter_id, "not_found") for letter_id in sorted((wanted or set()) - {x.id for x in chosen})]
    try:
        with Connection(settings.broker_url, connect_timeout=PUBLISH_TIMEOUT_S) as connection:
            producer = connection.Producer()
            outcomes += [_replay_or_say_why(letter, producer) for letter in chosen]
    except OSError as exc:
        outcomes += [Replayed(letter.id, "failed", detail=f"broker unreachable: {exc}") for letter in chosen]
    return outcomes


def _replay_or_say_why(letter: Letter, producer: Any) -> Replayed:
    try:
        return _replay_one(letter, producer)
    except Exception as exc:  # one line, and on to the next letter
        return Replayed(letter.id, "failed", detail=f"{type(exc).__name__}: {exc}"[:300])


def _replay_one(letter: Letter, producer: Any) -> Replayed:
    """Claims the letter's message (only one replay gets it), checks it, publishes it once, then drops the letter."""
    client = cache_redis.get()
    if not letter.id:
        return Replayed(letter.id, "not_replayable", detail="letter has no id")
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.dead_message(letter.id))
    pipe.delete(keys.dead_message(letter.id))
    stored, _ = pipe.execute()
    if stored is None:  # never kept (too large, undecodable), expired, or claimed by another replay
        return Replayed(letter.id, "not_replayable", detail="no kept message (never kept, expired or replayed)")
    try:
        kept = kept_of(stored)
    except NotReplayable as exc:
        client.set(keys.dead_message(letter.id), stored, ex=DEAD_LETTER_TTL_S)  # kept for a purge
        return Replayed(letter.id, "not_replayable", detail=str(exc))
    client.delete(keys.started_count(kept.task_id))  # a fresh count of started deliveries
    try:
        publish(producer, kept)
    except Exception as exc:  # one line for the operator; the message is kept for another try
        client.set(keys.dead_message(letter.id), stored, ex=DEAD_LETTER_TTL_S)
        return Replayed(letter.id, "failed", kept.queue, kept.task_id, f"{type(exc).__name__}: {exc}"[:300])
    client.lrem(keys.DEAD_LETTERS, 1, letter.raw)
    return Replayed(letter.id, "replayed", kept.queue, kept.task_id)
