"""``release_freed_memory``: freed heap pages leave the resident set."""

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
