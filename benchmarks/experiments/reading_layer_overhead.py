"""What the public reading_layer adds over its kernel call, and the kernel over
a sum of its bytes (an ad-hoc probe for docs/log.md):

    python benchmarks/experiments/reading_layer_overhead.py [S ...]

The bench's reader shape (C=512, an MLP query of 512, 8 query heads over 4 kv
heads of 32, a shared bank of S slots), 32 input sets rotated as the bench
does (so the inputs come from DRAM while the interpreter's own data mostly
stays in the L3). Three calls alternate set by set: memkernels.reading_layer
(no gradients), memkernels._C.reader_fwd with the same arguments, and one
torch.sum over the set's bytes laid end to end. Medians in microseconds.
"""
from __future__ import annotations

import sys
import time

import torch

import memkernels
from memkernels.ops import backend

C, M, H, HK, D, SETS, ROUNDS = 512, 512, 8, 4, 32, 32, 50


def inputs(S: int) -> list[torch.Tensor]:
    return [torch.randn(1, 1, C), torch.randn(M, C) / C ** 0.5, torch.randn(M),
            torch.randn(H * D, M) / M ** 0.5, torch.randn(H * D, C) / C ** 0.5,
            torch.randn(HK, S, D), torch.randn(HK, S, D)]


def main(sizes: list[int]) -> None:
    kernel = backend.extension()[0].reader_fwd
    torch.set_grad_enabled(False)
    for S in sizes:
        sets = [inputs(S) for _ in range(SETS)]
        flat = [torch.cat([t.reshape(-1) for t in s]) for s in sets]
        calls = {
            "memkernels.reading_layer": lambda i: memkernels.reading_layer(
                sets[i][0], sets[i][3], sets[i][5], sets[i][6], sets[i][4], eps=1e-6, scale=20.0,
                mlp_w=sets[i][1], mlp_b=sets[i][2], unit_queries=True),
            "_C.reader_fwd": lambda i: kernel(
                sets[i][0], sets[i][3], sets[i][5], sets[i][6], sets[i][4], 1e-6, 20.0, None, None,
                sets[i][1], sets[i][2], None, True, None, None, None, None, 0),
            "torch.sum of its bytes": lambda i: torch.sum(flat[i]),
        }
        assert torch.equal(calls["memkernels.reading_layer"](0), calls["_C.reader_fwd"](0))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(ROUNDS):
            for name, call in calls.items():
                for i in range(SETS):
                    start = time.perf_counter()
                    call(i)
                    times[name].append(time.perf_counter() - start)
        med = {name: sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}
        kernel_us, sum_us = med["_C.reader_fwd"], med["torch.sum of its bytes"]
        print(f"S={S}: reading_layer {med['memkernels.reading_layer']:.1f} us "
              f"(+{med['memkernels.reading_layer'] - kernel_us:.1f} over the kernel call), "
              f"kernel call {kernel_us:.1f} us ({kernel_us / sum_us:.2f}x the sum), "
              f"sum {sum_us:.1f} us")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 4096])
