"""The one deadline of a retrieval, and every margin taken from it.

The edge sets ``deadline_ts`` (Unix seconds: ``timeout_s`` from when the request was made) in the request
(``memq.core.wire.RetrievalRequest``); the canvas gives each message that same instant as its ``expires`` and each
``memq.search`` its ``deadline_ts``. Every hop derives its budget from it with ``budget_s`` and the margins below,
written here once, each with its reason.
"""

from __future__ import annotations

import math
import time

# -- margins inside a retrieval's deadline ------------------------------------------------------------------------
DELIVERY_MARGIN_S = 0.5  # left of the deadline for merge and the result's way back: a search attempt stops before it
MIN_ATTEMPT_S = 0.05  # the least time a search attempt (or a retry of one) is worth starting with
ATTEMPT_SHARE = 0.5  # an attempt with retries left takes half of what is left, so a stalled server leaves a retry
#: How long a search without a deadline of its own (a raw ``memq.search``) waits for a tenant load, and a load for
#: memory: a 50,000-memory tenant loads in a few seconds, a stalled one fails at the MongoDB client's own timeouts.
LOAD_WAIT_WITHOUT_DEADLINE_S = 120.0
ASYNC_MARGIN_S = 0.25  # how far past its timeout an ``aretrieve`` may end (its thread's own wait ends at the deadline)
MERGE_WAIT_SHARE = 0.5  # of the visibility timeout, the most a merge waits: a message held longer is delivered again

# -- socket timeouts: how far past a deadline a stalled Redis may hold a caller -----------------------------------
CACHE_SOCKET_TIMEOUT_S = 0.25  # a slow cache costs a caller at most this a reply, then it goes on without it
RESULT_STORE_SOCKET_TIMEOUT_S = 0.5  # the result store a caller waits on: at most this past its deadline


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
