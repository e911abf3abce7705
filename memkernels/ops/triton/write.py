"""memory_write on Triton: the slots attend over the tokens with the gate
blend fused into the attention kernel's epilogue; backward runs one fused
elementwise kernel for the gate gradients, then the attention backward."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkernels.ops.triton.attention import (MaskIndex, _tanh, acc_dtype, attention_backward,
                                         attention_forward, block_d, stat_dtype)


@triton.jit
def _gate_bwd_kernel(DNew, Mem, Upd, Fg, Ig, DMem, DUpd, DF, DI, R, D,
                     PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    m2 = row_ok[:, None] & (dcol < D)[None, :]
    off = rows[:, None].to(tl.int64) * D + dcol[None, :]
    g_off = off if PER_CHANNEL else rows[:, None].to(tl.int64) + 0 * dcol[None, :]
    g = tl.load(DNew + off, mask=m2, other=0.0).to(ACC)
    mem = tl.load(Mem + off, mask=m2, other=0.0).to(ACC)
    u = _tanh(tl.load(Upd + off, mask=m2, other=0.0).to(ACC))
    sf = tl.sigmoid(tl.load(Fg + g_off, mask=m2, other=0.0).to(ACC))
    si = tl.sigmoid(tl.load(Ig + g_off, mask=m2, other=0.0).to(ACC))
    tl.store(DMem + off, (g * sf).to(DMem.dtype.element_ty), mask=m2)
    tl.store(DUpd + off, (g * si * (1.0 - u * u)).to(DUpd.dtype.element_ty), mask=m2)
    df = g * mem * sf * (1.0 - sf)
    di = g * u * si * (1.0 - si)
    if PER_CHANNEL:
        tl.store(DF + off, df.to(DF.dtype.element_ty), mask=m2)
        tl.store(DI + off, di.to(DI.dtype.element_ty), mask=m2)
    else:
        tl.store(DF + rows, tl.sum(df, 1).to(DF.dtype.element_ty), mask=row_ok)
        tl.store(DI + rows, tl.sum(di, 1).to(DI.dtype.element_ty), mask=row_ok)


def _groups(mem, k_tok, token_mask):
    B, H, S, D = mem.shape
    T = k_tok.shape[2]
    mask = MaskIndex()
    if token_mask is not None:
        mask = MaskIndex(token_mask.contiguous(), group_div=H, group_stride=T)
    return (B * H, S, T, D), mask


def write_fwd(mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, scale):
    if mem.numel() == 0:  # no slot to write: empty results (the schedule divides by the rows)
        stat = stat_dtype(mem.dtype)
        return (torch.empty_like(mem), torch.empty_like(mem, dtype=stat),
                mem.new_empty(mem.shape[:3], dtype=stat))
    (G, S, T, D), mask = _groups(mem, k_tok, token_mask)
    gate_dim = forget_logit.shape[-1]
    upd, lse, new_mem = attention_forward(
        q_slots.reshape(G, S, D).contiguous(), k_tok.reshape(G, T, D).contiguous(),
        v_tok.reshape(G, T, D).contiguous(), mask, scale, mem.dtype,
        write=(mem.contiguous(), forget_logit.contiguous(), input_logit.contiguous(), gate_dim))
    return new_mem.reshape(mem.shape), upd.reshape(mem.shape), lse.reshape(mem.shape[:3])


def write_bwd(dnew, mem, q_slots, k_tok, v_tok, forget_logit, input_logit, token_mask, upd, lse,
              scale):
    if mem.numel() == 0:
        return tuple(torch.zeros_like(x) for x in (mem, q_slots, k_tok, v_tok, forget_logit,
                                                   input_logit))
    (G, S, T, D), mask = _groups(mem, k_tok, token_mask)
    per_channel = forget_logit.shape[-1] == D and D > 1
    dmem, dupd = mem.new_empty(mem.shape), mem.new_empty(mem.shape)
    df, di = forget_logit.new_empty(forget_logit.shape), input_logit.new_empty(input_logit.shape)
    R, br = G * S, 16
    _gate_bwd_kernel[(triton.cdiv(R, br),)](
        dnew.contiguous(), mem.contiguous(), upd, forget_logit.contiguous(),
        input_logit.contiguous(), dmem, dupd, df, di, R, D,
        PER_CHANNEL=per_channel, ACC=acc_dtype(mem.dtype), BLOCK_R=br, BLOCK_D=block_d(D),
        num_warps=4)
    dq, dk, dv = attention_backward(
        q_slots.reshape(G, S, D).contiguous(), k_tok.reshape(G, T, D).contiguous(),
        v_tok.reshape(G, T, D).contiguous(), upd.reshape(G, S, D), dupd.reshape(G, S, D),
        lse.reshape(G, S), mask, scale)
    return (dmem, dq.reshape(mem.shape), dk.reshape(k_tok.shape), dv.reshape(v_tok.shape), df, di)
