"""NVTX ranges around every op, for Nsight. A no-op (no CUDA call, no
allocation) unless CUDA is present; MEMKERNELS_NVTX=0 turns them off."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def nvtx_enabled() -> bool:
    """Whether nvtx_range pushes ranges (CUDA present, MEMKERNELS_NVTX not 0):
    a hot path checks it to skip even the null context."""
    return os.environ.get("MEMKERNELS_NVTX", "1") != "0" and torch.cuda.is_available()


@contextlib.contextmanager
def _cuda_range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    return _cuda_range(name) if nvtx_enabled() else contextlib.nullcontext()
