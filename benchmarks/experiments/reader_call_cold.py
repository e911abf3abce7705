"""What the reading layer's call costs around its kernel when the caches are cold, as in a
decode step whose other weights evict everything between two reads.

At the bench's reading-layer shape (hidden 512, MLP 512, 8 query heads of 32 over 4 kv heads,
S 1,024), inside one no-grad block, in turns each round, each timed call after an untimed sum
of a 64 MB buffer (past the 32 MB L3: the interpreter's, torch's and the binding's code and
data evicted, as a decode step's other weights evict them; the bench's rotated sets, 3.15 MB a
call, leave them in the L3), or with none (hot):

  empty layer       memkernels.reading_layer on a batch of 0 rows: the Python fast path, the
                    binding's argument conversion and every check, no kernel
  empty _C          memkernels._C.reader_fwd on the same: the binding alone
  layer             memkernels.reading_layer on one of 64 rotated sets (the bench's call)
  _C                memkernels._C.reader_fwd on the same sets
  empty plan        a set's memkernels.reading_layer_plan (built once, before the rounds)
                    called on a batch of 0 rows: the plan's call, no kernel
  plan              each set's plan on its hidden state (the memory's decode path)

Prints each round's medians (us) and their medians over the rounds.

    PYTHONPATH=. python benchmarks/experiments/reader_call_cold.py [ROUNDS]
"""
import statistics
import sys
import time

import torch

import memkernels
from memkernels.ops import backend
from reader_call_overhead import kernel, layer  # the bench's call and its kernel's (beside)

B, T, C, M, H, Hk, D, S = 1, 1, 512, 512, 8, 4, 32, 1024
SETS, CALLS = 64, 64


def main(rounds: int) -> None:
    torch.manual_seed(0)
    in_turn = backend.extension()[0].cpu_sum_in_turn
    dims = [(B, T, C), (M, C), (M,), (H * D, M), (H * D, C), (Hk, S, D), (Hk, S, D)]
    sets = [[torch.randn(*d) / (d[-1] ** 0.5 if len(d) > 1 else 1) for d in dims]
            for _ in range(SETS)]
    empty = [torch.randn(0, T, C), *sets[0][1:]]
    evict = [torch.randn(16 << 20)]  # 64 MB
    plans = [memkernels.reading_layer_plan(qw, k, v, ow, eps=1e-6, scale=20.0, mlp_w=mw,
                                           mlp_b=mb, unit_queries=True, backend="cpu")
             for _, mw, mb, qw, ow, k, v in sets]
    # each measure's (callable, arguments) for call c: nothing but the call in the timing
    calls = {"layer": lambda c: (layer, sets[c % SETS]), "_C": lambda c: (kernel, sets[c % SETS]),
             "plan": lambda c: (plans[c % SETS], sets[c % SETS][:1]),
             "empty layer": lambda c: (layer, empty), "empty _C": lambda c: (kernel, empty),
             "empty plan": lambda c: (plans[0], empty[:1])}
    measures = {f"{what}, {heat}": (what, heat == "cold")
                for what, heat in [("empty layer", "cold"), ("empty _C", "cold"),
                                   ("empty plan", "cold"), ("empty layer", "hot"),
                                   ("empty _C", "hot"), ("empty plan", "hot"), ("layer", "cold"),
                                   ("_C", "cold"), ("plan", "cold")]}
    with torch.no_grad():
        got = layer(*sets[0])
        want = memkernels.reading_layer(*[sets[0][i] for i in (0, 3, 5, 6, 4)], eps=1e-6,
                                        scale=20.0, mlp_w=sets[0][1], mlp_b=sets[0][2],
                                        unit_queries=True, backend="reference")
        print(f"max |cpu - reference| on one set: {(got - want).abs().max().item():.2e}")
        assert torch.equal(plans[0](sets[0][0]), got)
        medians = {name: [] for name in measures}
        for r in range(rounds):
            names = list(measures)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                what, cold = measures[name]
                times = []
                for c in range(CALLS):
                    fn, args = calls[what](c)
                    if cold:
                        in_turn(evict, [1])
                    t0 = time.perf_counter()
                    fn(*args)
                    times.append(time.perf_counter() - t0)
                medians[name].append(statistics.median(times) * 1e6)
            print(f"round {r}: " + "; ".join(f"{n} {medians[n][-1]:.1f}" for n in measures),
                  flush=True)
    print(f"medians over {rounds} rounds (us): " + "; ".join(
        f"{n} {statistics.median(v):.1f}" for n, v in medians.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
