"""The Celery application. Importing it loads no model and opens no database connection."""

from __future__ import annotations

from celery import Celery

from config import get_settings
from config.celery import celery_config

app = Celery("memq", include=["tasks.retrieval", "tasks.ingest", "tasks.diagnostics"])
app.config_from_object(celery_config(get_settings()))

# Worker start-up hooks (model / MongoClient per process, metrics endpoint).
import workers.startup  # noqa: E402,F401
