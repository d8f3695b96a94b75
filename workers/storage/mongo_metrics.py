"""pymongo connection-pool events → Prometheus (imported only where a MongoClient is built)."""

from __future__ import annotations

from pymongo import monitoring

from memq.workers.plumbing.metrics import MONGO_CHECKOUT_FAILURES, MONGO_CHECKOUT_WAIT, MONGO_CHECKOUTS


class MongoPoolMetrics(monitoring.ConnectionPoolListener):
    """pymongo pool events → checkout counts and waits."""

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        MONGO_CHECKOUTS.inc()
        duration = getattr(event, "duration", None)
        if duration is not None:
            MONGO_CHECKOUT_WAIT.observe(duration)

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        MONGO_CHECKOUT_FAILURES.labels(reason=str(event.reason)).inc()

    # The remaining pool events carry nothing we export.
    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None: ...
    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None: ...
    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None: ...
    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None: ...
    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None: ...
    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None: ...
    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None: ...
    def connection_check_out_started(self, event: monitoring.ConnectionCheckOutStartedEvent) -> None: ...
    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None: ...
