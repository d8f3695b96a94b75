"""memq's retrieval quality on LoCoMo, beside two baselines over the same memory texts: recall@5/10, hit@5/10,
and latency. Prints a table, writes ``bench/results/locomo.json`` and ``locomo.png``.

LoCoMo ("Evaluating Very Long-Term Conversational Memory of LLM Agents", ACL 2024) is in the public repository
snap-research/locomo, file ``data/locomo10.zip`` (CC BY-NC 4.0, research evaluation). Download it yourself and
pass its path; never commit it to this repository.

    python -m bench.locomo_bench --data PATH/locomo10.zip                                           # full run
    python -m bench.locomo_bench --data PATH/locomo10.zip --limit-conversations 1 --limit-questions 30  # quick

Each conversation is one tenant; each turn one ``conversation_memory``: ``content`` is ``"Speaker: text"``,
``context`` (indexed lexically only) its photo caption and the turn before it (``context_text``). Every question with
evidence (category 5, adversarial, left out) is asked of memq in each mode (hybrid, vector, lexical) and of
(a) brute-force MiniLM cosine over the contents and (b) plain BM25 (``bm25s`` defaults, English stopwords, no
stemmer) over contents and contexts, the same text memq's BM25 sees.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline_bench import machine, summary
from memq.ops import services

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("hybrid", "vector", "lexical")
K = 10
BATCH = 1000
SESSION_KEY = re.compile(r"session_(\d+)")


@dataclass
class Conversation:
    name: str
    memory_id: str
    items: list[dict[str, Any]] = field(default_factory=list)
    questions: list[tuple[str, list[str]]] = field(default_factory=list)  # (question, evidence dia_ids)


def load_samples(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file stem, parsed JSON) for each conversation file in a zip, a directory or one JSON file."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".json") and "__MACOSX" not in m]
            files = [(Path(m).stem, json.loads(archive.read(m))) for m in sorted(members)]
    elif path.is_dir():
        files = [(p.stem, json.loads(p.read_text())) for p in sorted(path.glob("*.json"))]
    else:
        files = [(path.stem, json.loads(path.read_text()))]
    samples = []
    for stem, data in files:  # locomo10.json holds a list of samples; the split files one each
        for i, sample in enumerate(data if isinstance(data, list) else [data]):
            name = sample.get("sample_id") or (f"{stem}-{i}" if isinstance(data, list) else stem)
            samples.append((str(name), sample))
    return samples


def session_date(text: str) -> str:
    """``1:47 pm on 18 May, 2023`` -> ISO-8601, UTC."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC).isoformat()


def memory_text(turn: dict[str, Any]) -> str:
    """A turn's ``content``: what is embedded, returned and indexed."""
    return f"{turn['speaker']}: {turn['text']}"


def context_text(turn: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """A turn's ``context``, text its writer supplies beside it (indexed lexically only): the photo it shares, and
    the turn before it in the same session."""
    parts = [f"[photo: {turn['blip_caption']}]"] if turn.get("blip_caption") else []
    if previous is not None:
        parts.append(f"[previous: {memory_text(previous)} {context_text(previous, None)}]")
    return " ".join(parts)


def evidence_ids(raw: list[str], known: set[str]) -> tuple[list[str], int]:
    """The evidence's dia_ids that name a turn (``"D1:3; D1:4"`` split), and how many tokens named none."""
    tokens = [t for entry in raw for t in re.split(r"[;,\s]+", str(entry)) if t]
    kept = list(dict.fromkeys(t for t in tokens if t in known))
    return kept, sum(t not in known for t in tokens)


def conversation(name: str, sample: dict[str, Any], dropped: Counter[str], limit: int | None) -> Conversation:
    conv = sample.get("conversation", sample)
    out = Conversation(name, f"locomo-{name}")
    sessions = sorted((int(m.group(1)), k) for k in conv if (m := SESSION_KEY.fullmatch(k)))
    for _, key in sessions:
        created_at = session_date(conv[f"{key}_date_time"])
        previous = None
        for turn in conv[key]:
            item = {
                "id": turn["dia_id"],
                "content": memory_text(turn),
                "created_at": created_at,
                "role": turn["speaker"],
            }
            context = context_text(turn, previous)
            if context:
                item["context"] = context
            out.items.append(item)
            previous = turn
    known = {item["id"] for item in out.items}
    for qa in sample.get("qa", []):
        if qa.get("category") == 5:
            dropped["adversarial_questions"] += 1
            continue
        evidence, unmatched = evidence_ids(qa.get("evidence") or [], known)
        dropped["unmatched_evidence_ids"] += unmatched
        if not evidence:
            dropped["questions_without_matching_evidence"] += 1
            continue
        out.questions.append((qa["question"], evidence))
    out.questions = out.questions[:limit]
    return out


def scores(ranked: list[list[str]], evidence: list[list[str]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(evidence)}
    for k in (5, 10):
        found = [len(set(ids[:k]) & set(ev)) for ids, ev in zip(ranked, evidence, strict=True)]
        out[f"recall@{k}"] = float(np.mean([f / len(ev) for f, ev in zip(found, evidence, strict=True)]))
        out[f"hit@{k}"] = float(np.mean([f > 0 for f in found]))
    return out


def run_memq(convs: list[Conversation], modes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ingest every conversation, ask each question in each mode: ranked ids per mode, latencies, ingest."""
    from memq import remember, retrieve

    total = sum(len(c.items) for c in convs)
    started = time.perf_counter()
    for conv in convs:
        for start in range(0, len(conv.items), BATCH):
            remember(conv.memory_id, "conversation_memory", conv.items[start : start + BATCH])
    ingest = {"memories": total, "seconds": time.perf_counter() - started}
    print(f"ingested {total} memories in {ingest['seconds']:.1f} s", file=sys.stderr)
    ranked: dict[str, Any] = {m: {c.name: [] for c in convs} for m in modes}
    latency: dict[str, list[float]] = {m: [] for m in modes}
    for conv in convs:
        for n, (question, _) in enumerate(conv.questions, 1):
            for mode in modes:  # interleaved, so noise hits every mode alike
                t0 = time.perf_counter()
                result = retrieve(question, conv.memory_id, {"conversation_memory": K}, mode=mode, timeout_s=60)
                latency[mode].append((time.perf_counter() - t0) * 1000)
                ranked[mode][conv.name].append([item["id"] for item in result["results"]["conversation_memory"]])
            print(f"\r{conv.name}: {n}/{len(conv.questions)} questions", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return {"ranked": ranked, "latency": latency}, ingest


def run_baselines(convs: list[Conversation]) -> dict[str, dict[str, list[list[str]]]]:
    """Brute-force MiniLM cosine and plain BM25, outside memq, over the same texts: ranked ids."""
    import bm25s

    from memq.workers.embedding.embedder import Embedder

    embedder = Embedder("all-MiniLM-L6-v2", "cpu")
    out: dict[str, dict[str, list[list[str]]]] = {"minilm_cosine": {}, "bm25": {}}
    for conv in convs:
        ids = [item["id"] for item in conv.items]
        texts = [item["content"] for item in conv.items]
        indexed = [f"{item['content']} {item.get('context', '')}" for item in conv.items]  # what memq's BM25 sees
        questions = [q for q, _ in conv.questions]
        k = min(K, len(texts))
        similarity = embedder.encode(questions) @ embedder.encode(texts).T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        out["minilm_cosine"][conv.name] = [[ids[i] for i in row] for row in top]
        index = bm25s.BM25()
        index.index(bm25s.tokenize(indexed, stopwords="en", show_progress=False), show_progress=False)
        docs, _ = index.retrieve(
            bm25s.tokenize(questions, stopwords="en", show_progress=False), k=k, show_progress=False
        )
        out["bm25"][conv.name] = [[ids[int(i)] for i in row] for row in docs]
        print(f"baselines: {conv.name} done", file=sys.stderr)
    return out


def evaluate(convs: list[Conversation], ranked: dict[str, dict[str, list[list[str]]]]) -> dict[str, Any]:
    overall, per_conversation = {}, {}
    for name, by_conv in ranked.items():
        all_ranked = [r for c in convs for r in by_conv[c.name]]
        overall[name] = scores(all_ranked, [ev for c in convs for _, ev in c.questions])
        per_conversation[name] = {
            c.name: scores(by_conv[c.name], [ev for _, ev in c.questions])["recall@10"] for c in convs
        }
    return {"retrievers": overall, "per_conversation_recall@10": per_conversation}


def start_and_run(convs: list[Conversation], modes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Local Redis, MongoDB (a fresh database) and a worker fleet, as ``bench.pipeline_bench`` starts them."""
    broker = os.environ.get("MEMQ_BROKER_URL")
    redis_service = services.ensure_redis(broker) if broker else services.start_redis_server()
    mongo_service = services.ensure_mongodb(os.environ.get("MEMQ_MONGODB_URI"))
    database = f"memq_locomo_{datetime.now(UTC):%Y%m%d_%H%M%S}_{os.getpid()}"
    env = services.memq_env(
        os.environ,
        redis_service.url,
        mongo_service.url,
        MEMQ_MONGODB_DB=database,
        MEMQ_RESULT_CACHE_TTL_S="0",  # and the embedding cache: each mode embeds its query (modes are asked in turn)
    )
    os.environ.update(env)  # before memq's client is imported: it uses the same Redis and MongoDB
    fleet = services.Fleet(env)
    with services.running(redis_service, mongo_service):
        try:
            from memq.client.app import app

            fleet.wait_ready(app, [fleet.start(kind) for kind in services.WORKER_KINDS])
            return run_memq(convs, modes)
        finally:
            fleet.stop_all()
            gc.collect()  # release pending AsyncResults while their Redis is still up
            drop_database(mongo_service.url, database)


def drop_database(uri: str, database: str) -> None:
    import pymongo

    try:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000) as client:
            client.drop_database(database)
    except Exception as exc:  # a leftover database is harmless; say so and go on
        print(f"could not drop {database}: {exc}", file=sys.stderr)


def print_report(report: dict[str, Any]) -> None:
    print(f"\nLoCoMo ({report['data']}): {report['conversations']} conversations, dropped: {report['dropped']}")
    print(
        f"{'retriever':<16}{'recall@5':>10}{'recall@10':>11}{'hit@5':>8}{'hit@10':>8}{'p50 ms':>9}{'p95 ms':>9}{'n':>6}"
    )
    for name, s in report["retrievers"].items():
        p50, p95 = s.get("p50_ms", float("nan")), s.get("p95_ms", float("nan"))
        print(
            f"{name:<16}{s['recall@5']:>10.3f}{s['recall@10']:>11.3f}{s['hit@5']:>8.3f}{s['hit@10']:>8.3f}"
            f"{p50:>9.1f}{p95:>9.1f}{s['n']:>6}"
        )
    per_conv = report["per_conversation_recall@10"]
    names = list(next(iter(per_conv.values())))
    print(f"\nrecall@10 per conversation\n{'retriever':<16}" + "".join(f"{n:>10}" for n in names))
    for retriever, values in per_conv.items():
        print(f"{retriever:<16}" + "".join(f"{values[n]:>10.3f}" for n in names))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["retrievers"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for offset, k in ((-0.2, 5), (0.2, 10)):
        values = [report["retrievers"][n][f"recall@{k}"] for n in names]
        bars = ax.bar(x + offset, values, 0.4, label=f"recall@{k}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of evidence turns retrieved")
    n = next(iter(report["retrievers"].values()))["n"]
    ax.set_title(f"LoCoMo retrieval: {report['conversations']} conversations, {n} questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="LoCoMo zip, directory of JSON files, or a file")
    parser.add_argument("--limit-conversations", type=int, default=None)
    parser.add_argument("--limit-questions", type=int, default=None, help="per conversation")
    parser.add_argument("--modes", default=",".join(MODES), help="memq modes, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {sorted(unknown)}")

    dropped: Counter[str] = Counter()
    samples = load_samples(args.data)[: args.limit_conversations]
    convs = [conversation(name, sample, dropped, args.limit_questions) for name, sample in samples]
    print(f"{len(convs)} conversations, {sum(len(c.questions) for c in convs)} questions; dropped {dict(dropped)}")
    memq_out, ingest = start_and_run(convs, modes)
    report: dict[str, Any] = {
        "data": args.data.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine() | {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "config": {"limit_conversations": args.limit_conversations, "limit_questions": args.limit_questions}
        | {"modes": modes, "k": K},
        "conversations": len(convs),
        "dropped": dict(dropped),
        "ingest": ingest | {"memories_per_s": ingest["memories"] / ingest["seconds"]},
    }
    ranked = {f"memq_{m}": memq_out["ranked"][m] for m in modes} | run_baselines(convs)
    report |= evaluate(convs, ranked)
    for mode in modes:
        report["retrievers"][f"memq_{mode}"] |= summary(memq_out["latency"][mode])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "locomo.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "locomo.png")
    print_report(report)
    print(f"\nwrote {args.out / 'locomo.json'} and {args.out / 'locomo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
