"""Ranking: fusing lexical and vector relevance per type (``fuse``, in the search worker, over every memory that
passes the filters), then relevance, recency and importance per memory (``rank_type``, in merge, over the type's
candidates, each term min-max normalised as in Generative Agents). The formulas and why: README, "Usage" (``mode``,
``memory_signal``); the hybrid weight was measured on LoCoMo (README, "Retrieval quality").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from memq.core.field_rules import MAX_CANDIDATES

LN2 = math.log(2.0)
HYBRID_VECTOR_WEIGHT = 0.5
RRF_K = 60  # reciprocal rank fusion's constant, for fusing two ranked lists (Atlas without $rankFusion)


def recency(created_ts: float, now_ts: float, half_life_s: float) -> float:
    """1 for a memory created now, halving every ``half_life_s`` of its age since ``created_at``."""
    age_s = max(0.0, now_ts - created_ts)
    return math.exp(-LN2 * age_s / half_life_s)


def item_recency(item: dict[str, Any], now_ts: float, half_life_s: float) -> float:
    """An item's recency from its ``created_at_ts``; one without (a row written by hand) counts as old, never as
    recent."""
    created_ts = item.get("created_at_ts")
    return 0.0 if created_ts is None else recency(float(created_ts), now_ts, half_life_s)


def minmax(values: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """``values`` mapped onto 0..1 by their own range or ``value_range`` (of a larger set they belong to); all equal
    (or one value) maps to 1: none is worse than another."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    low, high = value_range or (float(values.min()), float(values.max()))
    if not high > low:
        return np.ones_like(values)
    return (values - low) / (high - low)


def fuse(
    vector: np.ndarray,
    lexical: np.ndarray,
    mode: str,
    vector_range: tuple[float, float] | None = None,
    lexical_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """One relevance score per memory for ``mode``; the arrays hold the same memories in the same order (hybrid:
    each scaled by its range, of a larger set of memories when given)."""
    if mode == "vector":
        return np.asarray(vector, dtype=np.float64)
    if mode == "lexical":
        return np.asarray(lexical, dtype=np.float64)
    fused: np.ndarray = HYBRID_VECTOR_WEIGHT * minmax(vector, vector_range)
    return fused + (1.0 - HYBRID_VECTOR_WEIGHT) * minmax(lexical, lexical_range)


def fuse_lists(first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Two ranked item lists (each item with ``id`` and ``scores``) as one, by reciprocal rank fusion."""
    fused: dict[str, dict[str, Any]] = {}
    for ranked in (first, second):
        for rank, item in enumerate(ranked, start=1):
            entry = fused.setdefault(str(item["id"]), {**item, "scores": dict(item["scores"]), "score": 0.0})
            for name in ("vector", "lexical"):
                if item["scores"].get(name) is not None:
                    entry["scores"][name] = item["scores"][name]
            entry["score"] += 1.0 / (RRF_K + rank)
    for entry in fused.values():
        entry["scores"]["fused"] = entry["score"]
    return sorted(fused.values(), key=lambda item: (-item["score"], str(item["id"])))[:k]


def rank_type(
    items: list[dict[str, Any]], k: int, weights: dict[str, float], now_ts: float, half_life_s: float
) -> list[dict[str, Any]]:
    """Score every candidate, keep the best k; ties keep relevance order. Each item gets ``memory_signal`` and
    ``scores`` with its ``recency`` and ``importance`` terms (raw, before normalisation)."""
    if not items:
        return []
    raw = {
        "relevance": np.array([float(item["score"]) for item in items]),
        "recency": np.array([item_recency(item, now_ts, half_life_s) for item in items]),
        "importance": np.array([float(item.get("importance", 0.5)) for item in items]),
    }
    total_weight = sum(weights.values())
    signal = sum(weights[name] * minmax(values) for name, values in raw.items()) / total_weight
    for i, item in enumerate(items):
        item["memory_signal"] = float(signal[i])
        scores = item.setdefault("scores", {"vector": None, "lexical": None, "fused": item["score"]})
        scores["recency"] = float(raw["recency"][i])
        scores["importance"] = float(raw["importance"][i])
    ranked = sorted(items, key=lambda item: (-item["memory_signal"], -item["score"]))
    return ranked[:k]


def candidates_for(k: int, weights: dict[str, float], oversample: int) -> int:
    """How many candidates a search must return so re-ranking can promote recent/important ones."""
    only_relevance = weights.get("recency", 0) == 0 and weights.get("importance", 0) == 0
    return k if only_relevance else min(k * oversample, MAX_CANDIDATES)
