"""What the first touch of fresh outputs costs a CPU training step: the memory
write's forward+backward (through autograd.grad, as a training step calls it),
ours and the eager reference, in turns, with each call's minor page faults.

    python -m memkernels.apps.bench.faults [--reps 5] [--calls 8] [--sides memkernels]
        [--out FILE.jsonl]
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 python -m ...
    THP_MEM_ALLOC_ENABLE=1 python -m ...

The allocator settings are the process's (glibc and PyTorch read them at
start), so each is a run of its own; docs/performance.md ("Training on the
CPU") quotes these runs. Prints, per rep, each side's median ms a call and its
faults a call, then the medians over reps; --out appends one JSON line a side
and rep (with the commit, so that runs of two builds in turns can be told
apart). --sides memkernels times ours alone: the eager side's 134 MB score
tensors churn the allocator that ours then draws from.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.apps.bench.shapes import CPU_WRITE, WriteShape
from memkernels.apps.bench.timing import minor_faults
from memkernels.ops import reference

SIDES = {"memkernels": lambda *x: memkernels.memory_write(*x, backend="cpu"),
         "reference (eager)": reference.memory_write}


def write_inputs(shape: WriteShape, sets: int = 2) -> list[list[torch.Tensor]]:
    B, H, S, T, D = shape.B, shape.H, shape.S, shape.T, shape.D
    dims = [(B, H, S, D), (B, H, S, D), (B, H, T, D), (B, H, T, D), (B, H, S, 1), (B, H, S, 1)]
    return [[torch.randn(*d).requires_grad_() for d in dims] for _ in range(sets)]


def step(write, inputs):
    """One training step's write: forward, then the gradients of every input."""
    out = write(*inputs)
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


def measure(shape: WriteShape, reps: int, calls: int,
            sides: tuple[str, ...] = tuple(SIDES)) -> dict[str, list[tuple[float, float]]]:
    """{side: [(median ms a call, faults a call) per rep]}, the sides in turns."""
    sets = write_inputs(shape)
    sides = {name: SIDES[name] for name in sides}
    for write in sides.values():  # warm-up: the first call's one-time costs
        step(write, sets[0])
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
    ap.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                    help="the writes timed, in turns (default: both)")
    ap.add_argument("--out", help="append one JSON line a side and rep to this file")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.calls < 1:
        ap.error("--reps and --calls must be >= 1")
    shape = CPU_WRITE[0]
    got = measure(shape, args.reps, args.calls, tuple(args.sides))
    if args.out:
        append_jsonl(args.out, [{"op": "write_step", "shape": shape.name, "impl": name, "rep": rep,
                                 "ms": ms, "faults_per_call": faults, "calls": args.calls}
                                for name, rows in got.items() for rep, (ms, faults) in enumerate(rows)],
                     machine_info(torch.device("cpu")))
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
