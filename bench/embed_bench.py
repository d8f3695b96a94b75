"""The embed worker's model paths beside plain ``SentenceTransformer.encode``, in one run, on one device.

    python -m bench.embed_bench --device cuda:0            # the lent GPU (fp16)
    python -m bench.embed_bench --device cpu --quick       # a short validation run on CPU
    python -m bench.embed_bench --device cuda --model-path /models/minilm-fp16

Measured, each with its baseline in the same process:
  single query   p50/p99 of one short query: the lean path (``Embedder.encode``) and the batcher with
                 one caller (``Embedder.encode_queries``) vs ``SentenceTransformer.encode([q])``.
  concurrency    short queries/s and per-request p50/p99 with 1, 8, 64, 512 caller threads, each sending
                 one query at a time: through the ``DynamicBatcher`` vs each caller calling
                 ``SentenceTransformer.encode([q])`` itself.
  in flight      short queries/s with 64, 512 (and on CUDA 4096) one-query requests held in flight by one
                 thread through ``DynamicBatcher.submit``: the batcher's and the device's capacity, without
                 hundreds of Python threads taking turns on the GIL.
  bulk           120-word passages/s: ``Embedder.encode_in_chunks`` (sorted by length, chunked) vs
                 ``SentenceTransformer.encode(passages, batch_size=B)``.
Prints a table; writes ``bench/results/embed_<device>.json`` and ``.png`` (``embed_cuda-nvidia-h200``: the name
says which GPU). On CUDA both models run in fp16 and memq's short texts replay captured CUDA graphs. The goals
(one query <= 1 ms, >= 50,000 short queries/s, >= 20,000 passages/s) are checked only on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_NAME = "all-MiniLM-L6-v2"
PASSAGE_WORDS = 120
GOALS = {"single_query_p50_ms_max": 1.0, "batched_queries_per_s_min": 50_000.0, "bulk_passages_per_s_min": 20_000.0}

Encode = Callable[[list[str]], Any]


@dataclass
class Plan:
    single_query_repeats: int
    phase_s: float
    callers: list[int]
    bulk_passages: int
    bulk_batch_texts: int
    in_flight: list[int]


def plan_for(device: str, quick: bool) -> Plan:
    on_gpu = device.startswith("cuda")
    if on_gpu:
        return Plan(
            200 if quick else 1000,
            2.0 if quick else 4.0,
            [1, 8, 64, 512],
            20_000 if quick else 100_000,
            512,
            [64, 512, 4096],
        )
    return Plan(30 if quick else 200, 2.0 if quick else 6.0, [1, 8, 64, 512], 192 if quick else 2048, 64, [64, 512])


@dataclass
class Latency:
    n: int
    p50_ms: float
    p99_ms: float


@dataclass
class Throughput:
    callers: int
    requests: int
    queries_per_s: float
    p50_ms: float
    p99_ms: float


def latency(values_s: Sequence[float]) -> Latency:
    ms = np.asarray(values_s) * 1000
    return Latency(len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model()} ({os.cpu_count()} logical cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(device: str, name: str = "") -> str:
    """``cpu``, ``mps``, or ``cuda-<gpu model>`` (e.g. ``cuda-nvidia-h200``): the results name the GPU."""
    kind = device.split(":", 1)[0].lower()
    label = f"{kind} {name}" if kind == "cuda" and name else kind
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def passages(count: int, seed: int = 7) -> list[str]:
    """Deterministic ``PASSAGE_WORDS``-word passages made of the corpus's memory sentences."""
    sentences = [str(m["content"]) for kind in corpus.TEMPLATES for m in corpus.memories(kind, 400, seed)]
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(count):
        words: list[str] = []
        while len(words) < PASSAGE_WORDS:
            words.extend(sentences[int(rng.integers(len(sentences)))].split())
        out.append(" ".join(words[:PASSAGE_WORDS]))
    return out


def load_models(model: str, device: str, bulk_batch_texts: int) -> tuple[Any, Any]:
    from sentence_transformers import SentenceTransformer

    from memq.workers.embedding.embedder import Embedder, resolve_model_path

    embedder = Embedder(model, device, batch_size=bulk_batch_texts)
    plain = SentenceTransformer(resolve_model_path(model), device=embedder.device)
    if embedder.device.startswith("cuda"):
        plain.half()
    plain.eval()
    return embedder, plain


def plain_encode(plain: Any, batch_size: int = 32) -> Encode:
    def encode(texts: list[str]) -> Any:
        return plain.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)

    return encode


def single_queries(encoders: dict[str, Encode], queries: Sequence[str]) -> dict[str, Latency]:
    """One query at a time, the encoders taking turns on each query (fair under a noisy machine)."""
    for encode in encoders.values():
        for query in queries[:5]:
            encode([query])
    samples: dict[str, list[float]] = {name: [] for name in encoders}
    for query in queries:
        for name, encode in encoders.items():
            started = time.perf_counter()
            encode([query])
            samples[name].append(time.perf_counter() - started)
    return {name: latency(values) for name, values in samples.items()}


def concurrent_queries(encode: Encode, callers: int, phase_s: float, queries: Sequence[str]) -> Throughput:
    """``callers`` threads, each sending one query at a time until the phase ends."""
    samples: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    deadline = [0.0]

    def caller(slot: int) -> None:
        start.wait()
        mine = samples[slot]
        i = slot
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            encode([queries[i % len(queries)]])
            mine.append(time.perf_counter() - began)
            i += callers

    threads = [threading.Thread(target=caller, args=(slot,), daemon=True) for slot in range(callers)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + phase_s
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed_s = time.perf_counter() - began
    flat = [value for values in samples for value in values]
    summary = latency(flat)
    return Throughput(callers, len(flat), len(flat) / elapsed_s, summary.p50_ms, summary.p99_ms)


def queries_in_flight(batcher: Any, in_flight: int, phase_s: float, queries: Sequence[str]) -> Throughput:
    """One thread keeps ``in_flight`` one-query requests submitted to the batcher (futures, as a worker's task
    threads would hold them) until the phase ends: the batcher's and the device's capacity without hundreds of
    Python threads taking turns on the GIL."""
    latencies: list[float] = []
    window: deque[tuple[float, Any]] = deque()
    began = time.perf_counter()
    deadline = began + phase_s
    i = 0
    while window or time.perf_counter() < deadline:
        while len(window) < in_flight and time.perf_counter() < deadline:
            window.append((time.perf_counter(), batcher.submit([queries[i % len(queries)]])))
            i += 1
        submitted, future = window.popleft()
        future.result()
        latencies.append(time.perf_counter() - submitted)
    elapsed_s = time.perf_counter() - began
    summary = latency(latencies)
    return Throughput(in_flight, len(latencies), len(latencies) / elapsed_s, summary.p50_ms, summary.p99_ms)


def bulk(encode: Encode, texts: list[str]) -> float:
    encode(texts[: min(len(texts), 256)])  # warm the shapes
    started = time.perf_counter()
    rows = encode(texts)
    elapsed_s = time.perf_counter() - started
    assert len(rows) == len(texts)
    return len(texts) / elapsed_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from memq.workers.embedding.embedder import choose_device

    device = choose_device(args.device)
    plan = plan_for(device, args.quick)
    if args.bulk_passages:
        plan.bulk_passages = args.bulk_passages
    embedder, plain = load_models(args.model_path or MODEL_NAME, device, plan.bulk_batch_texts)
    queries = corpus.queries(max(plan.single_query_repeats, 4096), seed=11)
    lean, batched, baseline = embedder.encode, embedder.encode_queries, plain_encode(plain)
    result: dict[str, Any] = {
        "device": embedder.device,
        "device_name": device_name(embedder.device),
        "dtype": str(next(plain.parameters()).dtype).replace("torch.", ""),
        "model": args.model_path or MODEL_NAME,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "quick": args.quick,
        "plan": asdict(plan),
        "batcher": {"max_batch_texts": embedder.query_batcher().max_batch_texts},
        "cuda_graphs": embedder.graphed,
    }
    print(f"device: {result['device']} ({result['device_name']}), {result['dtype']}, torch {torch.__version__}")
    encoders = {"lean": lean, "batcher": batched, "sentence_transformers": baseline}
    singles = single_queries(encoders, queries[: plan.single_query_repeats])
    result["single_query"] = {name: asdict(measured) for name, measured in singles.items()}
    result["concurrency"] = {"batcher": [], "sentence_transformers": []}
    for callers in plan.callers:
        for name, encode in (("batcher", batched), ("sentence_transformers", baseline)):
            measured = concurrent_queries(encode, callers, plan.phase_s, queries)
            result["concurrency"][name].append(asdict(measured))
            print(f"  {name:>22} x{callers:<4} {measured.queries_per_s:10.0f} q/s  p50 {measured.p50_ms:8.2f} ms")
    result["in_flight"] = []
    for in_flight in plan.in_flight:
        measured = queries_in_flight(embedder.query_batcher(), in_flight, plan.phase_s, queries)
        result["in_flight"].append(asdict(measured))
        rate, p50 = measured.queries_per_s, measured.p50_ms
        print(f"  {'batcher, in flight':>22} x{in_flight:<4} {rate:10.0f} q/s  p50 {p50:8.2f} ms")
    texts = passages(plan.bulk_passages)
    result["bulk_passages_per_s"] = {
        "encode_in_chunks": bulk(embedder.encode_in_chunks, texts),
        "sentence_transformers": bulk(plain_encode(plain, plan.bulk_batch_texts), texts),
    }
    result["batcher"]["largest_batch_texts"] = embedder.query_batcher().stats.largest_batch_texts
    result["goals"] = check_goals(result)
    embedder.close()
    return result


def check_goals(result: dict[str, Any]) -> dict[str, Any]:
    if not str(result["device"]).startswith("cuda"):
        return {"checked": False, "why": "the goals are for an H100/H200; this run is not on CUDA", **GOALS}
    single = min(result["single_query"]["lean"]["p50_ms"], result["single_query"]["batcher"]["p50_ms"])
    batched = max(row["queries_per_s"] for row in [*result["concurrency"]["batcher"], *result["in_flight"]])
    bulk_rate = result["bulk_passages_per_s"]["encode_in_chunks"]
    return {
        "checked": True,
        **GOALS,
        "single_query_p50_ms": single,
        "single_query_met": single <= GOALS["single_query_p50_ms_max"],
        "batched_queries_per_s": batched,
        "batched_met": batched >= GOALS["batched_queries_per_s_min"],
        "bulk_passages_per_s": bulk_rate,
        "bulk_met": bulk_rate >= GOALS["bulk_passages_per_s_min"],
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"embedding on {result['device']} — {result['device_name']} ({result['dtype']})", ""]
    lines.append(f"{'single query':<34}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in result["single_query"].items():
        lines.append(f"  {name:<32}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    header = f"{'short queries, concurrent callers':<34}{'batcher q/s':>14}{'p50 ms':>9}{'plain q/s':>12}{'p50 ms':>9}"
    lines += ["", header]
    for ours, theirs in zip(
        result["concurrency"]["batcher"], result["concurrency"]["sentence_transformers"], strict=True
    ):
        lines.append(
            f"  {ours['callers']:>5} callers{'':<21}{ours['queries_per_s']:>14.0f}{ours['p50_ms']:>9.2f}"
            f"{theirs['queries_per_s']:>12.0f}{theirs['p50_ms']:>9.2f}"
        )
    lines += ["", f"{'short queries, submitted in flight':<34}{'batcher q/s':>14}{'p50 ms':>9}"]
    for row in result.get("in_flight", []):
        lines.append(f"  {row['callers']:>5} in flight{'':<19}{row['queries_per_s']:>14.0f}{row['p50_ms']:>9.2f}")
    lines += ["", f"{'bulk, 120-word passages':<34}{'passages/s':>14}"]
    for name, rate in result["bulk_passages_per_s"].items():
        lines.append(f"  {name:<32}{rate:>14.0f}")
    goals = result["goals"]
    if goals.get("checked"):
        lines += ["", "goals (H100/H200): " + ", ".join(f"{k}={goals[k]}" for k in goals if k.endswith("_met"))]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (single, conc, bulk_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(result["single_query"])
    single.bar(names, [result["single_query"][n]["p50_ms"] for n in names], color=["C0", "C2", "C1"])
    single.set_ylabel("p50 ms (lower is better)")
    single.set_title("one short query")
    for name, color in (("batcher", "C0"), ("sentence_transformers", "C1")):
        rows = result["concurrency"][name]
        conc.plot([r["callers"] for r in rows], [r["queries_per_s"] for r in rows], "o-", color=color, label=name)
    rows = result.get("in_flight", [])
    conc.plot([r["callers"] for r in rows], [r["queries_per_s"] for r in rows], "s--", color="C2", label="in flight")
    conc.set_xscale("log", base=2)
    conc.set_xlabel("concurrent callers (or requests in flight)")
    conc.set_ylabel("queries/s (higher is better)")
    conc.set_title("short queries, one at a time per caller")
    conc.legend()
    bulk_names = list(result["bulk_passages_per_s"])
    bulk_ax.bar(bulk_names, [result["bulk_passages_per_s"][n] for n in bulk_names], color=["C0", "C1"])
    bulk_ax.set_ylabel("passages/s (higher is better)")
    bulk_ax.set_title(f"bulk, {PASSAGE_WORDS}-word passages")
    fig.suptitle(f"memq embedding: {result['device_name']} ({result['dtype']}, torch {result['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="short phases and a small bulk set")
    parser.add_argument("--model-path", default="", help="a local model directory (e.g. an fp16 copy)")
    parser.add_argument("--bulk-passages", type=int, default=0, help="override the bulk set's size")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    print()
    print(table(result))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"embed_{slug(result['device'], result['device_name'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
