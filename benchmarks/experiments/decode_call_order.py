"""The shared-bank decode (the bench's decode row: B=8 H=16 T=1 S=8192 Dh=64, float32) timed
two ways in one process, in turns, on banks rotated past the L3:

  back to back  memkernels.memory_read (backend "cpu") call after call, each on the next
                bank, as the bench times it
  between sums  the same calls, each after a sum of another bank's bytes on the same
                threads (memkernels._C.cpu_sum_in_turn), as memkernels_few_rows_cold
                (csrc/tools/few_rows_cold.cpp) times the kernel; only the decode's call
                is timed
  sum           that sum alone, call after call (the decode's bytes read once)

The bench's decode row reads 1.5-1.7x a sum of its bytes where the C++ tool reads 1.05-1.15x
its plain read; this asks whether the order of the calls is the difference. Prints each
round's medians (ms) and, over the rounds, the medians of each over the sum.

    PYTHONPATH=. python benchmarks/experiments/decode_call_order.py [ROUNDS]
"""
import statistics
import sys
import time

import torch

import memkernels
from memkernels.ops import backend

B, H, S, D = 8, 16, 8192, 64
BANKS = 6  # 6 x 67 MB, past the 32 MB L3
CALLS = 24  # timed calls a turn


def main(rounds: int) -> None:
    torch.manual_seed(0)
    in_turn = backend.extension()[0].cpu_sum_in_turn
    q = torch.randn(B, H, 1, D)
    banks = [(torch.randn(H, S, D), torch.randn(H, S, D)) for _ in range(BANKS)]
    sums = [[k.reshape(-1), v.reshape(-1)] for k, v in banks]

    def read(i):
        k, v = banks[i % BANKS]
        return memkernels.memory_read(q, k, v, backend="cpu")

    def timed(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    def back_to_back():
        return [timed(lambda: read(i)) for i in range(CALLS)]

    def between_sums():
        out = []
        for i in range(CALLS):
            in_turn(sums[(i + BANKS // 2) % BANKS], [2])  # another bank's bytes, untimed
            out.append(timed(lambda: read(i)))
        return out

    def sum_alone():
        return [timed(lambda: in_turn(sums[i % BANKS], [2])) for i in range(CALLS)]

    turns = {"back to back": back_to_back, "between sums": between_sums, "sum": sum_alone}
    ms = {name: [] for name in turns}
    with torch.no_grad():
        for f in turns.values():  # warm-up
            f()
        for r in range(rounds):
            for name in list(turns) if r % 2 == 0 else list(turns)[::-1]:
                ms[name].append(statistics.median(turns[name]()) * 1e3)
            print(f"round {r}: " + "; ".join(f"{n} {ms[n][-1]:.2f} ms" for n in turns)
                  + f" | back to back / sum {ms['back to back'][-1] / ms['sum'][-1]:.2f}x"
                  + f", between sums / sum {ms['between sums'][-1] / ms['sum'][-1]:.2f}x",
                  flush=True)
    over = {n: statistics.median(ms[n][r] / ms["sum"][r] for r in range(rounds))
            for n in ("back to back", "between sums")}
    print(f"medians over {rounds} rounds: back to back {over['back to back']:.2f}x the sum, "
          f"between sums {over['between sums']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
