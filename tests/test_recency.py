"""Recency is the age since a memory was created (its own ``created_at``, else its first insert): re-sending an
unchanged memory, as the docs advise after a partial failure, never makes it recent."""

from __future__ import annotations

import time
from typing import Any

import pytest

from memq.client import api

pytestmark = pytest.mark.usefixtures("fleet")

RECENCY_ONLY = {"relevance": 0.0, "recency": 1.0, "importance": 0.0}
OLDER = "walks the dog along the river every morning"
NEWER = "walks to the office along the river on Mondays"


def by_recency(tenant: str) -> list[dict[str, Any]]:
    result = api.retrieve("walks along the river", tenant, {"semantic": 2}, weights=RECENCY_ONLY)
    assert not result["errors"], result["errors"]
    return result["results"]["long_term_memory"]


def test_re_sending_an_unchanged_memory_keeps_its_created_at_and_never_makes_it_recent(tenant: str) -> None:
    api.remember(tenant, "semantic", [OLDER])
    time.sleep(0.05)  # the newer memory's first insert is strictly later
    api.remember(tenant, "semantic", [NEWER])
    before = {item["content"]: item for item in by_recency(tenant)}

    api.remember(tenant, "semantic", [OLDER])  # re-sent unchanged, after a partial failure
    after = by_recency(tenant)

    assert [item["content"] for item in after] == [NEWER, OLDER]  # ranked as before: the newer memory first
    resent = next(item for item in after if item["content"] == OLDER)
    assert resent["created_at"] == before[OLDER]["created_at"]
    assert resent["scores"]["recency"] <= before[OLDER]["scores"]["recency"]  # only older since


def test_a_memory_re_sent_with_its_own_created_at_keeps_the_one_it_was_first_stored_with(tenant: str) -> None:
    created = "2024-05-01T08:00:00+00:00"
    api.remember(tenant, "semantic", [{"content": OLDER, "created_at": created}])
    [first] = by_recency(tenant)

    api.remember(tenant, "semantic", [{"content": OLDER, "created_at": created}])
    api.remember(tenant, "semantic", [{"content": OLDER, "created_at": "2026-01-01T00:00:00+00:00"}])
    [item] = by_recency(tenant)

    assert item["created_at"] == created
    assert item["scores"]["recency"] <= first["scores"]["recency"]
