"""One process's medians of a CPU training step of the write or the read, for
A/B runs of two builds (the ISA is chosen once per process, so each build and
ISA gets a process of its own: run it from each build's tree, in turns).

    MEMKERNELS_CPU_ISA=avx2 PYTHONPATH=. python benchmarks/experiments/train_step_ab.py write
    python benchmarks/experiments/train_step_ab.py read --calls 10
    python benchmarks/experiments/train_step_ab.py read --no-save-probs  # P recomputed
    python benchmarks/experiments/train_step_ab.py read --inference  # the forward alone

write: memkernels.memory_write at the bench's shape (B=4 H=16 S=1,024 T=512 Dh 64);
read: memkernels.memory_read of B=4 H=16 T=256 rows over a shared bank of S=4,096
slots, Dh 64. Prints the medians of the forward alone and of forward + backward
over `--calls` calls after two warm-up calls; with --inference, of the forward
under no_grad alone (the bench's read_fwd / write_fwd rows).
"""
import argparse
import statistics
import time

import torch

import memkernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", choices=("write", "read"))
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-save-probs", action="store_true",
                    help="save_probs=False: the backward recomputes the probabilities")
    ap.add_argument("--inference", action="store_true",
                    help="time the forward alone under torch.no_grad(), inputs without grad")
    args = ap.parse_args()
    torch.manual_seed(0)
    keep = not args.no_save_probs

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=not args.inference)

    if args.op == "write":
        B, H, S, T, D = 4, 16, 1024, 512, 64
        inputs = [leaf(B, H, S, D), leaf(B, H, S, D), leaf(B, H, T, D), leaf(B, H, T, D),
                  leaf(B, H, S, 1), leaf(B, H, S, 1)]

        def forward():
            return memkernels.memory_write(*inputs, backend="cpu", save_probs=keep)
    else:
        B, H, T, S, D = 4, 16, 256, 4096, 64
        inputs = [leaf(B, H, T, D), leaf(H, S, D), leaf(H, S, D)]

        def forward():
            return memkernels.memory_read(*inputs, backend="cpu", save_probs=keep)

    if args.inference:
        with torch.no_grad():
            times = []
            for i in range(args.calls + 2):
                t0 = time.perf_counter()
                forward()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        print(f"{args.op} inference fwd {1e3 * statistics.median(times):.1f} ms")
        return
    grad = None
    fwd, step = [], []
    for i in range(args.calls + 2):
        t0 = time.perf_counter()
        out = forward()
        t1 = time.perf_counter()
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)
        t2 = time.perf_counter()
        for x in inputs:
            x.grad = None
        if i >= 2:
            fwd.append(t1 - t0)
            step.append(t2 - t0)
    print(f"{args.op} fwd {1e3 * statistics.median(fwd):.1f} ms  "
          f"fwd+bwd {1e3 * statistics.median(step):.1f} ms")


if __name__ == "__main__":
    main()
