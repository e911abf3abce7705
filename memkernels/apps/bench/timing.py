"""Timing and the machine's limits, measured in the same run as the kernels
so ratios survive a noisy shared machine."""
from __future__ import annotations

import functools
import resource  # getrusage: page faults (the project builds on Unix only)
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from memkernels.ops import backend


def minor_faults() -> int:
    """Minor page faults of this process so far (all its threads). On the CPU
    each is a first touch of a fresh page: a call that allocates large
    temporaries the allocator has handed back to the OS pays one per 4 KiB page."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


def _time_calls(fns: Sequence[Callable[[], object]], device: torch.device, seconds: float,
                min_calls: int, max_calls: int, start: int = 0) -> list[float]:
    """Seconds of each call, cycling through `fns` from index `start`, for
    `seconds` (at least min_calls, at most max_calls calls)."""
    times: list[float] = []
    t0 = time.perf_counter()
    i = start
    while (time.perf_counter() - t0 < seconds or len(times) < min_calls) and len(times) < max_calls:
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
    return times


def median_times(fn_lists: Sequence[Sequence[Callable[[], object]]], device: torch.device, *,
                 min_time: float = 1.0, rounds: int = 1, warmup: int = 2,
                 max_reps: int = 200, faults: Optional[list] = None) -> list[float]:
    """Median seconds per call of each entry of `fn_lists` (each entry: the
    same computation on rotating input sets, so repeated calls do not just
    hit the cache). The entries take turns, `rounds` times, each turn
    min_time / rounds seconds: a slow minute on a shared machine then lands
    on every entry alike, and their ratios hold.

    faults: a list to receive, per entry, the process's minor page faults a
    timed call on the CPU (minor_faults over the entry's turns; None on a
    GPU): what part of a time went to first touches of memory the allocator
    had given back."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fns in fn_lists:
        for i in range(warmup):
            fns[i % len(fns)]()
    sync(device)
    samples: list[list[float]] = [[] for _ in fn_lists]
    counted = device.type == "cpu"
    touched = [0] * len(fn_lists)
    min_calls, max_calls = -(-5 // rounds), max(1, max_reps // rounds)
    for _ in range(rounds):
        for e, (fns, got) in enumerate(zip(fn_lists, samples)):
            before = minor_faults() if counted else 0
            got += _time_calls(fns, device, min_time / rounds, min_calls, max_calls, len(got))
            touched[e] += (minor_faults() - before) if counted else 0
    if faults is not None:
        faults[:] = [n / len(got) if counted else None for n, got in zip(touched, samples)]
    return [statistics.median(got) for got in samples]


def median_time(fns: Sequence[Callable[[], object]], device: torch.device, *,
                min_time: float = 1.0, warmup: int = 2, max_reps: int = 200) -> float:
    """Median seconds per call of one computation (median_times of one entry)."""
    return median_times([fns], device, min_time=min_time, warmup=warmup, max_reps=max_reps)[0]


@dataclass
class Probe:
    """A computation that measures one of the machine's limits: `work` bytes
    or FLOPs per call, so the limit is work / (seconds per call)."""
    fns: list[Callable[[], object]]
    work: float


def copy_probe(device: torch.device, nbytes: int = 1 << 30) -> Probe:
    """A large device copy; its work counts bytes read plus written."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    return Probe([lambda: y.copy_(x)], 2 * x.numel() * 4)


def read_probe(device: torch.device, nbytes: int = 1 << 30) -> Probe:
    """A large read-only stream (a sum over rotating buffers past the
    last-level cache): the floor of a kernel that reads its bytes once, such
    as a decode read of a bank. Higher than the copy's, which also writes."""
    xs = [torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    return Probe([functools.partial(torch.sum, x) for x in xs], xs[0].numel() * 4)


def first_touch_probe(device: torch.device, nbytes: int = 64 << 20) -> Probe:
    """A fresh allocation of a large temporary's size, written once: what an
    allocating implementation (eager, compiled) pays per new tensor past the
    cache. On the CPU the pages fault in on first touch; on a VM with slow
    faults this is a fraction of the copy, and those baselines slow with it.
    (On CUDA the caching allocator makes it a plain fill.) Its work: bytes."""
    n = nbytes // 4
    return Probe([lambda: torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)], nbytes)


def matmul_probe(device: torch.device, dtype: torch.dtype, n: int = 4096) -> Probe:
    """A large square matmul on random data in `dtype` (2048 on the CPU)."""
    if device.type == "cpu":
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return Probe([lambda: a @ b], 2 * n ** 3)


def fma_probe(device: torch.device, steps: int = 2_000_000) -> Optional[Probe]:
    """On the CPU: independent vector FMAs on every thread at the ISA the
    kernels run (memkernels._C.cpu_fma_burst), the rate the cores' FMA units reach. A
    kernel can approach it where the vendor BLAS behind the matmul probe does
    not (MKL runs its AVX2 code on AMD CPUs with AVX-512). None elsewhere, or
    without the extension or AVX2."""
    return _burst_probe(device, "cpu_fma_burst", steps)


def l1_product_probe(device: torch.device, steps: int = 32_000) -> Optional[Probe]:
    """On the CPU: a register-blocked product on operands in L1 on every thread
    at the ISA the kernels run (memkernels._C.cpu_gemm_l1_burst), at the fewest
    loads a FMA the ISA's registers allow: the rate a GEMM's inner loop reaches
    in this minute, its loads included, which the FMA probe's register-only
    FMAs leave out. On a shared core whose neighbour takes the load ports in
    some minutes the two part. None elsewhere, or without the extension or AVX2."""
    return _burst_probe(device, "cpu_gemm_l1_burst", steps)


def _burst_probe(device: torch.device, binding: str, steps: int) -> Optional[Probe]:
    """A CPU probe from an extension binding that runs `steps` steps on every
    thread and returns the FLOPs done (0 where no vector body runs)."""
    if device.type != "cpu":
        return None
    burst = getattr(backend.extension()[0], binding, None)
    if burst is None:
        return None
    flops = burst(1)  # per step, all threads
    return Probe([lambda: burst(steps)], flops * steps) if flops > 0 else None


def measure(probe: Probe, device: torch.device, min_time: float = 0.5) -> float:
    """The probe's limit: bytes/s or FLOP/s."""
    return probe.work / median_time(probe.fns, device, min_time=min_time)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device copy, counting bytes read plus written."""
    return measure(copy_probe(device, nbytes), device)
