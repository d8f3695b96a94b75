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


class WorkerBusy(RetrievalTimeout):
    """A worker had no room for the work (a tenant load slot, its memory budget, its merge budget) within the
    work's own deadline; another delivery, or another worker, may have it."""


class TaskFailed(MemqError):
    """A task failed on a worker; the message is the worker's."""


class DeadLettered(TaskFailed):
    """A step of the call was dead-lettered instead of run (a poison message, or one that killed its worker again
    and again): ``memq dead-letters`` shows it. Raised to the caller at once, not at its timeout."""


class IngestStopped(MemqError):
    """``remember_many`` (or ``memq remember --file``) stopped before the end of its input: every item up to
    ``stored_through`` (1-based; a file's line) is stored, so ``skip=stored_through`` (``--skip N``) resumes.
    ``reason``: why it stopped; ``summary``: what was stored, as ``remember_many`` returns it."""

    def __init__(self, reason: str, stored_through: int, summary: dict[str, object]) -> None:
        super().__init__(f"{reason}; {resume_hint(stored_through)}")
        self.reason, self.stored_through, self.summary = reason, stored_through, summary


class InvalidItem(IngestStopped, InvalidInput):
    """An ``IngestStopped`` whose reason is an item (a line) memq refuses: nothing from its batch on was sent.
    Still an ``InvalidInput`` (``field``, ``message``) for callers that catch that."""

    def __init__(self, field: str, reason: str, stored_through: int, summary: dict[str, object]) -> None:
        InvalidInput.__init__(self, field, f"{reason}; {resume_hint(stored_through)}")
        self.reason, self.stored_through, self.summary = reason, stored_through, summary


def resume_hint(stored_through: int) -> str:
    if stored_through == 0:
        return "nothing is stored"
    return f"items 1..{stored_through} are stored (skip={stored_through} resumes)"
