"""Retrieval tasks: thin wrappers that check arguments, retry transient failures, and route (``memq.workers.steps``)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from memq.client.app import app
from memq.core import deadlines, names, sharding, wire
from memq.core.settings import Settings, get_settings
from memq.errors import InvalidInput, TransientError
from memq.tasks import retry

log = logging.getLogger(__name__)


# store_errors_even_if_ignored: the canvas does not store this step's result, but a failure must be stored so
# that Celery marks the rest of the chain failed and the caller learns it at once instead of timing out.
@app.task(name=names.EMBED_QUERY, bind=True, max_retries=None, store_errors_even_if_ignored=True)
@retry.retrying(retry.EMBED)
def embed_query(self: Task, query: str, deadline_ts: float | None = None) -> dict[str, Any]:
    from memq.workers import steps

    call = wire.parse(wire.EMBED_QUERY, {"query": query, "deadline_ts": deadline_ts})
    deadlines.refuse_if_passed(call["deadline_ts"], names.EMBED_QUERY)
    wait_s = deadlines.budget_s(call["deadline_ts"], default_s=deadlines.EMBED_WAIT_WITHOUT_DEADLINE_S)
    return steps.embed_query(call["query"], wait_s)


@app.task(name=names.SEARCH, bind=True, max_retries=None)
def search(
    self: Task,
    embedded: Any = None,
    memory_id: Any = None,
    memory_type: Any = None,
    k: Any = None,
    strategy: Any = "auto",
    deadline_ts: Any = None,
    query: Any = None,
    mode: Any = None,
    filters: Any = None,
    *extra: Any,
    **unknown: Any,
) -> dict[str, Any]:
    """One type's search. Never raises, whatever its arguments (a raw ``send_task`` may send any): a failure is
    reported for this type only, so the chord's other types still arrive. Transient store errors retry with
    bounded backoff inside the deadline. ``mode`` defaults to ``field_rules.DEFAULT_MODE``, as ``retrieve``'s."""
    from memq.workers import steps

    try:
        if unknown:
            raise InvalidInput(next(iter(unknown)), "is not an argument of memq.search (memq.core.names)")
        if extra:
            raise InvalidInput("args", f"memq.search takes at most 9 arguments, got {9 + len(extra)} (memq.core.names)")
        settings = get_settings()
        arguments = {"memory_id": memory_id, "memory_type": memory_type, "k": k, "strategy": strategy}
        options = {"query": query, "mode": mode, "filters": filters, "deadline_ts": deadline_ts}
        call = wire.parse(wire.SEARCH_CALL, {**arguments, **options}, settings)
        memory_id, memory_type, deadline_ts = call["memory_id"], call["memory_type"], call["deadline_ts"]
        wanted = steps.Wanted(query=call["query"], mode=call["mode"], filters=call["filters"])
        attempts_left = max(1, retry.SEARCH.max_retries + 1 - self.request.retries)
        budget_s = attempt_budget_s(deadline_ts, settings, attempts_left=attempts_left)
        # search_type checks the EmbedResult's shape (wire.parse_embed_result) before MongoDB is asked anything.
        found = steps.search_type(embedded, memory_id, memory_type, call["k"], call["strategy"], wanted, budget_s)
        return {**found, "served_by": self.request.hostname}
    except InvalidInput as exc:
        return wire.search_failure(str(memory_type), f"invalid input: {exc}", embedded, self.request.hostname)
    except TransientError as exc:
        log.warning("search %s for %s failed (%s); attempt %d", memory_type, memory_id, exc, self.request.retries + 1)
        # To the queue of this worker's MEMQ_SEARCH_SHARDS, not back to the one the message came from: a retry
        # follows a change of N (and never waits on a shard queue that is being drained).
        retry_queue = sharding.search_queue_for(memory_id, get_settings().search_shards)
        retry.retry_transient(self, exc, retry.SEARCH, deadline_ts, retry_queue)
        message = f"unavailable after {self.request.retries + 1} attempt(s): {exc}"
        return wire.search_failure(memory_type, message, embedded, self.request.hostname)
    except Exception as exc:
        log.exception("search %s for %s failed", memory_type, memory_id)
        return wire.search_failure(str(memory_type), f"{type(exc).__name__}: {exc}", embedded, self.request.hostname)


def attempt_budget_s(deadline_ts: float | None, settings: Settings, attempts_left: int) -> float | None:
    """How long one search attempt may spend in MongoDB: never past the caller's deadline (less a margin for merge
    and delivery), half of what is left while retries remain (a stalled server still leaves time to retry and to
    report the type), never more than the MongoDB client's socket timeout."""
    from memq.workers.storage.mongo import socket_timeout_s

    return deadlines.budget_s(
        deadline_ts,
        margin_s=deadlines.DELIVERY_MARGIN_S,
        share=deadlines.ATTEMPT_SHARE if attempts_left > 1 else 1.0,
        floor_s=deadlines.MIN_ATTEMPT_S,
        cap_s=socket_timeout_s(settings.mongodb_uri),
    )


@app.task(name=names.MERGE)
def merge(results: list[dict[str, Any]], request: dict[str, Any]) -> dict[str, Any]:
    from memq.workers import steps

    return steps.merge(results, request)  # checks their shape (memq.core.wire.parse_merge_input)


@app.task(name=names.RETRIEVE, bind=True)
def retrieve(
    self: Task,
    query: str,
    memory_id: str,
    limits: dict[str, int],
    weights: dict[str, float] | None = None,
    timeout_s: float | None = None,
    mode: str | None = None,
    filters: dict[str, Any] | None = None,
) -> Any:
    """Entry point for ``send_task('memq.retrieve', ...)``: checks, then replaces itself with the canvas.
    The caller's ``AsyncResult`` resolves to the merged result."""
    from memq.client.canvas import retrieval_canvas
    from memq.client.edge import retrieval_request

    settings = get_settings()
    request = retrieval_request(settings, query, memory_id, limits, weights, timeout_s, mode=mode, filters=filters)
    raise self.replace(retrieval_canvas(request))
