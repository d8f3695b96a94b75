"""Human-readable output of a retrieval, for the CLI and the demo."""

from __future__ import annotations

import json
from typing import Any


def format_result(result: dict[str, Any]) -> str:
    lines = [f"query: {result['query']!r}  memory_id: {result['memory_id']}  cached: {result.get('cached')}"]
    for memory_type, items in result["results"].items():
        lines.append(f"  {memory_type} ({len(items)})")
        for item in items:
            scores = item.get("scores", {})
            parts = [f"{name}={scores[name]:.3f}" for name in ("vector", "lexical") if scores.get(name) is not None]
            lines.append(f"    {item['memory_signal']:.3f}  {' '.join(parts)}  {item['content'][:80]}")
    for memory_type, message in result.get("errors", {}).items():
        lines.append(f"  {memory_type}: ERROR {message}")
    timings = result.get("timings_ms", {})
    if timings:
        lines.append("  timings_ms: " + json.dumps(_round(timings)))
    return "\n".join(lines)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value
