"""A lazily built, per-process singleton that is rebuilt after fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessLocal(Generic[T]):
    def __init__(self, factory: Callable[[], T], close: Callable[[T], None] | None = None) -> None:
        self._factory = factory
        self._close = close
        self._lock = threading.Lock()
        self._value: T | None = None
        self._pid: int | None = None

    def get(self) -> T:
        pid = os.getpid()
        if self._pid == pid and self._value is not None:
            return self._value
        with self._lock:
            if self._pid != pid or self._value is None:
                # Inherited from a parent across fork: never reuse its sockets or CUDA context.
                self._value = self._factory()
                self._pid = pid
            return self._value

    def is_built(self) -> bool:
        return self._value is not None and self._pid == os.getpid()

    def reset(self) -> None:
        with self._lock:
            if self._value is not None and self._pid == os.getpid() and self._close is not None:
                self._close(self._value)
            self._value = None
            self._pid = None
