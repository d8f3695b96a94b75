"""memq: Celery task-queue retrieval workers for agent memory.

What a web app uses::

    from memq import retrieve, aretrieve, remember, remember_many, forget
    from memq.errors import InvalidInput, RetrievalTimeout, TransientError

``import memq`` itself is instant: the client (Celery, Redis) is imported on first use of one of these
names, and nothing here ever imports torch, sentence-transformers, pymongo or the worker side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "aforget",
    "aremember",
    "aretrieve",
    "create_indexes",
    "forget",
    "remember",
    "remember_many",
    "retrieve",
]

if TYPE_CHECKING:
    from memq.client.api import (
        aforget,
        aremember,
        aretrieve,
        create_indexes,
        forget,
        remember,
        remember_many,
        retrieve,
    )


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from memq.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'memq' has no attribute {name!r}")
