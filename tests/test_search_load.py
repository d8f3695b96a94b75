"""A large tenant right after a write, on the real pipeline: concurrent retrievals share one load of its matrix.

20,000 memories are written straight into MongoDB in the stored format (random unit vectors, so that the test does
not embed 20,000 texts), then one ``remember`` bumps the tenant's data version, so every search worker's matrix of
the tenant is stale at once, as after any write in production.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from memq.client import api
from memq.core import names
from memq.core.keys import memory_object_id
from memq.core.vectors import to_bson

pytestmark = pytest.mark.usefixtures("fleet")

MEMORIES = 20_000
DIMENSIONS = 384
CONCURRENT = 8
TIMEOUT_S = 120.0
TOPICS = ("hiking in the alps", "sourdough baking", "jazz piano", "tax returns", "marathon training")


def write_memories(mongo_db: Any, tenant: str, count: int) -> None:
    rng = np.random.default_rng(17)
    vectors = rng.standard_normal((count, DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    collection = mongo_db["long_term_memory"]
    collection.create_index([("memory_id", 1)])  # nx-27017 plans an equality through a single-field index only
    created = datetime.now(tz=UTC)
    for start in range(0, count, 2000):
        docs = [
            {
                "_id": memory_object_id(tenant, f"m{i}"),
                "memory_id": tenant,
                "key": f"m{i}",
                "content": f"memory {i} about {TOPICS[i % len(TOPICS)]}",
                "embedding": to_bson(vectors[i]),
                "model": "all-MiniLM-L6-v2",
                "importance": 0.5,
                "created_at": created,
                "last_accessed_at": created,
            }
            for i in range(start, min(count, start + 2000))
        ]
        collection.insert_many(docs, ordered=False)


def matrix_loads(app: Any, host: str) -> int:
    replies = app.control.broadcast(names.INFO_COMMAND, destination=[host], reply=True, timeout=5.0) or []
    info = next(reply[host] for reply in replies if host in reply)
    return int(info["matrix_cache"]["loads"])


def test_eight_concurrent_retrievals_of_a_20000_memory_tenant_after_a_write_all_succeed_with_one_load(
    app: Any, fleet: Any, mongo_db: Any
) -> None:
    tenant = f"large-{uuid.uuid4().hex[:8]}"
    write_memories(mongo_db, tenant, MEMORIES)
    api.remember(tenant, "semantic", [{"content": "the newest memory: a trip to Lisbon in May"}])
    search_host = next(host for host in fleet.workers if host.startswith("search@"))
    loads_before = matrix_loads(app, search_host)

    outcomes: list[Any] = [None] * CONCURRENT

    def retrieve(i: int) -> None:
        started = time.monotonic()
        try:
            # A different query each: the result cache's single-flight must not be what shares the work.
            result = api.retrieve(
                f"{TOPICS[i % len(TOPICS)]} question {i}", tenant, {"semantic": 5}, timeout_s=TIMEOUT_S
            )
            outcomes[i] = (result, time.monotonic() - started)
        except Exception as exc:
            outcomes[i] = (exc, time.monotonic() - started)

    threads = [threading.Thread(target=retrieve, args=(i,)) for i in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S + 30)

    failures = [outcome for outcome in outcomes if not isinstance(outcome[0], dict) or outcome[0]["errors"]]
    assert failures == []
    assert all(len(result["results"]["long_term_memory"]) == 5 for result, _ in outcomes)
    assert all(elapsed_s <= TIMEOUT_S for _, elapsed_s in outcomes)
    assert matrix_loads(app, search_host) - loads_before == 1
