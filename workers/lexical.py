"""BM25 over one (tenant, memory type)'s memories, in the search worker, beside the cosine matrix.

Built by ``bm25s`` (a maintained BM25 that keeps the index as a sparse matrix and scores every document in
one sparse column sum) from the same documents as the matrix, and cached with it (``workers.search``), so a
write makes both unreachable at once. A memory is indexed with its ``content`` and the ``context`` its writer
supplied beside it. Analysis: lowercase, words of two or more letters or digits, English stop words (NLTK's
list) dropped, Snowball English stemming (PyStemmer). Parameters: ``BM25_K1``, ``BM25_B`` (Lucene's variant of
the formula), chosen on the LoCoMo dev conversations (README, "Retrieval quality").
"""

from __future__ import annotations

import sys
import threading
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


def analyse(texts: Sequence[str]) -> list[list[str]]:
    """Each text's terms, as the index and the queries see them."""
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, stemmer=_stemmer(), return_ids=False, show_progress=False)


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
