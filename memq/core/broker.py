"""Which broker a URL names, and memq's RabbitMQ topology as data: queues, dead-letter exchange and queue, policy.

One definition, read by the Celery configuration (``memq.config.celery``), by ``memq broker setup``
(``memq.ops.broker_setup``), by the worker's dead-lettering on AMQP (``memq.workers.plumbing.amqp_poison_guard``) and by
the
docker-compose and Kubernetes files (``deploy/rabbitmq/definitions.json``, checked by tests/test_compose.py and
tests/test_deploy.py against ``definitions``).

- Task queues are quorum queues (replicated by Raft; durable; messages persistent). Their only queue argument is
  ``x-queue-type``: everything that may change later (the delivery limit, the dead-letter exchange and strategy)
  is in the policy ``memq-task-queues``, because RabbitMQ refuses (406 PRECONDITION_FAILED) to declare an existing
  queue again with other arguments, so a changed argument would stop every worker at start.
- The policy's ``delivery-limit`` is the broker's backstop, above memq's own limit (``MEMQ_MAX_DELIVERIES``, which
  counts only the deliveries that *started* running): RabbitMQ 3.x counts every return of a message, the ones a
  crashed consumer had only prefetched included, so a limit as low as memq's would dead-letter innocent messages.
- Each queue has its own topic exchange of the same name (``exchange_type``).
- Dead letters go to the fanout exchange ``memq.dead`` and wait in the quorum queue ``memq.dead``
  (``at-least-once`` dead-lettering, which needs ``overflow: reject-publish``). The same exchange copies each one
  to ``memq.dead.watch``, which every worker consumes (``memq.workers.plumbing.dead_letter_watch``): a message the
  broker
  itself dead-lettered fails its caller at once, while its letter stays in ``memq.dead`` for ``memq dead-letters``.

Import-light: no Celery, no kombu.
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
#: Celery's own names: remote control (the ``celery.pidbox`` and ``reply.celery.pidbox`` exchanges, each worker's
#: and each caller's pidbox queue), events (``celeryev``, each worker's ``celeryev.<uuid>``), and native delayed
#: delivery (``celery_delayed_*``, declared by each worker at start).
CELERY_NAMES = r"celery\.pidbox|reply\.celery\.pidbox|.+\.celery\.pidbox|celeryev|celeryev\..+|celery_delayed_.+"


def _only(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


#: RabbitMQ permissions (configure, write, read: regular expressions over exchange and queue names; an exchange and
#: a queue of the same name share them) per role, all in memq's own virtual host (docs/operations.md, "Broker users
#: per role"; ``memq broker permissions`` prints them as ``rabbitmqctl`` commands).
#: - ``web``: publishes memq's requests to its task exchanges, nothing else: RabbitMQ itself refuses it a
#:   remote-control broadcast (``celery.pidbox``), consuming, purging or declaring anything.
#: - ``<kind>-worker``: consumes (and so may purge) its own kind's queues and ``memq.dead.watch`` only; publishes
#:   chain and chord steps to any task exchange, dead letters to ``memq.dead``, and Celery's remote-control replies,
#:   events and delayed retries; declares and deletes only Celery's own names, never a task queue or a dead letter.
#: - ``operator``: ``memq broker setup`` (declares memq's names), ``memq dead-letters`` (reads, purges and replays
#:   through the default exchange ``amq.default``), ``memq status`` (remote control): memq's names only.
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
    """Each queue's exchange: ``topic`` on RabbitMQ, where Celery's native delayed delivery (the countdown of a
    retry, on quorum queues) routes only through topic exchanges (on a direct one the worker would hold a delayed
    message in its prefetch until its time); ``direct`` on Redis, as before. The routing key is the queue's name,
    which a topic binding of the same name matches exactly."""
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
    """Every task queue memq uses with ``search_shards`` shards."""
    shards = [sharding.shard_queue(shard) for shard in range(search_shards)] if search_shards > 1 else []
    return [*names.QUEUES, *shards]


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

    def exchange(name: str, kind: str) -> dict[str, Any]:
        return {"name": name, "vhost": vhost, "type": kind, "durable": True, "auto_delete": False, "internal": False}

    def queue(name: str) -> dict[str, Any]:
        return {"name": name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": dict(QUORUM)}

    def binding(source: str, destination: str, key: str) -> dict[str, Any]:
        return {
            "source": source,
            "vhost": vhost,
            "destination": destination,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

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
