"""The Celery application, as a web process and a worker both see it. Importing it loads no model, opens no
connection and imports nothing of the worker side (the task modules are only named in ``include``). Every task
message published through it carries ``memq_published_at`` (``stamp_published_at``), which ``memq exporter`` reads.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from memq.config.celery import celery_config
from memq.core import names
from memq.core.settings import get_settings

WORKER_MODULES = ["memq.workers.startup", "memq.tasks.retrieval", "memq.tasks.ingest"]
PUBLISHED_AT_HEADER = names.PUBLISHED_AT_HEADER  # what memq.ops.exporter reads (through names: it never imports Celery)


class ConfigFromSettings(Mapping[str, Any]):
    """Celery's configuration, derived from the settings when Celery first reads it, so importing the app never
    raises: a bad ``MEMQ_*`` value is a ``ConfigError`` at a worker's start or a client's first call."""

    @functools.cached_property
    def _config(self) -> dict[str, Any]:
        return celery_config(get_settings())

    def __getitem__(self, key: str) -> Any:
        return self._config[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def __len__(self) -> int:
        return len(self._config)


app = Celery("memq", include=WORKER_MODULES, events="memq.client.celery_internals:MemqEvents")
app.config_from_object(ConfigFromSettings())
# On RabbitMQ every worker also fails the callers of the messages the broker dead-letters (a step past the delivery
# limit). Named, not imported: a web process never builds a consumer.
app.steps["consumer"].add("memq.workers.plumbing.dead_letter_watch:DeadLetterWatch")


@before_task_publish.connect(dispatch_uid="memq.stamp_published_at")
def stamp_published_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamps the publish time (Unix seconds) on every task message this process sends, on each publish (a retry,
    which carries its task's custom headers, waits from when it is sent again), through Celery's documented signal."""
    if isinstance(headers, dict):
        headers[PUBLISHED_AT_HEADER] = time.time()
