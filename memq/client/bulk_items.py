"""A bulk import's items, checked one by one, and how far it got: no Celery and no numpy, so that ``memq remember
--file`` refuses a bad line of its first batch before it loads the client (``memq.client.api`` sends the batches)."""

from __future__ import annotations

import dataclasses
from typing import Any

from memq.core import field_rules
from memq.errors import InvalidInput, InvalidItem


@dataclasses.dataclass
class IngestProgress:
    """How far a bulk import got: every item up to ``stored_through`` (its 1-based position in the input; a file's
    line) is stored. ``items``, ``batches``, ``inserted``, ``updated``: what this call stored."""

    memory_id: str
    type: str
    stored_through: int = 0
    items: int = 0
    batches: int = 0
    inserted: int = 0
    updated: int = 0

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def progress_before(memory_id: Any, memory_type: Any, stored_through: int) -> IngestProgress:
    """A bulk import's progress before its first batch; ``InvalidInput`` for a bad tenant or type."""
    checked_id = field_rules.check_memory_id(memory_id)
    return IngestProgress(checked_id, field_rules.check_memory_type(memory_type).value, stored_through)


def checked_item(position: int, item: Any, unit: str) -> dict[str, Any]:
    """The item checked as ``remember`` checks it; a bad one is ``InvalidInput`` named by its 0-based index in the
    input (as ``remember`` names a list's) and, in the message, by its 1-based position (a file's line number)."""
    try:
        return field_rules.check_items([item])[0]
    except InvalidInput as exc:
        field = exc.field.replace("items[0]", f"items[{position - 1}]", 1)
        raise InvalidInput(field, f"{unit} {position}: {exc.message}") from None


def invalid_item(exc: InvalidInput, progress: IngestProgress) -> InvalidItem:
    """The import stopped at a bad item: what ``checked_item`` raised, with what is stored before it."""
    return InvalidItem(exc.field, exc.message, progress.stored_through, progress.summary())
