"""The shared-bank decode (the bench's decode row: B=8 H=16 T=1 S=8192 Dh=64, float32) beside
the plain reads that bound it, in turns in one process, so every ratio is of one minute:

  probe     the bench's read stream (timing.read_probe: a sum over 512 MB buffers)
  own-sum   the decode's own K and V, summed in one parallel pass on every thread
            (memkernels._C.cpu_sum_in_turn, one step of two arrays: each thread a
            contiguous share of K, then of V)
  ours      memkernels.memory_read, backend "cpu" (the bench's implementation)
  sdpa      SDPA with the batch folded into the query length (the bench's peer)
  hot       ours on a bank of the same heads and 1/8 the keys (8 MB, which stays in the
            L3 from call to call): its time less a 16-key call's (the call's fixed cost),
            times 8, plus that fixed cost once: the kernel's arithmetic over the whole
            bank with no DRAM stream under it. An upper bound: the L3 is shared with the
            host's other tenants, and where they evict the bank, this reads some of it
            from DRAM (memkernels_few_rows_phases times the arithmetic from the L2)

If the kernel overlapped its arithmetic with the stream it would take about
max(hot, own-sum); with no overlap, hot + own-sum. The printed overlap is
(hot + own-sum - ours) / min(hot, own-sum): 1 full, 0 none.

Banks rotate over 8 sets (8 x 67 MB, past the L3), as in the bench. Prints each round's
medians and, over the rounds, the medians of ours / own-sum / probe as shares of the probe's
bandwidth and the SDPA ratio.

    PYTHONPATH=. python benchmarks/experiments/decode_floor.py [ROUNDS]
"""
import functools
import statistics
import sys

import torch

from memkernels.apps.bench.cases import read_impls
from memkernels.apps.bench.shapes import CPU_READ
from memkernels.apps.bench.timing import median_time, read_probe
from memkernels.ops import backend

SETS = 8
CPU = torch.device("cpu")


def main(rounds: int) -> None:
    shape = next(s for s in CPU_READ if s.name == "decode")
    B, H, S, D = shape.B, shape.H, shape.S, shape.D
    torch.manual_seed(0)
    impls = read_impls(shape, ["cpu"])
    ours, sdpa = (torch.no_grad()(impls[k]) for k in ("memkernels[cpu]", "sdpa (batch folded)"))
    sets = [[torch.randn(B, H, 1, D), torch.randn(H, S, D), torch.randn(H, S, D)]
            for _ in range(SETS)]
    bank_bytes = 2 * H * S * D * 4
    in_turn = backend.extension()[0].cpu_sum_in_turn
    probe = read_probe(CPU)
    hot_keys = S // 8
    hot = [torch.randn(B, H, 1, D), torch.randn(H, hot_keys, D), torch.randn(H, hot_keys, D)]
    tiny = [torch.randn(B, H, 1, D), torch.randn(H, 16, D), torch.randn(H, 16, D)]
    rows = {  # name: (callables, calls timed a turn)
        "probe": (probe.fns, 8),
        "own-sum": ([functools.partial(in_turn, [s[1].reshape(-1), s[2].reshape(-1)], [2])
                     for s in sets], 48),
        "ours": ([functools.partial(ours, *s) for s in sets], 48),
        "sdpa": ([functools.partial(sdpa, *s) for s in sets], 48),
        "hot": ([functools.partial(ours, *hot)], 96),
        "fixed": ([functools.partial(ours, *tiny)], 96),
    }
    ms = {name: [] for name in rows}

    def overlap(r):
        hot_ms, sum_ms, ours_ms = ms["hot"][r], ms["own-sum"][r], ms["ours"][r]
        return (hot_ms + sum_ms - ours_ms) / min(hot_ms, sum_ms)

    def share(name, r):  # of the probe's bandwidth
        return (bank_bytes / ms[name][r]) / (probe.work / ms["probe"][r])

    def median_over_rounds(f):
        return statistics.median(f(r) for r in range(rounds))

    for fns, reps in rows.values():  # warm-up
        median_time(fns, CPU, min_time=60.0, warmup=0, max_reps=min(reps, 8))
    for r in range(rounds):
        for name in list(rows) if r % 2 == 0 else list(rows)[::-1]:
            fns, reps = rows[name]
            ms[name].append(median_time(fns, CPU, min_time=60.0, warmup=0, max_reps=reps) * 1e3)
        ms["hot"][-1] = (ms["hot"][-1] - ms["fixed"][-1]) * (S // hot_keys) + ms["fixed"][-1]
        print(f"round {r}: probe {probe.work / ms['probe'][-1] / 1e6:.1f} GB/s; "
              + "; ".join(f"{n} {ms[n][-1]:.2f} ms" for n in rows if n != "probe")
              + f"; ours {100 * share('ours', r):.0f}% of the probe"
              f", own-sum {100 * share('own-sum', r):.0f}%"
              f", sdpa/ours {ms['sdpa'][-1] / ms['ours'][-1]:.2f}x"
              f", overlap {overlap(r):.2f}", flush=True)

    print(f"medians over {rounds} rounds: "
          f"ours {100 * median_over_rounds(lambda r: share('ours', r)):.0f}% of the probe, "
          f"own-sum {100 * median_over_rounds(lambda r: share('own-sum', r)):.0f}%, "
          f"ours over own-sum "
          f"{median_over_rounds(lambda r: ms['ours'][r] / ms['own-sum'][r]):.2f}x, "
          f"sdpa/ours {median_over_rounds(lambda r: ms['sdpa'][r] / ms['ours'][r]):.2f}x, "
          f"hot over own-sum {median_over_rounds(lambda r: ms['hot'][r] / ms['own-sum'][r]):.2f}x, "
          f"overlap {median_over_rounds(overlap):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
