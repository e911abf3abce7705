"""The shared-bank decode through memkernels.memory_read (the bench's path: the groups handed
out dynamically over the threads) at the same bytes and FLOPs split into 16, 32 or 64 heads,
in turns. If more, smaller groups read faster, the last group's tail (one thread idle while
the other ends its group) costs that much, and splitting a group's keys would pay.

    PYTHONPATH=. python benchmarks/experiments/decode_group_tail.py [ROUNDS]
"""
import functools
import statistics
import sys
import time

import torch

import memkernels

B, D, TOTAL_KEYS = 8, 64, 16 * 8192
SHAPES = [(16, 8192), (32, 4096), (64, 2048)]  # heads, keys a head
SETS = 8  # banks rotated: 8 x 67 MB, past the L3


def main(rounds: int) -> None:
    torch.manual_seed(0)
    sets = {h: [[torch.randn(B, h, 1, D), torch.randn(h, TOTAL_KEYS // h, D),
                 torch.randn(h, TOTAL_KEYS // h, D)] for _ in range(SETS)] for h, _ in SHAPES}
    read = torch.no_grad()(functools.partial(memkernels.memory_read, backend="cpu"))

    def median_seconds(h: int, reps: int = 48) -> float:
        times = []
        for i in range(reps):
            args = sets[h][i % SETS]
            t0 = time.perf_counter()
            read(*args)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    for h, _ in SHAPES:  # warm-up
        median_seconds(h, 8)
    ms = {h: [] for h, _ in SHAPES}
    for r in range(rounds):
        for h, _ in (SHAPES if r % 2 == 0 else SHAPES[::-1]):
            ms[h].append(median_seconds(h) * 1e3)
    for h, s in SHAPES:
        print(f"H={h:3d} S={s:5d}: median of medians {statistics.median(ms[h]):.3f} ms  "
              f"{[round(x, 2) for x in ms[h]]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
