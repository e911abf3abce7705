"""Renders recorded benchmark results as a markdown table and a PNG plot.

    python -m memkernels.apps.bench.report RESULTS.jsonl [MORE.jsonl ...] --png plot.png --md table.md

For each device, the newest record of each (op, shape, implementation) is
shown: median time, achieved GB/s and GFLOP/s, % of the roofline floor, and
the time over memkernels' best time at the same op and shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import OrderedDict


def markdown_table(rows: list[dict]) -> str:
    lines = ["| op | shape | impl | timing | median ms | GB/s | GFLOP/s | % of roofline | "
             "x vs memkernels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = [x["ms"] for x in rows if x["op"] == r["op"] and x["shape"] == r["shape"]
                and x["impl"].startswith("memkernels")]
        ratio = f"{r['ms'] / min(ours):.2f}" if ours else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r.get('timing', 'eager')} | "
                     f"{r['ms']:.3f} | {r['gbps']:.1f} | {r['gflops']:.1f} | "
                     f"{r['pct_of_floor']:.0f}% ({r['bound']}) | {ratio} |")
    return "\n".join(lines)


def load(paths: list[str]) -> dict[str, list[dict]]:
    """Newest record per (op, shape, impl), grouped by the machine that ran it."""
    by_device: dict[str, OrderedDict] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                device = r.get("gpu") or r.get("cpu", "cpu")
                key = (r["op"], r["shape"], r["impl"])
                table = by_device.setdefault(f"{device} ({r.get('dtype', '')})", OrderedDict())
                if key not in table or r.get("time", "") >= table[key].get("time", ""):
                    table[key] = r
    return {d: list(t.values()) for d, t in by_device.items()}


def plot(by_device: dict[str, list[dict]], path: str) -> None:
    import matplotlib  # optional dependency (the [bench] extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after the backend is chosen)

    fig, axes = plt.subplots(len(by_device), 2, figsize=(15, 4.5 * len(by_device)), squeeze=False)
    for (device, rows), (ax_t, ax_p) in zip(by_device.items(), axes):
        groups = list(OrderedDict.fromkeys(f"{r['op']}\n{r['shape']}" for r in rows))
        impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ms, pct = [], [], []
            for r in rows:
                if r["impl"] == impl:
                    xs.append(groups.index(f"{r['op']}\n{r['shape']}") + i * width)
                    ms.append(r["ms"])
                    pct.append(r["pct_of_floor"])
            ax_t.bar(xs, ms, width, label=impl)
            ax_p.bar(xs, pct, width, label=impl)
        for ax, title in ((ax_t, "median time, ms (log)"), (ax_p, "% of roofline floor")):
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
            ax.set_title(f"{device}: {title}", fontsize=10)
        ax_t.set_yscale("log")
        ax_p.axhline(100, color="k", lw=0.8)
        ax_p.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON-lines files written by memkernels.apps.bench --out")
    ap.add_argument("--md", help="write the markdown tables here (default: print them)")
    ap.add_argument("--png", help="write the plot here (needs matplotlib)")
    args = ap.parse_args(argv)
    by_device = load(args.results)
    text = "\n\n".join(f"**{device}**\n\n{markdown_table(rows)}" for device, rows in by_device.items())
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.png:
        plot(by_device, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def append_jsonl(path: str, rows: list[dict], info: dict) -> None:
    """Appends rows to a machine kind's results file (benchmarks/results/*.jsonl),
    each with `info` (machine, commit) and the date: one file keeps every run."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **info, "time": stamp}) + "\n")
