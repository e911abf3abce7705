"""Pure-PyTorch reference implementations: the ground truth for every test.

Eager and materializing (the full [T, S] score matrix is built); autograd
gives their gradients. Every backend must match these functions:
memory_read, memory_write, reading_layer (the fused inference layer),
copy_mix and postings_top (the lexical index's selection).
read_fwd/read_bwd/write_fwd/write_bwd wrap them in the kernels' signatures,
so "reference" is also a backend of the autograd.Functions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def stat_dtype(x: Tensor) -> torch.dtype:
    """dtype of the saved statistics (lse, upd): float32, float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def reading_layer(hidden: Tensor, query_w: Tensor, keys: Tensor, values: Tensor, out_w: Tensor,
                  eps: float, scale: float, key_scale: Optional[Tensor] = None,
                  value_scale: Optional[Tensor] = None, mlp_w: Optional[Tensor] = None,
                  mlp_b: Optional[Tensor] = None, query_b: Optional[Tensor] = None,
                  unit_queries: bool = False, context: Optional[Tensor] = None,
                  context_w: Optional[Tensor] = None, centroids: Optional[Tensor] = None,
                  cluster_starts: Optional[Tensor] = None, probes: int = 0) -> Tensor:
    """One memory reading layer at inference (memkernels.reading_layer):

        x = rms_norm(hidden)                         (no weight: folded into the next layer)
        q = x @ query_w^T + query_b                  (a linear query), or
        q = gelu(x @ mlp_w^T + mlp_b [+ context @ context_w^T]) @ query_w^T + query_b
        q = q / |q| per head                         (unit_queries)
        out = hidden + read(q, keys, values) @ out_w

    hidden [B, T, C]; keys/values [Hk, S, Dh] (shared by the batch) or
    [B, Hk, S, Dh], or int8 with key_scale/value_scale [.., S] (one float32
    scale per slot); query head h = c * Hk + g reads kv head g. With
    centroids [Hk, clusters, Dh] and cluster_starts [Hk, clusters + 1] (the
    keys sorted by cluster), each query row reads only the slots of its
    `probes` clusters of highest dot product with the query."""
    B, T, C = hidden.shape
    x = F.rms_norm(hidden, (C,), eps=eps)
    if mlp_w is not None:
        first = F.linear(x, mlp_w, mlp_b)
        if context is not None:
            first = first + F.linear(context, context_w)
        x = F.gelu(first)
    q = F.linear(x, query_w, query_b)
    Hk, S, D = keys.shape[-3:]
    H = q.shape[-1] // D
    q = q.view(B, T, H, D)
    if unit_queries:
        q = F.normalize(q, dim=-1)
    if key_scale is not None:  # int8 rows: x = scale * data
        keys = keys.to(torch.float32) * key_scale[..., None]
        values = values.to(torch.float32) * value_scale[..., None]
    keys, values = keys.to(hidden.dtype), values.to(hidden.dtype)
    kv_head = torch.arange(H, device=hidden.device) % Hk
    k, v = (keys[kv_head], values[kv_head]) if keys.dim() == 3 else (keys[:, kv_head],
                                                                      values[:, kv_head])
    q = q.transpose(1, 2)  # [B, H, T, D]
    if centroids is None:
        read = memory_read(q, k, v, scale=scale)
    else:
        clusters = centroids.shape[1]
        nearest = torch.einsum("bhtd,hcd->bhtc", q, centroids[kv_head].to(q.dtype))
        nearest = nearest.topk(min(probes, clusters), dim=-1).indices
        probed = torch.zeros(B, H, T, clusters, dtype=torch.bool, device=q.device)
        probed.scatter_(-1, nearest, True)
        slot = torch.arange(S, device=q.device)
        starts = cluster_starts.to(q.device)
        cluster_of_slot = torch.searchsorted(starts[:, 1:].contiguous(),
                                             slot.expand(Hk, S).contiguous(), right=True)
        valid = probed.gather(-1, cluster_of_slot[kv_head][None, :, None, :].expand(B, H, T, S))
        read, _ = masked_attention(q, k[None], v[None], scale, valid)
    return hidden + read.transpose(1, 2).reshape(B, T, H * D) @ out_w


# --- the kernels' signatures (memkernels.ops.backend: the "reference" backend) -------------
# Backward by the formulas, not autograd: inside a custom op autograd does not record.

def copy_mix(hidden: Tensor, logits: Tensor, read: Tensor, units: Tensor, gate_w: Tensor,
             eps: float, sharpness, gate_bias, gate_confidence,
             unit_scale: Optional[Tensor] = None) -> Tensor:
    """The copy rule's mixture (memkernels.ops.copy_mix): log p [B, T, V] of

        g = gate_bias + gate_confidence |read|^2 + rms_norm(hidden, eps) . gate_w
        m = sharpness (read @ units^T) * unit_scale          (unit_scale None: 1)
        p = sigmoid(g) softmax(m) + sigmoid(-g) softmax(logits)

    in float32 at least. sharpness, gate_bias, gate_confidence: numbers or
    0-d tensors (differentiable here)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    h = hidden.to(dtype)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    r = read.to(dtype)
    g = (gate_bias + gate_confidence * r.pow(2).sum(-1) + normed @ gate_w.to(dtype))[..., None]
    memory_logits = sharpness * (r @ units.to(dtype).T)
    if unit_scale is not None:
        memory_logits = memory_logits * unit_scale.to(dtype)
    return torch.logaddexp(F.logsigmoid(g) + memory_logits.log_softmax(-1),
                           F.logsigmoid(-g) + logits.to(dtype).log_softmax(-1))


def postings_top(starts: Tensor, post_text: Tensor, post_score: Tensor, num_texts: int,
                 terms: Tensor, k: int, min_score_ratio: float = 0.0) -> Tensor:
    """The texts of highest summed posting score (memkernels.ops.postings_top):
    text e's score is the sum, over the query's terms (repeats again), of
    post_score[j] for j in [starts[t], starts[t + 1]) with post_text[j] = e;
    returns those scoring > 0 and >= min_score_ratio x the best, best first
    (equal scores: lower text first), at most k; none when a score is NaN."""
    total = torch.zeros(num_texts, dtype=torch.float64)
    for t in terms.tolist():
        lo, hi = int(starts[t]), int(starts[t + 1])
        total.index_add_(0, post_text[lo:hi], post_score[lo:hi])
    best = float(total.max()) if num_texts else 0.0
    if not best > 0 or bool(total.isnan().any()):
        return torch.zeros(0, dtype=torch.long)
    near = ((total > 0) & (total >= min_score_ratio * best)).nonzero().flatten()
    return near[torch.sort(total[near], descending=True, stable=True).indices[:k]]


def _probs(q, k, scale, valid):
    """Softmax weights [..., Tq, Tk] (0 on masked keys and on rows with none)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    total = p.sum(-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


def _attention_backward(q, k, v, scale, valid, dout):
    """(dq, dk, dv) of out = softmax(scale q k^T) v; k, v may broadcast over q's batch."""
    p = _probs(q, k, scale, valid)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def _read_valid(slot_mask):
    if slot_mask is None:
        return None
    return slot_mask.view(1, 1, 1, -1) if slot_mask.dim() == 1 else slot_mask[:, None, None, :]


def read_fwd(q, k, v, slot_mask, scale):
    out, lse = memory_read(q, k, v, scale=scale, slot_mask=slot_mask, return_lse=True)
    return out, lse.to(stat_dtype(q))


def read_bwd(dout, q, k, v, out, lse, slot_mask, scale):
    shared = k.dim() == 3
    kb, vb = (k.unsqueeze(0), v.unsqueeze(0)) if shared else (k, v)
    dq, dk, dv = _attention_backward(q, kb, vb, scale, _read_valid(slot_mask), dout.to(q.dtype))
    if shared:  # one bank read by the whole batch: its gradient sums over the batch
        dk, dv = dk.sum(0), dv.sum(0)
    return dq, dk, dv


def write_fwd(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale):
    valid = None if token_mask is None else token_mask[:, None, None, :]
    upd, lse = masked_attention(q_slots, k_tok, v_tok, scale, valid)
    new = torch.sigmoid(forget_logit) * mem + torch.sigmoid(input_logit) * torch.tanh(upd)
    return new, upd.to(stat_dtype(mem)), lse.to(stat_dtype(mem))


def write_bwd(dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, upd, lse,
              scale):
    dnew, upd = dnew.to(mem.dtype), upd.to(mem.dtype)
    sf, si, t = torch.sigmoid(forget_logit), torch.sigmoid(input_logit), torch.tanh(upd)
    dmem = dnew * sf
    dupd = dnew * si * (1 - t * t)
    df, di = dnew * mem * sf * (1 - sf), dnew * t * si * (1 - si)
    if forget_logit.shape[-1] == 1:  # one gate per slot: summed over the head dim
        df, di = df.sum(-1, keepdim=True), di.sum(-1, keepdim=True)
    valid = None if token_mask is None else token_mask[:, None, None, :]
    dq, dk, dv = _attention_backward(q_slots, k_tok, v_tok, scale, valid, dupd)
    return dmem, dq, dk, dv, df, di
