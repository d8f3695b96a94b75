"""The C allocator of a worker process, tuned once at ``memq worker`` start, before any thread exists.

Measured on the 9-type x k=100 load (README, "Memory"): with glibc's defaults a search worker's resident memory
reached about three times what it held. Two glibc behaviours cause it: each thread allocates from its own arena
(up to 8 per core), and after a large block is freed glibc raises its memory-map threshold, so later results of a
few MB come from those arenas and stay there, fragmented. ``mallopt(M_ARENA_MAX)`` (``MEMQ_MALLOC_ARENA_MAX``) and a
fixed ``mallopt(M_MMAP_THRESHOLD)`` (``MEMQ_MALLOC_MMAP_THRESHOLD_BYTES``) are the settings glibc documents for
this; they are the ``MALLOC_ARENA_MAX`` and ``MALLOC_MMAP_THRESHOLD_`` environment variables, set from inside the
process so that ``memq worker`` needs no wrapper. Only search workers are tuned (where it was measured), and an
operator's own ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES`` wins: then nothing is changed.
Elsewhere than glibc (musl, macOS) nothing is changed either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8
OPERATOR_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_applied: dict[str, int] = {}


def tune(arena_max: int, mmap_threshold_bytes: int) -> dict[str, int]:
    """Apply the settings that are not 0; returns what was applied (empty where the C library is not glibc or the
    operator set glibc's own variables)."""
    own = [name for name in OPERATOR_VARIABLES if os.environ.get(name)]
    if own:
        log.warning("allocator: %s set in the environment; memq's allocator settings not applied", ", ".join(own))
        return {}
    libc = _glibc()
    if libc is None:
        log.warning("allocator: glibc not found (%s); left as it is", platform.libc_ver()[0] or "unknown C library")
        return {}
    for name, option, value in (
        ("arena_max", M_ARENA_MAX, arena_max),
        ("mmap_threshold_bytes", M_MMAP_THRESHOLD, mmap_threshold_bytes),
    ):
        if value and libc.mallopt(option, value) == 1:
            _applied[name] = value
        elif value:
            log.warning("allocator: mallopt refused %s=%d", name, value)
    log.info("allocator: %s", ", ".join(f"{name}={value}" for name, value in _applied.items()) or "glibc defaults")
    return dict(_applied)


def applied() -> dict[str, int]:
    """What ``tune`` set in this process (for ``memq_info``)."""
    return dict(_applied)


def release_free_memory() -> None:
    """Hand the free pages of every malloc arena back to the system (glibc's ``malloc_trim(0)``); nothing
    elsewhere. Used by the search worker's memory guard after it sheds cache."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc
