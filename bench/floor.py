"""The floor a retrieval can reach on a fleet: the retrieval canvas's shape with a real embedding (memq's embed
worker) and no-op searches and merge. The no-ops are the benchmark's own: their own Celery app, task name and
queues, served by a worker this module starts (``start_floor_worker``); no production worker knows them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from celery import Celery, chain, chord
from celery.canvas import Signature
from kombu import Exchange, Queue

from memq.client.app import app
from memq.config.celery import celery_config
from memq.core import names
from memq.core.settings import get_settings
from memq.core.wire import RetrievalRequest
from memq.ops import services

NOOP = "bench.floor.noop"
FLOOR_QUEUE = "bench.floor"
#: A second queue, for a no-op in the embed step's place (bench.canvas_shapes).
FLOOR_EMBED_QUEUE = "bench.floor.embed"
THREADS = ("--pool", "threads", "--concurrency", "8")


def _config() -> dict[str, Any]:
    """memq's Celery configuration (broker, results, JSON only), with the benchmark's queues instead of memq's."""
    queues = tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (FLOOR_QUEUE, FLOOR_EMBED_QUEUE)
    )
    config = {name: value for name, value in celery_config(get_settings()).items() if name != "worker_consumer"}
    return config | {
        "task_queues": queues,
        "task_default_queue": FLOOR_QUEUE,
        "task_default_exchange": FLOOR_QUEUE,
        "task_default_routing_key": FLOOR_QUEUE,
        "task_routes": {NOOP: {"queue": FLOOR_QUEUE}},
    }


floor_app = Celery("memq-floor", config_source=_config())


@floor_app.task(name=NOOP)
def noop(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Returns at once; stands in for a search or merge step."""
    return {"type": args[1] if len(args) > 1 else None, "items": [], "search_ms": 0.0}


def noop_signature(*args: Any, queue: str = FLOOR_QUEUE) -> Signature:
    return floor_app.signature(NOOP, args=args, queue=queue)


def floor_canvas(request: RetrievalRequest) -> Signature:
    """The retrieval canvas's shape with a real embedding and no-op searches and merge: the floor a
    retrieval can reach on this fleet (broker hops, chord bookkeeping, one forward pass)."""
    noops = [noop_signature(request["memory_id"], memory_type) for memory_type in request["limits"]]
    embed = app.signature(names.EMBED_QUERY, args=(request["query"],), queue=names.EMBED_QUEUE)
    return chain(embed, chord(noops, noop_signature()))


def start_floor_worker(
    fleet: services.Fleet,
    name: str = "floor",
    queues: Sequence[str] = (FLOOR_QUEUE,),
    pool_args: Sequence[str] = THREADS,
) -> str:
    """A worker of the floor app on ``queues``, in ``fleet`` (``fleet.wait_ready`` and ``stop_all`` see it)."""
    hostname = f"{name}@memq-{os.getpid()}"
    command = [sys.executable, "-m", "celery", "-A", f"{__name__}:floor_app", "worker", "-n", hostname]
    with open(os.path.join(fleet.logdir, f"{name}.log"), "ab") as log:
        fleet.workers[hostname] = subprocess.Popen(
            [*command, "-Q", ",".join(queues), "--loglevel", "INFO", *pool_args],
            env=fleet.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return hostname
