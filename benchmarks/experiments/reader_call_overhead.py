"""The reading layer's Python against its kernel: memkernels.reading_layer and
memkernels._C.reader_fwd called directly, at the bench's reading-layer shapes
(hidden 512, MLP 512, 8 query heads of 32 over 4 kv heads, S 1,024 and 4,096),
64 rotated sets so the bytes come from DRAM as in a decode step. Prints the
medians (us) of three turns of each, in alternation.

    PYTHONPATH=. python benchmarks/experiments/reader_call_overhead.py
"""
import statistics
import time

import torch

import memkernels
from memkernels.ops import backend as _backend


def layer(h, mw, mb, qw, ow, k, v):
    """The bench's reading-layer call on one input set (hidden, MLP, query, output, bank)."""
    return memkernels.reading_layer(h, qw, k, v, ow, eps=1e-6, scale=20.0, mlp_w=mw, mlp_b=mb,
                                    unit_queries=True, backend="cpu")


def kernel(h, mw, mb, qw, ow, k, v):
    """The same call's kernel, memkernels._C.reader_fwd called directly."""
    return _backend.extension()[0].reader_fwd(h, qw, k, v, ow, 1e-6, 20.0, None, None, mw, mb,
                                              None, True, None, None, None, None, 0)


def main() -> None:
    torch.manual_seed(0)
    B, T, C, M, H, Hk, D = 1, 1, 512, 512, 8, 4, 32
    for S in (1024, 4096):
        dims = [(B, T, C), (M, C), (M,), (H * D, M), (H * D, C), (Hk, S, D), (Hk, S, D)]
        sets = [[torch.randn(*d) for d in dims] for _ in range(64)]

        medians = {}
        with torch.no_grad():
            for name, fn in [("memkernels.reading_layer", layer), ("_C.reader_fwd", kernel)] * 3:
                times = []
                for _ in range(30):
                    for s in sets:
                        t0 = time.perf_counter()
                        fn(*s)
                        times.append(time.perf_counter() - t0)
                medians.setdefault(name, []).append(round(1e6 * statistics.median(times), 1))
        print(f"S={S}: " + "; ".join(f"{k} {v} us" for k, v in medians.items()))


if __name__ == "__main__":
    main()
