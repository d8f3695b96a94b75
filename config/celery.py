"""Celery configuration derived from ``Settings``: queues, routes, JSON only, Redis results, events."""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from memq.core import broker, deadlines, names
from memq.core.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only, in both directions: a pickle message is refused by every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_queues": task_queues(settings),
        "task_default_queue": names.SEARCH_QUEUE,
        "task_default_exchange": names.SEARCH_QUEUE,
        "task_default_routing_key": names.SEARCH_QUEUE,
        "task_routes": {name: {"queue": queue} for name, queue in names.ROUTES.items()},
        # Short, idempotent tasks: ack after running so a killed worker's task is redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 4,
        "broker_transport_options": broker_transport_options(settings),
        "result_expires": settings.result_expires_s,
        # How long Celery's own result consumer retries a lost result store. memq's client waits on its own
        # connection (memq.client.waiting), so in a web process this only bounds what sending a chord costs while the
        # store is down (Celery subscribes each step it freezes); workers, which store results, keep longer.
        "result_backend_transport_options": {
            "retry_policy": {
                "timeout": deadlines.CLIENT_RESULT_RETRY_S,
                "interval_start": 0,
                "interval_step": 0.05,
                "interval_max": 0.1,
            }
        },
        "redis_socket_timeout": deadlines.CLIENT_SOCKET_TIMEOUT_S,
        "redis_socket_connect_timeout": deadlines.CLIENT_SOCKET_TIMEOUT_S,
        "broker_connection_retry_on_startup": True,
        # Flower sees every task, including when it was sent.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": False,
        # Every task message passes memq's guard first: a malformed one is dead-lettered, never fatal. A web
        # process never builds a consumer, so it never imports this.
        "worker_consumer": "memq.workers.plumbing.poison_guard:GuardedConsumer",
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        **(amqp_config() if broker.is_amqp(settings.broker_url) else {}),
    }


def task_queues(settings: Settings) -> tuple[Queue, ...]:
    """memq's queues. On RabbitMQ: quorum queues (the rest is the broker's policy) behind topic exchanges (for native
    delayed delivery), declared only by ``memq broker setup``: a web app's broker user needs no ``configure``."""
    if not broker.is_amqp(settings.broker_url):
        return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names.QUEUES)
    return tuple(
        Queue(
            name,
            Exchange(name, type=broker.exchange_type(amqp=True), no_declare=True),
            routing_key=name,
            queue_arguments=dict(broker.QUORUM),
            no_declare=True,
        )
        for name in broker.task_queues(settings.search_shards)
    )


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if broker.is_amqp(settings.broker_url):
        # Every publish waits for the broker's confirm: a message the broker did not take raises in the publisher.
        return {"confirm_publish": True}
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_timeout": deadlines.CLIENT_SOCKET_TIMEOUT_S,  # a publish to a paused broker fails instead of hanging
        "socket_connect_timeout": deadlines.CLIENT_SOCKET_TIMEOUT_S,
    }


def amqp_config() -> dict[str, Any]:
    """RabbitMQ: persistent messages, the nodes of the URL tried in turn, a dead consumer noticed by its heartbeat,
    per-consumer prefetch (quorum queues have no global QoS; Celery detects them and counts per consumer)."""
    return {
        "task_default_delivery_mode": "persistent",
        "broker_failover_strategy": "round-robin",
        "broker_heartbeat": deadlines.AMQP_HEARTBEAT_S,
        "broker_connection_timeout": deadlines.AMQP_CONNECT_TIMEOUT_S,
        "worker_detect_quorum_queues": True,
        # A search shard's queue (``search.<n>``) is made when first used: a quorum queue too.
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": broker.exchange_type(amqp=True),
    }


def worker_overrides(settings: Settings) -> dict[str, Any]:
    """What a worker process changes (``memq worker``): it stores results and holds long-lived connections, so it
    waits longer for a slow Redis than a web process's call may."""
    return {
        "broker_transport_options": (
            broker_transport_options(settings)
            if broker.is_amqp(settings.broker_url)
            else {"visibility_timeout": settings.visibility_timeout_s}
        ),
        "result_backend_transport_options": {"retry_policy": {"timeout": deadlines.WORKER_RESULT_RETRY_S}},
        "redis_socket_timeout": deadlines.WORKER_SOCKET_TIMEOUT_S,
        "redis_socket_connect_timeout": deadlines.WORKER_CONNECT_TIMEOUT_S,
    }
