"""The suite's ``embedder`` fixture without conftest's services (no Redis or MongoDB on the device machine)."""

from typing import Any

import pytest


@pytest.fixture(scope="session")
def embedder() -> Any:
    from memq.workers.embedding.embedder import Embedder

    return Embedder("all-MiniLM-L6-v2", "cpu")  # fp32 on CPU: the copy's config names float32
