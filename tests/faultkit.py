"""Fault injection for the tests: pause, stop and restart the services ``memq.services`` starts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

from memq import services
from memq.services import Service


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
