"""Process memory: the C allocator's pages, given back to the system between phases and kept
for reuse within an iteration loop."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from typing import Optional

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: glibc's defaults / the ceiling of its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
DEFAULT_MMAP_MAX, MMAP_THRESHOLD_CEILING = 65536, 32 << 20
#: freed heap kept at its top while reusing (glibc takes an int)
REUSE_TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def _libc_function(name: str) -> Optional[Callable[..., int]]:
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
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
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """While inside, CPU allocations of any size come from the C heap, and freed blocks stay
    there for the next allocation (glibc ``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD``
    2 GiB). Yields whether it applied (False where the C library has no ``mallopt``).

    Outside, glibc maps each block above its mmap threshold (at most 32 MiB) on its own and
    unmaps it when freed, so an iteration loop that allocates and frees the same weight- and
    activation-sized tensors every step takes fresh zero-filled pages each time: a page fault
    per 4 KiB. Inside, the loop reuses the pages of the step before. Values are unchanged
    (where a tensor lives, not what it holds).

    On exit: mmap above 32 MiB and trim above 64 MiB again (the values glibc's dynamic
    thresholds reach once a 32 MiB block has been freed, which any paper-size forward does;
    setting them explicitly ends the dynamic rule), and the freed heap is given back
    (:func:`release_freed_memory`).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        yield False
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD)
    try:
        yield True
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)
        mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_CEILING)
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        release_freed_memory()
