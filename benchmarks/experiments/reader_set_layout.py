"""The reading layer's kernel over its steps' plain reads, with each input set
laid out as the bench lays it (seven tensors, each its own allocation) and as
memkernels_reader_cold lays it (one buffer a set, the tensors views into it, in
the order the steps read them). The bench's row reads 1.3-1.5x its steps at
S = 1,024 where the C++ tool reads 1.05-1.1x; this asks whether the layout is
the difference. The bench's shape (hidden 512, MLP 512, 8 query heads of 32
over 4 kv heads), 64 rotated sets; in turns, `rounds` times: the kernel and
`_C.cpu_sum_in_turn` of the same tensors (its floor: the four steps' bytes,
each step summed after the one before), on either layout. Prints each turn's
median (us) and the kernel over its floor.

    PYTHONPATH=. python benchmarks/experiments/reader_set_layout.py [S] [rounds]
"""
import statistics
import sys
import time

import torch

from memkernels.ops import backend as _backend

B, T, C, M, H, Hk, D = 1, 1, 512, 512, 8, 4, 32
# hidden, mlp_w, mlp_b, query_w, keys, values, out_w: the steps' order
STEPS = [3, 1, 2, 1]


def shapes(S):
    return [(B, T, C), (M, C), (M,), (H * D, M), (Hk, S, D), (Hk, S, D), (H * D, C)]


def separate(S, n):
    return [[torch.randn(*d) / 8 for d in shapes(S)] for _ in range(n)]


def one_buffer(S, n):
    sets = []
    for _ in range(n):
        sizes = [torch.Size(d).numel() for d in shapes(S)]
        buf = torch.randn(sum(sizes)) / 8
        sets.append([t.view(d) for t, d in zip(buf.split(sizes), shapes(S))])
    return sets


def main() -> None:
    S = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    ext = _backend.extension()[0]
    torch.manual_seed(0)
    layouts = {"separate": separate(S, 64), "one buffer": one_buffer(S, 64)}

    def kernel(h, mw, mb, qw, k, v, ow):
        return ext.reader_fwd(h, qw, k, v, ow, 1e-6, 20.0, None, None, mw, mb, None, True,
                              None, None, None, None, 0)

    def floor(*flat):
        return ext.cpu_sum_in_turn(list(flat), STEPS)

    # the floor's arguments flattened once, as the bench's row does (not in the timed call)
    flats = {name: [[t.reshape(-1) for t in s] for s in sets] for name, sets in layouts.items()}
    entries = [(f"{name}: {what}", fn, sets if fn is kernel else flats[name])
               for name, sets in layouts.items()
               for what, fn in (("kernel", kernel), ("steps in turn", floor))]
    print(f"# S={S}, {ext.cpu_isa()}, {torch.get_num_threads()} threads; medians of 10 passes "
          f"over 64 sets a turn, us")
    got = {name: [] for name, _, _ in entries}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn, sets in entries:
                times = []
                for _ in range(10):
                    for s in sets:
                        t0 = time.perf_counter()
                        fn(*s)
                        times.append(time.perf_counter() - t0)
                got[name].append(1e6 * statistics.median(times))
            line = "; ".join(f"{n} {v[-1]:.1f}" for n, v in got.items())
            ratios = [got[f"{k}: kernel"][-1] / got[f"{k}: steps in turn"][-1] for k in layouts]
            print(f"{line} | kernel / steps: " +
                  ", ".join(f"{k} {r:.2f}x" for k, r in zip(layouts, ratios)), flush=True)
    for k in layouts:
        r = [a / b for a, b in zip(got[f"{k}: kernel"], got[f"{k}: steps in turn"])]
        print(f"{k}: kernel / steps in turn, median {statistics.median(r):.2f}x "
              f"({min(r):.2f}-{max(r):.2f}x)")


if __name__ == "__main__":
    main()
