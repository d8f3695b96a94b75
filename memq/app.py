"""The Celery application, as a web process and a worker both see it.

Importing it loads no model, opens no connection and imports nothing of the worker side: the task
definitions and the worker start-up hooks are named in ``include``, which only a worker process imports.
"""

from __future__ import annotations

from celery import Celery

from memq.config.celery import celery_config
from memq.settings import get_settings

WORKER_MODULES = ["memq.workers.startup", "memq.tasks.retrieval", "memq.tasks.ingest", "memq.tasks.diagnostics"]

app = Celery("memq", include=WORKER_MODULES)
app.config_from_object(celery_config(get_settings()))
