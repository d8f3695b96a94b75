"""Memory types: one MongoDB collection per type, named by the type's value (memorizz's names)."""

from __future__ import annotations

from enum import StrEnum


class MemoryType(StrEnum):
    LONG_TERM_MEMORY = "long_term_memory"
    CONVERSATION_MEMORY = "conversation_memory"
    WORKFLOW_MEMORY = "workflow_memory"
    SHORT_TERM_MEMORY = "short_term_memory"
    ENTITY_MEMORY = "entity_memory"
    PERSONAS = "personas"
    SUMMARIES = "summaries"
    TOOLBOX = "toolbox"
    SHARED_MEMORY = "shared_memory"


ALIASES: dict[str, MemoryType] = {
    "semantic": MemoryType.LONG_TERM_MEMORY,
    "episodic": MemoryType.CONVERSATION_MEMORY,
    "procedural": MemoryType.WORKFLOW_MEMORY,
}

BY_NAME: dict[str, MemoryType] = {**{memory_type.value: memory_type for memory_type in MemoryType}, **ALIASES}

# Types whose memories carry a speaker role worth indexing.
ROLE_TYPES = frozenset({MemoryType.CONVERSATION_MEMORY, MemoryType.SHORT_TERM_MEMORY})


def known_type_names() -> list[str]:
    return [t.value for t in MemoryType] + sorted(ALIASES)
