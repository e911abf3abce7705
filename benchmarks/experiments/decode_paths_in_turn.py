"""Why memkernels_few_rows_cold and the bench disagreed about the shared-bank decode.

The C++ tool put the decode (B=8 H=16 T=1 S=8192 Dh=64, float32, banks rotated past the L3)
at 1.05-1.2x its plain read; the bench and decode_call_order.py put it at 1.3-1.7x a sum of
its bytes, in runs at other minutes. This runs six measures in one process, in turns each
round (in an order rotated each round), so they see the same minutes of a machine whose
memory speed moves:

  tool          the tool's whole program (its banks, its loop, its read), its ratio
  tool's loop, its banks    the tool's decode loop (groups static over threads) and its
                read in turns, on banks made the tool's way (new[], its sin / cos values,
                first touched on all threads)
  tool's loop, torch banks  the same on torch.randn banks
  tool's loop, torch banks, its values   on torch banks holding the tool's values
  (the loops all take one torch.randn query; the tool's program its own, sin values)
  extension in turns        memkernels.memory_read on the torch banks, each call followed
                by the tool's read of another bank (both timed from Python)
  bench         memkernels.memory_read call after call over memkernels._C.cpu_sum_in_turn
                call after call (the bench's decode row and its read-stream figure)

Needs the CMake build's memkernels_cpu (cmake -S . -B BUILD && cmake --build BUILD
--target memkernels_cpu); builds decode_paths_in_turn.cpp into a shared library beside it.

    PYTHONPATH=. python benchmarks/experiments/decode_paths_in_turn.py BUILD [ROUNDS]
"""
import ctypes
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import memkernels
from memkernels.ops import backend

B, H, S, D = 8, 16, 8192, 64
BANKS, CALLS = 6, 24
P, I = ctypes.c_void_p, ctypes.c_int64


def build(build_dir: Path) -> ctypes.CDLL:
    here = Path(__file__).resolve()
    lib = build_dir / "decode_paths_in_turn.so"
    subprocess.run(["g++", "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
                    "-fno-trapping-math", "-DNDEBUG", f"-I{here.parents[2] / 'csrc'}",
                    str(here.with_suffix(".cpp")), str(build_dir / "libmemkernels_cpu.a"),
                    "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def tool_ratio(lib: ctypes.CDLL) -> tuple:
    """The tool's program at its defaults for this shape; its stdout captured at the fd."""
    args = [b"memkernels_few_rows_cold", b"8", b"8192", b"16", b"41"]
    argv = (ctypes.c_char_p * len(args))(*args)
    r_fd, w_fd = os.pipe()
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(w_fd, 1)
    try:
        lib.run_tool(len(args), argv)
        ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(w_fd)
        os.close(saved)
    text = os.read(r_fd, 1 << 16).decode()
    os.close(r_fd)
    m = re.search(r"rotated\): ([0-9.]+) ms.*?as many bytes ([0-9.]+) ms", text)
    return float(m.group(1)) * 1e-3, float(m.group(2)) * 1e-3


def main(build_dir: Path, rounds: int) -> None:
    torch.manual_seed(0)
    lib = build(build_dir)
    lib.new_bank.restype = ctypes.c_void_p
    in_turn = backend.extension()[0].cpu_sum_in_turn
    q = torch.randn(B, H, 1, D)
    q_groups = q.permute(1, 0, 2, 3).reshape(H, B, D).contiguous()  # [H, B, D], the tool's q
    out, lse = torch.empty(H, B, D), torch.empty(H, B)
    torch_banks = [(torch.randn(H, S, D), torch.randn(H, S, D)) for _ in range(BANKS)]
    n = H * S * D
    tool_banks = [(lib.new_bank(I(n), I(b), 0), lib.new_bank(I(n), I(b), 1))
                  for b in range(BANKS)]
    idx = torch.arange(n, dtype=torch.float64)
    sin_banks = [(torch.sin(0.011 * (idx + b)).float().reshape(H, S, D),
                  torch.cos(0.013 * (idx + b)).float().reshape(H, S, D)) for b in range(BANKS)]
    del idx
    pointers = {
        "tool's loop, its banks": tool_banks,
        "tool's loop, torch banks": [(k.data_ptr(), v.data_ptr()) for k, v in torch_banks],
        "tool's loop, torch banks, its values": [(k.data_ptr(), v.data_ptr())
                                                 for k, v in sin_banks],
    }
    sums = [[k.reshape(-1), v.reshape(-1)] for k, v in torch_banks]

    def tool_loop(banks):
        ks, vs = (P * BANKS)(*[k for k, _ in banks]), (P * BANKS)(*[v for _, v in banks])
        dm, rm = ctypes.c_double(), ctypes.c_double()
        lib.decode_and_read(P(q_groups.data_ptr()), ks, vs, I(BANKS), P(out.data_ptr()),
                            P(lse.data_ptr()), I(H), I(B), I(S), I(D), I(CALLS),
                            ctypes.byref(dm), ctypes.byref(rm))
        return dm.value, rm.value

    def median_call(f):
        ts = []
        for i in range(CALLS):
            t = time.perf_counter()
            f(i)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    lib.tool_sum.restype = ctypes.c_double

    def extension_in_turns():
        decode, read = [], []
        for c in range(CALLS):
            t0 = time.perf_counter()
            memkernels.memory_read(q, *torch_banks[c % BANKS], backend="cpu")
            t1 = time.perf_counter()
            k, v = torch_banks[(c + BANKS // 2) % BANKS]
            lib.tool_sum(P(k.data_ptr()), P(v.data_ptr()), I(H), I(S * D))
            decode.append(t1 - t0), read.append(time.perf_counter() - t1)
        return statistics.median(decode), statistics.median(read)

    def bench():
        decode = median_call(lambda i: memkernels.memory_read(q, *torch_banks[i % BANKS],
                                                                backend="cpu"))
        return decode, median_call(lambda i: in_turn(sums[i % BANKS], [2]))

    ref = memkernels.memory_read(q, *torch_banks[0], backend="cpu")
    lib.run_decode(P(q_groups.data_ptr()), P(torch_banks[0][0].data_ptr()),
                   P(torch_banks[0][1].data_ptr()), P(out.data_ptr()), P(lse.data_ptr()),
                   I(H), I(B), I(S), I(D))
    err = (out.permute(1, 0, 2) - ref.reshape(B, H, D)).abs().max().item()
    print(f"max |tool's loop - memory_read| on one bank: {err:.2e}")
    names = ["tool", *pointers, "extension in turns", "bench"]
    ratios = {name: [] for name in names}
    for r in range(rounds):
        runs = {"tool": lambda: tool_ratio(lib), "extension in turns": extension_in_turns,
                "bench": bench}
        runs.update({name: (lambda b=banks: tool_loop(b)) for name, banks in pointers.items()})
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no measure always first
        times = {name: runs[name]() for name in order}
        parts = []
        for name in names:
            decode, read = times[name]
            ratios[name].append(decode / read)
            parts.append(f"{name} {decode * 1e3:.2f} / {read * 1e3:.2f} ms = "
                         f"{decode / read:.2f}x")
        print(f"round {r}: " + "; ".join(parts), flush=True)
    print(f"medians over {rounds} rounds (decode over its read): " + "; ".join(
        f"{name} {statistics.median(ratios[name]):.2f}x "
        f"({min(ratios[name]):.2f}-{max(ratios[name]):.2f}x)" for name in names))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
