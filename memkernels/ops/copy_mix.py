"""The copy rule's mixture of next-token distributions as one op: the
memory's (its read's weights over stored tokens, as logits against the LM
head's rows at unit length) and the LM's own, mixed by a gate (the kNN-LM /
Memory Decoder form; memkernels.memory.copy uses it).

The math is reference.copy_mix. At inference on the CPU, a decode step's
few rows run as one call of memkernels._C.copy_mix_fwd
(csrc/cpu/copy_mix_cpu.cpp): the ~15 ATen ops of the reference cost a small
host LM a tenth of its step. Everything else (gradients, other devices,
many rows, where ATen's GEMM is faster, torch.compile) runs the reference.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from memkernels.ops import backend as _backend
from memkernels.ops import reference
from memkernels.ops.nvtx import nvtx_range

# up to this many rows (B * T) the kernel's register-blocked GEMV runs; above,
# ATen's GEMM in the reference is faster
KERNEL_MAX_ROWS = 16

Scalar = Union[float, Tensor]


def _check(hidden: Tensor, logits: Tensor, read: Tensor, units: Tensor, gate_w: Tensor,
           unit_scale: Optional[Tensor]) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, C], got {tuple(hidden.shape)}")
    B, T, C = hidden.shape
    if logits.dim() != 3 or logits.shape[:2] != (B, T):
        raise ValueError(f"logits must be [B, T, V] = [{B}, {T}, V], got {tuple(logits.shape)}")
    V = logits.shape[-1]
    if C < 1 or V < 1:
        raise ValueError(f"hidden and logits need C >= 1 and V >= 1, got C={C}, V={V}")
    shapes = [("logits", logits, tuple(logits.shape)), ("read", read, (B, T, C)),
              ("units", units, (V, C)), ("gate_w", gate_w, (C,))]
    if unit_scale is not None:
        shapes.append(("unit_scale", unit_scale, (V,)))
    for name, t, shape in shapes:
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device}, got {t.device}")


def cpu_kernel(dtype: torch.dtype, device: torch.device,
               backend: Optional[str] = None) -> Optional[Callable[..., Tensor]]:
    """memkernels._C.copy_mix_fwd where it runs: CPU tensors, all of `dtype`
    float32 or float64, the cpu backend chosen, the extension built; else None.
    (The caller checks the rest: rows <= KERNEL_MAX_ROWS, no gradients.)"""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64) \
            or torch.compiler.is_compiling() or _backend.resolve(backend, device) != "cpu":
        return None
    return getattr(_backend.extension()[0], "copy_mix_fwd", None)


def _kernel(hidden, logits, read, units, gate_w, unit_scale, scalars, backend):
    """The kernel where it runs this call, else None (run the reference)."""
    tensors = [hidden, logits, read, units, gate_w] + ([] if unit_scale is None else [unit_scale])
    if any(t.dtype != hidden.dtype for t in tensors) or \
            hidden.shape[0] * hidden.shape[1] > KERNEL_MAX_ROWS:
        return None
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (*tensors, *scalars)):
        return None
    return cpu_kernel(hidden.dtype, hidden.device, backend)


def copy_mix(hidden: Tensor, logits: Tensor, read: Tensor, units: Tensor, gate_w: Tensor,
             eps: float, sharpness: Scalar, gate_bias: Scalar, gate_confidence: Scalar,
             unit_scale: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """log p [B, T, V] (float32 at least) of

        g = gate_bias + gate_confidence |read|^2 + rms_norm(hidden, eps) . gate_w
        m = sharpness (read @ units^T) * unit_scale          (unit_scale None: 1)
        p = sigmoid(g) softmax(m) + sigmoid(-g) softmax(logits)

    hidden, read [B, T, C]; logits [B, T, V]; units [V, C] (the LM head's
    weight, with unit_scale [V] = 1 / its row lengths, or rows already of unit
    length); gate_w [C] (the norm's weight folded in); the scalars numbers or
    0-d tensors. backend: as memory_read's (None: $MEMKERNELS_BACKEND, else
    the best here)."""
    _check(hidden, logits, read, units, gate_w, unit_scale)
    scalars = (sharpness, gate_bias, gate_confidence)
    kernel = _kernel(hidden, logits, read, units, gate_w, unit_scale, scalars, backend)
    if kernel is not None:
        with nvtx_range("memkernels.copy_mix[cpu]"):
            return kernel(hidden, logits, read, units, gate_w, float(eps),
                          *(float(s) for s in scalars), unit_scale)
    return reference.copy_mix(hidden, logits, read, units, gate_w, eps, *scalars, unit_scale)
