"""The one registry of benchmark shapes. Every benchmark and report reads
its sizes from here."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadShape:
    name: str
    B: int
    H: int
    T: int
    S: int
    D: int
    shared: bool = True  # one bank for the whole batch

    def flops(self) -> int:  # QK^T and PV, 2 FLOPs per multiply-add
        return 4 * self.B * self.H * self.T * self.S * self.D

    def bytes(self, elt: int) -> int:  # bank read once, q read, out written
        banks = 1 if self.shared else self.B
        return elt * (2 * banks * self.H * self.S * self.D + 2 * self.B * self.H * self.T * self.D)


@dataclass(frozen=True)
class WriteShape:
    name: str
    B: int
    H: int
    S: int
    T: int
    D: int

    def flops(self) -> int:
        return 4 * self.B * self.H * self.S * self.T * self.D

    def bytes(self, elt: int) -> int:  # mem, q_slots, k, v, gates read; new_mem written
        return elt * self.B * self.H * (3 * self.S * self.D + 2 * self.T * self.D + 2 * self.S)


@dataclass(frozen=True)
class ReaderShape:
    """One memory reading layer at a decode step (memkernels.ops.reading_layer):
    B rows of T tokens of hidden size C; a query MLP of width M, H query heads
    of D reading Hk kv heads of S slots (one bank for the batch); the output
    projection back to C."""
    name: str
    B: int
    T: int
    C: int
    M: int
    H: int
    Hk: int
    S: int
    D: int

    def weight_shapes(self) -> list[tuple[int, ...]]:  # mlp_w, mlp_b, query_w, out_w
        return [(self.M, self.C), (self.M,), (self.H * self.D, self.M), (self.H * self.D, self.C)]

    def flops(self) -> int:  # the three projections and QK^T, PV
        rows = self.B * self.T
        return 2 * rows * (self.C * self.M + self.M * self.H * self.D + self.H * self.D * self.C) \
            + 4 * rows * self.H * self.S * self.D

    def bytes(self, elt: int) -> int:  # weights and bank read once, hidden read and written
        weights = sum(math.prod(s) for s in self.weight_shapes())
        return elt * (weights + 2 * self.Hk * self.S * self.D + 2 * self.B * self.T * self.C)


# The FLOPs an attention's backward needs: 2x the forward's matmuls (4 GEMMs,
# dV, dP, dQ, dK, against 2). A kernel that recomputes the scores there (the
# FlashAttention recipe) runs a fifth; the CPU write keeps its probabilities and
# does not (docs/design.md, "The write keeps its probabilities"). Records made
# before kernels v37 (9aef358) counted 2.5x: their fwd_bwd FLOPs are 7/6 of these,
# bwd 5/4.
BACKWARD_FLOP_FACTOR = 2.0

# One decode step of the LLM integration (a small Llama-style model: 8 heads of
# 64 reading a bank of 4096 slots, one bank per batch row).
LLM_DECODE = ReadShape("llm_decode", B=8, H=8, T=1, S=4096, D=64, shared=False)

CPU_READ = [
    ReadShape("decode", B=8, H=16, T=1, S=8192, D=64),
    ReadShape("prefill", B=4, H=16, T=256, S=4096, D=64),
    LLM_DECODE,
]
CPU_WRITE = [WriteShape("write", B=4, H=16, S=1024, T=512, D=64)]

# The append memory's reading layer at a decode step (hidden 512, a query MLP
# of 512, 4 pairs of heads of 32 reading 4 kv heads): the fused CPU kernel,
# memkernels._C.reader_fwd. Inference on the CPU only: no GPU kernel.
CPU_READER = [ReaderShape(f"reader_s{S}", B=1, T=1, C=512, M=512, H=8, Hk=4, S=S, D=32)
              for S in (1024, 4096)]

GPU_READ = [
    ReadShape("decode", B=8, H=16, T=1, S=8192, D=64),
    ReadShape("prefill_d64", B=4, H=16, T=1024, S=4096, D=64),
    ReadShape("prefill_d128", B=4, H=16, T=1024, S=4096, D=128),
    LLM_DECODE,
]
GPU_WRITE = [WriteShape("write", B=4, H=16, S=1024, T=512, D=64)]
