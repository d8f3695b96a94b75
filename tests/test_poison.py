"""Raw, malformed messages on memq's queues, published as a hostile or buggy producer with broker access would:
the worker stays alive, the message is dead-lettered with its reason, nothing is left queued or unacknowledged.

The same tests run on Redis (``bash scripts/test.sh``) and on RabbitMQ (``bash scripts/test_rabbitmq.sh``): they
reach the broker through ``brokerkit``. Those about kombu's Redis envelope (the JSON a Redis list holds) and the
``redelivered`` flag a Redis envelope carries run on Redis only: on RabbitMQ the broker sets that flag itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from brokerkit import BrokerProbe, RedisProbe, envelope, probe_for, redis_unacked

from memq.client import api
from memq.core import keys, names
from memq.errors import RetrievalTimeout, TransientError
from memq.ops import services

pytestmark = pytest.mark.usefixtures("fleet")
DEEP = 100_000


@pytest.fixture
def probe() -> BrokerProbe:
    return probe_for(os.environ)


@pytest.fixture
def broker(probe: BrokerProbe) -> redis.Redis:
    """The Redis broker itself, for the tests of kombu's Redis envelope (skipped on RabbitMQ)."""
    if not isinstance(probe, RedisProbe):
        pytest.skip("about kombu's Redis envelope and its redelivered flag: Redis broker only")
    return probe.client


@pytest.fixture(autouse=True)
def empty_dead_letters(probe: BrokerProbe) -> Iterator[None]:
    probe.clear_dead_letters()
    yield
    probe.clear_dead_letters()


def good_headers(task: str = names.SEARCH) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "task": task, "lang": "py", "argsrepr": "()", "kwargsrepr": "{}"}


def publish(broker: redis.Redis, queue: str, message: dict[str, Any] | str) -> None:
    broker.lpush(queue, message if isinstance(message, str) else json.dumps(message))


def deep_header_envelope(queue: str) -> str:
    """An envelope whose header nests 100,000 lists deep: kombu's own JSON encoder could not even write it."""
    marker = '"__deep__"'
    text = json.dumps(envelope(queue, {**good_headers(), "x": "__deep__"}, b"[[], {}, {}]"))
    return text.replace(marker, "[" * DEEP + "]" * DEEP)


BAD_BODIES = [b"[1]", b'{"a": 1}', b"null", b"5", b'"abc"', b"[[], {}]", b"\xff\xfe not json"]
BAD_HEADERS = [
    {"task": names.SEARCH},
    {"id": None, "task": names.SEARCH},
    {"id": 5, "task": names.SEARCH},
    {"id": str(uuid.uuid4())},
    {"id": str(uuid.uuid4()), "task": 5},
    {"id": str(uuid.uuid4()), "task": [names.SEARCH]},
    {"id": str(uuid.uuid4()), "task": "memq.no_such_task"},
    {**good_headers(), "timelimit": 7},
    {**good_headers(), "retries": "many"},
]


def bad_envelopes(queue: str) -> list[str]:
    """Envelopes kombu itself cannot make a message of, or record as unacknowledged."""
    good = envelope(queue, good_headers(), b"[[], {}, {}]")
    broken: list[Any] = [5, "abc", [1], {}, {**good, "properties": "none"}, {**good, "body": "!!!x"}]
    for properties in (
        {"body_encoding": "nope"},
        {"delivery_tag": {"a": 1}},
        {"delivery_info": "nowhere"},
        {"delivery_info": {"routing_key": queue}},
    ):
        broken.append({**good, "properties": {**good["properties"], **properties}})
    return [json.dumps(item) for item in broken]


def poison(queue: str) -> list[tuple[Any, bytes]]:
    """(headers, body) pairs a memq worker must refuse, on either broker."""
    return [(good_headers(), body) for body in BAD_BODIES] + [(headers, b"[[], {}, {}]") for headers in BAD_HEADERS]


def redis_poison(queue: str) -> list[str]:
    """Envelopes on a Redis list that kombu itself cannot make a message of, the 100,000-deep header among them."""
    return [*bad_envelopes(queue), deep_header_envelope(queue)]


def wait_for(check: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def unacked_of(broker: redis.Redis, queue: str) -> int:
    return redis_unacked(broker, queue)


@pytest.mark.parametrize("queue", names.QUEUES)
def test_every_malformed_message_is_dead_lettered_and_the_worker_keeps_serving(
    queue: str, probe: BrokerProbe, fleet: services.Fleet, tenant: str
) -> None:
    messages = poison(queue)
    for headers, body in messages:
        probe.publish(queue, headers, body)

    wait_for(lambda: len(probe.dead_letters()) >= len(messages))
    wait_for(lambda: probe.depth(queue) == 0 and probe.unacked(queue) == 0)  # each acknowledged once recorded

    assert all(process.poll() is None for process in fleet.workers.values())
    letters = probe.dead_letters()
    assert {letter["reason"] for letter in letters} == {"bad_body", "undecodable", "bad_headers", "unknown_task"}
    assert {letter["queue"] for letter in letters} == {queue}
    api.remember(tenant, "semantic", ["keeps bees in the garden"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]


@pytest.mark.parametrize("queue", names.QUEUES)
def test_every_envelope_kombu_cannot_read_is_dead_lettered_and_the_worker_keeps_serving(
    queue: str, broker: redis.Redis, probe: BrokerProbe, fleet: services.Fleet, tenant: str
) -> None:
    messages = redis_poison(queue)
    for message in messages:
        publish(broker, queue, message)

    wait_for(lambda: len(probe.dead_letters()) >= len(messages))

    assert broker.llen(queue) == 0 and unacked_of(broker, queue) == 0
    assert all(process.poll() is None for process in fleet.workers.values())
    assert {letter["reason"] for letter in probe.dead_letters()} == {"undecodable_envelope"}
    api.remember(tenant, "semantic", ["keeps bees in the garden"])
    assert api.retrieve("bees", tenant, {"semantic": 1})["results"]["long_term_memory"]


def test_a_retry_carrying_kombus_redelivered_header_is_not_counted_as_a_redelivery(broker: redis.Redis) -> None:
    headers = {**good_headers(), "redelivered": True}  # Celery copies it onto retries of a restored task
    for _ in range(int(os.environ.get("MEMQ_MAX_DELIVERIES", "5")) + 2):
        publish(broker, names.SEARCH_QUEUE, envelope(names.SEARCH_QUEUE, headers, b'[["x", "y"], {}, {}]'))

    wait_for(lambda: broker.llen(names.SEARCH_QUEUE) == 0)

    time.sleep(0.5)
    assert broker.llen(keys.DEAD_LETTERS) == 0


def redelivered(headers: dict[str, Any], body: bytes = b'[["x", "y"], {}, {}]') -> dict[str, Any]:
    message = envelope(names.SEARCH_QUEUE, headers, body)
    message["properties"]["delivery_info"]["redelivered"] = True  # kombu's flag on a restored message
    return message


def test_a_redelivered_message_that_never_started_runs_however_often_it_is_redelivered(broker: redis.Redis) -> None:
    headers = good_headers()  # e.g. prefetched again and again by workers that died running something else
    for _ in range(int(os.environ.get("MEMQ_MAX_DELIVERIES", "5")) + 3):
        publish(broker, names.SEARCH_QUEUE, redelivered(headers))

    wait_for(lambda: broker.llen(names.SEARCH_QUEUE) == 0 and unacked_of(broker, names.SEARCH_QUEUE) == 0)

    time.sleep(0.5)
    assert broker.llen(keys.DEAD_LETTERS) == 0
    assert not broker.exists(keys.started_count(headers["id"]))  # each run finished: nothing left counted


def test_a_message_that_started_the_limit_of_times_is_dead_lettered_whole_and_its_replay_runs_it(
    broker: redis.Redis,
) -> None:
    headers = good_headers()
    limit = int(os.environ.get("MEMQ_MAX_DELIVERIES", "5"))
    broker.set(keys.started_count(headers["id"]), limit - 1)  # killed its worker on each start so far
    publish(broker, names.SEARCH_QUEUE, redelivered(headers))
    wait_for(lambda: broker.llen(keys.DEAD_LETTERS) >= 1 and broker.llen(names.SEARCH_QUEUE) == 0)

    letters = [json.loads(raw) for raw in broker.lrange(keys.DEAD_LETTERS, 0, -1)]
    assert [(letter["reason"], letter["replayable"]) for letter in letters] == [("too_many_deliveries", True)]
    assert f"started {limit} times" in letters[0]["detail"]

    replayed = cli_json("dead-letters", "--replay", letters[0]["id"])
    result_key = f"celery-task-meta-{headers['id']}"
    wait_for(lambda: json.loads(broker.get(result_key) or "{}").get("status") == "SUCCESS")  # ran as a new delivery

    assert replayed["replayed"][0]["outcome"] == "replayed" and replayed["replayed"][0]["queue"] == "search"
    assert broker.llen(keys.DEAD_LETTERS) == 0 and not broker.exists(keys.dead_message(letters[0]["id"]))


def cli_json(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *args, "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout, proc.stderr
    return dict(json.loads(proc.stdout))


def cli_text(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "memq.ops.cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_poison_on_the_search_queue_under_load_never_hangs_a_retrieval(probe: BrokerProbe, tenant: str) -> None:
    api.remember(tenant, "semantic", ["runs a small bakery", "plays the cello", "grows chillies"])

    def one(i: int) -> str:
        try:
            result = api.retrieve(f"hobby number {i}", tenant, {"semantic": 2}, timeout_s=20)
        except (RetrievalTimeout, TransientError) as exc:
            return type(exc).__name__
        return "complete" if len(result["results"]["long_term_memory"]) == 2 else "reported"

    with ThreadPoolExecutor(16) as pool:
        outcomes = pool.map(one, range(48))
        for headers, body in (poison(names.SEARCH_QUEUE) * 4)[:64]:
            probe.publish(names.SEARCH_QUEUE, headers, body)
        seen = list(outcomes)

    assert seen.count("complete") == len(seen)
    wait_for(lambda: probe.depth(names.SEARCH_QUEUE) == 0)


def test_dead_letters_are_listed_counted_and_purged_by_the_cli(probe: BrokerProbe) -> None:
    probe.publish(names.INGEST_QUEUE, good_headers(), b"[1]")
    wait_for(lambda: len(probe.dead_letters()) == 1)

    status = cli_json("status")
    listed = cli_json("dead-letters", "--purge")

    assert status["dead_letters"] == 1
    assert listed["dead_letters"][0]["reason"] == "bad_body" and listed["dead_letters"][0]["queue"] == "ingest"
    assert listed["purged"] == 1 and probe.dead_letters() == []


def test_purge_removes_exactly_the_letters_it_showed_and_purge_all_says_how_many_it_removed(
    probe: BrokerProbe,
) -> None:
    for _ in range(5):
        probe.publish(names.INGEST_QUEUE, good_headers(), b"[1]")
    wait_for(lambda: len(probe.dead_letters()) == 5)

    shown = cli_json("dead-letters", "--limit", "2", "--purge")
    left = [letter["id"] for letter in probe.dead_letters()]
    everything = cli_json("dead-letters", "--purge-all")

    assert shown["purged"] == 2 and len(shown["dead_letters"]) == 2
    assert len(left) == 3 and not {letter["id"] for letter in shown["dead_letters"]} & set(left)
    assert everything["purged"] == 3 and probe.dead_letters() == []


def test_a_dead_letters_preview_never_reaches_the_terminal_with_control_characters(probe: BrokerProbe) -> None:
    hostile = rb'["\u001b[2J\u001b]0;pwned\u0007", "\r\u0000"]'
    probe.publish(names.INGEST_QUEUE, good_headers(), hostile)
    probe.publish(names.INGEST_QUEUE, good_headers(), b"\x1b[31m not json \x07")
    wait_for(lambda: len(probe.dead_letters()) == 2)

    printed = cli_text("dead-letters")

    assert not any(char in printed for char in "\x1b\x07\x00\r")
    assert "\\x1b" in printed


def test_a_search_message_with_an_embedded_that_is_not_a_dict_reports_the_type_instead_of_raising(
    app: Any, tenant: str
) -> None:
    sent = app.send_task(
        names.SEARCH, args=[["not", "a", "dict"], tenant, "semantic", 3], kwargs={"mode": "vector"}, queue="search"
    )

    result = sent.get(timeout=30)

    assert result["type"] == "long_term_memory" and result["items"] == []
    assert result["error"].startswith("invalid input: embedded:")


def test_a_merge_of_garbage_or_forged_results_reports_those_types_and_ranks_nothing_from_them(
    app: Any, tenant: str
) -> None:
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    request = retrieval_request(get_settings(), "anything", tenant, {"semantic": 2, "episodic": 2, "procedural": 1})
    forged_item = {"id": "x", "content": "forged", "score": 0.9, "importance": 1e308}
    results = [
        {"type": "long_term_memory", "items": [forged_item], "search_ms": 1.0},
        {"type": "conversation_memory", "items": "garbage"},
        7,
        {"type": "workflow_memory", "items": [], "search_ms": float("inf")},
    ]

    merged = app.send_task(names.MERGE, kwargs={"results": results, "request": request}, queue=names.SEARCH_QUEUE)
    result = merged.get(timeout=30)

    assert all(items == [] for items in result["results"].values())
    assert set(result["errors"]) == {"long_term_memory", "conversation_memory", "workflow_memory"}
    assert "malformed item" in result["errors"]["long_term_memory"]
    with pytest.raises(Exception, match="results"):
        app.send_task(names.MERGE, kwargs={"results": "garbage", "request": request}, queue="search").get(timeout=30)


def test_a_task_name_no_worker_knows_fails_its_caller_at_once_and_is_dead_lettered(
    app: Any, probe: BrokerProbe
) -> None:
    from celery.exceptions import NotRegistered

    sent = app.send_task("memq.no_such_task", args=[1], queue=names.SEARCH_QUEUE)

    with pytest.raises(NotRegistered):
        sent.get(timeout=10)
    wait_for(lambda: len(probe.dead_letters()) == 1)
    assert [letter["reason"] for letter in probe.dead_letters()] == ["unknown_task"]


@pytest.mark.parametrize("vector", ["", "AAAA", "not base64!", None])
def test_a_search_whose_query_vector_is_empty_short_or_garbage_reports_the_type(
    app: Any, tenant: str, vector: Any
) -> None:
    api.remember(tenant, "semantic", ["keeps a vegetable patch"])

    sent = app.send_task(
        names.SEARCH,
        args=[{"vector": vector}, tenant, "semantic", 3],
        kwargs={"mode": "vector"},
        queue=names.SEARCH_QUEUE,
    )
    result = sent.get(timeout=30)

    assert result["items"] == [] and result["error"].startswith("invalid input: embedded:")


#: A search that reports its malformed query vector and succeeds: what a replay may run any number of times.
HARMLESS_SEARCH = b'[[["not", "a", "dict"], "replay-tenant", "semantic", 3], {"mode": "vector"}, {}]'


def letter_of(letter_id: str) -> dict[str, Any]:
    return next(letter for letter in cli_json("dead-letters")["dead_letters"] if letter["id"] == letter_id)


def replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", "dead-letters", *args], capture_output=True, text=True, timeout=60
    )


def test_a_letter_whose_message_names_a_queue_outside_memqs_is_listed_as_refused_and_never_replayed(
    probe: BrokerProbe,
) -> None:
    victim = probe.plant_letter("unacked", good_headers(names.FORGET), b'[["victim"], {}, {}]')

    shown = letter_of(victim)
    replayed = cli_json("dead-letters", "--replay", victim)["replayed"]

    assert shown["replayable"] is False and "not one of memq's queues" in shown["replay"]
    assert [(r["id"], r["outcome"]) for r in replayed] == [(victim, "not_replayable")]
    if isinstance(probe, RedisProbe):  # kombu's unacked index was never pushed onto
        assert probe.client.type("unacked") in (b"hash", b"none")


def test_the_listing_shows_the_message_a_replay_would_publish_not_the_record_beside_it(probe: BrokerProbe) -> None:
    headers = good_headers(names.FORGET)
    letter = probe.plant_letter("ingest", headers, b'[["victim"], {}, {}]', shown_queue="search")

    shown = letter_of(letter)

    assert (shown["queue"], shown["task"], shown["task_id"]) == ("ingest", names.FORGET, headers["id"])
    assert shown["replay"] == "memq.forget -> ingest" and shown["replayable"] is True
    probe.clear_dead_letters()  # never replayed: it would forget "victim"


def test_a_letter_whose_task_is_not_routed_to_its_queue_is_refused(probe: BrokerProbe) -> None:
    letter = probe.plant_letter("search", good_headers(names.FORGET), b'[["victim"], {}, {}]')

    replayed = cli_json("dead-letters", "--replay", letter)["replayed"]

    assert replayed[0]["outcome"] == "not_replayable" and "not routed" in replayed[0]["detail"]


def test_two_concurrent_replays_of_one_letter_publish_it_once(probe: BrokerProbe, cache_redis: redis.Redis) -> None:
    headers = good_headers(names.SEARCH)
    letter = probe.plant_letter("search", headers, HARMLESS_SEARCH)

    both = [
        subprocess.Popen(
            [sys.executable, "-m", "memq.ops.cli", "dead-letters", "--replay", letter, "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = sorted(json.loads(proc.communicate(timeout=60)[0])["replayed"][0]["outcome"] for proc in both)

    assert outcomes.count("replayed") == 1 and len(outcomes) == 2
    result_key = f"celery-task-meta-{headers['id']}"
    wait_for(lambda: json.loads(cache_redis.get(result_key) or "{}").get("status") == "SUCCESS")
    assert letter not in {letter["id"] for letter in probe.dead_letters()}


def test_replay_all_goes_on_past_bad_letters_and_reports_each_in_one_line(probe: BrokerProbe) -> None:
    bad = probe.plant_letter("search", good_headers(names.SEARCH), b"not json at all")
    good = probe.plant_letter("search", good_headers(names.SEARCH), HARMLESS_SEARCH)
    garbage = probe.plant_stored("{{{ not a message") if isinstance(probe, RedisProbe) else None

    done = replay_cli("--replay-all")

    lines = done.stdout.splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert f"{bad}  not_replayable: body is not JSON" in lines
    assert any(line.startswith(f"{good}  replayed -> search") for line in lines)
    if garbage:
        assert f"{garbage}  not_replayable: stored message is not JSON" in lines
    assert {letter["id"] for letter in probe.dead_letters()} == {bad, *([garbage] if garbage else [])}


@contextlib.contextmanager
def published_with_bad_headers(task: str, skip: int = 0) -> Iterator[None]:
    """Every ``task`` message this process publishes (after the first ``skip``) carries a malformed ``timelimit``:
    a worker's guard dead-letters it."""
    from celery.signals import before_task_publish

    seen = [0]

    def spoil(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if isinstance(headers, dict) and headers.get("task") == task:
            seen[0] += 1
            if seen[0] > skip:
                headers["timelimit"] = 7

    before_task_publish.connect(spoil, weak=False, dispatch_uid=f"test.spoil.{task}")
    try:
        yield
    finally:
        before_task_publish.disconnect(dispatch_uid=f"test.spoil.{task}")


def test_a_retrieval_whose_embed_step_is_dead_lettered_fails_at_once_with_a_clear_error(tenant: str) -> None:
    from memq.errors import TaskFailed

    with published_with_bad_headers(names.EMBED_QUERY), pytest.raises(TaskFailed, match="dead-lettered"):
        api.retrieve("anything at all", tenant, {"semantic": 1}, timeout_s=60)


def test_a_chord_whose_search_step_is_dead_lettered_fails_at_once_instead_of_staying_pending(
    app: Any, tenant: str
) -> None:
    from celery import chord

    from memq.client.edge import retrieval_request
    from memq.client.waiting import ResultWaiter
    from memq.core.settings import get_settings
    from memq.errors import DeadLettered

    request = retrieval_request(get_settings(), "anything", tenant, {"semantic": 1, "episodic": 1})
    searches = [
        app.signature(names.SEARCH, args=[{"vector": None}, tenant, memory_type, 1], queue=names.SEARCH_QUEUE)
        for memory_type in ("semantic", "episodic")
    ]
    merge = app.signature(names.MERGE, kwargs={"request": request}, queue=names.SEARCH_QUEUE)

    with published_with_bad_headers(names.SEARCH, skip=1):
        sent = chord(searches)(merge)

    with pytest.raises(DeadLettered, match="dead-lettered"):  # the part's own error, as api.retrieve gets it
        ResultWaiter(app).wait(sent, timeout_s=60)
