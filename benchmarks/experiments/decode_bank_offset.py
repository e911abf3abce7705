"""The shared-bank decode (the bench's decode row: B=8 H=16 T=1 S=8192 Dh=64, float32) on
banks whose data start at chosen byte offsets within a 4 KiB page, in turns.

torch's CPU allocator puts a large tensor's data 64 bytes into a page (glibc's mmap'd
chunk header, rounded up to torch's 64-byte alignment); new float[] (csrc/tools) 16 bytes
in. decode_paths_in_turn.py found the tool's loop faster on the tool's banks than on
torch's; this asks whether the offset is why. Each bank set holds 6 banks (400 MB, past
the 32 MB L3), each K and V a view of a larger torch.empty at the offset, filled with
normal_. Each round runs every offset in a rotated order: CALLS calls of
memkernels.memory_read (backend "cpu"), each followed by memkernels._C.cpu_sum_in_turn of
another bank of the same set (the bench's read-stream sum), both timed. Prints each
offset's medians over the rounds (decode ms, sum ms, their ratio) and in how many rounds
its ratio was below that of offset 64 (torch's own).

    PYTHONPATH=. python benchmarks/experiments/decode_bank_offset.py [ROUNDS [OFFSET ...]]
"""
import statistics
import sys
import time

import torch

import memkernels
from memkernels.ops import backend

B, H, S, D = 8, 16, 8192, 64
BANKS, CALLS = 6, 24
PAGE = 4096


def at_offset(offset: int) -> torch.Tensor:
    """An [H, S, D] float32 tensor whose data start `offset` bytes into a page."""
    n = H * S * D
    base = torch.empty(n + PAGE // 4)
    skip = ((offset - base.data_ptr()) % PAGE) // 4
    t = base[skip:skip + n].view(H, S, D).normal_()
    assert t.data_ptr() % PAGE == offset
    return t


def main(rounds: int, offsets: list) -> None:
    torch.manual_seed(0)
    in_turn = backend.extension()[0].cpu_sum_in_turn
    q = torch.randn(B, H, 1, D)
    sets = {o: [(at_offset(o), at_offset(o)) for _ in range(BANKS)] for o in offsets}
    ref = memkernels.memory_read(q, *sets[offsets[0]][0], backend="reference")
    got = memkernels.memory_read(q, *sets[offsets[0]][0], backend="cpu")
    print(f"max |cpu - reference| on one bank: {(got - ref).abs().max().item():.2e}")
    decode = {o: [] for o in offsets}
    read = {o: [] for o in offsets}
    for r in range(rounds):
        order = offsets[r % len(offsets):] + offsets[:r % len(offsets)]
        for o in order:
            banks = sets[o]
            sums = [[k.reshape(-1), v.reshape(-1)] for k, v in banks]
            td, tr = [], []
            for c in range(CALLS):
                t0 = time.perf_counter()
                memkernels.memory_read(q, *banks[c % BANKS], backend="cpu")
                t1 = time.perf_counter()
                in_turn(sums[(c + BANKS // 2) % BANKS], [2])
                td.append(t1 - t0), tr.append(time.perf_counter() - t1)
            decode[o].append(statistics.median(td)), read[o].append(statistics.median(tr))
        print(f"round {r}: " + "; ".join(
            f"@{o} {decode[o][-1] * 1e3:.2f} / {read[o][-1] * 1e3:.2f} ms" for o in offsets),
            flush=True)
    ratio = {o: [a / b for a, b in zip(decode[o], read[o])] for o in offsets}
    base = ratio.get(64)
    print(f"medians over {rounds} rounds:")
    for o in offsets:
        below = "" if base is None or o == 64 else (
            f"; below offset 64's ratio in {sum(a < b for a, b in zip(ratio[o], base))}"
            f" of {rounds}")
        print(f"  offset {o:4d}: decode {statistics.median(decode[o]) * 1e3:.2f} ms, sum "
              f"{statistics.median(read[o]) * 1e3:.2f} ms, decode / sum "
              f"{statistics.median(ratio[o]):.2f}x ({min(ratio[o]):.2f}-{max(ratio[o]):.2f}x)"
              f"{below}")


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    offsets = [int(a) for a in sys.argv[2:]] or [0, 16, 32, 64]
    main(rounds, offsets)
