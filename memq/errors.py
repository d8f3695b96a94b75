"""The exception tree. Invalid input is never retried; transient failures may be."""

from __future__ import annotations


class MemqError(Exception):
    """Base of every error memq raises on purpose."""


class ConfigError(MemqError):
    """A setting is missing or malformed."""


class InvalidInput(MemqError, ValueError):
    """The caller sent something memq refuses; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        # args are (field, message), so the exception survives Celery's round trip (pickle test, JSON
        # rebuild as ``InvalidInput(*args)``) and the caller still learns which field was wrong.
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class IndexNotReady(MemqError):
    """An Atlas Search or Vector Search index a search needs is missing, failed or still building."""


class TransientError(MemqError):
    """A dependency (MongoDB, Redis, a worker) failed in a way that may pass."""


class StoreUnavailable(TransientError):
    """MongoDB did not answer in time."""


class RetrievalTimeout(TransientError, TimeoutError):
    """The fleet did not answer within the caller's timeout."""


class TaskFailed(MemqError):
    """A task failed on a worker; the message is the worker's."""
