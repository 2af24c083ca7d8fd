"""Hands memory freed by a large request back to the system.

After a request larger than the usual ones leaves, its activations are free but stay in the
allocators' pools (glibc's heap on the CPU, PyTorch's caching allocator on CUDA), so the
server's RSS would stay at its peak. Releasing them costs a few milliseconds; the engine calls
this only after such a request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return None


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
