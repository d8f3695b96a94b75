"""Which broker a URL names, and memq's RabbitMQ topology as data: queues, dead-letter exchange and queue, policy,
each role's permissions.

One definition, read by the Celery configuration, ``memq broker setup``, the worker's dead-lettering on AMQP and the
deployment files (``deploy/rabbitmq/definitions.json``, checked against ``definitions``). Why it is so (quorum
queues, the delivery limit in a policy above ``MEMQ_MAX_DELIVERIES``, the watched dead letters): README, "Choosing a
broker", and docs/guarantees.md. Import-light: no Celery, no kombu.
"""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlsplit

from memq.core import names, sharding

AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
URL_SEPARATOR = ";"  # kombu's: ``amqp://a//;amqp://b//`` is a list of nodes tried in turn (failover)
QUORUM = {"x-queue-type": "quorum"}
DEAD_LETTER_EXCHANGE = "memq.dead"
DEAD_LETTER_QUEUE = "memq.dead"
DEAD_LETTER_WATCH_QUEUE = "memq.dead.watch"
POLICY_NAME = "memq-task-queues"
DEFAULT_DELIVERY_LIMIT = 20
POLICY_PRIORITY = 10


#: memq's task queues, each with its exchange of the same name (``names.is_memq_queue``'s queues).
TASK_NAMES = r"embed|search|ingest|search\.[0-9]{1,4}"
POLICY_PATTERN = rf"^({TASK_NAMES})$"
#: What each worker kind consumes.
KIND_QUEUES = {"embed": r"embed", "search": r"search|search\.[0-9]{1,4}", "ingest": r"ingest"}
DEAD_NAMES = r"memq\.dead|memq\.dead\.watch"
#: Celery's own names: remote control (pidbox exchanges, each worker's and caller's pidbox queue), events
#: (``celeryev``, each worker's ``celeryev.<uuid>``), native delayed delivery (declared by each worker at start).
CELERY_NAMES = r"celery\.pidbox|reply\.celery\.pidbox|.+\.celery\.pidbox|celeryev|celeryev\..+|celery_delayed_.+"


def _only(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


#: RabbitMQ permissions (configure, write, read) per role: docs/operations.md, "Broker users per role".
ROLE_PERMISSIONS: dict[str, tuple[str, str, str]] = {
    "web": ("^$", POLICY_PATTERN, "^$"),
    **{
        f"{kind}-worker": (
            _only(CELERY_NAMES),
            _only(TASK_NAMES, r"memq\.dead", CELERY_NAMES),
            _only(queues, r"memq\.dead\.watch", CELERY_NAMES),
        )
        for kind, queues in KIND_QUEUES.items()
    },
    "operator": (
        _only(TASK_NAMES, DEAD_NAMES, CELERY_NAMES),
        _only(TASK_NAMES, DEAD_NAMES, CELERY_NAMES, r"amq\.default"),
        _only(TASK_NAMES, DEAD_NAMES, CELERY_NAMES),
    ),
}


def permission_commands(vhost: str) -> list[str]:
    """``rabbitmqctl set_permissions`` for each role's user (``memq-<role>``) in ``vhost``."""
    return [
        shlex.join(["rabbitmqctl", "set_permissions", "-p", vhost, f"memq-{role}", *permissions])
        for role, permissions in ROLE_PERMISSIONS.items()
    ]


def exchange_type(amqp: bool) -> str:
    """Each queue's exchange: ``topic`` on RabbitMQ (Celery's native delayed delivery, a retry's countdown on quorum
    queues, routes only through topic exchanges), ``direct`` on Redis; the routing key is the queue's name."""
    return "topic" if amqp else "direct"


def broker_urls(url: str) -> list[str]:
    """The nodes of a broker URL, in the order they are tried."""
    return [part.strip() for part in url.split(URL_SEPARATOR) if part.strip()]


def is_amqp(url: str) -> bool:
    """Whether ``url`` (or the first node of a list) names a RabbitMQ broker."""
    urls = broker_urls(url)
    return bool(urls) and urlsplit(urls[0]).scheme in AMQP_SCHEMES


def vhost_of(url: str) -> str:
    """The virtual host of an AMQP URL (``amqp://host:5672/memq`` -> ``memq``; none or ``//`` -> ``/``)."""
    path = urlsplit(broker_urls(url)[0]).path
    return path[1:] if len(path) > 1 else "/"


def task_queues(search_shards: int) -> list[str]:
    """Every task queue memq uses with ``search_shards`` shards (``search`` always: merge runs there)."""
    return [*names.QUEUES, *(sharding.search_queues(search_shards) if search_shards > 1 else [])]


def policy(delivery_limit: int) -> dict[str, Any]:
    """The policy's definition (what ``rabbitmqctl set_policy`` and the definitions file carry)."""
    return {
        "delivery-limit": delivery_limit,
        "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "dead-letter-strategy": "at-least-once",
        "overflow": "reject-publish",
    }


def definitions(vhost: str, search_shards: int, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, Any]:
    """RabbitMQ's definitions format (``load_definitions``, the management API's import): the same topology
    ``memq broker setup`` declares."""
    queues = task_queues(search_shards)
    durable = {"vhost": vhost, "durable": True, "auto_delete": False}
    to_queue = {"vhost": vhost, "destination_type": "queue"}

    def exchange(name: str, kind: str) -> dict[str, Any]:
        return {"name": name, "type": kind, "internal": False, **durable}

    def queue(name: str) -> dict[str, Any]:
        return {"name": name, "arguments": dict(QUORUM), **durable}

    def binding(source: str, destination: str, key: str) -> dict[str, Any]:
        return {"source": source, "destination": destination, "routing_key": key, "arguments": {}, **to_queue}

    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            *(exchange(name, exchange_type(amqp=True)) for name in queues),
            exchange(DEAD_LETTER_EXCHANGE, "fanout"),
        ],
        "queues": [*(queue(name) for name in queues), queue(DEAD_LETTER_QUEUE), queue(DEAD_LETTER_WATCH_QUEUE)],
        "bindings": [
            *(binding(name, name, name) for name in queues),
            binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, ""),
            binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_WATCH_QUEUE, ""),
        ],
        "policies": [
            {
                "vhost": vhost,
                "name": POLICY_NAME,
                "pattern": POLICY_PATTERN,
                "apply-to": "queues",
                "priority": POLICY_PRIORITY,
                "definition": policy(delivery_limit),
            }
        ],
    }
