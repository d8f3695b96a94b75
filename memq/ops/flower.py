"""``memq flower``: Flower on the memq Celery app, with basic auth from ``MEMQ_FLOWER_BASIC_AUTH``.

The credentials reach Flower through its own ``FLOWER_BASIC_AUTH`` variable, never the command line,
so they do not show in ``ps``. Flower refuses its HTTP API without authentication, and memq refuses to
start it without credentials. ``/metrics`` (Prometheus) and ``/healthcheck`` are not authenticated by
Flower: keep its port on the internal network.
"""

from __future__ import annotations

import os

from memq.core.settings import get_settings
from memq.errors import ConfigError

DEFAULT_PORT = 5555


def basic_auth_from_settings() -> str:
    credentials = get_settings().flower_basic_auth
    for pair in credentials.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise ConfigError("MEMQ_FLOWER_BASIC_AUTH must be set to user:password (comma-separated for several)")
    return credentials


def flower_argv(port: int, address: str) -> list[str]:
    return ["flower", f"--port={port}", f"--address={address}"]


def run_flower(port: int = DEFAULT_PORT, address: str = "0.0.0.0") -> int:
    """Runs until SIGTERM/SIGINT, like ``celery -A memq.client.app flower --basic-auth=...``."""
    os.environ["FLOWER_BASIC_AUTH"] = basic_auth_from_settings()
    from memq.client.app import app

    return int(app.start(flower_argv(port, address)) or 0)
