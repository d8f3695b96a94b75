"""Operating memq: ``memq status``, Flower, per-worker Prometheus metrics, the FastAPI example, warm shutdown.

Everything is real: worker subprocesses (``memq worker KIND``) with their own metrics ports, the real
Flower (``memq flower``), the example app under uvicorn, Redis, nx-27017 and the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from faultkit import memq_cli
from prometheus_client.parser import text_string_to_metric_families

from memq.client import api
from memq.core import names
from memq.ops import services

ROOT = Path(__file__).resolve().parent.parent
FLOWER_AUTH = ("ops", "s3cret-for-tests")
FACTS = [
    "loves spicy Thai green curry",
    "is vegetarian since 2019",
    "bakes sourdough bread on Sundays",
    "works as a nurse in the ICU",
]
RETRIEVAL_TASKS = {names.EMBED_QUERY, names.SEARCH, names.MERGE}
ATTEMPTS = 40


@dataclass
class MeteredFleet:
    """The session fleet's workers (``tests/conftest.py``), one of each kind, each with its own /metrics port."""

    hostnames: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def metrics_text(self, kind: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[kind]}/metrics", timeout=5).text

    def metrics(self, kind: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_samples(self.metrics_text(kind))


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= set(found))


@pytest.fixture(scope="module")
def metered(fleet: Any) -> MeteredFleet:
    return MeteredFleet(dict(fleet.hostnames), dict(fleet.metrics_ports))


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-4000:]


def serve(command: list[str], port: int, ready_path: str, env: dict[str, str], log_path: str) -> Served:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", process, log_path)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{served.log()}")
        try:
            return httpx.get(served.base_url + ready_path, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    services.wait_until(answers, 60, " ".join(command[:4]), interval_s=0.2)
    return served


def stop(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    try:
        served.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait(timeout=5)


@pytest.fixture(scope="module")
def flower(metered: MeteredFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = services.free_port()
    env = {**os.environ, "MEMQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    log_path = str(tmp_path_factory.mktemp("flower") / "flower.log")
    command = [sys.executable, "-m", "memq.ops.cli", "flower", "--port", str(port), "--address", "127.0.0.1"]
    served = serve(command, port, "/healthcheck", env, log_path)

    def receives_events() -> bool:
        # /healthcheck answers before Flower's event receiver is bound: wait for the workers' heartbeats.
        metrics = parse_samples(httpx.get(served.base_url + "/metrics", timeout=5).text)
        return all(total(metrics, "flower_worker_online", worker=name) == 1 for name in metered.hostnames.values())

    try:
        services.wait_until(receives_events, 30, "Flower receiving the workers' events", interval_s=0.5)
        yield served
    finally:
        stop(served)


@pytest.fixture(scope="module")
def web_app(metered: MeteredFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = services.free_port()
    log_path = str(tmp_path_factory.mktemp("web") / "uvicorn.log")
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(ROOT / "examples"),
        "fastapi_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    served = serve(command, port, "/healthz", dict(os.environ), log_path)
    try:
        yield served
    finally:
        stop(served)


# -- memq status ---------------------------------------------------------------------------------------


def test_status_lists_each_queues_workers_and_the_embed_workers_model_and_device(metered: MeteredFleet) -> None:
    result = memq_cli("status", "--json", "--timeout-s", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["ok"] is True
    assert status["redis"]["reachable"] is True and status["mongodb"]["reachable"] is True
    for kind in services.WORKER_KINDS:
        assert metered.hostnames[kind] in status["queues"][kind]["workers"]
        assert isinstance(status["queues"][kind]["depth"], int) and status["queues"][kind]["depth"] >= 0
    embed = status["workers"][metered.hostnames["embed"]]
    assert embed["kind"] == "embed" and embed["queues"] == ["embed"]
    assert embed["model"] == {"name": "all-MiniLM-L6-v2", "device": "cpu", "dimensions": 384, "loaded": True}
    assert embed["pool"] == {"implementation": "thread", "concurrency": 4}
    search = status["workers"][metered.hostnames["search"]]
    assert search["kind"] == "search" and "model" not in search
    assert search["metrics_port"] == metered.metrics_ports["search"]


def test_status_prints_a_table_of_queues_and_workers(metered: MeteredFleet) -> None:
    result = memq_cli("status", "--timeout-s", "2")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "memq status: ok"
    queue_rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["embed"], ["search"], ["ingest"])}
    assert set(queue_rows) == set(services.WORKER_KINDS)
    embed_row = next(line for line in lines if line.startswith(metered.hostnames["embed"]))
    assert "all-MiniLM-L6-v2" in embed_row and " cpu " in embed_row and embed_row.endswith("384")


def test_status_reports_an_unreachable_mongodb_and_exits_nonzero(metered: MeteredFleet) -> None:
    dead_uri = f"mongodb://127.0.0.1:{services.free_port()}"

    result = memq_cli("status", "--json", env={**os.environ, "MEMQ_MONGODB_URI": dead_uri})

    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["ok"] is False
    assert status["mongodb"]["reachable"] is False and status["mongodb"]["error"]
    assert status["redis"]["reachable"] is True


def test_status_reports_an_unreachable_redis_without_waiting_for_workers() -> None:
    dead = f"redis://127.0.0.1:{services.free_port()}/0"
    env = {**os.environ, "MEMQ_BROKER_URL": dead, "MEMQ_RESULT_BACKEND": dead}

    result = memq_cli("status", "--json", env=env)

    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["redis"]["reachable"] is False and "Connection" in status["redis"]["error"]
    assert status["workers"] == {} and all(q["depth"] is None for q in status["queues"].values())


# -- per-worker Prometheus metrics ---------------------------------------------------------------------


def test_each_worker_serves_its_stage_metrics_after_a_retrieval(metered: MeteredFleet, tenant: str) -> None:
    api.remember(tenant, "semantic", FACTS)
    api.remember(tenant, "procedural", ["To plan meals: list, shop, cook."])
    # Other suites' workers may share these queues: retrieve until this fleet's workers have run each stage.
    for attempt in range(ATTEMPTS):
        api.retrieve(f"what does she eat? #{attempt}", tenant, {"semantic": 2, "procedural": 1})
        embed, search = metered.metrics("embed"), metered.metrics("search")
        if (
            total(embed, "memq_embed_seconds_count") >= 1
            and total(search, "memq_merge_seconds_count") >= 1
            and total(search, "memq_cache_requests_total", cache="matrix", outcome="hit") >= 1
        ):
            break

    assert total(embed, "memq_embed_seconds_count", device="cpu") >= 1
    assert total(embed, "memq_embed_batch_size_count", device="cpu") >= 1
    assert total(embed, "memq_embed_batch_size_sum", device="cpu") >= total(embed, "memq_embed_seconds_count")
    assert total(search, "memq_search_seconds_count", memory_type="long_term_memory", strategy="exact") >= 1
    assert total(search, "memq_merge_seconds_count") >= 1
    assert total(search, "memq_cache_requests_total", cache="matrix", outcome="miss") >= 1
    assert total(search, "memq_cache_requests_total", cache="matrix", outcome="hit") >= 1
    assert total(search, "memq_mongo_pool_checkouts_total") >= 1
    assert total(search, "memq_mongo_pool_checkout_wait_seconds_count") >= 1
    assert "# TYPE memq_memories_written_total counter" in metered.metrics_text("ingest")
    assert total(embed, "memq_merge_seconds_count") == 0  # each worker reports only its own stages


def test_concurrent_embed_tasks_share_forward_passes_in_the_embed_workers_batcher(
    app: Any, metered: MeteredFleet
) -> None:
    """The chord's embed step goes through the worker's dynamic batcher: queries of embed tasks that arrive
    together are encoded in one forward pass (more texts than passes), while each task gets its own vector."""

    def passes_and_texts() -> tuple[float, float]:
        samples = metered.metrics("embed")
        return total(samples, "memq_embed_batch_size_count"), total(samples, "memq_embed_batch_size_sum")

    passes_before, texts_before = passes_and_texts()
    for attempt in range(5):  # other suites' embed workers share the queue: repeat until this one took a burst
        queries = [f"burst {attempt}-{i} {uuid.uuid4().hex}" for i in range(64)]
        sent = [app.send_task(names.EMBED_QUERY, args=[q], queue=names.EMBED_QUEUE) for q in queries]
        vectors = [result.get(timeout=120)["vector"] for result in sent]
        assert len(set(vectors)) == len(queries)
        passes, texts = passes_and_texts()
        if texts - texts_before > passes - passes_before:
            break

    assert texts - texts_before > passes - passes_before > 0


# -- Flower ----------------------------------------------------------------------------------------------


def flower_tasks(flower: Served) -> dict[str, dict[str, Any]]:
    response = httpx.get(flower.base_url + "/api/tasks", params={"limit": 1000}, auth=FLOWER_AUTH, timeout=5)
    response.raise_for_status()
    return dict(response.json())


def test_flower_finds_a_retrievals_chord_tasks_by_name_in_its_api_and_metrics(
    flower: Served, metered: MeteredFleet, tenant: str
) -> None:
    from memq.client.canvas import retrieval_canvas
    from memq.client.edge import retrieval_request
    from memq.core.settings import get_settings

    api.remember(tenant, "semantic", FACTS)
    steps: dict[str, str] = {}

    def seen_in_flower() -> dict[str, dict[str, Any]]:
        tasks = flower_tasks(flower)
        return {task_id: tasks[task_id] for task_id in steps if task_id in tasks}

    def every_step_succeeded() -> bool:
        # Events from several workers reach Flower in any order: wait until each step's success is in.
        seen = seen_in_flower()
        return len(seen) == len(steps) and all(task["state"] == "SUCCESS" for task in seen.values())

    # Every step of the chord is seen succeeding, by name: memq.events keeps the task events Celery's buffered
    # flush dropped (celery#10434); pub/sub itself loses nothing for a subscriber that stays connected.
    limits = {"semantic": 2, "episodic": 1}
    request = retrieval_request(get_settings(), f"what does {tenant} like to eat?", tenant, limits)
    sent = retrieval_canvas(request).apply_async()  # the canvas api.retrieve sends, so its ids are known here
    api._wait(sent, 60, what="retrieval")
    steps = {sent.parent.parent.id: names.EMBED_QUERY, sent.id: names.MERGE}
    steps.update({search.id: names.SEARCH for search in sent.parent.results})
    try:
        services.wait_until(every_step_succeeded, 20, "every step of the chord succeeded in Flower", interval_s=0.5)
    except RuntimeError:
        pytest.fail(f"steps {steps}; Flower saw {seen_in_flower()}")
    chord = seen_in_flower()
    assert {task_id: task["name"] for task_id, task in chord.items()} == steps
    assert all(task["worker"] for task in chord.values())
    assert len({task["root_id"] for task in chord.values()}) == 1
    assert tenant in chord[sent.id]["kwargs"]
    workers = httpx.get(flower.base_url + "/api/workers", params={"refresh": "1"}, auth=FLOWER_AUTH, timeout=10)
    assert set(workers.json()) >= set(metered.hostnames.values())
    metrics = parse_samples(httpx.get(flower.base_url + "/metrics", timeout=5).text)
    for name in RETRIEVAL_TASKS:
        assert total(metrics, "flower_events_total", task=name, type="task-succeeded") >= 1
        assert total(metrics, "flower_task_runtime_seconds_count", task=name) >= 1


def test_flowers_api_refuses_requests_without_the_configured_credentials(flower: Served) -> None:
    assert httpx.get(flower.base_url + "/api/tasks", timeout=5).status_code == 401
    assert httpx.get(flower.base_url + "/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401
    assert httpx.get(flower.base_url + "/api/workers", auth=FLOWER_AUTH, timeout=10).status_code == 200


def test_memq_flower_refuses_to_start_without_credentials() -> None:
    result = memq_cli("flower", "--port", str(services.free_port()), env={**os.environ, "MEMQ_FLOWER_BASIC_AUTH": ""})

    assert result.returncode == 2
    assert "MEMQ_FLOWER_BASIC_AUTH" in result.stderr


# -- the FastAPI example ---------------------------------------------------------------------------------


def test_the_fastapi_example_stores_and_retrieves_over_http(web_app: Served, tenant: str) -> None:
    stored = httpx.post(
        web_app.base_url + "/memories",
        json={"memory_id": tenant, "type": "semantic", "items": [*FACTS, {"content": "hates coriander"}]},
        timeout=120,
    )
    assert stored.status_code == 201, stored.text
    assert stored.json()["inserted"] == len(FACTS) + 1

    found = httpx.post(
        web_app.base_url + "/retrieve",
        json={"query": "which herb does she dislike?", "memory_id": tenant, "limits": {"semantic": 1}},
        timeout=60,
    )

    assert found.status_code == 200, found.text
    assert [item["content"] for item in found.json()["results"]["long_term_memory"]] == ["hates coriander"]


def test_the_fastapi_example_answers_invalid_input_with_422_naming_the_field(web_app: Served, tenant: str) -> None:
    response = httpx.post(
        web_app.base_url + "/retrieve",
        json={"query": "anything", "memory_id": tenant, "limits": {"dreams": 3}},
        timeout=30,
    )

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_input" and response.json()["field"].startswith("limits")


def test_the_fastapi_example_answers_a_retrieval_past_its_timeout_with_504(
    web_app: Served, app: Any, tenant: str
) -> None:
    replies = app.control.inspect(timeout=1).active_queues() or {}
    embedders = [host for host, queues in replies.items() if any(q["name"] == names.EMBED_QUEUE for q in queues)]
    app.control.cancel_consumer(names.EMBED_QUEUE, destination=embedders, reply=True)  # nobody embeds now
    try:
        response = httpx.post(
            web_app.base_url + "/retrieve",
            json={"query": "anything", "memory_id": tenant, "limits": {"semantic": 1}, "timeout_s": 1.0},
            timeout=30,
        )
    finally:
        app.control.add_consumer(names.EMBED_QUEUE, destination=embedders, reply=True)

    assert response.status_code == 504
    assert response.json()["error"] == "RetrievalTimeout"


def test_the_fastapi_example_answers_other_requests_while_one_is_in_flight(web_app: Served, tenant: str) -> None:
    bulk = [f"note {i}: {' '.join(uuid.uuid4().hex for _ in range(30))}" for i in range(100)]

    async def scenario() -> tuple[int, list[int], bool]:
        async with httpx.AsyncClient(base_url=web_app.base_url, timeout=180) as http:
            slow = asyncio.create_task(
                http.post("/memories", json={"memory_id": tenant, "type": "semantic", "items": bulk})
            )
            await asyncio.sleep(0.3)  # the bulk request is now waiting on the workers
            health = [(await http.get("/healthz")).status_code for _ in range(5)]
            answered_while_slow_pending = not slow.done()
            return (await slow).status_code, health, answered_while_slow_pending

    stored_status, health, answered_while_slow_pending = asyncio.run(scenario())

    assert health == [200] * 5
    assert answered_while_slow_pending
    assert stored_status == 201


def test_the_fastapi_example_serves_concurrent_retrievals(web_app: Served, tenant: str) -> None:
    api.remember(tenant, "semantic", FACTS)
    queries = [f"question {i} about food" for i in range(8)]

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=web_app.base_url, timeout=120) as http:
            body = {"memory_id": tenant, "limits": {"semantic": 2}, "timeout_s": 60}
            return await asyncio.gather(*(http.post("/retrieve", json={**body, "query": q}) for q in queries))

    found = asyncio.run(scenario())

    assert [r.status_code for r in found] == [200] * len(queries)
    assert [r.json()["query"] for r in found] == queries
    assert all(len(r.json()["results"]["long_term_memory"]) == 2 for r in found)


# -- graceful shutdown -----------------------------------------------------------------------------------


def test_a_warm_shutdown_finishes_the_task_in_flight(app: Any) -> None:
    queue = f"ops-shutdown-{uuid.uuid4().hex[:6]}"
    fleet = services.Fleet(dict(os.environ))
    hostname = fleet.start("embed", name="ops-shutdown", extra_args=["-Q", queue])
    try:
        fleet.wait_ready(app, [hostname])
        texts = [f"{i} " + " ".join(uuid.uuid4().hex for _ in range(30)) for i in range(60)]
        result = app.send_task(names.EMBED_TEXTS, args=(texts,), queue=queue)

        def in_flight() -> bool:
            active = app.control.inspect(destination=[hostname], timeout=1).active() or {}
            return any(task["id"] == result.id for task in active.get(hostname, []))

        services.wait_until(in_flight, 60, "the embedding task to start", interval_s=0.05)
        assert not result.ready()
        worker = fleet.workers[hostname]
        os.killpg(worker.pid, signal.SIGTERM)  # warm shutdown: stop taking tasks, finish those running

        assert worker.wait(timeout=180) == 0
        assert result.ready() and result.successful()
        assert len(result.get(timeout=5)["vectors"]) == len(texts)
    finally:
        fleet.stop_all()
