"""Ranking: relevance (cosine), recency (exponential decay since last access), importance.

``memory_signal = (w_rel * relevance + w_rec * recency + w_imp * importance) / sum(w)``, each term in
0..1. With weights relevance=1, recency=0, importance=0 the order is the cosine order, so the top-k
equals the exact cosine top-k.
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2.0)


def recency(last_access_ts: float, now_ts: float, half_life_s: float) -> float:
    age_s = max(0.0, now_ts - last_access_ts)
    return math.exp(-LN2 * age_s / half_life_s)


def relevance(cosine: float) -> float:
    return min(1.0, max(0.0, cosine))


def memory_signal(item: dict[str, Any], weights: dict[str, float], now_ts: float, half_life_s: float) -> float:
    last_access = _first_present(item.get("last_accessed_at_ts"), item.get("created_at_ts"), now_ts)
    terms = {
        "relevance": relevance(item["score"]),
        "recency": recency(last_access, now_ts, half_life_s),
        "importance": float(item.get("importance", 0.5)),
    }
    total_weight = sum(weights.values())
    return sum(weights[name] * terms[name] for name in terms) / total_weight


def _first_present(*values: float | None) -> float:
    return next(float(v) for v in values if v is not None)


def rank_type(
    items: list[dict[str, Any]], k: int, weights: dict[str, float], now_ts: float, half_life_s: float
) -> list[dict[str, Any]]:
    """Score every candidate, keep the best k; ties keep cosine order (search returns them sorted)."""
    for item in items:
        item["memory_signal"] = memory_signal(item, weights, now_ts, half_life_s)
    ranked = sorted(items, key=lambda item: (-item["memory_signal"], -item["score"]))
    return ranked[:k]


def candidates_for(k: int, weights: dict[str, float], oversample: int) -> int:
    """How many cosine candidates a search must return so re-ranking can promote recent/important ones."""
    only_relevance = weights.get("recency", 0) == 0 and weights.get("importance", 0) == 0
    return k if only_relevance else min(k * oversample, 100 * oversample)
