"""BM25 over one (tenant, memory type)'s memories, in the search worker, beside the cosine matrix.

Built by ``bm25s`` (a maintained BM25 that keeps the index as a sparse matrix and scores every document in
one sparse column sum) from the same documents as the matrix, and cached with it (``workers.search``), so a
write makes both unreachable at once. A memory is indexed with its ``content`` and the ``context`` its writer
supplied beside it. Analysis (``analyse``), the same for memories and queries:

- Unicode NFKC, then case folding: NFD and NFC spellings, full-width and compatibility forms, and case all meet;
- Chinese, Japanese and Korean runs (Han, Hiragana, Katakana, Hangul), which have no spaces between words:
  overlapping character bigrams (a run of one character: that character), so "咖喱" finds "我喜欢吃泰国咖喱";
- emoji and other pictographic symbols (Unicode category So): one term each;
- everything else: words of two or more letters or digits, English stop words (NLTK's list) dropped, Snowball
  English stemming (PyStemmer), exactly as bm25s tokenises; other alphabetic languages get words without stemming
  or stop words (the English stemmer leaves them as they are).

Parameters: ``BM25_K1``, ``BM25_B`` (Lucene's variant of
the formula), chosen on the LoCoMo dev conversations (README, "Retrieval quality").
"""

from __future__ import annotations

import re
import sys
import threading
import unicodedata
from collections.abc import Sequence

import bm25s
import numpy as np
import Stemmer

BM25_K1 = 0.9
BM25_B = 0.4
BM25_METHOD = "lucene"
STOPWORDS = "en_plus"  # NLTK's English stop words, as bm25s ships them
STEMMER_LANGUAGE = "english"
VOCABULARY_ENTRY_BYTES = 2 * 50  # a dict entry and a set entry per term, their int ids included (CPython 3.11)

_per_thread = threading.local()  # a PyStemmer stemmer is not thread-safe: each search thread gets its own


def _stemmer() -> Stemmer.Stemmer:
    stemmer = getattr(_per_thread, "stemmer", None)
    if stemmer is None:
        stemmer = _per_thread.stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
    return stemmer


# Scripts written without spaces between words: CJK ideographs (and extensions, compatibility), Hiragana,
# Katakana (with the prolonged sound mark), Bopomofo, Hangul syllables and jamo.
CJK_RANGES = "\u1100-\u11ff\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
CJK_RUN = re.compile(f"[{CJK_RANGES}]+")
SYMBOL = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """NFKC, then case folding: what every memory and query is compared as."""
    return unicodedata.normalize("NFKC", text).casefold()


def analyse(texts: Sequence[str]) -> list[list[str]]:
    """Each text's terms, as the index and the queries see them."""
    normalised = [normalise(text) for text in texts]
    extra = [_cjk_bigrams(text) + _symbols(text) for text in normalised]
    words_only = [SYMBOL.sub(" ", CJK_RUN.sub(" ", text)) for text in normalised]
    words = bm25s.tokenize(words_only, stopwords=STOPWORDS, stemmer=_stemmer(), return_ids=False, show_progress=False)
    return [list(terms) + more for terms, more in zip(words, extra, strict=True)]


def _cjk_bigrams(text: str) -> list[str]:
    terms: list[str] = []
    for run in CJK_RUN.findall(text):
        terms += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
    return terms


def _symbols(text: str) -> list[str]:
    return [char for char in SYMBOL.findall(text) if unicodedata.category(char) == "So"]


class LexicalIndex:
    """BM25 scores of every document for a query: one float32 per document, 0 where no term matches."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        terms = analyse(texts)
        self._bm25: bm25s.BM25 | None = None
        if any(terms):
            self._bm25 = bm25s.BM25(k1=BM25_K1, b=BM25_B, method=BM25_METHOD)
            self._bm25.index(terms, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        terms = analyse([query])[0]
        if self._bm25 is None or not terms:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)

    def nbytes(self) -> int:
        """Memory held by the index: its arrays (the sparse score matrix) and its vocabulary (each term's string
        and its entries in bm25s's term dict and id set, ``VOCABULARY_ENTRY_BYTES`` each besides the string)."""
        if self._bm25 is None:
            return 0
        arrays = [value for value in self._bm25.scores.values() if isinstance(value, np.ndarray)]
        vocabulary = getattr(self._bm25, "vocab_dict", None) or {}
        terms_bytes = sum(sys.getsizeof(term) + VOCABULARY_ENTRY_BYTES for term in vocabulary)
        return sum(array.nbytes for array in arrays) + terms_bytes
