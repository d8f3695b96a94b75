"""memq: Celery task-queue retrieval workers for agent memory."""

__version__ = "0.1.0"
