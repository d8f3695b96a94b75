"""A 3-node RabbitMQ cluster started here (its own node names, ports and data directories), memq's quorum queues
on 3 members, and one node killed with ``kill -9`` (the ``ingest`` queue's leader) while 10,000 memories are
imported and retrievals run: no memory that ``remember`` reported stored is lost, clients and workers go on
through the other nodes (the URL lists all three), and the node rejoins. Runs in ``bash scripts/test_rabbitmq.sh``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import rabbitkit
from test_faults import Rig, running_rig, tally, wait_for
from test_rabbitmq_faults import amqp_app, assert_every_request_accounted_for

from memq.core import names
from memq.ops import services

pytestmark = pytest.mark.skipif(
    not rabbitkit.wanted(), reason="RabbitMQ broker tests: bash scripts/test_rabbitmq.sh (MEMQ_TEST_BROKER=rabbitmq)"
)
MEMORIES = 10_000
#: The stated time within which retrievals complete again after a node is lost (measured: 20.7 s alone on this
#: 2-core machine; slower while the other RabbitMQ tests run beside it).
RECOVERED_WITHIN_S = 90.0


def members(node: rabbitkit.Node, queue: str) -> tuple[str, list[str], list[str]]:
    """(leader, members, online members) of a quorum queue, as ``node`` sees it."""
    listed = rabbitkit.ctl("list_queues", "-q", "name", "leader", "members", "online", "--formatter", "json",
                           node=node.name)  # fmt: skip
    row = next(row for row in json.loads(listed) if row["name"] == queue)
    return str(row["leader"]), list(row["members"]), list(row["online"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[rabbitkit.Node]]:
    nodes = [rabbitkit.own_node(prefix=f"memqcluster{i}x") for i in range(3)]
    try:
        rabbitkit.start_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.remove()


@pytest.fixture(scope="module")
def rig(cluster: list[rabbitkit.Node], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    redis_service = services.start_redis_server()
    mongo = services.start_nx27017()
    broker_url = ";".join(node.url for node in cluster)
    env = services.memq_env(
        os.environ,
        broker_url,
        mongo.url,
        MEMQ_RESULT_BACKEND=redis_service.url,
        MEMQ_REDIS_URL=redis_service.url,
        MEMQ_MONGODB_DB="memq_rabbitmq_cluster",
        MEMQ_METRICS_PORT="0",
        MEMQ_RESULT_CACHE_TTL_S="0",
    )
    rabbitkit.setup_topology(env, rabbitmqctl=cluster[0].ctl_command())
    app = amqp_app(broker_url, redis_service.url)
    workers = {"embed": 1, "search": 1, "ingest": 2}
    with running_rig(redis_service, mongo, env, app, workers, tmp_path_factory.mktemp("cluster"), "cluster") as rig:
        yield rig


IMPORT = """
import json, sys, time
from memq import client
from memq.errors import IngestStopped
tenant = sys.argv[1]
items = [{"content": f"cluster memory number {i}"} for i in range(int(sys.argv[2]))]
skip, stops = 0, []
while True:
    try:
        summary = client.remember_many(tenant, "semantic", items, skip=skip, timeout_s=60)
        break
    except IngestStopped as exc:  # the caller's own retry: resume after what is reported stored
        stops.append([exc.stored_through, str(exc.reason)[:200]])
        skip = exc.stored_through
        time.sleep(1)
print(json.dumps({"stored_through": summary["stored_through"], "stops": stops}))
"""


def test_a_node_killed_mid_import_loses_no_stored_memory_clients_go_on_and_the_node_rejoins(
    rig: Rig, cluster: list[rabbitkit.Node]
) -> None:
    import subprocess

    assert all(len(members(cluster[0], queue)[1]) == 3 for queue in names.QUEUES)  # quorum queues on 3 members
    tenants = [f"cluster-load-{uuid.uuid4().hex[:6]}"]
    rig.seed(tenants[0])
    writer = f"cluster-writer-{uuid.uuid4().hex[:6]}"
    stop_file = rig.tmp / "stop"
    load = rig.client(
        "load", "--tenants", json.dumps(tenants), "--seconds", "600", "--threads", "4", "--timeout-s", "20",
        "--stop-file", str(stop_file),
    )  # fmt: skip
    importer = subprocess.Popen(
        [sys.executable, "-c", IMPORT, writer, str(MEMORIES)], env=rig.env, stdout=subprocess.PIPE, text=True
    )
    wait_for(lambda: rig.mongo_count(writer) >= MEMORIES // 5, 600, "a fifth of the import to be stored")
    leader = members(cluster[0], names.INGEST_QUEUE)[0]
    victim = next(node for node in cluster if node.name == leader)
    survivor = next(node for node in cluster if node is not victim)

    victim.kill()  # kill -9 of the ingest queue's leader, mid-import and mid-load
    killed_at, completed_at_kill = time.monotonic(), tally(load_records(load)).get("complete", 0)
    wait_for(
        lambda: tally(load_records(load)).get("complete", 0) >= completed_at_kill + 8,
        RECOVERED_WITHIN_S,
        "retrievals to complete through the surviving nodes",
    )
    recovered_s = time.monotonic() - killed_at
    out, _ = importer.communicate(timeout=900)
    imported = json.loads(out.strip().splitlines()[-1])
    victim.start()  # the node rejoins with its data directory
    wait_for(lambda: members(survivor, names.INGEST_QUEUE)[2] == members(survivor, names.INGEST_QUEUE)[1], 120,
             "the node to rejoin the ingest queue")  # fmt: skip
    stop_file.touch()
    summary = load.result(120)

    outcomes = assert_every_request_accounted_for(summary)
    print(f"3-node cluster, {leader} killed: retrievals {dict(outcomes)}, complete again {recovered_s:.1f} s after, "
          f"import {imported}")  # fmt: skip
    assert imported["stored_through"] == MEMORIES
    assert rig.mongo_count(writer) == MEMORIES  # every memory reported stored is there, each once
    assert all(process.poll() is None for process in rig.fleet.workers.values())  # no worker restarted


def load_records(load: Any) -> list[dict[str, Any]]:
    return [{"outcome": outcome} for outcome in load.seen() if isinstance(outcome, str)]
