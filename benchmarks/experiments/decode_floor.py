"""The shared-bank decode (the bench's decode row: B=8 H=16 T=1 S=8192 Dh=64, float32) beside
the plain reads that bound it, in turns in one process, so every ratio is of one minute:

  probe     the bench's read stream: torch.sum over 512 MB buffers (timing.read_probe)
  own-sum   the decode's own K and V, summed in one parallel pass on every thread
            (memkernels._C.cpu_sum_in_turn, one step of two arrays: each thread a
            contiguous share of K, then of V)
  ours      memkernels.memory_read, backend "cpu"
  sdpa      SDPA with the batch folded into the query length (the bench's peer)
  hot       ours on a bank of the same heads and 1/8 the keys (8 MB, which stays in the
            L3 from call to call): its time less a 16-key call's (the call's fixed cost),
            times 8, plus that fixed cost once: the kernel's arithmetic over the whole
            bank with no DRAM stream under it

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
import time

import torch
import torch.nn.functional as F

import memkernels
from memkernels.ops import backend

B, H, S, D = 8, 16, 8192, 64
SETS = 8
PROBE_BYTES = 1 << 30


def median_seconds(fns, reps: int) -> float:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(rounds: int) -> None:
    torch.manual_seed(0)
    sets = [[torch.randn(B, H, 1, D), torch.randn(H, S, D), torch.randn(H, S, D)]
            for _ in range(SETS)]
    bank_bytes = 2 * H * S * D * 4
    in_turn = backend.extension()[0].cpu_sum_in_turn
    read = torch.no_grad()(functools.partial(memkernels.memory_read, backend="cpu"))

    def sdpa_folded(q, k, v):
        qf = q.transpose(0, 1).reshape(1, H, B, D)
        return F.scaled_dot_product_attention(qf, k.unsqueeze(0), v.unsqueeze(0))

    probe_bufs = [torch.empty(PROBE_BYTES // 8, dtype=torch.float32).uniform_() for _ in range(2)]
    probe_bytes = probe_bufs[0].numel() * 4
    hot_keys = S // 8
    hot = [torch.randn(B, H, 1, D), torch.randn(H, hot_keys, D), torch.randn(H, hot_keys, D)]
    tiny = [torch.randn(B, H, 1, D), torch.randn(H, 16, D), torch.randn(H, 16, D)]
    rows = {
        "probe": ([functools.partial(torch.sum, x) for x in probe_bufs], 8),
        "own-sum": ([functools.partial(in_turn, [s[1].reshape(-1), s[2].reshape(-1)], [2])
                     for s in sets], 48),
        "ours": ([functools.partial(read, *s) for s in sets], 48),
        "sdpa": ([functools.partial(torch.no_grad()(sdpa_folded), *s) for s in sets], 48),
        "hot": ([functools.partial(read, *hot)], 96),
        "fixed": ([functools.partial(read, *tiny)], 96),
    }
    def overlap(r):
        hot_ms, sum_ms, ours_ms = ms["hot"][r], ms["own-sum"][r], ms["ours"][r]
        return (hot_ms + sum_ms - ours_ms) / min(hot_ms, sum_ms)

    for fns, reps in rows.values():  # warm-up
        median_seconds(fns, min(reps, 8))
    ms = {name: [] for name in rows}
    for r in range(rounds):
        order = list(rows) if r % 2 == 0 else list(rows)[::-1]
        for name in order:
            fns, reps = rows[name]
            ms[name].append(median_seconds(fns, reps) * 1e3)
        ms["hot"][-1] = (ms["hot"][-1] - ms["fixed"][-1]) * (S // hot_keys) + ms["fixed"][-1]
        probe_gbps = probe_bytes / ms["probe"][-1] / 1e6
        print(f"round {r}: probe {probe_gbps:.1f} GB/s; "
              + "; ".join(f"{n} {ms[n][-1]:.2f} ms" for n in rows if n != "probe")
              + f"; ours {100 * bank_bytes / ms['ours'][-1] / 1e6 / probe_gbps:.0f}% of the probe"
              f", own-sum {100 * bank_bytes / ms['own-sum'][-1] / 1e6 / probe_gbps:.0f}%"
              f", sdpa/ours {ms['sdpa'][-1] / ms['ours'][-1]:.2f}x"
              f", overlap {overlap(r):.2f}", flush=True)

    def share(name):
        return [bank_bytes / t / (probe_bytes / p) for t, p in zip(ms[name], ms["probe"])]
    print(f"medians over {rounds} rounds: ours {100 * statistics.median(share('ours')):.0f}% "
          f"of the probe, own-sum {100 * statistics.median(share('own-sum')):.0f}%, ours over "
          f"own-sum {statistics.median([o / s for o, s in zip(ms['ours'], ms['own-sum'])]):.2f}x"
          f", sdpa/ours {statistics.median([s / o for s, o in zip(ms['sdpa'], ms['ours'])]):.2f}x"
          f", hot over own-sum {statistics.median([h / s for h, s in zip(ms['hot'], ms['own-sum'])]):.2f}x"
          f", overlap {statistics.median([overlap(r) for r in range(rounds)]):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
