"""Redis broker against one RabbitMQ node against a 3-node RabbitMQ cluster, in one run.

    python -m bench.broker_bench            # ~6 min on 2 cores
    python -m bench.broker_bench --quick    # fewer requests and memories
    python -m bench.broker_bench --full     # 10,000 memories, 1,000 requests, 60 s, 3 rounds: for a machine of its own

Each variant gets its own broker (a redis-server; a RabbitMQ node of its own; three nodes joined into a cluster,
memq's queues quorum queues on 3 members), its own Redis for results and caches, and one embed, one search and
one ingest worker; all read and write the same nx-27017. Through each, from a client process: an import of
``--memories`` memories (``remember_many``: memories/s), ``--requests`` cold retrievals one after another (distinct
queries: p50/p99), the same number of cached ones (one query again: the result cache answers, the broker is not
used), and closed-loop throughput of 16 client threads for ``--seconds`` (cold queries: requests/s). Writes
``bench/results/broker.json`` and ``broker.png`` and prints each figure as a ratio to Redis.

``--rounds N`` runs every variant N times, each round in another order (round r starts at variant r), each run on
fresh brokers, workers and a database of its own, so that no variant always runs first or after another's tail;
each figure is the median of the rounds (every round's figures are kept in the JSON under ``rounds``).

The RabbitMQ nodes are started with ``tests/rabbitkit.py`` (its ``Node``): ``rabbitmq-server`` and ``rabbitmqctl``
must be installed (they are on this project's machines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.pipeline_bench import RESULTS, machine, summary
from memq.ops import services

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import rabbitkit  # noqa: E402

LIMITS = {"semantic": 5, "episodic": 3}

CLIENT = """
import json, sys, threading, time
from memq import client
tenant, memories, requests, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
limits = json.loads(sys.argv[5])
items = [{"content": f"memory {i}: notes about topic {i % 97} and place {i % 31}"} for i in range(memories)]
started = time.perf_counter()
client.remember_many(tenant, "semantic", items)
ingest_s = time.perf_counter() - started
client.remember(tenant, "episodic", [f"turn {i} about topic {i}" for i in range(50)])
def one(query):
    t = time.perf_counter()
    result = client.retrieve(query, tenant, limits, timeout_s=30)
    assert not result["errors"], result["errors"]
    return (time.perf_counter() - t) * 1000
cold = [one(f"cold question {i} about topic {i % 97}") for i in range(requests)]
one("the cached question")
cached = [one("the cached question") for _ in range(requests)]
done, stop, lock = [0], time.perf_counter() + seconds, threading.Lock()
def loop(seed):
    i = 0
    while time.perf_counter() < stop:
        one(f"load {seed} {i} topic {i % 97}")
        i += 1
        with lock:
            done[0] += 1
threads = [threading.Thread(target=loop, args=(s,)) for s in range(16)]
t0 = time.perf_counter()
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"ingest_memories_per_s": memories / ingest_s, "cold_ms": cold, "cached_ms": cached,
                  "throughput_rps": done[0] / (time.perf_counter() - t0)}))
"""


@contextmanager
def redis_broker() -> Iterator[str]:
    server = services.start_redis_server()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def rabbitmq_broker(nodes: int) -> Iterator[str]:
    started = [rabbitkit.own_node(prefix=f"memqbench{i}x") for i in range(nodes)]
    try:
        rabbitkit.start_cluster(started)
        url = ";".join(node.url for node in started)
        env = {**os.environ, "MEMQ_BROKER_URL": url}
        rabbitkit.setup_topology(env, rabbitmqctl=started[0].ctl_command())
        yield url
    finally:
        for node in started:
            node.remove()


def run_variant(name: str, broker_url: str, mongo_url: str, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    with ExitStack() as stack:
        results = services.start_redis_server()
        stack.callback(results.stop)
        env = services.memq_env(
            os.environ,
            broker_url,
            mongo_url,
            MEMQ_RESULT_BACKEND=results.url,
            MEMQ_REDIS_URL=results.url,
            MEMQ_MONGODB_DB=f"memq_broker_bench_{name.replace('-', '_')}_{round_}",
            MEMQ_METRICS_PORT="0",
        )
        fleet = services.Fleet(env)
        stack.callback(fleet.stop_all)
        hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
        from celery import Celery

        from memq.config.celery import celery_config
        from memq.core.settings import Settings

        app = Celery(f"bench-{name}", set_as_current=False)
        app.config_from_object(celery_config(Settings(broker_url=broker_url, result_backend=results.url)))
        stack.callback(app.close)
        fleet.wait_ready(app, hosts, timeout_s=300)
        command = [sys.executable, "-c", CLIENT, f"bench-{name}", str(args.memories), str(args.requests)]
        done = subprocess.run(
            [*command, str(args.seconds), json.dumps(LIMITS)], env=env, capture_output=True, text=True, timeout=1800
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name}: client failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "ingest_memories_per_s": out["ingest_memories_per_s"],
        "cold": summary(out["cold_ms"]),
        "cached": summary(out["cached_ms"]),
        "throughput_rps_16_clients": out["throughput_rps"],
    }


def ratios(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = variants["redis"]
    figures = {
        "cold p50": lambda v: v["cold"]["p50_ms"],
        "cold p99": lambda v: v["cold"]["p99_ms"],
        "cached p50": lambda v: v["cached"]["p50_ms"],
        "cached p99": lambda v: v["cached"]["p99_ms"],
        "throughput": lambda v: v["throughput_rps_16_clients"],
        "ingest": lambda v: v["ingest_memories_per_s"],
    }
    return {name: {figure: get(v) / get(base) for figure, get in figures.items()} for name, v in variants.items()}


def plot(variants: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "cold", "cold retrieval (ms)"), (axes[1], "cached", "cached retrieval (ms)")):
        ax.bar([f"{n}\np50" for n in names], [variants[n][key]["p50_ms"] for n in names], color="tab:blue")
        ax.bar([f"{n}\np99" for n in names], [variants[n][key]["p99_ms"] for n in names], color="tab:orange")
        ax.set_title(title)
    axes[2].bar(names, [variants[n]["throughput_rps_16_clients"] for n in names], label="retrievals/s (16 clients)")
    axes[2].bar([f"{n} ingest" for n in names], [variants[n]["ingest_memories_per_s"] / 10 for n in names],
                label="ingest memories/s ÷ 10")  # fmt: skip
    axes[2].legend(fontsize=7)
    axes[2].tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle("memq: Redis broker vs RabbitMQ (1 node, 3-node cluster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


VARIANTS: dict[str, Callable[[], AbstractContextManager[str]]] = {
    "redis": redis_broker,
    "rabbitmq-1": lambda: rabbitmq_broker(1),
    "rabbitmq-3": lambda: rabbitmq_broker(3),
}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (nested: the latency summaries)."""
    first = runs[0]
    return {
        key: median_of([run[key] for run in runs])
        if isinstance(first[key], dict)
        else statistics.median(run[key] for run in runs)
        for key in first
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.memories, args.requests, args.seconds = 1000, 60, 8
    if args.full:
        args.memories, args.requests, args.seconds, args.rounds = 10_000, 1000, 60, max(args.rounds, 3)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    mongo = services.start_nx27017()
    try:
        for round_ in range(args.rounds):
            order = list(VARIANTS)[round_ % len(VARIANTS) :] + list(VARIANTS)[: round_ % len(VARIANTS)]
            for name in order:
                started = time.monotonic()
                with VARIANTS[name]() as url:
                    runs[name].append(run_variant(name, url, mongo.url, args, round_))
                took_s = time.monotonic() - started
                print(f"round {round_ + 1} {name}: {json.dumps(runs[name][-1])} ({took_s:.0f} s)", flush=True)
    finally:
        mongo.stop()
    variants = {name: median_of(results) for name, results in runs.items()}
    report = {
        "machine": machine(),
        "args": vars(args),
        "variants": variants,
        "rounds": runs,
        "ratio_to_redis": ratios(variants),
        "when": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "broker.json").write_text(json.dumps(report, indent=2))
    plot(variants, RESULTS / "broker.png")
    for name, figures in report["ratio_to_redis"].items():
        print(name, " ".join(f"{figure} {ratio:.2f}×" for figure, ratio in figures.items()))


if __name__ == "__main__":
    main()
