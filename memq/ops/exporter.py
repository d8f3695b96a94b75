"""``memq exporter``: per queue, the messages waiting and how long the oldest has waited, as Prometheus metrics.

The metrics and what they cost: docs/operations.md, "Queue depth and age". Redis is sampled every ``--interval-s``
(``QueueWatch``); a scrape serves the last sample, with ages computed at scrape time (``QueueExporter``). It reads
only: nothing is consumed, declared or acknowledged. Import-light: redis-py and prometheus_client, no Celery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import redis
from kombu.utils.url import maybe_sanitize_url
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memq.core import names
from memq.core.settings import Settings, get_settings
from memq.errors import ConfigError
from memq.ops.status import fleet_queues, stale_shard_queues

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
DEFAULT_INTERVAL_S = 5.0
PUBLISHED_AT_HEADER = names.PUBLISHED_AT_HEADER
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SOCKET_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class QueueState:
    depth: int
    oldest_since: float | None  # when the oldest waiting message was published (or first seen); None: empty


def read_envelope(raw: bytes) -> tuple[float | None, str, bool]:
    """A queued envelope's ``memq_published_at`` (None when absent or not a finite number), an identity for it (its
    task id, else a digest of the raw message) and whether it is a JSON object at all (not UTF-8, not JSON or nested
    past the decoder's recursion bound: not)."""
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
        envelope = None
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    headers = headers if isinstance(headers, dict) else {}
    stamp = headers.get(PUBLISHED_AT_HEADER)
    published = None
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp):
        published = float(stamp)
    task_id = headers.get("id")
    identity = task_id if isinstance(task_id, str) and task_id else "sha256:" + hashlib.sha256(raw).hexdigest()
    return published, identity, isinstance(envelope, dict)


class QueueWatch:
    """Samples the queues' Redis lists; remembers when it first saw each unstamped message at a tail."""

    def __init__(self, client: redis.Redis, queues: Sequence[str], clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.queues = tuple(queues)
        self.clock = clock
        self._first_seen: dict[str, tuple[str, float]] = {}  # queue -> (identity of its tail message, seen at)
        # (queue, reason) -> count: each unreadable tail message once, and each failure to read a queue's sample
        self.errors: Counter[tuple[str, str]] = Counter()
        self._last_error: dict[str, str] = {}  # queue -> the last error logged for it (each change is logged once)

    def sample(self) -> dict[str, QueueState]:
        """LLEN and LINDEX -1 of every queue (and of each stale shard queue), atomically. Raises redis errors."""
        queues = (*self.queues, *stale_shard_queues(self.client, self.queues))
        pipe = self.client.pipeline(transaction=True)
        for queue in queues:
            pipe.llen(queue)
            pipe.lindex(queue, -1)
        replies = pipe.execute()
        now = self.clock()
        for gone in set(self._first_seen) - set(queues):  # a stale shard queue that emptied
            del self._first_seen[gone]
        states: dict[str, QueueState] = {}
        for at, queue in enumerate(queues):
            try:
                states[queue] = self._state(queue, replies[2 * at], replies[2 * at + 1], now)
            except Exception as exc:  # one queue's odd reply never costs the other queues their series
                self.record_error(queue, "sample_failed", f"{type(exc).__name__}: {exc}")
                depth = replies[2 * at]
                if isinstance(depth, int):
                    states[queue] = QueueState(depth, None)
        return states

    def record_error(self, queue: str, reason: str, detail: str) -> None:
        self.errors[(queue, reason)] += 1
        if self._last_error.get(queue) != detail:
            self._last_error[queue] = detail
            log.warning("memq exporter: queue %s: %s (%s)", queue, reason.replace("_", " "), detail[:300])

    def _state(self, queue: str, depth: int, tail: bytes | None, now: float) -> QueueState:
        """The queue's depth, and when its tail message was published (or first seen there, when unstamped)."""
        if tail is None:
            self._first_seen.pop(queue, None)
            return QueueState(int(depth), None)
        published, identity, readable = read_envelope(tail)
        if published is not None:
            self._first_seen.pop(queue, None)
            return QueueState(int(depth), published)
        seen = self._first_seen.get(queue)
        if seen is None or seen[0] != identity:  # a new tail: an unreadable one is counted once
            if not readable:
                self.record_error(
                    queue, "unreadable_message", f"the next message ({len(tail)} bytes) is not a JSON object"
                )
            seen = self._first_seen[queue] = (identity, now)
        return QueueState(int(depth), seen[1])


class QueueExporter(Collector):
    """A Prometheus collector serving the last sample of a ``QueueWatch``; ``refresh`` takes a new one."""

    def __init__(self, watch: QueueWatch, clock: Callable[[], float] = time.time) -> None:
        self.watch = watch
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, QueueState] = {}
        self._up = False
        self._sampled_at: float | None = None
        self._error: str | None = None
        self._errors: dict[tuple[str, str], int] = {}  # the watch's error counts as of the last refresh

    def refresh(self) -> bool:
        """Samples Redis; on an error the queue series go away and ``memq_exporter_broker_up`` reads 0."""
        states: dict[str, QueueState] = {}
        error = None
        try:
            states = self.watch.sample()
        except Exception as exc:  # the broker down, or anything else: the exporter goes on sampling
            error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, redis.RedisError | OSError):
                self.watch.record_error("", "sample_failed", error)
        with self._lock:
            if error != self._error:  # each change logged once
                log.warning(
                    "memq exporter: %s", f"cannot read the broker: {error}" if error else "the broker answers again"
                )
            self._states, self._up, self._error, self._errors = states, error is None, error, dict(self.watch.errors)
            if error is None:
                self._sampled_at = self.clock()
        return error is None

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # refresh replaces these, never changes them
            states, up, sampled_at, error_counts = self._states, self._up, self._sampled_at, self._errors
        now = self.clock()
        messages = GaugeMetricFamily(
            "memq_queue_messages", "Task messages waiting in the queue's Redis list (LLEN).", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "memq_queue_oldest_age_seconds",
            "Seconds the oldest waiting message of the queue has waited (0 when empty).",
            labels=["queue"],
        )
        for queue, state in states.items():
            messages.add_metric([queue], state.depth)
            age.add_metric([queue], 0.0 if state.oldest_since is None else max(0.0, now - state.oldest_since))
        yield from (messages, age)
        errors = CounterMetricFamily(
            "memq_exporter_errors",
            "Tail messages the exporter could not read (each once) and queue samples that failed, by queue "
            "('' for a whole sample) and reason (unreadable_message, sample_failed).",
            labels=["queue", "reason"],
        )
        for (queue, reason), count in sorted(error_counts.items()):
            errors.add_metric([queue, reason], count)
        yield errors
        yield GaugeMetricFamily("memq_exporter_broker_up", "1 when the last sample read the broker.", value=int(up))
        if sampled_at is not None:
            yield GaugeMetricFamily(
                "memq_exporter_last_sample_timestamp_seconds",
                "Unix time of the last sample that read the broker.",
                value=sampled_at,
            )


def broker_client(url: str) -> redis.Redis:
    if not url.startswith(REDIS_SCHEMES):
        raise ConfigError(f"memq exporter reads a Redis broker; MEMQ_BROKER_URL is {maybe_sanitize_url(url)}")
    return redis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S, health_check_interval=30
    )


def run_exporter(
    port: int = DEFAULT_PORT,
    address: str = "0.0.0.0",
    interval_s: float = DEFAULT_INTERVAL_S,
    settings: Settings | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> int:
    """Serves ``/metrics`` until SIGTERM/SIGINT, sampling the broker every ``interval_s`` seconds."""
    if not (math.isfinite(interval_s) and interval_s > 0):
        raise ConfigError(f"--interval-s must be a positive number of seconds, got {interval_s}")
    settings = settings or get_settings()
    exporter = QueueExporter(QueueWatch(broker_client(settings.broker_url), fleet_queues(settings.search_shards)))
    exporter.refresh()  # the first scrape already has numbers (or broker_up 0)
    registry.register(exporter)
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        registry.unregister(exporter)
        raise ConfigError(f"memq exporter cannot listen on {address}:{port}: {exc}") from None
    stop = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers can be set there only
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT) if on_main}
    print(
        f"memq exporter: http://{address}:{port}/metrics, queues {', '.join(exporter.watch.queues)} of "
        f"{maybe_sanitize_url(settings.broker_url)}, sampled every {interval_s:g} s",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(interval_s):
            exporter.refresh()
    finally:
        server.shutdown()
        server.server_close()
        registry.unregister(exporter)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
