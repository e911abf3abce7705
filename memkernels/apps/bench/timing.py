"""Timing and the machine's limits, measured in the same run as the kernels
so ratios survive a noisy shared machine."""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_graphed(fns: Sequence[Callable[[], object]]) -> list[Callable[[], object]]:
    """Each fn captured in a CUDA graph (replay = the GPU work without the
    host's launch overhead, as a decode loop under CUDA graphs runs it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g.replay)
    return graphs


def median_time(fns: Sequence[Callable[[], object]], device: torch.device, *,
                min_time: float = 1.0, warmup: int = 2, max_reps: int = 200) -> float:
    """Median seconds per call. `fns` are the same computation on rotating
    input sets, so repeated calls do not just hit the cache."""
    for i in range(warmup):
        fns[i % len(fns)]()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while (time.perf_counter() - start < min_time or len(times) < 5) and len(times) < max_reps:
        fn = fns[i % len(fns)]
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        i += 1
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device copy, counting bytes read plus written."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = median_time([lambda: y.copy_(x)], device, min_time=0.5)
    return 2 * x.numel() * 4 / t


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large read-only stream (a sum over rotating buffers past
    the last-level cache): the floor of a kernel that reads its bytes once,
    such as a decode read of a bank. Higher than copy_bandwidth's, which
    also writes."""
    xs = [torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    fns = [functools.partial(torch.sum, x) for x in xs]
    return xs[0].numel() * 4 / median_time(fns, device, min_time=0.5)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 4096) -> float:
    """FLOP/s of a large square matmul on random data in `dtype`."""
    if device.type == "cpu":
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time([lambda: a @ b], device, min_time=0.5)
    return 2 * n ** 3 / t
