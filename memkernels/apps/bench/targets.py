"""The CPU backend's targets (issue #21) read off recorded benchmark runs.

    python -m memkernels.apps.bench.targets RESULTS.jsonl [MORE.jsonl ...] [--md targets.md]
    python -m memkernels.apps.bench.targets RESULTS.jsonl [...] --summary

One table per run (the records one `memkernels.apps.bench` call wrote: same
start time, commit and ISA), one row per target: the measured ratio or share,
whether it is met, and the best the run's own measured limits allow (what a
kernel at its roofline, its bytes at the stream's bandwidth and its FLOPs at
the FMA units' rate, would reach against the same peer time). A target past
that best is beyond that machine in that run, whatever the kernel does.
Beside it, the same best with the FLOPs at the matmul probe's rate instead: a
vendor GEMM's, whose operands come from memory as every kernel's do. On a
shared host whose load ports a neighbour takes in some minutes, that rate
falls while the FMA units' (registers only) holds; a target past it asks more
than the vendor GEMM reaches in that minute. Not a bound: a kernel passes it
where the vendor BLAS runs below the FMA units (MKL's AVX2 code on AVX-512 AMD
CPUs). And the same best with the FLOPs at the L1 product probe's rate (runs
from kernels v50 on): a register-blocked product's inner loop on operands in
L1, at the fewest loads a FMA the ISA's registers allow with a broadcast a row
(the scheme of the kernels' products and of the vendor GEMM's), its operands
nearest: a target past this best asks the products to outrun that loop in that
run. A probe of its own turns, so it moves with them (on a shared host, by up
to a fifth from one group to the next).

--summary: one table per kernel ISA and peers' ISA over all the runs given,
under a line of the limits the runs measured (medians over the groups'
turns; the matmul and L1 product probes as shares of the FMA rate), with
one row per target: in how many runs it was met, the median and range of the
measured values, and the medians of the runs' best possible (at the FMA rate,
at the matmul probe's and at the L1 product probe's). On a machine whose
limits move from one minute to the next, a single run says little; this is
the figure to quote. Under each table, every row the runs timed: its median
time and range, so that a time quoted from the runs is one this command wrote.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass

from .cases import PLAN, READ_ONCE, STEPS_IN_TURN, STEPS_IN_TURN_COPY

OURS = "memkernels[cpu]"


@dataclass(frozen=True)
class Target:
    name: str
    op: str
    shape: str
    peer: str | None  # the implementation the ratio is taken against; None: a share of a limit
    goal: float        # ratio (peer / ours) at least, or share of the limit at least / at most
    kind: str          # "ratio", "stream" (share of the read stream), "matmul" (of the matmul
                       # rate), "floor" (ours over the bytes' time at the read stream, at most)
    ours: tuple = (OURS,)  # our rows, the first a run recorded taken


def ours_record(t: Target, records: dict) -> dict | None:
    """Our row for t in one run: the first of t.ours the run recorded (the
    reading layer's plan, which runs without it before it existed), or None."""
    return next((records[(t.op, t.shape, impl)] for impl in t.ours
                 if (t.op, t.shape, impl) in records), None)


TARGETS = [
    Target("decode, shared bank: x SDPA batch-folded", "read_fwd", "decode",
           "sdpa (batch folded)", 2.0, "ratio"),
    Target("decode, shared bank: share of the read stream", "read_fwd", "decode", None, 0.70,
           "stream"),
    Target("prefill forward: x SDPA batch-folded", "read_fwd", "prefill", "sdpa (batch folded)",
           1.0, "ratio"),
    Target("prefill forward: share of the matmul rate", "read_fwd", "prefill", None, 0.80,
           "matmul"),
    Target("read forward+backward: x SDPA batch-folded", "read_fwd_bwd", "prefill",
           "sdpa (batch folded)", 1.2, "ratio"),
    Target("write forward+backward: x eager", "write_fwd_bwd", "write", "reference (eager)", 3.0,
           "ratio"),
    Target("write forward+backward: x torch.compile", "write_fwd_bwd", "write",
           "torch.compile(reference)", 1.5, "ratio"),
    # the reading layer as the memory's decode path calls it: its plan (older runs: one call)
    Target("reader_fwd S=1,024: time over its bytes at the read stream", "reader_fwd",
           "reader_s1024", None, 1.3, "floor", (PLAN, OURS)),
    Target("reader_fwd S=4,096: time over its bytes at the read stream", "reader_fwd",
           "reader_s4096", None, 1.3, "floor", (PLAN, OURS)),
]


def runs(paths: list[str]) -> "OrderedDict[tuple, dict]":
    """{(start time, commit, ISA, peers' ISA): {(op, shape, impl): record}},
    oldest first. A run records each (op, shape, impl) once; a repeat (records
    without the fields that tell runs apart) is reported and the later kept."""
    out: OrderedDict = OrderedDict()
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    key = (r.get("time", ""), r.get("commit", "?"), r.get("cpu_isa", "?"),
                           r.get("aten_cpu_capability", "not recorded"))
                    row = (r["op"], r["shape"], r["impl"])
                    if row in out.setdefault(key, {}):
                        print(f"targets: {path}: {row} twice in run {key}; the later kept",
                              file=sys.stderr)
                    out[key][row] = r
    return OrderedDict(sorted(out.items()))


def _bytes_ms(r: dict) -> float:
    """ms the row's bytes take at the run's stream: the read stream for reads,
    the copy bandwidth for writes (which store their bank), as the bench's floor."""
    bw = r.get("copy_gbps") if r["op"].startswith("write") else None
    return r["gbps"] * r["ms"] / (bw or r["read_gbps"])


def _roofline_ms(r: dict, at: str = "fma") -> float | None:
    """ms the row's work takes at the run's measured limits: the larger of its
    bytes' time and its FLOPs at the FMA units' rate (at "matmul": the matmul
    probe's; at "l1_product": the L1 product probe's, None where the run did
    not record it). Records made before the FMA probe take the larger of the
    matmul rate and the rate the row reached: a lower bound on the machine's,
    so their best-possible figures are only bounds (marked so in the table),
    never short of what was measured."""
    if at == "matmul":
        rate = r["matmul_gflops"]
    elif at == "l1_product":
        rate = r.get("l1_product_gflops")
        if not rate:
            return None
    else:
        rate = r.get("fma_gflops") or max(r["matmul_gflops"], r["gflops"])
    return max(_bytes_ms(r), r["gflops"] * r["ms"] / rate)


def evaluate(t: Target, records: dict) -> dict | None:
    """{value, met, best, best_matmul, best_l1, text} for one target in one run
    (best: the value a kernel at the run's roofline would reach against the same
    peer time; best_matmul and best_l1: the same with its FLOPs at the matmul
    probe's and at the L1 product probe's rate, best_l1 None where not
    recorded), or
    None if the run did not record it. Floor targets also give short_read and
    chain: the plain reads timed beside ours (one sum of its bytes, a sum per
    step in turn) over the same stream floor, None where not recorded."""
    ours = ours_record(t, records)
    if ours is None:
        return None
    got = _evaluate(t, records, ours, _roofline_ms(ours))
    if got is not None:
        got["best_matmul"] = _evaluate(t, records, ours, _roofline_ms(ours, "matmul"))["best"]
        at_l1 = _roofline_ms(ours, "l1_product")
        got["best_l1"] = None if at_l1 is None else _evaluate(t, records, ours, at_l1)["best"]
    return got


def _evaluate(t: Target, records: dict, ours: dict, at_roofline: float) -> dict | None:
    """evaluate() against one roofline's time (at_roofline, ms)."""
    if t.kind == "ratio":
        peer = records.get((t.op, t.shape, t.peer))
        if peer is None:
            return None
        value = peer["ms"] / ours["ms"]
        text = f"{value:.2f}x (ours {ours['ms']:.3g} ms, {t.peer} {peer['ms']:.3g}"
        if "faults_per_call" in ours and "faults_per_call" in peer:
            # first touches of fresh pages: a peer that allocates large
            # temporaries pays them in some minutes and not in others
            text += (f"; page faults a call: ours {ours['faults_per_call']:,.0f}, "
                     f"peer {peer['faults_per_call']:,.0f}")
        return dict(value=value, met=value >= t.goal, best=peer["ms"] / at_roofline,
                    text=text + ")")
    stream_ms = _bytes_ms(ours)  # the stream and floor targets are reads: the read stream
    if t.kind == "stream":
        value = stream_ms / ours["ms"]
        return dict(value=value, met=value >= t.goal, best=stream_ms / at_roofline,
                    text=f"{100 * value:.1f}% (stream {ours['read_gbps']:.0f} GB/s)")
    if t.kind == "matmul":
        matmul_ms = ours["gflops"] * ours["ms"] / ours["matmul_gflops"]
        value = matmul_ms / ours["ms"]
        return dict(value=value, met=value >= t.goal, best=matmul_ms / at_roofline,
                    text=f"{100 * value:.1f}% (matmul {ours['matmul_gflops']:.0f} GFLOP/s)")
    value = ours["ms"] / stream_ms  # "floor": at most
    # the same bytes read once by a plain sum, timed beside it: what a read of
    # this few MB reaches against a large stream's bandwidth in this run
    summed = records.get((t.op, t.shape, READ_ONCE))
    short_read = summed["ms"] / stream_ms if summed is not None else None
    # and in as many passes as the layer has dependent steps: the chain's floor
    in_turn = (records.get((t.op, t.shape, STEPS_IN_TURN))
               or records.get((t.op, t.shape, STEPS_IN_TURN_COPY)))
    chain = in_turn["ms"] / stream_ms if in_turn is not None else None
    text = f"{value:.2f}x ({ours['impl']} {1e3 * ours['ms']:.0f} us, stream " \
           f"{ours['read_gbps']:.0f} GB/s"
    if short_read is not None:
        text += f"; a sum of its bytes {short_read:.2f}x, ours {value / short_read:.2f}x that"
    if chain is not None:
        text += f"; its steps' bytes in turn {chain:.2f}x, ours {value / chain:.2f}x that"
    return dict(value=value, met=value <= t.goal, best=at_roofline / stream_ms,
                short_read=short_read, chain=chain, text=text + ")")


def table(key: tuple, records: dict) -> str:
    stamp, commit, isa, peers = key
    lines = [f"**run {stamp}, commit {commit}, kernels {isa}, peers {peers}**", "",
             "| target | asks | measured | met | best possible in this run | at the matmul "
             "probe's rate | at the L1 product probe's rate |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        got = evaluate(t, records)
        if got is None:
            continue
        asks = _asks(t)
        best = _fmt(t, got["best"])
        if not ours_record(t, records).get("fma_gflops"):
            # the rate the run reached stood in for the FMA rate: a bound, not the value
            best = f"{'<=' if t.kind == 'floor' else '>='} {best} (no FMA probe)"
        l1 = "-" if got["best_l1"] is None else _fmt(t, got["best_l1"])
        lines.append(f"| {t.name} | {asks} | {got['text']} | {'yes' if got['met'] else 'no'} | "
                     f"{best} | {_fmt(t, got['best_matmul'])} | {l1} |")
    return "\n".join(lines)


def _asks(t: Target) -> str:
    return {"ratio": f">= {t.goal:g}x", "stream": f">= {100 * t.goal:.0f}%",
            "matmul": f">= {100 * t.goal:.0f}%", "floor": f"<= {t.goal:g}x"}[t.kind]


def _fmt(t: Target, x: float) -> str:
    return f"{x:.2f}x" if t.kind in ("ratio", "floor") else f"{100 * x:.0f}%"


def summary(all_runs: "OrderedDict[tuple, dict]") -> str:
    """One table per (kernels' ISA, peers' ISA) over its runs: per target, the
    runs that met it, the median and range of the measured values and the
    median best possible; under it, for the floor targets, the plain reads
    timed beside ours (_plain_reads)."""
    groups: OrderedDict = OrderedDict()
    for key, records in all_runs.items():
        groups.setdefault((key[2], key[3]), []).append((key, records))
    out = []
    for (isa, peers), members in groups.items():
        stamps = [k[0] for k, _ in members]
        n = len(members)
        lines = [f"**{n} run{'s' if n != 1 else ''}, kernels {isa}, peers {peers} "
                 f"({min(stamps)} to {max(stamps)})**", "", *_limits(members),
                 "| target | asks | met in | median | range | best possible (median) | at the "
                 "matmul probe's rate (median) | at the L1 product probe's rate (median) |",
                 "|---|---|---|---|---|---|---|---|"]
        for t in TARGETS:
            got = [g for g in (evaluate(t, recs) for _, recs in members) if g is not None]
            if not got:
                continue
            values = [g["value"] for g in got]
            best = _fmt(t, statistics.median(g["best"] for g in got))
            rows = [r for r in (ours_record(t, recs) for _, recs in members) if r is not None]
            unprobed = sum(1 for r in rows if not r.get("fma_gflops"))
            if unprobed:  # their best is only a bound (table(): "no FMA probe")
                best += f" ({unprobed} run{'s' if unprobed != 1 else ''} without an FMA probe)"
            l1s = [g["best_l1"] for g in got if g["best_l1"] is not None]
            l1 = "-" if not l1s else _fmt(t, statistics.median(l1s))
            if l1s and len(l1s) < len(got):
                l1 += f" ({len(l1s)} of {len(got)} runs)"
            impls = sorted({r["impl"] for r in rows})
            name = t.name if impls == [OURS] else f"{t.name} ({', '.join(impls)})"
            lines.append(
                f"| {name} | {_asks(t)} | {sum(g['met'] for g in got)} of {len(got)} | "
                f"{_fmt(t, statistics.median(values))} | {_fmt(t, min(values))} to "
                f"{_fmt(t, max(values))} | {best} | "
                f"{_fmt(t, statistics.median(g['best_matmul'] for g in got))} | {l1} |")
        out.append("\n".join(lines + _plain_reads(members) + _row_times(members)))
    return "\n\n".join(out)


def _limits(members: list) -> list[str]:
    """The machine's limits as the runs measured them in each group's turns
    (one op on one shape): their medians over the groups, the rate probes as
    shares of the FMA units' rate in the same turns. Empty where no group
    recorded an FMA rate."""
    groups = {}
    for (stamp, *_), records in members:
        for (op, shape, _), r in records.items():
            groups.setdefault((stamp, op, shape), r)
    probed = [r for r in groups.values() if r.get("fma_gflops")]
    if not probed:
        return []
    def median(f):
        return statistics.median(f(r) for r in probed)
    n = len(probed)
    text = (f"Limits in the groups' turns (medians over {n} group{'s' if n != 1 else ''}): "
            f"read stream "
            f"{median(lambda r: r['read_gbps']):.1f} GB/s, FMA units "
            f"{median(lambda r: r['fma_gflops']):.0f} GFLOP/s; the matmul probe "
            f"{median(lambda r: r['matmul_gflops'] / r['fma_gflops']):.2f} of that rate")
    with_l1 = [r for r in probed if r.get("l1_product_gflops")]
    if with_l1:
        share = statistics.median(r["l1_product_gflops"] / r["fma_gflops"] for r in with_l1)
        text += f", the L1 product probe {share:.2f}"
        if len(with_l1) < len(probed):
            text += f" ({len(with_l1)} groups)"
    return [text + ".", ""]


def _row_times(members: list) -> list[str]:
    """Every (op, shape, impl) the runs timed, in the order first recorded:
    in how many runs, its median ms and range."""
    times: OrderedDict = OrderedDict()
    for _, records in members:
        for (op, shape, impl), r in records.items():
            times.setdefault((op, shape, impl), []).append(r["ms"])
    if not times:
        return []
    lines = ["", "| row (op, shape, implementation) | runs | median ms | range ms |",
             "|---|---|---|---|"]
    def fmt(x: float) -> str:  # 4 significant digits, never an exponent
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"

    for (op, shape, impl), ms in times.items():
        lines.append(f"| {op}, {shape}, {impl} | {len(ms)} | {fmt(statistics.median(ms))} | "
                     f"{fmt(min(ms))} to {fmt(max(ms))} |")
    return lines


def _plain_reads(members: list) -> list[str]:
    """For the floor targets, the plain reads timed beside ours in the same
    runs, over the same stream: a sum of its bytes in one pass, and one pass
    per dependent step of the layer (the chain's floor); the runs where each
    is itself within the goal, and ours over the chain."""
    lines = []
    for t in TARGETS:
        if t.kind != "floor":
            continue
        got = [g for g in (evaluate(t, recs) for _, recs in members) if g is not None]
        one = [g["short_read"] for g in got if g["short_read"] is not None]
        chain = [g for g in got if g["chain"] is not None]
        if not one and not chain:
            continue
        if not lines:
            lines = ["", "| floor target | a sum of its bytes: median, within the goal in | "
                     "its steps' bytes in turn: median, within the goal in | ours over the "
                     "steps in turn: median, range |", "|---|---|---|---|"]

        def share(xs):
            if not xs:
                return "not recorded"
            return (f"{statistics.median(xs):.2f}x, {sum(x <= t.goal for x in xs)} of "
                    f"{len(xs)}")
        ratios = [g["value"] / g["chain"] for g in chain]
        over = (f"{statistics.median(ratios):.2f}x, {min(ratios):.2f}x to {max(ratios):.2f}x"
                if ratios else "not recorded")
        lines.append(f"| {t.name} | {share(one)} | {share([g['chain'] for g in chain])} | "
                     f"{over} |")
    # where the runs timed the plan, the op's one call (memkernels.reading_layer) beside it
    calls = []
    for t in TARGETS:
        if t.kind != "floor" or t.ours[0] == OURS:
            continue
        op_call = dataclasses.replace(t, ours=(OURS,))
        pairs = [(evaluate(op_call, recs), evaluate(t, recs)) for _, recs in members
                 if ours_record(t, recs) is not None and ours_record(t, recs)["impl"] != OURS
                 and evaluate(op_call, recs) is not None]
        if pairs:
            op = [a["value"] for a, _ in pairs]
            over = [a["value"] / b["value"] for a, b in pairs]
            met = sum(x <= t.goal for x in op)
            calls.append(f"| {t.name} | {statistics.median(op):.2f}x, {met} of {len(op)} | "
                         f"{statistics.median(over):.2f}x, {min(over):.2f}x to "
                         f"{max(over):.2f}x |")
    if calls:
        lines += ["", f"| floor target | {OURS} (the op's one call): median, within the goal "
                  f"in | the op's call over the plan: median, range |", "|---|---|---|", *calls]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON-lines files written by memkernels.apps.bench --out")
    ap.add_argument("--md", help="write the tables here (default: print them)")
    ap.add_argument("--summary", action="store_true",
                    help="one table per kernel ISA over all the runs, not one per run")
    args = ap.parse_args(argv)
    found = OrderedDict((k, recs) for k, recs in runs(args.results).items()
                        if any(evaluate(t, recs) for t in TARGETS))
    if args.summary:
        text = summary(found)
    else:
        text = "\n\n".join(table(k, recs) for k, recs in found.items())
    if args.md:  # the command that wrote it first, so the file says how to remake it
        given = sys.argv[1:] if argv is None else list(argv)
        with open(args.md, "w") as f:
            f.write(f"Written by `python -m memkernels.apps.bench.targets "
                    f"{' '.join(shlex.quote(a) for a in given)}`.\n\n{text}\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
