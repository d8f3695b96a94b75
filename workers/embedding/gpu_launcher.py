"""``memq worker embed --gpus 0,1``: one pinned embed worker process per GPU, supervised together.

Each child is ``memq worker embed --device cuda:N -n embed-gpuN@%h [extra celery args]`` (its own CUDA context,
never forked). Signals are forwarded to every child; one child ending stops the set, with its exit code, so a
supervisor (compose, systemd, Kubernetes) restarts the set as a whole.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
POLL_INTERVAL_S = 0.2


def parse_gpus(spec: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; rejects empty, negative, non-numeric and repeated indices."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ValueError("--gpus needs at least one GPU index, e.g. --gpus 0,1")
    try:
        gpus = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--gpus expects comma-separated GPU indices, got {spec!r}") from None
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus expects distinct non-negative indices, got {spec!r}")
    return gpus


def split_gpus_arg(argv: Sequence[str]) -> tuple[list[int] | None, list[str]]:
    """Take ``--gpus X`` or ``--gpus=X`` out of a worker's arguments; None when absent."""
    rest: list[str] = []
    spec: str | None = None
    items = iter(argv)
    for arg in items:
        if arg == "--gpus":
            spec = next(items, None)
            if spec is None:
                raise ValueError("--gpus needs a value, e.g. --gpus 0,1")
        elif arg.startswith("--gpus="):
            spec = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return (parse_gpus(spec) if spec is not None else None), rest


def worker_command(gpu: int, extra: Sequence[str]) -> list[str]:
    """The command line of the embed worker pinned to ``cuda:<gpu>``, with the caller's extra Celery args."""
    for arg in extra:
        if arg in ("--device", "-n", "--hostname") or arg.startswith(("--device=", "--hostname=")):
            raise ValueError(f"{arg} is set per GPU by --gpus; leave it out")
    pinned = ["--device", f"cuda:{gpu}", "-n", f"embed-gpu{gpu}@%h"]
    return [sys.executable, "-m", "memq.ops.cli", "worker", "embed", *pinned, *extra]


class Supervisor:
    """Runs a set of child processes; a signal to it goes to each of them once; one ending ends the set."""

    def __init__(self, commands: Sequence[Sequence[str]]) -> None:
        self.commands = [list(command) for command in commands]
        self.processes: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        for command in self.commands:
            # Own process group: a terminal's Ctrl-C reaches only the launcher, which forwards it once
            # (a second SIGINT would turn Celery's warm shutdown into a cold one).
            process = subprocess.Popen(command, process_group=0)
            self.processes.append(process)
            log.info("started pid %d: %s", process.pid, " ".join(command))

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every child still running (SIGTERM: Celery's warm shutdown)."""
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def wait(self) -> int:
        """Until every child has exited. After ``stop``: 0 when all exit cleanly, else the first failure's
        code. If a child ends on its own, the others are stopped and the set exits with that child's code
        (1 if it was 0: the set was left incomplete)."""
        first_code: int | None = None
        while True:
            running = any([process.poll() is None for process in self.processes])  # poll each: all codes current
            if first_code is None and not self._stopping.is_set():
                first_code = self._first_unrequested_exit()
            if not running:
                break
            time.sleep(POLL_INTERVAL_S)
        if first_code is not None:
            return first_code
        return next((exit_code(p.returncode) for p in self.processes if p.returncode != 0), 0)

    def _first_unrequested_exit(self) -> int | None:
        ended = [process for process in self.processes if process.returncode is not None]
        if not ended:
            return None
        failed = next((process for process in ended if process.returncode != 0), ended[0])
        log.warning("pid %d exited with %s; stopping the others", failed.pid, failed.returncode)
        self.stop()
        return exit_code(failed.returncode) or 1


def exit_code(returncode: int) -> int:
    """A shell-style exit status: a child killed by signal N reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def launch(gpus: Sequence[int], extra: Sequence[str]) -> int:
    """Start one pinned embed worker per GPU, forward signals to them, wait; the exit code of the set."""
    supervisor = Supervisor([worker_command(gpu, extra) for gpu in gpus])
    previous = {sig: signal.signal(sig, lambda signum, _: supervisor.stop(signum)) for sig in FORWARDED_SIGNALS}
    try:
        supervisor.start()
        return supervisor.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_from_argv(argv: Sequence[str]) -> int | None:
    """For ``memq worker embed ARGS``: launch per GPU when ARGS has ``--gpus``, else None (run one worker)."""
    try:
        gpus, extra = split_gpus_arg(argv)
        return None if gpus is None else launch(gpus, extra)
    except ValueError as exc:
        print(f"memq: error: {exc}", file=sys.stderr)
        return 2
