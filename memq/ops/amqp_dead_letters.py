"""The dead letters RabbitMQ keeps, whole, in its ``memq.dead`` quorum queue (``memq.core.broker``): listed, counted,
purged and replayed by ``memq dead-letters`` through ``memq.ops.dead_letters``.

Two kinds of letter arrive there: those a memq worker's guard refused (it publishes them to the ``memq.dead``
exchange with headers ``memq_dead_id``, ``memq_dead_reason``, ``memq_dead_detail``, ``memq_dead_queue`` and
``memq_dead_at``: ``memq.workers.plumbing.amqp_poison_guard``), and those the broker dead-lettered itself (a message
past the
policy's delivery limit, or rejected), which carry RabbitMQ's ``x-death`` and ``x-first-death-reason``.

Reading a queue on AMQP takes its messages: a listing gets them unacknowledged and closes its channel, which hands
every one back to the queue (its order is taken from ``at``). A replay or a purge holds the letters it read until
it has acknowledged the ones it removed, so no other reader sees them meanwhile: two concurrent ``--replay ID``
publish once (the second finds nothing).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterator
from typing import Any

from kombu import Connection, Exchange, Queue

from memq.core import broker
from memq.core.letters import Letter, NotReplayable, Replayed, parse_kept, printable, publish

CONNECT_TIMEOUT_S = 5.0
GET_LIMIT = 100_000  # at most this many letters read at once
BODY_PREVIEW_CHARS = 256
HEADERS_PREVIEW_CHARS = 512


def dead_queue() -> Queue:
    """The dead-letter queue, declared as ``memq broker setup`` declares it (idempotent)."""
    exchange = Exchange(broker.DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
    return Queue(broker.DEAD_LETTER_QUEUE, exchange, routing_key="", durable=True, queue_arguments=dict(broker.QUORUM))


@contextlib.contextmanager
def held_letters(broker_url: str, most: int) -> Iterator[tuple[Connection, list[tuple[Letter, Any]]]]:
    """Up to ``most`` letters with their messages, held unacknowledged until the block ends; what the block did not
    acknowledge goes back to the queue."""
    with Connection(broker_url, connect_timeout=CONNECT_TIMEOUT_S, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        try:
            queue = dead_queue().bind(channel)
            queue.declare()
            held = []
            while len(held) < min(most, GET_LIMIT):
                message = queue.get(no_ack=False)
                if message is None:
                    break
                held.append((letter_of(message), message))
            yield conn, held
        finally:
            with contextlib.suppress(Exception):
                channel.close()  # the broker requeues what was not acknowledged


def letter_of(message: Any) -> Letter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    body = body_of(message)
    queue = _text(headers.get("memq_dead_queue")) or _text(headers.get("x-first-death-queue")) or "?"
    broker_reason = _text(headers.get("x-first-death-reason"))
    reason = _text(headers.get("memq_dead_reason")) or broker_reason or "unknown"
    detail = _text(headers.get("memq_dead_detail")) or f"dead-lettered by RabbitMQ ({broker_reason}) from {queue}"
    original = {name: value for name, value in headers.items() if not name.startswith(("memq_dead_", "x-"))}
    fields: dict[str, Any] = {
        "id": letter_id(headers, body),
        "queue": queue,
        "reason": reason,
        "detail": detail,
        "broker_reason": broker_reason,
        "deaths": _deaths(headers),
        "headers": printable(original, HEADERS_PREVIEW_CHARS),
        "body": printable(body.decode("utf-8", errors="replace"), BODY_PREVIEW_CHARS),
        "at": _at(headers),
    }
    try:
        kept = parse_kept(queue, original, body, message.content_type, message.properties, message.content_encoding)
    except NotReplayable as exc:
        return Letter({**fields, "replayable": False, "replay": f"refused: {exc}"})
    return Letter({**fields, "replayable": True, **kept.shown()})


def body_of(message: Any) -> bytes:
    """The message's body as bytes (kombu hands a text body back as ``str``)."""
    body = message.body
    if isinstance(body, str):
        return body.encode("utf-8", errors="surrogateescape")
    return bytes(body or b"")


def letter_id(headers: dict[str, Any], body: bytes) -> str:
    """memq's id for a letter its guard wrote; for one the broker wrote, a digest of its task id and body."""
    given = _text(headers.get("memq_dead_id"))
    if given:
        return given
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


def newest_first(letters: list[Letter]) -> list[Letter]:
    return sorted(letters, key=lambda letter: float(letter.fields.get("at") or 0.0), reverse=True)


def listed(broker_url: str, limit: int) -> list[Letter]:
    with held_letters(broker_url, GET_LIMIT) as (_, held):
        return newest_first([letter for letter, _message in held])[: max(0, limit)]


def count(broker_url: str) -> int:
    with Connection(broker_url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        declared = dead_queue().bind(conn.default_channel).queue_declare()
        return int(declared.message_count)


def purge(broker_url: str, ids: set[str]) -> int:
    """Removes the letters with these ids (those shown); the rest, and letters that arrive meanwhile, stay."""
    removed = 0
    with held_letters(broker_url, GET_LIMIT) as (_, held):
        for letter, message in held:
            if letter.id in ids:
                message.ack()
                removed += 1
    return removed


def purge_all(broker_url: str) -> int:
    with Connection(broker_url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        queue = dead_queue().bind(conn.default_channel)
        queue.declare()
        return int(queue.purge() or 0)


def replay(broker_url: str, wanted: set[str] | None, most: int) -> list[Replayed]:
    """Publishes each wanted letter's message to its queue (confirmed by the broker), then acknowledges the letter."""
    outcomes: list[Replayed] = []
    with held_letters(broker_url, most if wanted is None else GET_LIMIT) as (conn, held):
        producer = conn.Producer(channel=conn.channel())
        chosen = [(letter, message) for letter, message in held if wanted is None or letter.id in wanted]
        for letter, message in chosen:
            try:
                outcomes.append(_replay_one(letter, message, producer))
            except Exception as exc:  # one line, and on to the next letter
                outcomes.append(Replayed(letter.id, "failed", detail=f"{type(exc).__name__}: {exc}"[:300]))
    found = {letter.id for letter, _ in chosen}
    return [Replayed(letter_id, "not_found") for letter_id in sorted((wanted or set()) - found)] + outcomes


def _replay_one(letter: Letter, message: Any, producer: Any) -> Replayed:
    headers = message.headers if isinstance(message.headers, dict) else {}
    original = {name: value for name, value in headers.items() if not name.startswith(("memq_dead_", "x-"))}
    try:
        kept = parse_kept(
            letter.fields.get("queue"),
            original,
            body_of(message),
            message.content_type,
            message.properties,
            message.content_encoding,
        )
    except NotReplayable as exc:
        return Replayed(letter.id, "not_replayable", detail=str(exc))
    try:
        publish(producer, kept)
    except Exception as exc:  # one line; the letter goes back to the queue for another try
        return Replayed(letter.id, "failed", kept.queue, kept.task_id, f"{type(exc).__name__}: {exc}"[:300])
    message.ack()
    return Replayed(letter.id, "replayed", kept.queue, kept.task_id)
