"""BM25 over one (tenant, memory type)'s memories, in the search worker, beside the cosine matrix.

memq's own index, kept up to date write by write (``bm25s``, the reference the parity test keeps, builds a static
index only): postings live in immutable segments, the rows added since the last segment in a small term-sorted
``Tail``; a ``LexicalIndex`` is one snapshot of them, scored exactly as an index freshly built from its alive rows
(Lucene BM25, as ``bm25s`` ``method="lucene"``). Analysis (``analyse``), the same for memories and queries: NFKC and
case folding; CJK runs as overlapping bigrams; pictographic symbols one term each; other words as ``bm25s``
tokenises them (English stop words dropped, Snowball stemming). Why, and the parameters: docs/architecture.md,
"Lexical search".
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN_PLUS

from memq.core.field_rules import text_form

BM25_K1 = 0.9
BM25_B = 0.4
BM25_METHOD = "lucene"
STOPWORDS = frozenset(STOPWORDS_EN_PLUS)  # NLTK's English stop words, as bm25s ships them
WORD = re.compile(r"(?u)\b\w\w+\b")  # bm25s's token pattern: words of two or more letters or digits
STEMMER_LANGUAGE = "english"
VOCABULARY_ENTRY_BYTES = 2 * 50  # a dict entry and its int id per term, with slack (CPython 3.11)
TERM_STRING_BYTES = 56  # a short str object (CPython 3.11: 49 bytes plus its characters)
SEGMENT_MERGE_RATIO = 4  # the newest segment is merged into the one before once it is a quarter of its size
MAX_SEGMENTS = 8  # and whatever their sizes, a search never reads more segments than this
TAIL_MAX_POSTINGS = 2048  # postings the tail holds before it becomes a segment: a commit copies and sorts them

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
    """The text form (``memq.core.field_rules.text_form``), case-folded: what every memory and query is compared as."""
    return text_form(text).casefold()


def analyse(texts: Sequence[str]) -> list[list[str]]:
    """Each text's terms, as the index and the queries see them (ASCII has no CJK run nor symbol term, and its
    punctuation splits words as the space replacing it would)."""
    normalised = [normalise(text) for text in texts]
    extra = [[] if text.isascii() else _cjk_bigrams(text) + _symbols(text) for text in normalised]
    words_only = [text if text.isascii() else SYMBOL.sub(" ", CJK_RUN.sub(" ", text)) for text in normalised]
    return [terms + more for terms, more in zip(_words(words_only), extra, strict=True)]


def _words(texts: Sequence[str]) -> list[list[str]]:
    """Each text's words as ``bm25s.tokenize`` gives them (lower-cased, split, stop words dropped, stemmed)."""
    split = [[word for word in WORD.findall(text.lower()) if word not in STOPWORDS] for text in texts]
    unique = list(dict.fromkeys(word for words in split for word in words))
    stems = dict(zip(unique, _stemmer().stemWords(unique), strict=True))
    return [[stems[word] for word in words] for words in split]


def _cjk_bigrams(text: str) -> list[str]:
    terms: list[str] = []
    for run in CJK_RUN.findall(text):
        terms += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
    return terms


def _symbols(text: str) -> list[str]:
    return [char for char in SYMBOL.findall(text) if unicodedata.category(char) == "So"]


@dataclass(frozen=True)
class Segment:
    """The postings of some rows, grouped by term: term ``t``'s rows are ``rows[starts[t]:starts[t + 1]]`` (ascending)
    and ``counts`` how often it occurs in each; a term id past ``starts`` has none here. Never modified."""

    starts: np.ndarray  # int64, one more than the vocabulary when it was built
    rows: np.ndarray  # int32
    counts: np.ndarray  # float32 term frequencies

    @property
    def size(self) -> int:
        return int(self.rows.size)

    def postings(self, term_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = (self.starts[term_id], self.starts[term_id + 1]) if term_id + 1 < self.starts.size else (0, 0)
        return self.rows[start:end], self.counts[start:end]

    def term_ids(self) -> np.ndarray:
        """Each posting's term id."""
        return np.repeat(np.arange(self.starts.size - 1, dtype=np.int32), np.diff(self.starts))

    def nbytes(self) -> int:
        return self.starts.nbytes + self.rows.nbytes + self.counts.nbytes


@dataclass(frozen=True)
class Tail:
    """The postings of the rows added since the last segment, sorted by (term, row): what a commit of a few rows
    rebuilds in O(its size), with no array as long as the vocabulary. Never modified."""

    terms: np.ndarray  # int32
    rows: np.ndarray  # int32
    counts: np.ndarray  # float32

    @property
    def size(self) -> int:
        return int(self.rows.size)

    def postings(self, term_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = np.searchsorted(self.terms, term_id), np.searchsorted(self.terms, term_id, side="right")
        return self.rows[start:end], self.counts[start:end]

    def nbytes(self) -> int:
        return self.terms.nbytes + self.rows.nbytes + self.counts.nbytes


EMPTY_TAIL = Tail(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))


def build_segment(term_ids: np.ndarray, rows: np.ndarray, counts: np.ndarray, vocabulary_size: int) -> Segment:
    """A segment of postings whose rows ascend within each term (row order, or a tail followed by later rows)."""
    order = np.argsort(term_ids, kind="stable")
    starts = np.zeros(vocabulary_size + 1, dtype=np.int64)
    np.cumsum(np.bincount(term_ids, minlength=vocabulary_size), out=starts[1:])
    return Segment(starts, rows[order].astype(np.int32), counts[order].astype(np.float32))


class LexicalIndex:
    """BM25 scores of every row of one snapshot for a query: one float32 per row, 0 where no term matches and on
    rows not alive. ``LexicalIndex(texts)`` indexes ``texts`` as rows 0..n-1, all alive (a ``LexicalWriter`` makes
    the snapshots of a tenant that changes)."""

    vocabulary: dict[str, int]
    parts: tuple[Segment | Tail, ...]  # the writer's segments and tail when the snapshot was taken
    lengths: np.ndarray  # terms per row
    alive: np.ndarray | None  # the rows that count (None: all)
    alive_rows: int
    total_length: int

    def __init__(self, texts: Sequence[str] = ()) -> None:
        writer = LexicalWriter()
        writer.add(0, texts)
        writer.commit(None)
        self.__dict__.update(writer.view(len(texts), None).__dict__)

    @property
    def size(self) -> int:
        return int(self.lengths.size)

    def scores(self, query: str) -> np.ndarray:
        scores = np.zeros(self.size, dtype=np.float32)
        term_ids = [self.vocabulary[term] for term in analyse([query])[0] if term in self.vocabulary]
        if not term_ids or self.alive_rows == 0:
            return scores
        average_length = self.total_length / self.alive_rows or 1.0
        for term_id in term_ids:  # a repeated query term counts again, as in bm25s
            rows, counts = self._postings(term_id)
            if rows.size == 0:
                continue
            idf = math.log(1 + (self.alive_rows - rows.size + 0.5) / (rows.size + 0.5))
            relative_length = self.lengths[rows] / average_length
            scores[rows] += idf * counts / (counts + BM25_K1 * (1 - BM25_B + BM25_B * relative_length))
        return scores

    def _postings(self, term_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The alive rows holding ``term_id`` in this snapshot, and the term's count in each."""
        found = [pair for pair in (part.postings(term_id) for part in self.parts) if pair[0].size]
        if not found:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        rows, counts = found[0] if len(found) == 1 else (np.concatenate(pair) for pair in zip(*found, strict=True))
        if self.alive is not None:
            live = self.alive[rows]
            rows, counts = rows[live], counts[live]
        return rows, counts

    def nbytes(self) -> int:
        """Memory held by the index: its postings and lengths, and its vocabulary (each term's string and its dict
        entry, estimated from the term count)."""
        postings = sum(part.nbytes() for part in self.parts)
        return postings + self.lengths.nbytes + len(self.vocabulary) * (VOCABULARY_ENTRY_BYTES + TERM_STRING_BYTES)


class LexicalWriter:
    """The BM25 index of one (tenant, type) as it changes, for one writer at a time (the caller's lock).

    ``add`` analyses texts as new rows, ``commit`` files what was added in the tail (past ``TAIL_MAX_POSTINGS``,
    the tail becomes a segment and small segments are merged), ``remove`` takes a row out of the statistics (its
    postings are dropped at the next merge; a snapshot's ``alive`` mask hides them until then), ``view`` is a
    snapshot for searches."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}
        self.segments: tuple[Segment, ...] = ()
        self.tail = EMPTY_TAIL
        self.lengths = np.zeros(1024, dtype=np.int32)  # per row; rows once written never change
        self.rows = 0
        self.alive_rows = 0
        self.total_length = 0
        self._staged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, first_row: int, texts: Sequence[str]) -> None:
        """Index ``texts`` as rows ``first_row``, ``first_row + 1``, ... (after every row added before)."""
        if not texts:
            return
        terms: list[int] = []
        rows: list[int] = []
        counts: list[int] = []
        doc_lengths = []
        for row, doc_terms in enumerate(analyse(texts), first_row):
            counted = Counter([self.vocabulary.setdefault(term, len(self.vocabulary)) for term in doc_terms])
            term_ids = sorted(counted)
            terms += term_ids
            rows += [row] * len(term_ids)
            counts += [counted[term_id] for term_id in term_ids]
            doc_lengths.append(len(doc_terms))
        self._staged.append((np.array(terms, np.int32), np.array(rows, np.int32), np.array(counts, np.float32)))
        self._set_lengths(first_row, doc_lengths)
        self.alive_rows += len(texts)
        self.total_length += sum(doc_lengths)

    def remove(self, row: int) -> None:
        self.alive_rows -= 1
        self.total_length -= int(self.lengths[row])

    def commit(self, alive: np.ndarray | None) -> None:
        """What was added since the last commit joins the tail; a tail past ``TAIL_MAX_POSTINGS`` becomes a segment
        and small segments are merged (``alive``: the rows still alive, whose postings a merge keeps; ``None``:
        all)."""
        if not self._staged:
            return
        parts = [(self.tail.terms, self.tail.rows, self.tail.counts), *self._staged]
        terms, rows, counts = map(np.concatenate, zip(*parts, strict=True))
        self._staged = []
        if terms.size <= TAIL_MAX_POSTINGS:
            order = np.argsort(terms, kind="stable")  # the tail's rows, then later ones: (term, row) order
            self.tail = Tail(terms[order], rows[order], counts[order])
            return
        self.tail = EMPTY_TAIL
        segments = [*self.segments, build_segment(terms, rows, counts, len(self.vocabulary))]
        while len(segments) > 1 and (
            segments[-1].size * SEGMENT_MERGE_RATIO >= segments[-2].size or len(segments) > MAX_SEGMENTS
        ):
            segments[-2:] = [self._merged(segments[-2], segments[-1], alive)]
        self.segments = tuple(segment for segment in segments if segment.size)

    def _merged(self, older: Segment, newer: Segment, alive: np.ndarray | None) -> Segment:
        terms = np.concatenate([older.term_ids(), newer.term_ids()])
        rows = np.concatenate([older.rows, newer.rows])
        counts = np.concatenate([older.counts, newer.counts])
        if alive is not None:
            live = alive[rows]
            terms, rows, counts = terms[live], rows[live], counts[live]
        order = np.argsort(rows, kind="stable")  # row order, so each term's rows stay ascending
        return build_segment(terms[order], rows[order], counts[order], len(self.vocabulary))

    def view(self, rows: int, alive: np.ndarray | None) -> LexicalIndex:
        """A snapshot of rows ``0..rows-1`` (``alive``: which of them count; ``None``: all)."""
        view = LexicalIndex.__new__(LexicalIndex)
        view.parts = (*self.segments, self.tail) if self.tail.size else self.segments
        view.vocabulary, view.lengths, view.alive = self.vocabulary, self.lengths[:rows], alive
        view.alive_rows, view.total_length = self.alive_rows, self.total_length
        return view

    def _set_lengths(self, first_row: int, doc_lengths: list[int]) -> None:
        end = first_row + len(doc_lengths)
        if end > self.lengths.size:  # a new array: the snapshots hold views of the old one, which stays as it was
            grown = np.zeros(max(end, 2 * self.lengths.size), dtype=np.int32)
            grown[: self.rows] = self.lengths[: self.rows]
            self.lengths = grown
        self.lengths[first_row:end] = doc_lengths
        self.rows = end
