"""Remote control of memq workers: what a broker client may ask of them.

``memq_info`` is an inspect command saying what a worker is (``memq status``), registered at import; it reads only what
the worker already built. ``restrict_remote_control`` refuses every command outside an allow-list, widened by
``MEMQ_REMOTE_CONTROL`` (docs/guarantees.md, "Broadcast channels and remote control").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from memq.client import celery_internals
from memq.core.names import INFO_COMMAND
from memq.core.settings import get_settings
from memq.errors import ConfigError
from memq.workers.plumbing.metrics import REFUSED_CONTROL_COMMANDS
from memq.workers.search.rss_budget import resident_bytes

log = logging.getLogger(__name__)

#: Read-only commands that cannot stall a worker (Celery's and memq's) and the two control commands Flower needs;
#: not ``hello`` (its ``revoked`` map is adopted by every worker) nor ``objgraph``/``memdump`` (they hold a worker).
DEFAULT_ALLOWED_COMMANDS = frozenset(
    {"active", "active_queues", "clock", "conf", "ping", "query_task", "registered", "report", "reserved"}
    | {"revoked", "scheduled", "stats", INFO_COMMAND, "enable_events", "heartbeat"}
)
ALL_COMMANDS = "all"


@inspect_command(name=INFO_COMMAND)
def memq_info(state: Any, **_: Any) -> dict[str, Any]:
    """memq worker kind, queues, pool, in-flight tasks, and the embed model and device."""
    from memq.workers.startup import worker_kind  # (startup imports this module)

    kind = worker_kind()
    settings = get_settings()
    info: dict[str, Any] = {
        "kind": kind,
        "pid": os.getpid(),
        "queues": consumed_queues(state),
        "pool": pool_info(state),
        "active_tasks": len(worker_state.active_requests),
        "reserved_tasks": len(worker_state.reserved_requests),
        "metrics_port": settings.metrics_port,
        "rss_bytes": resident_bytes(),
    }
    if kind == "embed":
        info["model"] = model_info()
    if kind == "search":
        from memq.workers.search.strategies import cache_info, guard_info

        info["matrix_cache"] = cache_info()
        info["memory_guard"] = guard_info()
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
    from memq.workers.embedding.embedder import embedder

    settings = get_settings()
    if not embedder.is_built():
        return {"name": settings.embed_model, "device": settings.embed_device, "dimensions": None, "loaded": False}
    model = embedder.get()
    return {"name": model.model_name, "device": model.device, "dimensions": model.dimensions, "loaded": True}


def check_remote_control(setting: str) -> frozenset[str]:
    """The commands ``setting`` (``MEMQ_REMOTE_CONTROL``: a comma-separated list, or ``all``) allows on a memq
    worker beside the defaults; ``ConfigError`` naming ``MEMQ_REMOTE_CONTROL`` for a name the worker does not have
    (a misspelling, ``ALL``)."""
    known = celery_internals.control_command_names()
    extra = {name.strip() for name in setting.split(",") if name.strip()}
    if ALL_COMMANDS in extra:
        return known
    unknown = sorted(extra - known)
    if unknown:
        raise ConfigError(
            f"MEMQ_REMOTE_CONTROL names unknown command(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return DEFAULT_ALLOWED_COMMANDS | extra


def restrict_remote_control(setting: str) -> list[str]:
    """Replaces each command outside the allowed set by a refusal; returns the refused names."""
    try:
        allowed = check_remote_control(setting)
    except ConfigError as exc:  # `memq worker` refuses to start on it; a worker started otherwise fails closed
        log.error("%s: only the default commands are allowed", exc)
        allowed = DEFAULT_ALLOWED_COMMANDS
    return celery_internals.refuse_control_commands(allowed, _refusal)


def _refusal(name: str) -> Callable[..., dict[str, str]]:
    def refuse(state: Any, **_: Any) -> dict[str, str]:
        REFUSED_CONTROL_COMMANDS.labels(command=name).inc()
        log.warning("refused remote control command %r (allow it with MEMQ_REMOTE_CONTROL)", name)
        return {"error": f"memq: remote control command {name!r} is disabled on this worker (MEMQ_REMOTE_CONTROL)"}

    return refuse
