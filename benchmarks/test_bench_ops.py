"""pytest-benchmark view of the benchmark registry: every op, shape and
implementation (memkernels backends and the baselines) as one benchmark.

    pytest benchmarks/test_bench_ops.py --benchmark-only
    pytest benchmarks/test_bench_ops.py --benchmark-only -k "decode and (cpu or folded)"

`python -m memkernels.apps.bench` times the same cases and adds roofline ratios.
"""
import pytest
import torch

import memkernels
from memkernels.apps.bench.cases import forward_only
from memkernels.apps.bench.run import OPS, cases_for, shapes_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = [b for b in memkernels.available_backends(DEVICE) if b != "reference"]
IMPLS = [f"memkernels[{b}]" for b in BACKENDS] + [
    "reference (eager)", "torch.compile(reference)", "sdpa", "sdpa (bank expanded)",
    "sdpa (batch folded)"]

PARAMS = [pytest.param(op, shape, impl, id=f"{op}-{shape.name}-{impl}")
          for op in OPS for shape in shapes_for(op, DEVICE) for impl in IMPLS]


@pytest.mark.parametrize("op,shape,impl", PARAMS)
def test_bench(benchmark, op, shape, impl):
    cases = [c for c in cases_for(op, shape, DEVICE, DTYPE, BACKENDS) if c.impl == impl]
    if not cases:
        pytest.skip(f"{impl} is not a baseline for {op} at {shape.name}")
    fns = cases[0].fns
    state = {"i": 0}

    def run():
        fns[state["i"] % len(fns)]()  # rotate input sets past the cache
        state["i"] += 1
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(flops=cases[0].flops, bytes=cases[0].bytes, dtype=str(DTYPE))
    with torch.no_grad() if forward_only(op) else torch.enable_grad():  # as the runner times it
        benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)
