"""``memq_info``: a Celery inspect command that says what a worker is (``memq status`` asks every worker).

Registered at import (``memq.workers.startup`` imports this module, so every worker has it). It reads only
what the worker already built: an embed worker that has not loaded its model yet says so instead of
loading it inside a control message.
"""

from __future__ import annotations

import os
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from memq.names import INFO_COMMAND, WORKER_KIND_ENV
from memq.settings import get_settings


@inspect_command(name=INFO_COMMAND)
def memq_info(state: Any, **_: Any) -> dict[str, Any]:
    """memq worker kind, queues, pool, in-flight tasks, and the embed model and device."""
    kind = os.environ.get(WORKER_KIND_ENV, "")
    settings = get_settings()
    info: dict[str, Any] = {
        "kind": kind,
        "pid": os.getpid(),
        "queues": consumed_queues(state),
        "pool": pool_info(state),
        "active_tasks": len(worker_state.active_requests),
        "reserved_tasks": len(worker_state.reserved_requests),
        "metrics_port": settings.metrics_port,
    }
    if kind == "embed":
        info["model"] = model_info()
    if kind == "search":
        from memq.workers.search import cache_info

        info["matrix_cache"] = cache_info()
    return info


def consumed_queues(state: Any) -> list[str]:
    task_consumer = getattr(state.consumer, "task_consumer", None)
    if task_consumer is None:
        return []
    return sorted(queue.name for queue in task_consumer.queues)


def pool_info(state: Any) -> dict[str, Any]:
    pool = getattr(state.consumer, "pool", None)
    if pool is None:
        return {}
    return {"implementation": type(pool).__module__.rsplit(".", 1)[-1], "concurrency": int(pool.num_processes or 0)}


def model_info() -> dict[str, Any]:
    from memq.workers.embedder import embedder

    settings = get_settings()
    if not embedder.is_built():
        return {"name": settings.embed_model, "device": settings.embed_device, "dimensions": None, "loaded": False}
    model = embedder.get()
    return {"name": model.model_name, "device": model.device, "dimensions": model.dimensions, "loaded": True}
