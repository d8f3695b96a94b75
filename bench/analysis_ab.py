"""memq's lexical analysis against the English-only one it replaced, side by side in one run: lexical-only
recall@5/10 on LoCoMo (its dev conversations; must not drop) and on a small multilingual set (Chinese, Japanese,
Korean, Russian, emoji, decomposed accents, full-width Latin). Both use memq's BM25 parameters over the same text
memq indexes (content and context). Prints a table, writes ``bench/results/analysis_ab.json``.

    python -m bench.analysis_ab --data ../shared/data/locomo-dev.zip
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import bm25s
import numpy as np

from bench.locomo_bench import RESULTS, conversation, load_samples, scores
from bench.pipeline_bench import machine
from memq.workers.search import lexical

Analyser = Callable[[Sequence[str]], list[list[str]]]

MULTILINGUAL = [
    ("我喜欢吃泰国咖喱", ["咖喱", "泰国菜"]),
    ("私は毎朝コーヒーを飲みます", ["コーヒー", "毎朝"]),
    ("저는 주말마다 등산을 합니다", ["등산", "주말마다"]),
    ("Он любит кататься на лыжах зимой", ["лыжах", "зимой"]),
    ("Friday night is 🍕 night with the kids", ["🍕"]),
    (unicodedata.normalize("NFD", "Zoë moved to Köln last spring"), ["Köln", "zoë"]),
    ("Ｒｅｓｅｒｖｅｄ a table at Ｌｅ Ｂｅｒｎａｒｄｉｎ", ["bernardin reservation"]),
    ("Η γιαγιά μου μένει στην Αθήνα", ["Αθήνα"]),
    ("Elle adore le café au lait", ["CAFÉ"]),
    ("The runners were running through the park", ["run in the park"]),
]


def english_only(texts: Sequence[str]) -> list[list[str]]:
    """The analysis before: bm25s's tokeniser (lowercase, \\w\\w+), NLTK English stop words, Snowball stems."""
    stemmer = lexical._stemmer()
    return bm25s.tokenize(
        list(texts), stopwords=lexical.STOPWORDS, stemmer=stemmer, return_ids=False, show_progress=False
    )


def ranked_ids(analyse: Analyser, ids: list[str], documents: list[str], queries: list[str], k: int) -> list[list[str]]:
    index = bm25s.BM25(k1=lexical.BM25_K1, b=lexical.BM25_B, method=lexical.BM25_METHOD)
    index.index(analyse(documents), show_progress=False)
    out = []
    for terms in analyse(queries):
        if not terms:
            out.append([])
            continue
        found = np.asarray(index.get_scores(terms))
        top = [int(i) for i in np.argsort(-found, kind="stable")[:k] if found[i] > 0]
        out.append([ids[i] for i in top])
    return out


def locomo(path: Path, analyse: Analyser) -> dict[str, float]:
    convs = [conversation(name, sample, Counter(), None) for name, sample in load_samples(path)]
    all_ranked, all_evidence = [], []
    for conv in convs:
        ids = [item["id"] for item in conv.items]
        documents = [f"{item['content']} {item.get('context', '')}" for item in conv.items]
        all_ranked += ranked_ids(analyse, ids, documents, [q for q, _ in conv.questions], 10)
        all_evidence += [ev for _, ev in conv.questions]
    return scores(all_ranked, all_evidence)


def multilingual(analyse: Analyser) -> dict[str, float]:
    ids = [str(i) for i in range(len(MULTILINGUAL))]
    documents = [text for text, _ in MULTILINGUAL]
    queries = [(query, str(i)) for i, (_, asked) in enumerate(MULTILINGUAL) for query in asked]
    ranked = ranked_ids(analyse, ids, documents, [q for q, _ in queries], 10)
    return scores(ranked, [[expected] for _, expected in queries])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="LoCoMo conversations: a zip, folder or JSON file")
    args = parser.parse_args()
    analysers: dict[str, Analyser] = {"english_only (before)": english_only, "memq (now)": lexical.analyse}
    report = {
        name: {"locomo": locomo(args.data, fn), "multilingual": multilingual(fn)} for name, fn in analysers.items()
    }
    print(f"{'analysis':<24} {'LoCoMo R@5':>10} {'LoCoMo R@10':>11} {'multi R@5':>9} {'multi hit@10':>12}")
    for name, row in report.items():
        print(
            f"{name:<24} {row['locomo']['recall@5']:>10.4f} {row['locomo']['recall@10']:>11.4f} "
            f"{row['multilingual']['recall@5']:>9.3f} {row['multilingual']['hit@10']:>12.3f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "analysis_ab.json").write_text(json.dumps({"machine": machine(), "report": report}, indent=1))
    print(f"wrote {RESULTS / 'analysis_ab.json'}")


if __name__ == "__main__":
    main()
