"""The Redis caches against real services: the result cache (hits without a task, invalidation by a tenant's
writes, TTL, identity, single-flight, format version, Redis down) and the embed tasks' embedding cache."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis

from memq.client import api, result_cache
from memq.client.edge import RESULT_FORMAT, cache_fingerprint, cache_types, retrieval_request
from memq.core import keys, names
from memq.core.field_rules import MAX_CACHE_TTL_S
from memq.core.settings import EMBEDDING_CACHE_TTL_S, get_settings
from memq.core.vectors import from_wire, to_wire
from memq.core.wire import parse_retrieval_request, with_cache
from memq.errors import InvalidInput, RetrievalTimeout
from memq.ops import services
from memq.workers.plumbing import cache_filing

pytestmark = pytest.mark.usefixtures("fleet")

FOOD = [
    "loves spicy Thai green curry",
    "is vegetarian since 2019",
    "hates coriander in any dish",
    "bakes sourdough bread on Sundays",
]
QUERY = "what does she like to eat?"
LIMITS = {"semantic": 3, "episodic": 1}
RETRIEVAL_TASKS = (names.EMBED_QUERY, names.SEARCH, names.MERGE)


def seed(tenant: str) -> None:
    api.remember(tenant, "semantic", FOOD)
    api.remember(tenant, "episodic", ["user: book a table for Friday"])


def executed(app: Any) -> Counter[str]:
    """Tasks run so far by the session's workers, by name (the workers' own counts)."""
    replies = app.control.inspect(timeout=2.0).stats() or {}
    total: Counter[str] = Counter()
    for stats in replies.values():
        total.update(stats.get("total", {}))
    return Counter({name: total[name] for name in RETRIEVAL_TASKS})


def contents(result: dict[str, Any], memory_type: str = "long_term_memory") -> list[str]:
    return [item["content"] for item in result["results"][memory_type]]


def result_keys(cache_redis: redis.Redis, query: str, tenant: str, limits: dict[str, int], **kwargs: Any) -> list[str]:
    request = retrieval_request(get_settings(), query, tenant, limits, **kwargs)
    pattern = keys.result_cache(cache_fingerprint(get_settings(), request)) + ":*"
    return [key.decode() for key in cache_redis.scan_iter(match=pattern, count=1000)]


def client_process(code: str, **env: str) -> subprocess.Popen[str]:
    """``code`` in a fresh client process with these settings, stdin and stdout piped: the test steps it line by
    line (a JSON line out, a line in)."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def parse_result_key(key: str) -> tuple[str, list[int]] | None:
    """``(fingerprint, versions)`` of a well-formed result key, else ``None``."""
    match = re.fullmatch(rf"{re.escape(keys.RESULT_PREFIX)}([0-9a-f]{{{keys.FINGERPRINT_CHARS}}}):(\d+(?:\.\d+)*)", key)
    return None if match is None else (match.group(1), [int(v) for v in match.group(2).split(".")])


def run_client(script: str, **env: str) -> list[Any]:
    """``script`` in a fresh client process with these settings; each line it prints is JSON."""
    code = f"import json, time\nfrom memq.client import api\n{script}"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_a_repeated_question_is_answered_from_the_cache_without_any_task(tenant: str, app: Any) -> None:
    seed(tenant)
    first = api.retrieve(QUERY, tenant, LIMITS)
    hits_before = result_cache.counts()["hit"]
    tasks_before = executed(app)

    second = api.retrieve(QUERY, tenant, LIMITS)
    respaced = api.retrieve("  what does  she like\tto eat? ", tenant, LIMITS)

    assert executed(app) == tasks_before
    assert first["cached"] is False and second["cached"] is True and respaced["cached"] is True
    assert second["results"] == first["results"] and second["errors"] == first["errors"] == {}
    assert respaced["results"] == first["results"] and respaced["query"] == "what does  she like\tto eat?"
    assert first["timings_ms"]["cache_ms"] > 0 and "merge_ms" in first["timings_ms"]
    assert set(second["timings_ms"]) == {"cache_ms", "total_ms"} and second["timings_ms"]["cache_ms"] > 0
    assert result_cache.counts()["hit"] == hits_before + 2


def test_a_write_makes_that_tenants_cached_results_unreachable_and_leaves_other_tenants_cached(
    tenant: str, app: Any
) -> None:
    other = tenant + "-other"
    for who in (tenant, other):
        api.remember(who, "semantic", FOOD[:2])
        api.retrieve(QUERY, who, {"semantic": 5})
        assert api.retrieve(QUERY, who, {"semantic": 5})["cached"] is True

    api.remember(tenant, "semantic", [FOOD[2]])
    after_remember = api.retrieve(QUERY, tenant, {"semantic": 5})
    other_after = api.retrieve(QUERY, other, {"semantic": 5})

    assert after_remember["cached"] is False and sorted(contents(after_remember)) == sorted(FOOD[:3])
    assert other_after["cached"] is True and sorted(contents(other_after)) == sorted(FOOD[:2])

    api.remember(tenant, "semantic", [{"content": FOOD[0], "importance": 1.0}])
    after_importance = api.retrieve(QUERY, tenant, {"semantic": 5})
    assert after_importance["cached"] is False
    assert {i["content"]: i["importance"] for i in after_importance["results"]["long_term_memory"]}[FOOD[0]] == 1.0

    forgotten = api.remember(tenant, "semantic", [FOOD[1]])["ids"][0]
    api.forget(tenant, "semantic", ids=[forgotten])
    after_forget = api.retrieve(QUERY, tenant, {"semantic": 5})
    assert after_forget["cached"] is False and FOOD[1] not in contents(after_forget)

    api.remember(other, "episodic", ["user: a write to another type"])  # semantic-only entries stay valid
    assert api.retrieve(QUERY, other, {"semantic": 5})["cached"] is True
    assert api.retrieve(QUERY, other, {"semantic": 5, "episodic": 1})["cached"] is False


def test_cached_results_expire_after_the_configured_ttl(tenant: str, cache_redis: redis.Redis) -> None:
    """Asked twice, then again once the cached result's key has expired (the expiry is waited for, not slept)."""
    seed(tenant)
    ask = f"print(json.dumps(api.retrieve({QUERY!r}, {tenant!r}, {LIMITS!r})['cached']), flush=True)\n"
    code = f"import json, sys\nfrom memq.client import api\n{ask}{ask}sys.stdin.readline()\n{ask}"
    proc = client_process(code, MEMQ_RESULT_CACHE_TTL_S="1")
    try:
        assert proc.stdout is not None and proc.stdin is not None
        flags = [json.loads(proc.stdout.readline()) for _ in range(2)]
        [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
        deadline = time.monotonic() + 30
        while cache_redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.stdin.write("expired\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 0, err[-3000:]
    assert [*flags, json.loads(out)] == [False, True, False]
    [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    assert 0 < cache_redis.pttl(key) <= 1000


def test_a_ttl_of_zero_disables_the_result_cache(tenant: str, cache_redis: redis.Redis) -> None:
    seed(tenant)

    flags = run_client(
        f"for _ in range(2):\n    print(json.dumps(api.retrieve({QUERY!r}, {tenant!r}, {LIMITS!r})['cached']))\n",
        MEMQ_RESULT_CACHE_TTL_S="0",
    )

    assert flags == [False, False]
    assert result_keys(cache_redis, QUERY, tenant, LIMITS) == []


def test_other_weights_limits_strategy_or_model_miss_and_another_timeout_hits(tenant: str) -> None:
    seed(tenant)
    api.retrieve(QUERY, tenant, LIMITS)

    assert api.retrieve(QUERY, tenant, LIMITS, weights={"relevance": 1})["cached"] is False
    assert api.retrieve(QUERY, tenant, {"semantic": 2, "episodic": 1})["cached"] is False
    assert api.retrieve(QUERY, tenant, {"semantic": 3})["cached"] is False
    assert api.retrieve(QUERY, tenant, LIMITS, strategy="exact")["cached"] is False
    assert api.retrieve(QUERY.upper(), tenant, LIMITS)["cached"] is False
    assert api.retrieve(QUERY, tenant, LIMITS, timeout_s=7.5)["cached"] is True
    other_model = run_client(
        f"for _ in range(2):\n    print(json.dumps(api.retrieve({QUERY!r}, {tenant!r}, {LIMITS!r})['cached']))\n",
        MEMQ_EMBED_MODEL="sentence-transformers/all-MiniLM-L6-v2",
    )
    # merge files results under the fingerprint of the workers' settings: a client configured otherwise only misses
    assert other_model == [False, False]
    assert api.retrieve(QUERY, tenant, LIMITS)["cached"] is True


def test_a_burst_of_20_identical_requests_runs_one_chord(tenant: str, app: Any) -> None:
    seed(tenant)
    before = executed(app)
    start = threading.Barrier(20)

    def one(_: int) -> dict[str, Any]:
        start.wait()
        return api.retrieve("favourite dishes for a dinner party", tenant, LIMITS)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))

    ran = executed(app) - before
    assert ran == Counter({names.EMBED_QUERY: 1, names.SEARCH: len(LIMITS), names.MERGE: 1})
    assert [r["cached"] for r in results].count(False) == 1
    assert all(r["results"] == results[0]["results"] and r["errors"] == {} for r in results)


def test_waiters_take_over_when_the_single_flight_holder_never_finishes(tenant: str) -> None:
    seed(tenant)
    settings = get_settings()
    dead_holder = result_cache.lookup(settings, retrieval_request(settings, QUERY, tenant, LIMITS, timeout_s=1.0))
    assert dead_holder.leader  # it holds the lock for 1 s and never runs the chord

    result = api.retrieve(QUERY, tenant, LIMITS, timeout_s=10.0)

    assert result["cached"] is False and len(result["results"]["long_term_memory"]) == 3
    assert result["timings_ms"]["wait_ms"] >= 500  # it waited for the lock to expire, then ran the chord
    assert api.retrieve(QUERY, tenant, LIMITS)["cached"] is True


def test_a_waiter_gives_up_at_its_own_timeout(tenant: str) -> None:
    seed(tenant)
    settings = get_settings()
    holder = result_cache.lookup(settings, retrieval_request(settings, QUERY, tenant, LIMITS, timeout_s=5.0))
    assert holder.leader

    try:
        with pytest.raises(RetrievalTimeout, match="identical"):
            api.retrieve(QUERY, tenant, LIMITS, timeout_s=0.3)
    finally:
        result_cache.release(settings, holder)
    assert api.retrieve(QUERY, tenant, LIMITS)["cached"] is False


def test_a_result_with_errors_is_kept_only_for_the_callers_waiting_on_it(tenant: str, cache_redis: redis.Redis) -> None:
    seed(tenant)
    settings = get_settings()
    fresh = api.retrieve(QUERY, tenant, LIMITS)
    [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    versions = parse_result_key(key)[1]  # type: ignore[index]
    request = with_cache(retrieval_request(settings, QUERY, tenant, LIMITS), key, versions, settings.result_cache_ttl_s)
    partial = {**fresh, "errors": {"conversation_memory": "unavailable after 4 attempt(s)"}, "cached": False}

    assert cache_filing.store_merged(cache_redis, settings, request, partial)  # what memq.merge does with it
    ttl_ms = cache_redis.pttl(key)
    time.sleep(cache_filing.PARTIAL_RESULT_TTL_MS / 1000 + 0.1)
    again = api.retrieve(QUERY, tenant, LIMITS)

    assert 0 < ttl_ms <= cache_filing.PARTIAL_RESULT_TTL_MS
    assert again["cached"] is False and again["errors"] == {}


def test_an_entry_written_in_another_format_is_never_served(tenant: str, cache_redis: redis.Redis) -> None:
    seed(tenant)
    fresh = api.retrieve(QUERY, tenant, LIMITS)
    [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    cache_redis.set(key, json.dumps({"format": 999, "result": {"results": {"long_term_memory": []}}}), ex=60)

    after = api.retrieve(QUERY, tenant, LIMITS)

    assert after["cached"] is False
    assert {t: [i["id"] for i in items] for t, items in after["results"].items()} == {
        t: [i["id"] for i in items] for t, items in fresh["results"].items()
    }
    assert api.retrieve(QUERY, tenant, LIMITS)["cached"] is True  # rewritten in the current format


def test_retrieval_succeeds_uncached_when_the_cache_redis_goes_down(tenant: str) -> None:
    seed(tenant)
    cache = services.start_redis_server()
    code = (
        "import json, sys\n"
        "from memq.client import result_cache\n"
        "from memq.client import api\n"
        "def ask():\n"
        f"    r = api.retrieve({QUERY!r}, {tenant!r}, {LIMITS!r})\n"
        "    print(json.dumps({'cached': r['cached'], 'n': len(r['results']['long_term_memory']),"
        " 'counts': result_cache.counts()}), flush=True)\n"
        "ask()\n"
        "sys.stdin.readline()\n"
        "ask(); ask()\n"
    )
    proc = client_process(code, MEMQ_REDIS_URL=cache.url)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        up = json.loads(proc.stdout.readline())
        cache.stop()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        cache.stop()
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 0, err[-3000:]
    down = [json.loads(line) for line in out.splitlines()]
    assert up["cached"] is False and up["counts"]["miss"] == 1
    assert [(d["cached"], d["n"]) for d in down] == [(False, 3), (False, 3)]
    assert down[-1]["counts"]["error"] == 2  # one failed round trip, then the cache is skipped for a while
    assert "cache Redis unavailable" in err  # the one breaker of the cache Redis opened


def test_worker_side_cache_writes_degrade_when_redis_is_unreachable() -> None:
    from memq.client.cache_redis import breaker
    from memq.workers.embedding import embedding_cache

    dead = redis.Redis(port=services.free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    settings = get_settings()
    request = retrieval_request(settings, QUERY, "tenant-z", {"semantic": 1})
    key = keys.result_key(cache_fingerprint(settings, request), [1])
    result = {"query": "q", "results": {}, "errors": {}, "timings_ms": {}, "cached": False}
    try:
        assert cache_filing.store_merged(dead, settings, with_cache(request, key, [1], 60), result) is False
        assert embedding_cache.lookup("m", ["a", "b"], client=dead) == [None, None]
        assert embedding_cache.store("m", ["a"], [np.ones(4, dtype=np.float32)], client=dead) is False
    finally:
        breaker.reset()


def test_the_embed_tasks_serve_repeated_texts_from_the_embedding_cache(app: Any, cache_redis: redis.Redis) -> None:
    model = get_settings().embed_model
    planted_text, new_text = f"planted {uuid.uuid4().hex}", f"new text {uuid.uuid4().hex}"
    planted = np.random.default_rng(7).standard_normal(384).astype(np.float32)
    cache_redis.set(keys.embedding_cache(model, planted_text), b"\x01" + planted.astype("<f4").tobytes(), ex=60)

    bulk = app.send_task(names.EMBED_TEXTS, args=([planted_text, new_text, new_text],), queue=names.EMBED_QUEUE)
    out = bulk.get(timeout=60)
    query = app.send_task(names.EMBED_QUERY, args=(planted_text,), queue=names.EMBED_QUEUE).get(timeout=60)

    vectors = [from_wire(v) for v in out["vectors"]]
    assert out["embedding_cache"] == {"hits": 1, "computed": 1}
    assert np.array_equal(vectors[0], planted) and np.array_equal(vectors[1], vectors[2])
    assert vectors[1].shape == (384,) and np.linalg.norm(vectors[1]) == pytest.approx(1.0, abs=1e-4)
    stored = cache_redis.get(keys.embedding_cache(model, new_text))
    assert stored is not None and np.array_equal(np.frombuffer(stored, dtype="<f4", offset=1), vectors[1])
    assert 0 < cache_redis.ttl(keys.embedding_cache(model, new_text)) <= EMBEDDING_CACHE_TTL_S
    assert query["embed_cache"] == "hit" and np.array_equal(from_wire(query["vector"]), planted)


def test_the_embed_worker_publishes_its_model_s_dimension_and_a_search_refuses_a_vector_of_another(
    app: Any, tenant: str, cache_redis: redis.Redis
) -> None:
    api.remember(tenant, "semantic", ["likes green tea"])  # the fleet's embed worker has loaded its model
    odd = {"vector": to_wire(np.ones(385, dtype=np.float32)), "model": get_settings().embed_model}

    search = [odd, tenant, "semantic", 3, "auto", None, None, "vector"]
    searched = app.send_task(names.SEARCH, args=search, queue=names.SEARCH_QUEUE).get(60)

    assert cache_redis.get(keys.model_dimensions(get_settings().embed_model)) == b"384"
    assert searched["items"] == [] and "has 385 values; the embed model has 384 dimensions" in searched["error"]


def test_the_cache_fields_of_a_request_are_checked_and_taken_only_with_a_key() -> None:
    settings = get_settings()
    request = retrieval_request(settings, QUERY, "tenant-x", LIMITS)
    key = keys.result_key(cache_fingerprint(settings, request), [3, 0])
    wire = json.loads(json.dumps(with_cache(request, key, [3, 0], 300)))

    received = parse_retrieval_request(wire)
    older_client = parse_retrieval_request({**request, "cache_versions": [3, 0], "cache_ttl_s": 300})

    assert (received["cache_key"], received["cache_versions"], received["cache_ttl_s"]) == (key, [3, 0], 300)
    assert key == keys.result_cache(cache_fingerprint(settings, request) + ":3.0")
    assert cache_types(request) == ["conversation_memory", "long_term_memory"]
    assert not {"cache_key", "cache_versions", "cache_ttl_s"} & set(older_client)
    for bad_key in ("", 7, ["k"]):
        with pytest.raises(InvalidInput) as caught:
            parse_retrieval_request({**wire, "cache_key": bad_key})
        assert caught.value.field == "cache_key"
    for bad_versions in (None, [3], [3, 0, 1], "3.0", [3, -1], [3, True], [3, 2**63], [3, 1.0]):
        with pytest.raises(InvalidInput) as caught:
            parse_retrieval_request({**wire, "cache_versions": bad_versions})
        assert caught.value.field == "cache_versions"
    for bad_ttl in (None, 0, -1, "300", True, 10**9):
        with pytest.raises(InvalidInput) as caught:
            parse_retrieval_request({**wire, "cache_ttl_s": bad_ttl})
        assert caught.value.field == "cache_ttl_s"


def test_merge_files_a_result_only_under_the_key_of_its_own_request(cache_redis: redis.Redis) -> None:
    settings = get_settings()
    request = retrieval_request(settings, QUERY, "tenant-y", LIMITS)
    other = retrieval_request(settings, QUERY, "tenant-y-other", LIMITS)
    result = {"query": QUERY, "memory_id": "tenant-y", "results": {}, "errors": {}, "timings_ms": {}}
    own_key = keys.result_key(cache_fingerprint(settings, request), [0, 0])
    forged = [
        keys.result_key(cache_fingerprint(settings, other), [0, 0]),  # another tenant's entry
        keys.result_key(cache_fingerprint(settings, request), [0, 1]),  # versions the request does not carry
        keys.result_cache("f" * keys.FINGERPRINT_CHARS + ":0.0"),
    ]

    for key in forged:
        assert not cache_filing.store_merged(cache_redis, settings, with_cache(request, key, [0, 0], 60), result)
        assert cache_redis.exists(key) == 0
    assert cache_filing.store_merged(cache_redis, settings, with_cache(request, own_key, [0, 0], 60), result)
    assert 0 < cache_redis.pttl(own_key) <= 60_000
    cache_redis.delete(own_key)


def forged_results(request: dict[str, Any], content: str) -> list[dict[str, Any]]:
    """Well-formed search results for every type of ``request``, each with one item of ``content``."""
    return [
        {"type": t, "items": [{"id": f"forged-{t}", "content": content, "score": 1.0}], "search_ms": 1.0}
        for t in request["limits"]
    ]


def test_a_forged_merge_naming_another_tenants_cache_key_does_not_change_what_that_tenant_retrieves(
    tenant: str, app: Any, cache_redis: redis.Redis
) -> None:
    settings = get_settings()
    attacker = tenant + "-attacker"
    seed(tenant)
    fresh = api.retrieve(QUERY, tenant, LIMITS)
    [victim_key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    _, versions = parse_result_key(victim_key) or ("", [])
    forged_request: dict[str, Any] = {
        **retrieval_request(settings, QUERY, attacker, LIMITS),
        "cache_key": victim_key,  # another tenant's key: merge must never file a result there
        "cache_versions": versions,
        "cache_ttl_s": MAX_CACHE_TTL_S,
    }

    app.send_task(
        names.MERGE,
        kwargs={"results": forged_results(forged_request, "FORGED"), "request": forged_request},
        queue=names.SEARCH_QUEUE,
    ).get(timeout=30)
    after = api.retrieve(QUERY, tenant, LIMITS)

    assert after["memory_id"] == tenant and after["cached"] is True
    assert "FORGED" not in json.dumps(after["results"]) and after["results"] == fresh["results"]
    assert 0 < cache_redis.pttl(victim_key) <= settings.result_cache_ttl_s * 1000
    # Merge files a result only under its own request's tenant, and only while that tenant's data versions are the
    # ones the message names: these are the victim's, not the attacker's, so nothing was cached at all.
    assert result_keys(cache_redis, QUERY, attacker, LIMITS) == []


def test_a_forged_merge_naming_future_versions_of_a_tenants_own_request_is_never_cached(
    tenant: str, app: Any, cache_redis: redis.Redis
) -> None:
    settings = get_settings()
    seed(tenant)
    api.retrieve(QUERY, tenant, LIMITS)
    [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    _, versions = parse_result_key(key) or ("", [])
    future = [version + 1 for version in versions]  # what the tenant's next write will make current
    forged_request: dict[str, Any] = {
        **retrieval_request(settings, QUERY, tenant, LIMITS),
        "cache_versions": future,
        "cache_ttl_s": settings.result_cache_ttl_s,
    }

    app.send_task(
        names.MERGE,
        kwargs={"results": forged_results(forged_request, "FORGED"), "request": forged_request},
        queue=names.SEARCH_QUEUE,
    ).get(timeout=30)
    api.remember(tenant, "semantic", ["started learning the oboe"])  # the versions move on
    after = api.retrieve(QUERY, tenant, LIMITS)

    assert after["cached"] is False and "FORGED" not in json.dumps(after["results"])


def test_a_cache_entry_naming_another_tenant_or_request_is_never_served(tenant: str, cache_redis: redis.Redis) -> None:
    seed(tenant)
    fresh = api.retrieve(QUERY, tenant, LIMITS)
    [key] = result_keys(cache_redis, QUERY, tenant, LIMITS)
    fingerprint, _ = parse_result_key(key) or ("", [])
    envelopes = [
        (tenant + "-other", fingerprint, tenant + "-other"),  # another tenant's result
        (tenant, "0" * keys.FINGERPRINT_CHARS, tenant),  # another request's result
        (tenant, fingerprint, tenant + "-other"),  # an envelope that disagrees with its own result
    ]

    for owner, named_fingerprint, result_owner in envelopes:
        planted = {**fresh, "memory_id": result_owner, "results": {t: [] for t in fresh["results"]}}
        envelope = {
            "format": RESULT_FORMAT,
            "stored_at": time.time(),
            "memory_id": owner,
            "fingerprint": named_fingerprint,
            "result": planted,
        }
        cache_redis.set(key, json.dumps(envelope), ex=60)
        foreign_before = result_cache.counts().get("foreign", 0.0)

        after = api.retrieve(QUERY, tenant, LIMITS)

        assert after["cached"] is False and after["memory_id"] == tenant
        assert after["results"] == {t: after["results"][t] for t in fresh["results"]} != planted["results"]
        assert [i["id"] for i in after["results"]["long_term_memory"]] == [
            i["id"] for i in fresh["results"]["long_term_memory"]
        ]
        assert result_cache.counts()["foreign"] == foreign_before + 1
        assert api.retrieve(QUERY, tenant, LIMITS)["cached"] is True  # rewritten, now its own


def test_a_result_store_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A web process whose result store is down logs one warning, not one per reconnection attempt (every
    ``RETRY_AFTER_S``), and one when the store answers again."""
    import faultkit

    from memq.client.waiting import RETRY_AFTER_S, _Drain

    store = services.start_redis_server()
    caplog.set_level(logging.DEBUG, logger="memq.client.waiting")
    _Drain(faultkit.private_app(store.url))  # its thread subscribes, then outlives the store
    try:
        store = faultkit.restart_redis_server(store, down_s=8 * RETRY_AFTER_S)
        deadline = time.monotonic() + 30
        while "result store reachable again" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        records = [r for r in caplog.records if r.name == "memq.client.waiting"]  # before this test stops the store
    finally:
        store.stop()

    warnings = [r.getMessage().partition(":")[0] for r in records if r.levelno == logging.WARNING]
    assert warnings == ["result store unavailable", "result store reachable again"]
    assert sum(r.levelno == logging.DEBUG and "unavailable" in r.getMessage() for r in records) >= 2  # the retries
