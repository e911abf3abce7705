"""The public ops: torch.library custom ops (one per kernel direction), the
autograd.Functions that tie forward to backward, and memory_read /
memory_write, which check arguments and pick a backend.

Custom ops keep torch.compile(fullgraph=True) free of graph breaks: the
compiler sees an opaque op with a fake (shape-only) implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memkernels.ops import backend as _backend
from memkernels.ops import reference
from memkernels.ops.checks import check_read, check_read_grads, check_write, check_write_grads
from memkernels.ops.nvtx import nvtx_range


_stat_dtype = reference.stat_dtype


def default_scale(scale: Optional[float], x: Tensor) -> float:
    """The ops' score scale: `scale`, or 1/sqrt(Dh) of x [..., Dh] when None."""
    return reference.default_scale(x.shape[-1]) if scale is None else float(scale)


# --- custom ops -------------------------------------------------------------
# Each op checks its arguments (3-6 us in Python, beside ~100 us of the custom-op
# dispatch on the CPU), so a direct torch.ops.memkernels call gets the public
# API's errors on every backend. memory_read / memory_write check once and, at
# inference in eager mode, call _read_fwd / _write_fwd below directly.

def _read_fwd(q: Tensor, k: Tensor, v: Tensor, slot_mask: Optional[Tensor], scale: float,
              backend: str) -> tuple[Tensor, Tensor]:
    with nvtx_range(f"memkernels.read_fwd[{backend}]"):
        return _backend.kernels(backend, q.dtype).read_fwd(q, k, v, slot_mask, scale)


@torch.library.custom_op("memkernels::read_fwd", mutates_args=())
def read_fwd(q: Tensor, k: Tensor, v: Tensor, slot_mask: Optional[Tensor], scale: float,
             backend: str) -> tuple[Tensor, Tensor]:
    return _read_fwd(q, k, v, slot_mask, check_read(q, k, v, scale, slot_mask), backend)


@read_fwd.register_fake
def _(q, k, v, slot_mask, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_stat_dtype(q))


@torch.library.custom_op("memkernels::read_bwd", mutates_args=())
def read_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             slot_mask: Optional[Tensor], scale: float,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    scale = check_read(q, k, v, scale, slot_mask)
    check_read_grads(dout, q, out, lse)
    with nvtx_range(f"memkernels.read_bwd[{backend}]"):
        return _backend.kernels(backend, q.dtype).read_bwd(dout, q, k, v, out, lse, slot_mask,
                                                           scale)


@read_bwd.register_fake
def _(dout, q, k, v, out, lse, slot_mask, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _write_fwd(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor, forget_logit: Tensor,
               input_logit: Tensor, token_mask: Optional[Tensor], scale: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with nvtx_range(f"memkernels.write_fwd[{backend}]"):
        kernels = _backend.kernels(backend, mem.dtype)
        return kernels.write_fwd(mem, q_slots, k_tok, v_tok, forget_logit, input_logit,
                                 token_mask, scale)


@torch.library.custom_op("memkernels::write_fwd", mutates_args=())
def write_fwd(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor, forget_logit: Tensor,
              input_logit: Tensor, token_mask: Optional[Tensor], scale: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    scale = check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale, token_mask)
    return _write_fwd(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale,
                      backend)


@write_fwd.register_fake
def _(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale, backend):
    stat = _stat_dtype(mem)
    return (torch.empty_like(mem), torch.empty_like(mem, dtype=stat),
            mem.new_empty(mem.shape[:3], dtype=stat))


@torch.library.custom_op("memkernels::write_bwd", mutates_args=())
def write_bwd(dnew: Tensor, mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor,
              forget_logit: Tensor, input_logit: Tensor, token_mask: Optional[Tensor],
              upd: Tensor, lse: Tensor, scale: float,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    scale = check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale, token_mask)
    check_write_grads(dnew, mem, upd, lse)
    with nvtx_range(f"memkernels.write_bwd[{backend}]"):
        kernels = _backend.kernels(backend, mem.dtype)
        return kernels.write_bwd(dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit,
                                 token_mask, upd, lse, scale)


@write_bwd.register_fake
def _(dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, upd, lse, scale,
      backend):
    return tuple(torch.empty_like(x) for x in (mem, q_slots, k_tok, v_tok, forget_logit,
                                               input_logit))


# --- autograd ---------------------------------------------------------------

class MemoryReadFunction(torch.autograd.Function):
    """Drop-in autograd.Function: apply(q, k, v, slot_mask=None, scale=None,
    backend="auto") -> (out, lse), the defaults of memory_read. lse is not
    differentiable. Its custom ops check the arguments, with memory_read's errors."""

    @staticmethod
    def forward(q, k, v, slot_mask=None, scale=None, backend="auto"):
        return torch.ops.memkernels.read_fwd(q, k, v, slot_mask, default_scale(scale, q),
                                             _backend.resolve(backend, q.device))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, slot_mask, scale, backend = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, slot_mask)
        ctx.scale, ctx.backend = default_scale(scale, q), _backend.resolve(backend, q.device)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, slot_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.memkernels.read_bwd(dout, q, k, v, out, lse, slot_mask,
                                                   ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None


class MemoryWriteFunction(torch.autograd.Function):
    """Drop-in autograd.Function: apply(mem, q_slots, k_tok, v_tok,
    forget_logit, input_logit, token_mask=None, scale=None, backend="auto")
    -> (new_mem, upd, lse), the defaults of memory_write; upd and lse are not
    differentiable. Its custom ops check the arguments, with memory_write's errors."""

    @staticmethod
    def forward(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask=None,
                scale=None, backend="auto"):
        return torch.ops.memkernels.write_fwd(
            mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask,
            default_scale(scale, mem), _backend.resolve(backend, mem.device))

    @staticmethod
    def setup_context(ctx, inputs, output):
        mem, q_slots, k_tok, v_tok, f, i, token_mask, scale, backend = inputs
        _, upd, lse = output
        ctx.save_for_backward(mem, q_slots, k_tok, v_tok, f, i, token_mask, upd, lse)
        ctx.scale, ctx.backend = default_scale(scale, mem), _backend.resolve(backend, mem.device)
        ctx.mark_non_differentiable(upd, lse)

    @staticmethod
    def backward(ctx, dnew, _dupd, _dlse):
        grads = torch.ops.memkernels.write_bwd(dnew, *ctx.saved_tensors, ctx.scale, ctx.backend)
        return (*grads, None, None, None)


# --- public API -------------------------------------------------------------

def _inference_only(*tensors: Tensor) -> bool:
    """True in eager mode when no gradient will be asked for: the kernel is
    then called directly, skipping autograd.Function.apply and the custom-op
    dispatcher (about 110 us per call on the CPU, more than a decode-step
    read of a small bank). torch.compile still sees the custom ops."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def memory_read(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                slot_mask: Optional[Tensor] = None, return_lse: bool = False,
                backend: Optional[str] = None):
    """Token queries attend over a slot bank.

    out[b,h,t] = sum_s softmax_s(scale * q[b,h,t] . k[h,s]) * v[h,s]

    Args:
        q: [B, H, T, Dh] queries.
        k, v: the slot bank, [H, S, Dh] shared by the batch or [B, H, S, Dh].
        scale: score scale, default 1/sqrt(Dh).
        slot_mask: bool [S] or [B, S], True marks a valid slot. A query with
            no valid slot reads zeros (lse = -inf) and gets zero gradients.
        return_lse: also return the log-sum-exp per query, [B, H, T]
            (float32; float64 for float64 inputs), not differentiable.
        backend: 'auto' (default, or $MEMKERNELS_BACKEND), 'reference',
            'cpu', 'triton' or 'cuda'.
    """
    scale = check_read(q, k, v, scale, slot_mask)
    name = _backend.resolve(backend, q.device)
    if name == "reference":
        out, lse = reference.memory_read(q, k, v, scale=scale, slot_mask=slot_mask, return_lse=True)
    elif _inference_only(q, k, v):
        out, lse = _read_fwd(q, k, v, slot_mask, scale, name)
    else:
        out, lse = MemoryReadFunction.apply(q, k, v, slot_mask, scale, name)
    return (out, lse) if return_lse else out


def memory_write(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor,
                 forget_logit: Tensor, input_logit: Tensor, *, scale: Optional[float] = None,
                 token_mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Slots attend over new tokens; the result is blended into the bank.

    upd = softmax_t(scale * q_slots . k_tok) v_tok
    new_mem = sigmoid(forget_logit) * mem + sigmoid(input_logit) * tanh(upd)

    Args:
        mem, q_slots: [B, H, S, Dh]. k_tok, v_tok: [B, H, T, Dh].
        forget_logit, input_logit: [B, H, S, 1] or [B, H, S, Dh].
        token_mask: bool [B, T], True marks a real token; a row with none
            leaves upd = 0 for its slots.
        backend: as for memory_read.
    Returns a new bank; `mem` is never modified.
    """
    scale = check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale, token_mask)
    name = _backend.resolve(backend, mem.device)
    if name == "reference":
        return reference.memory_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit,
                                      scale=scale, token_mask=token_mask)
    args = (mem, q_slots, k_tok, v_tok, forget_logit, input_logit)
    if _inference_only(*args):
        return _write_fwd(*args, token_mask, scale, name)[0]
    new_mem, _, _ = MemoryWriteFunction.apply(*args, token_mask, scale, name)
    return new_mem
