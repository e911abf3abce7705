"""The one registry of benchmark shapes. Every benchmark and report reads
its sizes from here."""
from __future__ import annotations

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


# Backward of an attention does 2.5x the forward's matmul FLOPs (5 GEMMs vs 2).
BACKWARD_FLOP_FACTOR = 2.5

# One decode step of the LLM integration (a small Llama-style model: 8 heads of
# 64 reading a bank of 4096 slots, one bank per batch row).
LLM_DECODE = ReadShape("llm_decode", B=8, H=8, T=1, S=4096, D=64, shared=False)

CPU_READ = [
    ReadShape("decode", B=8, H=16, T=1, S=8192, D=64),
    ReadShape("prefill", B=4, H=16, T=256, S=4096, D=64),
    LLM_DECODE,
]
CPU_WRITE = [WriteShape("write", B=4, H=16, S=1024, T=512, D=64)]

GPU_READ = [
    ReadShape("decode", B=8, H=16, T=1, S=8192, D=64),
    ReadShape("prefill_d64", B=4, H=16, T=1024, S=4096, D=64),
    ReadShape("prefill_d128", B=4, H=16, T=1024, S=4096, D=128),
    LLM_DECODE,
]
GPU_WRITE = [WriteShape("write", B=4, H=16, S=1024, T=512, D=64)]
