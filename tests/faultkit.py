"""Test helpers: a private Celery app on a test's own broker; fault injection (pause, stop and restart the
services ``memq.ops.services`` starts, kill a worker)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from memq.ops import services
from memq.ops.services import Service

ROOT = Path(__file__).resolve().parent.parent


def count_stored(collection: Any, query: dict[str, Any]) -> int:
    """Documents matching ``query``, counted from a ``find`` of their ids. On nx-27017 ``count_documents`` runs an
    aggregation that reads the whole collection (about 1 s at 10,000 documents, and the tests poll it); a find by
    ``memory_id`` reads the tenant's documents only (about 0.07 s)."""
    return sum(1 for _ in collection.find(query, {"_id": 1}))


def private_app(broker_url: str, name: str = "memq-test") -> Any:
    """A Celery app configured like memq's on ``broker_url`` (broker and result backend), for pings and raw tasks;
    never the process's current app."""
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    app = Celery(name, set_as_current=False)
    app.config_from_object(celery_config(Settings(broker_url=broker_url, result_backend=broker_url)))
    return app


def memq_cli(
    *args: str | bytes, env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m memq.ops.cli ARGS`` from the repository root (arguments may be bytes: any byte string an operator
    could type); output decoded with undecodable bytes replaced."""
    return subprocess.run(
        [
            os.fsencode(sys.executable),
            b"-m",
            b"memq.ops.cli",
            *(os.fsencode(a) if isinstance(a, str) else a for a in args),
        ],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        cwd=ROOT,
    )


def run_client(env: dict[str, str], code: str, timeout_s: float = 180) -> Any:
    """Run ``code`` in a client process of the fleet ``env`` points at; it prints one JSON value, returned here."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_worker(fleet: services.Fleet, hostname: str, sig: int = signal.SIGKILL) -> None:
    """Signal a worker's whole process group (``kill -9`` by default, mid-task) and wait for it to exit."""
    process = fleet.workers[hostname]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=30)


def pause(process: subprocess.Popen[bytes]) -> None:
    """SIGSTOP: the process keeps its sockets open but answers nothing (a hung or very slow server)."""
    process.send_signal(signal.SIGSTOP)


def resume(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGCONT)


def stop_process(service: Service, timeout_s: float = 10.0) -> None:
    """Stop the service's process and keep its working directory (its data), unlike ``Service.stop``."""
    process = service.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def port_of(url: str) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url!r}")
    return port


def restart_redis_server(service: Service, down_s: float = 0.0) -> Service:
    """Stop a redis-server this process started and start a fresh one on the same port (no persistence:
    what was in it is gone, as after a crash). ``down_s``: how long it stays down in between."""
    port = port_of(service.url)
    stop_process(service)
    if service.workdir:
        shutil.rmtree(service.workdir, ignore_errors=True)
    if down_s > 0:
        time.sleep(down_s)
    return services.start_redis_server(port)
