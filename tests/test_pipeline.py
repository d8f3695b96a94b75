"""The retrieval pipeline end to end: real Redis, real workers, a real MongoDB wire server, real model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from faultkit import count_stored

from memq.client import api
from memq.core import field_rules
from memq.core.vectors import from_stored
from memq.errors import InvalidInput

pytestmark = pytest.mark.usefixtures("fleet")

FOOD = [
    "loves spicy Thai green curry",
    "is vegetarian since 2019",
    "hates coriander in any dish",
    "bakes sourdough bread on Sundays",
    "drinks two espressos every morning",
    "orders sushi every Friday night",
]
WORK = [
    "works as a nurse in the ICU",
    "writes Rust for a payments company",
    "teaches maths at a secondary school",
]
RELEVANCE_ONLY = {"relevance": 1, "recency": 0, "importance": 0}


def remember_all(tenant: str, memory_type: str, contents: list[str], **fields: Any) -> dict[str, Any]:
    return api.remember(tenant, memory_type, [{"content": c, **fields} for c in contents])


def test_a_retrieval_returns_every_requested_type(tenant: str) -> None:
    remember_all(tenant, "semantic", FOOD)
    remember_all(tenant, "episodic", ["user: what's for dinner?"], role="user")
    remember_all(tenant, "procedural", ["To plan meals: list, shop, cook."])

    result = api.retrieve("what does she like to eat?", tenant, {"semantic": 3, "episodic": 2, "procedural": 1})

    assert set(result["results"]) == {"long_term_memory", "conversation_memory", "workflow_memory"}
    assert len(result["results"]["long_term_memory"]) == 3
    assert len(result["results"]["conversation_memory"]) == 1
    assert len(result["results"]["workflow_memory"]) == 1
    assert result["errors"] == {}
    assert result["memory_id"] == tenant and result["cached"] is False
    assert set(result["timings_ms"]["search_ms"]) == set(result["results"])
    waits = result["timings_ms"]["queue_ms"]
    assert set(waits) == {"embed", "search", "merge"} and set(waits["search"]) == set(result["results"])
    assert min(waits["embed"], waits["merge"], *waits["search"].values()) >= 0  # one host: one clock
    for item in result["results"]["long_term_memory"]:
        assert {"id", "content", "score", "memory_signal", "created_at", "importance"} <= set(item)
        assert "embedding" not in item


def test_exact_results_equal_a_brute_force_top_k_computed_here(tenant: str, embedder: Any) -> None:
    remember_all(tenant, "semantic", FOOD + WORK)
    query = "which meals does this person enjoy?"

    result = api.retrieve(query, tenant, {"semantic": 4}, weights=RELEVANCE_ONLY, strategy="exact", mode="vector")

    q = embedder.encode([query])[0]
    rows = embedder.encode(FOOD + WORK)
    cosines = rows @ q
    expected = [(FOOD + WORK)[i] for i in np.argsort(-cosines)[:4]]
    got = result["results"]["long_term_memory"]
    assert [item["content"] for item in got] == expected
    assert [item["score"] for item in got] == pytest.approx(sorted(cosines, reverse=True)[:4], abs=1e-4)


def test_stored_embeddings_are_float32_vectors_of_the_model(tenant: str, mongo_db: Any, embedder: Any) -> None:
    remember_all(tenant, "semantic", ["a single memory about tea"])

    doc = mongo_db["long_term_memory"].find_one({"memory_id": tenant})

    vector = from_stored(doc["embedding"])
    assert vector.dtype == np.float32 and vector.shape == (384,)
    assert vector == pytest.approx(embedder.encode(["a single memory about tea"])[0], abs=1e-4)
    assert doc["model"] == "all-MiniLM-L6-v2" and doc["importance"] == 0.5


def test_tenants_with_similar_content_never_see_each_other(tenant: str) -> None:
    other = tenant + "-other"
    remember_all(tenant, "semantic", ["Alice loves sushi and green tea"])
    remember_all(other, "semantic", ["Bob loves sushi and green tea", "Bob loves sushi a lot"])

    mine = api.retrieve("who loves sushi?", tenant, {"semantic": 10})
    theirs = api.retrieve("who loves sushi?", other, {"semantic": 10})

    assert [i["content"] for i in mine["results"]["long_term_memory"]] == ["Alice loves sushi and green tea"]
    assert {i["content"] for i in theirs["results"]["long_term_memory"]} == {
        "Bob loves sushi and green tea",
        "Bob loves sushi a lot",
    }


def test_the_same_id_in_two_tenants_stays_two_memories(tenant: str) -> None:
    other = tenant + "-other"
    api.remember(tenant, "semantic", [{"id": "m1", "content": "mine: likes cats"}])
    api.remember(other, "semantic", [{"id": "m1", "content": "theirs: likes dogs"}])

    mine = api.retrieve("pets", tenant, {"semantic": 5})["results"]["long_term_memory"]
    theirs = api.retrieve("pets", other, {"semantic": 5})["results"]["long_term_memory"]

    assert [(i["id"], i["content"]) for i in mine] == [("m1", "mine: likes cats")]
    assert [(i["id"], i["content"]) for i in theirs] == [("m1", "theirs: likes dogs")]


def test_reingesting_the_same_memories_never_duplicates(tenant: str, mongo_db: Any) -> None:
    items = [{"content": c} for c in FOOD] + [{"id": "fixed-1", "content": "has a client id"}]

    first = api.remember(tenant, "semantic", items)
    second = api.remember(tenant, "semantic", items)

    assert first["ids"] == second["ids"]
    assert first["inserted"] == len(items) and second["inserted"] == 0
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == len(items)


def test_a_rewrite_updates_content_and_keeps_created_at(tenant: str, mongo_db: Any) -> None:
    api.remember(tenant, "semantic", [{"id": "pref", "content": "likes tea"}])
    before = mongo_db["long_term_memory"].find_one({"memory_id": tenant})
    api.remember(tenant, "semantic", [{"id": "pref", "content": "likes coffee now", "importance": 0.9}])
    after = mongo_db["long_term_memory"].find_one({"memory_id": tenant})

    assert after["content"] == "likes coffee now" and after["importance"] == 0.9
    assert after["created_at"] == before["created_at"]
    result = api.retrieve("drinks", tenant, {"semantic": 5})
    assert [i["content"] for i in result["results"]["long_term_memory"]] == ["likes coffee now"]


def test_one_failing_type_is_reported_and_the_others_still_arrive(tenant: str) -> None:
    from memq.client.canvas import retrieval_canvas
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    remember_all(tenant, "semantic", FOOD)
    request = retrieval_request(get_settings(), "food", tenant, {"semantic": 2, "procedural": 2})
    canvas = retrieval_canvas(request)
    for search in canvas.tasks[1].tasks:  # the chord's header: one memq.search per type
        if search.args[1] == "workflow_memory":
            search.args = (*search.args[:2], 0)  # that type's search refuses k = 0 and reports it

    result = canvas.apply_async().get(timeout=30)

    assert len(result["results"]["long_term_memory"]) == 2
    assert result["results"]["workflow_memory"] == []
    assert "workflow_memory" in result["errors"] and "k:" in result["errors"]["workflow_memory"]
    assert "long_term_memory" not in result["errors"]


def test_a_failing_embedding_step_reaches_the_caller_as_its_error_not_as_a_timeout(tenant: str) -> None:
    """The embed step's result is not stored, but its failure is: Celery marks the rest of the chain failed,
    so the caller's wait on the last step ends with the worker's error."""
    from memq.client.canvas import retrieval_canvas
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    request = retrieval_request(get_settings(), "a query", tenant, {"semantic": 2}, timeout_s=60)
    request["query"] = "x" * (field_rules.MAX_QUERY_CHARS + 1)  # past the client's check, refused by the worker

    with pytest.raises(InvalidInput) as refused:
        api._wait(retrieval_canvas(request).apply_async(), 60, what="retrieval")

    assert refused.value.field == "query"


def test_an_apply_async_get_in_the_same_process_still_works_beside_the_client(tenant: str) -> None:
    """The client waits through its own result connection; a plain AsyncResult.get() here is untouched."""
    from memq.client.app import app
    from memq.core import names

    remember_all(tenant, "semantic", FOOD[:2])
    plain = app.send_task(names.FORGET, args=(tenant, "semantic", None), queue=names.INGEST_QUEUE)

    assert api.retrieve("food", tenant, {"semantic": 1})["memory_id"] == tenant
    assert plain.get(timeout=60)["deleted"] == {"long_term_memory": 2}


def test_forget_deletes_only_its_own_tenant(tenant: str, mongo_db: Any) -> None:
    other = tenant + "-other"
    remember_all(tenant, "semantic", FOOD[:2])
    remember_all(tenant, "episodic", ["user: hello"])
    remember_all(other, "semantic", FOOD[:2])

    one = api.forget(tenant, "semantic", ids=[api.remember(tenant, "semantic", [FOOD[0]])["ids"][0]])
    assert one["deleted"] == {"long_term_memory": 1}
    everything = api.forget(tenant)

    assert everything["deleted"]["long_term_memory"] == 1
    assert everything["deleted"]["conversation_memory"] == 1
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}) == 0
    assert count_stored(mongo_db["long_term_memory"], {"memory_id": other}) == 2
    assert api.retrieve("food", tenant, {"semantic": 5})["results"]["long_term_memory"] == []
    assert len(api.retrieve("food", other, {"semantic": 5})["results"]["long_term_memory"]) == 2


def test_a_write_is_visible_to_the_next_retrieval(tenant: str) -> None:
    remember_all(tenant, "semantic", FOOD[:1])
    assert len(api.retrieve("food", tenant, {"semantic": 5})["results"]["long_term_memory"]) == 1

    remember_all(tenant, "semantic", FOOD[1:3])

    assert len(api.retrieve("food", tenant, {"semantic": 5})["results"]["long_term_memory"]) == 3


def test_ranking_can_favour_importance_over_relevance(tenant: str) -> None:
    api.remember(
        tenant,
        "semantic",
        [
            {"content": "loves spicy Thai green curry", "importance": 0.0},
            {"content": "allergic to nuts", "importance": 1.0},
        ],
    )

    by_relevance = api.retrieve("favourite curry", tenant, {"semantic": 1}, weights=RELEVANCE_ONLY)
    by_importance = api.retrieve(
        "favourite curry", tenant, {"semantic": 1}, weights={"relevance": 0.1, "importance": 1}
    )

    assert by_relevance["results"]["long_term_memory"][0]["content"] == "loves spicy Thai green curry"
    assert by_importance["results"]["long_term_memory"][0]["content"] == "allergic to nuts"


def test_a_single_type_retrieval_works_through_the_same_chord(tenant: str) -> None:
    remember_all(tenant, "procedural", ["deploy: test, tag, release"])

    result = api.retrieve("how do I deploy?", tenant, {"workflow_memory": 1})

    assert [i["content"] for i in result["results"]["workflow_memory"]] == ["deploy: test, tag, release"]


def test_aretrieve_does_not_block_the_event_loop(tenant: str) -> None:
    remember_all(tenant, "semantic", FOOD)

    async def scenario() -> tuple[dict[str, Any], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(api.aretrieve("food", tenant, {"semantic": 2}) for _ in range(4)))
        done.set()
        await tick_task
        return results[0], ticks

    result, ticks = asyncio.run(scenario())

    assert len(result["results"]["long_term_memory"]) == 2
    assert ticks >= 5  # the loop kept running while four retrievals were in flight


def test_send_task_by_name_needs_no_torch(tenant: str) -> None:
    remember_all(tenant, "semantic", FOOD)
    code = (
        "import sys, json\n"
        "from memq.client.app import app\n"
        f"r = app.send_task('memq.retrieve', args=['food', {tenant!r}, {{'semantic': 2}}])\n"
        "out = r.get(timeout=30)\n"
        "assert 'torch' not in sys.modules and 'pymongo' not in sys.modules, 'heavy import'\n"
        "print(json.dumps([i['content'] for i in out['results']['long_term_memory']]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)

    assert proc.returncode == 0, proc.stderr
    assert len(__import__("json").loads(proc.stdout)) == 2


def test_importing_the_client_loads_no_model_or_driver() -> None:
    heavy = "('torch', 'sentence_transformers', 'pymongo')"
    code = f"import sys, memq.client.api; print(sorted(m for m in {heavy} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_indexes_are_created_idempotently(mongo_db: Any) -> None:
    first = api.create_indexes()
    second = api.create_indexes()

    assert first["indexes"].keys() == second["indexes"].keys()
    keys = [ix["key"] for ix in mongo_db["conversation_memory"].list_indexes()]
    assert any(list(k) == ["memory_id", "created_at"] for k in keys)
    assert any(list(k) == ["memory_id", "role"] for k in keys)
    definition = first["vector_index_definition"]["definition"]["fields"]
    assert {"type": "filter", "path": "memory_id"} in definition


def test_memory_timestamps_and_metadata_round_trip(tenant: str) -> None:
    created = time.time() - 3600
    api.remember(
        tenant,
        "semantic",
        [{"content": "tagged memory", "created_at": created, "tags": ["a", "b"], "metadata": {"src": "chat"}}],
    )

    item = api.retrieve("tagged", tenant, {"semantic": 1})["results"]["long_term_memory"][0]

    assert item["tags"] == ["a", "b"] and item["metadata"] == {"src": "chat"}
    assert item["created_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(created)))


@pytest.mark.skipif(not os.environ.get("MEMQ_TEST_REAL_MONGODB"), reason="$vectorSearch needs a real Atlas/mongot")
def test_vector_search_matches_exact_search_on_a_real_atlas(tenant: str) -> None:
    api.create_indexes()
    remember_all(tenant, "semantic", FOOD + WORK)
    time.sleep(5)  # Atlas indexes asynchronously

    exact = api.retrieve("meals", tenant, {"semantic": 3}, weights=RELEVANCE_ONLY, strategy="exact", mode="vector")
    vector = api.retrieve(
        "meals", tenant, {"semantic": 3}, weights=RELEVANCE_ONLY, strategy="vector_search", mode="vector"
    )

    assert [i["id"] for i in vector["results"]["long_term_memory"]] == [
        i["id"] for i in exact["results"]["long_term_memory"]
    ]


def test_invalid_input_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(InvalidInput) as caught:
        api.retrieve("ok", {"$ne": None}, {"semantic": 1})  # type: ignore[arg-type]
    assert caught.value.field == "memory_id"
