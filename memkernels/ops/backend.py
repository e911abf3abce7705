"""Backend registry and selection.

A backend is an object with four functions of one signature each:
read_fwd, read_bwd, write_fwd, write_bwd (the same in each). `reference`
needs nothing compiled; `cpu` and `cuda` live in the extension memkernels._C
(python/ and csrc/); `triton` in memkernels.ops.triton.
"""
from __future__ import annotations

import functools
import importlib
import os
import types
import warnings
from typing import Optional

import torch

from memkernels.ops import reference

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
ENV_VAR = "MEMKERNELS_BACKEND"
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` from the repository root"


def _try_import(module: str) -> tuple[Optional[types.ModuleType], str]:
    try:
        return importlib.import_module(module), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, str(exc)


# Imported once at load time: selection then reads plain globals, which
# torch.compile traces without guards on caches.
_EXTENSION = _try_import("memkernels._C")
_TRITON = _try_import("triton")


def extension() -> tuple[Optional[types.ModuleType], str]:
    """(memkernels._C or None, why it is missing)."""
    return _EXTENSION


def cpu_cached_bytes() -> int:
    """Bytes of host memory the CPU kernels keep mapped for reuse: freed
    outputs, gradients and saved probabilities of 4 MiB and more, at most
    2 GiB (docs/design.md, "The write keeps its probabilities"). Outside
    PyTorch's memory accounting. 0 without the extension."""
    ext = _EXTENSION[0]
    return int(ext.cpu_cached_bytes()) if ext is not None else 0


def empty_cpu_cache() -> int:
    """Unmaps the host buffers the CPU kernels keep for reuse (those no tensor
    holds); returns the bytes released. 0 without the extension."""
    ext = _EXTENSION[0]
    return int(ext.cpu_empty_cache()) if ext is not None else 0


def triton_available() -> bool:
    return _TRITON[0] is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend `name` can run on tensors on `device`, and if not, why."""
    ext, why = extension()
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {device}"
        return (ext is not None), f"memkernels._C is not importable ({why}); {REBUILD_HINT}"
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {device}"
        if ext is None:
            return False, f"memkernels._C is not importable ({why}); {REBUILD_HINT}"
        return bool(ext.with_cuda), f"memkernels._C was built without CUDA; {REBUILD_HINT} on a machine with nvcc and a CUDA torch"
    if name == "triton":
        if not triton_available():
            return False, "triton is not installed (`pip install triton`)"
        if device.type == "cuda" or triton_interpreted():
            return True, ""
        return False, f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


@functools.lru_cache(maxsize=None)
def _warn_fallback(why: str) -> None:
    warnings.warn(f"memkernels: falling back to the reference backend: {why}", RuntimeWarning,
                  stacklevel=4)


def resolve(requested: Optional[str], device: torch.device) -> str:
    """Turns backend=None/'auto'/a name into a backend that can run here."""
    name = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        source = "backend" if requested is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        ok, why = available(name, device)
        if not ok:
            raise RuntimeError(f"memkernels backend {name!r} is unavailable: {why}")
        return name
    preference = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    for candidate in preference:
        ok, why = available(candidate, device)
        if ok:
            return candidate
    _warn_fallback(why)
    return "reference"


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on tensors on `device` in this process."""
    dev = torch.device(device)
    return [b for b in BACKENDS[1:] if available(b, dev)[0]]


def kernels(name: str, dtype: Optional[torch.dtype] = None):
    """The module holding backend `name`'s read/write forward/backward (for
    tensors of `dtype`: refused where that backend would compute garbage)."""
    if name == "triton" and dtype == torch.bfloat16 and triton_interpreted():
        raise TypeError("bfloat16 on the triton backend under TRITON_INTERPRET=1 is not "
                        "computed correctly by the interpreter: use float16/float32/float64, "
                        "another backend, or a GPU")
    if name == "reference":
        return reference
    if name == "cpu":
        return extension()[0]
    if name == "cuda":
        return extension()[0].cuda
    if name == "triton":
        # optional dependency: memkernels.ops.triton imports triton
        return importlib.import_module("memkernels.ops.triton")
    raise ValueError(f"no kernels for backend {name!r}")
