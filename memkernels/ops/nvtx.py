"""NVTX ranges around every op, for Nsight. A no-op (no CUDA call, no
allocation) unless CUDA is present; MEMKERNELS_NVTX=0 turns them off."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _enabled() -> bool:
    return os.environ.get("MEMKERNELS_NVTX", "1") != "0" and torch.cuda.is_available()


@contextlib.contextmanager
def _cuda_range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    return _cuda_range(name) if _enabled() else contextlib.nullcontext()
