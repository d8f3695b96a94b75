"""A write whose tenant-version bump fails is retried, so no search worker keeps serving the data from before it.

The fleet here has its own broker and a separate cache Redis (``MEMQ_REDIS_URL``), which is stopped (SIGSTOP)
while a store runs and started again (SIGCONT) after MongoDB has the write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import faultkit
import pytest
import redis

from memq.core import keys
from memq.ops import services


@pytest.fixture(scope="module")
def split_fleet() -> Iterator[dict[str, Any]]:
    broker = services.start_redis_server()
    cache = services.start_redis_server()
    env = services.memq_env(
        os.environ, broker.url, os.environ["MEMQ_MONGODB_URI"], MEMQ_REDIS_URL=cache.url, MEMQ_METRICS_PORT="0"
    )
    fleet = services.Fleet(env)
    app = faultkit.private_app(broker.url, "memq-split")
    try:
        hosts = [fleet.start(kind, name=f"split-{kind}") for kind in services.WORKER_KINDS]
        fleet.wait_ready(app, hosts, timeout_s=240)
        yield {"env": env, "cache": cache, "fleet": fleet}
    finally:
        fleet.stop_all()
        app.close()
        faultkit.resume(cache.process)  # type: ignore[arg-type]
        cache.stop()
        broker.stop()


def client_call(env: dict[str, str], code: str) -> subprocess.Popen[str]:
    """A client process on the split fleet; it prints its call's result as JSON."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str], timeout_s: float = 120) -> Any:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err
    return json.loads(out)


def test_a_store_during_a_cache_redis_outage_retries_the_version_bump_and_the_write_becomes_visible(
    split_fleet: dict[str, Any], mongo_db: Any
) -> None:
    env, cache = split_fleet["env"], split_fleet["cache"]
    tenant = f"bump-{uuid.uuid4().hex[:8]}"
    remember = "from memq import remember; import json; print(json.dumps(remember({t!r}, 'semantic', [{c!r}])))"
    retrieve = (
        "from memq import retrieve; import json; "
        "r = retrieve('volcano eruption', {t!r}, {{'semantic': 2}}, weights={{'relevance': 1}}); "
        "print(json.dumps([i['content'] for i in r['results']['long_term_memory']]))"
    )
    finished(client_call(env, remember.format(t=tenant, c="grows tomatoes on the balcony")))
    assert finished(client_call(env, retrieve.format(t=tenant))) == ["grows tomatoes on the balcony"]

    faultkit.pause(cache.process)  # type: ignore[arg-type]
    try:
        storing = client_call(env, remember.format(t=tenant, c="watched a volcano eruption in Iceland"))
        collection = mongo_db["long_term_memory"]
        deadline = time.monotonic() + 60
        while faultkit.count_stored(collection, {"memory_id": tenant}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert faultkit.count_stored(collection, {"memory_id": tenant}) == 2  # the write reached MongoDB
        time.sleep(1.0)  # the bump fails at least once meanwhile
    finally:
        faultkit.resume(cache.process)  # type: ignore[arg-type]
    stored = finished(storing)

    assert stored["inserted"] + stored["updated"] == 1  # a retry re-runs the idempotent upsert
    version = redis.Redis.from_url(cache.url).get(keys.tenant_version(tenant, "long_term_memory"))
    assert int(version) >= 2
    assert finished(client_call(env, retrieve.format(t=tenant)))[0] == "watched a volcano eruption in Iceland"


# -- the one bump path of every write (workers.storage.versions.bumped_whatever_happens), on a real Redis
# ---------------


@pytest.fixture
def dead_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's cache Redis is one that nothing answers on (a real client, connection refused)."""
    from memq.workers.storage import versions

    dead = redis.Redis.from_url(f"redis://127.0.0.1:{services.free_port()}/0", socket_connect_timeout=0.25)
    monkeypatch.setattr(versions.cache_redis, "get", lambda: dead)


def bump_failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("memq_version_bump_failures_total") or 0.0


def test_a_write_that_fails_part_way_still_moves_the_versions_of_every_type_it_may_have_touched() -> None:
    from memq.errors import StoreUnavailable
    from memq.workers.storage import versions

    tenant = f"bump-{uuid.uuid4().hex[:8]}"
    types = ["long_term_memory", "conversation_memory", "workflow_memory"]
    before = versions.read_versions(tenant, types)

    with pytest.raises(StoreUnavailable), versions.bumped_whatever_happens(tenant, types):
        raise StoreUnavailable("MongoDB unavailable: the 2nd type's delete failed")

    after = versions.read_versions(tenant, types)
    assert before is not None and after is not None
    assert all(after[name] == before[name] + 1 for name in types)


@pytest.mark.usefixtures("dead_cache")
def test_a_version_bump_that_fails_after_a_write_is_a_counted_transient_error_so_the_write_is_retried() -> None:
    from memq.errors import TransientError
    from memq.workers.storage import versions

    counted = bump_failures()

    with pytest.raises(TransientError, match="could not be bumped"), versions.bumped_whatever_happens("t", ["x"]):
        pass  # the write succeeded

    assert bump_failures() == counted + 1


@pytest.mark.usefixtures("dead_cache")
def test_when_the_write_and_its_version_bump_both_fail_the_writes_error_goes_up_noting_the_counted_bump() -> None:
    from memq.errors import StoreUnavailable
    from memq.workers.storage import versions

    counted = bump_failures()

    with pytest.raises(StoreUnavailable) as caught, versions.bumped_whatever_happens("t", ["x"]):
        raise StoreUnavailable("MongoDB unavailable")

    assert any("version bump failed" in note for note in caught.value.__notes__)
    assert bump_failures() == counted + 1
