"""What the Celery canvas itself costs on this machine: no-op tasks in memq's shapes, per worker pool.

    python -m bench.canvas_shapes [--iterations 40] [--pools threads,solo,prefork]

Each shape runs the floor benchmark's no-op tasks (``bench.floor``) on a floor worker (and a second one, on its own
queue, for the first step where named, as the embed queue's worker), started with the given pool. Prints a table
and writes ``bench/results/canvas_shapes.json``/``.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"


def shapes() -> dict[str, Callable[[], Any]]:
    from celery import chain, chord

    from bench.floor import FLOOR_EMBED_QUEUE, FLOOR_QUEUE, noop_signature

    def noop(queue: str = FLOOR_QUEUE) -> Any:
        return noop_signature(1, 2, queue=queue)

    return {
        "1 task": lambda: noop(),
        "chain of 2": lambda: chain(noop(), noop()),
        "chord 3 + body": lambda: chord([noop(), noop(), noop()], noop()),
        "embed-queue task | chord 3 + body (memq's shape)": lambda: chain(
            noop(FLOOR_EMBED_QUEUE), chord([noop(), noop(), noop()], noop())
        ),
    }


def measure(env: dict[str, str], pool_args: list[str], iterations: int) -> dict[str, float]:
    from bench.floor import FLOOR_EMBED_QUEUE, floor_app, start_floor_worker

    fleet = services.Fleet(env)
    out: dict[str, float] = {}
    try:
        hosts = [
            start_floor_worker(fleet, pool_args=pool_args),
            start_floor_worker(fleet, name="floorembed", queues=[FLOOR_EMBED_QUEUE], pool_args=pool_args),
        ]
        fleet.wait_ready(floor_app, hosts)
        for name, make in shapes().items():
            samples = []
            for _ in range(iterations):
                started = time.perf_counter()
                result = make().apply_async()
                result.get(timeout=10)
                samples.append((time.perf_counter() - started) * 1000)
                result.forget()
            out[name] = float(np.median(samples))
    finally:
        fleet.stop_all()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--pools", default="threads,solo,prefork")
    args = parser.parse_args(argv)
    pool_flags = {
        "threads": ["--pool", "threads", "-c", "8"],
        "solo": ["--pool", "solo"],
        "prefork": ["--pool", "prefork", "-c", "2"],
    }
    table: dict[str, dict[str, float]] = {}
    redis_service = services.start_redis_server()
    env = services.memq_env(os.environ, redis_service.url, "mongodb://127.0.0.1:1")
    os.environ.update(env)
    try:
        for pool in args.pools.split(","):
            table[pool] = measure(env, pool_flags[pool], args.iterations)
    finally:
        gc.collect()
        redis_service.stop()
    names = list(next(iter(table.values())))
    print(f"\n{'shape (p50 ms)':<52}" + "".join(f"{p:>10}" for p in table))
    for name in names:
        print(f"{name:<52}" + "".join(f"{table[p][name]:>10.1f}" for p in table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "canvas_shapes.json").write_text(json.dumps({"p50_ms": table, "iterations": args.iterations}, indent=2))
    plot(table, RESULTS / "canvas_shapes.png")
    return 0


def plot(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(table.values())))
    x = np.arange(len(names))
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (pool, row) in enumerate(table.items()):
        ax.bar(x + i * width, [row[n] for n in names], width, label=f"--pool {pool}")
    ax.set_xticks(x + width * (len(table) - 1) / 2, [n.split(" (")[0] for n in names], rotation=15, ha="right")
    ax.set_ylabel("p50 latency, ms")
    ax.set_title("no-op canvas shapes over Redis (client apply → result)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
