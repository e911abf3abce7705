"""Run by test_extension_fuzz.py in a child process: one binding of memkernels._C,
called first as a valid call, then with each of its arguments replaced in turn by a
wrong one (another dtype, a view with other strides, one dimension more or less, a
meta tensor, None, out-of-range integers and index values, NaN and huge scalars).

Each call prints "@<n> <what>" before it runs and its outcome after, so a call that
kills the process is named by the last line. An outcome is "returned", or "raised"
with one of the exceptions a bad argument may raise; any other exception ends the
run with a traceback. "DONE" ends a run that survived every call.

ReaderPlan, a class, is fuzzed through reader_fwd's arguments: built from all but the
hidden state and its context, then called with them.

usage: python extension_fuzz_child.py BINDING [CASE]"""
from __future__ import annotations

import math
import os
import sys

import torch

from memkernels import _C

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import sorted_index  # noqa: E402  (tests/helpers.py)

ALLOWED = (RuntimeError, ValueError, TypeError, IndexError, OverflowError)


def valid_calls(name: str) -> dict[str, tuple[list, dict]]:
    """Named valid calls of one binding: (positional args, keyword args)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if name in ("read_fwd", "read_fwd_keeping_probs", "read_bwd"):
        # a shared bank over a decode step (few rows) and over a prefill (the tile path)
        out = {}
        for case, (B, H, T, S, D) in {"decode": (3, 2, 1, 37, 16),
                                      "prefill": (2, 2, 33, 70, 8)}.items():
            q, k, v = r(B, H, T, D), r(H, S, D), r(H, S, D)
            mask = torch.rand(B, S, generator=g) > 0.3
            if name != "read_bwd":
                out[case] = ([q, k, v, mask, 0.3], {})
            else:
                o, lse, p, pm = _C.read_fwd_keeping_probs(q, k, v, mask, 0.3)
                kw = {"probs": p, "probs_max": pm} if p.numel() else {}
                out[case] = ([r(B, H, T, D), q, k, v, o, lse, mask, 0.3], kw)
        return out
    if name in ("write_fwd", "write_bwd"):
        B, H, S, T, D = 2, 2, 9, 7, 8
        args = [r(B, H, S, D), r(B, H, S, D), r(B, H, T, D), r(B, H, T, D), r(B, H, S, 1),
                r(B, H, S, 1), torch.rand(B, T, generator=g) > 0.2]
        if name == "write_fwd":
            return {"saving": (args + [0.4], {"save_probs": True})}
        new, upd, lse, probs = _C.write_fwd(*args, 0.4, save_probs=True)
        return {"saved": ([r(*new.shape)] + args + [upd, lse, 0.4], {"probs": probs})}
    if name in ("reader_fwd", "ReaderPlan"):  # the plan: reader_fwd's arguments, see main
        C, M, H, Hk, D, S = 16, 12, 4, 2, 8, 23
        keys, cent, starts = sorted_index(r(Hk, S, D), 3)
        values = r(Hk, S, D)
        mlp = {"mlp_w": r(M, C), "mlp_b": r(M), "query_b": r(H * D), "unit_queries": True,
               "context": r(2, 1, C), "context_w": r(M, C), "centroids": cent,
               "cluster_starts": starts, "probes": 2}
        k8 = (keys * 40).round().clamp(-127, 127).to(torch.int8)
        v8 = (values * 40).round().clamp(-127, 127).to(torch.int8)
        int8 = {"key_scale": torch.full((Hk, S), 0.025), "value_scale": torch.full((Hk, S), 0.025)}
        return {"mlp-index": ([r(2, 1, C), r(H * D, M), keys, values, r(H * D, C), 1e-6, 0.5],
                              mlp),
                "int8": ([r(1, 1, C), r(H * D, C), k8, v8, r(H * D, C), 1e-6, 0.5], int8)}
    if name == "copy_mix_fwd":
        B, T, C, V = 2, 1, 12, 19
        return {"scaled": ([r(B, T, C), r(B, T, V), r(B, T, C), r(V, C), r(C), 1e-6, 4.0, 0.5,
                            1.0], {"unit_scale": torch.rand(V, generator=g) + 0.5})}
    if name == "postings_top":
        starts = torch.tensor([0, 2, 2, 5, 6])
        post_text = torch.tensor([0, 3, 1, 2, 3, 4])
        post_score = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
        return {"index": ([starts, post_text, post_score, 5, torch.tensor([0, 2, 3, 2]), 3, 0.1],
                          {})}
    if name == "cpu_sum_in_turn":
        return {"steps": ([[r(100), r(7), r(33)]], {"steps": [2, 1]})}
    raise SystemExit(f"no valid call of {name}")


def _element(t: torch.Tensor, at: int, value: int) -> torch.Tensor:
    u = t.clone().reshape(-1).to(torch.int64)
    u[at] = value
    return u.view(t.shape).to(t.dtype) if abs(value) < 2 ** 31 else u.view(t.shape)


def tensor_mutations(t: torch.Tensor):
    """(what, make) pairs: each makes a wrong (or oddly laid out) stand-in for t."""
    out = [(f"dtype {dt}", lambda dt=dt: t.to(dt))
           for dt in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int8, torch.bool, torch.complex64) if dt != t.dtype]
    if t.dim() >= 2:
        out.append(("transposed", lambda: t.transpose(-1, -2)))
    if t.numel() > 0 and t.dim() >= 1:
        out.append(("every other element", lambda: torch.cat([t, t], -1)[..., ::2]))
        out.append(("stride 0", lambda: t.narrow(-1, 0, 1).expand(t.shape)))
        out.append(("offset storage", lambda: torch.cat([t.reshape(-1)[:1], t.reshape(-1)])[1:]
                    .view(t.shape)))
    for d in range(t.dim()):
        for size in sorted({0, max(t.shape[d] - 1, 0), t.shape[d] + 1, t.shape[d] + 7}):
            if size != t.shape[d]:
                shape = list(t.shape)
                shape[d] = size
                out.append((f"dim {d} = {size}",
                            lambda s=shape: torch.randn(s).to(t.dtype) if t.is_floating_point()
                            else torch.zeros(s, dtype=t.dtype)))
    out += [("a leading dim", lambda: t.unsqueeze(0)),
            ("0-d", lambda: torch.zeros((), dtype=t.dtype)),
            ("meta", lambda: torch.empty(t.shape, dtype=t.dtype, device="meta")),
            ("None", lambda: None)]
    if t.dim() >= 1:
        out.append(("first dim dropped", lambda: t[0] if t.shape[0] else t.sum(0)))
    if t.numel() > 0 and not t.is_floating_point() and t.dtype != torch.bool:
        for value in (-1, int(t.max()) + 1, 2 ** 31 + 5, -(2 ** 31) - 5, 2 ** 62):
            for at in (0, -1):
                out.append((f"element {at} = {value}", lambda v=value, a=at: _element(t, a, v)))
        out.append(("reversed", lambda: t.flip(-1).contiguous()))
    if t.numel() > 0 and t.is_floating_point():
        out += [(f"all {x}", lambda x=x: torch.full_like(t, x))
                for x in (math.nan, math.inf, -math.inf, 3e38)]
    return out


def scalar_mutations(x):
    if isinstance(x, bool):
        values = [not x, 2]
    elif isinstance(x, int):
        values = [-1, 0, 2 ** 31, 2 ** 62, -(2 ** 62), 2 ** 64, 1.5]
    else:
        values = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300]
    return [(f"= {v}", lambda v=v: v) for v in values] + [("None", lambda: None),
                                                          ("a str", lambda: "x")]


def list_mutations(xs):
    if all(isinstance(x, torch.Tensor) for x in xs):  # cpu_sum_in_turn's arrays
        return [("empty", lambda: []), ("a None", lambda: xs + [None]),
                *((f"[{i}] {what}", lambda i=i, m=make: xs[:i] + [m()] + xs[i + 1:])
                  for i in range(len(xs)) for what, make in tensor_mutations(xs[i]))]
    return [("empty", lambda: []), ("one more", lambda: xs + [1]), ("a zero", lambda: [0] + xs),
            ("negative", lambda: [-x for x in xs]), ("huge", lambda: [2 ** 62] * len(xs))]


def mutations(x):
    if isinstance(x, torch.Tensor):
        return tensor_mutations(x)
    if isinstance(x, list):
        return list_mutations(x)
    return scalar_mutations(x)


def _plan_built_and_called(hidden, *args, context=None, **kw):
    """ReaderPlan fuzzed through reader_fwd's arguments: built from all but the hidden
    state and context, then called twice with them."""
    plan = _C.ReaderPlan(*args, **kw)
    plan(hidden, context)
    return plan(hidden, context=context)


def main(name: str, only: str | None) -> None:
    fn = _plan_built_and_called if name == "ReaderPlan" else getattr(_C, name)
    n = 0
    for case, (args, kw) in valid_calls(name).items():
        if only is not None and case != only:
            continue
        print(f"@{n} {case}: the valid call", flush=True)
        fn(*args, **kw)  # must not raise: else the mutations below test nothing
        print(f"@{n} returned", flush=True)
        slots = [(i, None) for i in range(len(args))] + [(None, k) for k in kw]
        for i, k in slots:
            original = args[i] if i is not None else kw[k]
            for what, make in mutations(original):
                n += 1
                a, w = list(args), dict(kw)
                if i is not None:
                    a[i] = make()
                else:
                    w[k] = make()
                print(f"@{n} {case}: {'arg %d' % i if i is not None else k} {what}", flush=True)
                try:
                    fn(*a, **w)
                    print(f"@{n} returned", flush=True)
                except ALLOWED as e:
                    print(f"@{n} raised {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                          flush=True)
    print(f"DONE {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
