"""Test helpers for RabbitMQ: a private virtual host per test run on this machine's broker (``rabbitmqctl``), made
and deleted by the tests, and whether a broker answers at all (the RabbitMQ tests are skipped, naming it, if not).

``MEMQ_TEST_RABBITMQ_URL`` names the broker (default ``amqp://guest:guest@127.0.0.1:5672``, without a vhost)."""

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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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


def add_role_user(vhost: str, role: str, users: list[str]) -> str:
    """A new broker user with ``role``'s permissions in ``vhost`` (``memq.core.broker.ROLE_PERMISSIONS``), appended to
    ``users`` (the caller deletes them); its URL."""
    from memq.core import broker

    user, password = f"memq-{role}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    ctl("add_user", user, password)
    users.append(user)
    ctl("set_permissions", "-p", vhost, user, *broker.ROLE_PERMISSIONS[role])
    return vhost_url(vhost, user, password)


def setup_topology(env: dict[str, str], *extra: str, rabbitmqctl: str = "rabbitmqctl") -> str:
    """``memq broker setup`` on the broker ``env`` names, the policy applied with ``rabbitmqctl``; its output."""
    command = [sys.executable, "-m", "memq.ops.cli", "broker", "setup", "--rabbitmqctl", rabbitmqctl, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CTL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"memq broker setup failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class Node:
    """A RabbitMQ node of a test's own (``rabbitmq-server`` with its own node name, ports and data directory),
    never the shared one on 5672: a test may stop, kill and restart it."""

    name: str
    port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None
    cluster_with: str | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        base = str(self.base)
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 10_000),
            "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq",
            "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{base}/log",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
            "RABBITMQ_PID_FILE": f"{base}/pid",
            "RABBITMQ_FEATURE_FLAGS_FILE": f"{base}/feature_flags",
            "RABBITMQ_PLUGINS_EXPAND_DIR": f"{base}/plugins-expand",
        }

    def start(self, timeout_s: float = 90.0) -> None:
        if not (self.base / "rabbitmq.conf").exists():
            self.base.mkdir(parents=True, exist_ok=True)
            conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
            (self.base / "rabbitmq.conf").write_text(conf)
            (self.base / "enabled_plugins").write_text("[].\n")
            shutil.chown(self.base, "rabbitmq", "rabbitmq")  # the server drops to the rabbitmq user
            for path in self.base.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        log = open(self.base.parent / f"{self.name}.out", "ab")  # noqa: SIM115 (the server keeps it)
        self.process = subprocess.Popen(
            ["rabbitmq-server"], env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server {self.name} exited with {self.process.returncode}")
            done = subprocess.run(["rabbitmqctl", "-n", self.name, "await_startup"], capture_output=True, timeout=60)
            if done.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"rabbitmq-server {self.name} did not start within {timeout_s:g} s")

    def stop(self) -> None:
        """A clean stop (``rabbitmqctl stop``), its data kept."""
        if self.process is not None and self.process.poll() is None:
            subprocess.run(["rabbitmqctl", "-n", self.name, "stop"], capture_output=True, timeout=120)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
            if self.process.poll() is None:
                self.kill()

    def vm_pid(self) -> int | None:
        """The node's Erlang VM (the server drops to the rabbitmq user in a session of its own, so signalling the
        wrapper's process group does not reach it)."""
        try:
            return int((self.base / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """``kill -9`` of the node's Erlang VM, then of what started it."""
        vm = self.vm_pid()
        if vm is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{vm}").exists() and not _is_zombie(vm):
                time.sleep(0.1)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def ctl_command(self) -> str:
        """An executable that is ``rabbitmqctl -n <this node>`` (for ``memq broker setup --rabbitmqctl``)."""
        path = self.base.parent / "rabbitmqctl"
        path.write_text(f'#!/bin/sh\nexec rabbitmqctl -n {self.name} "$@"\n')
        path.chmod(0o755)
        return str(path)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.base.parent, ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def own_node(port: int | None = None, prefix: str = "memqtest") -> Node:
    """A fresh node on free ports, its data in a new temporary directory (not started)."""
    from memq.ops import services

    port = port or free_port_pair(services.free_port)
    parent = Path(tempfile.mkdtemp(prefix="memq-rabbitmq-"))
    parent.chmod(0o755)  # the server runs as the rabbitmq user
    base = parent / "node"
    return Node(f"{prefix}{port}@localhost", port, base)


def free_port_pair(free_port: Callable[[], int]) -> int:
    """A free port whose +10,000 (the node's distribution port) is free too."""
    for _ in range(100):
        port = free_port()
        if port < 55_000:
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 10_000))
                return port
    raise RuntimeError("no free pair of ports for a RabbitMQ node")


def start_cluster(nodes: list[Node]) -> None:
    """Starts ``nodes`` and joins each to the first: one cluster."""
    nodes[0].start()
    for node in nodes[1:]:
        node.start()
        ctl("stop_app", node=node.name)
        ctl("join_cluster", nodes[0].name, node=node.name)
        ctl("start_app", node=node.name)
