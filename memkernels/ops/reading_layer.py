"""The fused reading layer: one memory reading layer at inference as one op
(norm, query projection or MLP, read over the bank, output projection and
the residual add), the decode hot path of an attached memory.

The same ladder as the read and write ops: a torch.library custom op
(memkernels::reading_layer) with a fake implementation, so torch.compile
sees one opaque op, and reading_layer(), which checks the arguments and
picks the kernel (without gradients on the CPU, the kernel first: the
extension checks its arguments itself, and the Python checks run only to
name what it refused). The math is reference.reading_layer; the CPU kernel is
memkernels._C.reader_fwd (csrc/cpu/reader_cpu.cpp). Inference only: no
backward (training composes memory_read, which has one).

reading_layer_plan() binds every operand but the hidden state once, for a
decode loop: on the CPU kernel it is memkernels._C.ReaderPlan, whose call
converts and checks one or two tensors where reading_layer's converts
eighteen arguments and checks them all (docs/design.md, "The decode hot path").
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from memkernels.ops import backend as _backend
from memkernels.ops import reference
from memkernels.ops.checks import _scale, check_reading_layer
from memkernels.ops.nvtx import nvtx_enabled, nvtx_range

# key/value dtypes the CPU kernel reads beside float32 hidden states (bf16, or
# int8 with a float32 scale per slot)
NARROW_KV_DTYPES = (torch.bfloat16, torch.int8)
_HIDDEN_DTYPES = (torch.float32, torch.float64)
_INF = float("inf")


def reads_dtypes(hidden_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the CPU kernel takes hidden states of hidden_dtype (float32 or
    float64) with keys/values of kv_dtype (the same, or bf16/int8 for float32)."""
    return hidden_dtype in _HIDDEN_DTYPES and (kv_dtype == hidden_dtype or (
        kv_dtype in NARROW_KV_DTYPES and hidden_dtype == torch.float32))


def cpu_kernel(hidden: Tensor, kv_dtype: torch.dtype,
               backend: Optional[str] = None) -> Optional[Callable[..., Tensor]]:
    """memkernels._C.reader_fwd when it runs this layer: CPU tensors, dtypes
    it reads (reads_dtypes), the cpu backend chosen, the extension built; else None."""
    if not (hidden.device.type == "cpu" and reads_dtypes(hidden.dtype, kv_dtype)
            and _backend.resolve(backend, hidden.device) == "cpu"):
        return None
    return getattr(_backend.extension()[0], "reader_fwd", None)


def _run(hidden, query_w, keys, values, out_w, eps, scale, key_scale, value_scale, mlp_w, mlp_b,
         query_b, unit_queries, context, context_w, centroids, cluster_starts, probes,
         backend) -> Tensor:
    args = (hidden, query_w, keys, values, out_w, eps, scale, key_scale, value_scale, mlp_w, mlp_b,
            query_b, unit_queries, context, context_w, centroids, cluster_starts, probes)
    with nvtx_range(f"memkernels.reading_layer[{backend}]"):
        if backend == "cpu":
            return _backend.extension()[0].reader_fwd(*args)
        return reference.reading_layer(*args)


# The fast path's constants, read once (the extension is imported once, at
# load: backend.extension()): each Python-level step of a decode step's call
# counts, as the step's other weights evict the interpreter's data.
_READER_FWD = getattr(_backend.extension()[0], "reader_fwd", None)
_FAST_BACKENDS = (None, "auto", "cpu")


def _cpu_kernel_first(hidden, query_w, keys, values, out_w, eps, scale, key_scale, value_scale,
                      mlp_w, mlp_b, query_b, unit_queries, context, context_w, centroids,
                      cluster_starts, probes, backend) -> Optional[Tensor]:
    """The CPU kernel's output, called before the Python checks where it is
    sure to be chosen (CPU float hidden states, kv of a dtype it reads, the
    cpu backend, no gradients), else None. The extension checks every
    argument itself before any kernel runs; when it refuses them, the Python
    checks run to raise their message naming the argument (and the
    extension's error stands where they pass). The same choice as
    cpu_kernel(), in builtins and attribute reads: through cpu_kernel (the
    backend resolution and its messages), the checks' helpers and a null
    context it took 16-27 us a call over the kernel's 150-300 with the inputs
    coming from DRAM, now 10-12 (docs/log.md)."""
    if _READER_FWD is None or backend not in _FAST_BACKENDS or not isinstance(hidden, Tensor) \
            or not isinstance(keys, Tensor) or type(eps) not in (float, int) or not eps >= 0:
        return None
    if backend is None:  # $MEMKERNELS_BACKEND, read on every call as resolve() does
        named = os.environ.get(_backend.ENV_VAR)
        if named is not None and named not in ("auto", "cpu"):
            return None
    if hidden.device.type != "cpu" or not reads_dtypes(hidden.dtype, keys.dtype) or keys.dim() < 1:
        return None
    if type(scale) is not float or not abs(scale) < _INF:  # None, an int, NaN, inf
        scale = _scale(scale, keys.shape[-1])  # raises as the full checks would
    args = (hidden, query_w, keys, values, out_w, float(eps), scale, key_scale, value_scale,
            mlp_w, mlp_b, query_b, bool(unit_queries), context, context_w, centroids,
            cluster_starts, probes)
    try:
        if nvtx_enabled():
            with nvtx_range("memkernels.reading_layer[cpu]"):
                return _READER_FWD(*args)
        return _READER_FWD(*args)
    except (RuntimeError, TypeError, ValueError) as refused:
        check_reading_layer(hidden, query_w, keys, values, out_w, eps, scale, key_scale,
                            value_scale, mlp_w, mlp_b, query_b, context, context_w, centroids,
                            cluster_starts, probes)
        raise refused


@torch.library.custom_op("memkernels::reading_layer", mutates_args=())
def reading_layer_op(hidden: Tensor, query_w: Tensor, keys: Tensor, values: Tensor, out_w: Tensor,
                     eps: float, scale: float, key_scale: Optional[Tensor],
                     value_scale: Optional[Tensor], mlp_w: Optional[Tensor],
                     mlp_b: Optional[Tensor], query_b: Optional[Tensor], unit_queries: bool,
                     context: Optional[Tensor], context_w: Optional[Tensor],
                     centroids: Optional[Tensor], cluster_starts: Optional[Tensor], probes: int,
                     backend: str) -> Tensor:
    # checked here too, so a direct torch.ops.memkernels call gets reading_layer's errors
    # (on a GPU without reading the index's cluster starts back: no sync in a compiled graph)
    scale = check_reading_layer(hidden, query_w, keys, values, out_w, eps, scale, key_scale,
                                value_scale, mlp_w, mlp_b, query_b, context, context_w,
                                centroids, cluster_starts, probes,
                                check_values=not isinstance(hidden, Tensor)
                                or hidden.device.type == "cpu")
    if backend not in ("cpu", "reference"):
        raise ValueError(f"the reading_layer op runs on backend 'cpu' or 'reference', got "
                         f"{backend!r}")
    return _run(hidden, query_w, keys, values, out_w, eps, scale, key_scale, value_scale, mlp_w,
                mlp_b, query_b, unit_queries, context, context_w, centroids, cluster_starts,
                probes, backend)


@reading_layer_op.register_fake
def _(hidden, *args):
    return torch.empty_like(hidden)


def _layer_backend(hidden: Tensor, kv_dtype: torch.dtype, backend: Optional[str]) -> str:
    """'cpu' or 'reference': what runs the layer on hidden states like `hidden`
    with keys of kv_dtype. Raises for a GPU backend named, or 'cpu' named where
    its kernel does not read these dtypes."""
    if backend in ("triton", "cuda"):
        raise ValueError(f"reading_layer has no {backend} kernel: backend must be 'auto', 'cpu' "
                         f"or 'reference' (on a GPU, compose memory_read)")
    name = _backend.resolve(backend, hidden.device)
    if name == "cpu" and cpu_kernel(hidden, kv_dtype, "cpu") is not None:
        return "cpu"
    if name == "cpu" and backend is not None and backend != "auto":
        raise ValueError(f"the cpu reading_layer kernel takes float32/float64 hidden states "
                         f"with keys of their dtype (or bf16/int8 for float32), got hidden "
                         f"{hidden.dtype}, keys {kv_dtype}")
    return "reference"  # auto on a GPU too: the reference composes there


def reading_layer(hidden: Tensor, query_w: Tensor, keys: Tensor, values: Tensor, out_w: Tensor, *,
                  eps: float = 1e-6, scale: Optional[float] = None,
                  key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
                  mlp_w: Optional[Tensor] = None, mlp_b: Optional[Tensor] = None,
                  query_b: Optional[Tensor] = None, unit_queries: bool = False,
                  context: Optional[Tensor] = None, context_w: Optional[Tensor] = None,
                  centroids: Optional[Tensor] = None, cluster_starts: Optional[Tensor] = None,
                  probes: int = 0, backend: Optional[str] = None) -> Tensor:
    """One reading layer at inference: hidden + read(query(rms_norm(hidden))) @ out_w
    (the math, shapes and options: memkernels.ops.reference.reading_layer).

    hidden [B, T, C]; query_w [H * Dh, C] (or [H * Dh, M] after an MLP of
    width M: mlp_w [M, C], mlp_b [M], with a context [B, T, C] also
    context_w [M, C]); keys/values [Hk, S, Dh] or [B, Hk, S, Dh], H a
    multiple of Hk; out_w [H * Dh, C]; scale default 1/sqrt(Dh).
    backend: 'auto' (the CPU kernel where it applies, else the reference),
    'cpu' or 'reference'; the GPU backends have no fused reading layer
    (compose memory_read there). No gradients: raises when one is asked for.
    """
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        out = _cpu_kernel_first(hidden, query_w, keys, values, out_w, eps, scale, key_scale,
                                value_scale, mlp_w, mlp_b, query_b, unit_queries, context,
                                context_w, centroids, cluster_starts, probes, backend)
        if out is not None:
            return out
    scale = check_reading_layer(hidden, query_w, keys, values, out_w, eps, scale, key_scale,
                                value_scale, mlp_w, mlp_b, query_b, context, context_w,
                                centroids, cluster_starts, probes)
    name = _layer_backend(hidden, keys.dtype, backend)
    tensors = [t for t in (hidden, query_w, keys, values, out_w, mlp_w, mlp_b, query_b, context,
                           context_w) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError("reading_layer is inference only (no backward): call it under "
                         "torch.no_grad(), or compose memory_read for training")
    args = (hidden, query_w, keys, values, out_w, float(eps), scale, key_scale, value_scale,
            mlp_w, mlp_b, query_b, bool(unit_queries), context, context_w, centroids,
            cluster_starts, int(probes), name)
    if torch.compiler.is_compiling():
        return torch.ops.memkernels.reading_layer(*args)
    return _run(*args)  # eager: skip the dispatcher (~100 us, more than a small read)


class _ComposedPlan:
    """reading_layer_plan where the CPU kernel does not run the layer: reading_layer
    with the bound operands (checked at each call, as reading_layer checks them)."""

    def __init__(self, args: tuple, options: dict):
        self._args, self._options = args, options

    def __call__(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        return reading_layer(hidden, *self._args, context=context, **self._options)

    def __repr__(self) -> str:
        return f"memkernels reading-layer plan (backend {self._options['backend']!r})"


def reading_layer_plan(query_w: Tensor, keys: Tensor, values: Tensor, out_w: Tensor, *,
                       eps: float = 1e-6, scale: Optional[float] = None,
                       key_scale: Optional[Tensor] = None, value_scale: Optional[Tensor] = None,
                       mlp_w: Optional[Tensor] = None, mlp_b: Optional[Tensor] = None,
                       query_b: Optional[Tensor] = None, unit_queries: bool = False,
                       context_w: Optional[Tensor] = None, centroids: Optional[Tensor] = None,
                       cluster_starts: Optional[Tensor] = None, probes: int = 0,
                       backend: Optional[str] = None) -> Callable[..., Tensor]:
    """reading_layer with every operand but the hidden state bound once:
    plan(hidden, context=None) equals reading_layer(hidden, query_w, keys,
    values, out_w, ..., context=context) (the same arguments, checked here
    with reading_layer's messages, the hidden states' dtype and device being
    query_w's; a context goes with each call where context_w is given). The
    backend is chosen here, $MEMKERNELS_BACKEND read here, not per call.

    For a decode loop, which calls one layer on a new hidden state per token:
    on the CPU kernel (CPU tensors of a dtype it reads, backend 'auto' or
    'cpu') the plan is memkernels._C.ReaderPlan, its call one C++ call that
    checks the hidden state (and context) alone and raises RuntimeError
    naming it. It holds the tensors themselves: an in-place update (a bank
    written in place, an optimizer step) shows in its next call, a `.data =`
    on a caller's tensor does not; a non-contiguous operand is copied once
    here, and cluster_starts always, so a change to those needs a new plan.
    Elsewhere the plan calls reading_layer (the reference), whose errors are
    ValueErrors. Inference only, as reading_layer, checked at each call;
    under torch.compile call reading_layer, which is one op there."""
    if not isinstance(query_w, Tensor):
        raise TypeError(f"query_w must be a torch.Tensor, got {type(query_w).__name__}")
    if not isinstance(out_w, Tensor) or out_w.dim() != 2 or out_w.shape[1] < 1:
        got = tuple(out_w.shape) if isinstance(out_w, Tensor) else type(out_w).__name__
        raise ValueError(f"out_w must be a [H * Dh, C] tensor with C >= 1, got {got}")
    rows = keys.shape[0] if isinstance(keys, Tensor) and keys.dim() == 4 else 1
    # a batch of no tokens stands for the hidden states to come: every check but theirs
    stand_in = torch.empty(rows, 0, out_w.shape[1], dtype=query_w.dtype, device=query_w.device)
    context = stand_in if context_w is not None else None
    scale = check_reading_layer(stand_in, query_w, keys, values, out_w, eps, scale, key_scale,
                                value_scale, mlp_w, mlp_b, query_b, context, context_w,
                                centroids, cluster_starts, probes, ref_name="query_w")
    name = _layer_backend(stand_in, keys.dtype, backend)
    options = dict(eps=float(eps), scale=scale, key_scale=key_scale, value_scale=value_scale,
                   mlp_w=mlp_w, mlp_b=mlp_b, query_b=query_b, unit_queries=bool(unit_queries),
                   context_w=context_w, centroids=centroids, cluster_starts=cluster_starts,
                   probes=int(probes))
    plan = getattr(_backend.extension()[0], "ReaderPlan", None)  # None: an older build
    if name != "cpu" or plan is None:
        return _ComposedPlan((query_w, keys, values, out_w),
                             {**options, "backend": name if plan is None else "reference"})
    return plan(query_w, keys, values, out_w, **options)
