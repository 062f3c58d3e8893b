"""Return freed tensor memory to the OS promptly (glibc).

A merge allocates and frees a few dense module-sized tensors per module. With glibc's default
dynamic mmap threshold, freed blocks below ~32 MB stay in the heap, so the process's resident
size grows by ~100 MB per module shape in practice; with a fixed 1 MiB threshold every large
tensor is mmapped and unmapped on free. The entry points (CLI, service, benchmarks) call this;
importing the library changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3


def release_freed_memory_promptly(threshold_bytes: int = 1 << 20) -> bool:
    """Set glibc's mmap threshold; returns False (and does nothing) on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; keeping the allocator's defaults")
        return False
