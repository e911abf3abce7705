"""What the first touch of fresh outputs costs a CPU training step: the memory
write's forward+backward (through autograd.grad, as a training step calls it),
ours and the eager reference, in turns, with each call's minor page faults.

    python -m memkernels.apps.bench.faults [--reps 5] [--calls 8]
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 python -m ...
    THP_MEM_ALLOC_ENABLE=1 python -m ...

The allocator settings are the process's (glibc and PyTorch read them at
start), so each is a run of its own; docs/performance.md ("Training on the
CPU") quotes these runs. Prints, per rep, each side's median ms a call and its
faults a call, then the medians over reps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memkernels
from memkernels.apps.bench.shapes import CPU_WRITE, WriteShape
from memkernels.apps.bench.timing import minor_faults
from memkernels.ops import reference


def write_inputs(shape: WriteShape, sets: int = 2) -> list[list[torch.Tensor]]:
    B, H, S, T, D = shape.B, shape.H, shape.S, shape.T, shape.D
    dims = [(B, H, S, D), (B, H, S, D), (B, H, T, D), (B, H, T, D), (B, H, S, 1), (B, H, S, 1)]
    return [[torch.randn(*d).requires_grad_() for d in dims] for _ in range(sets)]


def step(write, inputs):
    """One training step's write: forward, then the gradients of every input."""
    out = write(*inputs)
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


def measure(shape: WriteShape, reps: int, calls: int) -> dict[str, list[tuple[float, float]]]:
    """{side: [(median ms a call, faults a call) per rep]}, the sides in turns."""
    sets = write_inputs(shape)
    sides = {"memkernels": lambda *x: memkernels.memory_write(*x, backend="cpu"),
             "reference (eager)": reference.memory_write}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, write in sides.items():
            times, before = [], minor_faults()
            for i in range(calls):
                t = time.perf_counter()
                step(write, sets[i % len(sets)])
                times.append(time.perf_counter() - t)
            got[name].append((1e3 * statistics.median(times), (minor_faults() - before) / calls))
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=8, help="timed calls a side a rep")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.calls < 1:
        ap.error("--reps and --calls must be >= 1")
    shape = CPU_WRITE[0]
    got = measure(shape, args.reps, args.calls)
    for rep in range(args.reps):
        print(f"rep {rep + 1}: " + "; ".join(
            f"{name} {got[name][rep][0]:.1f} ms, {got[name][rep][1]:,.0f} faults a call"
            for name in got))
    print(f"{shape.name} B={shape.B} H={shape.H} S={shape.S} T={shape.T} D={shape.D}, medians "
          "over reps: " + "; ".join(
              f"{name} {statistics.median(m for m, _ in r):.1f} ms, "
              f"{statistics.median(f for _, f in r):,.0f} faults a call" for name, r in got.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
