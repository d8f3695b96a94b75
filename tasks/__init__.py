"""The Celery app, thin task definitions, the canvas builder and the client API."""
