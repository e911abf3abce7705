"""The benchmark harness itself: the registry, a case timed end to end on a
tiny shape, and the report (markdown and PNG) from recorded results."""
import json

import pytest
import torch

from memkernels.apps.bench import report, run
from memkernels.apps.bench.cases import read_cases, write_cases
from memkernels.apps.bench.shapes import ReadShape, WriteShape
from memkernels.apps.bench.timing import median_time


def test_registry_covers_every_op():
    for device in (torch.device("cpu"), torch.device("cuda")):
        for op in run.OPS:
            assert run.shapes_for(op, device), op
    for op in ("read_bwd", "read_fwd_bwd"):
        assert all("decode" not in s.name for s in run.shapes_for(op, torch.device("cpu")))


def test_cases_compute_the_same_function():
    """Every implementation a case offers returns what the reference returns."""
    shape = ReadShape("tiny", B=2, H=2, T=3, S=40, D=8)
    outs = {}
    for case in read_cases(shape, torch.device("cpu"), torch.float32, ["cpu"], "fwd"):
        if "compile" in case.impl:
            continue  # compiling is slow here; test_api covers torch.compile
        outs[case.impl] = case.fns[0]()
        assert median_time(case.fns, torch.device("cpu"), min_time=0.0, max_reps=5) > 0
    for impl, out in outs.items():
        torch.testing.assert_close(out, outs["reference (eager)"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, impl=impl: f"{impl}: {m}")
    for mode in ("bwd", "fwd_bwd"):
        w = write_cases(WriteShape("tiny", B=1, H=2, S=5, T=7, D=8), torch.device("cpu"),
                        torch.float32, ["cpu"], mode)
        assert {c.impl for c in w} >= {"memkernels[cpu]", "reference (eager)"}
        assert all(c.op == f"write_{mode}" for c in w)
        w[0].fns[0]()  # runs


def test_report_renders_table_and_plot(tmp_path):
    rows = [dict(op="read_fwd", shape="decode", impl=impl, ms=ms, gbps=1.0, gflops=2.0,
                 pct_of_floor=pct, bound="memory", timing="eager", dtype="torch.float32",
                 cpu="Test CPU", time=f"2026-11-25T00:00:0{i}")
            for i, (impl, ms, pct) in enumerate([("memkernels[cpu]", 2.0, 50.0),
                                                 ("sdpa (batch folded)", 3.0, 33.0)])]
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md, png = tmp_path / "t.md", tmp_path / "p.png"
    pytest.importorskip("matplotlib")
    assert report.main([str(results), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "| read_fwd | decode | sdpa (batch folded) | eager | 3.000 |" in text
    assert text.rstrip().endswith("1.50 |")  # 3.0 ms over memkernels' 2.0 ms
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
