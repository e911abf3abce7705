"""The main job for now: a short demo of both ops on whatever device is here.

    python -m memkernels.demo

Writes tokens into a slot bank, reads it back from token queries, checks both
against the reference, and times a decode-step read against SDPA.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import memkernels
from memkernels import _backend, reference


def _median_ms(fn, reps=20):
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = _backend.resolve(None, device)
    print(f"device {device}, dtype {dtype}, backend {backend!r} "
          f"(available: {memkernels.available_backends(device)})")
    torch.manual_seed(0)
    B, H, S, T, D = 4, 8, 256, 64, 64
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731

    # write: the slots attend over 64 new tokens; gates blend the result in
    mem, q_slots = rnd(B, H, S, D), rnd(B, H, S, D)
    k_tok, v_tok = rnd(B, H, T, D), rnd(B, H, T, D)
    f, i = rnd(B, H, S, 1), rnd(B, H, S, 1)
    new_mem = memkernels.memory_write(mem, q_slots, k_tok, v_tok, f, i)
    ref_mem = reference.memory_write(mem.double(), q_slots.double(), k_tok.double(),
                                     v_tok.double(), f.double(), i.double())
    print(f"memory_write: bank {tuple(new_mem.shape)}, max |err| vs reference "
          f"{(new_mem.double() - ref_mem).abs().max().item():.2e}")

    # read: token queries attend over the (per-sequence) bank
    q = rnd(B, H, 16, D)
    out = memkernels.memory_read(q, new_mem, new_mem)
    ref = reference.memory_read(q.double(), new_mem.double(), new_mem.double())
    print(f"memory_read: out {tuple(out.shape)}, max |err| vs reference "
          f"{(out.double() - ref).abs().max().item():.2e}")

    # a decode step against a shared bank: B=8 queries, S=8192 slots per head
    B, H, S = 8, 16, 8192
    q, k, v = rnd(B, H, 1, D), rnd(H, S, D), rnd(H, S, D)
    ours = _median_ms(lambda: memkernels.memory_read(q, k, v))
    folded = _median_ms(lambda: F.scaled_dot_product_attention(
        q.transpose(0, 1).reshape(1, H, B, D), k[None], v[None]))
    expanded = _median_ms(lambda: F.scaled_dot_product_attention(
        q, k.expand(B, H, S, D), v.expand(B, H, S, D)))
    print(f"decode read B={B} H={H} S={S} D={D}: memkernels {ours:.3f} ms | "
          f"SDPA batch-folded {folded:.3f} ms ({folded / ours:.2f}x) | "
          f"SDPA bank expanded {expanded:.3f} ms ({expanded / ours:.2f}x)")
    print("full benchmarks: python -m memkernels.bench")


if __name__ == "__main__":
    main()
