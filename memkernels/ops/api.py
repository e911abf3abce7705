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
from torch.autograd import forward_ad

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


# The read's kept probabilities are capped: past this many bytes the backward
# recomputes them (a large bank's B*H*T*S floats would outweigh the ~20% of a
# read's training step they save; docs/design.md, "The read keeps its probabilities").
READ_PROBS_MAX_BYTES = 1 << 30


def read_probs_shapes(q: Tensor, k: Tensor, backend: str, save_probs: bool) -> tuple:
    """The shapes of read_fwd_keeping_probs's probs and probs_max: [G, blocks,
    M, columns] and [G, blocks, M] on the CPU backend when save_probs and they
    fit READ_PROBS_MAX_BYTES, else ((0,), (0,)). G, M: the kernels' groups and
    rows (H and B*T for a shared bank [H, S, Dh], B*H and T for one a batch
    row); blocks: S over _C.READ_PROBS_BLOCK_KEYS keys a block, rounded up;
    columns: a block's keys rounded up to _C.WRITE_PROBS_COLUMN_MULTIPLE. Plain
    arithmetic on the sizes, so torch.compile keeps them symbolic."""
    B, H, T = q.shape[:3]
    S = k.shape[-2]
    shared = k.dim() == 3
    G, M = (H, B * T) if shared else (B * H, T)
    if not save_probs or backend != "cpu" or G * M * S == 0:
        return (0,), (0,)
    ext = _backend.extension()[0]
    block, multiple = ext.READ_PROBS_BLOCK_KEYS, ext.WRITE_PROBS_COLUMN_MULTIPLE
    blocks = (S + block - 1) // block
    columns = (min(S, block) + multiple - 1) // multiple * multiple
    elt = 8 if _stat_dtype(q) == torch.float64 else 4
    if G * blocks * M * columns * elt > READ_PROBS_MAX_BYTES:
        return (0,), (0,)
    return (G, blocks, M, columns), (G, blocks, M)


@torch.library.custom_op("memkernels::read_fwd_keeping_probs", mutates_args=())
def read_fwd_keeping_probs(q: Tensor, k: Tensor, v: Tensor, slot_mask: Optional[Tensor],
                           scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """read_fwd that also returns what the CPU backward reads in place of
    recomputing the probabilities (probs, probs_max: read_probs_shapes); on
    other backends, or past READ_PROBS_MAX_BYTES, those are empty."""
    scale = check_read(q, k, v, scale, slot_mask)
    if read_probs_shapes(q, k, backend, True)[0] == (0,):
        out, lse = _read_fwd(q, k, v, slot_mask, scale, backend)
        empty = q.new_empty((0,), dtype=_stat_dtype(q))
        return out, lse, empty, empty.clone()
    with nvtx_range("memkernels.read_fwd_keeping_probs[cpu]"):
        return _backend.extension()[0].read_fwd_keeping_probs(q, k, v, slot_mask, scale)


@read_fwd_keeping_probs.register_fake
def _(q, k, v, slot_mask, scale, backend):
    probs, probs_max = read_probs_shapes(q, k, backend, True)
    stat = _stat_dtype(q)
    return (torch.empty_like(q), q.new_empty(q.shape[:3], dtype=stat),
            q.new_empty(probs, dtype=stat), q.new_empty(probs_max, dtype=stat))


@torch.library.custom_op("memkernels::read_bwd", mutates_args=())
def read_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             slot_mask: Optional[Tensor], scale: float,
             backend: str, probs: Optional[Tensor] = None, probs_max: Optional[Tensor] = None,
             ) -> tuple[Tensor, Tensor, Tensor]:
    scale = check_read(q, k, v, scale, slot_mask)
    check_read_grads(dout, q, out, lse)
    with nvtx_range(f"memkernels.read_bwd[{backend}]"):
        kernels = _backend.kernels(backend, q.dtype)
        args = (dout, q, k, v, out, lse, slot_mask, scale)
        if backend == "cpu":
            return kernels.read_bwd(*args, probs, probs_max)
        return kernels.read_bwd(*args)


@read_bwd.register_fake
def _(dout, q, k, v, out, lse, slot_mask, scale, backend, probs=None, probs_max=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _write_fwd(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor, forget_logit: Tensor,
               input_logit: Tensor, token_mask: Optional[Tensor], scale: float,
               backend: str, save_probs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(new_mem, upd, lse, probs): probs are the attention probabilities the CPU
    kernels keep for their backward when save_probs (see saved_probs_shape), else empty."""
    with nvtx_range(f"memkernels.write_fwd[{backend}]"):
        kernels = _backend.kernels(backend, mem.dtype)
        args = (mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale)
        if backend == "cpu":
            return kernels.write_fwd(*args, save_probs)
        return (*kernels.write_fwd(*args), _no_probs(mem))


def _no_probs(mem: Tensor) -> Tensor:
    return mem.new_empty((0,), dtype=_stat_dtype(mem))


def saved_probs_shape(mem: Tensor, k_tok: Tensor, backend: str, save_probs: bool) -> tuple:
    """The shape of write_fwd's saved probabilities: [B, H, S, columns] on the
    CPU backend when save_probs and T <= _C.WRITE_PROBS_MAX_TOKENS (one key
    block: the forward's probabilities are final there; the columns are T
    rounded up to _C.WRITE_PROBS_COLUMN_MULTIPLE, those past T scratch), else
    (0,). Plain arithmetic on the sizes, so torch.compile keeps T symbolic.
    docs/design.md, "The write keeps its probabilities"."""
    B, H, S = mem.shape[:3]
    T = k_tok.shape[2]
    ext = _backend.extension()[0]
    if not save_probs or backend != "cpu" or B * H == 0 or T > ext.WRITE_PROBS_MAX_TOKENS:
        return (0,)
    multiple = ext.WRITE_PROBS_COLUMN_MULTIPLE
    return (B, H, S, (T + multiple - 1) // multiple * multiple)


@torch.library.custom_op("memkernels::write_fwd", mutates_args=())
def write_fwd(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor, forget_logit: Tensor,
              input_logit: Tensor, token_mask: Optional[Tensor], scale: float,
              backend: str, save_probs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    scale = check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale, token_mask)
    return _write_fwd(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale,
                      backend, save_probs)


@write_fwd.register_fake
def _(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale, backend,
      save_probs=False):
    stat = _stat_dtype(mem)
    return (torch.empty_like(mem), torch.empty_like(mem, dtype=stat),
            mem.new_empty(mem.shape[:3], dtype=stat),
            mem.new_empty(saved_probs_shape(mem, k_tok, backend, save_probs), dtype=stat))


@torch.library.custom_op("memkernels::write_bwd", mutates_args=())
def write_bwd(dnew: Tensor, mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor,
              forget_logit: Tensor, input_logit: Tensor, token_mask: Optional[Tensor],
              upd: Tensor, lse: Tensor, scale: float,
              backend: str, probs: Optional[Tensor] = None,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    scale = check_write(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, scale, token_mask)
    check_write_grads(dnew, mem, upd, lse)
    with nvtx_range(f"memkernels.write_bwd[{backend}]"):
        kernels = _backend.kernels(backend, mem.dtype)
        args = (dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, upd,
                lse, scale)
        if backend == "cpu":
            return kernels.write_bwd(*args, probs)
        return kernels.write_bwd(*args)


@write_bwd.register_fake
def _(dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, upd, lse, scale,
      backend, probs=None):
    return tuple(torch.empty_like(x) for x in (mem, q_slots, k_tok, v_tok, forget_logit,
                                               input_logit))


def _vmap_by_instance(op) -> None:
    """Registers a vmap rule for a custom op that runs its kernel once per
    vmapped instance and stacks the results (torch.func.vmap, jacrev,
    per-sample gradients). The kernels take plain tensors only; folding the
    vmapped dimension into the batch would be faster where the layouts allow,
    but a shared bank differentiated per instance is not one read of the
    folded batch, so the loop is the rule that is right for every layout."""
    def rule(info, in_dims, *args, **kwargs):
        if info.batch_size == 0:  # no instance to run: one's shapes, from the fake op on meta
            one = [a if d is None else torch.empty(a.shape[:d] + a.shape[d + 1:], dtype=a.dtype)
                   for a, d in zip(args, in_dims)]
            meta = [a.to("meta") if isinstance(a, Tensor) else a for a in one]
            device = next(a.device for a in args if isinstance(a, Tensor))
            shapes = op(*meta, **kwargs)
            return (tuple(torch.empty((0, *r.shape), dtype=r.dtype, device=device) for r in shapes),
                    (0,) * len(shapes))
        results = []
        for i in range(info.batch_size):
            picked = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]
            results.append(op(*picked, **kwargs))
        stacked = tuple(torch.stack(parts) for parts in zip(*results))
        return stacked, (0,) * len(stacked)

    op.register_vmap(rule)


for _op in (read_fwd, read_fwd_keeping_probs, read_bwd, write_fwd, write_bwd):
    _vmap_by_instance(_op)


# --- autograd ---------------------------------------------------------------

class _NoSecondDerivative(torch.autograd.Function):
    """apply(public, n, *grads_then_sources) -> the n gradients unchanged, tied
    to the tensors they were computed from, with a backward that refuses: a
    second derivative through a kernel (a grad of a grad, create_graph=True
    then another backward, torch.func.grad of a grad) fails by name, not silently."""

    generate_vmap_rule = True  # copies only: vmap runs the forward as it is

    @staticmethod
    def forward(public, n, *tensors):
        # copies, not views: a caller (a hook, a clip) may change a gradient in place;
        # only create_graph and torch.func pay for them
        return tuple(g.clone() if g is not None else None for g in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.public = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"memkernels: {ctx.public}'s kernels have no second derivative (a grad of a grad, "
            "create_graph=True followed by another backward); "
            f"{ctx.public}(..., backend='reference') differentiates twice")


def _first_order(public: str, grads: tuple, *sources) -> tuple:
    """A backward's gradients, computed by a kernel under no_grad. Where the
    backward is itself being differentiated (grad mode on in it: create_graph,
    torch.func.grad, which differentiates the backward's own ops, needing each
    autograd.Function's setup_context, which the custom ops' generated one
    lacks), tied to their sources through _NoSecondDerivative."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        return _NoSecondDerivative.apply(public, len(grads), *grads, *sources)
    return grads


class MemoryReadFunction(torch.autograd.Function):
    """Drop-in autograd.Function: apply(q, k, v, slot_mask=None, scale=None,
    backend="auto") -> (out, lse), the defaults of memory_read. lse is not
    differentiable. Its custom ops check the arguments, with memory_read's errors."""

    generate_vmap_rule = True  # the custom ops' rules (_vmap_by_instance)

    @staticmethod
    def forward(q, k, v, slot_mask=None, scale=None, backend="auto"):
        return torch.ops.memkernels.read_fwd(q, k, v, slot_mask, default_scale(scale, q),
                                             _backend.resolve(backend, q.device))

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, lse = output
        _save_read(ctx, inputs, out, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        return (*_read_grads(ctx, dout), None, None, None)


def _save_read(ctx, inputs, out, lse, probs=None, probs_max=None):
    q, k, v, slot_mask, scale, backend = inputs[:6]
    ctx.save_for_backward(q, k, v, out, lse, slot_mask, probs, probs_max)
    ctx.scale, ctx.backend = default_scale(scale, q), _backend.resolve(backend, q.device)


def _read_grads(ctx, dout) -> tuple:
    q, k, v, out, lse, slot_mask, probs, probs_max = ctx.saved_tensors
    if dout is None:  # out took no part in what is differentiated
        dout = torch.zeros_like(out)
    kept = probs is not None and probs.numel() > 0
    with torch.no_grad():
        grads = torch.ops.memkernels.read_bwd(dout, q, k, v, out, lse, slot_mask, ctx.scale,
                                              ctx.backend, probs if kept else None,
                                              probs_max if kept else None)
    return _first_order("memory_read", grads, q, k, v, dout)


class _ReadKeepingProbs(torch.autograd.Function):
    """memory_read's training path on the CPU: apply(q, k, v, slot_mask, scale,
    backend) -> (out, lse, probs, probs_max), the last two what the backward
    reads in place of recomputing the probabilities (read_probs_shapes; docs/
    design.md, "The read keeps its probabilities"). Outputs, not
    differentiable, so they reach setup_context (torch.func needs that form)."""

    generate_vmap_rule = True  # the custom ops' rules (_vmap_by_instance)

    @staticmethod
    def forward(q, k, v, slot_mask, scale, backend):
        return torch.ops.memkernels.read_fwd_keeping_probs(q, k, v, slot_mask, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, lse, probs, probs_max = output
        _save_read(ctx, inputs, out, lse, probs, probs_max)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse, probs, probs_max)

    @staticmethod
    def backward(ctx, dout, _dlse, _dprobs, _dprobs_max):
        return (*_read_grads(ctx, dout), None, None, None)


def _save_write(ctx, inputs, upd, lse, probs=None):
    mem, q_slots, k_tok, v_tok, f, i, token_mask, scale, backend = inputs[:9]
    ctx.save_for_backward(mem, q_slots, k_tok, v_tok, f, i, token_mask, upd, lse, probs)
    ctx.scale, ctx.backend = default_scale(scale, mem), _backend.resolve(backend, mem.device)
    # the outputs other than new_mem take no gradient: unmaterialized, their
    # zero gradients cost no fresh [B, H, S, Dh] and [B, H, S, T] tensors a step
    ctx.set_materialize_grads(False)


def _write_grads(ctx, dnew) -> tuple:
    *saved, probs = ctx.saved_tensors
    if dnew is None:  # new_mem took no part in what is differentiated
        dnew = torch.zeros_like(saved[0])
    kept = probs if probs is not None and probs.numel() else None
    with torch.no_grad():
        grads = torch.ops.memkernels.write_bwd(dnew, *saved, ctx.scale, ctx.backend, kept)
    return _first_order("memory_write", grads, *saved[:6], dnew)


class MemoryWriteFunction(torch.autograd.Function):
    """Drop-in autograd.Function: apply(mem, q_slots, k_tok, v_tok,
    forget_logit, input_logit, token_mask=None, scale=None, backend="auto")
    -> (new_mem, upd, lse), the defaults of memory_write; upd and lse are not
    differentiable. Its custom ops check the arguments, with memory_write's
    errors. Its backward recomputes the probabilities (memory_write keeps them
    on the CPU, through _WriteKeepingProbs)."""

    generate_vmap_rule = True  # the custom ops' rules (_vmap_by_instance)

    @staticmethod
    def forward(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask=None,
                scale=None, backend="auto"):
        return torch.ops.memkernels.write_fwd(
            mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask,
            default_scale(scale, mem), _backend.resolve(backend, mem.device), False)[:3]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, upd, lse = output
        _save_write(ctx, inputs, upd, lse)
        ctx.mark_non_differentiable(upd, lse)

    @staticmethod
    def backward(ctx, dnew, _dupd, _dlse):
        return (*_write_grads(ctx, dnew), None, None, None)


class _WriteKeepingProbs(torch.autograd.Function):
    """memory_write's training path: apply(mem, q_slots, k_tok, v_tok,
    forget_logit, input_logit, token_mask, scale, backend) -> (new_mem, upd,
    lse, probs), probs the attention probabilities the CPU kernels keep for the
    backward (empty elsewhere; docs/design.md, "The write keeps its
    probabilities"). A fourth output, not differentiable, so the probabilities
    reach setup_context (torch.func needs that form)."""

    generate_vmap_rule = True  # the custom ops' rules (_vmap_by_instance)

    @staticmethod
    def forward(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale, backend):
        return torch.ops.memkernels.write_fwd(mem, q_slots, k_tok, v_tok, forget_logit,
                                              input_logit, token_mask, scale, backend, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, upd, lse, probs = output
        _save_write(ctx, inputs, upd, lse, probs)
        ctx.mark_non_differentiable(upd, lse, probs)

    @staticmethod
    def backward(ctx, dnew, _dupd, _dlse, _dprobs):
        return (*_write_grads(ctx, dnew), None, None, None)


# --- public API -------------------------------------------------------------

def _inference_only(*tensors: Tensor) -> bool:
    """True in eager mode when no gradient will be asked for: the kernel is
    then called directly, skipping autograd.Function.apply and the custom-op
    dispatcher (about 110 us per call on the CPU, more than a decode-step
    read of a small bank). torch.compile still sees the custom ops."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0):
        # the custom ops: torch.func's tensors reach no kernel directly, and a dual
        # tensor's tangent must meet the Function's refusal, not be dropped
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _keeps_read_probs(q: Tensor, k: Tensor, v: Tensor, backend: str, save_probs: bool) -> bool:
    """Whether memory_read takes _ReadKeepingProbs: save_probs on the CPU backend, a
    gradient to be asked for, P within READ_PROBS_MAX_BYTES, and no torch.func
    transform (vmap would keep a P per instance, the cap's bytes times the batch)."""
    return (save_probs and backend == "cpu" and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()
            and any(t.requires_grad for t in (q, k, v))
            and read_probs_shapes(q, k, backend, True)[0] != (0,))


def memory_read(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                slot_mask: Optional[Tensor] = None, return_lse: bool = False,
                backend: Optional[str] = None, save_probs: bool = True):
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
        save_probs: when a gradient will be asked for, let the CPU backend keep
            the attention probabilities for the backward (B*H*T*S floats, as
            eager autograd keeps, up to READ_PROBS_MAX_BYTES = 1 GiB a call; not
            under torch.func transforms) instead of recomputing them there. False
            saves that memory.
    """
    scale = check_read(q, k, v, scale, slot_mask)
    name = _backend.resolve(backend, q.device)
    if name == "reference":
        out, lse = reference.memory_read(q, k, v, scale=scale, slot_mask=slot_mask, return_lse=True)
    elif _inference_only(q, k, v):
        out, lse = _read_fwd(q, k, v, slot_mask, scale, name)
    elif _keeps_read_probs(q, k, v, name, save_probs):
        out, lse = _ReadKeepingProbs.apply(q, k, v, slot_mask, scale, name)[:2]
    else:
        out, lse = MemoryReadFunction.apply(q, k, v, slot_mask, scale, name)
    return (out, lse) if return_lse else out


def memory_write(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor,
                 forget_logit: Tensor, input_logit: Tensor, *, scale: Optional[float] = None,
                 token_mask: Optional[Tensor] = None, backend: Optional[str] = None,
                 save_probs: bool = True) -> Tensor:
    """Slots attend over new tokens; the result is blended into the bank.

    upd = softmax_t(scale * q_slots . k_tok) v_tok
    new_mem = sigmoid(forget_logit) * mem + sigmoid(input_logit) * tanh(upd)

    Args:
        mem, q_slots: [B, H, S, Dh]. k_tok, v_tok: [B, H, T, Dh].
        forget_logit, input_logit: [B, H, S, 1] or [B, H, S, Dh].
        token_mask: bool [B, T], True marks a real token; a row with none
            leaves upd = 0 for its slots.
        backend: as for memory_read.
        save_probs: when a gradient will be asked for, let the CPU backend keep
            the attention probabilities for the backward (T <= 512; B*H*S*T
            floats, as eager autograd keeps) instead of recomputing them there,
            one product of seven in a training step. False saves that memory.
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
    if save_probs and torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return _WriteKeepingProbs.apply(*args, token_mask, scale, name)[0]
    return MemoryWriteFunction.apply(*args, token_mask, scale, name)[0]
