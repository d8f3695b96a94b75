"""Ingestion tasks: embed in bulk, upsert idempotently, invalidate the tenant's caches; transient failures are
retried by the one policy of ``memq.tasks.retry``. Each message carries its call's ``deadline_ts`` (set at the edge,
``memq.client.edge``); one received past it is not run (``deadlines.refuse_if_passed``)."""

from __future__ import annotations

from typing import Any

from celery import Task

from memq.client.app import app
from memq.client.edge import remember_request
from memq.core import deadlines, names
from memq.core.field_rules import MAX_VECTOR_DIMENSIONS, check_count
from memq.core.memory_types import MemoryType
from memq.core.settings import get_settings
from memq.core.wire import EMBED_TEXTS, FORGET_REQUEST, REMEMBER_REQUEST, parse, parse_embedded_texts
from memq.tasks import retry


@app.task(name=names.EMBED_TEXTS, bind=True, max_retries=None, store_errors_even_if_ignored=True)
@retry.retrying(retry.INGEST)
def embed_texts(self: Task, texts: list[str], deadline_ts: float | None = None) -> dict[str, Any]:
    from memq.workers import steps

    call = parse(EMBED_TEXTS, {"texts": texts, "deadline_ts": deadline_ts})
    deadlines.refuse_if_passed(call["deadline_ts"], names.EMBED_TEXTS)
    texts = call["texts"]

    def report(done: int, total: int) -> None:
        if self.request.id and not self.request.called_directly:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})

    return steps.embed_texts(texts, on_progress=report if len(texts) > 256 else None)


@app.task(name=names.STORE, bind=True, max_retries=None)
@retry.retrying(retry.INGEST)
def store(
    self: Task,
    embedded: dict[str, Any],
    memory_id: str,
    memory_type: str,
    items: list[dict[str, Any]],
    deadline_ts: float | None = None,
) -> dict[str, Any]:
    from memq.workers import steps

    message = {"memory_id": memory_id, "memory_type": memory_type, "items": items, "deadline_ts": deadline_ts}
    request = parse(REMEMBER_REQUEST, message, get_settings())
    deadlines.refuse_if_passed(request["deadline_ts"], names.STORE)
    # store_memories checks `embedded` (one finite vector of the model's dimension per item, the embed model)
    # before it writes anything: InvalidInput naming the field, e.g. embedded.vectors[3].
    return steps.store_memories(embedded, request["memory_id"], request["memory_type"], request["items"])


@app.task(name=names.REMEMBER, bind=True)
def remember(
    self: Task, memory_id: str, memory_type: str, items: list[dict[str, Any]], timeout_s: float | None = None
) -> Any:
    """Entry point for ``send_task('memq.remember', ...)``: checks, then becomes embed | store, whose deadline is
    ``timeout_s`` (``None``: ``deadlines.INGEST_TIMEOUT_S``) from now."""
    from memq.client.canvas import remember_canvas

    request = remember_request(get_settings(), memory_id, memory_type, items, timeout_s)
    raise self.replace(remember_canvas(request))


@app.task(name=names.FORGET, bind=True, max_retries=None)
@retry.retrying(retry.INGEST)
def forget(
    self: Task,
    memory_id: str,
    memory_type: str | None = None,
    ids: list[str] | None = None,
    deadline_ts: float | None = None,
) -> dict[str, Any]:
    from memq.workers import steps

    request = parse(
        FORGET_REQUEST, {"memory_id": memory_id, "memory_type": memory_type, "ids": ids, "deadline_ts": deadline_ts}
    )
    deadlines.refuse_if_passed(request["deadline_ts"], names.FORGET)
    return steps.forget(request["memory_id"], request["memory_type"], request["ids"])


@app.task(name=names.CREATE_INDEXES, bind=True, max_retries=None)
@retry.retrying(retry.INGEST)
def create_indexes(self: Task, dimensions: int | dict[str, Any] | None = None) -> dict[str, Any]:
    """``dimensions``: the vector index's, or the ``memq.embed_texts`` result of a probe text chained in front of
    this task (``memq.client.canvas.indexes_canvas``), whose vector has the loaded model's; none is ``InvalidInput``."""
    from memq.workers.storage import indexes

    settings = get_settings()
    if isinstance(dimensions, dict):
        dimensions = parse_embedded_texts(dimensions, 1, settings.embed_model).shape[1]
    dimensions = check_count(dimensions, "dimensions", MAX_VECTOR_DIMENSIONS)
    types = [t.value for t in MemoryType]
    vector_index = indexes.vector_index_definition(dimensions, settings.vector_index)
    text_index = indexes.text_index_definition(settings.text_index)
    return {
        "indexes": indexes.ensure_indexes(types),
        "vector_indexes": indexes.ensure_search_indexes(types, vector_index),
        "vector_index_definition": vector_index,
        "text_indexes": indexes.ensure_search_indexes(types, text_index),
        "text_index_definition": text_index,
    }
