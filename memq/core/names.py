"""Stable task names and their queues. Import-light: a web app can ``send_task`` by these names without importing
torch, pymongo or any worker code. Each task's arguments: README, "By task name"; ``deadline_ts`` (Unix seconds,
``memq.core.deadlines``): a message received past it is not run; ``mode=None`` is ``field_rules.DEFAULT_MODE``.
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
