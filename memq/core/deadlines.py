"""The one deadline of a call, and every margin taken from it.

The edge sets ``deadline_ts`` (Unix seconds: the caller's ``timeout_s`` from when the call was made); the canvas
gives every message of the call that instant as its ``expires`` and ``deadline_ts``; a message past it is not
started (``refuse_if_passed``), and every hop derives its budget from it with ``budget_s`` and the margins below,
each with its reason (README, "How it works", "Deadlines").
"""

from __future__ import annotations

import math
import time

from memq.errors import RetrievalTimeout

# -- margins inside a retrieval's deadline ------------------------------------------------------------------------
DELIVERY_MARGIN_S = 0.5  # left of the deadline for merge and the result's way back: a search attempt stops before it
MIN_ATTEMPT_S = 0.05  # the least time a search attempt (or a retry of one) is worth starting with
ATTEMPT_SHARE = 0.5  # an attempt with retries left takes half of what is left, so a stalled server leaves a retry
#: How long a search without a deadline of its own (a raw ``memq.search``) waits for a tenant load, and a load for
#: memory: a 50,000-memory tenant loads in a few seconds, a stalled one fails at the MongoDB client's own timeouts.
LOAD_WAIT_WITHOUT_DEADLINE_S = 120.0
#: How long a ``memq.embed_query`` without a deadline of its own waits for the batcher's forward pass: a stalled
#: device fails the step rather than holding its thread for ever.
EMBED_WAIT_WITHOUT_DEADLINE_S = 60.0
ASYNC_MARGIN_S = 0.25  # how far past its timeout an ``aretrieve`` may end (its thread's own wait ends at the deadline)
MERGE_WAIT_SHARE = 0.5  # of the visibility timeout, the most a merge waits: a message held longer is delivered again

# -- the caller's timeout_s when it gives none ---------------------------------------------------------------------
INGEST_TIMEOUT_S = 300.0  # one remember, or one batch of a bulk import (1000 memories embed in seconds on a CPU)
FORGET_TIMEOUT_S = 60.0  # one forget: a delete and a version bump

# -- socket timeouts: how far past a deadline a stalled Redis may hold a caller -----------------------------------
CACHE_SOCKET_TIMEOUT_S = 0.25  # a slow cache costs a caller at most this a reply, then it goes on without it
#: The broker and the result store, from a web process: a publish to a paused Redis, or the wait for a result,
#: ends at most this past the call's deadline (docs/guarantees.md, "Time").
CLIENT_SOCKET_TIMEOUT_S = 0.5
CLIENT_RESULT_RETRY_S = 0.25  # how long Celery's own result consumer retries a lost store while a chord is sent
#: A worker's Redis (broker and result store): its connections are long-lived and each result it stores ends a
#: step, so it rides out a stall of a few seconds (a failover) before the step fails and is retried or redelivered;
#: all well under ``MEMQ_VISIBILITY_TIMEOUT_S``.
WORKER_SOCKET_TIMEOUT_S = 5.0
WORKER_CONNECT_TIMEOUT_S = 2.0
WORKER_RESULT_RETRY_S = 2.0
#: RabbitMQ: a connection whose peer is silent this long is closed (a node lost without a TCP reset).
AMQP_HEARTBEAT_S = 10
AMQP_CONNECT_TIMEOUT_S = 2.0


def refuse_if_passed(deadline_ts: float | None, what: str) -> None:
    """A message past its deadline is not started: its caller has stopped waiting (``RetrievalTimeout``, which the
    retry policy does not retry past the deadline)."""
    late_s = time.time() - deadline_ts if deadline_ts is not None else -math.inf
    if late_s >= 0:
        raise RetrievalTimeout(f"{what} not run: its deadline passed {late_s:.3g} s before it started")


def budget_s(
    deadline_ts: float | None,
    *,
    margin_s: float = 0.0,
    share: float = 1.0,
    floor_s: float = 0.0,
    cap_s: float = math.inf,
    default_s: float | None = None,
) -> float | None:
    """What a hop may spend: ``share`` of the time left before ``deadline_ts`` less ``margin_s``, within
    ``floor_s..cap_s``. Without a deadline: ``default_s`` (capped too), or ``None`` (no limit)."""
    if deadline_ts is None:
        return None if default_s is None else min(cap_s, max(floor_s, default_s))
    left_s = (deadline_ts - time.time() - margin_s) * share
    return min(cap_s, max(floor_s, left_s))
