"""Process memory: giving the pages the C allocator keeps after frees back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Optional


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def release_freed_memory() -> bool:
    """Return the freed heap pages of this process to the system (glibc ``malloc_trim(0)``).

    CPU tensors below glibc's mmap threshold (128 KB, raised up to 32 MB as large blocks are
    freed) live on the heap; after they are freed their pages stay resident until the heap's top
    is free, so a long job's resident set creeps up with the peak of each phase it ran. Called
    between phases that free most of what they allocated (each reconstruction unit). False where
    the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
