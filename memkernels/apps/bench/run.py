"""Times every op and backend against the baselines and the machine's limits.

    python -m memkernels.apps.bench                 # whatever device is present
    python -m memkernels.apps.bench --device cpu --ops read_fwd --out results.jsonl
    python -m memkernels.apps.bench --device cpu --ops reader_fwd   # the fused reading layer

The implementations of one op on one shape are timed in turns (--rounds),
so their ratios survive a shared machine's slow minutes. Each row: median
time, achieved GB/s and GFLOP/s, the roofline floor
(max of bytes / bandwidth and FLOPs / matmul rate, the limits measured in
turns with the row's own group: the read-only stream bandwidth for reads,
the copy bandwidth for writes, which store their bank) as a percentage, and
each baseline's time over memkernels' time. The header also gives the
first-touch rate of fresh memory: the allocating baselines (eager, compiled)
pay it per new large tensor, so their times, and the ratios against them,
move with it from one machine (or day) to the next. On the CPU the header
and each record also carry the FMA units' rate (`fma_gflops`: independent
vector FMAs on every thread), which the vendor BLAS behind the matmul probe
may not reach (MKL runs its AVX2 code on AMD CPUs with AVX-512), and the L1
product probe's (`l1_product_gflops`: a register-blocked product on operands
in L1, its loads included), which falls below the FMA units' on a shared core
whose neighbour takes the load ports in some minutes.

`--cpu-isa avx2` stands in for an AVX2-only CPU on one with AVX-512: it caps
this project's kernels (MEMKERNELS_CPU_ISA) and the peers alike (ATen's
vector kernels and torch.compile's generated code through
ATEN_CPU_CAPABILITY, oneDNN and MKL through their own variables), in a child
process, since each library reads its cap once. Capping only the kernels
compares AVX2 code with peers that still run AVX-512. Every record names the
ISA its peers ran (`aten_cpu_capability`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
from tqdm import tqdm

import memkernels
from memkernels.apps.bench import shapes as registry
from memkernels.apps.bench.cases import forward_only, read_cases, reader_cases, write_cases
from memkernels.apps.bench.report import markdown_table
from memkernels.apps.bench.timing import (copy_probe, cuda_graphed, first_touch_probe, fma_probe,
                                          l1_product_probe, matmul_probe, measure, median_times,
                                          read_probe)
from memkernels.ops import backend as _backend

# What caps each library's vector ISA, read once per process: this project's
# CPU kernels, ATen's vector kernels and torch.compile's C++ (inductor), oneDNN, MKL.
CPU_ISA_CAPS = {
    "avx2": {"MEMKERNELS_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

OPS = ("read_fwd", "read_bwd", "read_fwd_bwd", "write_fwd", "write_bwd", "write_fwd_bwd",
       "reader_fwd")


def machine_info(device: torch.device) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ext = _backend.extension()[0]
    if ext is not None:  # the vector ISA the CPU kernels run here (MEMKERNELS_CPU_ISA caps it)
        info["cpu_isa"] = getattr(ext, "cpu_isa", lambda: "unknown (an older build)")()
        # what runs the float tile GEMMs: the register-blocked kernel or the vendor BLAS
        # (MEMKERNELS_CPU_GEMM=blas)
        info["cpu_tile_gemm"] = getattr(ext, "cpu_tile_gemm", lambda: "blas (an older build)")()
    if device.type == "cpu":  # the ISA the peers' vector code runs (SDPA, eager, compiled)
        info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        # the CUDA backend's opt-in tensor-core forward (csrc/cuda/attention_mma.cu)
        info["cuda_tensor_cores"] = os.environ.get("MEMKERNELS_CUDA_TENSOR_CORES", "0") == "1"
    try:
        import triton  # optional dependency: the version, where it is installed
        info["triton"] = triton.__version__
    except ImportError:
        pass
    # the commit of the checkout memkernels is imported from (an editable install), whatever
    # the working directory: run from elsewhere, git read that directory's repository or none;
    # a package installed into a tree that is some other repository names no commit
    source = os.path.dirname(os.path.dirname(os.path.realpath(memkernels.__file__)))
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True, cwd=source).stdout.strip()
        if os.path.realpath(top) != source:
            raise OSError(f"{source} is not the top of a checkout")
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True, cwd=source).stdout.strip()
        # tracked files changed since that commit: the figures are not that commit's
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                          capture_output=True, text=True, check=True, cwd=source).stdout.strip():
            info["commit"] += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout (an installed wheel): no commit to name
    return info


def shapes_for(op: str, device: torch.device):
    """The registry's shapes that `op` is benchmarked on, on this device."""
    on_gpu = device.type == "cuda"
    if op == "reader_fwd":  # the fused reading layer has a CPU kernel only
        return [] if on_gpu else registry.CPU_READER
    if op.startswith("read"):
        shapes = registry.GPU_READ if on_gpu else registry.CPU_READ
        # decode steps are inference only
        return [s for s in shapes if not (op.endswith("bwd") and s.name.endswith("decode"))]
    return registry.GPU_WRITE if on_gpu else registry.CPU_WRITE


def cases_for(op, shape, device, dtype, backends):
    kind, mode = op.split("_", 1)
    make = {"read": read_cases, "write": write_cases, "reader": reader_cases}[kind]
    return make(shape, device, dtype, backends, mode)


def collect_cases(device, dtype, backends, ops):
    """Lists of cases: every implementation of one op on one shape (timed together)."""
    for op in ops:
        for shape in shapes_for(op, device):
            yield cases_for(op, shape, device, dtype, backends)


def prepared(case, device, graphs: bool):
    """(callables to time, 'graph' or 'eager') after two warm-up calls (a
    torch.compile baseline compiles here), or None with the reason printed
    when the implementation cannot run this shape (reported, not fatal)."""
    try:
        fns, timing = case.fns, "eager"
        if graphs:
            try:
                fns, timing = cuda_graphed(case.fns), "graph"
            except Exception:  # not capturable (e.g. a CPU sync inside): time it eagerly
                torch.cuda.synchronize()
        for i in range(2):
            fns[i % len(fns)]()
        return fns, timing
    except Exception as exc:
        print(f"  {case.op} {case.shape.name} {case.impl}: failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:120]})", file=sys.stderr)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds timed per row")
    ap.add_argument("--rounds", type=int, default=5,
                    help="turns the implementations of one op and shape take (each row's "
                         "time is split over them), so a noisy minute hits them alike")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--no-graphs", action="store_true",
                    help="on CUDA, time eager launches instead of CUDA-graph replays")
    ap.add_argument("--cpu-isa", choices=sorted(CPU_ISA_CAPS), default=None,
                    help="cap the CPU kernels and the peers alike at this ISA (run in a "
                         "child process with the libraries' variables set)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.cpu_isa is not None:
        caps = CPU_ISA_CAPS[args.cpu_isa]
        if any(os.environ.get(k) != v for k, v in caps.items()):
            rest = list(sys.argv[1:] if argv is None else argv)
            code = subprocess.call([sys.executable, "-m", "memkernels.apps.bench", *rest],
                                   env={**os.environ, **caps})
            return code if code >= 0 else 1  # a child killed by a signal: a failure

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends or [b for b in memkernels.available_backends(device)
                                 if b != "reference"]
    info = machine_info(device)
    # the machine's limits: measured once here for the header, then again in
    # turns with every group's implementations, so each row's floor is
    # measured in the same minutes as the row itself
    # (and on the CPU the FMA units' rate, which the BLAS behind the matmul probe may not reach,
    # and a product's inner loop on operands in L1, which takes loads the FMA probe does not)
    probes = [copy_probe(device), read_probe(device), matmul_probe(device, dtype),
              first_touch_probe(device)]
    rate_probes = {name: p for name, p in (("fma_gflops", fma_probe(device)),
                                           ("l1_product_gflops", l1_product_probe(device)))
                   if p is not None}
    probes += list(rate_probes.values())
    copy_bw, bw, peak, touch, *rates = (measure(p, device) for p in probes)
    rate_fields = {name: r / 1e9 for name, r in zip(rate_probes, rates)}
    rates_text = _rates_text(rate_fields, " | ")
    isa = info.get("cpu_isa", "-")
    if "cpu_tile_gemm" in info:
        isa += f", tile GEMMs: {info['cpu_tile_gemm']}"
    if "aten_cpu_capability" in info:
        isa += f"; peers: {info['aten_cpu_capability']}"
    print(f"# {info.get('gpu', info['cpu'])} ({isa}) | torch {info['torch']} | {dtype} | "
          f"read stream {bw / 1e9:.1f} GB/s | copy {copy_bw / 1e9:.1f} GB/s | "
          f"matmul {peak / 1e12:.2f} TFLOP/s{rates_text} | first touch {touch / 1e9:.1f} GB/s | "
          f"backends {backends}")

    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out_file = open(args.out, "a") if args.out else None  # one line per row, as measured
    groups = list(collect_cases(device, dtype, backends, args.ops))
    for group in tqdm(groups, desc="benchmarks", file=sys.stderr):
        # every implementation of the op on this shape and the limits' probes, in turns; a
        # forward row (and its torch.compile warm-up) inside one no-grad block, as a decode
        # loop runs its steps, not a no_grad entered and left by every call
        grad_mode = torch.no_grad() if forward_only(group[0].op) else contextlib.nullcontext()
        with grad_mode:
            ready = [(case, prepared(case, device, device.type == "cuda" and not args.no_graphs))
                     for case in group]
            ready = [(case, *got) for case, got in ready if got is not None]
            faults: list = []
            times = median_times([fns for _, fns, _ in ready] + [p.fns for p in probes], device,
                                 min_time=args.min_time, rounds=args.rounds, warmup=0,
                                 faults=faults)
        copy_bw, bw, peak, touch, *rates = (p.work / t
                                            for p, t in zip(probes, times[len(ready):]))
        rate_fields = {name: r / 1e9 for name, r in zip(rate_probes, rates)}
        for (case, _, timing), t, per_call in zip(ready, times, faults):
            # a read's bytes are almost all read once; a write also stores its bank
            stream = bw if case.op.startswith("read") else copy_bw
            floor = max(case.bytes / stream, case.flops / peak)
            rows.append(dict(op=case.op, shape=case.shape.name, impl=case.impl, ms=t * 1e3,
                             gbps=case.bytes / t / 1e9, gflops=case.flops / t / 1e9,
                             pct_of_floor=100 * floor / t, timing=timing,
                             bound="memory" if case.bytes / stream > case.flops / peak
                             else "compute"))
            if out_file:
                out_file.write(json.dumps({**rows[-1], "dtype": str(dtype), "device": device.type,
                                           "read_gbps": bw / 1e9, "copy_gbps": copy_bw / 1e9,
                                           "matmul_gflops": peak / 1e9,
                                           "first_touch_gbps": touch / 1e9, **rate_fields,
                                           **({} if per_call is None
                                              else dict(faults_per_call=per_call)),
                                           "rounds": args.rounds,
                                           "limits": "in turns with the row",
                                           "time": stamp, **info}) + "\n")
                out_file.flush()
        print(f"  {group[0].op} {group[0].shape.name}: read stream {bw / 1e9:.1f} GB/s, "
              f"copy {copy_bw / 1e9:.1f} GB/s, matmul {peak / 1e12:.2f} TFLOP/s"
              f"{_rates_text(rate_fields, ', ')}, first touch "
              f"{touch / 1e9:.1f} GB/s in its turns",
              file=sys.stderr)
        for case in group:
            del case.fns

    print()
    print(markdown_table(rows))

    if out_file:
        out_file.close()
    return 0


def _rates_text(fields: dict, sep: str) -> str:
    """The CPU's rate probes for a header line: each after sep, or nothing."""
    names = {"fma_gflops": "FMA peak", "l1_product_gflops": "L1 product"}
    return "".join(f"{sep}{names[k]} {v / 1e3:.2f} TFLOP/s" for k, v in fields.items())


if __name__ == "__main__":
    sys.exit(main())
