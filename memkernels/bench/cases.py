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
from memkernels import reference
from memkernels.bench.shapes import BACKWARD_FLOP_FACTOR, ReadShape, WriteShape

CACHE_BYTES = {"cpu": 512 << 20, "cuda": 64 << 20}  # inputs rotate past the last-level cache


@dataclass
class Case:
    op: str          # read_fwd, read_fwd_bwd, write_fwd, write_fwd_bwd
    shape: object
    impl: str
    fns: list[Callable[[], object]]
    flops: float
    bytes: float


def _n_sets(bytes_per_set: int, device: torch.device) -> int:
    return max(1, min(8, -(-2 * CACHE_BYTES[device.type] // max(bytes_per_set, 1))))


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


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


def read_cases(shape: ReadShape, device, dtype, backends, backward: bool) -> list[Case]:
    elt = torch.finfo(dtype).bits // 8
    bank = (shape.H, shape.S, shape.D) if shape.shared else (shape.B, shape.H, shape.S, shape.D)
    sets = []
    for _ in range(_n_sets(shape.bytes(elt), device)):
        q = torch.randn(shape.B, shape.H, shape.T, shape.D, device=device, dtype=dtype)
        k = torch.randn(*bank, device=device, dtype=dtype)
        v = torch.randn(*bank, device=device, dtype=dtype)
        sets.append([t.requires_grad_(backward) for t in (q, k, v)])
    flops = shape.flops() * (1 + BACKWARD_FLOP_FACTOR if backward else 1)
    nbytes = shape.bytes(elt) * (3 if backward else 1)
    op = "read_fwd_bwd" if backward else "read_fwd"
    cases = []
    for name, fn in read_impls(shape, backends).items():
        if backward:
            fns = [_fwd_bwd(fn, s) for s in sets]
        else:
            fns = [functools.partial(torch.no_grad()(fn), *s) for s in sets]
        cases.append(Case(op, shape, name, fns, flops, nbytes))
    return cases


def write_cases(shape: WriteShape, device, dtype, backends, backward: bool) -> list[Case]:
    B, H, S, T, D = shape.B, shape.H, shape.S, shape.T, shape.D
    elt = torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(_n_sets(shape.bytes(elt), device)):
        dims = [(B, H, S, D), (B, H, S, D), (B, H, T, D), (B, H, T, D), (B, H, S, 1), (B, H, S, 1)]
        sets.append([torch.randn(*d, device=device, dtype=dtype).requires_grad_(backward)
                     for d in dims])
    impls = {f"memkernels[{b}]": functools.partial(memkernels.memory_write, backend=b)
             for b in backends}
    impls["reference (eager)"] = reference.memory_write
    impls["torch.compile(reference)"] = _compiled(reference.memory_write)
    flops = shape.flops() * (1 + BACKWARD_FLOP_FACTOR if backward else 1)
    nbytes = shape.bytes(elt) * (3 if backward else 1)
    op = "write_fwd_bwd" if backward else "write_fwd"
    cases = []
    for name, fn in impls.items():
        if backward:
            fns = [_fwd_bwd(fn, s) for s in sets]
        else:
            fns = [functools.partial(torch.no_grad()(fn), *s) for s in sets]
        cases.append(Case(op, shape, name, fns, flops, nbytes))
    return cases
