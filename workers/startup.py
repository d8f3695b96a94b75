"""Worker start-up: each worker kind builds its own process resources before taking tasks.

``memq worker KIND`` sets the kind (``set_kind``) before Celery starts. Resources are built at ``worker_init`` with the
threads or solo pool, and in each child at ``worker_process_init`` with prefork (nothing heavy crosses a fork).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_shutdown

from memq.core.settings import get_settings
from memq.workers.plumbing import metrics
from memq.workers.plumbing.remote_control import restrict_remote_control  # (also registers memq_info)

log = logging.getLogger(__name__)
_kind = ""  # embed, search or ingest in a worker started by `memq worker`; the children of a prefork pool inherit it


def set_kind(kind: str) -> None:
    global _kind
    _kind = kind


def worker_kind() -> str:
    return _kind


def build_resources(kind: str) -> None:
    if kind == "embed":
        from memq.workers.embedding.embedder import embedder

        model = embedder.get()
        log.info("embed worker: model %s on %s", model.model_name, model.device)
    elif kind in ("search", "ingest"):
        from memq.client.cache_redis import cache_redis
        from memq.workers.storage.mongo import mongo_client

        mongo_client.get()
        cache_redis.get()


def _forks_children(sender: Any) -> bool:
    pool = getattr(sender, "pool_cls", None)
    name = getattr(pool, "__module__", str(pool)) if pool is not None else ""
    return "prefork" in name or "processes" in name


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    if not _kind:
        return
    refused = restrict_remote_control(get_settings().remote_control)
    log.info("remote control: refusing %s (MEMQ_REMOTE_CONTROL)", ", ".join(refused) or "nothing")
    metrics.serve(get_settings().metrics_port)
    if not _forks_children(sender):
        build_resources(_kind)


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    build_resources(_kind)  # (nothing for a process not started by `memq worker`)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    from memq.workers.embedding.embedder import embedder
    from memq.workers.storage.mongo import mongo_client

    embedder.reset()  # the batcher finishes the queries already queued, then stops
    mongo_client.reset()
