"""Pure-PyTorch reference implementations: the ground truth for every test.

Eager and materializing (the full [T, S] score matrix is built); autograd
gives their gradients. Every backend must match these functions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def masked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                     valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """softmax(scale * q k^T) v over the last-but-one axis of k, and its lse.

    `valid` (bool, broadcastable to the [..., Tq, Tk] scores) marks usable keys.
    A row with no valid key gets out = 0 and lse = -inf, with zero gradients.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    # Divide by 1 where the row is empty: keeps the unused branch finite so its
    # gradient is 0, not NaN.
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    out = torch.matmul(probs, v) / safe_sum
    lse = (row_max + torch.log(row_sum)).squeeze(-1)
    return out, lse


def memory_read(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                slot_mask: Optional[Tensor] = None, return_lse: bool = False):
    """out[b,h,t] = sum_s softmax_s(scale * q[b,h,t] . k[h,s]) v[h,s].

    q: [B, H, T, Dh]; k, v: [H, S, Dh] (bank shared by the batch) or
    [B, H, S, Dh]; slot_mask: bool [S] or [B, S].
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if k.dim() == 3:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    valid = None
    if slot_mask is not None:
        valid = slot_mask.view(1, 1, 1, -1) if slot_mask.dim() == 1 else slot_mask[:, None, None, :]
    out, lse = masked_attention(q, k, v, scale, valid)
    return (out, lse) if return_lse else out


def memory_write(mem: Tensor, q_slots: Tensor, k_tok: Tensor, v_tok: Tensor,
                 forget_logit: Tensor, input_logit: Tensor, *, scale: Optional[float] = None,
                 token_mask: Optional[Tensor] = None) -> Tensor:
    """new = sigmoid(f) * mem + sigmoid(i) * tanh(softmax_t(scale q_slots k_tok^T) v_tok).

    mem, q_slots: [B, H, S, Dh]; k_tok, v_tok: [B, H, T, Dh]; gate logits
    [B, H, S, 1] or [B, H, S, Dh]; token_mask: bool [B, T].
    """
    scale = default_scale(mem.shape[-1]) if scale is None else scale
    valid = None if token_mask is None else token_mask[:, None, None, :]
    upd, _ = masked_attention(q_slots, k_tok, v_tok, scale, valid)
    return torch.sigmoid(forget_logit) * mem + torch.sigmoid(input_logit) * torch.tanh(upd)
