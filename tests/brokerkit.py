"""What a test does to the broker directly, on either broker, so one test body runs on both: publish a raw task
message as a hostile or buggy producer would, read a queue's depth and the messages held unacknowledged, read and
clear the dead letters. ``probe_for(env)`` picks the broker the environment names."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import rabbitkit
import redis
from kombu import Connection
from kombu.exceptions import ChannelError

from memq.core import broker, keys


class BrokerProbe(Protocol):
    name: str

    def publish(self, queue: str, headers: Any, body: bytes, content_type: str = "application/json") -> None: ...

    def depth(self, queue: str) -> int: ...

    def unacked(self, queue: str) -> int: ...

    def dead_letters(self) -> list[dict[str, Any]]: ...

    def clear_dead_letters(self) -> None: ...

    def plant_letter(self, queue: str, headers: Any, body: bytes, shown_queue: str | None = None) -> str: ...


def envelope(queue: str, headers: Any, body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """What kombu's Redis transport pushes onto a queue's list."""
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def redis_unacked(client: redis.Redis, queue: str) -> int:
    """Messages of ``queue`` a worker holds unacknowledged (kombu's Redis transport keeps them in a hash)."""
    held = client.hvals("unacked")
    return sum(1 for raw in held if json.loads(raw)[2] == queue) if held else 0


class RedisProbe:
    name = "redis"

    def __init__(self, broker_url: str, cache_url: str) -> None:
        self.client = redis.Redis.from_url(broker_url)
        self.cache = redis.Redis.from_url(cache_url)

    def publish(self, queue: str, headers: Any, body: bytes, content_type: str = "application/json") -> None:
        self.publish_raw(queue, envelope(queue, headers, body, content_type))

    def publish_raw(self, queue: str, message: dict[str, Any] | str) -> None:
        self.client.lpush(queue, message if isinstance(message, str) else json.dumps(message))

    def depth(self, queue: str) -> int:
        return int(self.client.llen(queue))

    def unacked(self, queue: str) -> int:
        return redis_unacked(self.client, queue)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.cache.lrange(keys.DEAD_LETTERS, 0, -1)]

    def clear_dead_letters(self) -> None:
        self.cache.delete(keys.DEAD_LETTERS)

    def plant_letter(self, queue: str, headers: Any, body: bytes, shown_queue: str | None = None) -> str:
        """A letter as a worker records it, its kept message naming ``queue`` (its short record ``shown_queue``)."""
        stored = {
            "queue": queue,
            "headers": headers,
            "body": base64.b64encode(body).decode(),
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "properties": {},
        }
        return self.plant_stored(json.dumps(stored), shown_queue or queue)

    def plant_stored(self, stored: str, shown_queue: str = "search") -> str:
        """A letter whose kept message is ``stored``, whatever it holds."""
        from memq.workers.plumbing.poison_guard import Problem, entry, record

        letter = entry(shown_queue, Problem("too_many_deliveries", "planted by a test"), {}, b"")
        record(self.cache, letter, 1000, stored)
        return str(letter["id"])


class AmqpProbe:
    name = "rabbitmq"

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self.vhost = broker.vhost_of(broker_url)

    def publish(self, queue: str, headers: Any, body: bytes, content_type: str = "application/json") -> None:
        with Connection(self.url, transport_options={"confirm_publish": True}) as connection:
            connection.Producer().publish(
                body,
                exchange="",
                routing_key=queue,
                headers=headers if isinstance(headers, dict) else {"not_a_table": str(headers)},
                content_type=content_type,
                content_encoding="utf-8",
                delivery_mode=2,
            )

    def _counts(self, queue: str) -> tuple[int, int]:
        for line in rabbitkit.ctl(
            "list_queues", "-q", "-p", self.vhost, "name", "messages_ready", "messages_unacknowledged"
        ).splitlines():
            name, ready, unacked = [*line.split("\t"), "0", "0"][:3]
            if name == queue and ready.isdigit():
                return int(ready), int(unacked)
        return 0, 0

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (a passive declare: no rabbitmqctl round trip)."""
        with Connection(self.url) as connection:
            try:
                return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:
                return 0

    def unacked(self, queue: str) -> int:
        return self._counts(queue)[1]

    def dead_letters(self) -> list[dict[str, Any]]:
        from memq.ops import dead_letters

        return [letter.fields for letter in dead_letters.listed(100_000, self.url)]

    def clear_dead_letters(self) -> None:
        from memq.ops import dead_letters

        dead_letters.purge_all(self.url)

    def plant_letter(self, queue: str, headers: Any, body: bytes, shown_queue: str | None = None) -> str:
        """A letter as a memq worker publishes it to the dead-letter exchange (the broker holds one record: the
        message itself, so there is no separate ``shown_queue``)."""
        letter_id = uuid.uuid4().hex
        dead = {"memq_dead_id": letter_id, "memq_dead_queue": queue, "memq_dead_reason": "too_many_deliveries"}
        with Connection(self.url, transport_options={"confirm_publish": True}) as connection:
            connection.Producer().publish(
                body,
                exchange=broker.DEAD_LETTER_EXCHANGE,
                routing_key=queue,
                headers={**(headers if isinstance(headers, dict) else {}), **dead, "memq_dead_at": time.time()},
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )
        return letter_id


def probe_for(env: Mapping[str, str]) -> RedisProbe | AmqpProbe:
    url = env["MEMQ_BROKER_URL"]
    if broker.is_amqp(url):
        return AmqpProbe(url)
    return RedisProbe(url, env.get("MEMQ_REDIS_URL") or url)
