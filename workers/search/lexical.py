"""BM25 over one (tenant, memory type)'s memories, in the search worker, beside the cosine matrix.

The index is memq's own, kept up to date write by write: ``bm25s`` (the reference it replaced, still used by the
parity test) builds a static index, with no way to add or remove a document, so every write would rebuild it, which
at 50,000 memories took seconds. Here the postings (for each term, the rows it occurs in and how often) live in
immutable *segments*: the first load of a tenant builds one, each change applied after a write adds a small one,
and small segments are merged into larger ones as they accumulate (``LexicalWriter``), dropping the postings of
removed rows. A search reads a ``LexicalIndex``: the segments, the per-row document lengths and the alive rows of
one snapshot, so a change applied meanwhile never moves what it scores. Document frequencies, the number of
documents and the average length are counted over the snapshot's alive rows only, so its scores are exactly those
of an index freshly built from those rows: the Lucene variant of the formula, as ``bm25s`` computes it with
``method="lucene"`` (``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, ``tf / (tf + k1 (1 - b + b |d| / avgdl))``,
a query term repeated counts again, a term no document holds is left out), parameters ``BM25_K1``, ``BM25_B``
(chosen on the LoCoMo dev conversations: README, "Retrieval quality"). ``tests/test_change_log.py`` checks the
scores against ``bm25s`` and against a fresh index after random adds and removes.

A memory is indexed with its ``content`` and the ``context`` its writer supplied beside it. Analysis
(``analyse``), the same for memories and queries:

- Unicode NFKC, then case folding: NFD and NFC spellings, full-width and compatibility forms, and case all meet;
- Chinese, Japanese and Korean runs (Han, Hiragana, Katakana, Hangul), which have no spaces between words:
  overlapping character bigrams (a run of one character: that character), so "咖喱" finds "我喜欢吃泰国咖喱";
- emoji and other pictographic symbols (Unicode category So): one term each;
- everything else: words of two or more letters or digits, English stop words (NLTK's list) dropped, Snowball
  English stemming (PyStemmer), exactly as bm25s tokenises (its token pattern and stop words, without its
  per-call overhead: about 60 µs a text, on every query and every write applied); other
  alphabetic languages get words without stemming or stop words (the English stemmer leaves them as they are).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
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
    """Each text's terms, as the index and the queries see them."""
    normalised = [normalise(text) for text in texts]
    extra = [_cjk_bigrams(text) + _symbols(text) for text in normalised]
    words_only = [SYMBOL.sub(" ", CJK_RUN.sub(" ", text)) for text in normalised]
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

    def term_ids(self) -> np.ndarray:
        """Each posting's term id."""
        return np.repeat(np.arange(self.starts.size - 1, dtype=np.int32), np.diff(self.starts))

    def nbytes(self) -> int:
        return self.starts.nbytes + self.rows.nbytes + self.counts.nbytes


def build_segment(term_ids: np.ndarray, rows: np.ndarray, counts: np.ndarray, vocabulary_size: int) -> Segment:
    """A segment of postings given in row order (so each term's rows come out ascending)."""
    order = np.argsort(term_ids, kind="stable")
    starts = np.zeros(vocabulary_size + 1, dtype=np.int64)
    np.cumsum(np.bincount(term_ids, minlength=vocabulary_size), out=starts[1:])
    return Segment(starts, rows[order].astype(np.int32), counts[order].astype(np.float32))


class LexicalIndex:
    """BM25 scores of every row of one snapshot for a query: one float32 per row, 0 where no term matches and on
    rows not alive. ``LexicalIndex(texts)`` indexes ``texts`` as rows 0..n-1, all alive (a ``LexicalWriter`` makes
    the snapshots of a tenant that changes)."""

    def __init__(self, texts: Sequence[str] = ()) -> None:
        writer = LexicalWriter()
        writer.add(0, texts)
        writer.commit(None)
        view = writer.view(len(texts), None)
        self.__dict__.update(view.__dict__)

    @classmethod
    def of(
        cls,
        vocabulary: dict[str, int],
        segments: tuple[Segment, ...],
        lengths: np.ndarray,
        alive: np.ndarray | None,
        alive_rows: int,
        total_length: int,
    ) -> LexicalIndex:
        view = cls.__new__(cls)
        view.vocabulary, view.segments, view.lengths, view.alive = vocabulary, segments, lengths, alive
        view.size, view.alive_rows, view.total_length = int(lengths.size), alive_rows, total_length
        return view

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
        rows, counts = [], []
        for segment in self.segments:
            if term_id + 1 < segment.starts.size:
                start, end = segment.starts[term_id], segment.starts[term_id + 1]
                rows.append(segment.rows[start:end])
                counts.append(segment.counts[start:end])
        if not rows:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        found, tf = (rows[0], counts[0]) if len(rows) == 1 else (np.concatenate(rows), np.concatenate(counts))
        if self.alive is not None:
            live = self.alive[found]
            found, tf = found[live], tf[live]
        return found, tf

    def nbytes(self) -> int:
        """Memory held by the index: its postings and lengths, and its vocabulary (each term's string and its dict
        entry, ``VOCABULARY_ENTRY_BYTES`` besides the string; estimated from the term count)."""
        postings = sum(segment.nbytes() for segment in self.segments)
        return postings + self.lengths.nbytes + len(self.vocabulary) * (VOCABULARY_ENTRY_BYTES + TERM_STRING_BYTES)


class LexicalWriter:
    """The BM25 index of one (tenant, type) as it changes, for one writer at a time (the caller's lock).

    ``add`` analyses texts as new rows, ``commit`` turns what was added into a segment (merging small segments),
    ``remove`` takes a row out of the statistics (its postings are dropped at the next merge; a snapshot's
    ``alive`` mask hides them until then), ``view`` is a snapshot for searches."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}
        self.segments: tuple[Segment, ...] = ()
        self.lengths = np.zeros(1024, dtype=np.int32)  # per row; rows once written never change
        self.rows = 0
        self.alive_rows = 0
        self.total_length = 0
        self._staged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, first_row: int, texts: Sequence[str]) -> None:
        """Index ``texts`` as rows ``first_row``, ``first_row + 1``, ... (after every row added before)."""
        if not texts:
            return
        analysed = analyse(texts)
        doc_lengths = np.fromiter((len(terms) for terms in analysed), dtype=np.int64, count=len(analysed))
        flat = [self.vocabulary.setdefault(term, len(self.vocabulary)) for terms in analysed for term in terms]
        term_ids = np.asarray(flat, dtype=np.int64)
        rows = np.repeat(np.arange(first_row, first_row + len(texts), dtype=np.int64), doc_lengths)
        width = len(self.vocabulary) + 1
        pairs, counts = np.unique(rows * width + term_ids, return_counts=True)  # row order, then term order
        self._staged.append(((pairs % width).astype(np.int32), (pairs // width).astype(np.int32), counts))
        self._set_lengths(first_row, doc_lengths)
        self.alive_rows += len(texts)
        self.total_length += int(doc_lengths.sum())

    def remove(self, row: int) -> None:
        self.alive_rows -= 1
        self.total_length -= int(self.lengths[row])

    def commit(self, alive: np.ndarray | None) -> None:
        """What was added since the last commit becomes a segment; small segments are merged (``alive``: the rows
        still alive, whose postings a merge keeps; ``None``: all)."""
        if not self._staged:
            return
        terms, rows, counts = (np.concatenate(part) for part in zip(*self._staged, strict=True))
        self._staged = []
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
        return LexicalIndex.of(
            self.vocabulary, self.segments, self.lengths[:rows], alive, self.alive_rows, self.total_length
        )

    def _set_lengths(self, first_row: int, doc_lengths: np.ndarray) -> None:
        end = first_row + doc_lengths.size
        if end > self.lengths.size:  # a new array: the snapshots hold views of the old one, which stays as it was
            grown = np.zeros(max(end, 2 * self.lengths.size), dtype=np.int32)
            grown[: self.rows] = self.lengths[: self.rows]
            self.lengths = grown
        self.lengths[first_row:end] = doc_lengths
        self.rows = end

    def nbytes(self) -> int:
        postings = sum(segment.nbytes() for segment in self.segments)
        return postings + self.lengths.nbytes + len(self.vocabulary) * (VOCABULARY_ENTRY_BYTES + TERM_STRING_BYTES)
