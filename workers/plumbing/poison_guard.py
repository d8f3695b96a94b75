"""Poison-message quarantine: a message a worker cannot run never kills, stalls or loops it.

Every task message first passes ``screen``: Celery's protocol-2 shape (``check``), an ``eta`` within its own
deadline and the visibility timeout (``eta_problem``), and the started-deliveries limit (``over_delivery_limit``).
A message that fails, or makes Celery's handler raise, is dead-lettered (``quarantine``), its caller failed at once
(``fail_caller``), then acknowledged. Hooked in through ``memq.client.celery_internals`` (``GuardedConsumer``,
``GuardedRedisTransport``); the rules and their tests: docs/guarantees.md, "Poison messages".
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import reprlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from celery.signals import task_postrun, task_prerun

from memq.client import celery_internals
from memq.client.cache_redis import cache_redis
from memq.core import field_rules, keys, letters, names
from memq.core.settings import get_settings
from memq.errors import DeadLettered, InvalidInput
from memq.workers.plumbing import amqp_poison_guard
from memq.workers.plumbing.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

BODY_PREVIEW_CHARS = 256
HEADERS_PREVIEW_CHARS = 512
DELIVERY_COUNT_TTL_S = 24 * 3600
EMBED_LISTS = ("callbacks", "errbacks", "chain")


@dataclass(frozen=True)
class Problem:
    reason: str  # a short, fixed code: the metric's label
    detail: str  # what exactly, for the operator


def check(message: Any, registered: Mapping[str, Any]) -> Problem | None:
    """Why this message must not run, or ``None``."""
    headers = message.headers
    if not isinstance(headers, dict):
        return Problem("bad_headers", f"headers are {type(headers).__name__}, not an object")
    for name in ("id", "task"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            return Problem("bad_headers", f"header {name!r} is missing or not a non-empty string")
    if headers["task"] not in registered:
        return Problem("unknown_task", f"no task named {headers['task'][:200]!r}")
    problem = _check_request_headers(headers)
    if problem is not None:
        return problem
    try:
        body = message.decode()
    except Exception as exc:  # kombu's decoders raise many kinds; all mean "cannot be read"
        return Problem("undecodable", f"{type(exc).__name__}: {str(exc)[:200]}")
    return _check_body(body)


def _check_request_headers(headers: dict[str, Any]) -> Problem | None:
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        isinstance(timelimit, list | tuple)
        and len(timelimit) == 2
        and all(limit is None or (_is_number(limit) and limit >= 0) for limit in timelimit)
    ):
        return Problem("bad_headers", "header 'timelimit' is not [soft, hard] seconds")
    if headers.get("retries") is not None and not (
        isinstance(headers["retries"], int) and not isinstance(headers["retries"], bool)
    ):
        return Problem("bad_headers", "header 'retries' is not an integer")
    if headers.get("shadow") is not None and not isinstance(headers["shadow"], str):
        return Problem("bad_headers", "header 'shadow' is not a string")
    for name in ("eta", "expires"):
        if headers.get(name) is not None and _time_header_s(headers, name) is None:
            return Problem("bad_headers", f"header {name!r} is not an ISO-8601 time")
    return None


def _time_header_s(headers: dict[str, Any], name: str) -> float | None:
    """An ISO-8601 time header as Unix seconds (``field_rules.check_timestamp``), else ``None``."""
    try:
        return field_rules.check_timestamp(headers[name], name) if isinstance(headers.get(name), str) else None
    except InvalidInput:
        return None


def eta_problem(headers: dict[str, Any], max_ahead_s: float, now_s: float) -> Problem | None:
    """An ``eta`` after the message's own deadline (``expires``: it could only expire), or more than
    ``max_ahead_s`` ahead: the message would be held unacknowledged until then. ``check`` passed the headers."""
    eta_s = _time_header_s(headers, "eta")
    if eta_s is None:
        return None
    expires_s = _time_header_s(headers, "expires")
    if expires_s is not None and eta_s > expires_s:
        return Problem(
            "eta_after_deadline", f"eta {headers['eta']} is after the message's expires {headers['expires']}"
        )
    if eta_s - now_s > max_ahead_s:
        return Problem(
            "eta_too_far",
            f"eta {headers['eta']} is more than {max_ahead_s:g} s ahead (MEMQ_VISIBILITY_TIMEOUT_S): it would be held "
            "unacknowledged until then",
        )
    return None


def _check_body(body: Any) -> Problem | None:
    if not (isinstance(body, list | tuple) and len(body) == 3):
        return Problem("bad_body", f"body is not [args, kwargs, embed]: {type(body).__name__}")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        return Problem("bad_body", "body is not [list, object, object]")
    if not all(isinstance(name, str) for name in kwargs):
        return Problem("bad_body", "kwargs has a key that is not a string")
    for name in EMBED_LISTS:
        if embed.get(name) is not None and not isinstance(embed[name], list | tuple):
            return Problem("bad_body", f"embed {name!r} is not a list")
    if embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        return Problem("bad_body", "embed 'chord' is not an object")
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def over_delivery_limit(message: Any, client: redis.Redis, max_deliveries: int) -> Problem | None:
    """Refuses a redelivered message that already started ``max_deliveries`` times without finishing (it killed or
    stalled its worker each time). A message that was only prefetched by a worker that died never started: its
    redeliveries cost nothing, however often they happen. The first delivery is counted as started."""
    # Only the broker's flag: Celery copies unknown headers (kombu's ``redelivered`` header among them) onto a
    # task's retries, which are new messages, not redeliveries.
    if not (message.delivery_info or {}).get("redelivered"):
        return None
    try:
        restarted = int(client.get(keys.started_count(str(message.headers["id"]))) or 0)
    except (redis.RedisError, OSError, ValueError) as exc:
        log.warning("started-deliveries count unavailable (%s); running the redelivered message", exc)
        return None
    started = restarted + 1
    if started >= max_deliveries:
        return Problem(
            "too_many_deliveries",
            f"started {started} times without finishing (MEMQ_MAX_DELIVERIES={max_deliveries})",
        )
    return None


@task_prerun.connect(dispatch_uid="memq.guard.count_started_redelivery")
def count_started_redelivery(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """A redelivered message starts running: counted until it finishes (``task_postrun`` forgets it)."""
    if task_id and _is_redelivery(task):
        try:
            pipe = cache_redis.get().pipeline(transaction=False)
            pipe.incr(keys.started_count(task_id))
            pipe.expire(keys.started_count(task_id), DELIVERY_COUNT_TTL_S)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("could not count a started redelivery (%s)", exc)


@task_postrun.connect(dispatch_uid="memq.guard.forget_finished_redelivery")
def forget_finished_redelivery(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id and _is_redelivery(task):
        try:
            cache_redis.get().delete(keys.started_count(task_id))
        except (redis.RedisError, OSError) as exc:
            log.warning("could not clear a finished redelivery's count (%s)", exc)


def _is_redelivery(task: Any) -> bool:
    info = getattr(getattr(task, "request", None), "delivery_info", None)
    return isinstance(info, dict) and bool(info.get("redelivered"))


def queue_of(message: Any) -> str:
    """The queue a message came from, as a metric label: a memq queue, else ``other`` (a producer chooses the
    routing key; an unbounded or unprintable label would break the metrics)."""
    info = getattr(message, "delivery_info", None) or {}
    queue = info.get("routing_key") if isinstance(info, dict) else None
    return queue if isinstance(queue, str) and names.is_memq_queue(queue) else "other"


def entry(queue: str, problem: Problem, headers: Any, body: Any) -> dict[str, Any]:
    """One dead letter: an id, where it came from, why, and previews enough to find its producer."""
    return {
        "id": uuid.uuid4().hex,
        "queue": queue,
        "reason": problem.reason,
        "detail": problem.detail,
        "headers": _preview(headers, HEADERS_PREVIEW_CHARS),
        "body": _preview(body, BODY_PREVIEW_CHARS),
        "replayable": False,
        "at": time.time(),
    }


def whole_message(message: Any, queue: str, max_bytes: int) -> str | None:
    """The message as ``memq dead-letters --replay`` republishes it, or ``None`` if it is larger than ``max_bytes``
    or cannot be kept (only messages from memq's own queues are kept)."""
    if not names.is_memq_queue(queue):
        return None
    body = message.body
    raw = body.encode("utf-8", errors="surrogateescape") if isinstance(body, str) else bytes(body or b"")
    if len(raw) > max_bytes:
        return None
    try:
        kept = json.dumps(
            {
                "queue": queue,
                "headers": message.headers,
                "body": base64.b64encode(raw).decode(),
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
                "properties": {
                    name: value
                    for name, value in (message.properties or {}).items()
                    if name in ("correlation_id", "reply_to", "priority")
                },
            },
            separators=(",", ":"),
        )
    except (TypeError, ValueError, RecursionError):
        return None
    return kept if len(kept) <= max_bytes * 2 else None


def _preview(value: Any, limit: int) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value[: limit * 4]).decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value[: limit * 4]
    else:
        text = _SHORT_REPR.repr(value)  # bounded depth and length: safe on a hostile structure
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")[:limit]  # no lone surrogates


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 4, 80, 80
    short.maxlist = short.maxdict = short.maxtuple = 8
    return short


_SHORT_REPR = _short_repr()


def record(client: redis.Redis, letter: dict[str, Any], max_entries: int, message: str | None = None) -> None:
    """Newest first, at most ``max_entries`` kept; the whole ``message`` beside it for ``letters.DEAD_LETTER_TTL_S``.
    A Redis error is logged: the message is dropped all the same, because keeping it would loop."""
    DEAD_LETTERS.labels(queue=letter["queue"], reason=letter["reason"]).inc()
    log.error("dead-lettered a message from %s: %s (%s)", letter["queue"], letter["reason"], letter["detail"])
    letter = {**letter, "replayable": message is not None}
    try:
        pipe = client.pipeline(transaction=False)
        if message is not None:
            pipe.set(keys.dead_message(letter["id"]), message, ex=letters.DEAD_LETTER_TTL_S)
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(letter, separators=(",", ":")))
        pipe.ltrim(keys.DEAD_LETTERS, 0, max_entries - 1)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.error("dead-letter list unavailable (%s); the message was dropped", exc)


def screen(consumer: Any, message: Any, handle: Callable[[Any], Any]) -> Any:
    """``check``, the ``eta`` bound and the delivery limit in front of Celery's task handler ``handle``."""
    settings = get_settings()
    problem = (
        check(message, consumer.app.tasks)
        or eta_problem(message.headers, settings.visibility_timeout_s, time.time())
        or over_delivery_limit(message, cache_redis.get(), settings.max_deliveries)
    )
    if problem is not None:
        return quarantine(consumer, message, problem)
    try:
        return handle(message)
    except consumer.connection_errors:
        raise  # the connection's trouble, not the message's: Celery reconnects
    except Exception as exc:
        return quarantine(consumer, message, Problem("handler_error", f"{type(exc).__name__}: {exc}"[:300]))


def quarantine(consumer: Any, message: Any, problem: Problem) -> None:
    """Record, then acknowledge: whatever fails here is logged, never raised into the consumer."""
    try:
        queue = queue_of(message)
        letter = entry(queue, problem, message.headers, message.body)
        # On RabbitMQ the broker keeps the letter (memq.workers.plumbing.amqp_poison_guard); on Redis, or if that fails,
        # Redis.
        if not (
            amqp_poison_guard.is_amqp_app(consumer.app)
            and amqp_poison_guard.keep_on_broker(consumer.app, message, letter)
        ):
            kept = whole_message(message, queue, letters.DEAD_LETTER_MAX_BYTES)
            record(cache_redis.get(), letter, letters.DEAD_LETTER_MAX, kept)
        fail_caller(consumer.app, message, problem)
    except Exception:
        log.exception("could not record a dead letter (%s); dropping the message", problem.reason)
    try:
        message.ack()
    except consumer.connection_errors:
        raise  # not acknowledged: the broker redelivers it, and the delivery limit ends it
    except Exception as exc:  # already acknowledged or rejected by Celery before it raised
        log.warning("could not acknowledge a dead-lettered message (%s)", exc)


def fail_caller(app: Any, message: Any, problem: Problem) -> None:
    """The caller waiting for this task learns at once instead of at its timeout: ``NotRegistered`` for a task name
    no worker knows (as Celery does), else ``DeadLettered``. The failure goes where the task's own would (its
    chord's counter, the rest of its chain, its errbacks), so a retrieval whose search or embed step was
    dead-lettered ends at once. Only for a message with a string id and task name."""
    headers = message.headers
    if not isinstance(headers, dict) or not all(isinstance(headers.get(name), str) for name in ("id", "task")):
        return
    if problem.reason == "unknown_task":
        celery_internals.mark_not_registered(app, headers, message.properties or {})
        return
    try:
        body = message.decode()
    except Exception:
        body = None
    embed = body[2] if isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[2], dict) else {}
    error = DeadLettered(f"{headers['task']} was dead-lettered: {problem.reason} ({problem.detail})"[:400])
    celery_internals.mark_failed(app, headers, message.properties or {}, error, embed, message.delivery_info)


GuardedConsumer = celery_internals.screened_consumer(screen)


def envelope_problem(payload: Any) -> str | None:
    """Why kombu's Redis transport cannot make a message of ``payload`` (or record it as unacknowledged)."""
    if not isinstance(payload, dict):
        return f"envelope is {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "properties is not an object"
    if not isinstance(properties.get("delivery_tag"), str) or not properties["delivery_tag"]:
        return "properties.delivery_tag is not a non-empty string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(name), str) for name in ("exchange", "routing_key")):
        return "properties.delivery_info lacks string exchange and routing_key"
    if payload.get("headers") is not None and not isinstance(payload["headers"], dict):
        return "headers is not an object"
    for name in ("content-type", "content-encoding"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            return f"{name} is not a string"
    return _body_problem(payload.get("body"), properties.get("body_encoding"))


def _body_problem(body: Any, encoding: Any) -> str | None:
    if body is not None and not isinstance(body, str):
        return "body is not a string"
    if encoding not in (None, "base64"):
        return "properties.body_encoding is not base64"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    return None


def _record_quietly(queue: str, problem: Problem) -> None:
    try:
        record(cache_redis.get(), entry(queue, problem, None, None), letters.DEAD_LETTER_MAX)
    except Exception:
        log.exception("could not record a dead letter (%s); dropping the message", problem.reason)


#: An envelope that cannot be decoded or made a message of, on a task queue or on a broadcast channel (remote
#: control, events), is dead-lettered, not fatal.
GuardedRedisTransport = celery_internals.guarded_transport(
    celery_internals.ChannelGuard(
        envelope_problem=envelope_problem,
        on_undecodable_envelope=lambda detail: _record_quietly("unknown", Problem("undecodable_envelope", detail)),
        on_poison_broadcast=lambda detail: _record_quietly("broadcast", Problem("poison_broadcast", detail)),
    )
)
