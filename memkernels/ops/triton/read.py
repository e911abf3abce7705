"""memory_read on Triton: layout mapping onto the shared attention kernels.

A shared bank [H, S, D] makes one group per head holding all B*T queries,
so each slot block is loaded once per head for the whole batch (and dK/dV
are reduced over the batch inside the dK/dV kernel). The kernels read q, dO
and write out, lse, dQ in the caller's [B, H, T, D] layout (a RowLayout), so
a decode step launches no transpose copies."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memkernels.ops.triton.attention import (MaskIndex, RowLayout, attention_backward,
                                             attention_forward, stat_dtype)


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

    def rows(self) -> RowLayout:
        """Group g, row m of a contiguous [B, H, T, *] tensor: shared bank: g = h,
        m = b * T + t; bank per sequence: g = b * H + h, m = t."""
        if self.shared:
            return RowLayout(self.G, self.M, group_stride=self.T, row_div=self.T,
                             row_hi=self.H * self.T, row_lo=1)
        return RowLayout.grouped(self.G, self.M)

    def bank(self, x: Tensor) -> Tensor:
        return x.reshape(self.G, self.S, self.D).contiguous()


def read_fwd(q, k, v, slot_mask, scale):
    if q.numel() == 0:  # no query: empty results (the schedule divides by the rows)
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=stat_dtype(q.dtype))
    L = _Layout(q, k, slot_mask)
    return attention_forward(q.contiguous(), L.bank(k), L.bank(v), L.mask, scale, q.dtype,
                             rows=L.rows())


def read_bwd(dout, q, k, v, out, lse, slot_mask, scale):
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    L = _Layout(q, k, slot_mask)
    dq, dk, dv = attention_backward(q.contiguous(), L.bank(k), L.bank(v), out.contiguous(),
                                    dout.contiguous(), lse.contiguous(), L.mask, scale,
                                    rows=L.rows())
    return dq, dk.reshape(k.shape), dv.reshape(v.shape)
