"""The benchmark harness itself: the registry, a case timed end to end on a
tiny shape, and the report (markdown and PNG) from recorded results."""
import json
import mmap
import os
import subprocess
import sys

import pytest
import torch

import memkernels
from memkernels.apps.bench import cases as cases_module
from memkernels.apps.bench import report, run
from memkernels.apps.bench.cases import (MATMULS_ALONE, PLAN, READ_ONCE, STEPS_IN_TURN,
                                         STEPS_IN_TURN_COPY, attention_matmuls, read_cases,
                                         reader_cases, write_cases)
from memkernels.apps.bench.shapes import ReaderShape, ReadShape, WriteShape
from memkernels.apps.bench.timing import median_time, median_times
from memkernels.ops import backend


def test_registry_covers_every_op():
    for device in (torch.device("cpu"), torch.device("cuda")):
        for op in run.OPS:
            # the fused reading layer has a CPU kernel only
            assert bool(run.shapes_for(op, device)) == (op != "reader_fwd" or device.type == "cpu"), op
    for op in ("read_bwd", "read_fwd_bwd"):
        assert all("decode" not in s.name for s in run.shapes_for(op, torch.device("cpu")))


def test_cases_compute_the_same_function():
    """Every implementation a case offers returns what the reference returns."""
    shape = ReadShape("tiny", B=2, H=2, T=3, S=40, D=8)
    outs = {}
    for case in read_cases(shape, torch.device("cpu"), torch.float32, ["cpu"], "fwd"):
        if "compile" in case.impl or case.impl == MATMULS_ALONE:
            continue  # compiling is slow here (test_api covers it); the matmuls: their own test
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


def test_matmuls_alone_rows_run_the_ops_matmuls_on_the_same_inputs(monkeypatch):
    """The write's and the prefill read's "matmuls alone" rows run their 2
    forward / 5 backward matmuls on the very inputs the op gets, counted with
    its FLOPs; chunks of groups or of rows compute the same products."""
    cpu = torch.device("cpu")
    for mode, n_out in (("fwd", 1), ("bwd", 3), ("fwd_bwd", 4)):
        for cases in (write_cases(WriteShape("tiny", B=2, H=3, S=5, T=7, D=8), cpu,
                                  torch.float32, ["cpu"], mode),
                      read_cases(ReadShape("tiny", B=2, H=3, T=4, S=9, D=8), cpu,
                                 torch.float32, ["cpu"], mode)):
            by_impl = {c.impl: c for c in cases}
            alone, fused = by_impl[MATMULS_ALONE], by_impl["memkernels[cpu]"]
            assert (alone.op, alone.flops, len(alone.fns)) == (fused.op, fused.flops,
                                                               len(fused.fns))
            assert len(alone.fns[0]()) == n_out
    decode = read_cases(ReadShape("tiny", B=2, H=3, T=1, S=9, D=8), cpu, torch.float32,
                        ["cpu"], "fwd")
    assert MATMULS_ALONE not in {c.impl for c in decode}  # bound by bytes, not matmuls
    q, dout, k, v = (torch.randn(3, n, 8) for n in (5, 5, 7, 7))
    p, dp = q @ k.mT, dout @ v.mT
    want = (p @ v, p.mT @ dout, dp @ k, dp.mT @ q)  # out, dV, dQ, dK
    # chunks of 2 groups: each product's pieces stack along the groups
    monkeypatch.setitem(cases_module.SCORE_CHUNK_BYTES, "cpu", 2 * 5 * 7 * 4)
    outs = attention_matmuls(q, k, v, dout, mode="fwd_bwd")
    for i, w in enumerate(want):
        torch.testing.assert_close(torch.cat(outs[i::4]), w)
    # chunks of 2 rows of one group: out and dQ stack along the rows, dV and dK sum
    monkeypatch.setitem(cases_module.SCORE_CHUNK_BYTES, "cpu", 2 * 7 * 4)
    outs = attention_matmuls(q, k, v, dout, mode="fwd_bwd")
    assert len(outs) == 3 * 3 * 4  # 3 groups x 3 row chunks (2, 2, 1 rows)
    per_group = [outs[12 * g:12 * g + 12] for g in range(3)]
    for i, w in enumerate(want):
        pieces = [[chunk[i + 4 * c] for c in range(3)] for chunk in per_group]
        got = [torch.cat(x, 1) if i in (0, 2) else sum(x) for x in pieces]
        torch.testing.assert_close(torch.cat(got), w)


def test_reader_cases_compute_the_reading_layer():
    """The fused reading layer's case returns what the same math in ATen ops
    returns, on every rotating input set; its floor counts the weights, the
    bank and the hidden state once."""
    shape = ReaderShape("tiny", B=2, T=3, C=24, M=20, H=4, Hk=2, S=37, D=8)
    cases = {c.impl: c for c in reader_cases(shape, torch.device("cpu"), torch.float32, ["cpu"],
                                             "fwd")}
    assert set(cases) == {"memkernels[cpu]", PLAN, "reference (eager)",
                          "torch.compile(reference)", READ_ONCE, STEPS_IN_TURN}
    assert all(c.op == "reader_fwd" for c in cases.values())
    fused, eager, plan = cases["memkernels[cpu]"], cases["reference (eager)"], cases[PLAN]
    assert len(fused.fns) == len(eager.fns) == len(plan.fns) > 8  # more sets than the cache
    assert plan.bytes == fused.bytes and plan.flops == fused.flops
    with torch.no_grad():
        for f, e, p in zip(fused.fns[:3], eager.fns[:3], plan.fns[:3]):
            torch.testing.assert_close(f(), e(), atol=1e-5, rtol=1e-5)
            # each set's own plan, called with that set's hidden state alone
            assert p.args[0] is f.args[0] and len(p.args) == 1
            assert torch.equal(p(), f())
    weights = 20 * 24 + 20 + 32 * 20 + 32 * 24
    assert fused.bytes == 4 * (weights + 2 * 2 * 37 * 8 + 2 * 2 * 3 * 24)
    # the measured floor sums one tensor of the inputs' bytes
    floor = cases[READ_ONCE]
    assert floor.bytes == fused.bytes and len(floor.fns) == len(fused.fns)
    inputs = fused.fns[0].args
    torch.testing.assert_close(floor.fns[0](), sum(t.sum() for t in inputs), rtol=1e-4, atol=1e-3)
    # the chain's floor: the layer's own tensors (not a copy) in four passes, its steps in the
    # order they run
    chain = cases[STEPS_IN_TURN]
    assert chain.bytes == fused.bytes and len(chain.fns) == len(fused.fns)
    for f, c in zip(fused.fns, chain.fns):
        hidden, mlp_w, mlp_b, query_w, out_w, keys, values = f.args
        arrays, steps = c.args
        assert [a.data_ptr() for a in arrays] == [t.data_ptr() for t in (
            hidden, mlp_w, mlp_b, query_w, keys, values, out_w)]
        assert [a.numel() for a in arrays] == [t.numel() for t in (
            hidden, mlp_w, mlp_b, query_w, keys, values, out_w)]
        assert steps == [3, 1, 2, 1]
    assert chain.fns[0]() == pytest.approx(float(sum(t.double().sum() for t in inputs)),
                                           rel=1e-4, abs=1e-3)
    with pytest.raises(ValueError, match="inference only"):
        reader_cases(shape, torch.device("cpu"), torch.float32, ["cpu"], "fwd_bwd")


def test_sum_in_turn_sums_each_array_and_names_a_bad_one():
    """memkernels._C.cpu_sum_in_turn, the chain's floor in the bench: the total
    of every array's elements (sizes across the 64-float step, an empty array
    and an empty list included), one array a step or several; an array it
    cannot read is named by its place in the list, before any is read, and
    steps that do not count the arrays are refused."""
    from helpers import cpu_extension
    ext = cpu_extension()
    arrays = [torch.randn(n) for n in (1, 63, 64, 65, 4099, 0)] + [torch.randn(3, 77)]
    expected = float(sum(a.double().sum() for a in arrays))
    assert ext.cpu_sum_in_turn(arrays) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert ext.cpu_sum_in_turn([]) == 0.0
    # several arrays a step: each array read once whatever the steps (the grouping only
    # moves the barriers, which a total cannot see)
    for steps in ([1] * 7, [3, 1, 2, 1], [7], [1, 6]):
        assert ext.cpu_sum_in_turn(arrays, steps) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    for steps, message in (([3, 0, 4], r"steps\[1\] must be a positive count"),
                           ([3, 3], r"must add up to len\(arrays\) \(7\), got 6"),
                           ([5, 5], r"must add up to len\(arrays\) \(7\), got more"),
                           ([-1, 8], r"steps\[0\] must be a positive count"),
                           ([], r"must add up to len\(arrays\) \(7\), got 0"),
                           # counts whose int64 sum wraps around to 7
                           ([1, 2**63 - 1, 2**63 - 1, 7], r"got more")):
        with pytest.raises(RuntimeError, match=message):
            ext.cpu_sum_in_turn(arrays, steps)
    for bad, message in ((torch.randn(3, 4).t(), r"arrays\[1\] must be contiguous"),
                         (torch.randn(3).double(), r"arrays\[1\] must be float32, got Double"),
                         (torch.empty(3, device="meta"), r"arrays\[1\] must be a CPU tensor")):
        with pytest.raises(RuntimeError, match=message):
            ext.cpu_sum_in_turn([torch.randn(2), bad])


def test_median_times_take_turns():
    """The entries are timed in turns (a slow minute lands on each alike), each
    over its rotating input sets, and each gets its own median."""
    calls = []
    fast = [lambda i=i: calls.append(("fast", i)) for i in range(2)]
    slow = [lambda: (calls.append(("slow", 0)), sum(range(20000)))]
    t_fast, t_slow = median_times([fast, slow], torch.device("cpu"), min_time=0.0, rounds=3,
                                  warmup=1, max_reps=30)
    assert 0 < t_fast < t_slow
    timed = [name for name, _ in calls[2:]]  # after one warm-up call each
    turns = [name for i, name in enumerate(timed) if i == 0 or name != timed[i - 1]]
    assert turns == ["fast", "slow"] * 3, turns
    assert {i for name, i in calls if name == "fast"} == {0, 1}  # both input sets rotate
    with pytest.raises(ValueError, match="rounds"):
        median_times([fast], torch.device("cpu"), rounds=0)


def test_median_times_count_each_entrys_page_faults():
    """faults: per entry, the minor page faults a timed call (first touches of
    fresh pages, counted over the entry's own turns): an entry that writes a
    fresh mapping each call pays one a page; one over memory it keeps, ~none."""
    # 1 MiB, under a huge page: a fresh anonymous mapping each call, whatever the
    # allocator's thresholds
    pages = 256
    kept = torch.ones(pages * 1024)

    def fresh():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            for p in range(pages):
                m[p * mmap.PAGESIZE] = 1

    faults = []
    median_times([[fresh], [lambda: kept.fill_(2.0)]], torch.device("cpu"), min_time=0.0,
                 rounds=2, warmup=2, max_reps=20, faults=faults)
    fresh_faults, kept_faults = faults
    assert fresh_faults >= pages * 0.9, faults
    assert kept_faults < pages / 8, faults


def test_bench_cli_times_a_group_in_turns(tmp_path, monkeypatch, capsys):
    """The CLI end to end on a tiny registry: one row per implementation, each
    with its measured floor and the machine's limits, the rounds recorded; a
    bad --rounds is refused."""
    tiny = ReadShape("tiny", B=2, H=2, T=3, S=40, D=8)
    monkeypatch.setattr(run.registry, "CPU_READ", [tiny])
    monkeypatch.setattr(run, "read_cases", lambda *a: [c for c in read_cases(*a)
                                                       if "compile" not in c.impl])
    out = tmp_path / "r.jsonl"
    assert run.main(["--device", "cpu", "--ops", "read_fwd", "--min-time", "0.01",
                     "--rounds", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} >= {"memkernels[cpu]", "reference (eager)",
                                         "sdpa (batch folded)"}
    assert all(r["ms"] > 0 and r["pct_of_floor"] > 0 and r["rounds"] == 2 for r in rows)
    # the limits measured in the group's turns, the first-touch rate among them
    assert all(r["read_gbps"] > 0 and r["first_touch_gbps"] > 0 for r in rows)
    assert all(r["faults_per_call"] >= 0 for r in rows)  # each implementation's, a call
    header = capsys.readouterr().out
    assert "first touch" in header
    # the FMA units' rate where the CPU kernels run vector bodies, and what ran the tile GEMMs
    ext = backend.extension()[0]
    if ext is not None and ext.cpu_isa() != "generic":
        assert all(r["fma_gflops"] > 0 and r["cpu_tile_gemm"] == ext.cpu_tile_gemm()
                   for r in rows)
        # and a product's inner loop on operands in L1, its loads included
        assert all(r["l1_product_gflops"] > 0 for r in rows)
        assert "FMA peak" in header and "L1 product" in header
    with pytest.raises(SystemExit):
        run.main(["--device", "cpu", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_bench_cli_records_only_the_rate_probes_that_run(tmp_path, monkeypatch, capsys):
    """Where a rate probe is missing (no extension, no vector body), the bench
    runs without it: its records and header leave that rate out, the other
    probes' rates stay."""
    tiny = ReadShape("tiny", B=1, H=2, T=2, S=16, D=8)
    monkeypatch.setattr(run.registry, "CPU_READ", [tiny])
    monkeypatch.setattr(run, "read_cases", lambda *a: [c for c in read_cases(*a)
                                                       if "compile" not in c.impl])
    monkeypatch.setattr(run, "l1_product_probe", lambda device: None)
    out = tmp_path / "r.jsonl"
    assert run.main(["--device", "cpu", "--ops", "read_fwd", "--min-time", "0.01",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all("l1_product_gflops" not in r and r["read_gbps"] > 0 for r in rows)
    assert "L1 product" not in capsys.readouterr().out
    ext = backend.extension()[0]
    if ext is not None and ext.cpu_isa() != "generic":
        assert all(r["fma_gflops"] > 0 for r in rows)


def test_bench_cli_times_forward_rows_with_gradients_off(monkeypatch):
    """A forward row's calls (and their warm-up) run inside one no-grad block, as
    a decode loop runs them, with no grad mode set per call; a training row's
    with gradients on."""
    tiny = ReadShape("tiny", B=1, H=2, T=2, S=16, D=8)
    monkeypatch.setattr(run.registry, "CPU_READ", [tiny])
    seen = {}

    def spy_cases(shape, device, dtype, backends, mode):
        def spy(*inputs):
            seen.setdefault(mode, set()).add(torch.is_grad_enabled())
            return inputs[0].sum()
        dims = [(1, 2, 2, 8)] * 3
        sets = [[torch.randn(*d).requires_grad_(mode != "fwd") for d in dims]]
        return [cases_module.Case(f"read_{mode}", shape, "spy", [cases_module._timed(spy, s, mode) for s in sets],
                     1.0, 1.0)]

    monkeypatch.setattr(run, "read_cases", spy_cases)
    assert run.main(["--device", "cpu", "--ops", "read_fwd", "read_fwd_bwd", "--min-time",
                     "0.01"]) == 0
    assert seen == {"fwd": {False}, "fwd_bwd": {True}}
    assert cases_module.forward_only("reader_fwd") and not cases_module.forward_only("write_fwd_bwd")
    # called outside the runner, a forward case keeps the caller's grad mode
    fn = cases_module._timed(lambda x: torch.is_grad_enabled(), [torch.zeros(1)], "fwd")
    assert fn() is True
    with torch.no_grad():
        assert fn() is False


def test_cpu_isa_caps_the_peers_too(monkeypatch):
    """--cpu-isa avx2 reruns the bench in a child with every library's cap set
    (the kernels' and the peers'), the other arguments passed on; in the child
    (the caps already set) it runs there, no further child; the cap the peers
    read is the one the records name (aten_cpu_capability)."""
    calls = []
    monkeypatch.setattr(run.subprocess, "call",
                        lambda cmd, env: calls.append((cmd, env)) or 0)
    for key in run.CPU_ISA_CAPS["avx2"]:
        monkeypatch.delenv(key, raising=False)
    assert run.main(["--cpu-isa", "avx2", "--ops", "read_fwd", "--min-time", "0.01"]) == 0
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "memkernels.apps.bench",
                   "--cpu-isa", "avx2", "--ops", "read_fwd", "--min-time", "0.01"]
    assert all(env[k] == v for k, v in run.CPU_ISA_CAPS["avx2"].items())

    class RanHere(Exception):
        pass

    def ran_here(device):
        raise RanHere

    for key, value in run.CPU_ISA_CAPS["avx2"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(run, "machine_info", ran_here)
    with pytest.raises(RanHere):
        run.main(["--cpu-isa", "avx2", "--ops", "read_fwd"])
    assert len(calls) == 1
    monkeypatch.undo()
    info = run.machine_info(torch.device("cpu"))
    assert info["aten_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "SVE256")
    # the variable the child gets does cap ATen (and so torch.compile's C++)
    capped = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env={**os.environ, **run.CPU_ISA_CAPS["avx2"]}, capture_output=True, text=True,
        check=True).stdout.strip()
    assert capped in ("DEFAULT", "AVX2")


def test_records_name_the_checkout_they_ran_from_whatever_the_directory(tmp_path, monkeypatch):
    """The commit a record names is that of the checkout memkernels is imported
    from, not of the working directory's repository (run from elsewhere, the
    bench recorded no commit, or another repository's)."""
    source = os.path.dirname(os.path.dirname(os.path.realpath(memkernels.__file__)))
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=source,
                         capture_output=True, text=True)
    want = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source,
                          capture_output=True, text=True)
    monkeypatch.chdir(tmp_path)  # not a git repository
    info = run.machine_info(torch.device("cpu"))
    if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != source:
        assert "commit" not in info  # an installed package: no checkout of its own to name
    else:
        assert info["commit"].removesuffix("-dirty") == want.stdout.strip()

    # installed inside some other repository's tree: that repository's commit is not named
    other = tmp_path / "other"
    (other / "site" / "memkernels").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.setattr(memkernels, "__file__", str(other / "site" / "memkernels" / "__init__.py"))
    assert "commit" not in run.machine_info(torch.device("cpu"))


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


def test_targets_read_ratios_shares_and_ceilings_off_a_run(tmp_path, capsys):
    """The #21 targets from one run's records: a ratio against the named peer,
    shares of the stream and of the matmul rate, a time over the bytes' floor,
    and the best the run's own limits allow (at the roofline of the stream and
    FMA rates); records made before the FMA probe never get a best below what
    they measured."""
    from memkernels.apps.bench import targets

    limits = dict(read_gbps=50.0, copy_gbps=40.0, matmul_gflops=200.0, fma_gflops=500.0,
                  l1_product_gflops=400.0, time="t0", commit="abc", cpu_isa="avx512",
                  aten_cpu_capability="AVX512")

    def rec(op, shape, impl, ms, gbps, gflops, **extra):
        return dict(op=op, shape=shape, impl=impl, ms=ms, gbps=gbps, gflops=gflops,
                    **{**limits, **extra})

    rows = [rec("read_fwd", "decode", "memkernels[cpu]", 2.0, 35.0, 100.0),  # 70% of 50 GB/s
            rec("read_fwd", "decode", "sdpa (batch folded)", 3.0, 23.3, 66.7),
            rec("read_fwd", "prefill", "memkernels[cpu]", 50.0, 0.1, 300.0),  # 150% of matmul
            rec("write_fwd_bwd", "write", "memkernels[cpu]", 80.0, 1.0, 375.0,  # 30 GFLOP
                faults_per_call=12.0),
            rec("write_fwd_bwd", "write", "reference (eager)", 240.0, 0.3, 125.0,
                faults_per_call=65536.0),
            rec("reader_fwd", "reader_s1024", "memkernels[cpu]", 0.06, 40.0, 10.0),
            rec("reader_fwd", "reader_s1024", READ_ONCE, 0.055, 43.6, 10.9),
            rec("reader_fwd", "reader_s1024", STEPS_IN_TURN, 0.067, 35.8, 9.0),
            # an older run: no FMA probe, a kernel past the matmul rate
            rec("write_fwd_bwd", "write", "memkernels[cpu]", 80.0, 1.0, 375.0, time="t-1",
                fma_gflops=None, l1_product_gflops=None),
            rec("write_fwd_bwd", "write", "torch.compile(reference)", 100.0, 1.0, 300.0,
                time="t-1", fma_gflops=None, l1_product_gflops=None)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (old_key, old), (key, records) = targets.runs([str(path)]).items()
    assert old_key[0] == "t-1" and key[0] == "t0"  # oldest first
    by_name = {t.name: targets.evaluate(t, records) for t in targets.TARGETS}
    ratio = by_name["decode, shared bank: x SDPA batch-folded"]
    assert ratio["value"] == pytest.approx(1.5) and not ratio["met"]
    # the decode's 70 MB at 50 GB/s take 1.4 ms; its 0.2 GFLOP at 500 GFLOP/s 0.4 ms
    assert ratio["best"] == pytest.approx(3.0 / 1.4)
    share = by_name["decode, shared bank: share of the read stream"]
    assert share["value"] == pytest.approx(0.70) and share["met"] and share["best"] == 1.0
    matmul = by_name["prefill forward: share of the matmul rate"]
    assert matmul["value"] == pytest.approx(1.5) and matmul["met"]
    assert matmul["best"] == pytest.approx(500.0 / 200.0)  # at the FMA rate: 2.5x the matmul's
    eager = by_name["write forward+backward: x eager"]
    assert eager["value"] == pytest.approx(3.0) and eager["met"]
    assert eager["best"] == pytest.approx(240.0 / 60.0)  # 30 GFLOP at 500 GFLOP/s
    # at the matmul probe's rate instead: 30 GFLOP at 200 GFLOP/s take 150 ms
    assert eager["best_matmul"] == pytest.approx(240.0 / 150.0)
    # and at the L1 product probe's: 30 GFLOP at 400 GFLOP/s take 75 ms
    assert eager["best_l1"] == pytest.approx(240.0 / 75.0)
    # the decode stays bound by its bytes there (0.2 GFLOP: 1.0 ms against 1.4)
    assert ratio["best_matmul"] == pytest.approx(3.0 / 1.4)
    # a kernel past the vendor GEMM's rate passes that best: it is a reference, not a bound
    assert matmul["best_matmul"] == pytest.approx(1.0) and matmul["value"] > 1.0
    # where both rows counted their page faults, the ratio's text gives them
    assert "page faults a call: ours 12, peer 65,536" in eager["text"]
    assert "page faults" not in ratio["text"]  # the decode rows did not count them
    floor = by_name["reader_fwd S=1,024: time over its bytes at the read stream"]
    assert floor["value"] == pytest.approx(0.06 / (40.0 * 0.06 / 50.0)) and floor["met"]
    # the bytes' own sum beside it: 0.055 ms over the 0.048 its bytes take at the stream
    assert floor["short_read"] == pytest.approx(0.055 / 0.048)
    assert "a sum of its bytes 1.15x, ours 1.09x that" in floor["text"]
    # and in four passes, one per step of the layer: 0.067 ms over the same 0.048
    assert floor["chain"] == pytest.approx(0.067 / 0.048)
    assert "its steps' bytes in turn 1.40x, ours 0.90x that" in floor["text"]
    # an older file names that row as it was (over a contiguous copy): read alike
    older = {(op, shape, STEPS_IN_TURN_COPY if impl == STEPS_IN_TURN else impl): r
             for (op, shape, impl), r in records.items()}
    assert STEPS_IN_TURN_COPY in {impl for _, _, impl in older}
    floor_target = next(t for t in targets.TARGETS if t.name.startswith("reader_fwd S=1,024"))
    assert targets.evaluate(floor_target, older)["chain"] == pytest.approx(0.067 / 0.048)
    # where the run timed the layer's plan too, the floor target reads the plan's row
    with_plan = {**records, ("reader_fwd", "reader_s1024", PLAN): rec(
        "reader_fwd", "reader_s1024", PLAN, 0.05, 48.0, 12.0)}
    planned = targets.evaluate(floor_target, with_plan)
    assert planned["value"] == pytest.approx(0.05 / 0.048) and PLAN in planned["text"]
    assert by_name["write forward+backward: x torch.compile"] is None  # not in this run
    compiled = next(t for t in targets.TARGETS if t.name.endswith("x torch.compile"))
    before_fma = targets.evaluate(compiled, old)
    assert before_fma["value"] == pytest.approx(1.25)
    assert before_fma["best"] == pytest.approx(1.25)  # the rate it reached bounds the machine's
    assert before_fma["best_l1"] is None  # no L1 product probe in that run
    for t in targets.TARGETS:  # no kernel passes its run's roofline
        got = by_name[t.name]
        if got is not None and t.kind != "floor":
            assert got["value"] <= got["best"] * (1 + 1e-9)
    assert targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "commit abc" in out and "| write forward+backward: x eager | >= 3x | 3.00x" in out
    assert "| at the matmul probe's rate | at the L1 product probe's rate |" in out
    rows_out = [line for line in out.splitlines()
                if line.startswith("| write forward+backward: x")]
    assert rows_out[0].endswith("| >= 1.25x (no FMA probe) | 0.67x | - |")  # the older run
    assert rows_out[1].endswith("| 4.00x | 1.60x | 3.20x |")


def test_targets_summary_counts_runs_that_met_each_target(tmp_path):
    """--summary: one table per kernel ISA over its runs, each target's count
    of runs that met it, the median and range of its values."""
    from memkernels.apps.bench import targets

    def rec(time, impl, ms, isa="avx512", fma=500.0, l1=None):
        return dict(op="write_fwd_bwd", shape="write", impl=impl, ms=ms, gbps=1.0,
                    gflops=30e3 / ms, read_gbps=50.0, copy_gbps=40.0, matmul_gflops=200.0,
                    fma_gflops=fma, l1_product_gflops=l1, time=time, commit="abc", cpu_isa=isa,
                    aten_cpu_capability="AVX512")

    # t1 before the FMA probe: its best is a bound (2.5x, at the rate it reached)
    rows = [rec("t1", "memkernels[cpu]", 80.0, fma=None),
            rec("t1", "reference (eager)", 200.0, fma=None),                               # 2.5x
            rec("t2", "memkernels[cpu]", 80.0, l1=400.0),
            rec("t2", "reference (eager)", 320.0, l1=400.0),                              # 4.0x
            rec("t3", "memkernels[cpu]", 100.0, l1=400.0),
            rec("t3", "reference (eager)", 300.0, l1=400.0),                              # 3.0x
            rec("t4", "memkernels[cpu]", 150.0, "avx2"),
            rec("t4", "reference (eager)", 300.0, "avx2")]                               # 2.0x
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = tmp_path / "s.md"
    assert targets.main([str(path), "--summary", "--md", str(md)]) == 0
    header, avx512, avx2 = md.read_text().split("\n\n**")
    command = f"python -m memkernels.apps.bench.targets {path} --summary --md {md}"
    assert header == f"Written by `{command}`."
    assert avx512.startswith("3 runs, kernels avx512, peers AVX512 (t1 to t3)**")
    # met in t2 and t3; median 3.00x; the median best (2.5, 5.33, 5.0): eager over 60 ms
    # at the matmul probe's 200 GFLOP/s the write's 30 GFLOP take 150 ms: 200 / 150, 320 / 150,
    # 300 / 150, median 2.0x; at the L1 product probe's 400 (t2, t3 only) 75 ms: 320 / 75,
    # 300 / 75, median 4.13x
    assert ("| write forward+backward: x eager | >= 3x | 2 of 3 | 3.00x | 2.50x to 4.00x | "
            "5.00x (1 run without an FMA probe) | 2.00x | 4.13x (2 of 3 runs) |") in avx512
    assert avx2.startswith("1 run, kernels avx2") and "| 0 of 1 | 2.00x |" in avx2
    eager_avx2 = next(line for line in avx2.splitlines()
                      if line.startswith("| write forward+backward: x eager"))
    assert eager_avx2.endswith("| - |")  # no L1 product probe in t4
    # the limits over the groups' turns: t1 had no FMA probe; t2, t3 at 200 / 500 and 400 / 500
    assert ("Limits in the groups' turns (medians over 2 groups): read stream 50.0 GB/s, FMA "
            "units 500 GFLOP/s; the matmul probe 0.40 of that rate, the L1 product probe "
            "0.80.") in avx512
    assert "over 1 group): read stream 50.0 GB/s, FMA units 500 GFLOP/s; the matmul probe " \
        "0.40 of that rate." in avx2  # no L1 product probe there
    assert "floor target" not in md.read_text()  # no reader rows: no plain reads table
    # every row's time over the runs: t1-t3 for avx512 (80, 80, 100 ms ours), t4 for avx2
    assert "| write_fwd_bwd, write, memkernels[cpu] | 3 | 80 | 80 to 100 |" in avx512
    assert "| write_fwd_bwd, write, reference (eager) | 3 | 300 | 200 to 320 |" in avx512
    assert "| write_fwd_bwd, write, memkernels[cpu] | 1 | 150 | 150 to 150 |" in avx2


def test_targets_summary_gives_the_plain_reads_beside_the_reader(tmp_path):
    """--summary, for the reader's floor targets: the plain reads timed beside
    ours over the runs (one sum of its bytes; a sum per step in turn, where
    recorded), each one's median over the stream and the runs where it is
    itself within the goal, and ours over the steps in turn."""
    from memkernels.apps.bench import targets

    def rec(time, impl, ms):  # 3.15 MB: 0.063 ms at 50 GB/s
        return dict(op="reader_fwd", shape="reader_s1024", impl=impl, ms=ms, gbps=3.15 / ms,
                    gflops=1.0, read_gbps=50.0, copy_gbps=40.0, matmul_gflops=200.0,
                    fma_gflops=500.0, time=time, commit="abc", cpu_isa="avx512",
                    aten_cpu_capability="AVX512")

    rows = [rec("t1", "memkernels[cpu]", 0.0945), rec("t1", READ_ONCE, 0.0756),  # 1.5x, 1.2x
            rec("t1", STEPS_IN_TURN, 0.0945),                                     # 1.5x
            rec("t2", "memkernels[cpu]", 0.0756), rec("t2", READ_ONCE, 0.0630),  # 1.2x, 1.0x
            rec("t2", STEPS_IN_TURN, 0.0788),                                     # 1.25x
            rec("t3", "memkernels[cpu]", 0.1008), rec("t3", READ_ONCE, 0.0882)]  # 1.6x, 1.4x
    def summary_of(records):
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return targets.summary(targets.runs([str(path)]))
    text = summary_of(rows)
    assert ("| reader_fwd S=1,024: time over its bytes at the read stream | <= 1.3x | 1 of 3 | "
            "1.50x | 1.20x to 1.60x |") in text
    # one sum: 1.2x, 1.0x, 1.4x; in turn: 1.5x, 1.25x (t3 did not record it); ours over
    # the steps in turn: 1.0x and 1.2 / 1.25
    assert ("| reader_fwd S=1,024: time over its bytes at the read stream | 1.20x, 2 of 3 | "
            "1.38x, 1 of 2 | 0.98x, 0.96x to 1.00x |") in text
    assert "the op's call over the plan" not in text  # no run timed the plan
    # runs that timed the plan: the targets read its row, the op's call beside it
    text = summary_of(rows + [rec("t1", PLAN, 0.0756), rec("t2", PLAN, 0.0630)])  # 1.2x, 1.0x
    assert ("| reader_fwd S=1,024: time over its bytes at the read stream (memkernels[cpu], "
            "memkernels[cpu] plan) | <= 1.3x | 2 of 3 | 1.20x | 1.00x to 1.60x |") in text
    # the op's call in t1 and t2: 1.5x and 1.2x its bytes, 1.25x and 1.2x the plan's time
    assert ("| reader_fwd S=1,024: time over its bytes at the read stream | 1.35x, 1 of 2 | "
            "1.23x, 1.20x to 1.25x |") in text


def test_faults_times_both_writes_in_turns_with_their_page_faults(capsys):
    """apps.bench.faults: the write's training step (forward + autograd.grad),
    ours and the eager reference, each rep a median time and a fault count a
    call for each; the gradients of both sides agree."""
    from memkernels.apps.bench import faults
    tiny = WriteShape("tiny", B=1, H=2, S=9, T=5, D=8)
    got = faults.measure(tiny, reps=2, calls=2)
    assert set(got) == {"memkernels", "reference (eager)"}
    assert all(len(r) == 2 and all(ms > 0 and n >= 0 for ms, n in r) for r in got.values())
    inputs = faults.write_inputs(tiny, sets=1)[0]
    ours = faults.step(lambda *x: memkernels.memory_write(*x, backend="cpu"), inputs)
    eager = faults.step(faults.reference.memory_write, inputs)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit):
        faults.main(["--reps", "0"])
    assert "--reps and --calls must be >= 1" in capsys.readouterr().err
    alone = faults.measure(tiny, reps=1, calls=1, sides=("memkernels",))
    assert set(alone) == {"memkernels"} and len(alone["memkernels"]) == 1


def test_faults_appends_a_line_a_side_and_rep(tmp_path, monkeypatch, capsys):
    from memkernels.apps.bench import faults
    monkeypatch.setattr(faults, "CPU_WRITE", [WriteShape("tiny", B=1, H=2, S=9, T=5, D=8)])
    out = tmp_path / "steps.jsonl"
    assert faults.main(["--reps", "2", "--calls", "1", "--sides", "memkernels", "--out",
                        str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r["rep"]) for r in rows] == [("memkernels", 0), ("memkernels", 1)]
    assert all(r["op"] == "write_step" and r["ms"] > 0 and r["faults_per_call"] >= 0
               and r["shape"] == "tiny" and "cpu" in r and "time" in r for r in rows)
    assert "memkernels" in capsys.readouterr().out
