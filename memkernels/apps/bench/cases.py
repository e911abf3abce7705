"""Benchmark cases: for one shape, every implementation a user could pick
(memkernels backends, the eager reference, SDPA used as well as it can be,
torch.compile of the reference), each as callables over rotating inputs."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import memkernels
from memkernels.ops import backend as _backend
from memkernels.ops import reference
from memkernels.apps.bench.shapes import BACKWARD_FLOP_FACTOR, ReaderShape, ReadShape, WriteShape

CACHE_BYTES = {"cpu": 512 << 20, "cuda": 64 << 20}  # inputs rotate past the last-level cache


@dataclass
class Case:
    op: str          # read_fwd, read_fwd_bwd, write_fwd, write_fwd_bwd
    shape: object
    impl: str
    fns: list[Callable[[], object]]
    flops: float
    bytes: float


def _n_sets(bytes_per_set: int, device: torch.device, most: int = 8) -> int:
    return max(1, min(most, -(-2 * CACHE_BYTES[device.type] // max(bytes_per_set, 1))))


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def forward_only(op: str) -> bool:
    """Whether a row's op (read_fwd, reader_fwd, write_fwd_bwd, ...) is a forward
    alone: the runner times such a row with gradients off."""
    return op.endswith("_fwd")


def _timed(fn, inputs, mode: str):
    """The callable that `mode` times: forward, backward alone (over a graph
    built once, kept between calls) or forward + backward."""
    if mode == "fwd":
        # no grad mode set here: the runner times a forward row inside one
        # torch.no_grad() block (forward_only), as a decode loop runs its steps
        return functools.partial(fn, *inputs)
    if mode == "fwd_bwd":
        # autograd.grad, not .backward(): nothing accumulates into .grad, and no
        # AccumulateGrad node kept alive by the "bwd" case's graph on the same
        # inputs breaks the CUDA-graph capture (it did on torch 2.11)
        def fwd_bwd():
            out = fn(*inputs)
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
        return fwd_bwd
    out = fn(*inputs)
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": BACKWARD_FLOP_FACTOR, "fwd_bwd": 1.0 + BACKWARD_FLOP_FACTOR}
BYTES_FACTOR = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}


def read_impls(shape: ReadShape, backends: list[str]) -> dict[str, Callable]:
    B, H, T, S, D = shape.B, shape.H, shape.T, shape.S, shape.D
    impls = {f"memkernels[{b}]": functools.partial(memkernels.memory_read, backend=b)
             for b in backends}
    impls["reference (eager)"] = reference.memory_read
    impls["torch.compile(reference)"] = _compiled(reference.memory_read)

    def sdpa_expanded(q, k, v):
        if k.dim() == 3:
            k, v = k.expand(B, H, S, D), v.expand(B, H, S, D)
        return F.scaled_dot_product_attention(q, k, v)
    impls["sdpa (bank expanded)" if shape.shared else "sdpa"] = sdpa_expanded

    if shape.shared:
        def sdpa_folded(q, k, v):  # the batch folded into the query length: bank read once
            qf = q.transpose(0, 1).reshape(1, H, B * T, D)
            out = F.scaled_dot_product_attention(qf, k.unsqueeze(0), v.unsqueeze(0))
            return out.reshape(H, B, T, D).transpose(0, 1)
        impls["sdpa (batch folded)"] = sdpa_folded
    return impls


def _input_sets(shape, input_shapes: list[tuple], device, dtype, mode: str) -> list[list]:
    """Enough random input sets to rotate past the cache (leaves that need grad
    outside the forward mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    elt = torch.finfo(dtype).bits // 8
    return [[torch.randn(*dims, device=device, dtype=dtype).requires_grad_(mode != "fwd")
             for dims in input_shapes] for _ in range(_n_sets(shape.bytes(elt), device))]


def _build(kind: str, shape, impls: dict, sets: list[list], mode: str) -> list[Case]:
    """One Case per implementation, each over the same rotating input sets."""
    elt = sets[0][0].element_size()
    flops = shape.flops() * FLOP_FACTOR[mode]
    nbytes = shape.bytes(elt) * BYTES_FACTOR[mode]
    return [Case(f"{kind}_{mode}", shape, name, [_timed(fn, s, mode) for s in sets], flops, nbytes)
            for name, fn in impls.items()]


def read_cases(shape: ReadShape, device, dtype, backends, mode: str) -> list[Case]:
    bank = (shape.H, shape.S, shape.D) if shape.shared else (shape.B, shape.H, shape.S, shape.D)
    inputs = [(shape.B, shape.H, shape.T, shape.D), bank, bank]
    sets = _input_sets(shape, inputs, device, dtype, mode)
    cases = _build("read", shape, read_impls(shape, backends), sets, mode)
    if shape.T == 1:  # a decode step is bound by the bank's bytes, not by its matmuls
        return cases
    B, H, T, S, D = shape.B, shape.H, shape.T, shape.S, shape.D
    if shape.shared:  # the batch folded into the rows of each head, as the kernels do
        def split(s):
            q = s[0].transpose(0, 1).reshape(H, B * T, D)
            return q, s[1], s[2], q
    else:
        def split(s):
            q = s[0].reshape(B * H, T, D)
            return q, s[1].reshape(B * H, S, D), s[2].reshape(B * H, S, D), q
    return cases + [_matmuls_case("read", mode, shape, cases[0], sets, split)]


def write_cases(shape: WriteShape, device, dtype, backends, mode: str) -> list[Case]:
    B, H, S, T, D = shape.B, shape.H, shape.S, shape.T, shape.D
    impls = {f"memkernels[{b}]": functools.partial(memkernels.memory_write, backend=b)
             for b in backends}
    impls["reference (eager)"] = reference.memory_write
    impls["torch.compile(reference)"] = _compiled(reference.memory_write)
    inputs = [(B, H, S, D), (B, H, S, D), (B, H, T, D), (B, H, T, D), (B, H, S, 1), (B, H, S, 1)]
    sets = _input_sets(shape, inputs, device, dtype, mode)
    cases = _build("write", shape, impls, sets, mode)
    # its matmuls alone: the slots are the queries, the tokens the keys; any
    # [S, D] stands in for d(upd)
    return cases + [_matmuls_case("write", mode, shape, cases[0], sets, lambda s: (
        s[1].reshape(B * H, S, D), s[2].reshape(B * H, T, D), s[3].reshape(B * H, T, D),
        s[0].reshape(B * H, S, D)))]


MATMULS_ALONE = "its matmuls alone (torch.bmm)"
SCORE_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 1 << 40}  # CPU: a chunk's scores stay in the L3


def _matmuls_case(kind: str, mode: str, shape, like: Case, sets: list[list], split) -> Case:
    """The op's attention matmuls alone on the same input sets (split(set) ->
    q, k, v, dout as [G, M, D] / [G, N, D]), counted with the op's FLOPs."""
    return Case(f"{kind}_{mode}", shape, MATMULS_ALONE,
                [functools.partial(attention_matmuls, *split(s), mode=mode) for s in sets],
                like.flops, like.bytes)


@torch.no_grad()
def attention_matmuls(q, k, v, dout, *, mode: str) -> list:
    """An attention's matmuls alone, with no softmax, mask or gate: 2 forward;
    4 backward, after the forward's scores where it ran (fwd_bwd), else after
    recomputing them (bwd: 5). q, dout [G, M, D]; k, v [G, N, D]. Timed beside
    the op, it says what the GEMM library reaches on the op's own skinny shapes
    (the square-matmul probe is the machine's limit; these shapes reach less).
    Not a floor: a kernel that tiles for the cache can beat it. Groups and rows
    go in chunks whose scores stay in the last-level cache; a chunk's dK / dV
    are not summed into the group's (those adds are left out)."""
    G, M, D = q.shape
    N = k.shape[1]
    budget = max(1, SCORE_CHUNK_BYTES[q.device.type] // q.element_size())
    rows = max(1, min(M, budget // N))
    groups = max(1, budget // (M * N)) if rows == M else 1
    q, k, v, dout = (x.detach() for x in (q, k, v, dout))
    outs = []
    for g0 in range(0, G, groups):
        kc, vc = k[g0:g0 + groups], v[g0:g0 + groups]
        for r0 in range(0, M, rows):
            qc, dc = q[g0:g0 + groups, r0:r0 + rows], dout[g0:g0 + groups, r0:r0 + rows]
            p = torch.bmm(qc, kc.mT)
            if mode in ("fwd", "fwd_bwd"):
                outs.append(torch.bmm(p, vc))
            if mode in ("bwd", "fwd_bwd"):
                dp = torch.bmm(dc, vc.mT)
                outs += [torch.bmm(p.mT, dc), torch.bmm(dp, kc), torch.bmm(dp.mT, qc)]
    return outs


READ_ONCE = "its inputs' bytes read once (one torch.sum)"
# the same layer through its plan (memkernels.reading_layer_plan, built once per set outside the
# timing): the call the memory's decode path makes
PLAN = "memkernels[cpu] plan"
STEPS_IN_TURN = "its steps' own tensors read in turn (a sum each)"
# the same row before it read the layer's own tensors: over a contiguous copy of the inputs
# (in older results files)
STEPS_IN_TURN_COPY = "its steps' bytes read in turn (a sum each)"


def reader_cases(shape: ReaderShape, device, dtype, backends, mode: str) -> list[Case]:
    """The fused reading layer (inference: forward only) against the same math
    in ATen ops, eager and compiled. Its few MB rotate over up to 64 sets: in
    a decode step the LLM's other weights evict them between two reads, so
    the floor is DRAM's."""
    if mode != "fwd":
        raise ValueError(f"the reading layer is inference only (mode 'fwd'), got {mode!r}")
    eps, scale = 1e-6, 20.0

    def fused(backend):
        def call(hidden, mlp_w, mlp_b, query_w, out_w, keys, values):
            return memkernels.reading_layer(hidden, query_w, keys, values, out_w, eps=eps,
                                            scale=scale, mlp_w=mlp_w, mlp_b=mlp_b,
                                            unit_queries=True, backend=backend)
        return call

    def eager(hidden, mlp_w, mlp_b, query_w, out_w, keys, values):
        return reference.reading_layer(hidden, query_w, keys, values, out_w, eps, scale,
                                       mlp_w=mlp_w, mlp_b=mlp_b, unit_queries=True)

    impls = {f"memkernels[{b}]": fused(b) for b in backends if b == "cpu"}
    impls["reference (eager)"] = eager
    impls["torch.compile(reference)"] = _compiled(eager)
    elt = torch.finfo(dtype).bits // 8
    bank = (shape.Hk, shape.S, shape.D)
    dims = [(shape.B, shape.T, shape.C), *shape.weight_shapes(), bank, bank]
    sets = [[torch.randn(*d, device=device, dtype=dtype) / (d[-1] ** 0.5 if len(d) > 1 else 1)
             for d in dims] for _ in range(_n_sets(shape.bytes(elt), device, most=64))]
    cases = [Case("reader_fwd", shape, name, [_timed(fn, s, "fwd") for s in sets],
                  shape.flops(), shape.bytes(elt)) for name, fn in impls.items()]
    if "cpu" in backends:
        plans = [memkernels.reading_layer_plan(query_w, keys, values, out_w, eps=eps, scale=scale,
                                               mlp_w=mlp_w, mlp_b=mlp_b, unit_queries=True,
                                               backend="cpu")
                 for _, mlp_w, mlp_b, query_w, out_w, keys, values in sets]
        cases.append(Case("reader_fwd", shape, PLAN, [_timed(plan, s[:1], "fwd") for plan, s in
                                                      zip(plans, sets)],
                          shape.flops(), shape.bytes(elt)))
    # each set's bytes in one tensor, in the order the layer's steps read them
    # (hidden and MLP, query projection, keys and values, output projection)
    order = (0, 1, 2, 3, 5, 6, 4)
    flat = [torch.cat([s[i].reshape(-1) for i in order]) for s in sets]
    # the floor measured at this size: a few MB read once, cold, in one sum (a
    # stream this short does not reach a large stream's bandwidth)
    cases.append(Case("reader_fwd", shape, READ_ONCE, [_timed(torch.sum, [f], "fwd") for f in flat],
                      shape.flops(), shape.bytes(elt)))
    # the floor of the layer's chain: its four steps (MLP, query projection,
    # read, output projection) each wait for the one before, so each streams
    # its bytes in a pass of its own; the same tensors the layer reads, summed
    # step after step in one extension call (memkernels._C.cpu_sum_in_turn),
    # nothing between; the same steps as memkernels_reader_cold
    # (csrc/tools/reader_cold.cpp). Its own tensors, not a copy: where the
    # allocator put them moved both the layer and a sum of them by up to 10%
    # from one process to the next (docs/log.md, "The chain's floor read a
    # copy")
    in_turn = getattr(_backend.extension()[0], "cpu_sum_in_turn", None)
    if in_turn is not None and device.type == "cpu" and dtype == torch.float32:
        steps = [3, 1, 2, 1]  # (hidden, mlp_w, mlp_b), query_w, (keys, values), out_w
        cases.append(Case("reader_fwd", shape, STEPS_IN_TURN,
                          [functools.partial(in_turn, [s[i].reshape(-1) for i in order], steps)
                           for s in sets], shape.flops(), shape.bytes(elt)))
    return cases
