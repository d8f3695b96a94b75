"""The floor a retrieval can reach on a fleet: the retrieval canvas's shape with a real embedding and no-op
searches and merge (``memq.noop``). Only the benchmarks use it."""

from __future__ import annotations

from celery import chain, chord
from celery.canvas import Signature

from memq import names
from memq.app import app
from memq.wire import RetrievalRequest


def floor_canvas(request: RetrievalRequest) -> Signature:
    """The retrieval canvas's shape with a real embedding and no-op searches and merge: the floor a
    retrieval can reach on this fleet (broker hops, chord bookkeeping, one forward pass)."""
    noops = [
        app.signature(names.NOOP, args=(request["memory_id"], memory_type), queue=names.SEARCH_QUEUE)
        for memory_type in request["limits"]
    ]
    embed = app.signature(names.EMBED_QUERY, args=(request["query"],), queue=names.EMBED_QUEUE)
    return chain(embed, chord(noops, app.signature(names.NOOP, queue=names.SEARCH_QUEUE)))
