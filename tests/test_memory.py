"""``release_freed_memory``: freed heap pages leave the resident set. ``reusing_freed_memory``:
large tensors come from the heap while inside, from their own mappings again after."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest
import torch

from diffquant.bench.memory import current_rss_mb
from diffquant.memory import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc RSS")
def test_freed_heap_pages_are_returned():
    held = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB tensors: on the heap, 256 MB
    last = held[-1]  # keeps the heap's top in use: freeing the rest does not shrink it
    del held
    before = current_rss_mb()
    assert release_freed_memory()
    assert before - current_rss_mb() > 150
    assert last.sum() == 16 * 1024


_CHECK = """
import ctypes, ctypes.util, torch
from diffquant.memory import reusing_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
mallinfo2.restype = MallInfo2

def mapped_for(mib):  # bytes glibc mapped on their own for an untouched tensor while it lives
    before = mallinfo2().hblkhd
    t = torch.empty(mib << 20, dtype=torch.uint8)
    return mallinfo2().hblkhd - before

# sizes grow so that no freed heap block of an earlier step can serve a later one
assert mapped_for(256) >= 256 << 20, "glibc's default: a block this large is mapped on its own"
with reusing_freed_memory() as applied:
    assert applied
    assert mapped_for(64) == 0 and mapped_for(64) == 0, "inside: from the heap"
assert mapped_for(512) >= 512 << 20, "after: mapped again above 32 MiB"
"""


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "mallinfo2"), reason="glibc >= 2.33"
)
def test_reusing_freed_memory_serves_large_tensors_from_the_heap():
    """In a fresh process (no freed heap block of earlier tests around): glibc's ``mallinfo2``
    counts the bytes of blocks mapped on their own."""
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
