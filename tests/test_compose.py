"""docker-compose.yml and the Dockerfile stay in step with the CLI and the settings.

No Docker engine is needed: the file is parsed here, each ``memq`` command is parsed by memq's own
argument parser (and a worker's Celery options by Celery's), and every ``MEMQ_*`` variable must be a
field of ``Settings``. Where a compose client is installed, it validates the file too.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from memq.core import sharding
from memq.core.settings import variables
from memq.ops import cli
from memq.workers.storage.mongo import URI_OPTION_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"
ONE_SHOT_SERVICES = {"indexes"}
IMAGE_HEALTHCHECK_SERVICES = {"mongodb"}  # mongodb-atlas-local declares its own HEALTHCHECK


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_PATH.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def memq_commands(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {name: service["command"] for name, service in services.items() if service.get("command", [""])[0] == "memq"}


def celery_worker_args(kind: str, extra: list[str], search_shards: int = 1) -> list[str]:
    """What ``memq worker KIND EXTRA`` hands to Celery, with ``MEMQ_SEARCH_SHARDS=search_shards``: the queues the
    CLI derives (a search worker's ``--shards``), memq's defaults, then EXTRA less ``--device`` and ``--shards``."""
    extra = list(extra)
    if "--device" in extra:
        at = extra.index("--device")
        del extra[at : at + 2]
    queues = [kind]
    if kind == "search":
        queues = cli.search_worker_queues(extra, search_shards)  # ValueError on a --shards the fleet does not have
    return ["-Q", ",".join(queues), *cli.WORKER_DEFAULTS[kind], *extra]


def shards_profile(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services of the ``shards`` profile: one search worker per shard queue."""
    return {name: service for name, service in services.items() if "shards" in service.get("profiles", [])}


def parse_celery_worker(args: list[str]) -> dict[str, Any]:
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    from memq.client.app import app

    context = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    return dict(worker.make_context("worker", args, obj=context).params)


def test_every_memq_command_in_compose_parses_with_the_cli(services: dict[str, dict[str, Any]]) -> None:
    commands = memq_commands(services)
    assert {"worker", "flower", "indexes", "exporter"} <= {command[1] for command in commands.values()}
    shards = len(shards_profile(services))  # the MEMQ_SEARCH_SHARDS the `shards` profile runs with
    for name, command in commands.items():
        if command[1] == "worker":
            assert command[2] in cli.WORKER_DEFAULTS, name
            try:
                parse_celery_worker(celery_worker_args(command[2], command[3:], search_shards=shards))
            except (click.UsageError, ValueError) as exc:
                pytest.fail(f"{name}: {exc}")
        else:
            cli.build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown option


def test_each_queue_has_a_worker_service_and_the_worker_options_take_effect(
    services: dict[str, dict[str, Any]],
) -> None:
    kinds = {command[2]: name for name, command in memq_commands(services).items() if command[1] == "worker"}
    assert set(kinds) == {"embed", "search", "ingest"}
    search = parse_celery_worker(celery_worker_args("search", services["search-worker"]["command"][3:]))
    assert search["queues"] == ["search"] and search["concurrency"] == 8
    uri = services["search-worker"]["environment"]["MEMQ_MONGODB_URI"]
    given = {name.lower(): value for name, value in urllib.parse.parse_qsl(uri.partition("?")[2])}
    pool = int(given.get("maxpoolsize", URI_OPTION_DEFAULTS["maxPoolSize"]))  # MongoDB's own option, else memq's
    assert pool >= search["concurrency"]  # a search thread never waits for a Mongo socket


def test_every_memq_variable_in_compose_is_a_setting(compose: dict[str, Any]) -> None:
    fields = set(variables())
    used = set(re.findall(r"\bMEMQ_[A-Z0-9_]+", COMPOSE_PATH.read_text()))
    environments = [service.get("environment", {}) for service in compose["services"].values()]
    used |= {key for environment in environments for key in environment if not key.startswith("RABBITMQ_")}
    assert used, "no MEMQ_* variable found"
    assert used <= fields, f"not settings: {sorted(used - fields)}"


def test_mongodb_is_atlas_local_so_vector_search_works(services: dict[str, dict[str, Any]]) -> None:
    assert services["mongodb"]["image"].startswith("mongodb/mongodb-atlas-local")
    for name in memq_commands(services):
        uri = services[name]["environment"]["MEMQ_MONGODB_URI"]
        assert uri.startswith("mongodb://mongodb:27017"), name


def test_the_gpu_embed_worker_reserves_a_gpu_and_runs_on_cuda(services: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = services["embed-worker-gpu"], services["embed-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["command"][gpu["command"].index("--device") + 1] == "cuda"
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert gpu["profiles"] == ["gpu"]
    assert cpu["command"][cpu["command"].index("--device") + 1] == "cpu" and "deploy" not in cpu


def test_search_shards_are_a_profile_with_a_worker_per_shard_and_off_by_default(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    fleet_setting = compose["x-memq-env"]["MEMQ_SEARCH_SHARDS"]
    assert fleet_setting == "${MEMQ_SEARCH_SHARDS:-1}"  # the quick start: one shared search queue, as before
    for name in memq_commands(services):  # one value for the whole fleet, clients included
        assert services[name]["environment"]["MEMQ_SEARCH_SHARDS"] == fleet_setting, name
    shard_services = shards_profile(services)
    shards = len(shard_services)
    assert shards >= 2 and f"MEMQ_SEARCH_SHARDS={shards}" in COMPOSE_PATH.read_text()  # the documented switch
    served = []
    for name, service in shard_services.items():
        assert service["command"][:3] == ["memq", "worker", "search"], name
        queues = parse_celery_worker(celery_worker_args("search", service["command"][3:], shards))["queues"]
        assert queues[0] == "search", name  # merge runs there: every search worker serves it
        served += queues[1:]
    assert sorted(served) == sorted(sharding.search_queues(shards))
    assert "profiles" not in services["search-worker"]  # the shared queue keeps its workers with shards on


def test_the_exporter_listens_where_compose_publishes_it(services: dict[str, dict[str, Any]]) -> None:
    exporter = services["exporter"]
    args = cli.build_parser().parse_args(exporter["command"][1:])
    assert exporter["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert f":{args.port}/metrics" in exporter["healthcheck"]["test"][-1]


def test_search_workers_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    search = services["search-worker"]
    assert "container_name" not in search and "ports" not in search and "hostname" not in search


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT_SERVICES | IMAGE_HEALTHCHECK_SERVICES:
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_worker_healthchecks_ping_their_own_worker(services: dict[str, dict[str, Any]]) -> None:
    for name, command in memq_commands(services).items():
        if command[1] == "worker":
            probe = services[name]["healthcheck"]["test"][-1]
            assert f"inspect ping -d {command[2]}@$$HOSTNAME" in probe, name


def test_workers_get_time_for_a_warm_shutdown(services: dict[str, dict[str, Any]]) -> None:
    for name, command in memq_commands(services).items():
        if command[1] == "worker":
            assert services[name]["stop_signal"] == "SIGTERM", name
            assert services[name]["stop_grace_period"], name


def test_flower_takes_its_credentials_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    auth = services["flower"]["environment"]["MEMQ_FLOWER_BASIC_AUTH"]
    assert auth.startswith("${MEMQ_FLOWER_BASIC_AUTH:?")  # required; no default password
    assert services["flower"]["command"][:2] == ["memq", "flower"]


def test_the_dockerfile_declares_every_build_arg_compose_passes(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = DOCKERFILE_PATH.read_text()
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, flags=re.MULTILINE))
    for name, service in services.items():
        assert set(service.get("build", {}).get("args", {})) <= declared, name
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" torch', dockerfile)
    assert 'pip install ".[${MEMQ_EXTRAS}]"' in dockerfile


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="no docker-compose client installed")
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_PATH), "config", "--quiet"],
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "MEMQ_FLOWER_BASIC_AUTH": "ops:secret"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def redis_options(command: list[str]) -> dict[str, str]:
    """``redis-server --name value ...`` as a dict (the flags that take one value)."""
    assert command[0] == "redis-server", command
    return {flag[2:]: value for flag, value in itertools.pairwise(command) if flag.startswith("--")}


def test_the_cache_redis_is_bounded_apart_from_the_broker_which_never_evicts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    broker, cache = redis_options(services["redis"]["command"]), redis_options(services["cache-redis"]["command"])
    env = compose["x-memq-env"]

    assert broker["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+(mb|gb)", cache["maxmemory"])
    # Evicts among keys with a TTL (every cache entry and lock), never the tenant data versions (no TTL).
    assert cache["maxmemory-policy"] in {"volatile-lru", "volatile-lfu"}
    assert env["MEMQ_REDIS_URL"].startswith("redis://cache-redis:")
    assert default_of(env["MEMQ_BROKER_URL"]).startswith("redis://redis:")
    assert env["MEMQ_RESULT_BACKEND"].startswith("redis://redis:")
    for name, service in services.items():
        if service.get("command", [""])[:2] == ["memq", "worker"]:
            assert "cache-redis" in service["depends_on"], name


def default_of(value: str) -> str:
    """A compose value as it reads with its variable unset: ``${NAME:-default}`` -> ``default``."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return match.group(1) if match else value


def test_the_rabbitmq_service_boots_with_the_topology_memq_broker_setup_declares(compose: dict[str, Any]) -> None:
    from memq.core import broker

    rabbitmq = compose["services"]["rabbitmq"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in rabbitmq["volumes"] if volume.startswith("./"))
    definitions_path = ROOT / mounts["./deploy/rabbitmq/definitions.json"].replace("/etc/rabbitmq/", "deploy/rabbitmq/")
    conf = (ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    definitions = json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())
    vhost = rabbitmq["environment"]["RABBITMQ_DEFAULT_VHOST"]

    assert rabbitmq["profiles"] == ["rabbitmq"] and definitions_path.name == "definitions.json"
    assert f"load_definitions = {mounts['./deploy/rabbitmq/definitions.json']}" in conf
    assert mounts["./deploy/rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/conf.d/")
    assert definitions == broker.definitions(vhost, 1)  # `memq broker definitions --vhost memq`
    assert default_of(compose["x-memq-env"]["MEMQ_BROKER_URL"]) != compose["x-memq-env"]["MEMQ_BROKER_URL"]


def test_every_worker_waits_for_rabbitmq_only_when_its_profile_runs(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("command", [""])[:2] == ["memq", "worker"]:
            assert service["depends_on"]["rabbitmq"] == {"condition": "service_healthy", "required": False}, name
