"""The retrieval and ingestion canvases, built in one place, by task name (no task imports)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import chain, chord
from celery.canvas import Signature

from memq.client.app import app
from memq.core import names, sharding
from memq.core.settings import get_settings
from memq.core.wire import ForgetRequest, RememberRequest, RetrievalRequest, search_call


def deadline_options(deadline_ts: float | None) -> dict[str, Any]:
    """A step's ``deadline_ts`` argument and its message's ``expires`` (Celery drops a message received after it)."""
    expires = None if deadline_ts is None else datetime.fromtimestamp(deadline_ts, tz=UTC)
    return {"kwargs": {"deadline_ts": deadline_ts}, "expires": expires}


def retrieval_canvas(request: RetrievalRequest) -> Signature:
    """``embed(query) | group(search(type) for type in limits) | merge``: the query is embedded once,
    each type is searched in parallel on the search queue, and merge ranks the union."""
    deadline = deadline_options(request["deadline_ts"])
    search_queue = sharding.search_queue_for(request["memory_id"], get_settings().search_shards)
    searches = [
        app.signature(names.SEARCH, *search_call(request, memory_type), queue=search_queue, expires=deadline["expires"])
        for memory_type in request["limits"]
    ]
    # The embedding travels to the searches in the messages; storing it as a result too would cost a 2 KB
    # SET + PUBLISH per retrieval that nobody reads (its failures are still stored: see tasks/retrieval.py).
    embed = app.signature(
        names.EMBED_QUERY, args=(request["query"],), queue=names.EMBED_QUEUE, ignore_result=True, **deadline
    )
    merge = app.signature(names.MERGE, kwargs={"request": request}, queue=names.SEARCH_QUEUE)
    return chain(embed, chord(searches, merge))


def remember_canvas(request: RememberRequest) -> Signature:
    """``embed_texts(contents) | store(...)``: embedding on the embed queue, the bulk write on ingest; both messages
    carry the request's deadline."""
    texts = [item["content"] for item in request["items"]]
    deadline = deadline_options(request["deadline_ts"])
    embed = app.signature(names.EMBED_TEXTS, args=(texts,), queue=names.EMBED_QUEUE, ignore_result=True, **deadline)
    args = (request["memory_id"], request["memory_type"], request["items"])
    return chain(embed, app.signature(names.STORE, args=args, queue=names.INGEST_QUEUE, **deadline))


def forget_signature(request: ForgetRequest) -> Signature:
    """``forget(...)`` on the ingest queue, with the request's deadline."""
    args = (request["memory_id"], request["memory_type"], request["ids"])
    return app.signature(names.FORGET, args=args, queue=names.INGEST_QUEUE, **deadline_options(request["deadline_ts"]))


#: What ``indexes_canvas`` embeds to learn the model's dimension (its vector is thrown away).
DIMENSION_PROBE_TEXT = "memq: the embed model's dimension"


def indexes_canvas(dimensions: int | None) -> Signature:
    """``create_indexes(dimensions)``; without them ``embed_texts(probe) | create_indexes``: the vector index takes
    the dimension of the model the embed workers have loaded."""
    create = app.signature(names.CREATE_INDEXES, queue=names.INGEST_QUEUE)
    if dimensions is not None:
        return create.clone(args=(dimensions,))
    probe = app.signature(
        names.EMBED_TEXTS, args=([DIMENSION_PROBE_TEXT],), queue=names.EMBED_QUEUE, ignore_result=True
    )
    return chain(probe, create)
