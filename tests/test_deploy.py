"""deploy/k8s/ stays in step with the CLI, the settings and the queues; ``memq exporter`` against real Redis.

No cluster is needed: every manifest is parsed here, each ``memq`` command is parsed as the CLI parses it (a
search worker's ``--shards`` into its queues, by ``memq.ops.cli.search_worker_queues``, for the MEMQ_SEARCH_SHARDS the
manifests set; then the Celery options by Celery's own parser), and each KEDA ScaledObject must watch a queue its
Deployment's worker serves. The exporter tests run the real ``memq exporter`` process on the suite's Redis.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_compose import celery_worker_args, parse_celery_worker

from memq.core import names, sharding
from memq.core.settings import Settings, variables
from memq.ops import cli, exporter, services
from memq.ops.status import fleet_queues

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
CONFIG_MAP, SECRET, TRIGGER_AUTH = "memq-config", "memq-secrets", "memq-redis"
KINDS = {"ConfigMap", "Secret", "TriggerAuthentication", "Deployment", "ScaledObject", "Service"}
SETTINGS = set(variables())


# --- the manifests -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"no manifests under {K8S}"
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def command_of(deployment: dict[str, Any]) -> list[str]:
    container = only_container(deployment)
    return [*container.get("command", []), *container.get("args", [])]


def memq_deployments(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every Deployment but the Redis servers of redis.yaml."""
    return {
        name: d
        for name, d in of_kind(manifests, "Deployment").items()
        if not only_container(d)["image"].startswith("redis:")
    }


def workers(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in of_kind(manifests, "Deployment").items() if command_of(d)[:2] == ["memq", "worker"]}


def shipped_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """What every Deployment gets through envFrom: the ConfigMap's data and the Secret's stringData."""
    return {**of_kind(manifests, "ConfigMap")[CONFIG_MAP]["data"], **of_kind(manifests, "Secret")[SECRET]["stringData"]}


def container_env(manifests: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (envFrom, then env wins); a value from a Secret that is
    not shipped here reads as a placeholder."""
    container = only_container(deployment)
    sources = {CONFIG_MAP: of_kind(manifests, "ConfigMap")[CONFIG_MAP]["data"]}
    sources[SECRET] = of_kind(manifests, "Secret")[SECRET]["stringData"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        env.update(sources[ref["name"]])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "placeholder:from-a-secret")
    return env


def fleet_shards(manifests: list[dict[str, Any]]) -> int:
    return int(of_kind(manifests, "ConfigMap")[CONFIG_MAP]["data"]["MEMQ_SEARCH_SHARDS"])


def worker_options(command: list[str], search_shards: int) -> dict[str, Any]:
    """Celery's parsed options for ``memq worker KIND ...`` as the CLI would start it with MEMQ_SEARCH_SHARDS =
    ``search_shards`` (the same derivation as the compose test's)."""
    assert command[:2] == ["memq", "worker"] and command[2] in cli.WORKER_DEFAULTS, command
    return parse_celery_worker(celery_worker_args(command[2], list(command[3:]), search_shards))


def served_queues(manifests: list[dict[str, Any]]) -> dict[str, list[str]]:
    shards = fleet_shards(manifests)
    return {name: worker_options(command_of(d), shards)["queues"] for name, d in workers(manifests).items()}


def test_every_manifest_is_a_named_resource_of_a_known_kind(manifests: list[dict[str, Any]]) -> None:
    seen = set()
    for doc in manifests:
        assert doc["kind"] in KINDS and doc.get("apiVersion"), doc.get("kind")
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        assert "namespace" not in doc["metadata"], key  # kubectl -n picks it
    for name, deployment in of_kind(manifests, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(manifests, "Deployment").values()]
    for name, service in of_kind(manifests, "Service").items():
        selected = [labels for labels in pods if service["spec"]["selector"].items() <= labels.items()]
        assert len(selected) == 1, f"service {name} selects {len(selected)} Deployments"


def redis_args(deployment: dict[str, Any]) -> dict[str, str]:
    args = only_container(deployment)["args"]
    return {flag[2:]: value for flag, value in itertools.pairwise(args) if flag.startswith("--")}


def test_the_cache_redis_is_bounded_apart_from_the_broker_which_never_evicts(manifests: list[dict[str, Any]]) -> None:
    deployments = of_kind(manifests, "Deployment")
    broker, cache = redis_args(deployments["redis"]), redis_args(deployments["cache-redis"])
    env = shipped_env(manifests)

    assert broker["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+(mb|gb)", cache["maxmemory"])
    assert cache["maxmemory-policy"] in {"volatile-lru", "volatile-lfu"}  # never the tenant data versions (no TTL)
    assert env["MEMQ_REDIS_URL"].startswith("redis://cache-redis:6379/")
    assert env["MEMQ_BROKER_URL"].startswith("redis://redis:6379/")
    assert set(of_kind(manifests, "Service")) >= {"redis", "cache-redis"}
    for name, deployment in workers(manifests).items():
        assert container_env(manifests, deployment)["MEMQ_REDIS_URL"] == env["MEMQ_REDIS_URL"], name


def test_every_memq_command_parses_with_the_cli(manifests: list[dict[str, Any]]) -> None:
    shards = fleet_shards(manifests)
    commands = {name: command_of(d) for name, d in memq_deployments(manifests).items()}
    assert {command[1] for command in commands.values()} == {"worker", "exporter", "flower"}
    for name, command in commands.items():
        assert command[0] == "memq", name
        if command[1] == "worker":
            try:
                worker_options(command, shards)
            except (click.UsageError, ValueError) as exc:  # ValueError: a --shards the fleet does not have
                pytest.fail(f"{name}: {exc}")
        else:
            cli.build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown option
    assert {command[2] for command in commands.values() if command[1] == "worker"} == set(cli.WORKER_DEFAULTS)


def test_each_queue_of_the_fleet_is_served_and_scaled_on_its_own_list(manifests: list[dict[str, Any]]) -> None:
    queues = fleet_queues(fleet_shards(manifests))
    served = served_queues(manifests)
    for queue in queues:  # memq status would say ok
        assert any(queue in worker_queues for worker_queues in served.values()), f"no worker serves {queue}"
    scaled: dict[str, str] = {}
    for name, scaled_object in of_kind(manifests, "ScaledObject").items():
        target = scaled_object["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in served, name
        (trigger,) = scaled_object["spec"]["triggers"]
        assert trigger["type"] == "redis", name
        queue = trigger["metadata"]["listName"]
        assert queue in served[target["name"]], f"{name} watches {queue}, which {target['name']} does not serve"
        assert int(trigger["metadata"]["listLength"]) > 0, name
        assert trigger["authenticationRef"]["name"] in of_kind(manifests, "TriggerAuthentication"), name
        assert scaled_object["spec"]["minReplicaCount"] >= 1, name  # a queue is never left without a worker
        assert scaled_object["spec"]["maxReplicaCount"] >= scaled_object["spec"]["minReplicaCount"], name
        assert queue not in scaled, f"{queue} is scaled twice"
        scaled[queue] = target["name"]
    assert sorted(scaled) == sorted(queues)  # one autoscaled Deployment per queue, shards included
    assert sorted(scaled.values()) == sorted(served)  # and every worker Deployment is autoscaled
    for name in served:  # the ScaledObject owns the count: a replicas field would reset it on each apply
        assert "replicas" not in of_kind(manifests, "Deployment")[name]["spec"], name


def test_a_shard_deployment_scales_on_its_shard_and_the_shared_queue_on_its_own(
    manifests: list[dict[str, Any]],
) -> None:
    served = served_queues(manifests)
    shard_workers = {name: queues for name, queues in served.items() if len(queues) > 1}
    assert len(shard_workers) == fleet_shards(manifests) == 2  # the example: one Deployment per shard
    for name, queues in shard_workers.items():
        assert queues[0] == names.SEARCH_QUEUE, name  # merge runs on `search`: every search worker serves it
    assert [names.SEARCH_QUEUE] in served.values()  # and one Deployment serves the shared queue only


def test_keda_reads_the_redis_memq_uses_as_its_broker(manifests: list[dict[str, Any]]) -> None:
    broker = redis.connection.parse_url(shipped_env(manifests)["MEMQ_BROKER_URL"])
    for name, scaled_object in of_kind(manifests, "ScaledObject").items():
        metadata = scaled_object["spec"]["triggers"][0]["metadata"]
        assert metadata["address"] == f"{broker['host']}:{broker.get('port', 6379)}", name
        assert int(metadata.get("databaseIndex", 0)) == int(broker.get("db", 0)), name
    (auth,) = of_kind(manifests, "TriggerAuthentication").values()
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == SECRET and ref["key"] in of_kind(manifests, "Secret")[SECRET]["stringData"]


def test_every_memq_variable_is_a_setting_and_the_fleet_agrees_on_the_shards(manifests: list[dict[str, Any]]) -> None:
    used = {name for path in K8S.glob("*.yaml") for name in re.findall(r"\bMEMQ_[A-Z0-9_]+", path.read_text())}
    used |= {name for name in shipped_env(manifests) if name.startswith("MEMQ_")}
    assert used and used <= SETTINGS, f"not settings: {sorted(used - SETTINGS)}"
    for name, deployment in memq_deployments(manifests).items():
        sources = only_container(deployment)["envFrom"]
        assert [(s.get("configMapRef") or s.get("secretRef"))["name"] for s in sources] == [CONFIG_MAP, SECRET], name
        assert all(v["name"] != "MEMQ_SEARCH_SHARDS" for v in only_container(deployment).get("env", [])), name
        env = container_env(manifests, deployment)
        settings = Settings.from_env(env)  # every value parses and validates
        assert settings.search_shards == 2, name  # clients and workers agree
        assert settings.broker_url.startswith("redis://") and settings.mongodb_uri.startswith("mongodb"), name


def test_the_embed_deployment_requests_one_gpu_and_no_other_does(manifests: list[dict[str, Any]]) -> None:
    for name, deployment in of_kind(manifests, "Deployment").items():
        resources = only_container(deployment).get("resources", {})
        command = command_of(deployment)
        if command[1:3] == ["worker", "embed"]:
            assert resources["limits"]["nvidia.com/gpu"] == 1, name
            assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1, name  # requests must equal limits
            device = command[command.index("--device") + 1] if "--device" in command else "auto"
            assert device in ("auto", "cuda", "cuda:0"), name  # the pod's one GPU
            assert "cuda" in only_container(deployment)["image"], name
        else:
            for section in resources.values():
                assert "nvidia.com/gpu" not in section, name


def test_workers_shut_down_warm_and_are_ready_when_they_answer_a_ping(manifests: list[dict[str, Any]]) -> None:
    for name, deployment in workers(manifests).items():
        kind = command_of(deployment)[2]
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30, name
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        probe = " ".join(only_container(deployment)["readinessProbe"]["exec"]["command"])
        assert f"inspect ping -d {kind}@$HOSTNAME" in probe, name  # memq worker KIND names itself KIND@%h
        assert "livenessProbe" not in only_container(deployment), name  # a broker outage must not restart workers


def test_the_exporter_listens_where_its_service_and_prometheus_look(manifests: list[dict[str, Any]]) -> None:
    (deployment,) = [d for d in of_kind(manifests, "Deployment").values() if command_of(d)[1] == "exporter"]
    args = cli.build_parser().parse_args(command_of(deployment)[1:])
    assert args.port == exporter.DEFAULT_PORT
    (port,) = only_container(deployment)["ports"]
    assert port["containerPort"] == args.port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)
    for probe in ("readinessProbe", "livenessProbe"):
        assert only_container(deployment)[probe]["httpGet"] == {"path": "/metrics", "port": port["name"]}
    service = of_kind(manifests, "Service")["memq-exporter"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == args.port and service_port["targetPort"] in (port["name"], args.port)
    assert deployment["spec"]["replicas"] == 1


def test_flower_credentials_come_from_a_secret_that_is_not_shipped(manifests: list[dict[str, Any]]) -> None:
    (deployment,) = [d for d in of_kind(manifests, "Deployment").values() if command_of(d)[1] == "flower"]
    (auth,) = [v for v in only_container(deployment)["env"] if v["name"] == "MEMQ_FLOWER_BASIC_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"]["name"] not in of_kind(manifests, "Secret")  # no default password
    assert "MEMQ_FLOWER_BASIC_AUTH" not in shipped_env(manifests)
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in of_kind(manifests, "Service").values())


# --- the exporter --------------------------------------------------------------------------------------------


@pytest.fixture
def lists(cache_redis: redis.Redis) -> Iterator[list[str]]:
    """Fresh Redis list names, deleted afterwards."""
    made: list[str] = []
    yield made
    if made:
        cache_redis.delete(*made)


def envelope(headers: dict[str, Any]) -> str:
    """A kombu Redis envelope as another producer would push it."""
    return json.dumps({"body": "W10=", "content-type": "application/json", "headers": headers, "properties": {}})


def test_the_header_name_is_the_same_on_both_sides() -> None:
    from memq.client import app

    assert app.PUBLISHED_AT_HEADER == exporter.PUBLISHED_AT_HEADER


def test_memq_stamps_each_publish_with_its_time_even_a_copy_of_older_headers(
    app: Any, cache_redis: redis.Redis, lists: list[str]
) -> None:
    queue = f"memq-test-stamp-{uuid.uuid4().hex[:8]}"
    lists.append(queue)
    before = time.time()
    app.send_task(names.SEARCH, queue=queue)
    app.send_task(names.SEARCH, queue=queue, headers={exporter.PUBLISHED_AT_HEADER: 1.0})  # as a retry copies it
    after = time.time()
    stamps = [json.loads(raw)["headers"][exporter.PUBLISHED_AT_HEADER] for raw in cache_redis.lrange(queue, 0, -1)]
    assert len(stamps) == 2 and all(before <= stamp <= after for stamp in stamps)


def test_the_watch_ages_stamped_and_unstamped_messages(cache_redis: redis.Redis, lists: list[str]) -> None:
    stamped, foreign, empty = (f"memq-test-watch-{uuid.uuid4().hex[:8]}-{n}" for n in range(3))
    lists += [stamped, foreign, empty]
    now = [1000.0]
    watch = exporter.QueueWatch(cache_redis, [stamped, foreign, empty], clock=lambda: now[0])
    cache_redis.lpush(stamped, envelope({"id": "a", "task": names.SEARCH, exporter.PUBLISHED_AT_HEADER: 990.0}))
    cache_redis.lpush(stamped, envelope({"id": "b", "task": names.SEARCH, exporter.PUBLISHED_AT_HEADER: 999.0}))
    cache_redis.lpush(foreign, envelope({"id": "f1", "task": names.SEARCH}))
    cache_redis.lpush(foreign, b"\xff not json")

    states = watch.sample()
    assert states[stamped] == exporter.QueueState(2, 990.0)  # the tail is the oldest: kombu LPUSHes, workers pop
    assert states[foreign] == exporter.QueueState(2, 1000.0)  # unstamped: aged from when the exporter saw it
    assert states[empty] == exporter.QueueState(0, None)

    now[0] = 1007.0
    assert watch.sample()[foreign].oldest_since == 1000.0  # the same message: its age grows
    cache_redis.rpop(foreign)  # a worker took it; next in line is not JSON at all (still aged by a digest)
    now[0] = 1010.0
    assert watch.sample()[foreign] == exporter.QueueState(1, 1010.0)
    now[0] = 1012.0
    assert watch.sample()[foreign].oldest_since == 1010.0


def test_the_exporter_reports_broker_down_and_no_stale_queues() -> None:
    dead = redis.Redis(port=services.free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    collector = exporter.QueueExporter(exporter.QueueWatch(dead, fleet_queues(1)))
    registry = CollectorRegistry()
    registry.register(collector)

    assert collector.refresh() is False
    assert registry.get_sample_value("memq_exporter_broker_up") == 0
    assert registry.get_sample_value("memq_queue_messages", {"queue": "search"}) is None


def test_the_exporter_refuses_a_broker_that_is_not_redis() -> None:
    from memq.errors import ConfigError

    with pytest.raises(ConfigError, match="Redis"):
        exporter.broker_client("amqp://guest:guest@rabbit:5672//")


def test_importing_the_exporter_loads_no_celery_model_driver_or_worker_code() -> None:
    probe = (
        "import sys, memq.ops.exporter; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'torch', 'sentence_transformers', 'pymongo', 'bm25s') "
        "or m.startswith(('memq.workers', 'memq.tasks', 'memq.client.app'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def scrape(port: int) -> dict[tuple[str, str | None], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("queue")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_memq_exporter_reports_depth_and_a_growing_age_from_the_real_broker(
    app: Any, cache_redis: redis.Redis, lists: list[str], tmp_path: Path
) -> None:
    shards = 8  # the session's workers serve embed, search and ingest: nothing consumes search.6 or search.7
    queue, foreign = sharding.shard_queue(7), sharding.shard_queue(6)
    lists += [queue, foreign]
    cache_redis.delete(queue, foreign)
    port = services.free_port()
    env = {**os.environ, "MEMQ_SEARCH_SHARDS": str(shards)}
    argv = [sys.executable, "-m", "memq.ops.cli", "exporter", "--port", str(port), "--address", "127.0.0.1"]
    log_path = tmp_path / "exporter.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*argv, "--interval-s", "0.2"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"memq exporter exited {process.returncode}: {log_path.read_text()}")
            try:
                return scrape(port)[("memq_exporter_broker_up", None)] == 1
            except OSError:
                return False

        services.wait_until(answers, 30, "memq exporter")
        idle = scrape(port)
        assert {q for name, q in idle if name == "memq_queue_messages"} == set(fleet_queues(shards))
        assert idle[("memq_queue_messages", queue)] == 0 and idle[("memq_queue_oldest_age_seconds", queue)] == 0

        published = time.time()
        app.send_task(names.SEARCH, queue=queue)  # stamped by memq's app
        pushed = time.time()
        cache_redis.lpush(foreign, envelope({"id": f"other-{uuid.uuid4().hex}", "task": names.SEARCH}))  # not stamped
        services.wait_until(
            lambda: scrape(port)[("memq_queue_oldest_age_seconds", foreign)] > 0, 10, "the unstamped message's age"
        )
        first = scrape(port)
        time.sleep(1.0)
        second = scrape(port)
        waited = time.time() - published
        for metrics in (first, second):
            assert metrics[("memq_queue_messages", queue)] == 1 and metrics[("memq_queue_messages", foreign)] == 1
        age, later = (metrics[("memq_queue_oldest_age_seconds", queue)] for metrics in (first, second))
        assert 0 < age < later <= waited and later - age >= 0.9  # it grows with the clock
        age, later = (metrics[("memq_queue_oldest_age_seconds", foreign)] for metrics in (first, second))
        assert 0 < age < later <= time.time() - pushed and later - age >= 0.9  # since first seen, never more

        cache_redis.delete(queue, foreign)  # the messages go; so do their ages
        services.wait_until(
            lambda: scrape(port)[("memq_queue_messages", queue)] == 0, 10, "the exporter to see the queue empty"
        )
        assert scrape(port)[("memq_queue_oldest_age_seconds", queue)] == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=15)
    assert returncode == 0, log_path.read_text()  # SIGTERM: a clean stop
    with socket.socket() as probe, pytest.raises(OSError):
        probe.settimeout(1)
        probe.connect(("127.0.0.1", port))  # and the port is closed


def test_the_exporter_interval_must_be_positive() -> None:
    from memq.errors import ConfigError

    with pytest.raises(ConfigError, match="interval"):
        exporter.run_exporter(port=services.free_port(), interval_s=math.nan, registry=CollectorRegistry())


def test_the_watch_samples_a_stale_shard_queue_while_it_holds_messages(cache_redis: redis.Redis) -> None:
    stale = "search.1023"  # outside any N a test fleet uses
    watch = exporter.QueueWatch(cache_redis, fleet_queues(2), clock=lambda: 1000.0)
    cache_redis.lpush(stale, envelope({"id": "s", "task": names.SEARCH, exporter.PUBLISHED_AT_HEADER: 990.0}))
    try:
        holding = watch.sample()
    finally:
        cache_redis.delete(stale)
    drained = watch.sample()

    assert holding[stale] == exporter.QueueState(1, 990.0)
    assert set(holding) == {*fleet_queues(2), stale}
    assert set(drained) == set(fleet_queues(2))


def test_an_unstamped_message_back_on_a_stale_shard_queue_is_aged_from_its_return(cache_redis: redis.Redis) -> None:
    stale, now = "search.1022", [1000.0]
    watch = exporter.QueueWatch(cache_redis, fleet_queues(1), clock=lambda: now[0])
    message = envelope({"id": "u", "task": names.SEARCH})  # no publish-time header: aged from when it was seen
    try:
        cache_redis.lpush(stale, message)
        first = watch.sample()[stale]
        cache_redis.delete(stale)
        now[0] = 1300.0
        watch.sample()
        now[0] = 1605.0  # the same message restored (as kombu does after a visibility timeout)
        cache_redis.lpush(stale, message)
        back = watch.sample()[stale]
    finally:
        cache_redis.delete(stale)

    assert first.oldest_since == 1000.0 and back.oldest_since == 1605.0


# --- RabbitMQ (deploy/k8s/rabbitmq/) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rabbitmq_manifests() -> list[dict[str, Any]]:
    folder = K8S / "rabbitmq"
    return [doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_rabbitmq_cluster_has_three_nodes(rabbitmq_manifests: list[dict[str, Any]]) -> None:
    (cluster,) = of_kind(rabbitmq_manifests, "RabbitmqCluster").values()

    assert cluster["spec"]["replicas"] == 3
    assert "cluster_partition_handling = pause_minority" in cluster["spec"]["rabbitmq"]["additionalConfig"]


def test_the_clusters_topology_is_what_memq_broker_setup_declares(
    manifests: list[dict[str, Any]], rabbitmq_manifests: list[dict[str, Any]]
) -> None:
    from memq.core import broker

    shards = int(of_kind(manifests, "ConfigMap")[CONFIG_MAP]["data"]["MEMQ_SEARCH_SHARDS"])
    (vhost,) = (doc["spec"]["name"] for doc in of_kind(rabbitmq_manifests, "Vhost").values())
    wanted = broker.definitions(vhost, shards)
    specs = {kind: [doc["spec"] for doc in of_kind(rabbitmq_manifests, kind).values()] for kind in KINDS_RABBITMQ}
    (cluster,) = of_kind(rabbitmq_manifests, "RabbitmqCluster")

    assert all(spec["rabbitmqClusterReference"] == {"name": cluster} for kind in specs for spec in specs[kind])
    assert sorted((s["name"], s["type"]) for s in specs["Exchange"]) == sorted(
        (e["name"], e["type"]) for e in wanted["exchanges"]
    )
    assert sorted((s["name"], s["type"], s["durable"]) for s in specs["Queue"]) == sorted(
        (q["name"], q["arguments"]["x-queue-type"], True) for q in wanted["queues"]
    )
    assert sorted((s["source"], s["destination"], s["routingKey"]) for s in specs["Binding"]) == sorted(
        (b["source"], b["destination"], b["routing_key"]) for b in wanted["bindings"]
    )
    (policy,), (expected,) = specs["Policy"], wanted["policies"]
    assert (policy["name"], policy["pattern"], policy["applyTo"], policy["definition"]) == (
        expected["name"],
        expected["pattern"],
        expected["apply-to"],
        expected["definition"],
    )


KINDS_RABBITMQ = ("Exchange", "Queue", "Binding", "Policy")


def test_keda_scales_each_pool_on_its_rabbitmq_queue_as_on_the_redis_list(
    manifests: list[dict[str, Any]], rabbitmq_manifests: list[dict[str, Any]]
) -> None:
    on_redis, on_rabbitmq = of_kind(manifests, "ScaledObject"), of_kind(rabbitmq_manifests, "ScaledObject")
    (vhost,) = (doc["spec"]["name"] for doc in of_kind(rabbitmq_manifests, "Vhost").values())

    assert set(on_rabbitmq) == set(on_redis)  # applied after deploy/k8s/, each replaces its Redis twin
    for name, scaled in on_rabbitmq.items():
        twin, (trigger,) = on_redis[name], scaled["spec"]["triggers"]
        assert {k: v for k, v in scaled["spec"].items() if k != "triggers"} == {
            k: v for k, v in twin["spec"].items() if k != "triggers"
        }
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["vhostName"] == vhost
        assert trigger["metadata"]["queueName"] == twin["spec"]["triggers"][0]["metadata"]["listName"]
        assert trigger["metadata"]["value"] == twin["spec"]["triggers"][0]["metadata"]["listLength"]
        assert trigger["authenticationRef"]["name"] in of_kind(rabbitmq_manifests, "TriggerAuthentication")


def test_the_broker_users_documented_for_operators_are_what_memq_broker_permissions_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", "broker", "permissions", "--vhost", "memq"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    documented = (ROOT / "docs" / "operations.md").read_text()

    assert len(printed) == 5 and all(line in documented.splitlines() for line in printed)
