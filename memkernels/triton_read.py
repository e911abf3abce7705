"""memory_read on Triton: layout mapping onto the shared attention kernels.

A shared bank [H, S, D] makes one group per head holding all B*T queries,
so each slot block is loaded once per head for the whole batch (and dK/dV
are reduced over the batch inside the dK/dV kernel)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memkernels.triton_attention import MaskIndex, attention_backward, attention_forward


class _Layout:
    def __init__(self, q: Tensor, k: Tensor, slot_mask: Optional[Tensor]):
        self.B, self.H, self.T, self.D = q.shape
        self.S = k.shape[-2]
        self.shared = k.dim() == 3
        self.G = self.H if self.shared else self.B * self.H
        self.M = self.B * self.T if self.shared else self.T
        self.mask = MaskIndex()
        if slot_mask is not None:
            m = slot_mask.contiguous()
            if m.dim() == 1:
                self.mask = MaskIndex(m)
            elif self.shared:
                self.mask = MaskIndex(m, row_div=self.T, row_stride=self.S)
            else:
                self.mask = MaskIndex(m, group_div=self.H, group_stride=self.S)

    def to_groups(self, x: Tensor) -> Tensor:  # [B, H, T, ...] -> [G, M, ...]
        x = x.transpose(0, 1) if self.shared else x
        return x.reshape(self.G, self.M, *x.shape[3:]).contiguous()

    def from_groups(self, x: Tensor) -> Tensor:  # [G, M, ...] -> [B, H, T, ...]
        if self.shared:
            return x.reshape(self.H, self.B, self.T, *x.shape[2:]).transpose(0, 1).contiguous()
        return x.reshape(self.B, self.H, self.T, *x.shape[2:])

    def bank(self, x: Tensor) -> Tensor:
        return x.reshape(self.G, self.S, self.D).contiguous()


def read_fwd(q, k, v, slot_mask, scale):
    L = _Layout(q, k, slot_mask)
    out, lse = attention_forward(L.to_groups(q), L.bank(k), L.bank(v), L.mask, scale, q.dtype)
    return L.from_groups(out), L.from_groups(lse)


def read_bwd(dout, q, k, v, out, lse, slot_mask, scale):
    L = _Layout(q, k, slot_mask)
    dq, dk, dv = attention_backward(L.to_groups(q), L.bank(k), L.bank(v), L.to_groups(out),
                                    L.to_groups(dout), L.to_groups(lse), L.mask, scale)
    return L.from_groups(dq), dk.reshape(k.shape), dv.reshape(v.shape)
