"""What keeps a training process's resident memory close to what it uses: glibc's freed heap pages
handed back (`return_freed_memory`, after checkpoint saves and before evaluations)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from tests.train_helpers import REPO

# Freed blocks that glibc keeps in its heap, fragmented around a few live ones (a step's saved
# tensors among its freed activations); prints RSS before and after the call under test.
FRAGMENTED_HEAP = r"""
import sys
import psutil, torch
from trainer.training.callbacks import return_freed_memory
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(8 << 20, dtype=torch.uint8)
del big  # freeing a mapped 8 MiB block raises glibc's mmap threshold: smaller blocks now come from the heap
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(400)]
kept = blocks[::20]
del blocks
before = rss()
if sys.argv[1] == "return":
    return_freed_memory()
print(before, rss())
"""


def _glibc() -> bool:
    return hasattr(ctypes.CDLL(None), "malloc_trim")


def _returned_mib(call: str) -> float:
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, call], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # the child's traceback, not just its exit code
    before, after = map(int, done.stdout.split())
    return (before - after) / 2**20


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc_trim: other allocators keep or return pages their own way")
def test_freed_heap_pages_go_back_to_the_system():
    """380 MiB freed between 20 live 1 MiB blocks: glibc keeps them resident until asked."""
    assert _returned_mib("keep") < 50
    assert _returned_mib("return") > 300
