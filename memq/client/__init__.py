"""What a web process runs: the retrieval API, the Celery app and canvases, result waiting, the result cache; never
torch, pymongo or the worker side (import-linter checks it). The API's names (``memq.client.retrieve`` ...,
``memq.client.api``'s) resolve on first use.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    import memq

    if name in memq.__all__ and name != "__version__":
        from memq.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'memq.client' has no attribute {name!r}")
