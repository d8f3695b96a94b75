"""Faults: workers killed under load, Redis restarted, MongoDB paused or stopped, ingestion redelivered.

Everything here runs on a private rig, so the session fleet and other modules never see the faults: its own
redis-server and nx-27017 on spare ports, and its own workers (two embed, two search, one ingest). The
clients run in subprocesses (this file, run as a script: ``python tests/test_faults.py MODE ...``), because
settings are read once per process and this test process talks to the session's Redis.

Accounting: every retrieval a client sends ends as exactly one of

- ``complete``: every requested type has its expected number of memories and ``errors`` is empty;
- ``reported``: the result arrived and each type that lacks memories is named under ``errors``;
- ``timeout`` / ``unavailable`` / ``failed``: the client raised ``RetrievalTimeout`` / ``TransientError`` /
  ``TaskFailed`` (clear errors);
- ``silent``: a type lacks memories and no error says why (never allowed);
- ``crash``: any other exception (never allowed);
- ``hung``: the call had not returned ``HANG_MARGIN_S`` past its own timeout (never allowed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from tests/
    sys.path.insert(0, str(ROOT))

import faultkit  # noqa: E402
import pytest  # noqa: E402

from memq.errors import DeadLettered  # noqa: E402
from memq.ops import services  # noqa: E402

LIMITS = {"semantic": 2, "episodic": 1}
EXPECTED = {"long_term_memory": 2, "conversation_memory": 1}
SEMANTIC = ["loves spicy Thai green curry", "bakes sourdough bread on Sundays", "works night shifts in the ICU"]
EPISODIC = ["user: book a table for two on Friday"]
VISIBILITY_TIMEOUT_S = 10  # a task running longer than this is handed out again: room for a slow store here
MAX_DELIVERIES = 3  # the rig's delivery limit: each delivery of the poison store costs a kill and a timeout
HANG_MARGIN_S = 15.0
CLEAR = ("complete", "reported", "timeout", "unavailable", "failed")


# -- the client side (runs in a subprocess configured for the rig) ----------------------------------------------


def classify(result: dict[str, Any]) -> str:
    for memory_type, expected in EXPECTED.items():
        if len(result["results"].get(memory_type, [])) < expected and memory_type not in result["errors"]:
            return "silent"
    return "reported" if result["errors"] else "complete"


def one_retrieval(tenant: str, timeout_s: float) -> dict[str, Any]:
    from memq.client import api
    from memq.errors import RetrievalTimeout, TaskFailed, TransientError

    started = time.monotonic()
    outcome, detail, errors = "complete", "", {}
    try:
        result = api.retrieve("what does this person eat?", tenant, LIMITS, timeout_s=timeout_s)
        outcome = classify(result)
        errors = {memory_type: message[:200] for memory_type, message in result["errors"].items()}
    except RetrievalTimeout as exc:
        outcome, detail = "timeout", str(exc)
    except TransientError as exc:
        outcome, detail = "unavailable", str(exc)
    except TaskFailed as exc:
        outcome, detail = "failed", str(exc)
    except Exception as exc:
        outcome, detail = "crash", f"{type(exc).__name__}: {exc}"
    return {"outcome": outcome, "detail": detail[:300], "errors": errors, "elapsed_s": time.monotonic() - started}


def drive_load(
    tenants: list[str], seconds: float, threads: int, timeout_s: float, progress: str, stop_file: str = ""
) -> dict[str, Any]:
    """``threads`` clients retrieving back to back for ``seconds`` or until ``stop_file`` exists; every call is
    accounted for."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    sent = 0

    def client_loop(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while time.monotonic() < stop_at and not (stop_file and os.path.exists(stop_file)):
            with lock:
                sent += 1
            record = one_retrieval(rng.choice(tenants), timeout_s)
            with lock:
                records.append(record)
                Path(progress).write_text(json.dumps([r["outcome"] for r in records]))

    workers = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=max(0.0, stop_at - time.monotonic()) + timeout_s + HANG_MARGIN_S)
    with lock:
        hung = sum(1 for worker in workers if worker.is_alive())
        return {"sent": sent, "records": list(records), "hung": hung}


def drive_timeline(tenant: str, timeout_s: float, stop_file: str, progress: str, limit_s: float) -> dict[str, Any]:
    """One client retrieving back to back until ``stop_file`` exists: what a caller sees through an outage."""
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit_s
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        records.append(one_retrieval(tenant, timeout_s))
        Path(progress).write_text(json.dumps(records))
        time.sleep(0.2)
    return {"records": records}


def drive_remember(tenant: str, memory_type: str, contents: list[str]) -> dict[str, Any]:
    from memq.client import api
    from memq.errors import MemqError

    try:
        return {"ok": api.remember(tenant, memory_type, [{"content": c} for c in contents], timeout_s=180)}
    except MemqError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("load", "timeline", "remember", "retrieve"))
    parser.add_argument("--tenants", default="[]")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=20)
    parser.add_argument("--progress", default=os.devnull)
    parser.add_argument("--stop-file", default="")
    parser.add_argument("--type", default="semantic")
    parser.add_argument("--contents", default="[]")
    args = parser.parse_args()
    tenants = json.loads(args.tenants)
    if args.mode == "load":
        out = drive_load(tenants, args.seconds, args.threads, args.timeout_s, args.progress, args.stop_file)
    elif args.mode == "timeline":
        out = drive_timeline(tenants[0], args.timeout_s, args.stop_file, args.progress, args.seconds)
    elif args.mode == "remember":
        out = drive_remember(tenants[0], args.type, json.loads(args.contents))
    else:
        out = one_retrieval(tenants[0], args.timeout_s)
    print(json.dumps(out), flush=True)
    os._exit(0)  # never wait for a hung client thread


if __name__ == "__main__":
    main()


# -- the rig ---------------------------------------------------------------------------------------------------


@dataclass
class Driver:
    """A client subprocess; ``progress`` is a file it rewrites as calls finish."""

    process: subprocess.Popen[str]
    progress: Path

    def seen(self) -> list[Any]:
        try:
            return list(json.loads(self.progress.read_text() or "[]"))
        except (OSError, ValueError):
            return []

    def result(self, timeout_s: float) -> dict[str, Any]:
        try:
            out, err = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            raise AssertionError(f"the client process hung past {timeout_s:g} s:\n{err[-3000:]}") from None
        assert self.process.returncode == 0, err[-3000:]
        return dict(json.loads(out.strip().splitlines()[-1]))


@dataclass
class Rig:
    redis: services.Service
    mongo: services.Service
    env: dict[str, str]
    fleet: services.Fleet
    app: Any
    hosts: dict[str, list[str]] = field(default_factory=dict)
    tmp: Path = Path()

    def client(self, mode: str, *args: str, progress: Path | None = None) -> Driver:
        progress = progress or self.tmp / f"progress-{uuid.uuid4().hex[:8]}.json"
        command = [sys.executable, str(Path(__file__)), mode, "--progress", str(progress), *args]
        process = subprocess.Popen(
            command, env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return Driver(process, progress)

    def remember(self, tenant: str, memory_type: str, contents: list[str]) -> dict[str, Any]:
        args = ["--tenants", json.dumps([tenant]), "--type", memory_type, "--contents", json.dumps(contents)]
        return self.client("remember", *args).result(240)

    def retrieve(self, tenant: str, timeout_s: float = 20) -> dict[str, Any]:
        args = ["--tenants", json.dumps([tenant]), "--timeout-s", str(timeout_s)]
        return self.client("retrieve", *args).result(timeout_s + 60)

    def seed(self, tenant: str) -> None:
        for memory_type, contents in (("semantic", SEMANTIC), ("episodic", EPISODIC)):
            assert "ok" in self.remember(tenant, memory_type, contents)

    def seed_tenants(self, prefix: str, count: int = 4) -> list[str]:
        """``count`` fresh tenants named ``<prefix>-<i>-<random>``, each seeded."""
        tenants = [f"{prefix}-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
        for tenant in tenants:
            self.seed(tenant)
        return tenants

    def all_hosts(self) -> list[str]:
        return [host for hosts in self.hosts.values() for host in hosts]

    def answering(self) -> set[str]:
        from kombu.exceptions import OperationalError
        from redis.exceptions import RedisError

        try:
            replies = self.app.control.ping(destination=self.all_hosts(), timeout=2.0) or []
        except (OperationalError, RedisError, OSError):  # this process's connection from before a restart
            return set()
        return {host for reply in replies for host in reply}

    def dead(self) -> list[str]:
        return [host for host, process in self.fleet.workers.items() if process.poll() is not None]

    def revive(self) -> None:
        """Restart any worker that exited, so that later tests find the whole fleet."""
        dead = self.dead()
        for host in dead:
            self.fleet.start(next(k for k, hosts in self.hosts.items() if host in hosts), name=host.split("@")[0])
        if dead:
            self.fleet.wait_ready(self.app, dead, timeout_s=240)

    def mongo_count(self, tenant: str, collection: str = "long_term_memory") -> int:
        import pymongo

        client = pymongo.MongoClient(self.mongo.url, serverSelectionTimeoutMS=10000)
        try:
            return int(faultkit.count_stored(client[self.env["MEMQ_MONGODB_DB"]][collection], {"memory_id": tenant}))
        finally:
            client.close()


@contextlib.contextmanager
def running_rig(
    redis_service: services.Service,
    mongo: services.Service,
    env: dict[str, str],
    app: Any,
    workers: dict[str, int],
    tmp: Path,
    name: str = "faults",
) -> Iterator[Rig]:
    """A rig of ``workers`` (count per kind) on ``env``'s broker, stopped with its Redis and MongoDB at the end."""
    fleet = services.Fleet(env)
    rig = Rig(redis_service, mongo, env, fleet, app, tmp=tmp)
    try:
        for kind, count in workers.items():
            rig.hosts[kind] = [fleet.start(kind, name=f"{name}-{kind}{i}") for i in range(count)]
        fleet.wait_ready(app, rig.all_hosts(), timeout_s=300)
        yield rig
    finally:
        # Celery's AsyncResults sit in reference cycles: finalise them while the rig's Redis still answers (their
        # __del__ unsubscribes), not at some later collection when it is gone.
        gc.collect()
        fleet.stop_all()
        if os.environ.get("MEMQ_TEST_SHOW_WORKER_LOGS"):
            for host in rig.all_hosts():
                sys.stderr.write(f"\n--- {host}\n{fleet.log_tail(host, 200)}\n")
        app.close()
        rig.mongo.stop()
        rig.redis.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    redis_service = services.start_redis_server()
    mongo = services.start_nx27017()
    env = services.memq_env(
        os.environ,
        redis_service.url,
        services.mongodb_timeouts(mongo.url, 1000),
        MEMQ_MONGODB_DB="memq_faults",
        MEMQ_REDIS_URL="",
        MEMQ_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
        MEMQ_METRICS_PORT="0",
        MEMQ_MAX_DELIVERIES=str(MAX_DELIVERIES),
    )
    app = faultkit.private_app(redis_service.url)
    workers = {"embed": 2, "search": 2, "ingest": 1}
    with running_rig(redis_service, mongo, env, app, workers, tmp_path_factory.mktemp("faults")) as rig:
        yield rig


@pytest.fixture(scope="module")
def seeded(rig: Rig) -> list[str]:
    return rig.seed_tenants("load")


def fresh_tenant(rig: Rig) -> str:
    """A seeded tenant no search worker has cached yet, so its searches must read MongoDB."""
    tenant = f"fresh-{uuid.uuid4().hex[:8]}"
    rig.seed(tenant)
    return tenant


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    services.wait_until(check, timeout_s, what, interval_s=0.2)


def tally(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record["outcome"] for record in records)


# -- worker death under load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["search", "embed"])
def test_killing_a_worker_under_load_leaves_every_request_completed_or_clearly_failed(
    rig: Rig, seeded: list[str], kind: str
) -> None:
    stop_file = rig.tmp / f"stop-{uuid.uuid4().hex[:8]}"
    load = rig.client(
        "load", "--tenants", json.dumps(seeded), "--seconds", "90", "--threads", "16", "--timeout-s", "20",
        "--stop-file", str(stop_file),
    )  # fmt: skip
    wait_for(lambda: len(load.seen()) >= 32, 120, "the load to reach a steady state")
    victim = rig.hosts[kind][0]

    faultkit.kill_worker(rig.fleet, victim)  # kill -9, mid-load
    killed_at, done_at_kill = time.monotonic(), len(load.seen())
    wait_for(lambda: len(load.seen()) >= done_at_kill + 32, 120, "the surviving worker to keep serving")
    # Restart once the victim's unacknowledged messages are past the visibility timeout: the restarted
    # worker's first poll hands them back to the queue (late acks + redelivery).
    wait_for(lambda: time.monotonic() - killed_at > VISIBILITY_TIMEOUT_S + 1, 60, "the visibility timeout")
    rig.fleet.start(kind, name=victim.split("@")[0])
    rig.fleet.wait_ready(rig.app, [victim], timeout_s=240)
    done_at_restart = len(load.seen())
    wait_for(lambda: len(load.seen()) >= done_at_restart + 16, 120, "requests to finish after the restart")
    stop_file.touch()  # the load ends once the calls under way finish
    summary = load.result(90 + 20 + HANG_MARGIN_S + 120)

    outcomes = tally(summary["records"])
    print(f"kill -9 {kind}: sent {summary['sent']}, {dict(outcomes)}, {done_at_kill} finished before the kill")
    assert summary["hung"] == 0, outcomes
    assert outcomes["silent"] == 0 and outcomes["crash"] == 0, [
        r for r in summary["records"] if r["outcome"] in {"silent", "crash"}
    ]
    assert summary["sent"] == len(summary["records"]) == sum(outcomes[o] for o in CLEAR), outcomes
    assert all(r["elapsed_s"] <= 20 + HANG_MARGIN_S for r in summary["records"])
    assert outcomes["complete"] > done_at_kill  # requests kept completing after the kill
    # ... and the fleet serves normally after, the restarted worker included.
    after = rig.client(
        "load", "--tenants", json.dumps(seeded), "--seconds", "3", "--threads", "16", "--timeout-s", "30"
    )
    assert tally(after.result(120)["records"]).keys() == {"complete"}
    assert rig.answering() == set(rig.all_hosts())


# -- Redis restart --------------------------------------------------------------------------------------------------


def test_clients_get_clear_errors_while_redis_is_down_and_the_same_client_recovers_after(
    rig: Rig, seeded: list[str]
) -> None:
    stop_file = rig.tmp / f"stop-{uuid.uuid4().hex[:6]}"
    timeline = rig.client(
        "timeline", "--tenants", json.dumps(seeded[:1]), "--timeout-s", "5", "--seconds", "300",
        "--stop-file", str(stop_file),
    )  # fmt: skip

    def outcomes_since(index: int) -> list[str]:
        return [r["outcome"] for r in timeline.seen()[index:]]

    try:
        wait_for(lambda: outcomes_since(0).count("complete") >= 3, 120, "retrievals before the restart")
        faultkit.stop_process(rig.redis)
        down_from = len(timeline.seen())
        wait_for(lambda: len([o for o in outcomes_since(down_from) if o != "complete"]) >= 3, 120, "errors")
        rig.redis = services.start_redis_server(faultkit.port_of(rig.redis.url))
        up_from = len(timeline.seen())
        wait_for(lambda: outcomes_since(up_from).count("complete") >= 3, 180, "retrievals after the restart")
    finally:
        stop_file.touch()
        rig.revive()  # a worker busy at the moment Redis went away may have exited (see the next tests)
    records = timeline.result(60)["records"]
    (rig.tmp / "redis-restart-timeline.json").write_text(json.dumps(records, indent=1))

    during = [r for r in records[down_from:up_from] if r["outcome"] != "complete"]
    assert during and all(r["outcome"] in {"unavailable", "timeout"} for r in during), during
    assert all(r["elapsed_s"] <= 5 + HANG_MARGIN_S for r in records), records
    assert {r["outcome"] for r in records} <= set(CLEAR), records
    assert records[-1]["outcome"] == "complete"


def test_idle_workers_reconnect_to_a_restarted_redis_without_being_restarted(rig: Rig, seeded: list[str]) -> None:
    wait_for(lambda: rig.answering() == set(rig.all_hosts()), 60, "every worker to answer a ping")
    pids = {host: process.pid for host, process in rig.fleet.workers.items()}

    rig.redis = faultkit.restart_redis_server(rig.redis, down_s=3.0)

    wait_for(lambda: rig.answering() == set(rig.all_hosts()), 120, "every worker to answer a ping again")
    assert rig.dead() == []
    assert {host: process.pid for host, process in rig.fleet.workers.items()} == pids
    assert rig.retrieve(seeded[0])["outcome"] == "complete"


def test_a_worker_busy_with_a_task_when_redis_goes_down_reconnects_without_a_restart(rig: Rig) -> None:
    from memq.core import names

    texts = [f"text {i} " + " ".join(uuid.uuid4().hex for _ in range(20)) for i in range(300)]
    logs = {host: Path(rig.fleet.logdir) / f"{host.split('@')[0]}.log" for host in rig.hosts["embed"]}
    lost_before = {
        host: log.read_text(errors="replace").count("Connection to broker lost") for host, log in logs.items()
    }
    pending = rig.app.send_task(names.EMBED_TEXTS, args=(texts,), queue=names.EMBED_QUEUE)

    def busy() -> list[str]:
        return [host for host, log in logs.items() if str(pending.id) in log.read_text(errors="replace")]

    victim = rig.hosts["embed"][0]
    try:
        wait_for(lambda: bool(busy()), 120, "the task to start")
        victim = busy()[0]
        faultkit.stop_process(rig.redis)
        wait_for(
            lambda: (
                logs[victim].read_text(errors="replace").count("Connection to broker lost") > lost_before[victim]
                or rig.fleet.workers[victim].poll() is not None
            ),
            60,
            "the worker to notice",
        )
        rig.redis = services.start_redis_server(faultkit.port_of(rig.redis.url))
        wait_for(lambda: rig.answering() == set(rig.all_hosts()) or bool(rig.dead()), 120, "the fleet to reconnect")
        dead = rig.dead()
    finally:
        if rig.redis.process is None or rig.redis.process.poll() is not None:
            rig.redis = services.start_redis_server(faultkit.port_of(rig.redis.url))
        rig.revive()

    assert dead == [], rig.fleet.log_tail(victim, 60)


# -- MongoDB paused or stopped ------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout_s", [15.0, 5.0])
def test_a_paused_mongodb_is_reported_under_errors_within_the_callers_timeout(rig: Rig, timeout_s: float) -> None:
    tenant = fresh_tenant(rig)
    assert rig.mongo.process is not None
    faultkit.pause(rig.mongo.process)
    try:
        during = rig.retrieve(tenant, timeout_s=timeout_s)
    finally:
        faultkit.resume(rig.mongo.process)

    assert during["outcome"] == "reported", during
    errors = during["errors"]
    assert set(errors) == set(EXPECTED)
    assert all("unavailable after" in message for message in errors.values()), errors
    assert max(int(m.split("after ")[1].split(" ")[0]) for m in errors.values()) >= 2  # it retried
    assert during["elapsed_s"] <= timeout_s
    assert rig.retrieve(tenant)["outcome"] == "complete"


def test_a_stopped_mongodb_is_reported_and_searches_recover_once_it_is_back(rig: Rig) -> None:
    tenant = fresh_tenant(rig)
    faultkit.stop_process(rig.mongo)
    try:
        during = rig.retrieve(tenant, timeout_s=12)
    finally:
        rig.mongo = services.start_nx27017(faultkit.port_of(rig.mongo.url), str(rig.mongo.workdir))

    assert during["outcome"] == "reported", during
    assert set(during["errors"]) == set(EXPECTED)
    assert during["elapsed_s"] <= 12
    assert rig.retrieve(tenant)["outcome"] == "complete"


def test_ingestion_while_mongodb_is_down_retries_and_stores_each_memory_once(rig: Rig) -> None:
    tenant = f"ingest-{uuid.uuid4().hex[:8]}"
    contents = [f"memory {i}: {uuid.uuid4().hex}" for i in range(20)]
    ingest_log = Path(rig.fleet.logdir) / "faults-ingest0.log"
    retries_before = ingest_log.read_text(errors="replace").count("Retry in")
    faultkit.stop_process(rig.mongo)
    try:
        pending = rig.client("remember", "--tenants", json.dumps([tenant]), "--contents", json.dumps(contents))
        wait_for(lambda: ingest_log.read_text(errors="replace").count("Retry in") > retries_before, 120, "a retry")
    finally:
        rig.mongo = services.start_nx27017(faultkit.port_of(rig.mongo.url), str(rig.mongo.workdir))
    stored = pending.result(240)

    assert "ok" in stored, stored
    assert stored["ok"]["inserted"] == len(contents)
    assert rig.mongo_count(tenant) == len(contents)
    again = rig.remember(tenant, "semantic", contents)
    assert again["ok"]["inserted"] == 0 and again["ok"]["updated"] == len(contents)
    assert rig.mongo_count(tenant) == len(contents)


# -- redelivered ingestion --------------------------------------------------------------------------------------


def test_a_redelivered_store_message_writes_no_duplicate_memories(rig: Rig) -> None:
    from memq.core import names

    tenant = f"redeliver-{uuid.uuid4().hex[:8]}"
    items = [{"content": f"fact {i} {uuid.uuid4().hex}"} for i in range(10)] + [{"id": "own-id", "content": "x y z"}]
    embedded = rig.app.send_task(names.EMBED_TEXTS, args=([i["content"] for i in items],), queue=names.EMBED_QUEUE).get(
        timeout=120
    )
    task_id = str(uuid.uuid4())

    # The same message twice, as after a worker died between its write and its ack.
    def deliver() -> dict[str, Any]:
        sent = rig.app.send_task(
            names.STORE, args=(embedded, tenant, "semantic", items), task_id=task_id, queue=names.INGEST_QUEUE
        )
        result = dict(sent.get(timeout=120))
        sent.forget()
        return result

    first = deliver()
    second = deliver()

    assert first["inserted"] == len(items) and second["inserted"] == 0 and second["updated"] == len(items)
    assert first["ids"] == second["ids"]
    assert rig.mongo_count(tenant) == len(items)


class StartedTasks:
    """The rig's ``task-started`` events as they happen (Celery sends one when a worker starts running a task),
    so a test can act the moment a task is running instead of polling ``inspect().active()``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self._changed = threading.Condition()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        self._until_subscribed()

    def _listen(self) -> None:
        with self.app.connection() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"task-started": self._on_started})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _until_subscribed(self) -> None:
        """Pub/sub delivers only to subscribers: probe events go out until one comes back."""
        probe = f"probe-{uuid.uuid4().hex}"
        deadline = time.monotonic() + 30
        with self.app.events.default_dispatcher() as dispatcher:
            while self.counts[probe] == 0:
                assert time.monotonic() < deadline, "the event receiver did not subscribe"
                dispatcher.send("task-started", uuid=probe)
                time.sleep(0.2)

    def _on_started(self, event: dict[str, Any]) -> None:
        with self._changed:
            self.counts[event["uuid"]] += 1
            self._changed.notify_all()

    def wait(self, task_id: str, times: int, timeout_s: float) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.counts[task_id] >= times, timeout_s), (
                f"task {task_id} started {self.counts[task_id]} times, not {times}, within {timeout_s:g} s"
            )

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)


@dataclass
class KillableIngest:
    """The rig's ingest worker replaced by one with one thread (so that messages behind a running one are only
    prefetched) and a long MongoDB timeout (so that a store blocks while MongoDB is paused instead of retrying)."""

    rig: Rig
    host: str = ""

    def start(self) -> str:
        uri = services.mongodb_timeouts(self.rig.env["MEMQ_MONGODB_URI"], 60_000)
        fleet = services.Fleet({**self.rig.env, "MEMQ_MONGODB_URI": uri}, logdir=self.rig.fleet.logdir)
        self.host = fleet.start("ingest", name=self.rig.hosts["ingest"][0].split("@")[0], extra_args=["-c", "1"])
        self.rig.fleet.workers[self.host] = fleet.workers[self.host]
        self.rig.fleet.wait_ready(self.rig.app, [self.host], timeout_s=120)
        return self.host

    def kill(self) -> None:
        faultkit.kill_worker(self.rig.fleet, self.host)

    def restore_rig(self) -> None:
        faultkit.kill_worker(self.rig.fleet, self.host, sig=15)
        self.rig.fleet.start("ingest", name=self.host.split("@")[0])
        self.rig.fleet.wait_ready(self.rig.app, [self.host], timeout_s=120)


@pytest.fixture
def killable(rig: Rig) -> Iterator[tuple[KillableIngest, StartedTasks]]:
    faultkit.kill_worker(rig.fleet, rig.hosts["ingest"][0], sig=15)
    ingest, started = KillableIngest(rig), StartedTasks(rig.app)
    ingest.start()
    try:
        yield ingest, started
    finally:
        started.close()
        assert rig.mongo.process is not None
        faultkit.resume(rig.mongo.process)
        ingest.restore_rig()


def embedded_batch(rig: Rig, count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from memq.core import names

    items = [{"content": f"batch memory {i} {uuid.uuid4().hex}"} for i in range(count)]
    contents = [item["content"] for item in items]
    embedded = rig.app.send_task(names.EMBED_TEXTS, args=(contents,), queue=names.EMBED_QUEUE).get(timeout=300)
    return embedded, items


def send_store(rig: Rig, embedded: dict[str, Any], tenant: str, items: list[dict[str, Any]]) -> Any:
    from memq.core import names

    return rig.app.send_task(names.STORE, args=(embedded, tenant, "semantic", items), queue=names.INGEST_QUEUE)


def kill_while_running(
    rig: Rig, ingest: KillableIngest, started: StartedTasks, task_id: str, times: int, holding: int = 1
) -> None:
    """Waits for the ``times``-th start of the task (MongoDB is paused: it cannot finish) and until the worker holds
    ``holding`` messages unacknowledged (the task and those prefetched behind it: a message still in a BRPOP reply
    would die with the process, see docs/guarantees.md), kills the worker, and starts a new one once kombu has
    made the messages visible again."""
    import redis

    started.wait(task_id, times, timeout_s=VISIBILITY_TIMEOUT_S * 6 + 120)
    broker = redis.Redis.from_url(rig.redis.url)
    wait_for(lambda: unacked_on(broker, "ingest") >= holding, 60, f"{holding} messages held by the ingest worker")
    killed_at = time.monotonic()
    ingest.kill()
    wait_for(lambda: time.monotonic() - killed_at > VISIBILITY_TIMEOUT_S, 60, "the visibility timeout")
    ingest.start()


def unacked_on(broker: Any, queue: str) -> int:
    """Messages of ``queue`` a worker holds unacknowledged (kombu's Redis transport keeps them in a hash)."""
    return sum(1 for raw in broker.hvals("unacked") if json.loads(raw)[2] == queue)


def test_an_ingest_worker_killed_mid_store_is_redelivered_and_writes_each_memory_once(
    rig: Rig, killable: tuple[KillableIngest, StartedTasks]
) -> None:
    ingest, started = killable
    tenant = f"killed-{uuid.uuid4().hex[:8]}"
    embedded, items = embedded_batch(rig, 300)
    assert rig.mongo.process is not None
    faultkit.pause(rig.mongo.process)  # the store blocks on its first write until MongoDB answers again
    result = send_store(rig, embedded, tenant, items)

    kill_while_running(rig, ingest, started, result.id, times=1)
    faultkit.resume(rig.mongo.process)
    stored = result.get(timeout=180)

    assert started.counts[result.id] == 2  # killed once, finished on its redelivery
    assert rig.mongo_count(tenant) == len(items)
    assert stored["inserted"] + stored["updated"] == len(items)
    assert len(set(stored["ids"])) == len(items)


def test_a_store_that_kills_its_worker_every_time_is_dead_lettered_alone_and_its_replay_lands_once(
    rig: Rig, killable: tuple[KillableIngest, StartedTasks]
) -> None:
    import redis

    from memq.core import keys

    ingest, started = killable
    broker = redis.Redis.from_url(rig.redis.url)
    broker.delete(keys.DEAD_LETTERS)
    limit = MAX_DELIVERIES
    embedded, items = embedded_batch(rig, 20)
    # One thread, prefetch 4: the killer runs and the 3 innocents behind it are prefetched (received, never
    # started). Each kill waits until all 4 are held: a message still in a BRPOP reply dies with the process
    # (docs/guarantees.md), a transport limit, not the guard's.
    killer_tenant, innocent_tenants = f"killer-{uuid.uuid4().hex[:6]}", [f"innocent-{i}" for i in range(3)]
    assert rig.mongo.process is not None
    faultkit.pause(rig.mongo.process)
    killer = send_store(rig, embedded, killer_tenant, items)
    innocents = [send_store(rig, embedded, f"{tenant}-{uuid.uuid4().hex[:6]}", items) for tenant in innocent_tenants]

    for attempt in range(1, limit + 1):  # delivery 1..limit each started and killed its worker
        kill_while_running(rig, ingest, started, killer.id, times=attempt, holding=1 + len(innocents))
    wait_for(lambda: broker.llen(keys.DEAD_LETTERS) >= 1, VISIBILITY_TIMEOUT_S * 3 + 60, "the dead letter")
    faultkit.resume(rig.mongo.process)
    stored_innocents = [result.get(timeout=240) for result in innocents]

    letters = [json.loads(raw) for raw in broker.lrange(keys.DEAD_LETTERS, 0, -1)]
    assert [(letter["reason"], letter["replayable"]) for letter in letters] == [("too_many_deliveries", True)]
    assert f"started {limit} times" in letters[0]["detail"]
    assert all(stored["inserted"] == len(items) for stored in stored_innocents)  # none was dead-lettered
    assert started.counts[killer.id] == limit and rig.mongo_count(killer_tenant) == 0
    with pytest.raises(DeadLettered, match="dead-lettered"):  # its caller learns at once, not at its timeout
        killer.get(timeout=60)

    replayed = subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", "dead-letters", "--replay", letters[0]["id"], "--json"],
        env=rig.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    wait_for(lambda: replayed_meta(rig, killer.id)["status"] == "SUCCESS", 120, "the replayed store to run")
    stored = replayed_meta(rig, killer.id)["result"]

    assert json.loads(replayed.stdout)["replayed"][0]["outcome"] == "replayed"
    assert stored["inserted"] == len(items) and rig.mongo_count(killer_tenant) == len(items)
    assert broker.llen(keys.DEAD_LETTERS) == 0


def replayed_meta(rig: Rig, task_id: str) -> dict[str, Any]:
    """The task's stored result as it is now (not Celery's cached one: the replay overwrites the failure)."""
    return dict(rig.app.backend.get_task_meta(task_id, cache=False))
