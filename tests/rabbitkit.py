"""Test helpers for RabbitMQ: a private virtual host per test run on this machine's broker (``rabbitmqctl``), made
and deleted by the tests, and whether a broker answers at all (the RabbitMQ tests are skipped, naming it, if not).

``MEMQ_TEST_RABBITMQ_URL`` names the broker (default ``amqp://guest:guest@127.0.0.1:5672``, without a vhost)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit

RABBITMQ_URL = os.environ.get("MEMQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
CTL_TIMEOUT_S = 60


def wanted() -> bool:
    """Whether this run's broker is RabbitMQ (``MEMQ_TEST_BROKER=rabbitmq``, as ``scripts/test_rabbitmq.sh`` sets)."""
    return os.environ.get("MEMQ_TEST_BROKER", "redis") == "rabbitmq"


def missing() -> str | None:
    """Why the RabbitMQ tests cannot run here (``None``: they can)."""
    parts = urlsplit(RABBITMQ_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            pass
    except OSError:
        return f"RabbitMQ is not reachable at {parts.hostname}:{parts.port or 5672} (MEMQ_TEST_RABBITMQ_URL)"
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl (RabbitMQ's CLI) is not on PATH: the tests make their own virtual hosts with it"
    return None


def ctl(*args: str, node: str | None = None) -> str:
    command = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CTL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def vhost_url(vhost: str, user: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(RABBITMQ_URL)
    credentials = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
    netloc = credentials + parts.netloc.rpartition("@")[2] if user else parts.netloc
    return f"{parts.scheme}://{netloc}/{quote(vhost, safe='')}"


def open_vhost(prefix: str = "memq-test") -> str:
    """A fresh virtual host, the broker's default user allowed everything in it."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, urlsplit(RABBITMQ_URL).username or "guest", ".*", ".*", ".*")
    return vhost


def close_vhost(vhost: str) -> None:
    """Deletes the virtual host with all it holds."""
    ctl("delete_vhost", vhost)


@contextmanager
def private_vhost(prefix: str = "memq-test") -> Iterator[str]:
    """``open_vhost``, deleted when the block ends. Yields its name."""
    vhost = open_vhost(prefix)
    try:
        yield vhost
    finally:
        close_vhost(vhost)


def setup_topology(env: dict[str, str], *extra: str) -> str:
    """``memq broker setup`` on the broker ``env`` names, the policy applied with rabbitmqctl; its output."""
    command = [sys.executable, "-m", "memq.cli", "broker", "setup", "--rabbitmqctl", "rabbitmqctl", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CTL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"memq broker setup failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout
