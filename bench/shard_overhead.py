"""What search shards cost when they are off, measured against the code from before they existed, in one run.

    python -m bench.shard_overhead            # 3 variants x 300 cold 3-type retrievals (~4 min on 2 cores)
    python -m bench.shard_overhead --quick    # 3 x 90

Variants, each with its own Redis database (broker, results, caches), one embed and one search worker and its
own client process, all reading the same MongoDB memories:

  before   the last commit before search shards (``--before-rev``), built with pip into a temporary directory
           and imported from there (PYTHONPATH, PYTHONSAFEPATH=1, so this checkout's ``memq`` is not seen)
  n1       this tree, ``MEMQ_SEARCH_SHARDS=1`` (the default: the shared ``search`` queue)
  n2       this tree, ``MEMQ_SEARCH_SHARDS=2``, one search worker serving both shards

Retrievals are cold (a distinct query each: result and embedding caches miss; the workers' matrices are warm, as
in steady state), of three types, in blocks of ``--block`` per variant, the variants' order rotated every round,
so noise on this shared machine hits all three alike. The same queries go to every variant. Prints p50 / p95
and each variant's p50 ratio to ``before`` with a bootstrap 95 % interval; writes
``bench/results/shard_overhead.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus
from bench.pipeline_bench import RESULTS, TYPES3, machine, summary
from memq.ops import services

ROOT = Path(__file__).resolve().parent.parent
BEFORE_SHARDS_REV = "a8579c2"  # the last commit before memq.core.sharding (9a848a8 added it)
COLLECTIONS = ("long_term_memory", "conversation_memory", "workflow_memory")

# Runs in each variant's client process: reads a JSON list of [query, tenant] per line, answers the latencies.
CLIENT = """
import json, sys, time
from memq import retrieve
limits = json.loads(sys.argv[1])
print(json.dumps({"memq": __import__("memq").__file__}), flush=True)
for line in sys.stdin:
    out = []
    for query, tenant in json.loads(line):
        started = time.perf_counter()
        result = retrieve(query, tenant, limits, timeout_s=30)
        out.append([(time.perf_counter() - started) * 1000, sorted(result["errors"])])
    print(json.dumps(out), flush=True)
"""


def build_before(rev: str, workdir: Path) -> Path:
    """``rev`` of this repository installed (not editable) into ``workdir/site``; returns that directory."""
    source, site = workdir / "src", workdir / "site"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    return site


class Variant:
    """One fleet (embed + search worker) and its client process."""

    def __init__(self, name: str, env: dict[str, str], search_args: list[str]) -> None:
        self.name = name
        self.env = env
        self.fleet = services.Fleet(env)
        self.search_args = search_args
        self.client: subprocess.Popen[str] | None = None
        self.latencies_ms: list[float] = []
        self.errors = 0

    def start_workers(self, ingest: bool = False) -> list[str]:
        hosts = [
            self.fleet.start("embed", name=f"{self.name}-embed"),
            self.fleet.start("search", name=f"{self.name}-search", extra_args=self.search_args),
        ]
        return [*hosts, self.fleet.start("ingest", name=f"{self.name}-ingest")] if ingest else hosts

    def start_client(self) -> str:
        self.client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, json.dumps(TYPES3)],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tempfile.gettempdir(),
        )
        return str(self.ask_line()["memq"])

    def ask_line(self) -> Any:
        assert self.client is not None and self.client.stdout is not None
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} client exited with {self.client.wait()}")
        return json.loads(line)

    def run(self, jobs: list[tuple[str, str]], record: bool = True) -> None:
        assert self.client is not None and self.client.stdin is not None
        self.client.stdin.write(json.dumps(jobs) + "\n")
        self.client.stdin.flush()
        for ms, errors in self.ask_line():
            if errors:
                self.errors += 1
            elif record:
                self.latencies_ms.append(ms)

    def stop(self) -> None:
        if self.client is not None:
            self.client.stdin.close()  # type: ignore[union-attr]
            self.client.wait(timeout=30)
        self.fleet.stop_all()


def ingest(env: dict[str, str], tenants: list[str], per_type: int) -> None:
    """The corpus into MongoDB through this tree's client and the n1 fleet (the only one with an ingest worker):
    the same memories for every variant."""
    code = (
        "import json, sys\nfrom bench import corpus\nfrom memq import remember\n"
        "tenants, per_type = json.loads(sys.argv[1]), int(sys.argv[2])\n"
        "for t, tenant in enumerate(tenants):\n"
        f"    for c, collection in enumerate({COLLECTIONS!r}):\n"
        "        items = corpus.memories(collection, per_type, seed=1000 * t + c)\n"
        "        for start in range(0, len(items), 250):\n"
        "            remember(tenant, collection, items[start : start + 250])\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(tenants), str(per_type)], env=env, check=True, cwd=ROOT)


def ratio_interval(values: list[float], reference: list[float], seed: int = 3) -> tuple[float, float, float]:
    """p50(values) / p50(reference) with a bootstrap 95 % interval (2,000 resamples of each)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(values), np.asarray(reference)
    draws = [
        np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size))
        for _ in range(2000)  # resample both series
    ]
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=5, help="retrievals per variant per round")
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--per-type", type=int, default=1000)
    parser.add_argument("--before-rev", default=BEFORE_SHARDS_REV)
    parser.add_argument("--out", type=Path, default=RESULTS / "shard_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_type = 18, 500

    workdir = Path(tempfile.mkdtemp(prefix="memq-shard-overhead-"))
    print(f"building {args.before_rev} into {workdir} ...", file=sys.stderr)
    before_site = build_before(args.before_rev, workdir)
    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEMQ_") and k != "PYTHONPATH"}

    def env(db: int, **extra: str) -> dict[str, str]:
        url = f"{redis_service.url.rsplit('/', 1)[0]}/{db}"  # the server's URL ends in /0
        return services.memq_env(base, url, mongo_service.url, MEMQ_MONGODB_DB="memq_shard_overhead", **extra)

    variants = [
        Variant("before", env(1, PYTHONPATH=str(before_site), PYTHONSAFEPATH="1"), []),
        Variant("n1", env(2, MEMQ_SEARCH_SHARDS="1"), []),
        Variant("n2", env(3, MEMQ_SEARCH_SHARDS="2"), ["--shards", "0,1"]),
    ]
    tenants = [f"overhead-{i}" for i in range(args.tenants)]
    report: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "out": str(args.out)}}
    with services.running(redis_service, mongo_service):
        try:
            report["series"] = measure(args, variants, tenants)
        finally:
            for variant in variants:
                variant.stop()
    reference = variants[0].latencies_ms
    for variant in variants:
        ratio, low, high = ratio_interval(variant.latencies_ms, reference)
        report["series"][variant.name] |= {
            "latency": summary(variant.latencies_ms),
            "errors": variant.errors,
            "p50_ratio_to_before": ratio,
            "p50_ratio_95ci": [low, high],
        }
    report["latencies_ms"] = {v.name: v.latencies_ms for v in variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    plot(report, args.out.with_suffix(".png"))
    return 0


def measure(args: argparse.Namespace, variants: list[Variant], tenants: list[str]) -> dict[str, Any]:
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    for variant in variants:
        hosts = variant.start_workers(ingest=variant is variants[1])
        app = Celery(f"memq-overhead-{variant.name}", set_as_current=False)
        broker = variant.env["MEMQ_BROKER_URL"]
        app.config_from_object(celery_config(Settings(broker_url=broker, result_backend=broker)))
        variant.fleet.wait_ready(app, hosts, timeout_s=240)
        app.close()
    ingest(variants[1].env, tenants, args.per_type)
    series: dict[str, Any] = {}
    for variant in variants:
        series[variant.name] = {"memq_imported_from": variant.start_client()}
        print(f"{variant.name}: memq from {series[variant.name]['memq_imported_from']}", file=sys.stderr)
    queries = corpus.queries(args.rounds * args.block + 10 * len(tenants), seed=11)
    warm_up = [(queries.pop(), tenants[i % len(tenants)]) for i in range(10 * len(tenants))]
    for variant in variants:  # loads every tenant's matrices and BM25 indexes once per search worker
        variant.run(warm_up, record=False)
    for r in range(args.rounds):
        block = [(queries[r * args.block + i], tenants[(r + i) % len(tenants)]) for i in range(args.block)]
        for v in range(len(variants)):
            variants[(r + v) % len(variants)].run(block)
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return series


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']}")
    print(f"{'variant':<8}{'n':>5}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}{'p50 / before':>14}{'95% interval':>18}")
    for name, row in report["series"].items():
        low, high = row["p50_ratio_95ci"]
        print(
            f"{name:<8}{row['latency']['n']:>5}{row['latency']['p50_ms']:>9.1f}{row['latency']['p95_ms']:>9.1f}"
            f"{row['errors']:>8}{row['p50_ratio_to_before']:>13.3f}x{f'{low:.3f} - {high:.3f}':>18}"
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["latencies_ms"])
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.boxplot([report["latencies_ms"][n] for n in names], showfliers=False)
    axis.set_xticks(
        range(1, len(names) + 1), [f"{n}\n{report['series'][n]['p50_ratio_to_before']:.3f}x" for n in names]
    )
    axis.set_ylabel("cold 3-type retrieval (ms)")
    axis.set_title(f"search shards off and on vs before them ({report['machine']['cores']} cores, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
