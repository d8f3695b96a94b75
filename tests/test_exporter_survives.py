"""``memq exporter`` survives any message at a queue's tail, on the real Redis: it goes on reporting every queue's
depth, and logs and counts what it could not read."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry

from memq.core import names
from memq.ops import exporter

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def queues(cache_redis: redis.Redis) -> Iterator[list[str]]:
    made = [f"memq-test-hostile-{uuid.uuid4().hex[:8]}-{n}" for n in range(5)]
    yield made
    cache_redis.delete(*made)


def stamped(published_at: float) -> str:
    headers = {"id": str(uuid.uuid4()), "task": names.SEARCH, exporter.PUBLISHED_AT_HEADER: published_at}
    return json.dumps({"body": "W10=", "content-type": "application/json", "headers": headers, "properties": {}})


def test_a_100000_deep_message_and_other_garbage_never_stop_the_exporter(
    cache_redis: redis.Redis, queues: list[str]
) -> None:
    deep, not_utf8, deep_object, fine, _empty = queues
    cache_redis.lpush(deep, DEEP_ARRAY, stamped(900.0))  # LPUSH: the deep one ends at the tail, delivered next
    cache_redis.lpush(not_utf8, b"\xff\xfe garbage \x00")
    cache_redis.lpush(deep_object, '{"headers": ' + DEEP_ARRAY + "}")
    cache_redis.lpush(fine, stamped(990.0))
    clock = lambda: 1000.0  # noqa: E731
    collector = exporter.QueueExporter(exporter.QueueWatch(cache_redis, queues, clock=clock), clock=clock)
    registry = CollectorRegistry()
    registry.register(collector)

    for _ in range(3):  # the sampling loop goes on: the same messages are sampled again
        assert collector.refresh() is True

    def depth(queue: str) -> float | None:
        return registry.get_sample_value("memq_queue_messages", {"queue": queue})

    def errors(queue: str) -> float | None:
        return registry.get_sample_value("memq_exporter_errors_total", {"queue": queue, "reason": "unreadable_message"})

    assert [depth(queue) for queue in queues] == [2, 1, 1, 1, 0]
    assert registry.get_sample_value("memq_exporter_broker_up") == 1
    assert registry.get_sample_value("memq_queue_oldest_age_seconds", {"queue": fine}) == 10.0
    assert [errors(queue) for queue in (deep, not_utf8, deep_object)] == [1, 1, 1]  # each message counted once
    assert errors(fine) is None


def test_a_queue_whose_sample_fails_keeps_its_depth_and_the_others_their_series(
    cache_redis: redis.Redis, queues: list[str]
) -> None:
    broken, fine = queues[:2]
    cache_redis.lpush(broken, stamped(950.0))
    cache_redis.lpush(fine, stamped(990.0))
    watch = exporter.QueueWatch(cache_redis, [broken, fine], clock=lambda: 1000.0)
    sample_one = watch._state

    def failing_for_broken(queue: str, depth: int, tail: bytes | None, now: float) -> exporter.QueueState:
        if queue == broken:
            raise MemoryError("a tail too large to decode")
        return sample_one(queue, depth, tail, now)

    watch._state = failing_for_broken  # type: ignore[method-assign]
    states = watch.sample()

    assert states[broken] == exporter.QueueState(1, None)
    assert states[fine] == exporter.QueueState(1, 990.0)
    assert watch.errors[(broken, "sample_failed")] == 1
