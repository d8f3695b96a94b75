"""RabbitMQ as memq's broker: the topology ``memq broker setup`` declares (quorum queues, dead letters, the policy
with the delivery limit), letters the broker dead-letters itself (listed, replayed, and failing their callers at
once), retries on quorum queues, the broadcast guard, a client given a list of nodes, and the broker users per role
(the session fleet's workers run as their kind's user). Runs in ``bash scripts/test_rabbitmq.sh``
(``MEMQ_TEST_BROKER=rabbitmq``), where the session fleet works in a private virtual host; tests that need a broker of
their own make another one (``rabbitmq_vhost``). The pipeline and poison tests run there too, on the same bodies as
on Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import amqp.basic_message
import amqp.exceptions
import pytest
import rabbitkit
from brokerkit import AmqpProbe
from faultkit import run_client
from kombu import Connection, Exchange, Queue

from memq.core import broker, names, sharding
from memq.ops import services

pytestmark = pytest.mark.skipif(
    not rabbitkit.wanted(), reason="RabbitMQ broker tests: bash scripts/test_rabbitmq.sh (MEMQ_TEST_BROKER=rabbitmq)"
)


@pytest.fixture
def rabbitmq_vhost() -> Iterator[str]:
    """A private virtual host on this machine's RabbitMQ, deleted with all it holds afterwards."""
    with rabbitkit.private_vhost("memq-own") as vhost:
        yield vhost


def env_for(vhost: str) -> dict[str, str]:
    return {**os.environ, "MEMQ_BROKER_URL": rabbitkit.vhost_url(vhost)}


def queues_of(vhost: str) -> dict[str, tuple[str, str]]:
    """Each queue's (type, policy)."""
    listed = rabbitkit.ctl("list_queues", "-q", "-p", vhost, "name", "type", "policy")
    rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows if len(row) >= 2}


def policy_of(vhost: str) -> dict[str, Any]:
    listed = rabbitkit.ctl("list_policies", "-q", "-p", vhost, "--formatter", "json")
    return {policy["name"]: json.loads(policy["definition"]) for policy in json.loads(listed)}


def exchanges_of(vhost: str) -> dict[str, str]:
    listed = rabbitkit.ctl("list_exchanges", "-q", "-p", vhost, "name", "type")
    return dict(line.split("\t")[:2] for line in listed.splitlines() if "\t" in line)


def wait_for(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_broker_setup_declares_quorum_queues_dead_letters_and_the_policy_and_a_second_run_changes_nothing(
    rabbitmq_vhost: str,
) -> None:
    first = rabbitkit.setup_topology(env_for(rabbitmq_vhost))
    again = rabbitkit.setup_topology(env_for(rabbitmq_vhost))

    assert first == again
    queues = queues_of(rabbitmq_vhost)
    assert {name: queues[name] for name in names.QUEUES} == dict.fromkeys(names.QUEUES, ("quorum", broker.POLICY_NAME))
    assert queues[broker.DEAD_LETTER_QUEUE][0] == "quorum"
    assert policy_of(rabbitmq_vhost)[broker.POLICY_NAME] == broker.policy(broker.DEFAULT_DELIVERY_LIMIT)
    exchanges = exchanges_of(rabbitmq_vhost)
    assert [exchanges[name] for name in names.QUEUES] == ["topic"] * 3
    assert exchanges[broker.DEAD_LETTER_EXCHANGE] == "fanout"


def test_a_changed_delivery_limit_changes_only_the_policy_and_memqs_queues_still_declare(rabbitmq_vhost: str) -> None:
    from memq.config.celery import task_queues
    from memq.core.settings import Settings

    rabbitkit.setup_topology(env_for(rabbitmq_vhost))
    rabbitkit.setup_topology(env_for(rabbitmq_vhost), "--delivery-limit", "7")

    url = rabbitkit.vhost_url(rabbitmq_vhost)
    with Connection(url) as connection:  # memq's own definitions declare again: no 406 PRECONDITION_FAILED
        for queue in task_queues(Settings(broker_url=url)):
            again = Queue(queue.name, Exchange(queue.exchange.name, queue.exchange.type), queue.routing_key)
            again.queue_arguments = queue.queue_arguments
            again.bind(connection.default_channel).declare()
    assert policy_of(rabbitmq_vhost)[broker.POLICY_NAME]["delivery-limit"] == 7


def test_a_delivery_limit_set_as_a_queue_argument_could_not_be_changed_which_is_why_it_is_a_policy(
    rabbitmq_vhost: str,
) -> None:
    url = rabbitkit.vhost_url(rabbitmq_vhost)
    with Connection(url) as connection:
        Queue("probe", queue_arguments={**broker.QUORUM, "x-delivery-limit": 5}).bind(connection.channel()).declare()
        changed = Queue("probe", queue_arguments={**broker.QUORUM, "x-delivery-limit": 7})
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            changed.bind(connection.channel()).declare()


def test_the_fleets_task_queues_are_quorum_queues_under_memqs_policy() -> None:
    vhost = broker.vhost_of(os.environ["MEMQ_BROKER_URL"])

    queues = queues_of(vhost)

    assert all(queues[name] == ("quorum", broker.POLICY_NAME) for name in names.QUEUES)
    assert not any(name.endswith(".pidbox") and kind == "quorum" for name, (kind, _) in queues.items())


def test_a_message_past_the_brokers_delivery_limit_is_listed_with_the_brokers_reason_and_replays(
    rabbitmq_vhost: str,
) -> None:
    env = env_for(rabbitmq_vhost)
    rabbitkit.setup_topology(env, "--delivery-limit", "1")
    task_id = str(uuid.uuid4())
    with Connection(env["MEMQ_BROKER_URL"], transport_options={"confirm_publish": True}) as connection:
        connection.Producer().publish(
            b'[["x"], {}, {}]',
            exchange="",
            routing_key=names.INGEST_QUEUE,
            headers={"id": task_id, "task": names.STORE},
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )
        queue = Queue(names.INGEST_QUEUE, no_declare=True).bind(connection.channel())
        for _ in range(5):  # a consumer that dies with it, again and again
            message = queue.get(no_ack=False)
            if message is None:
                break
            message.reject(requeue=True)

    listed = cli(env, "dead-letters", "--json")["dead_letters"]
    replayed = cli(env, "dead-letters", "--replay", listed[0]["id"], "--json")["replayed"]

    assert [(letter["broker_reason"], letter["queue"], letter["task_id"]) for letter in listed] == [
        ("delivery_limit", names.INGEST_QUEUE, task_id)
    ]
    assert [(r["outcome"], r["queue"], r["task_id"]) for r in replayed] == [("replayed", "ingest", task_id)]
    assert cli(env, "dead-letters", "--json")["dead_letters"] == []


def die_with_every_delivery(url: str, queue: str, stop: threading.Event, seen: list[str]) -> None:
    """A consumer of ``queue`` that takes each delivery and dies before acknowledging it, as a worker SIGKILLed on
    every delivery would: its connection closes, the broker returns the message and counts one more delivery."""
    while not stop.is_set():
        with Connection(url) as connection:
            message = Queue(queue, no_declare=True).bind(connection.channel()).get(no_ack=False)
            if message is not None:
                seen.append(message.headers["id"])
        if message is None:
            time.sleep(0.05)


def test_a_retrieval_step_the_broker_dead_letters_past_its_delivery_limit_fails_its_caller_at_once(
    app: Any, fleet: services.Fleet, tenant: str
) -> None:
    from celery import chord

    from memq.client.edge import retrieval_request
    from memq.client.waiting import ResultWaiter
    from memq.core.settings import get_settings
    from memq.errors import DeadLettered
    from memq.ops import dead_letters

    url = os.environ["MEMQ_BROKER_URL"]
    dead_letters.purge_all(url)
    rabbitkit.setup_topology({**os.environ, "MEMQ_SEARCH_SHARDS": "2"})  # shard queues, under the delivery limit
    shard = sharding.shard_queue(1)  # the retrieval's search step goes where only the killer consumes
    request = retrieval_request(get_settings(), "bees", tenant, {"semantic": 1})
    search = app.signature(names.SEARCH, args=[{"vector": None}, tenant, "semantic", 1], queue=shard)
    merge = app.signature(names.MERGE, kwargs={"request": request}, queue=names.SEARCH_QUEUE)
    stop, seen = threading.Event(), []
    killer = threading.Thread(target=die_with_every_delivery, args=(url, shard, stop, seen))
    killer.start()
    try:
        sent = chord([search])(merge)
        with pytest.raises(DeadLettered, match=r"memq\.search was dead-lettered: delivery_limit"):
            ResultWaiter(app).wait(sent, timeout_s=60)  # as client.retrieve waits; not a timeout
    finally:
        stop.set()
        killer.join()
    letters = [letter.fields for letter in dead_letters.listed(100, url)]
    dead_letters.purge_all(url)

    assert len(seen) > 1 and len(set(seen)) == 1  # one search step, delivered again and again
    assert [(letter["broker_reason"], letter["queue"], letter["task_id"]) for letter in letters] == [
        ("delivery_limit", shard, seen[0])
    ]


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout, done.stderr
    return dict(json.loads(done.stdout))


def every_worker_answers(app: Any, fleet: services.Fleet) -> bool:
    replies = app.control.ping(destination=list(fleet.workers), timeout=2.0) or []
    return {host for reply in replies for host in reply} == set(fleet.workers)


def test_a_remote_shutdown_and_garbage_on_the_remote_control_exchange_leave_every_worker_serving(
    app: Any, fleet: services.Fleet, tenant: str
) -> None:
    from memq.client import api

    refused = app.control.broadcast("shutdown", reply=True, timeout=2.0) or []
    with Connection(os.environ["MEMQ_BROKER_URL"]) as connection:
        producer = connection.Producer()
        pidbox = Exchange("celery.pidbox", type="fanout", durable=False, auto_delete=False)
        for body, content_type in ((b"\xff not json", "application/json"), (b"[1]", "application/json")):
            producer.publish(body, exchange=pidbox, routing_key="", content_type=content_type, content_encoding="utf-8")

    time.sleep(1.0)
    assert {host for reply in refused for host in reply} == set(fleet.workers)
    assert all("disabled" in str(answer) for reply in refused for answer in reply.values())
    assert all(process.poll() is None for process in fleet.workers.values())
    wait_for(lambda: every_worker_answers(app, fleet))
    api.remember(tenant, "semantic", ["keeps bees"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]


def test_a_countdown_under_a_second_is_refused_by_native_delayed_delivery_so_memq_sleeps_it_in_the_worker(
    app: Any,
) -> None:
    from memq.tasks.retry import countdown_for

    with pytest.raises(ValueError, match="countdown must be a positive number"):  # Celery's, on quorum queues
        app.send_task(names.SEARCH, args=["x"], queue=names.SEARCH_QUEUE, countdown=0.3)

    task = SimpleNamespace(app=app)
    started = time.monotonic()
    assert countdown_for(task, 0.3) == 0
    assert time.monotonic() - started >= 0.3
    assert countdown_for(task, 1.6) == 2.0


def test_a_client_given_a_list_of_nodes_publishes_through_the_one_that_answers(fleet: services.Fleet) -> None:
    dead_node = "amqp://guest:guest@127.0.0.1:1/" + broker.vhost_of(os.environ["MEMQ_BROKER_URL"])
    env = {**os.environ, "MEMQ_BROKER_URL": f"{dead_node};{os.environ['MEMQ_BROKER_URL']}"}

    answered = run_client(
        env,
        """
        import json
        from memq import client
        client.remember("failover-tenant", "semantic", ["reads maps"])
        print(json.dumps(client.retrieve("maps", "failover-tenant", {"semantic": 1})["results"]))
        """,
    )

    assert [item["content"] for item in answered["long_term_memory"]] == ["reads maps"]


DEEP = 3_000


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"x": value}
    return value


def test_a_task_message_with_a_deeply_nested_header_table_leaves_every_worker_serving(
    app: Any, fleet: services.Fleet, tenant: str
) -> None:
    from memq.client import api
    from memq.ops import dead_letters

    url = os.environ["MEMQ_BROKER_URL"]
    sys.setrecursionlimit(20_000)  # deep enough that a worker's decoder (limit 1,000) cannot read it
    with Connection(url, transport_options={"confirm_publish": True}) as connection:
        for queue in names.QUEUES:
            connection.Producer().publish(
                b"[[], {}, {}]",
                exchange="",
                routing_key=queue,
                headers={"id": str(uuid.uuid4()), "task": names.SEARCH, "deep": nested(DEEP)},
                content_type="application/json",
                content_encoding="utf-8",
            )

    probe = AmqpProbe(url)
    wait_for(lambda: all(probe.depth(queue) == 0 for queue in names.QUEUES))
    wait_for(lambda: all(probe.unacked(queue) == 0 for queue in names.QUEUES))
    assert all(process.poll() is None for process in fleet.workers.values())
    wait_for(lambda: every_worker_answers(app, fleet))
    api.remember(tenant, "semantic", ["keeps bees"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]
    letters = dead_letters.listed(100, url)
    assert sorted((letter.fields["queue"], letter.fields["reason"]) for letter in letters) == sorted(
        (queue, "bad_headers") for queue in names.QUEUES
    )
    dead_letters.purge_all(url)


@pytest.fixture
def role_user() -> Iterator[Callable[[str, str], str]]:
    """Makes broker users of a role in a virtual host (``rabbitkit.add_role_user``), deleted afterwards; their URLs."""
    users: list[str] = []
    yield lambda vhost, role: rabbitkit.add_role_user(vhost, role, users)
    for user in users:
        rabbitkit.ctl("delete_user", user)


@pytest.fixture
def web_user(rabbitmq_vhost: str, role_user: Callable[[str, str], str]) -> str:
    """A broker user with the web role's permissions in ``rabbitmq_vhost``; its URL."""
    rabbitkit.setup_topology(env_for(rabbitmq_vhost))
    return role_user(rabbitmq_vhost, "web")


def test_the_web_apps_broker_user_publishes_memqs_requests_and_the_broker_refuses_it_everything_else(
    web_user: str, rabbitmq_vhost: str
) -> None:
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    web = Celery("memq-web", set_as_current=False)
    web.config_from_object(celery_config(Settings(broker_url=web_user, result_backend=os.environ["MEMQ_REDIS_URL"])))
    web.send_task(names.CREATE_INDEXES, queue=names.INGEST_QUEUE, ignore_result=True)  # no worker in this vhost

    with pytest.raises(Exception, match="ACCESS_REFUSED"):
        web.control.broadcast("shutdown")
    with Connection(web_user) as connection:
        with pytest.raises(amqp.exceptions.AccessRefused):
            Queue(names.INGEST_QUEUE, no_declare=True).bind(connection.channel()).get()
        with pytest.raises(amqp.exceptions.AccessRefused):
            Queue(names.INGEST_QUEUE, no_declare=True).bind(connection.channel()).purge()
    with Connection(rabbitkit.vhost_url(rabbitmq_vhost)) as connection:  # the broker's own user: what was published
        waiting = connection.default_channel.queue_declare(queue=names.INGEST_QUEUE, passive=True).message_count
    assert waiting == 1


def session_vhost() -> str:
    return broker.vhost_of(os.environ["MEMQ_BROKER_URL"])


def worker_user_url(kind: str) -> str:
    """The broker URL the session fleet's ``kind`` worker runs with (tests/conftest.py: its kind's role)."""
    return os.environ[f"MEMQ_TEST_{kind.upper()}_WORKER_BROKER_URL"]


def connected_users(vhost: str) -> set[str]:
    listed = rabbitkit.ctl("list_connections", "-q", "user", "vhost")
    return {row[0] for row in (line.split("\t") for line in listed.splitlines()) if len(row) == 2 and row[1] == vhost}


def test_the_fleets_workers_run_as_their_kinds_broker_users_and_serve_retrievals(
    fleet: services.Fleet, tenant: str
) -> None:
    from memq.client import api

    api.remember(tenant, "semantic", ["keeps bees"])
    found = api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]

    assert [item["content"] for item in found] == ["keeps bees"]
    workers = {urlsplit(worker_user_url(kind)).username for kind in services.WORKER_KINDS}
    assert workers <= connected_users(session_vhost())


def test_a_workers_broker_user_sends_a_delayed_retry_through_celerys_delayed_delivery_to_another_kind() -> None:
    from celery import Celery

    from memq.config.celery import celery_config
    from memq.core.settings import Settings

    embed = Celery("memq-embed-user", set_as_current=False)
    embed.config_from_object(
        celery_config(Settings(broker_url=worker_user_url("embed"), result_backend=os.environ["MEMQ_RESULT_BACKEND"]))
    )
    sent = embed.send_task(
        names.SEARCH, args=[["not", "a", "dict"], "retry-tenant", "semantic", 3], queue=names.SEARCH_QUEUE, countdown=1
    )

    sent.get(timeout=60)  # the search worker ran it: it arrived through the celery_delayed_* exchanges

    assert sent.state == "SUCCESS"


@pytest.mark.parametrize(
    ("kind", "refused"),
    [
        ("embed", "consume search"),
        ("search", "purge ingest"),
        ("ingest", "consume embed"),
        ("search", "delete its own queue"),
        ("embed", "declare a task queue"),
        ("ingest", "read the dead letters"),
        ("search", "purge the dead letters"),
        ("embed", "publish through the default exchange"),
    ],
)
def test_a_workers_broker_user_is_refused_other_kinds_queues_and_memqs_topology(kind: str, refused: str) -> None:
    own = {"embed": "embed", "search": "search", "ingest": "ingest"}[kind]
    attempts: dict[str, Callable[[Any], Any]] = {
        "consume search": lambda channel: Queue("search", no_declare=True).bind(channel).get(),
        "consume embed": lambda channel: Queue("embed", no_declare=True).bind(channel).get(),
        "purge ingest": lambda channel: Queue("ingest", no_declare=True).bind(channel).purge(),
        "delete its own queue": lambda channel: channel.queue_delete(own),
        "declare a task queue": lambda channel: channel.queue_declare(own, durable=True, arguments=broker.QUORUM),
        "read the dead letters": lambda channel: channel.basic_get(broker.DEAD_LETTER_QUEUE),
        "purge the dead letters": lambda channel: channel.queue_purge(broker.DEAD_LETTER_QUEUE),
        "publish through the default exchange": lambda channel: channel.basic_publish(
            amqp.basic_message.Message(b"[[], {}, {}]"), exchange="", routing_key=own
        ),
    }

    with Connection(worker_user_url(kind)) as connection:
        channel = connection.channel()
        with pytest.raises(amqp.exceptions.AccessRefused):
            attempts[refused](channel)
            channel.basic_qos(0, 1, False)  # a refused publish closes the channel: the next call raises


def test_the_operators_broker_user_sets_up_lists_replays_and_purges_dead_letters_and_sees_the_workers(
    fleet: services.Fleet, role_user: Callable[[str, str], str]
) -> None:
    from brokerkit import AmqpProbe

    operator = {**os.environ, "MEMQ_BROKER_URL": role_user(session_vhost(), "operator")}
    harmless = b'[[["not", "a", "dict"], "replay-tenant", "semantic", 3], {"mode": "vector"}, {}]'
    probe = AmqpProbe(os.environ["MEMQ_BROKER_URL"])
    probe.clear_dead_letters()
    replayed_id = probe.plant_letter("search", {"id": str(uuid.uuid4()), "task": names.SEARCH}, harmless)
    probe.plant_letter("ingest", {"id": str(uuid.uuid4()), "task": names.STORE}, b"not json")

    rabbitkit.setup_topology(operator)  # idempotent on the fleet's own virtual host
    listed = cli(operator, "dead-letters", "--json")["dead_letters"]
    replayed = cli(operator, "dead-letters", "--replay", replayed_id, "--json")["replayed"]
    purged = cli(operator, "dead-letters", "--purge-all", "--json")["purged"]
    status = cli(operator, "status", "--json")

    assert len(listed) == 2
    assert [r["outcome"] for r in replayed] == ["replayed"]
    assert purged == 1 and probe.dead_letters() == []
    assert set(fleet.workers) <= set(status["workers"])  # remote control (memq_info) as the operator
    with Connection(operator["MEMQ_BROKER_URL"]) as connection, pytest.raises(amqp.exceptions.AccessRefused):
        connection.channel().queue_declare("not-memqs", durable=True)  # memq's names only
