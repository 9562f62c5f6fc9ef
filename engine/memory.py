"""Host-memory hygiene between batches.

Batches of different padded widths allocate tensors of different sizes; glibc's allocator keeps the freed
blocks in a fragmenting heap, so a long CPU job's resident memory creeps up with the number of batches
(measured: 1.33x from 256 to 4096 prompts). Returning free heap pages to the OS after each batch keeps peak
memory flat. A no-op where glibc is absent (macOS, musl) and for CUDA tensors (torch caches those itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim(0)`); cheap, safe to call per batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
