"""memq beside its baselines, in one run: latency, throughput, the floor, ingest. Prints a table, writes
``bench/results/pipeline.json`` and ``pipeline.png``.

    python -m bench.pipeline_bench            # full run (~4 min on 2 cores)
    python -m bench.pipeline_bench --quick    # smaller corpus and shorter phases

Baselines, implemented from the seed documents (../shared/seeds):
  (a) before: per type, sequentially: load the model (as the seed's ``get_embedding`` does on every call),
      embed the query, query MongoDB for the tenant's memories of that type, rank by cosine.
  (b) after, one process: model cached, embed once, the per-type queries in parallel threads.
memq is measured with its worker fleet: cold (result cache miss, distinct queries), cached, and the floor
(a chord of the same shape with a real embedding and no-op searches and merge).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus
from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"
TYPES3 = {"semantic": 5, "episodic": 5, "procedural": 5}
TYPES1 = {"semantic": 5}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(values_ms),
        "p50_ms": percentile(values_ms, 50),
        "p95_ms": percentile(values_ms, 95),
        "p99_ms": percentile(values_ms, 99),
        "mean_ms": statistics.fmean(values_ms) if values_ms else float("nan"),
    }


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = call()
    return (time.perf_counter() - started) * 1000, out


class Baselines:
    """The seed's retrieval, before and after its async batch API, against the same MongoDB."""

    def __init__(self, mongodb_uri: str, db: str) -> None:
        import pymongo

        from memq.workers.embedding.embedder import resolve_model_path

        self.model_path = resolve_model_path("all-MiniLM-L6-v2")
        self.db = pymongo.MongoClient(mongodb_uri)[db]
        self._model: Any = None

    def _load_model(self) -> Any:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(self.model_path, device="cpu")

    def _search(self, vector: np.ndarray, memory_id: str, memory_type: str, k: int) -> list[dict[str, Any]]:
        from memq.core.vectors import from_stored

        docs = list(self.db[memory_type].find({"memory_id": memory_id}))
        if not docs:
            return []
        matrix = np.stack([from_stored(d["embedding"]) for d in docs])
        scores = matrix @ vector / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector))
        return [{"content": docs[i]["content"], "score": float(scores[i])} for i in np.argsort(-scores)[:k]]

    def before(self, query: str, memory_id: str, limits: dict[str, int]) -> dict[str, Any]:
        from memq.core.field_rules import check_limits

        out = {}
        for memory_type, k in check_limits(limits).items():
            vector = self._load_model().encode(query)  # the seed's get_embedding: a model per call
            out[memory_type] = self._search(vector, memory_id, memory_type, k)
        return out

    def after_one_process(self, query: str, memory_id: str, limits: dict[str, int], pool: ThreadPoolExecutor) -> Any:
        from memq.core.field_rules import check_limits

        if self._model is None:
            self._model = self._load_model()
        vector = self._model.encode(query)
        checked = check_limits(limits)
        futures = {t: pool.submit(self._search, vector, memory_id, t, k) for t, k in checked.items()}
        return {t: f.result() for t, f in futures.items()}


def run_load(call: Callable[[int], Any], clients: int, duration_s: float) -> dict[str, Any]:
    """``clients`` threads call ``call`` back to back for ``duration_s``; counts completions and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s
    counter = iter(range(10**9))

    def client() -> None:
        while time.perf_counter() < stop_at:
            n = next(counter)
            try:
                ms, _ = timed(lambda n=n: call(n))
                with lock:
                    latencies.append(ms)
            except Exception as exc:  # counted, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed_s = time.perf_counter() - started
    return {
        "clients": clients,
        "completed": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "throughput_rps": len(latencies) / elapsed_s,
        **summary(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--per-type", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--baseline-a-iterations", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.tenants, args.per_type, args.iterations, args.duration_s = 2, 1000, 30, 4.0
        args.baseline_a_iterations = 2

    redis_service = services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    env = services.memq_env(os.environ, redis_service.url, mongo_service.url, MEMQ_MONGODB_DB="memq_bench")
    os.environ.update(env)
    fleet = services.Fleet(env)
    with services.running(redis_service, mongo_service):
        try:
            report = run(args, fleet, mongo_service.url)
        finally:
            fleet.stop_all()
            gc.collect()  # release pending AsyncResults while their Redis is still up
    report["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}


def run(args: argparse.Namespace, fleet: services.Fleet, mongodb_uri: str) -> dict[str, Any]:
    from bench.floor import floor_canvas, start_floor_worker
    from memq.client import api
    from memq.client.app import app
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    hosts = [*(fleet.start(kind) for kind in services.WORKER_KINDS), start_floor_worker(fleet)]
    fleet.wait_ready(app, hosts)
    tenants = [f"bench-tenant-{i}" for i in range(args.tenants)]
    report: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}}

    # Ingest: every tenant gets per_type memories of each of the three types.
    total = args.tenants * 3 * args.per_type
    done = 0
    started = time.perf_counter()
    for t_index, tenant in enumerate(tenants):
        for memory_type in ("long_term_memory", "conversation_memory", "workflow_memory"):
            items = corpus.memories(memory_type, args.per_type, seed=hash((t_index, memory_type)) & 0xFFFF)
            for start in range(0, len(items), 250):
                api.remember(tenant, memory_type, items[start : start + 250])
                done += len(items[start : start + 250])
                print(f"\ringest {done}/{total} memories", end="", file=sys.stderr, flush=True)
    ingest_s = time.perf_counter() - started
    print(file=sys.stderr)
    report["ingest"] = {"memories": total, "seconds": ingest_s, "memories_per_s": total / ingest_s}

    queries = iter(corpus.queries(100_000, seed=7))
    for tenant in tenants:  # steady state: each search process has loaded each tenant's matrices once
        api.retrieve(next(queries), tenant, TYPES3)

    settings = get_settings()

    def floor(limits: dict[str, int]) -> Any:
        request = retrieval_request(settings, next(queries), tenants[0], limits)
        result = floor_canvas(request).apply_async()
        try:
            return result.get(timeout=30)
        finally:
            result.forget()

    baselines = Baselines(mongodb_uri, "memq_bench")
    pool = ThreadPoolExecutor(max_workers=3)
    baselines.after_one_process("warm", tenants[0], TYPES3, pool)
    cached_query = next(queries)
    api.retrieve(cached_query, tenants[0], TYPES3)

    series: dict[str, list[float]] = {
        k: []
        for k in (
            "floor_3",
            "memq_cold_3",
            "memq_cold_3_vector",
            "memq_cold_1",
            "memq_cached_3",
            "baseline_b_3",
            "floor_1",
        )
    }
    stages: list[dict[str, Any]] = []
    for i in range(args.iterations):  # interleaved, so noise hits every series alike
        tenant = tenants[i % len(tenants)]
        series["floor_3"].append(timed(lambda: floor(TYPES3))[0])
        series["floor_1"].append(timed(lambda: floor(TYPES1))[0])
        ms, result = timed(lambda t=tenant: api.retrieve(next(queries), t, TYPES3))
        series["memq_cold_3"].append(ms)
        stages.append(result["timings_ms"] | {"client_ms": ms})
        # The same cold retrieval as before hybrid search existed: cosine only.
        vector_only = timed(lambda t=tenant: api.retrieve(next(queries), t, TYPES3, mode="vector"))[0]
        series["memq_cold_3_vector"].append(vector_only)
        series["memq_cold_1"].append(timed(lambda t=tenant: api.retrieve(next(queries), t, TYPES1))[0])
        series["memq_cached_3"].append(timed(lambda: api.retrieve(cached_query, tenants[0], TYPES3))[0])
        series["baseline_b_3"].append(
            timed(lambda t=tenant: baselines.after_one_process(next(queries), t, TYPES3, pool))[0]
        )
    series["baseline_a_3"] = [
        timed(lambda: baselines.before(next(queries), tenants[0], TYPES3))[0] for _ in range(args.baseline_a_iterations)
    ]
    report["latency"] = {name: summary(values) for name, values in series.items()}
    report["stages_ms"] = stage_breakdown(stages)

    levels = [int(c) for c in args.concurrency.split(",")]
    load: dict[str, Any] = {}
    for search_workers in (1, 2):
        if search_workers == 2:
            fleet.wait_ready(app, [fleet.start("search", name="search2"), start_floor_worker(fleet, name="floor2")])
        # The ceiling beside the runs it bounds, on the same fleet (measured once up front, noise moved it).
        load[f"floor_ceiling_search{search_workers}_c16"] = run_load(lambda n: floor(TYPES3), 16, args.duration_s)
        for clients in levels:
            key = f"memq_cold_3_search{search_workers}_c{clients}"
            load[key] = run_load(
                lambda n: api.retrieve(next(queries), tenants[n % len(tenants)], TYPES3, timeout_s=30),
                clients,
                args.duration_s,
            )
            print(f"{key}: {load[key]['throughput_rps']:.1f} req/s, {load[key]['errors']} errors", file=sys.stderr)
    report["load"] = load
    report["goals"] = goals(report)
    return report


def stage_breakdown(stages: list[dict[str, Any]]) -> dict[str, float]:
    """p50 of each stage of a cold retrieval, in the order a request meets them."""

    def p50(values: list[float]) -> float:
        return percentile(values, 50)

    waits = [s.get("queue_ms", {}) for s in stages]
    out = {
        "wait_before_embed_p50_ms": p50([w.get("embed", 0.0) for w in waits]),
        "embed_p50_ms": p50([s.get("embed_ms", 0.0) for s in stages]),
        "wait_before_search_p50_ms": p50([max(w.get("search", {}).values() or [0.0]) for w in waits]),
    }
    for memory_type in sorted({t for s in stages for t in s.get("search_ms", {})}):
        out[f"search_{memory_type}_p50_ms"] = p50([s["search_ms"].get(memory_type, 0.0) for s in stages])
    out["wait_before_merge_p50_ms"] = p50([w.get("merge", 0.0) for w in waits])
    out["merge_p50_ms"] = p50([s.get("merge_ms", 0.0) for s in stages])
    out["result_delivery_p50_ms"] = p50([s["client_ms"] - s.get("total_ms", 0.0) for s in stages])
    out["client_total_p50_ms"] = p50([s["client_ms"] for s in stages])
    return out


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    lat = report["latency"]
    load = report["load"]
    cold, floor_ = lat["memq_cold_3"]["p50_ms"], lat["floor_3"]["p50_ms"]
    c16 = load.get("memq_cold_3_search1_c16", {})
    ceiling = load["floor_ceiling_search1_c16"]["throughput_rps"]
    rows = [
        ("cold 3-type p50 <= 1.25 x floor", cold / floor_, 1.25, "<="),
        ("cold 3-type hybrid p50 <= 1.1 x vector-only", cold / lat["memq_cold_3_vector"]["p50_ms"], 1.1, "<="),
        ("speed-up over baseline (a) >= 20x", lat["baseline_a_3"]["p50_ms"] / cold, 20.0, ">="),
        ("cached p50 <= 1 ms (client side)", lat["memq_cached_3"]["p50_ms"], 1.0, "<="),
        ("throughput at 16 clients >= 80% of no-op chord ceiling", c16.get("throughput_rps", 0) / ceiling, 0.8, ">="),
        ("errors at 16 clients == 0", c16.get("errors", -1), 0, "=="),
    ]
    out = []
    for name, value, target, op in rows:
        met = {"<=": value <= target, ">=": value >= target, "==": value == target}[op]
        out.append({"goal": name, "value": value, "target": target, "met": bool(met)})
    return out


def print_report(report: dict[str, Any]) -> None:
    print(f"\nmachine: {report['machine']}")
    print(f"ingest: {report['ingest']['memories']} memories at {report['ingest']['memories_per_s']:.0f}/s")
    print(f"\n{'series':<16}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'vs floor_3':>12}")
    floor_ = report["latency"]["floor_3"]["p50_ms"]
    for name, s in report["latency"].items():
        print(
            f"{name:<16}{s['n']:>5}{s['p50_ms']:>10.2f}{s['p95_ms']:>10.2f}{s['p99_ms']:>10.2f}"
            f"{s['p50_ms'] / floor_:>11.2f}x"
        )
    print("\nstage breakdown (cold, 3 types, p50 ms):")
    for name, value in report["stages_ms"].items():
        print(f"  {name:<36}{value:>8.2f}")
    print(f"\n{'load':<28}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
    for name, s in report["load"].items():
        print(
            f"{name:<28}{s['clients']:>8}{s['throughput_rps']:>9.1f}{s['p50_ms']:>9.1f}{s['p95_ms']:>9.1f}"
            f"{s['errors']:>8}"
        )
    print("\ngoals:")
    for g in report["goals"]:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']:.3g} (target {g['target']})")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(report["latency"])
    p50 = [report["latency"][n]["p50_ms"] for n in names]
    p95 = [report["latency"][n]["p95_ms"] for n in names]
    x = np.arange(len(names))
    left.bar(x - 0.2, p50, 0.4, label="p50")
    left.bar(x + 0.2, p95, 0.4, label="p95")
    left.set_yscale("log")
    left.set_xticks(x, names, rotation=30, ha="right")
    left.set_ylabel("latency (ms, log)")
    left.set_title("retrieval latency, side by side")
    left.legend()
    for workers in (1, 2):
        rows = [v for k, v in report["load"].items() if k.startswith(f"memq_cold_3_search{workers}_")]
        right.plot(
            [r["clients"] for r in rows],
            [r["throughput_rps"] for r in rows],
            "o-",
            label=f"memq cold, {workers} search worker(s)",
        )
    for workers, style in ((1, "--"), (2, ":")):
        right.axhline(
            report["load"][f"floor_ceiling_search{workers}_c16"]["throughput_rps"],
            color="grey",
            ls=style,
            label=f"floor chord ceiling, 16 clients, {workers} search worker(s)",
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("retrievals / s")
    right.set_title("throughput")
    right.legend()
    fig.suptitle(f"memq on {report['machine']['cpu']} ({report['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
