"""Stable task names and their queues. Import-light: a web app can ``send_task`` by these names
without importing torch, pymongo or any worker code.

| name                | queue  | args                                                                      |
|---------------------|--------|---------------------------------------------------------------------------|
| memq.retrieve       | search | query, memory_id, limits, weights=None, timeout_s=None, mode=None,        |
|                     |        | filters=None                                                              |
| memq.remember       | ingest | memory_id, memory_type, items, timeout_s=None                             |
| memq.forget         | ingest | memory_id, memory_type=None, ids=None, deadline_ts=None                   |
| memq.create_indexes | ingest | dimensions, or the embed_texts result of a probe text        (chain step)   |
| memq.embed_query    | embed  | query, deadline_ts=None                                    (canvas step)  |
| memq.embed_texts    | embed  | texts, deadline_ts=None                                    (canvas step)  |
| memq.search         | search | embedded, memory_id, memory_type, k, strategy="auto", deadline_ts=None,   |
|                     |        | query=None, mode=None, filters=None; the tenant's search.<s> with         |
|                     |        | MEMQ_SEARCH_SHARDS > 1 (memq.core.sharding)                                    |
| memq.merge          | search | results, request                                           (chord body)   |
| memq.store          | ingest | embedded, memory_id, memory_type, items, deadline_ts=None  (chain step)   |

``deadline_ts``: Unix seconds, the call's deadline (``memq.core.deadlines``); a message received past it is not
run. ``None``: none (a raw ``send_task``).

``mode=None`` is ``memq.core.field_rules.DEFAULT_MODE`` (``hybrid``) wherever it is taken.
"""

RETRIEVE = "memq.retrieve"
REMEMBER = "memq.remember"
FORGET = "memq.forget"
CREATE_INDEXES = "memq.create_indexes"
EMBED_QUERY = "memq.embed_query"
EMBED_TEXTS = "memq.embed_texts"
SEARCH = "memq.search"
MERGE = "memq.merge"
STORE = "memq.store"

EMBED_QUEUE = "embed"
SEARCH_QUEUE = "search"
INGEST_QUEUE = "ingest"
QUEUES = (EMBED_QUEUE, SEARCH_QUEUE, INGEST_QUEUE)

ROUTES = {
    EMBED_QUERY: EMBED_QUEUE,
    EMBED_TEXTS: EMBED_QUEUE,
    SEARCH: SEARCH_QUEUE,
    MERGE: SEARCH_QUEUE,
    RETRIEVE: SEARCH_QUEUE,
    STORE: INGEST_QUEUE,
    REMEMBER: INGEST_QUEUE,
    FORGET: INGEST_QUEUE,
    CREATE_INDEXES: INGEST_QUEUE,
}

# Every task message published through memq's app carries its publish time (Unix seconds) here: ``memq exporter``
# reports the age of each queue's oldest message from it.
PUBLISHED_AT_HEADER = "memq_published_at"

# The inspect command every worker answers (``memq status`` broadcasts it; ``memq.workers.plumbing.remote_control``
# registers it).
INFO_COMMAND = "memq_info"


def is_memq_queue(queue: str) -> bool:
    """One of memq's queues: ``embed``, ``search``, ``ingest`` or a search shard ``search.<n>``."""
    if queue in QUEUES:
        return True
    prefix = f"{SEARCH_QUEUE}."
    return queue.startswith(prefix) and queue[len(prefix) :].isdigit() and len(queue) <= len(prefix) + 4
