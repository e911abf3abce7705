"""The CPU's hand-blocked few-row read (csrc/cpu/few_rows.h: 1-16 query rows
per group, the decode step), the tile path's softmax rows
(csrc/cpu/softmax_rows_body.inc: prefill, backward, write) and its GEMMs
(csrc/cpu/tile_gemm_body.inc, and the vendor BLAS they replace) on every ISA body
this CPU runs, against the float64 reference: the row and key grid across its block and chunk edges,
head dims 1..256 (those not a multiple of the vector width take the
portable loops), masks with all-masked rows, x50 logits, NaN queries, and
bf16 / int8 banks through the fused reading layer, and that layer's
projections (GEMVs on the same blocks) on widths the vector bodies take
(one kv head over many slots, context, NaN, x50, narrow banks). The ISA and the GEMM
are chosen once per process (MEMKERNELS_CPU_ISA, MEMKERNELS_CPU_GEMM), hence a
subprocess per case."""
import os
import platform
import shutil
import subprocess
import sys

import pytest

from memkernels.ops import backend as _backend

SCRIPT = r"""
import itertools, sys
import torch
from memkernels import MemoryBank, MemoryConfig, MemoryModel, memory_read
from memkernels.ops import reference
import memkernels._C as C

print(C.cpu_isa(), C.cpu_tile_gemm(), C.cpu_few_rows_chunk(8, 64),
      C.cpu_few_rows_key_major(8, 64), C.cpu_few_rows_key_major(16, 64))
torch.manual_seed(0)
checked = 0

def check(q, k, v, mask=None, what=""):
    global checked
    out, lse = memory_read(q, k, v, slot_mask=mask, return_lse=True, backend="cpu")
    want, want_lse = reference.memory_read(q.double(), k.double(), v.double(), slot_mask=mask,
                                           return_lse=True)
    torch.testing.assert_close(out, want.float(), rtol=2e-5, atol=2e-5, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(lse, want_lse.float(), rtol=2e-5, atol=2e-5, equal_nan=True,
                               msg=lambda m: f"{what} lse: {m}")
    checked += 1

# rows per group 1..16 (shared bank: B*T rows; own banks: T rows) across the
# row blocks (4 or 2 rows) and the key chunks (64 or 256 keys at Dh 64, 256 or 1024 at Dh 16),
# the value pass's column slices (AVX-512: Dh 16 one vector, 32 two, 64 and 128 four; AVX2:
# Dh 16 two, 32 two and two, 64 and 128 slices of three in blocks of 3-4 rows)
for (B, T), S, D in itertools.product(
        [(1, 1), (2, 1), (3, 1), (5, 1), (8, 1), (1, 7), (4, 4), (16, 1), (3, 5)],
        [1, 3, 5, 63, 65, 257, 1029],
        [16, 32, 64, 128]):
    q = torch.randn(B, 2, T, D)
    k, v = torch.randn(2, S, D), torch.randn(2, S, D)
    check(q, k, v, what=f"shared B={B} T={T} S={S} D={D}")
    ko, vo = torch.randn(B, 2, S, D), torch.randn(B, 2, S, D)
    check(q, ko, vo, what=f"own banks B={B} T={T} S={S} D={D}")

# every head dim 1..256 that matters: the vector widths' multiples and the rest
for D in [1, 7, 8, 24, 32, 40, 48, 80, 96, 200, 256]:
    for B, S in [(1, 300), (6, 77), (11, 4100)]:
        check(torch.randn(B, 1, 1, D), torch.randn(1, S, D), torch.randn(1, S, D),
              what=f"D={D} B={B} S={S}")

# masks: one per slot and one per batch row, the last row fully masked
for B, T, S, D in [(3, 1, 70, 64), (4, 3, 1029, 32), (13, 1, 260, 16)]:
    q, k, v = torch.randn(B, 2, T, D), torch.randn(2, S, D), torch.randn(2, S, D)
    check(q, k, v, torch.rand(S) > 0.3, what=f"mask [S] B={B} T={T}")
    m = torch.rand(B, S) > 0.5
    m[-1] = False
    check(q, k, v, m, what=f"mask [B, S] B={B} T={T}")
    out = memory_read(q, k, v, slot_mask=m, backend="cpu")
    assert (out[-1] == 0).all(), "a fully masked row reads zeros"

# one row block a group: 1-2 rows take the one-pass body (4 keys a step, each step's scores
# computed a step ahead: 4, 8 and 9 keys are one full step, two, two and a partial one), 3-4
# rows the chunked pass's one block: masks dense and sparse (most steps fully masked), a fully
# masked row, a NaN query, a NaN key (every row of its head reads it)
for B, S, D in [(1, 70, 64), (2, 1029, 32), (2, 6, 16), (4, 301, 32), (1, 2, 8), (1, 4, 64),
                (2, 8, 32), (2, 9, 16), (3, 9, 16)]:
    body = "one pass" if B <= 2 else "one block"
    q, k, v = torch.randn(B, 2, 1, D), torch.randn(2, S, D), torch.randn(2, S, D)
    for density in (0.5, 0.05):
        m = torch.rand(B, S) < density
        m[-1] = False
        check(q, k, v, m, what=f"{body}, mask [B, S] {density} B={B} S={S} D={D}")
        out = memory_read(q, k, v, slot_mask=m, backend="cpu")
        assert (out[-1] == 0).all(), "a fully masked row reads zeros"
    qn = q.clone()
    qn[0, 1, 0, 3] = float("nan")
    out = memory_read(qn, k, v, backend="cpu")
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()
    check(qn, k, v, what=f"{body}, NaN query B={B} S={S} D={D}")
    kn = k.clone()
    kn[0, S // 2, 0] = float("nan")
    out = memory_read(q, kn, v, backend="cpu")
    assert out[:, 0].isnan().all() and not out[:, 1].isnan().any()
    check(q, kn, v, what=f"{body}, NaN key B={B} S={S} D={D}")

# x50 logits: the online softmax's rescaling across chunks
for B, S, D in [(8, 2000, 64), (3, 129, 48), (1, 5000, 16)]:
    q, k, v = 50 * torch.randn(B, 2, 1, D), torch.randn(2, S, D), torch.randn(2, S, D)
    check(q, k, v, what=f"x50 B={B} S={S}")

# a NaN query poisons its own row only
q, k, v = torch.randn(6, 2, 1, 64), torch.randn(2, 300, 64), torch.randn(2, 300, 64)
q[2, 1, 0, 5] = float("nan")
out = memory_read(q, k, v, backend="cpu")
assert out[2, 1].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()
check(q, k, v, what="NaN query")

# 7-8 rows a head (the key-major pass, its dims in pairs on AVX2: rows 0-3 and 4-7 in two
# vectors): a NaN query in each half, at an even and an odd dim, poisons its own row only;
# head dims whose pairs are not a whole number of prefetch steps
for B, row, dim in [(8, 5, 4), (8, 7, 63), (7, 1, 0), (8, 3, 30)]:
    q, k, v = torch.randn(B, 2, 1, 64), torch.randn(2, 301, 64), torch.randn(2, 301, 64)
    q[row, 0, 0, dim] = float("nan")
    out = memory_read(q, k, v, backend="cpu")
    others = [b for b in range(B) if b != row]
    assert out[row, 0].isnan().all() and not out[others].isnan().any(), f"NaN row {row} dim {dim}"
    check(q, k, v, what=f"NaN query B={B} row {row} dim {dim}")
for B, D in [(7, 24), (8, 40), (7, 200)]:
    check(torch.randn(B, 2, 1, D), torch.randn(2, 517, D), torch.randn(2, 517, D),
          what=f"7-8 rows B={B} D={D}")

# a NaN key where the rows take more than one row block (the chunked pass, whose score pass
# also takes each row's max, NaN skipped, for the softmax): the exp still meets the NaN, so
# every row of its head reads NaN; in a full 4-key step, in the last partial one, and in a
# chunk's first key
for B, S, D, at in [(8, 300, 64, 150), (6, 301, 32, 300), (16, 1029, 16, 1028), (5, 70, 64, 3),
                    (9, 600, 64, 256)]:
    q, k, v = torch.randn(B, 2, 1, D), torch.randn(2, S, D), torch.randn(2, S, D)
    k[0, at, 0] = float("nan")
    out = memory_read(q, k, v, backend="cpu")
    assert out[:, 0].isnan().all() and not out[:, 1].isnan().any(), f"NaN key B={B} at {at}"
    check(q, k, v, what=f"chunked pass, NaN key B={B} S={S} D={D} at {at}")

# bf16 and int8 banks, through the fused reading layer (its read is the few-row kernel)
for D, S, B, T in [(16, 6, 3, 1), (32, 1003, 5, 1), (64, 129, 3, 4), (64, 2050, 1, 1),
                   (64, 301, 2, 6)]:  # 6 rows a bank: the chunked pass on either ISA
    memory = MemoryModel(MemoryConfig(hidden_size=40, num_layers=2, num_heads=2, head_dim=D,
                                      num_slots=S, gate_init=0.5))
    bank, hidden = MemoryBank(memory, torch.randn(B, 2, S, D)), torch.randn(B, T, 40)
    for kv_dtype in (torch.float32, torch.bfloat16, torch.int8):
        with torch.no_grad():
            fused = memory.read(0, hidden, bank, kv_dtype)
            keys, values = (t.dequantize() if kv_dtype == torch.int8 else t.float()
                            for t in bank.keys_values(kv_dtype))
        want = memory.readers[0](hidden.clone().requires_grad_(), keys.clone(), values.clone())
        torch.testing.assert_close(fused, want.detach(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{kv_dtype} D={D} S={S}: {m}")
        checked += 1
# the fused reading layer's decode projections (few rows: the same blocks as
# GEMVs, split over threads for large weights), float32 against the reference
from memkernels import reading_layer
for C, M, H, Hk, D, B, T, shared in [(40, 0, 2, 2, 16, 1, 1, True), (64, 48, 4, 2, 16, 2, 2, False),
                                     (128, 0, 4, 4, 32, 3, 1, True),
                                     (512, 512, 4, 4, 32, 1, 1, True),
                                     (96, 256, 2, 1, 64, 4, 1, False)]:
    W, S = H * D, 77
    hidden = torch.randn(B, T, C)
    qw = torch.randn(W, M or C) / 8
    mlp = (torch.randn(M, C) / 8, torch.randn(M)) if M else (None, None)
    bank = (Hk, S, D) if shared else (B, Hk, S, D)
    keys, values = torch.randn(bank), torch.randn(bank)
    ow, qb = torch.randn(W, C) / 8, torch.randn(W)
    kw = dict(eps=1e-6, scale=D ** -0.5, mlp_w=mlp[0], mlp_b=mlp[1], query_b=qb,
              unit_queries=bool(M))
    got = reading_layer(hidden, qw, keys, values, ow, backend="cpu", **kw)
    want = reference.reading_layer(*(t.double() for t in (hidden, qw, keys, values, ow)), kw["eps"],
                                   kw["scale"], mlp_w=None if M == 0 else mlp[0].double(),
                                   mlp_b=None if M == 0 else mlp[1].double(), query_b=qb.double(),
                                   unit_queries=kw["unit_queries"])
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=5e-5,
                               msg=lambda m: f"reading layer C={C} M={M} B={B} T={T}: {m}")
    checked += 1

# the decode step on widths a multiple of the vector width (1-4 rows, the
# projections and the read on the vector bodies): one kv head over many slots,
# the context and biases, x50 logits, a NaN row, per-row banks, bf16 / int8 banks
def layer_case(C, M, H, Hk, D, B, T, S, shared, context=False, logit=1.0, nan_row=None,
               kv_dtype=torch.float32, query_bias=True):
    global checked
    W = H * D
    hidden = torch.randn(B, T, C)
    if nan_row is not None:
        hidden.view(B * T, C)[nan_row, 3] = float("nan")
    qw, ow = torch.randn(W, M or C) / 8, torch.randn(W, C) / 8
    qb = torch.randn(W) if query_bias else None
    mlp_w = torch.randn(M, C) / 8 if M else None
    mlp_b = torch.randn(M) if M else None  # an MLP query always has its bias
    ctx, ctx_w = (torch.randn(B, T, C), torch.randn(M, C) / 8) if context else (None, None)
    bank = (Hk, S, D) if shared else (B, Hk, S, D)
    keys, values = torch.randn(bank), torch.randn(bank)
    kw = dict(eps=1e-6, scale=logit * D ** -0.5, mlp_w=mlp_w, mlp_b=mlp_b, query_b=qb,
              unit_queries=bool(M), context=ctx, context_w=ctx_w)
    k_in, v_in, scales = keys, values, {}
    if kv_dtype == torch.bfloat16:
        k_in, v_in = keys.bfloat16(), values.bfloat16()
        keys, values = k_in.float(), v_in.float()
    elif kv_dtype == torch.int8:
        ks, vs = keys.abs().amax(-1) / 127, values.abs().amax(-1) / 127
        k_in = (keys / ks[..., None]).round().to(torch.int8)
        v_in = (values / vs[..., None]).round().to(torch.int8)
        keys, values = k_in.float() * ks[..., None], v_in.float() * vs[..., None]
        scales = dict(key_scale=ks, value_scale=vs)
    got = reading_layer(hidden, qw, k_in, v_in, ow, backend="cpu", **kw, **scales)
    dbl = lambda t: None if t is None else t.double()
    want = reference.reading_layer(*(t.double() for t in (hidden, qw, keys, values, ow)), kw["eps"],
                                   kw["scale"], mlp_w=dbl(mlp_w), mlp_b=dbl(mlp_b),
                                   query_b=dbl(qb), unit_queries=kw["unit_queries"],
                                   context=dbl(ctx), context_w=dbl(ctx_w))
    tol = 5e-5 * logit
    torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"decode layer C={C} M={M} H={H} Hk={Hk} D={D} "
                                             f"B={B} T={T} S={S} x{logit} {kv_dtype}: {m}")
    if nan_row is not None:
        rows = got.view(B * T, C)
        assert rows[nan_row].isnan().all(), "a NaN hidden state poisons its own row"
        assert not rows[[i for i in range(B * T) if i != nan_row]].isnan().any()
    checked += 1

for C, M, H, Hk, D, B, T, S, shared in [
        (512, 512, 8, 4, 32, 1, 1, 1024, True),   # the benchmark's shape
        (256, 256, 4, 1, 64, 1, 1, 1029, True),   # one kv head
        (256, 0, 4, 1, 64, 3, 1, 5000, True),     # linear query, 3 rows
        (128, 64, 2, 2, 16, 2, 2, 700, False),    # per-row banks, 2 tokens each
        (256, 128, 6, 3, 32, 4, 1, 1, True),      # one slot
        (64, 32, 2, 1, 32, 1, 1, 3, True),        # small: one thread
        (560, 520, 3, 1, 40, 2, 1, 300, True)]:   # threaded projections on odd widths
    layer_case(C, M, H, Hk, D, B, T, S, shared)
layer_case(256, 256, 4, 1, 64, 1, 1, 1029, True, context=True)
layer_case(256, 128, 4, 1, 32, 3, 1, 2000, True, context=True, logit=50.0)
layer_case(256, 128, 4, 1, 32, 4, 1, 2000, True, nan_row=2)
layer_case(256, 128, 4, 2, 32, 3, 1, 600, True, nan_row=0)
# the decode step in one parallel region (more than one thread, and every projection split
# over them: weights of >= 64K elements): shared and per-row banks, 1-4 rows, a linear query,
# x50 logits, a NaN row, bf16 / int8 banks; on 2 threads, and on 3 (uneven column shares, a
# thread with no group of its own to read)
threads_before = torch.get_num_threads()
for threads in (2, 3):
    torch.set_num_threads(threads)
    for C, M, H, Hk, D, B, T, S, shared in [
            (256, 256, 8, 2, 32, 3, 1, 777, True),    # 3 rows, 4 query heads a kv head
            (256, 256, 8, 4, 32, 2, 2, 333, False),   # per-row banks, 2 tokens each
            (256, 0, 8, 2, 32, 4, 1, 901, True)]:     # linear query, 4 rows
        layer_case(C, M, H, Hk, D, B, T, S, shared)
    layer_case(256, 256, 8, 2, 32, 4, 1, 500, True, logit=50.0)
    layer_case(256, 256, 8, 2, 32, 4, 1, 500, True, nan_row=1)
    layer_case(256, 256, 8, 2, 32, 1, 1, 400, True, query_bias=False)
    for kv_dtype in (torch.bfloat16, torch.int8):
        layer_case(256, 256, 8, 2, 32, 2, 1, 700, True, kv_dtype=kv_dtype)
        layer_case(256, 256, 8, 2, 32, 2, 1, 300, False, kv_dtype=kv_dtype)
torch.set_num_threads(threads_before)
for kv_dtype in (torch.bfloat16, torch.int8):
    layer_case(256, 256, 4, 1, 64, 2, 1, 1500, True, kv_dtype=kv_dtype)
    layer_case(128, 64, 4, 2, 32, 2, 1, 300, False, kv_dtype=kv_dtype)
    # many rows a group: the tile path, each widened key and value block (with int8's row
    # scales) taken by the row tiles of a span (one thread: 2 groups of 5 tiles give spans
    # of 2), over three key blocks
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    layer_case(128, 0, 4, 2, 64, 2, 320, 1029, True, kv_dtype=kv_dtype)
    torch.set_num_threads(threads_before)

# the tile path (more than 16 rows a group: prefill, backward, the write), whose
# softmax rows (exp, and p and dS in the backward) run on the same ISA body:
# forward and gradients against float64, row counts and key counts across the
# 256-row and 512-key tiles and the vector width, masks with all-masked rows,
# x50 logits, NaN
def grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach(), [t.grad for t in tensors]

def check_grads(fn, want_fn, tensors, what, tol=1e-4, out_tol=2e-5):
    global checked
    out, got = grads(fn, tensors)
    want_out, want = grads(want_fn, [t.double() for t in tensors])
    torch.testing.assert_close(out, want_out.float(), rtol=out_tol, atol=out_tol, equal_nan=True,
                               msg=lambda m: f"{what} out: {m}")
    for name, g, w in zip("qkvabcdef", got, want):
        torch.testing.assert_close(g, w.float(), rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{what} d{name}: {m}")
    checked += 1

for (B, T), S, D, logit in itertools.product([(1, 17), (2, 37), (1, 300)], [1, 15, 513, 1029],
                                             [16, 33, 64], [1.0, 50.0]):
    q, k, v = logit * torch.randn(B, 2, T, D), torch.randn(2, S, D), torch.randn(2, S, D)
    mask = torch.rand(B, S) > 0.4
    mask[-1] = False
    # the backward from the kept probabilities (save_probs, rescaled a key block at a
    # time: x50 logits move the rows' running max from block to block) and recomputing them
    for m, save in itertools.product((None, mask), (True, False)):
        check_grads(lambda q, k, v: memory_read(q, k, v, slot_mask=m, backend="cpu",
                                                save_probs=save),
                    lambda q, k, v: reference.memory_read(q, k, v, slot_mask=m), [q, k, v],
                    f"tile read B={B} T={T} S={S} D={D} x{logit} mask={m is not None} "
                    f"save_probs={save}",
                    # a score's float32 rounding grows with it; dK sums dS * q on top
                    tol=1e-4 * logit, out_tol=2e-5 if logit == 1.0 else 1e-4)
# the tile GEMMs' column strips (4 vectors of 16 floats on AVX-512, 2 of 8 on
# AVX2, then the rest) and row blocks (6 rows, then 1-5): head dims of 1 to 32
# vectors, key counts that pad the score tile's rows to the vector width; K^T's
# panels (64 columns on AVX-512, 16 on AVX2) with a short last one (612 keys:
# 9 full panels and 48 columns on AVX-512)
for D, (B, T), S in itertools.product([8, 24, 48, 80, 128, 256], [(1, 23), (2, 37)],
                                      [7, 530, 612]):
    q, k, v = torch.randn(B, 2, T, D), torch.randn(2, S, D), torch.randn(2, S, D)
    mask = torch.rand(B, S) > 0.4
    mask[-1] = False
    for save in (True, False):
        check_grads(lambda q, k, v: memory_read(q, k, v, slot_mask=mask, backend="cpu",
                                                save_probs=save),
                    lambda q, k, v: reference.memory_read(q, k, v, slot_mask=mask), [q, k, v],
                    f"tile GEMMs B={B} T={T} S={S} D={D} save_probs={save}")
# spans of several row tiles (slot_bank_cpu.cpp: for_each_row_span; their
# length follows the tile count per thread, so 1 and 2 threads give spans of
# 1-4 tiles here), a span's last tile short, a group in more than one span
from memkernels import memory_write
threads_before = torch.get_num_threads()
for threads in (1, 2):
    torch.set_num_threads(threads)
    for B, H, T, S, D in [(2, 8, 300, 600, 32), (1, 4, 1100, 1029, 64)]:
        q, k, v = torch.randn(B, H, T, D), torch.randn(H, S, D), torch.randn(H, S, D)
        mask = torch.rand(B, S) > 0.3
        for save in (True, False):
            check_grads(lambda q, k, v: memory_read(q, k, v, slot_mask=mask, backend="cpu",
                                                    save_probs=save),
                        lambda q, k, v: reference.memory_read(q, k, v, slot_mask=mask),
                        [q, k, v], f"row spans, {threads} thread(s), B={B} H={H} T={T} S={S} "
                        f"D={D} save_probs={save}")
    tensors = [torch.randn(2, 2, 700, 32), torch.randn(2, 2, 700, 32), torch.randn(2, 2, 90, 32),
               torch.randn(2, 2, 90, 32), torch.randn(2, 2, 700, 1), torch.randn(2, 2, 700, 1)]
    for save in (True, False):  # the forward's probabilities kept for the backward, or recomputed
        check_grads(lambda *t: memory_write(*t, backend="cpu", save_probs=save),
                    lambda *t: reference.memory_write(*t), tensors,
                    f"write row spans, {threads} thread(s), save_probs={save}")
torch.set_num_threads(threads_before)
q, k, v = torch.randn(2, 2, 40, 64), torch.randn(2, 700, 64), torch.randn(2, 700, 64)
q[1, 0, 3, 7] = float("nan")
out = memory_read(q, k, v, backend="cpu")
assert out[1, 0, 3].isnan().all() and not out[1, 0, [0, 1, 2, 4]].isnan().any()
check(q, k, v, what="tile NaN query")
for (B, S, T, D, gate), save in itertools.product(
        [(2, 20, 33, 16, 1), (1, 300, 515, 64, 64), (2, 17, 1, 33, 1), (2, 70, 512, 32, 1),
         (1, 40, 9, 64, 64)], (True, False)):
    tensors = [torch.randn(B, 2, S, D), torch.randn(B, 2, S, D), torch.randn(B, 2, T, D),
               torch.randn(B, 2, T, D), torch.randn(B, 2, S, gate), torch.randn(B, 2, S, gate)]
    tm = torch.rand(B, T) > 0.3
    tm[0] = False
    check_grads(lambda *t: memory_write(*t, token_mask=tm, backend="cpu", save_probs=save),
                lambda *t: reference.memory_write(*t, token_mask=tm), tensors,
                f"write B={B} S={S} T={T} D={D} save_probs={save}")
# the softmax's exp across its whole range: one-hot values make the output the
# probabilities themselves; scores from 0 down past -87.7, where the vector exp
# returns exactly 0. Within 1e-6 of float64's, relative (the exp is ~2e-7; the
# row sum's and the output's roundings add a few 1e-8), plus the spacing of
# float32's subnormals for the smallest (exp(-87) / the row sum is one); from
# -87 to -87.7 ~1e-38 or 0 (a scalar tail's exp is 0 below -87).
S = 256
scores = torch.cat([torch.zeros(1), -torch.rand(S - 12) * 87, -87 - torch.rand(3) * 0.68,
                    -87.7 - torch.rand(8) * 10])
k = torch.zeros(1, S, S)
k[0, :, 0] = scores
v = torch.eye(S).unsqueeze(0)
for T in (1, 40):  # the few-row body and the tile path
    q = torch.zeros(1, 1, T, S)
    q[..., 0] = 1.0
    got = memory_read(q, k, v, scale=1.0, backend="cpu")[0, 0].double()
    want = torch.softmax(scores.double(), 0).expand(T, S)
    kept, zero = scores >= -87, scores < -87.7
    err = (got - want).abs()[:, kept] - 1e-6 * want[:, kept]
    assert (err <= 1e-44).all(), f"exp probe T={T}: {err.max().item():.3g} over the tolerance"
    tiny = got[:, ~kept & ~zero]
    assert ((tiny >= 0) & (tiny <= 2e-38)).all(), f"exp probe T={T}: -87 to -87.7 not tiny"
    assert (got[:, zero] == 0).all(), f"exp probe T={T}: a score below -87.7 did not read 0"
    checked += 1

print("ok", checked)
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


# the CPU flags simd.h's best_isa() asks before it runs each ISA's bodies
ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
             "avx2": {"avx2", "fma"}, "generic": set()}


# layout: the few-row chunked pass's score layout, "auto" (as the CPU picks:
# key-major where the rows fill 7/8 of one vector or 3/4 of two,
# few_rows_body.inc), or forced for every group it can take ("key-major") or
# none ("row-major"), so each ISA body runs both on any CPU
@pytest.mark.parametrize("isa,gemm,layout", [
    ("avx512", "avx512", "auto"), ("avx2", "avx2", "auto"), ("generic", "blas", "auto"),
    ("avx512", "blas", "key-major"), ("avx2", "blas", "key-major"),
    ("avx512", "blas", "row-major"), ("avx2", "blas", "row-major"),
    ("avx512", "avx512", "key-major")])
def test_cpu_kernels_match_the_reference_on_each_isa(isa, gemm, layout):
    """Each ISA body, with the tile GEMMs on its register-blocked kernel and on
    the vendor BLAS (MEMKERNELS_CPU_GEMM=blas). The BLAS runs also force the
    few-row read's long chunk (MEMKERNELS_CPU_CHUNK=l2: 64 KiB of K, which
    only AVX-512 on 256-bit units takes by itself for more rows than a
    register block), so both chunks run on every CPU, and one score layout
    (MEMKERNELS_CPU_KEY_MAJOR); a layout forced beside the ISA's own GEMM takes
    the short chunk (l1), which AVX-512 on 256-bit units never picks itself."""
    if _backend.extension()[0] is None:
        pytest.skip("needs memkernels._C")
    if not ISA_NEEDS[isa] <= _cpu_flags():
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, MEMKERNELS_CPU_ISA=isa)
    for name in ("MEMKERNELS_CPU_GEMM", "MEMKERNELS_CPU_CHUNK", "MEMKERNELS_CPU_KEY_MAJOR"):
        env.pop(name, None)
    if gemm == "blas":
        env["MEMKERNELS_CPU_GEMM"] = "blas"
        env["MEMKERNELS_CPU_CHUNK"] = "l2"
    if layout != "auto":
        env["MEMKERNELS_CPU_KEY_MAJOR"] = "1" if layout == "key-major" else "0"
        if gemm != "blas":
            env["MEMKERNELS_CPU_CHUNK"] = "l1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.split()
    assert lines[0] == isa, f"MEMKERNELS_CPU_ISA={isa} ran the {lines[0]} body"
    assert lines[1] == gemm, f"the tile GEMMs ran on {lines[1]}, not {gemm}"
    if gemm == "blas" and isa != "generic":  # 8 rows of Dh 64: 256 keys a pass
        assert lines[2] == "256", f"MEMKERNELS_CPU_CHUNK=l2 read {lines[2]} keys a pass"
    if gemm != "blas" and layout != "auto":  # 64 keys a pass
        assert lines[2] == "64", f"MEMKERNELS_CPU_CHUNK=l1 read {lines[2]} keys a pass"
    # the vectors a key's scores take for 8 and 16 rows of Dh 64 (0: row-major)
    want = {"auto": {"avx512": "0 1", "avx2": "1 2", "generic": "0 0"},
            "key-major": {"avx512": "1 1", "avx2": "1 2"},
            "row-major": {"avx512": "0 0", "avx2": "0 0"}}[layout][isa]
    assert " ".join(lines[3:5]) == want, f"layout {layout} on {isa}: {lines[3:5]}, not {want}"
    assert lines[-2] == "ok" and int(lines[-1]) > 400, done.stdout[-500:]


# the bench's rate probes a step, a thread: the FMA probe's 12 vector FMAs, and the L1
# product probe's block (rows x vectors) over 64 steps (tile_gemm_body.inc)
PROBE_BLOCKS = {"avx512": (5, 5, 16), "avx2": (4, 3, 8)}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_rate_probes_count_the_flops_of_each_isa_body(isa):
    """cpu_fma_burst and cpu_gemm_l1_burst on every OpenMP thread of the body
    MEMKERNELS_CPU_ISA picks: the FLOPs each returns are its block's on every
    thread, 0 where no vector body runs (the bench then records no such rate)."""
    if _backend.extension()[0] is None:
        pytest.skip("needs memkernels._C")
    if not ISA_NEEDS[isa] <= _cpu_flags():
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, MEMKERNELS_CPU_ISA=isa, OMP_NUM_THREADS="2")
    script = "import memkernels._C as C; print(C.cpu_fma_burst(3), C.cpu_gemm_l1_burst(3))"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    fma, product = (float(x) for x in done.stdout.split())
    if isa == "generic":
        assert (fma, product) == (0.0, 0.0)
        return
    rows, vectors, width = PROBE_BLOCKS[isa]
    assert fma == 3 * 2 * 2 * 12 * width
    assert product == 3 * 2 * 2 * rows * vectors * width * 64


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64",
                    reason="needs g++ on x86-64")
def test_vector_exp_on_both_bodies(tmp_path):
    """The softmax rows' vector exp over ~1M floats spread along the line
    (csrc/tools/exp_vec_check.cpp): the AVX2 and AVX-512 bodies where the CPU
    has them, and the AVX-512 body's arithmetic emulated lane by lane, so CI
    checks it on CPUs without AVX-512 (the native bodies must match the
    emulation bit for bit). Within 3e-7 of double exp on [-87, 88], 0 below
    -87.7, NaN kept."""
    exe = tmp_path / "exp_vec_check"
    build = subprocess.run(["g++", "-O2", "-std=c++17", "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "csrc", "tools", "exp_vec_check.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe), "4099"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found = {}
    for line in run.stdout.split("\n"):
        if line.strip():
            body, *fields = line.split()
            found[body] = {k: float(v) for k, v in (f.split("=") for f in fields)}
    flags = _cpu_flags()
    bodies = {"avx512-emulated"} | {isa for isa in ("avx2", "avx512") if ISA_NEEDS[isa] <= flags}
    assert set(found) == bodies, run.stdout
    for body, e in found.items():
        assert e["below0"] < 3e-7 and e["above0"] < 3e-7 and e["broken"] == 0, (body, e)
    for body in ("avx2", "avx512"):  # the native bodies bit for bit the emulation's
        if body in found:
            assert found[body]["differ"] == 0, (body, found[body])
