"""The shared-bank decode read with its bank in cache or from DRAM (an ad-hoc
probe for docs/performance.md, "CPU, a Zen 3 host"): B=8 query rows per head,
H=16 heads of 64 over S keys, float32, the CPU backend.

    python benchmarks/experiments/decode_residency.py S BANKS

BANKS=1 reads one bank again and again (from cache when it fits); more banks
are rotated, so that each call reads its bank from DRAM. Prints the median
call and the time per key (both cores).
"""
import statistics
import sys
import time

import torch

import memkernels

B, H, D = 8, 16, 64


def main(S: int, banks: int, seconds: float = 5.0) -> None:
    ks = [torch.randn(H, S, D) for _ in range(banks)]
    vs = [torch.randn(H, S, D) for _ in range(banks)]
    q = torch.randn(B, H, 1, D)
    times = []
    with torch.no_grad():
        for i in range(5):
            memkernels.memory_read(q, ks[i % banks], vs[i % banks], backend="cpu")
        end, i = time.time() + seconds, 0
        while time.time() < end:
            start = time.perf_counter()
            memkernels.memory_read(q, ks[i % banks], vs[i % banks], backend="cpu")
            times.append(time.perf_counter() - start)
            i += 1
    m = statistics.median(times)
    print(f"S={S} banks={banks} ({2 * H * S * D * 4 / 1e6:.1f} MB each): median "
          f"{1e3 * m:.3f} ms, {1e9 * m / (H * S):.1f} ns a key")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
