"""Diagnostics: a no-op task that lets benchmarks measure the floor of a chord of memq's shape."""

from __future__ import annotations

from typing import Any

from memq import names
from memq.app import app


@app.task(name=names.NOOP)
def noop(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Returns at once; stands in for a search or merge step in the floor measurement."""
    return {"type": args[1] if len(args) > 1 else None, "items": [], "search_ms": 0.0}
