"""Prometheus metrics per stage, scraped per worker (``MEMQ_METRICS_PORT``).

With several processes per worker (prefork), set ``PROMETHEUS_MULTIPROC_DIR``: prometheus_client then
aggregates across processes, and the exporter reads that directory.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

FAST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

EMBED_SECONDS = Histogram("memq_embed_seconds", "Time of one forward pass", ["device"], buckets=FAST_BUCKETS_S)
EMBED_BATCH_SIZE = Histogram("memq_embed_batch_size", "Texts per forward pass", ["device"], buckets=BATCH_BUCKETS)
SEARCH_SECONDS = Histogram(
    "memq_search_seconds", "One type's search", ["memory_type", "strategy"], buckets=FAST_BUCKETS_S
)
MERGE_SECONDS = Histogram("memq_merge_seconds", "Ranking and merging one retrieval", buckets=FAST_BUCKETS_S)
CACHE_REQUESTS = Counter("memq_cache_requests_total", "Cache look-ups by cache and outcome", ["cache", "outcome"])
VERSION_BUMP_FAILURES = Counter(
    "memq_version_bump_failures_total", "Writes whose tenant data version could not be bumped (each is retried)"
)
DEAD_LETTERS = Counter(
    "memq_dead_letters_total", "Messages acknowledged into the dead-letter list instead of run", ["queue", "reason"]
)
REFUSED_CONTROL_COMMANDS = Counter(
    "memq_refused_control_commands_total", "Remote control commands refused (MEMQ_REMOTE_CONTROL)", ["command"]
)
STORE_WRITES = Counter("memq_memories_written_total", "Memories upserted", ["memory_type"])
BAD_STORED_ROWS = Counter(
    "memq_bad_stored_rows_total",
    "Stored memories the exact search skipped: embedding missing, undecodable, of another dimension or not finite",
    ["memory_type"],
)
MATRIX_LOADS = Counter(
    "memq_matrix_loads_total",
    "Tenant matrices loaded from MongoDB and built by the exact search (one per tenant, type and data version, "
    "shared by the searches that ask meanwhile)",
    ["memory_type"],
)
MEMORY_SHED_BYTES = Counter(
    "memq_memory_shed_bytes_total",
    "Matrix cache bytes a search process dropped to stay under its memory budget (MEMQ_SEARCH_MAX_RSS_BYTES)",
)
MEMORY_WAITS = Counter(
    "memq_memory_waits_total",
    "Loads and merges that found the search process over its memory budget and waited",
    ["work", "outcome"],
)
MONGO_CHECKOUTS = Counter("memq_mongo_pool_checkouts_total", "Connections checked out of the Mongo pool")
MONGO_CHECKOUT_FAILURES = Counter("memq_mongo_pool_checkout_failures_total", "Failed pool checkouts", ["reason"])
MONGO_CHECKOUT_WAIT = Histogram(
    "memq_mongo_pool_checkout_wait_seconds", "Time waiting for a pooled Mongo connection", buckets=FAST_BUCKETS_S
)


def serve(port: int) -> None:
    """Expose /metrics on ``port`` (0: off). Multi-process safe via PROMETHEUS_MULTIPROC_DIR."""
    if port <= 0:
        return
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:
        log.warning("metrics port %d unavailable: %s", port, exc)
