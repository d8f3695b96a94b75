"""Tenant-affinity shards of the search pool, on a private fleet: two search workers, one per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import faultkit
import pytest

from memq.core import sharding
from memq.ops import services

SHARDS = 2
TENANTS = [f"shard-tenant-{i}" for i in range(12)]
LIMITS = {"semantic": 2, "episodic": 1}
MEMORIES = {
    "semantic": ["keeps two cats", "collects vinyl records", "learns Portuguese", "runs marathons"],
    "episodic": ["user: book the dentist for Tuesday"],
}


def test_jump_hash_moves_about_one_tenant_in_n_plus_one_and_only_to_the_new_shard() -> None:
    tenants = [f"tenant-{i}" for i in range(6000)]
    for shards in (1, 2, 3, 7):
        before = [sharding.shard_of(t, shards) for t in tenants]
        after = [sharding.shard_of(t, shards + 1) for t in tenants]
        moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]

        assert all(a == shards for _, a in moved)  # a tenant moves only to the new shard
        assert abs(len(moved) / len(tenants) - 1 / (shards + 1)) < 0.03
        assert max(after) == shards and min(after) == 0


def test_without_shards_searches_use_the_shared_queue_and_shard_lists_are_checked() -> None:
    assert sharding.search_queue_for("anyone", 1) == "search"
    assert sharding.search_queue_for("anyone", 4).startswith("search.")
    with pytest.raises(ValueError, match=r"0\.\.1"):
        sharding.parse_shards("0,2", shards=2)
    with pytest.raises(ValueError, match="distinct"):
        sharding.parse_shards("1,1")


class ShardFleet:
    def __init__(self) -> None:
        self.broker = services.start_redis_server()
        self.env = services.memq_env(
            os.environ,
            self.broker.url,
            os.environ["MEMQ_MONGODB_URI"],
            MEMQ_SEARCH_SHARDS=str(SHARDS),
            MEMQ_RESULT_CACHE_TTL_S="0",
            MEMQ_METRICS_PORT="0",
        )
        self.fleet = services.Fleet(self.env)
        self.app = faultkit.private_app(self.broker.url, "memq-shards")

    def start_search(self, shard: int, env: dict[str, str] | None = None) -> str:
        if env is not None:
            self.fleet.env = env
        try:
            return self.fleet.start("search", name=f"shard{shard}", extra_args=["--shards", str(shard)])
        finally:
            self.fleet.env = self.env

    def client(self, code: str, **env: str) -> Any:
        """A client process of this fleet; it prints one JSON value."""
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def served_by(self, tenants: list[str], **env: str) -> dict[str, dict[str, str]]:
        return self.client(
            f"""
            import json
            from memq import retrieve
            out = {{}}
            for tenant in {tenants!r}:
                result = retrieve("hobbies", tenant, {LIMITS!r}, timeout_s=20)
                assert not result["errors"], result["errors"]
                out[tenant] = result["timings_ms"]["served_by"]
            print(json.dumps(out))
            """,
            **env,
        )

    def stop(self) -> None:
        self.fleet.stop_all()
        self.app.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def shard_fleet() -> Iterator[ShardFleet]:
    rig = ShardFleet()
    try:
        hosts = [rig.fleet.start("embed", name="shard-embed"), rig.fleet.start("ingest", name="shard-ingest")]
        hosts += [rig.start_search(shard) for shard in range(SHARDS)]
        rig.fleet.wait_ready(rig.app, hosts, timeout_s=240)
        rig.client(
            f"""
            import json
            from memq import forget, remember
            for tenant in {TENANTS!r}:
                forget(tenant)
                for memory_type, contents in {MEMORIES!r}.items():
                    remember(tenant, memory_type, contents)
            print(json.dumps("ok"))
            """
        )
        yield rig
    finally:
        rig.stop()


def worker_of_shard(host: str) -> int:
    return int(host.split("@")[0].removeprefix("shard"))


def test_a_tenants_searches_always_land_on_its_shards_worker_and_tenants_spread_over_both(
    shard_fleet: ShardFleet,
) -> None:
    first = shard_fleet.served_by(TENANTS)
    second = shard_fleet.served_by(TENANTS)

    assert first == second
    for tenant, served in first.items():
        assert set(served) == {"long_term_memory", "conversation_memory"}
        assert {worker_of_shard(host) for host in served.values()} == {sharding.shard_of(tenant, SHARDS)}
    assert {worker_of_shard(host) for served in first.values() for host in served.values()} == {0, 1}


def test_a_shard_without_its_worker_fails_clearly_others_are_unaffected_and_a_restart_recovers(
    shard_fleet: ShardFleet,
) -> None:
    lost = next(t for t in TENANTS if sharding.shard_of(t, SHARDS) == 1)
    kept = next(t for t in TENANTS if sharding.shard_of(t, SHARDS) == 0)
    [host] = [h for h in shard_fleet.fleet.workers if h.startswith("shard1@")]
    faultkit.kill_worker(shard_fleet.fleet, host, sig=15)
    shard_fleet.fleet.workers.pop(host)
    try:
        outcome = shard_fleet.client(
            f"""
            import json, time
            from memq import retrieve
            from memq.errors import RetrievalTimeout
            started = time.monotonic()
            try:
                result = retrieve("hobbies", {lost!r}, {LIMITS!r}, timeout_s=3)
                lost = sorted(result["errors"])
            except RetrievalTimeout:
                lost = "timeout"
            elapsed_s = time.monotonic() - started
            kept = retrieve("hobbies", {kept!r}, {LIMITS!r}, timeout_s=20)
            print(json.dumps({{"lost": lost, "elapsed_s": elapsed_s, "kept_errors": kept["errors"]}}))
            """
        )
        status = shard_fleet.client(
            "import json; from memq.ops.status import collect_status; print(json.dumps(collect_status(timeout_s=1)))"
        )
    finally:
        restarted = shard_fleet.start_search(1)
        shard_fleet.fleet.wait_ready(shard_fleet.app, [restarted], timeout_s=120)
    after = shard_fleet.served_by([lost])

    assert outcome["lost"] in ("timeout", ["conversation_memory", "long_term_memory"])
    assert outcome["elapsed_s"] < 3 + 2
    assert outcome["kept_errors"] == {}
    assert status["ok"] is False and status["unserved_queues"] == ["search.1"]
    assert {worker_of_shard(host) for host in after[lost].values()} == {1}


def test_going_from_two_to_three_shards_keeps_results_exact_and_moves_about_a_third_of_the_tenants(
    shard_fleet: ShardFleet, embedder: Any
) -> None:
    exact = (
        "import json; from memq import retrieve; "
        "print(json.dumps({{t: [i['content'] for i in retrieve('outdoor sport', t, {{'semantic': 2}}, "
        "weights={{'relevance': 1}}, mode='vector')['results']['long_term_memory']] for t in {tenants!r}}}))"
    )
    three = {**shard_fleet.env, "MEMQ_SEARCH_SHARDS": "3"}
    host = shard_fleet.start_search(2, env=three)
    shard_fleet.fleet.wait_ready(shard_fleet.app, [host], timeout_s=120)

    with_two = shard_fleet.client(exact.format(tenants=TENANTS))
    with_three = shard_fleet.client(exact.format(tenants=TENANTS), MEMQ_SEARCH_SHARDS="3")
    served = shard_fleet.served_by(TENANTS, MEMQ_SEARCH_SHARDS="3")

    contents = MEMORIES["semantic"]
    cosines = embedder.encode(contents) @ embedder.encode(["outdoor sport"])[0]
    expected = [contents[i] for i in sorted(range(len(contents)), key=lambda i: -cosines[i])[:2]]
    assert with_two == with_three == dict.fromkeys(TENANTS, expected)
    moved = [t for t in TENANTS if sharding.shard_of(t, 3) != sharding.shard_of(t, 2)]
    assert 1 <= len(moved) <= len(TENANTS) * 2 // 3
    for tenant, by_type in served.items():
        assert {worker_of_shard(host) for host in by_type.values()} == {sharding.shard_of(tenant, 3)}


def test_a_stale_shard_queue_with_messages_and_no_worker_makes_status_not_ok_until_it_is_drained(
    shard_fleet: ShardFleet,
) -> None:
    """What a shrink of MEMQ_SEARCH_SHARDS leaves behind: messages on a shard queue outside N."""
    import redis

    from memq.core import names

    broker = redis.Redis.from_url(shard_fleet.broker.url)
    shard_fleet.app.send_task(names.SEARCH, queue="search.5")
    status_code = (
        "import json; from memq.ops.status import collect_status; print(json.dumps(collect_status(timeout_s=1)))"
    )
    try:
        stranded = shard_fleet.client(status_code)
    finally:
        broker.delete("search.5")
    drained = shard_fleet.client(status_code)

    assert stranded["queues"]["search.5"] == {"depth": 1, "workers": [], "stale": True}
    assert stranded["ok"] is False and stranded["unserved_queues"] == ["search.5"]
    assert "search.5" not in drained["queues"] and drained["ok"] is True


def test_a_retried_search_goes_to_the_queue_of_the_workers_shard_count_not_back_where_it_came_from() -> None:
    """A search published under another N (here: to search.0 for a tenant of shard 1) that fails transiently is
    retried on its tenant's shard queue under the worker's N, where that shard's workers will take it."""
    import numpy as np
    import redis

    from memq.core import names
    from memq.core.vectors import to_wire

    tenant = next(t for t in TENANTS if sharding.shard_of(t, SHARDS) == 1)
    broker = services.start_redis_server()
    dead_mongodb = services.mongodb_timeouts(f"mongodb://127.0.0.1:{services.free_port()}", 200)
    env = services.memq_env(os.environ, broker.url, dead_mongodb, MEMQ_SEARCH_SHARDS=str(SHARDS))
    fleet = services.Fleet(env)
    app = faultkit.private_app(broker.url, "memq-retry-route")
    client = redis.Redis.from_url(broker.url)
    try:
        fleet.wait_ready(app, [fleet.start("search", name="shard0-only", extra_args=["--shards", "0"])], 120)
        vector = np.zeros(384, dtype=np.float32)
        vector[0] = 1.0
        sent = app.send_task(
            names.SEARCH,
            args=[{"vector": to_wire(vector)}, tenant, "semantic", 3, "exact"],
            kwargs={"mode": "vector"},  # no query: a vector search (a raw search is hybrid by default)
            queue="search.0",
        )
        services.wait_until(lambda: client.llen("search.1") == 1, 60, "the retry on search.1")
        [raw] = client.lrange("search.1", 0, -1)
        retried = json.loads(raw)["headers"]
    finally:
        fleet.stop_all()
        app.close()
        broker.stop()

    assert retried["id"] == sent.id and retried["task"] == names.SEARCH and retried["retries"] == 1


def test_shards_are_refused_without_a_shard_count_and_both_option_forms_parse() -> None:
    from memq.core.settings import Settings
    from memq.errors import ConfigError
    from memq.ops import cli

    with pytest.raises(ValueError, match="MEMQ_SEARCH_SHARDS is 1"):
        sharding.parse_shards("0", shards=1)
    with pytest.raises(ConfigError, match=r"MEMQ_SEARCH_SHARDS must be in 1\.\.1024"):
        Settings.from_env({"MEMQ_SEARCH_SHARDS": "1025"})
    for extra in (["--shards", "0,2", "-c", "4"], ["--shards=0,2", "-c", "4"]):
        assert cli.search_worker_queues(extra, search_shards=3) == ["search", "search.0", "search.2"]
        assert extra == ["-c", "4"]  # taken out of what Celery sees
    with pytest.raises(ValueError, match="more than once"):
        cli.search_worker_queues(["--shards", "0", "--shards=1"], search_shards=3)
