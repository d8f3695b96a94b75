"""The dead letters, as an operator sees them: list, count, purge exactly what was shown, replay; on either broker.

Redis: a short record per letter in ``memq:v1:dead`` (newest first), the whole message beside it under
``memq:v1:dead:msg:<id>``. RabbitMQ: each letter whole in ``memq.dead``, which a listing holds unacknowledged and
hands back, and a replay or purge holds until it has acknowledged what it removed. What a replay promises:
docs/guarantees.md, "Dead letters keep the whole message".
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import redis
from kombu import Connection, Exchange, Queue

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

CONNECT_TIMEOUT_S = 5.0
AMQP_GET_LIMIT = 100_000  # at most this many letters read from memq.dead at once
BODY_PREVIEW_CHARS = 256
HEADERS_PREVIEW_CHARS = 512


def _amqp_url(broker_url: str | None) -> str | None:
    """The broker's URL where it is RabbitMQ (the letters are in ``memq.dead``); None on Redis (the cache Redis)."""
    url = broker_url or get_settings().broker_url
    return url if broker.is_amqp(url) else None


def listed(limit: int = 100, broker_url: str | None = None) -> list[Letter]:
    """The newest ``limit`` letters, each showing the message a replay would publish (or why it would not)."""
    if url := _amqp_url(broker_url):
        with _held_letters(url, AMQP_GET_LIMIT) as (_, held):
            letters = [letter for letter, _message in held]
        return sorted(letters, key=lambda letter: float(letter.fields.get("at") or 0.0), reverse=True)[: max(0, limit)]
    client = cache_redis.get()
    letters = [Letter(_fields(raw), raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, max(0, limit - 1))]
    stored = client.mget([keys.dead_message(letter.id) for letter in letters]) if letters else []
    return [
        Letter(_with_replay(letter.fields, partial(_redis_kept, message)), letter.raw)
        if message is not None
        else Letter({**letter.fields, "replayable": False}, letter.raw)
        for letter, message in zip(letters, stored, strict=True)
    ]


def count(broker_url: str | None = None) -> int | None:
    try:
        if url := _amqp_url(broker_url):
            with Connection(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                return int(_dead_queue().bind(conn.default_channel).queue_declare().message_count)
        return int(cache_redis.get().llen(keys.DEAD_LETTERS))
    except (redis.RedisError, OSError):
        return None


def purge(letters: Iterable[Letter], broker_url: str | None = None) -> int:
    """Removes exactly these letters (and their messages); letters that arrived since are kept."""
    chosen = list(letters)
    if url := _amqp_url(broker_url):
        ids = {letter.id for letter in chosen}
        with _held_letters(url, AMQP_GET_LIMIT) as (_, held):
            shown = [message for letter, message in held if letter.id in ids]
            for message in shown:
                message.ack()
        return len(shown)
    pipe = cache_redis.get().pipeline(transaction=True)
    for letter in chosen:
        pipe.lrem(keys.DEAD_LETTERS, 1, letter.raw)
    for letter in chosen:
        if letter.id:
            pipe.delete(keys.dead_message(letter.id))
    replies = pipe.execute()
    return sum(int(reply) for reply in replies[: len(chosen)])


def purge_all(broker_url: str | None = None) -> int:
    """Removes every letter (and every kept message); returns how many letters there were."""
    if url := _amqp_url(broker_url):
        with Connection(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            queue = _dead_queue().bind(conn.default_channel)
            queue.declare()
            return int(queue.purge() or 0)
    client = cache_redis.get()
    pipe = client.pipeline(transaction=True)
    pipe.lrange(keys.DEAD_LETTERS, 0, -1)
    pipe.delete(keys.DEAD_LETTERS)
    raws = pipe.execute()[0]
    ids = [letter_id for raw in raws if (letter_id := str(_fields(raw).get("id", "")))]
    if ids:
        client.delete(*(keys.dead_message(letter_id) for letter_id in ids))
    return len(raws)


def replay(ids: Iterable[str] | None, broker_url: str | None = None) -> list[Replayed]:
    """Republishes the kept messages of these letters (``None``: every letter) to their original queues, each as
    a new delivery, and removes the letters replayed; one outcome per letter, a failure never stops the rest."""
    wanted = None if ids is None else set(ids)
    if url := _amqp_url(broker_url):
        with _held_letters(url, DEAD_LETTER_MAX if wanted is None else AMQP_GET_LIMIT) as (conn, held):
            producer = conn.Producer(channel=conn.channel())
            return _replayed(
                wanted, [(letter, partial(_replay_amqp, letter, message, producer)) for letter, message in held]
            )
    letters = [Letter(_fields(raw), raw) for raw in cache_redis.get().lrange(keys.DEAD_LETTERS, 0, -1)]
    try:
        with Connection(get_settings().broker_url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            producer = connection.Producer()
            return _replayed(wanted, [(letter, partial(_replay_redis, letter, producer)) for letter in letters])
    except OSError as exc:
        detail = f"broker unreachable: {exc}"
        return _replayed(
            wanted, [(letter, lambda i=letter.id: Replayed(i, "failed", detail=detail)) for letter in letters]
        )


def _replayed(wanted: set[str] | None, letters: list[tuple[Letter, Callable[[], Replayed]]]) -> list[Replayed]:
    """``not_found`` for each wanted id no letter has, then each wanted letter's replay (a failure is one line)."""
    chosen = [(letter, replay_one) for letter, replay_one in letters if wanted is None or letter.id in wanted]
    outcomes = [Replayed(i, "not_found") for i in sorted((wanted or set()) - {letter.id for letter, _ in chosen})]
    for letter, replay_one in chosen:
        try:
            outcomes.append(replay_one())
        except Exception as exc:  # one line, and on to the next letter
            outcomes.append(Replayed(letter.id, "failed", detail=_one_line(exc)))
    return outcomes


def _published(letter_id: str, kept: Kept, producer: Any) -> Replayed:
    try:
        publish(producer, kept)
    except Exception as exc:  # one line for the operator; the letter stays for another try
        return Replayed(letter_id, "failed", kept.queue, kept.task_id, _one_line(exc))
    return Replayed(letter_id, "replayed", kept.queue, kept.task_id)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _with_replay(fields: dict[str, Any], read_kept: Callable[[], Kept]) -> dict[str, Any]:
    """``fields`` showing the message a replay would publish, or why it would not."""
    try:
        kept = read_kept()
    except NotReplayable as exc:
        return {**fields, "replayable": False, "replay": f"refused: {exc}"}
    headers = printable(kept.headers, HEADERS_PREVIEW_CHARS)
    return {**fields, "queue": kept.queue, "headers": headers, "replayable": True, **kept.shown()}


# Redis: a record in memq:v1:dead, the whole message beside it.


def _fields(raw: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(raw)
    except ValueError:
        return {"reason": "unreadable", "detail": "", "queue": "?", "headers": "", "body": "", "at": 0.0}
    return fields if isinstance(fields, dict) else {"reason": "unreadable", "queue": "?", "at": 0.0}


def _redis_kept(stored: bytes) -> Kept:
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
    get = message.get
    return parse_kept(
        get("queue"), get("headers"), body, get("content_type"), get("properties"), get("content_encoding")
    )


def _replay_redis(letter: Letter, producer: Any) -> Replayed:
    """Claims the letter's message (``GET`` and ``DEL`` in one transaction: one replay gets it), checks it, publishes
    it once, then drops the letter; a message not published is put back."""
    if not letter.id:
        return Replayed(letter.id, "not_replayable", detail="letter has no id")
    client = cache_redis.get()
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.dead_message(letter.id))
    pipe.delete(keys.dead_message(letter.id))
    stored, _ = pipe.execute()
    if stored is None:
        return Replayed(letter.id, "not_replayable", detail="no kept message (never kept, expired or replayed)")
    try:
        kept = _redis_kept(stored)
    except NotReplayable as exc:
        client.set(keys.dead_message(letter.id), stored, ex=DEAD_LETTER_TTL_S)  # kept for a purge
        return Replayed(letter.id, "not_replayable", detail=str(exc))
    client.delete(keys.started_count(kept.task_id))  # a fresh count of started deliveries
    outcome = _published(letter.id, kept, producer)
    if outcome.outcome == "replayed":
        client.lrem(keys.DEAD_LETTERS, 1, letter.raw)
    else:
        client.set(keys.dead_message(letter.id), stored, ex=DEAD_LETTER_TTL_S)
    return outcome


# RabbitMQ: each letter a whole message in memq.dead.


def _dead_queue() -> Queue:
    """The dead-letter queue, declared as ``memq broker setup`` declares it (idempotent)."""
    exchange = Exchange(broker.DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
    return Queue(broker.DEAD_LETTER_QUEUE, exchange, routing_key="", durable=True, queue_arguments=dict(broker.QUORUM))


@contextlib.contextmanager
def _held_letters(broker_url: str, most: int) -> Iterator[tuple[Connection, list[tuple[Letter, Any]]]]:
    """Up to ``most`` letters with their messages, held unacknowledged until the block ends; what the block did not
    acknowledge goes back to the queue."""
    with Connection(broker_url, connect_timeout=CONNECT_TIMEOUT_S, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        try:
            queue = _dead_queue().bind(channel)
            queue.declare()
            held = []
            while len(held) < min(most, AMQP_GET_LIMIT) and (message := queue.get(no_ack=False)) is not None:
                held.append((_amqp_letter(message), message))
            yield conn, held
        finally:
            with contextlib.suppress(Exception):
                channel.close()  # the broker requeues what was not acknowledged


def _amqp_letter(message: Any) -> Letter:
    headers = _headers(message)
    body = _body(message)
    queue = _text(headers.get("memq_dead_queue")) or _text(headers.get("x-first-death-queue")) or "?"
    broker_reason = _text(headers.get("x-first-death-reason"))
    fields: dict[str, Any] = {
        "id": _text(headers.get("memq_dead_id")) or _digest_id(headers, body),
        "queue": queue,
        "reason": _text(headers.get("memq_dead_reason")) or broker_reason or "unknown",
        "detail": _text(headers.get("memq_dead_detail")) or f"dead-lettered by RabbitMQ ({broker_reason}) from {queue}",
        "broker_reason": broker_reason,
        "deaths": _deaths(headers),
        "headers": printable(_original(headers), HEADERS_PREVIEW_CHARS),
        "body": printable(body.decode("utf-8", errors="replace"), BODY_PREVIEW_CHARS),
        "at": _at(headers),
    }
    return Letter(_with_replay(fields, partial(_amqp_kept, message, queue)))


def _amqp_kept(message: Any, queue: str) -> Kept:
    properties = (message.content_type, message.properties, message.content_encoding)
    return parse_kept(queue, _original(_headers(message)), _body(message), *properties)


def _replay_amqp(letter: Letter, message: Any, producer: Any) -> Replayed:
    """Publishes the letter's message (confirmed by the broker), then acknowledges the letter."""
    try:
        kept = _amqp_kept(message, letter.fields.get("queue", ""))
    except NotReplayable as exc:
        return Replayed(letter.id, "not_replayable", detail=str(exc))
    outcome = _published(letter.id, kept, producer)
    if outcome.outcome == "replayed":
        message.ack()
    return outcome


def _headers(message: Any) -> dict[str, Any]:
    return message.headers if isinstance(message.headers, dict) else {}


def _original(headers: dict[str, Any]) -> dict[str, Any]:
    """The message's own headers, less those dead-lettering added."""
    return {name: value for name, value in headers.items() if not name.startswith(("memq_dead_", "x-"))}


def _body(message: Any) -> bytes:
    body = message.body  # kombu hands a text body back as str
    return body.encode("utf-8", errors="surrogateescape") if isinstance(body, str) else bytes(body or b"")


def _digest_id(headers: dict[str, Any], body: bytes) -> str:
    """An id for a letter the broker wrote (the guard's carry ``memq_dead_id``): its task id and body, digested."""
    return "x" + hashlib.sha256(_text(headers.get("id")).encode() + b"\0" + body).hexdigest()[:31]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""


def _deaths(headers: dict[str, Any]) -> int:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return 0
    return sum(int(d.get("count", 1)) for d in deaths if isinstance(d, dict) and isinstance(d.get("count", 1), int))


def _at(headers: dict[str, Any]) -> float:
    stamped = headers.get("memq_dead_at")
    if isinstance(stamped, int | float) and not isinstance(stamped, bool):
        return float(stamped)
    deaths = headers.get("x-death")
    when = deaths[0].get("time") if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else None
    if isinstance(when, dt.datetime):
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    return 0.0
