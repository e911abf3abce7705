"""Sweeps the Triton forward schedule (BLOCK_M, BLOCK_N, splits, warps,
stages) at the GPU benchmark shapes, timed as CUDA-graph replays, to choose
forward_config's table. Prints every config and the best per shape.

    python -m memkernels.apps.bench.triton_sweep
"""
from __future__ import annotations

import itertools

import torch

from memkernels.apps.bench.shapes import GPU_READ
from memkernels.apps.bench.timing import copy_bandwidth, cuda_graphed, median_time
from memkernels.ops.triton.attention import MaskIndex, attention_forward, forward_config


def main() -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()} copy {bw / 1e9:.0f} GB/s")
    for shape in GPU_READ:
        G, M, N, D = shape.H, shape.B * shape.T, shape.S, shape.D
        q = torch.randn(G, M, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(G, N, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(G, N, D, device=dev, dtype=torch.bfloat16)
        if M <= 16:
            space = itertools.product([16], [64, 128, 256], [4, 8, 16, 32, 64], [4], [2, 3])
        else:
            space = itertools.product([64, 128], [32, 64, 128], [1], [4, 8], [2, 3, 4])
        results = []
        default = forward_config(G, M, N, D, dev.index or 0)
        for cfg in list(space) + [default]:
            fn = lambda cfg=cfg: attention_forward(q, k, v, MaskIndex(), D ** -0.5, q.dtype,  # noqa: E731
                                                   config=cfg)
            try:
                t = median_time(cuda_graphed([fn]), dev, min_time=0.1)
            except Exception as exc:  # out of shared memory etc.
                print(f"{shape.name} {cfg}: failed {type(exc).__name__}")
                continue
            results.append((t, cfg))
            print(f"{shape.name} {cfg}: {t * 1e6:.1f} us  {shape.flops() / t / 1e12:.0f} TFLOP/s  "
                  f"{shape.bytes(2) / t / 1e9:.0f} GB/s")
        t, cfg = min(results)
        print(f"BEST {shape.name}: {cfg} {t * 1e6:.1f} us (default {default})")


if __name__ == "__main__":
    main()
