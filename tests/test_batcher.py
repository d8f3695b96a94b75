"""The embed worker's dynamic batcher, its Embedder integration, device choice and the per-GPU launcher.

Plain Python against the real CPU model (the session ``embedder``); no Celery worker. A ``Gate`` holds
the first forward pass so that requests provably queue up behind it: batching is then deterministic.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from memq.workers.embedding.batcher import BatcherClosed, DynamicBatcher
from memq.workers.embedding.embedder import Embedder, choose_device, resolve_model_path
from memq.workers.embedding.gpu_launcher import Supervisor, parse_gpus, split_gpus_arg, worker_command

WAIT_S = 60.0
QUERIES = [
    "what does Alice like to eat",
    "tea",
    "where did Bob travel last summer and who did he meet there",
    "Chen's favourite hobby",
    "remind me about the budget sheet",
    "a much longer question about the packing list for the sailing trip to Lisbon in late September",
    "pho",
    "Dana works as an ICU nurse",
]


class Gate:
    """Wraps the real encode; the first call blocks until ``open``; records the texts of every call."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray]) -> None:
        self._encode = encode
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self._open.wait(WAIT_S), "gate never opened"
        if any(text == "poison" for text in texts):
            raise ValueError("poison in this batch")
        return self._encode(texts)

    def open(self) -> None:
        self._open.set()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


@pytest.fixture
def gate(embedder: Embedder) -> Gate:
    return Gate(embedder.encode)


@pytest.fixture
def gated(gate: Gate, embedder: Embedder) -> Iterator[DynamicBatcher]:
    batcher = DynamicBatcher(gate, embedder.dimensions, max_batch_texts=1000, device="test-gated")
    yield batcher
    gate.open()
    batcher.close(WAIT_S)


def hold_first_batch(batcher: DynamicBatcher, gate: Gate) -> Future[np.ndarray]:
    first = batcher.submit(["the first query holds the model"])
    assert gate.entered.wait(WAIT_S)
    return first


def test_every_caller_gets_its_own_rows_in_order_equal_to_a_direct_encode(embedder: Embedder) -> None:
    requests = [QUERIES[i % len(QUERIES) :] + QUERIES[: i % 3] for i in range(24)]
    batcher = DynamicBatcher(embedder.encode, embedder.dimensions, max_batch_texts=64, device="test-order")
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda texts: batcher.encode(texts, WAIT_S), requests))
    finally:
        batcher.close(WAIT_S)
    for texts, rows in zip(requests, results, strict=True):
        assert rows.shape == (len(texts), embedder.dimensions) and rows.dtype == np.float32
        np.testing.assert_allclose(rows, embedder.encode(texts), atol=1e-5)


def test_queued_callers_are_coalesced_into_one_forward_pass_each_keeping_its_rows(
    gated: DynamicBatcher, gate: Gate, embedder: Embedder
) -> None:
    first = hold_first_batch(gated, gate)
    futures = [gated.submit([query]) for query in QUERIES]
    gate.open()
    rows = np.stack([future.result(WAIT_S)[0] for future in futures])
    first.result(WAIT_S)
    assert gate.calls[1] == QUERIES  # everything that queued behind the first pass ran as one batch, in order
    assert len(gate.calls) == 2
    np.testing.assert_allclose(rows, embedder.encode(QUERIES), atol=1e-5)


def test_a_lone_query_is_encoded_alone_without_waiting_for_company(embedder: Embedder) -> None:
    batcher = DynamicBatcher(embedder.encode, embedder.dimensions, max_batch_texts=10_000, device="test-lone")
    try:
        row = batcher.encode(["just one question"], timeout_s=WAIT_S)
    finally:
        batcher.close(WAIT_S)
    assert batcher.stats.batches == 1 and batcher.stats.largest_batch_texts == 1
    np.testing.assert_allclose(row, embedder.encode(["just one question"]), atol=1e-5)


def test_sixty_four_concurrent_callers_all_get_answers_without_deadlock(embedder: Embedder) -> None:
    batcher = DynamicBatcher(embedder.encode, embedder.dimensions, max_batch_texts=16, device="test-64")
    start = threading.Barrier(64)

    def caller(i: int) -> np.ndarray:
        start.wait(WAIT_S)
        return np.stack([batcher.encode([f"caller {i} asks question {j}"], WAIT_S)[0] for j in range(3)])

    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(caller, range(64)))
    finally:
        batcher.close(WAIT_S)
    assert batcher.stats.texts == 64 * 3 and batcher.stats.largest_batch_texts <= 16
    for i in (0, 31, 63):
        np.testing.assert_allclose(
            results[i], embedder.encode([f"caller {i} asks question {j}" for j in range(3)]), atol=1e-5
        )


def test_batches_respect_the_text_budget_and_an_oversized_request_runs_alone(embedder: Embedder) -> None:
    gate = Gate(embedder.encode)
    batcher = DynamicBatcher(gate, embedder.dimensions, max_batch_texts=3, device="test-budget")
    try:
        first = hold_first_batch(batcher, gate)
        small = [batcher.submit([q]) for q in QUERIES[:4]]
        oversized = batcher.submit(QUERIES)
        gate.open()
        assert [f.result(WAIT_S).shape[0] for f in [first, *small, oversized]] == [1, 1, 1, 1, 1, 8]
    finally:
        batcher.close(WAIT_S)
    assert [len(call) for call in gate.calls] == [1, 3, 1, 8]


def test_batches_respect_the_character_budget(embedder: Embedder) -> None:
    gate = Gate(embedder.encode)
    batcher = DynamicBatcher(gate, embedder.dimensions, max_batch_texts=100, max_batch_chars=25, device="test-chars")
    try:
        hold_first_batch(batcher, gate)
        futures = [batcher.submit(["ten chars!"]) for _ in range(5)]
        gate.open()
        for future in futures:
            future.result(WAIT_S)
    finally:
        batcher.close(WAIT_S)
    assert [len(call) for call in gate.calls[1:]] == [2, 2, 1]


def test_an_error_in_one_batch_reaches_only_that_batchs_callers(embedder: Embedder) -> None:
    gate = Gate(embedder.encode)
    batcher = DynamicBatcher(gate, embedder.dimensions, max_batch_texts=2, device="test-error")
    try:
        first = hold_first_batch(batcher, gate)
        poisoned = [batcher.submit(["poison"]), batcher.submit(["tea"])]  # drained together: one batch of 2
        healthy = [batcher.submit(["coffee"]), batcher.submit(["pho"])]  # the next batch
        gate.open()
        for future in poisoned:
            with pytest.raises(ValueError, match="poison"):
                future.result(WAIT_S)
        rows = np.stack([future.result(WAIT_S)[0] for future in healthy])
        first.result(WAIT_S)
        after = batcher.encode(["the batcher keeps serving"], WAIT_S)
    finally:
        batcher.close(WAIT_S)
    np.testing.assert_allclose(rows, embedder.encode(["coffee", "pho"]), atol=1e-5)
    assert after.shape == (1, embedder.dimensions)
    assert batcher.stats.failed_batches == 1


def test_close_finishes_every_queued_request_then_refuses_new_work(embedder: Embedder) -> None:
    gate = Gate(embedder.encode)
    batcher = DynamicBatcher(gate, embedder.dimensions, max_batch_texts=2, device="test-close")
    first = hold_first_batch(batcher, gate)
    queued = [batcher.submit([query]) for query in QUERIES]
    closer = threading.Thread(target=batcher.close, args=(WAIT_S,))
    closer.start()
    wait_until(batcher.is_closed)
    with pytest.raises(BatcherClosed):
        batcher.submit(["too late"])
    gate.open()
    closer.join(WAIT_S)
    assert not closer.is_alive() and not batcher.is_running()
    assert all(future.done() for future in [first, *queued])
    np.testing.assert_allclose(np.stack([future.result()[0] for future in queued]), embedder.encode(QUERIES), atol=1e-5)


def test_a_caller_that_times_out_is_withdrawn_before_its_forward_pass(gated: DynamicBatcher, gate: Gate) -> None:
    hold_first_batch(gated, gate)
    with pytest.raises(TimeoutError):
        gated.encode(["nobody waits for me"], timeout_s=0.01)
    kept = gated.submit(["somebody waits for me"])
    gate.open()
    kept.result(WAIT_S)
    assert ["nobody waits for me"] not in gate.calls and ["somebody waits for me"] in gate.calls


def test_an_empty_request_returns_an_empty_matrix_without_a_forward_pass(gated: DynamicBatcher, gate: Gate) -> None:
    rows = gated.encode([], timeout_s=WAIT_S)
    assert rows.shape == (0, gated.dimensions) and gate.calls == []


def test_each_forward_pass_is_counted_in_the_batch_size_and_seconds_metrics(embedder: Embedder) -> None:
    labels = {"device": "test-metrics"}
    batcher = DynamicBatcher(embedder.encode, embedder.dimensions, device="test-metrics")
    try:
        batcher.encode(QUERIES[:3], WAIT_S)
        batcher.encode(QUERIES[:2], WAIT_S)
    finally:
        batcher.close(WAIT_S)
    assert REGISTRY.get_sample_value("memq_embed_batch_size_count", labels) == 2
    assert REGISTRY.get_sample_value("memq_embed_batch_size_sum", labels) == 5
    assert REGISTRY.get_sample_value("memq_embed_seconds_count", labels) == 2


def test_a_wrong_number_of_rows_from_encode_fails_the_batch_instead_of_misrouting_rows(embedder: Embedder) -> None:
    batcher = DynamicBatcher(lambda texts: embedder.encode(texts[:1]), embedder.dimensions, device="test-rows")
    try:
        with pytest.raises(RuntimeError, match="1 rows for 2 texts"):
            batcher.encode(["one", "two"], WAIT_S)
    finally:
        batcher.close(WAIT_S)


# --- the Embedder's paths -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_model() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")


def test_encode_queries_through_the_process_batcher_equals_sentence_transformers(
    embedder: Embedder, plain_model: Any
) -> None:
    with ThreadPoolExecutor(8) as pool:
        rows = np.stack(list(pool.map(lambda q: embedder.encode_queries([q], WAIT_S)[0], QUERIES)))
    expected = plain_model.encode(QUERIES, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    assert embedder.query_batcher() is embedder.query_batcher()


def test_a_large_direct_encode_is_chunked_by_length_and_keeps_input_order(embedder: Embedder, plain_model: Any) -> None:
    texts = [f"memory {i}: " + "word " * ((i * 7) % 50) for i in range(3 * embedder.max_forward_texts + 5)]
    batches_before = embedder.stats.batches
    rows = embedder.encode(texts)
    assert embedder.stats.batches - batches_before == 4
    np.testing.assert_allclose(rows, plain_model.encode(texts, normalize_embeddings=True), atol=1e-5)


def test_bulk_encode_in_chunks_reports_progress_and_keeps_input_order(embedder: Embedder) -> None:
    texts = [f"passage {i} " + "about tea and travel " * (i % 9) for i in range(150)]
    progress: list[tuple[int, int]] = []
    rows = embedder.encode_in_chunks(texts, lambda done, total: progress.append((done, total)))
    assert progress[-1] == (150, 150) and [done for done, _ in progress] == sorted(done for done, _ in progress)
    np.testing.assert_allclose(rows, embedder.encode(texts), atol=1e-5)


def test_closing_the_embedder_drains_its_batcher_and_a_later_query_starts_a_new_one(embedder: Embedder) -> None:
    old = embedder.query_batcher()
    embedder.close()
    assert not old.is_running()
    row = embedder.encode_queries(["after close"], WAIT_S)
    assert embedder.query_batcher() is not old and row.shape == (1, embedder.dimensions)


# --- devices --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_a_requested_cuda_device_falls_back_cleanly_without_a_gpu() -> None:
    assert choose_device("cuda:0") in ("cpu", "mps")
    assert choose_device("auto") in ("cpu", "mps")
    assert choose_device("cpu") == "cpu"


@pytest.fixture(scope="module")
def gpu_embedder() -> Iterator[Embedder]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpu = Embedder("all-MiniLM-L6-v2", "cuda:0")
    yield gpu
    gpu.close()


@pytest.mark.gpu
def test_on_cuda_the_model_is_fp16_pinned_warm_and_agrees_with_the_cpu_model(
    gpu_embedder: Embedder, embedder: Embedder
) -> None:
    assert next(gpu_embedder._model.parameters()).dtype == torch.float16
    assert gpu_embedder.device == "cuda:0" and torch.cuda.current_device() == 0
    rows = gpu_embedder.encode_queries(QUERIES, WAIT_S)
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, embedder.encode(QUERIES), atol=5e-3)


@pytest.mark.gpu
def test_on_cuda_short_texts_replay_captured_graphs_and_every_batch_shape_agrees_with_the_cpu_model(
    gpu_embedder: Embedder, embedder: Embedder
) -> None:
    assert gpu_embedder.graphed
    batches = {
        "one query": QUERIES[:1],
        "a few queries": QUERIES[:3],
        "a hundred notes of mixed lengths": [f"note {i}: " + "tea and travel " * (i % 12) for i in range(100)],
        "texts past the largest token bucket (eager)": [" ".join(QUERIES) * 3, QUERIES[0]],
        "more texts than the largest text bucket": [f"q{i} about the dentist" for i in range(600)],
    }
    for name, texts in batches.items():
        replays_before = gpu_embedder.stats.graph_replays
        rows = gpu_embedder.encode(texts)
        np.testing.assert_allclose(rows, embedder.encode(texts), atol=5e-3, err_msg=name)
        replayed = gpu_embedder.stats.graph_replays > replays_before
        assert replayed == ("eager" not in name), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_beyond_the_visible_devices_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        choose_device(f"cuda:{torch.cuda.device_count()}")


# --- the per-GPU launcher --------------------------------------------------------------------------------


def test_gpus_are_parsed_from_a_comma_separated_list_and_bad_lists_are_refused() -> None:
    assert parse_gpus("0,1") == [0, 1] and parse_gpus(" 3 ") == [3]
    for bad in ("", "0,0", "-1", "a,b"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    assert split_gpus_arg(["--gpus", "0,1", "--concurrency", "8"]) == ([0, 1], ["--concurrency", "8"])
    assert split_gpus_arg(["--gpus=2"]) == ([2], [])
    assert split_gpus_arg(["--loglevel", "info"]) == (None, ["--loglevel", "info"])


def test_each_gpu_gets_an_embed_worker_pinned_to_its_device_under_its_own_name() -> None:
    command = worker_command(1, ["--concurrency", "8"])
    assert command[:5] == [sys.executable, "-m", "memq.ops.cli", "worker", "embed"]
    assert command[5:] == ["--device", "cuda:1", "-n", "embed-gpu1@%h", "--concurrency", "8"]
    for clash in (["--device", "cpu"], ["-n", "x@%h"], ["--hostname=x@%h"]):
        with pytest.raises(ValueError, match="set per GPU"):
            worker_command(0, clash)


SLEEPER = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(60)"


def start_supervisor(commands: list[list[str]]) -> tuple[Supervisor, threading.Thread, list[int]]:
    supervisor = Supervisor(commands)
    supervisor.start()
    codes: list[int] = []
    waiter = threading.Thread(target=lambda: codes.append(supervisor.wait()))
    waiter.start()
    return supervisor, waiter, codes


def test_the_launcher_forwards_a_stop_signal_to_every_worker_and_exits_cleanly() -> None:
    supervisor, waiter, codes = start_supervisor([[sys.executable, "-c", SLEEPER]] * 2)
    time.sleep(0.5)  # let the children install their handler
    supervisor.stop(signal.SIGTERM)
    waiter.join(WAIT_S)
    assert codes == [0] and all(process.returncode == 0 for process in supervisor.processes)


def test_when_one_gpu_worker_dies_the_launcher_stops_the_others_and_reports_its_failure() -> None:
    dying = [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"]
    supervisor, waiter, codes = start_supervisor([[sys.executable, "-c", SLEEPER], dying])
    waiter.join(WAIT_S)
    assert codes == [3]
    assert all(process.poll() is not None for process in supervisor.processes)


def test_memq_worker_embed_gpus_rejects_a_bad_gpu_list_before_starting_anything() -> None:
    from memq.workers.embedding.gpu_launcher import run_from_argv

    assert run_from_argv(["--concurrency", "4"]) is None
    assert run_from_argv(["--gpus", "0,0"]) == 2
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from memq.workers.embedding.gpu_launcher import run_from_argv; print(run_from_argv(['--gpus']))",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert "--gpus needs a value" in done.stderr and done.stdout.strip() == "2"
