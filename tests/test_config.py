"""A bad ``MEMQ_*`` value stops a worker at start and a client's first call, naming the variable (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BAD_VALUES = [
    ("MEMQ_RETRIEVE_TIMEOUT_S", "0"),
    ("MEMQ_RECENCY_HALF_LIFE_S", "nan"),
    ("MEMQ_EMBED_DEVICE", "tpu"),
]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
@pytest.mark.parametrize("kind", ["search", "embed"])
def test_a_worker_with_a_bad_setting_exits_2_at_start_naming_the_variable(kind: str, variable: str, value: str) -> None:
    started = run(
        [sys.executable, "-m", "memq.ops.cli", "worker", kind, "-n", f"{kind}-bad@config-test"], **{variable: value}
    )

    assert started.returncode == 2
    assert f"memq: error: {variable} must be " in started.stderr
    assert "Traceback" not in started.stderr
    assert "ready" not in started.stderr + started.stdout


@pytest.mark.parametrize(
    ("kind", "variable", "replacement"),
    [
        ("search", "MEMQ_EXACT_CACHE_MAX_BYTES", "MEMQ_SEARCH_MAX_RSS_BYTES"),
        ("search", "MEMQ_MONGODB_POOL_SIZE", "`maxPoolSize` in MEMQ_MONGODB_URI"),
        ("search", "MEMQ_EXACT_LOADS_IN_FLIGHT", "now a constant of the code"),
        ("embed", "MEMQ_EMBED_DIMENSIONS", "taken from the embed model's vectors"),
        ("embed", "MEMQ_EMBED_BATCH_SIZE", "now a constant of the code"),
        ("ingest", "MEMQ_MAX_BATCH_ITEMS", "now a constant of the code"),
        ("ingest", "MEMQ_RESULT_EXPIRES_S", "MEMQ_VISIBILITY_TIMEOUT_S"),
    ],
)
def test_a_worker_started_with_a_removed_setting_exits_2_naming_what_replaced_it(
    kind: str, variable: str, replacement: str
) -> None:
    started = run(
        [sys.executable, "-m", "memq.ops.cli", "worker", kind, "-n", f"{kind}-removed@config-test"], **{variable: "1"}
    )

    assert started.returncode == 2
    assert f"memq: error: {variable} was removed: " in started.stderr
    assert replacement in started.stderr and "Traceback" not in started.stderr


def test_a_device_given_on_the_command_line_is_checked_like_the_variable() -> None:
    started = run([sys.executable, "-m", "memq.ops.cli", "worker", "embed", "--device", "tpu"])

    assert started.returncode == 2 and "MEMQ_EMBED_DEVICE must be one of" in started.stderr


CLIENT = """
import memq.client.api
from memq.errors import ConfigError
print("imported", flush=True)
try:
    memq.client.api.retrieve("what does she like?", "alice", {"semantic": 1})
except ConfigError as exc:
    print("ConfigError:", exc)
"""


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_the_clients_first_call_raises_config_error_naming_the_variable(variable: str, value: str) -> None:
    called = run([sys.executable, "-c", CLIENT], **{variable: value})

    assert called.returncode == 0, called.stderr
    imported, raised = called.stdout.splitlines()
    assert imported == "imported"  # importing the client never raises; its first call does
    assert raised.startswith(f"ConfigError: {variable} must be ")


def test_another_command_with_a_bad_setting_exits_2_naming_the_variable() -> None:
    shown = run(
        [sys.executable, "-m", "memq.ops.cli", "retrieve", "q", "--memory-id", "a", "--limit", "semantic=1"],
        **{"MEMQ_MAX_DELIVERIES": "-5"},
    )

    assert shown.returncode == 2 and "MEMQ_MAX_DELIVERIES must be in 1..1000 (a whole number)" in shown.stderr
    assert "Traceback" not in shown.stderr
