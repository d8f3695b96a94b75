"""Captured CUDA graphs of the model's forward pass for short texts: a query's latency without launch overhead.

One graph per (texts, tokens) bucket, all in one memory pool, captured largest first and replayed one at a time (the
embedder's lock); a batch is zero-padded up to its bucket. Why and what it measured: docs/architecture.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64)
WARM_UP_PASSES = 3  # eager passes on a side stream before each capture (CUDA's documented recipe)


@dataclass
class Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]  # the static input tensors the graph reads, (texts, tokens) each
    output: Any  # the static (texts, dimensions) float32 tensor the graph writes


def bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``size``, or None when none does."""
    return next((b for b in buckets if b >= size), None)


class CudaGraphs:
    """One captured forward pass per (texts, tokens) bucket on one CUDA device."""

    def __init__(self, forward: Callable[[dict[str, Any]], Any], input_names: list[str], device: str) -> None:
        import torch

        self._torch = torch
        self._forward = forward
        self._device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, int], Graph] = {}
        for texts in reversed(TEXT_BUCKETS):
            for tokens in reversed(TOKEN_BUCKETS):
                self._graphs[(texts, tokens)] = self._capture(input_names, texts, tokens)

    def run(self, features: Mapping[str, Any]) -> np.ndarray | None:
        """The normalised float32 embeddings of a tokenised batch, or None when it fits no bucket (run it eagerly)."""
        texts, tokens = features["input_ids"].shape
        graph = self._graphs.get((bucket(texts, TEXT_BUCKETS), bucket(tokens, TOKEN_BUCKETS)))  # type: ignore[arg-type]
        if graph is None:
            return None
        for name, static in graph.inputs.items():
            static.zero_()
            static[:texts, :tokens].copy_(features[name], non_blocking=True)
        graph.graph.replay()
        return graph.output[:texts].cpu().numpy()

    def _capture(self, input_names: list[str], texts: int, tokens: int) -> Graph:
        torch = self._torch
        inputs = {name: torch.zeros((texts, tokens), dtype=torch.long, device=self._device) for name in input_names}
        # A mask with padding in it, so that whatever the model decides from the mask at capture time is the
        # padded path, which is right for every batch.
        inputs["attention_mask"][:, : max(1, tokens // 2)] = 1
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.inference_mode():
            with torch.cuda.stream(side):
                for _ in range(WARM_UP_PASSES):
                    self._forward(inputs)
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self._forward(inputs)
        return Graph(graph, inputs, output)


def capture_or_none(forward: Callable[[dict[str, Any]], Any], input_names: list[str], device: str) -> CudaGraphs | None:
    """The captured graphs, or None (eager passes, with a warning) where this model or torch cannot be captured."""
    try:
        return CudaGraphs(forward, input_names, device)
    except Exception:  # any capture failure leaves the correct eager path in place
        log.warning("CUDA graph capture failed on %s; embedding runs eagerly", device, exc_info=True)
        return None
