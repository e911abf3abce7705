"""Triton attention core shared by memory_read and memory_write.

Same problem layout as the CPU kernels (csrc/cpu/attention_cpu.h): G groups,
each with M query rows and N keys; q [G, M, D], k/v [G, N, D] contiguous.
Forward: online softmax over key blocks (FlashAttention), optionally split
over keys (flash-decoding) with a combine kernel, optionally ending in the
memory_write gate blend. Backward: FlashAttention-2 without atomics (one
kernel owns each dK/dV block, another each dQ block), so it is deterministic.

Schedule heuristic (`forward_config`): few query rows per group (decode) ->
BLOCK_M=16 and the keys split across programs until the grid holds about two
programs per SM; many rows (prefill/training) -> 64/128-row tiles, one split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MaskIndex:
    """Mask row for (group g, row r): (g // group_div) * group_stride + (r // row_div) * row_stride."""
    mask: Optional[torch.Tensor] = None  # bool, contiguous
    group_div: int = 1
    group_stride: int = 0
    row_div: int = 1
    row_stride: int = 0


@dataclass(frozen=True)
class RowLayout:
    """Where row m of group g of q (and of out, lse, dO, dQ, which share q's
    layout) lives, counted in rows of D elements:
    g * group_stride + (m // row_div) * row_hi + (m % row_div) * row_lo.
    It lets the kernels read and write the caller's [B, H, T, D] tensors in
    place, with no transpose copies (each copy is a kernel launch, which is
    what a decode step is made of)."""
    G: int
    M: int
    group_stride: int
    row_div: int = 1
    row_hi: int = 1
    row_lo: int = 0

    @staticmethod
    def grouped(G: int, M: int) -> "RowLayout":  # contiguous [G, M, D]
        return RowLayout(G, M, M)

    def args(self) -> tuple[int, int, int, int]:
        return self.group_stride, self.row_div, self.row_hi, self.row_lo


@triton.jit
def _rows_at(g, rows, group_stride, row_div, row_hi, row_lo):
    """RowLayout's formula, as int64 row numbers."""
    return (g.to(tl.int64) * group_stride + (rows // row_div).to(tl.int64) * row_hi
            + (rows % row_div).to(tl.int64) * row_lo)


@triton.jit
def _mask_rows(g, rows, group_div, group_stride, row_div, row_stride):
    """MaskIndex's formula, as int64 offsets: a [B, S] mask of a shared bank of
    2^20 slots passes 2^31 elements from B = 2048 on."""
    return ((g // group_div).to(tl.int64) * group_stride
            + (rows // row_div).to(tl.int64) * row_stride)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask, Mem, Fg, Ig, NewMem,
    M, N, D, keys_per_split, gate_dim,
    group_div, group_stride, row_div, row_stride,
    q_gs, q_rd, q_rh, q_rl, o_gs, o_rd, o_rh, o_rl, o_split_stride,
    scale,
    HAS_MASK: tl.constexpr, WRITE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < M, dcol < D
    q_off = _rows_at(g, rows, q_gs, q_rd, q_rh, q_rl)[:, None] * D + dcol[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    if HAS_MASK:
        mrow = _mask_rows(g, rows, group_div, group_stride, row_div, row_stride)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    kv_base = g.to(tl.int64) * N * D
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        kv_off = kv_base + cols[:, None] * D + dcol[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale
        valid = col_ok[None, :]
        if HAS_MASK:
            mv = tl.load(Mask + mrow[:, None] + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            valid = valid & (mv != 0)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp(-inf) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)
        m_i = m_new
    # a row with no valid key (sum 0) reads 0, lse -inf; a NaN sum stays NaN
    out = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0, float("-inf"), m_i + tl.log(l_i))
    o_row = split.to(tl.int64) * o_split_stride + _rows_at(g, rows, o_gs, o_rd, o_rh, o_rl)
    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(Out + o_row[:, None] * D + dcol[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + o_row, lse, mask=row_ok)
    if WRITE:  # fused gate blend: new = sigmoid(f) * mem + sigmoid(i) * tanh(upd)
        c_row = (g.to(tl.int64) * M + rows)[:, None]  # mem and the gates are [G, M, *]
        gcol = tl.where(gate_dim == 1, 0, dcol)
        g_off = c_row * gate_dim + gcol[None, :]
        f = tl.load(Fg + g_off, mask=o_mask, other=0.0).to(ACC)
        i = tl.load(Ig + g_off, mask=o_mask, other=0.0).to(ACC)
        m_off = c_row * D + dcol[None, :]
        mem = tl.load(Mem + m_off, mask=o_mask, other=0.0).to(ACC)
        new = tl.sigmoid(f) * mem + tl.sigmoid(i) * _tanh(out)
        tl.store(NewMem + m_off, new.to(NewMem.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_kernel(Part, PartLse, Out, Lse, GM, M, D, splits, o_gs, o_rd, o_rh, o_rl,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merges per-split (out, lse) into the final out and lse (flash-decoding);
    the parts are [splits, G, M, *] contiguous, out/lse in their RowLayout."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcol = tl.arange(0, BLOCK_D)
    row_ok = rows < GM
    mask2 = row_ok[:, None] & (dcol < D)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(PartLse + (s * GM + rows.to(tl.int64)), mask=row_ok,
                                  other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for s in range(0, splits):
        at = s * GM + rows.to(tl.int64)
        w = tl.exp(tl.load(PartLse + at, mask=row_ok, other=float("-inf")) - m_safe)
        part = tl.load(Part + at[:, None] * D + dcol[None, :],
                       mask=mask2, other=0.0)
        total += w
        acc += w[:, None] * part
    out = acc / tl.where(total == 0, 1.0, total)[:, None]
    lse = tl.where(total == 0, float("-inf"), m_safe + tl.log(total))
    o_row = _rows_at(rows // M, rows % M, o_gs, o_rd, o_rh, o_rl)
    tl.store(Out + o_row[:, None] * D + dcol[None, :], out.to(Out.dtype.element_ty), mask=mask2)
    tl.store(Lse + o_row, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask,
    M, N, D, group_div, group_stride, row_div, row_stride, r_gs, r_rd, r_rh, r_rl, scale,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program owns one key block of one group and loops over all its rows,
    so dK/dV (summed over the batch for a shared bank) need no atomics."""
    pid_n, g = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    col_ok, d_ok = cols < N, dcol < D
    kv_off = (g.to(tl.int64) * N + cols)[:, None] * D + dcol[None, :]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        r_row = _rows_at(g, rows, r_gs, r_rd, r_rh, r_rl)
        r_off = r_row[:, None] * D + dcol[None, :]
        r_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + r_off, mask=r_mask, other=0.0)
        do = tl.load(DO + r_off, mask=r_mask, other=0.0)
        lse = tl.load(Lse + r_row, mask=row_ok, other=float("-inf"))
        delta = tl.load(Delta + r_row, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale
        valid = col_ok[None, :] & (lse != float("-inf"))[:, None]
        if HAS_MASK:
            mrow = _mask_rows(g, rows, group_div, group_stride, row_div, row_stride)
            mv = tl.load(Mask + mrow[:, None] + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            valid = valid & (mv != 0)
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.where(valid, tl.exp(s - lse_safe[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=ACC, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, out_dtype=ACC, input_precision=PREC)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask,
    M, N, D, group_div, group_stride, row_div, row_stride, r_gs, r_rd, r_rh, r_rl, scale,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < M, dcol < D
    r_row = _rows_at(g, rows, r_gs, r_rd, r_rh, r_rl)
    r_off = r_row[:, None] * D + dcol[None, :]
    r_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + r_off, mask=r_mask, other=0.0)
    do = tl.load(DO + r_off, mask=r_mask, other=0.0)
    lse = tl.load(Lse + r_row, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + r_row, mask=row_ok, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    if HAS_MASK:
        mrow = _mask_rows(g, rows, group_div, group_stride, row_div, row_stride)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    kv_base = g.to(tl.int64) * N * D
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kv_off = kv_base + cols[:, None] * D + dcol[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale
        valid = col_ok[None, :] & (lse != float("-inf"))[:, None]
        if HAS_MASK:
            mv = tl.load(Mask + mrow[:, None] + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            valid = valid & (mv != 0)
        p = tl.where(valid, tl.exp(s - lse_safe[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, out_dtype=ACC, input_precision=PREC)
    tl.store(DQ + r_off, dq.to(DQ.dtype.element_ty), mask=r_mask)


# --- launchers ----------------------------------------------------------------

def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact fp32 dots ("ieee"), not Triton's TF32 default:
    a float32 op must match float32 accuracy."""
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def forward_config(G: int, M: int, N: int, D: int, device_index: int, elt: int = 2):
    """(BLOCK_M, BLOCK_N, splits, num_warps, num_stages): the schedule, cached
    per shape. Chosen by `python -m memkernels.apps.bench.triton_sweep` on an H100 for 2-byte
    inputs (docs/design.md, "Triton schedules are tuned offline"); 4-byte inputs take half the tile so shared memory fits."""
    bd = block_d(D)
    wide = elt > 2
    if M <= 16:  # decode: few rows, split the keys so about one wave fills the GPU
        bm = 16
        bn = (128 if wide else 256) if bd <= 64 else (32 if wide else 64)
        sms = _sm_count(device_index) if device_index >= 0 else 4
        key_blocks = triton.cdiv(N, bn)
        splits = max(1, min(triton.cdiv(sms, G * triton.cdiv(M, bm)), triton.cdiv(key_blocks, 2)))
        return bm, bn, splits, 4, (2 if wide else 3)
    if bd <= 64 and M >= 128:
        return 128, 64, 1, 8, (2 if wide else 3)
    return 64, (64 if bd <= 128 and not wide else 32), 1, 4, (3 if bd <= 128 and not wide else 2)


def attention_forward(q, k, v, mask: MaskIndex, scale: float, out_dtype, write=None,
                      config=None, rows: Optional[RowLayout] = None):
    """q [G, M, D] (or any contiguous tensor whose rows `rows` places), k/v
    [G, N, D] contiguous -> (out, lse): out shaped like q, lse like q[..., 0].

    write = (mem, forget, input, gate_dim) fuses the gate blend and then also
    returns new_mem: (upd, lse, new_mem); upd is kept in the stat dtype.
    """
    D = q.shape[-1]
    rows = rows or RowLayout.grouped(*q.shape[:2])
    G, M = rows.G, rows.M
    N = k.shape[1]
    dev_index = q.device.index if q.device.type == "cuda" else -1
    bm, bn, splits, warps, stages = config or forward_config(G, M, N, D, dev_index,
                                                              q.element_size())
    if write is not None:
        splits = 1
    sdt = stat_dtype(q.dtype)
    keys_per_split = triton.cdiv(triton.cdiv(N, splits), bn) * bn
    splits = triton.cdiv(N, keys_per_split)
    out_dtype = sdt if write is not None else out_dtype  # upd is kept for the backward
    out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=sdt)
    if splits > 1:  # per-split partials, merged by the combine kernel
        part = torch.empty((splits, G, M, D), device=q.device, dtype=sdt)
        part_lse = torch.empty((splits, G, M), device=q.device, dtype=sdt)
        part_rows = RowLayout.grouped(G, M)
    else:
        part, part_lse, part_rows = out, lse, rows
    if write is not None:
        mem, fg, ig, gate_dim = write
        new_mem = torch.empty_like(mem)
    else:
        mem = fg = ig = new_mem = q  # unused
        gate_dim = 1
    mk = mask.mask if mask.mask is not None else q
    grid = (triton.cdiv(M, bm), G, splits)
    _attn_fwd_kernel[grid](
        q, k, v, part, part_lse, mk, mem, fg, ig, new_mem,
        M, N, D, keys_per_split, gate_dim,
        mask.group_div, mask.group_stride, mask.row_div, mask.row_stride,
        *rows.args(), *part_rows.args(), G * M, scale,
        HAS_MASK=mask.mask is not None, WRITE=write is not None, ACC=acc_dtype(q.dtype),
        PREC=dot_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d(D), num_warps=warps, num_stages=stages)
    if write is not None:
        return out, lse, new_mem
    if splits > 1:
        br = 16
        _combine_kernel[(triton.cdiv(G * M, br),)](
            part, part_lse, out, lse, G * M, M, D, splits, *rows.args(),
            ACC=acc_dtype(q.dtype), BLOCK_R=br, BLOCK_D=block_d(D), num_warps=4)
    return out, lse


def attention_backward(q, k, v, out, dout, lse, mask: MaskIndex, scale: float,
                       rows: Optional[RowLayout] = None):
    """Gradients of attention_forward. q, out, dout (contiguous, shaped like q)
    and lse share the RowLayout `rows` (default: [G, M, D]); k/v [G, N, D]
    contiguous. dq is shaped like q; dq/dk/dv in q's dtype."""
    D = q.shape[-1]
    rows = rows or RowLayout.grouped(*q.shape[:2])
    G, M = rows.G, rows.M
    N = k.shape[1]
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # rowsum(dO * O), lse's layout
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bd = block_d(D)
    bm, bn = (64, 64) if bd <= 64 else (32, 64) if bd <= 128 else (16, 32)
    warps = 4
    mk = mask.mask if mask.mask is not None else q
    common = (M, N, D, mask.group_div, mask.group_stride, mask.row_div, mask.row_stride,
              *rows.args(), scale)
    meta = dict(HAS_MASK=mask.mask is not None, ACC=acc_dtype(q.dtype), PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=bd, num_warps=warps, num_stages=2)
    _attn_bwd_dkdv_kernel[(triton.cdiv(N, bn), G)](q, k, v, dout, lse, delta, dk, dv, mk,
                                                    *common, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(M, bm), G)](q, k, v, dout, lse, delta, dq, mk,
                                                  *common, **meta)
    return dq, dk, dv
