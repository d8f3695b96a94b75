"""Atlas indexes are checked beside the stage probe: a missing or building vector or search index is never a
silent empty result. The states come from ``list_search_indexes`` documents as Atlas returns them."""

from __future__ import annotations

import os
from typing import Any

import pytest

from memq.workers.search.index_readiness import state_from_documents


def atlas_index(name: str, status: str, queryable: bool | None, **extra: Any) -> dict[str, Any]:
    """A ``list_search_indexes`` document as MongoDB Atlas (and mongodb-atlas-local) returns it."""
    document: dict[str, Any] = {"id": "6524096020da840844a4c4a7", "name": name, "type": "vectorSearch"}
    document |= {"status": status, "latestDefinition": {"fields": []}, **extra}
    if queryable is not None:
        document["queryable"] = queryable
    return document


@pytest.mark.parametrize(
    ("documents", "expected"),
    [
        ([], "missing"),
        ([atlas_index("other_index", "READY", True)], "missing"),
        ([atlas_index("memq_vector", "READY", True)], "ready"),
        ([atlas_index("memq_vector", "PENDING", False)], "building"),
        ([atlas_index("memq_vector", "BUILDING", False)], "building"),
        ([atlas_index("memq_vector", "BUILDING", True)], "ready"),  # a new definition builds beside a queryable one
        ([atlas_index("memq_vector", "STALE", True)], "ready"),
        ([atlas_index("memq_vector", "FAILED", False)], "failed"),
        ([atlas_index("memq_vector", "DOES_NOT_EXIST", False)], "missing"),
        ([atlas_index("memq_vector", "DELETING", False)], "missing"),
        ([atlas_index("memq_vector", "READY", None)], "ready"),  # older servers send no queryable field
    ],
)
def test_an_index_state_is_read_from_atlas_list_search_indexes_documents(
    documents: list[dict[str, Any]], expected: str
) -> None:
    assert state_from_documents(documents, "memq_vector") == expected


def test_memq_status_lists_each_collections_vector_and_search_index_state(mongo_db: Any) -> None:
    from memq.core.settings import get_settings
    from memq.ops.status import search_index_states

    mongo_db["long_term_memory"].insert_one({"memory_id": "index-probe", "content": "x"})

    states = search_index_states(mongo_db, get_settings())

    assert set(states["long_term_memory"]) == {"memq_vector", "memq_text"}
    if not os.environ.get("MEMQ_TEST_REAL_MONGODB"):  # nx-27017 answers $listSearchIndexes with none
        assert states["long_term_memory"] == {"memq_vector": "missing", "memq_text": "missing"}


def test_a_search_that_needs_a_missing_index_fails_naming_memq_indexes_instead_of_returning_nothing(
    mongo_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memq.errors import IndexNotReady
    from memq.workers.search import index_readiness

    if os.environ.get("MEMQ_TEST_REAL_MONGODB"):
        pytest.skip("on a real Atlas the index may exist")
    mongo_db["conversation_memory"].insert_one({"memory_id": "index-probe", "content": "x"})
    monkeypatch.setattr(index_readiness, "_states", {})  # nothing looked up yet in this process

    with pytest.raises(IndexNotReady, match="memq indexes"):
        index_readiness.require_ready("conversation_memory", "memq_vector", "vector")


def test_a_building_vector_index_sends_auto_to_the_exact_path_and_an_explicit_request_to_an_error(
    mongo_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memq.errors import IndexNotReady
    from memq.workers.search import index_readiness, strategies

    monkeypatch.setitem(index_readiness._states, ("workflow_memory", "memq_vector"), ("building", 1e18))

    assert strategies.vector_index_building("workflow_memory", explicit=False) is True
    with pytest.raises(IndexNotReady, match="still building"):
        strategies.vector_index_building("workflow_memory", explicit=True)


def test_concurrent_first_searches_probe_a_stage_once_and_all_get_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is tried against the real MongoDB (nx-27017 here); only its calls are counted. Without a single
    prober, eight first searches each tried the stage in turn and ran past their budgets."""
    import threading
    import time

    from memq.workers.search import strategies
    from memq.workers.storage import reads

    probes: list[str] = []
    real_probe = reads.probe_stage

    def counted_probe(stage: str, memory_type: str, dimensions: int) -> bool:
        probes.append(stage)
        time.sleep(0.2)  # while the first probe runs, the other searches arrive
        return real_probe(stage, memory_type, dimensions)

    monkeypatch.setattr(reads, "probe_stage", counted_probe)
    monkeypatch.setattr(strategies, "_probe_results", {})
    start = threading.Barrier(8)
    answers: list[bool] = []

    def first_search() -> None:
        start.wait()
        answers.append(strategies.supports("$vectorSearch", "long_term_memory", 384))

    threads = [threading.Thread(target=first_search) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert probes == ["$vectorSearch"]
    assert len(answers) == 8 and len(set(answers)) == 1


def test_a_stale_probe_answer_serves_other_searches_while_one_search_refreshes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    import time

    from memq.workers.search import strategies
    from memq.workers.storage import reads

    refreshing = threading.Event()
    release = threading.Event()

    def slow_probe(stage: str, memory_type: str, dimensions: int) -> bool:
        refreshing.set()
        release.wait(10)
        return False

    monkeypatch.setattr(reads, "probe_stage", slow_probe)
    stale_at = time.monotonic() - strategies.PROBE_TTL_S - 1
    monkeypatch.setattr(strategies, "_probe_results", {"$search:long_term_memory": (True, stale_at)})
    refresher = threading.Thread(target=strategies.supports, args=("$search", "long_term_memory", 384))
    refresher.start()
    assert refreshing.wait(10)

    assert strategies.supports("$search", "long_term_memory", 384) is True  # the last answer, without waiting
    release.set()
    refresher.join(10)
    assert strategies.supports("$search", "long_term_memory", 384) is False  # the refreshed answer
