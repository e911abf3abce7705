"""The fused reading layer (memkernels.reading_layer, op memkernels::reading_layer):
the CPU kernel (memkernels._C.reader_fwd) against the pure-PyTorch reference
on a grid of shapes, its argument checks, and the op under torch.compile."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import memkernels
from memkernels.memory.bank import Int8Rows

from helpers import cpu_extension, sorted_index

C, D = 21, 8  # odd hidden size; Dh 8


def layer_inputs(*, B, T, Hk, per_kv, S, dtype, shared, mlp=0, context=False, query_b=False):
    """Random operands of one reading layer: H = Hk * per_kv query heads."""
    W = Hk * per_kv * D
    hidden = torch.randn(B, T, C, dtype=dtype) * 2
    width_in = mlp or C
    kw = dict(query_w=torch.randn(W, width_in, dtype=dtype) / width_in ** 0.5,
              out_w=torch.randn(W, C, dtype=dtype) / W ** 0.5)
    bank = (Hk, S, D) if shared else (B, Hk, S, D)
    kw["keys"], kw["values"] = torch.randn(bank, dtype=dtype), torch.randn(bank, dtype=dtype)
    opts = {}
    if mlp:
        opts.update(mlp_w=torch.randn(mlp, C, dtype=dtype) / C ** 0.5,
                    mlp_b=torch.randn(mlp, dtype=dtype))
        if context:
            opts.update(context=torch.randn(B, T, C, dtype=dtype),
                        context_w=torch.randn(mlp, C, dtype=dtype) / C ** 0.5)
    if query_b:
        opts["query_b"] = torch.randn(W, dtype=dtype)
    return hidden, kw, opts


def both(hidden, kw, **opts):
    """(the CPU kernel's output, the reference's) for the same operands."""
    cpu_extension()
    args = (hidden, kw["query_w"], kw["keys"], kw["values"], kw["out_w"])
    with torch.no_grad():
        got = memkernels.reading_layer(*args, backend="cpu", **opts)
        want = memkernels.reading_layer(*args, backend="reference", **opts)
    return got, want


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


GRID = pytest.mark.parametrize("B, T, Hk, per_kv, S, shared", [
    (1, 1, 2, 1, 37, True), (3, 1, 2, 2, 37, True), (5, 1, 3, 1, 70, True),
    (3, 1, 2, 1, 37, False), (3, 5, 2, 2, 130, False), (2, 7, 1, 2, 1, True),
    (6, 1, 2, 1, 513, False)],
    ids=["decode-shared-1", "decode-shared-2qheads", "decode-5rows-gemm", "decode-per-row",
         "prefill-per-row", "prefill-shared-S1", "decode-per-row-513"])


@GRID
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_query_matches_the_reference(B, T, Hk, per_kv, S, shared, dtype):
    hidden, kw, _ = layer_inputs(B=B, T=T, Hk=Hk, per_kv=per_kv, S=S, dtype=dtype, shared=shared)
    got, want = both(hidden, kw, eps=1e-6, scale=0.3)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@GRID
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("context", [False, True], ids=["mlp", "mlp-context"])
def test_mlp_query_with_unit_queries_and_context_matches_the_reference(B, T, Hk, per_kv, S,
                                                                        shared, dtype, context):
    hidden, kw, opts = layer_inputs(B=B, T=T, Hk=Hk, per_kv=per_kv, S=S, dtype=dtype,
                                    shared=shared, mlp=19, context=context, query_b=True)
    got, want = both(hidden, kw, scale=20.0, unit_queries=True, **opts)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("T", [1, 5], ids=["decode", "prefill"])
def test_mlp_gelu_over_its_whole_range_and_nan(T):
    """The float32 kernel's GELU (a rational erf, vectorized) against torch's
    exact GELU: pre-activations from -40 to 40 (past the erf's clamp at
    +-4 sqrt 2, where GELU is 0 or x), and a NaN pre-activation reads NaN."""
    hidden, kw, opts = layer_inputs(B=2, T=T, Hk=2, per_kv=1, S=30, dtype=torch.float32,
                                    shared=True, mlp=97)
    opts["mlp_b"] = torch.linspace(-40, 40, 97)
    got, want = both(hidden, kw, scale=0.5, **opts)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    opts["mlp_b"][3] = float("nan")
    got, want = both(hidden, kw, scale=0.5, **opts)
    assert want.isnan().all() and got.isnan().all()


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T", [1, 5])
def test_narrow_key_value_caches_match_the_reference(kv_dtype, shared, T):
    """bf16 keys/values, or int8 with a float32 scale per slot, read in place:
    the reference widens the same stored values, so both read the same numbers."""
    hidden, kw, opts = layer_inputs(B=3, T=T, Hk=2, per_kv=2, S=45, dtype=torch.float32,
                                    shared=shared, mlp=11)
    if kv_dtype == torch.int8:
        k8, v8 = Int8Rows.quantize(kw["keys"] * 3), Int8Rows.quantize(kw["values"])
        kw["keys"], kw["values"] = k8.data, v8.data
        opts.update(key_scale=k8.scale, value_scale=v8.scale)
    else:
        kw["keys"], kw["values"] = kw["keys"].to(kv_dtype), kw["values"].to(kv_dtype)
    got, want = both(hidden, kw, scale=0.4, **opts)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, probes", [(1, 2), (4, 3), (1, 6)], ids=["decode-2of6", "prefill-3of6",
                                                                       "decode-all"])
def test_indexed_read_matches_the_reference_and_all_probes_is_exact(dtype, T, probes):
    hidden, kw, opts = layer_inputs(B=2, T=T, Hk=2, per_kv=2, S=60, dtype=dtype, shared=True,
                                    mlp=13)
    keys, centroids, starts = sorted_index(kw["keys"], 6)
    kw["keys"] = keys
    index = dict(centroids=centroids, cluster_starts=starts, probes=probes)
    got, want = both(hidden, kw, scale=3.0, unit_queries=True, **opts, **index)
    torch.testing.assert_close(got, want, **tolerance(dtype))
    exact, _ = both(hidden, kw, scale=3.0, unit_queries=True, **opts)
    if probes == 6:  # every cluster: the exact read
        torch.testing.assert_close(got, exact, **tolerance(dtype))
    else:
        assert not torch.allclose(got, exact)


def test_large_logits_and_nan_propagate_as_in_the_reference():
    hidden, kw, _ = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=33, dtype=torch.float64,
                                 shared=True)
    got, want = both(hidden, kw, scale=50.0)  # x50 logits: one slot takes the weight
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    hidden[1, 0, 3] = float("nan")
    got, want = both(hidden, kw, scale=1.0)
    assert torch.isnan(want[1]).all() and torch.isnan(got[1]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad-mode", "no-grad"])
def test_reading_layer_checks_its_arguments(no_grad):
    """The same errors with gradients on (the Python checks first) and off (the
    CPU kernel called first: its refusal runs the Python checks for their message)."""
    if no_grad:
        cpu_extension()
    hidden, kw, opts = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=5, dtype=torch.float32,
                                    shared=True, mlp=7)
    args = (hidden, kw["query_w"], kw["keys"], kw["values"], kw["out_w"])
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        _check_errors(hidden, kw, opts, args, no_grad)


def _check_errors(hidden, kw, opts, args, no_grad):
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, C\]"):
        memkernels.reading_layer(hidden[0], *args[1:], **opts)
    with pytest.raises(ValueError, match="query_w must be"):
        memkernels.reading_layer(hidden, kw["query_w"][:5], *args[2:], **opts)
    with pytest.raises(ValueError, match="mlp_w needs mlp_b"):
        memkernels.reading_layer(*args, mlp_w=opts["mlp_w"])
    with pytest.raises(ValueError, match="values must be"):
        memkernels.reading_layer(*args[:3], kw["values"][:, :4], kw["out_w"], **opts)
    with pytest.raises(ValueError, match="at least one head and one slot"):
        memkernels.reading_layer(*args[:2], kw["keys"][:, :0], kw["values"][:, :0], kw["out_w"],
                                 **opts)
    with pytest.raises(TypeError, match="int8 keys/values need key_scale"):
        k8 = kw["keys"].to(torch.int8)
        memkernels.reading_layer(*args[:2], k8, k8, kw["out_w"], **opts)
    with pytest.raises(ValueError, match="go together"):
        memkernels.reading_layer(*args, **opts, probes=2)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        memkernels.reading_layer(*args, eps=-1.0, **opts)
    with pytest.raises(ValueError, match="scale must be finite"):
        memkernels.reading_layer(*args, scale=float("nan"), **opts)
    with pytest.raises(ValueError, match="context and context_w go together"):
        memkernels.reading_layer(*args, **opts, context=hidden)
    with pytest.raises(ValueError, match="query_b must be"):
        memkernels.reading_layer(*args, **opts, query_b=torch.zeros(3))
    if not no_grad:
        with pytest.raises(ValueError, match="inference only"):
            memkernels.reading_layer(hidden.requires_grad_(), *args[1:], **opts)
    with pytest.raises(ValueError, match="no triton kernel"):
        memkernels.reading_layer(hidden.detach(), *args[1:], backend="triton", **opts)


def test_no_grad_fast_path_follows_the_backend_choice(monkeypatch):
    """Without gradients the CPU kernel is called before any Python check; it
    is taken exactly where the backend choice picks it: $MEMKERNELS_BACKEND
    naming the reference (or nothing valid) keeps it out, an int or default
    scale is resolved as the full checks do."""
    cpu_extension()
    layer_module = sys.modules["memkernels.ops.reading_layer"]
    hidden, kw, opts = layer_inputs(B=2, T=1, Hk=2, per_kv=2, S=9, dtype=torch.float64,
                                    shared=True, mlp=6)
    args = (hidden, kw["query_w"], kw["keys"], kw["values"], kw["out_w"])
    calls = []
    kernel = layer_module._READER_FWD

    def counted(*a):
        calls.append(a[6])  # the scale it was given
        return kernel(*a)
    monkeypatch.setattr(layer_module, "_READER_FWD", counted)
    with torch.no_grad():
        want = memkernels.reading_layer(*args, scale=0.5, backend="reference", **opts)
        monkeypatch.setenv("MEMKERNELS_BACKEND", "reference")
        got = memkernels.reading_layer(*args, scale=0.5, **opts)
        assert calls == [] and torch.equal(got, want)
        monkeypatch.setenv("MEMKERNELS_BACKEND", "bogus")
        with pytest.raises(ValueError, match="MEMKERNELS_BACKEND"):
            memkernels.reading_layer(*args, **opts)
        assert calls == []
        for env in ("cpu", "auto", None):
            if env is None:
                monkeypatch.delenv("MEMKERNELS_BACKEND")
            else:
                monkeypatch.setenv("MEMKERNELS_BACKEND", env)
            got = memkernels.reading_layer(*args, scale=0.5, **opts)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert calls == [0.5, 0.5, 0.5]
        memkernels.reading_layer(*args, scale=2, **opts)
        memkernels.reading_layer(*args, **opts)
        assert calls[3:] == [2.0, kw["keys"].shape[-1] ** -0.5]
        assert type(calls[3]) is float
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match="scale must be finite"):
                memkernels.reading_layer(*args, scale=bad, **opts)
        assert len(calls) == 5


def test_reading_layer_is_one_op_under_torch_compile():
    """torch.compile(fullgraph=True) sees the custom op (no graph break) and
    gives the eager result."""
    hidden, kw, opts = layer_inputs(B=2, T=3, Hk=2, per_kv=2, S=17, dtype=torch.float32,
                                    shared=True, mlp=9)

    def layer(h):
        return memkernels.reading_layer(h, kw["query_w"], kw["keys"], kw["values"], kw["out_w"],
                                        unit_queries=True, scale=5.0, **opts)
    with torch.no_grad():
        eager = layer(hidden)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")(hidden)
    torch.testing.assert_close(compiled, eager)


# --- the extension's own checks (a direct call of memkernels._C.reader_fwd) ----------------

def test_fused_cpu_reader_rejects_bad_int8_scales():
    ext = cpu_extension()
    h, w = torch.randn(2, 1, 16), torch.randn(8, 16)
    k = torch.randint(-127, 128, (2, 5, 4), dtype=torch.int8)
    s = torch.rand(2, 5)
    with pytest.raises(RuntimeError, match="need key_scale and value_scale"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="need key_scale and value_scale"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, None)
    with pytest.raises(RuntimeError, match="key_scale must have shape"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s[:, :4], s)
    with pytest.raises(RuntimeError, match="value_scale must have dtype Float"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, s.double())
    with pytest.raises(RuntimeError, match="go only with int8"):
        ext.reader_fwd(h, w, k.float(), k.float(), w, 1e-6, 0.5, s, s)
    with pytest.raises(RuntimeError, match="go only with int8"):  # one scale alone, too
        ext.reader_fwd(h, w, k.float(), k.float(), w, 1e-6, 0.5, None, s)
    with pytest.raises(RuntimeError, match="keys must have dtype"):  # int8 only with f32 hidden
        ext.reader_fwd(h.double(), w.double(), k, k, w.double(), 1e-6, 0.5, s, s)
    out = ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, s)
    kf = k.float() * s[..., None]
    torch.testing.assert_close(out, ext.reader_fwd(h, w, kf, kf, w, 1e-6, 0.5),
                               rtol=1e-5, atol=1e-5)


def test_fused_cpu_reader_rejects_bad_tensors():
    ext = cpu_extension()
    h, w = torch.randn(2, 1, 16), torch.randn(8, 16)
    k = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="hidden must be"):
        ext.reader_fwd(h[0], w, k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="query_w must be \\[H \\* Dh, C\\]"):
        ext.reader_fwd(h, w[:3], k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="values must have dtype"):
        ext.reader_fwd(h, w, k, k.double(), w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="keys must have shape"):
        ext.reader_fwd(h, w, torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="values must have dtype"):  # bf16 keys, f32 values
        ext.reader_fwd(h, w, k.bfloat16(), k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="keys must have dtype"):  # bf16 only with f32 hidden
        ext.reader_fwd(h.double(), w.double(), k.bfloat16(), k.bfloat16(), w.double(), 1e-6, 0.5)


def test_fused_cpu_reader_rejects_a_bad_mlp_query():
    ext = cpu_extension()
    h, k = torch.randn(1, 2, 16), torch.randn(2, 5, 4)
    w1, b1, w2, wo = torch.randn(12, 16), torch.randn(12), torch.randn(16, 12), torch.randn(16, 16)
    with pytest.raises(RuntimeError, match="mlp_w needs mlp_b"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1)
    with pytest.raises(RuntimeError, match="mlp_b goes only with mlp_w"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_b=b1)
    with pytest.raises(RuntimeError, match="mlp_w must have shape"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1[:, :8], mlp_b=b1)
    for bad in (torch.tensor(1.0), w1[:0], w1[0]):  # 0-d, no hidden unit, one dim
        with pytest.raises(RuntimeError, match=r"mlp_w must be \[M, C\] with M >= 1"):
            ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=bad, mlp_b=b1)
    with pytest.raises(RuntimeError, match="query_w must have shape"):  # [H * Dh, M] after an MLP
        ext.reader_fwd(h, w2[:, :8], k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1)
    with pytest.raises(RuntimeError, match="H a multiple of the keys' 2 heads"):
        ext.reader_fwd(h, w2[:12], k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1)
    with pytest.raises(RuntimeError, match="query_b must have shape"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, query_b=b1)
    with pytest.raises(RuntimeError, match="mlp_b must have dtype"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1.double())
    context, wc = torch.randn(1, 2, 16), torch.randn(12, 16)
    with pytest.raises(RuntimeError, match="context and context_w go together"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context)
    with pytest.raises(RuntimeError, match="context goes only with mlp_w"):
        ext.reader_fwd(h, w2[:, :16].contiguous(), k, k, wo, 1e-6, 0.5, context=context,
                       context_w=wc)
    with pytest.raises(RuntimeError, match=r"context must have shape \[1, 2, 16\]"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context[:, :1],
                       context_w=wc)
    with pytest.raises(RuntimeError, match=r"context_w must have shape \[12, 16\]"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context,
                       context_w=wc[:8])
    with pytest.raises(RuntimeError, match="context must have dtype"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context.double(),
                       context_w=wc)


def test_reader_fwd_checks_the_index():
    ext = cpu_extension()
    h, k = torch.randn(1, 2, 16), torch.randn(2, 5, 4)
    w1, b1, w2, wo = torch.randn(12, 16), torch.randn(12), torch.randn(8, 12), torch.randn(8, 16)
    cent, starts = torch.randn(2, 3, 4), torch.tensor([[0, 2, 4, 5], [0, 0, 3, 5]])
    call = lambda **kw: ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, **kw)  # noqa: E731
    call(centroids=cent, cluster_starts=starts, probes=1)
    with pytest.raises(RuntimeError, match="go together"):
        call(centroids=cent, cluster_starts=starts)
    with pytest.raises(RuntimeError, match=r"centroids must be \[2, clusters, 4\]"):
        call(centroids=cent[:, :, :3], cluster_starts=starts, probes=1)
    with pytest.raises(RuntimeError, match=r"cluster_starts\[1\] must run from 0 to the 5 slots"):
        call(centroids=cent, cluster_starts=torch.tensor([[0, 2, 4, 5], [0, 0, 3, 6]]), probes=1)
    with pytest.raises(RuntimeError, match=r"cluster_starts\[0\] must not decrease"):
        call(centroids=cent, cluster_starts=torch.tensor([[0, 4, 2, 5], [0, 0, 3, 5]]), probes=1)
    with pytest.raises(RuntimeError, match="cluster_starts must be int64"):
        call(centroids=cent, cluster_starts=starts.int(), probes=1)
    with pytest.raises(RuntimeError, match="shared by the batch"):
        ext.reader_fwd(h, w2, k[None], k[None], wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1,
                       centroids=cent, cluster_starts=starts, probes=1)


# --- the plan (memkernels.reading_layer_plan, memkernels._C.ReaderPlan) -------------------

def _plan_and_layer(kw, opts, **extra):
    """(the plan of kw/opts, reading_layer with them on the reference) for a hidden state."""
    options = {k: v for k, v in opts.items() if k != "context"}
    plan = memkernels.reading_layer_plan(kw["query_w"], kw["keys"], kw["values"], kw["out_w"],
                                         **options, **extra)

    def reference(hidden, context=None):
        return memkernels.reading_layer(hidden, kw["query_w"], kw["keys"], kw["values"],
                                        kw["out_w"], context=context, backend="reference",
                                        **options, **extra)
    return plan, reference


@GRID
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("query", ["linear", "mlp-context"])
def test_plan_matches_the_reference_call_after_call(B, T, Hk, per_kv, S, shared, dtype, query):
    """The C++ plan, built once, gives the reference's output for fresh hidden
    states (and contexts) call after call."""
    ext = cpu_extension()
    mlp = 9 if query != "linear" else 0
    hidden, kw, opts = layer_inputs(B=B, T=T, Hk=Hk, per_kv=per_kv, S=S, dtype=dtype,
                                    shared=shared, mlp=mlp, context=bool(mlp), query_b=bool(mlp))
    plan, reference = _plan_and_layer(kw, opts, unit_queries=bool(mlp), scale=0.7)
    assert isinstance(plan, ext.ReaderPlan)
    with torch.no_grad():
        for _ in range(3):
            h = torch.randn_like(hidden) * 2
            ctx = torch.randn_like(hidden) if mlp else None
            torch.testing.assert_close(plan(h, ctx), reference(h, ctx), **tolerance(dtype))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_plan_reads_narrow_caches(kv_dtype):
    """bf16/int8 banks (int8 with its scales) through the plan equal
    reading_layer's CPU call with the same operands."""
    cpu_extension()
    hidden, kw, opts = layer_inputs(B=3, T=1, Hk=2, per_kv=2, S=40, dtype=torch.float32,
                                    shared=True, mlp=7)
    if kv_dtype == torch.int8:
        k8, v8 = Int8Rows.quantize(kw["keys"]), Int8Rows.quantize(kw["values"])
        kw = {**kw, "keys": k8.data, "values": v8.data}
        opts = {**opts, "key_scale": k8.scale, "value_scale": v8.scale}
    else:
        kw = {**kw, "keys": kw["keys"].to(kv_dtype), "values": kw["values"].to(kv_dtype)}
    plan, _ = _plan_and_layer(kw, opts)
    with torch.no_grad():
        want = memkernels.reading_layer(hidden, kw["query_w"], kw["keys"], kw["values"],
                                        kw["out_w"], backend="cpu", **opts)
        assert torch.equal(plan(hidden), want)


def test_plan_reads_an_index_and_keeps_its_own_cluster_starts():
    """An indexed bank through the plan equals the reference's indexed read; a
    change to the caller's cluster_starts after the plan was built does not
    reach it (its checked copy stands)."""
    cpu_extension()
    hidden, kw, opts = layer_inputs(B=3, T=1, Hk=2, per_kv=2, S=40, dtype=torch.float32,
                                    shared=True, mlp=7)
    keys, cent, starts = sorted_index(torch.randn(2, 40, D), 4)
    index = dict(mlp_w=opts["mlp_w"], mlp_b=opts["mlp_b"], centroids=cent,
                 cluster_starts=starts, probes=2)
    plan = memkernels.reading_layer_plan(kw["query_w"], keys, keys, kw["out_w"], **index)
    with torch.no_grad():
        want = memkernels.reading_layer(hidden, kw["query_w"], keys, keys, kw["out_w"],
                                        backend="reference", **index)
        torch.testing.assert_close(plan(hidden), want, **tolerance(torch.float32))
        starts[:, 1] = 40  # would read the whole bank in the first cluster
        torch.testing.assert_close(plan(hidden), want, **tolerance(torch.float32))


def test_plan_sees_in_place_updates_and_holds_its_own_handles():
    """An in-place update of an operand shows in the next call; replacing a
    caller's tensor's storage (`.data =`, `set_`) does not reach the plan, nor
    does a change to a non-contiguous operand (copied once)."""
    cpu_extension()
    hidden, kw, _ = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=11, dtype=torch.float64,
                                 shared=True)
    kw["out_w"] = torch.randn(C, kw["out_w"].shape[0], dtype=torch.float64).t()
    assert not kw["out_w"].is_contiguous()
    plan = memkernels.reading_layer_plan(kw["query_w"], kw["keys"], kw["values"], kw["out_w"])

    def reference(values, out_w):
        return memkernels.reading_layer(hidden, kw["query_w"], kw["keys"], values, out_w,
                                        backend="reference")
    qw_then = kw["query_w"].clone()
    with torch.no_grad():
        before = plan(hidden)
        kw["keys"].mul_(-0.5)  # in place: the plan reads it
        after = plan(hidden)
        torch.testing.assert_close(after, reference(kw["values"], kw["out_w"]), rtol=1e-10,
                                   atol=1e-10)
        assert not torch.allclose(after, before)
        values, out_w = kw["values"].clone(), kw["out_w"].clone()
        kw["values"].data = torch.zeros_like(values)  # a new storage for the caller's tensor
        kw["query_w"].set_(torch.zeros_like(kw["query_w"]))  # and through set_
        kw["out_w"].mul_(2.0)  # the caller's strided tensor, not the plan's copy
        torch.testing.assert_close(plan(hidden), memkernels.reading_layer(
            hidden, qw_then, kw["keys"], values, out_w, backend="reference"), rtol=1e-10,
            atol=1e-10)


def test_plan_follows_a_storage_reallocated_under_it():
    """A caller's tensor resized larger in place (its storage reallocated, the
    old elements kept) or shrunk in shape (the storage kept): the plan reads its
    own sizes from wherever the storage now is."""
    cpu_extension()
    hidden, kw, _ = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=13, dtype=torch.float32,
                                 shared=True)
    plan = memkernels.reading_layer_plan(kw["query_w"], kw["keys"], kw["values"], kw["out_w"])
    with torch.no_grad():
        want = memkernels.reading_layer(hidden, kw["query_w"], kw["keys"], kw["values"],
                                        kw["out_w"], backend="reference")
        keys, values = kw["keys"].clone(), kw["values"].clone()
        before = kw["keys"].untyped_storage().data_ptr()
        kw["keys"].resize_(4, 64, D)  # larger: a new allocation holding the old elements first
        assert kw["keys"].untyped_storage().data_ptr() != before
        kw["values"].resize_(1, 3, D)  # smaller: the storage stays as it was
        torch.testing.assert_close(plan(hidden), want, **tolerance(torch.float32))
        kw["keys"].view(-1)[:keys.numel()].mul_(2.0)  # the plan's keys, where they live now
        torch.testing.assert_close(plan(hidden), memkernels.reading_layer(
            hidden, kw["query_w"], keys * 2.0, values, kw["out_w"], backend="reference"),
            **tolerance(torch.float32))


@pytest.mark.parametrize("operand", ["keys", "values", "query_w", "out_w", "mlp_w", "mlp_b",
                                     "query_b", "context_w", "key_scale", "value_scale"])
@pytest.mark.parametrize("size", [0, 8], ids=["freed", "shrunk"])
def test_plan_refuses_an_operand_whose_storage_shrank(operand, size):
    """A storage freed or shrunk under the plan (as sharded training frees its
    parameters) is refused at the next call, naming the operand, not read;
    reader_fwd refuses such an operand too."""
    ext = cpu_extension()
    hidden, kw, opts = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=9, dtype=torch.float32,
                                    shared=True, mlp=7, context=True, query_b=True)
    context = opts.pop("context")
    if operand in ("key_scale", "value_scale"):
        k8, v8 = Int8Rows.quantize(kw["keys"]), Int8Rows.quantize(kw["values"])
        kw.update(keys=k8.data, values=v8.data)
        opts.update(key_scale=k8.scale, value_scale=v8.scale)
    operands = {**kw, **opts}
    plan = memkernels.reading_layer_plan(kw["query_w"], kw["keys"], kw["values"], kw["out_w"],
                                         **opts)
    with torch.no_grad():
        plan(hidden, context)
        operands[operand].untyped_storage().resize_(size)
        with pytest.raises(RuntimeError, match=f"plan's {operand} lost its storage"):
            plan(hidden, context)
        with pytest.raises(RuntimeError, match=f"{operand} reaches past its storage"):
            ext.reader_fwd(hidden, kw["query_w"], kw["keys"], kw["values"], kw["out_w"], 1e-6,
                           0.5, opts.get("key_scale"), opts.get("value_scale"), opts["mlp_w"],
                           opts["mlp_b"], opts["query_b"], False, context, opts["context_w"])


def test_plan_checks_its_operands_once_and_the_hidden_state_each_call():
    """Bad operands raise reading_layer's errors when the plan is built; a bad
    hidden state or context raises at the call, naming it; a batch of no
    tokens gives an empty output; gradients are refused as by reading_layer."""
    ext = cpu_extension()
    hidden, kw, opts = layer_inputs(B=2, T=1, Hk=2, per_kv=1, S=5, dtype=torch.float32,
                                    shared=False, mlp=7, context=True)
    args = (kw["query_w"], kw["keys"], kw["values"], kw["out_w"])
    build = memkernels.reading_layer_plan
    options = dict(mlp_w=opts["mlp_w"], mlp_b=opts["mlp_b"], context_w=opts["context_w"])
    with pytest.raises(ValueError, match="query_w must be"):
        build(kw["query_w"][:5], *args[1:], **options)
    with pytest.raises(ValueError, match="mlp_w needs mlp_b"):
        build(*args, mlp_w=opts["mlp_w"])
    with pytest.raises(ValueError, match="values must be"):
        build(*args[:2], kw["values"][..., :4], kw["out_w"], **options)
    with pytest.raises(ValueError, match=r"out_w must be a \[H \* Dh, C\] tensor with C >= 1"):
        build(*args[:3], kw["out_w"][0], **options)
    with pytest.raises(ValueError, match="scale must be finite"):
        build(*args, scale=float("inf"), **options)
    with pytest.raises(TypeError, match=r"out_w must have the dtype of query_w \(torch.float32"):
        build(*args[:3], kw["out_w"].double(), **options)
    with pytest.raises(ValueError, match="context \\(with context_w\\) go only with mlp_w"):
        build(*args, context_w=opts["context_w"])
    with pytest.raises(ValueError, match="no triton kernel"):
        build(*args, backend="triton", **options)
    plan = build(*args, **options)
    assert isinstance(plan, ext.ReaderPlan) and "a bank per row" in repr(plan)
    context = opts["context"]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"hidden must be \[B, T, C\] with C = 21"):
            plan(hidden[..., :20], context)
        with pytest.raises(RuntimeError, match="hidden must have dtype Float"):
            plan(hidden.double(), context)
        with pytest.raises(RuntimeError, match=r"keys must have shape \[3, 2, 5, 8\]"):
            plan(torch.cat([hidden, hidden[:1]]), torch.cat([context, context[:1]]))
        with pytest.raises(RuntimeError, match="context and context_w go together"):
            plan(hidden)
        with pytest.raises(RuntimeError, match=r"context must have shape \[2, 1, 21\]"):
            plan(hidden, context[:, :0])
        empty = plan(hidden[:, :0], context[:, :0])
        assert empty.shape == (2, 0, C)
    with pytest.raises(RuntimeError, match="inference only"):
        plan(hidden.clone().requires_grad_(), context)
    trained = build(kw["query_w"].clone().requires_grad_(), *args[1:], **options)
    with pytest.raises(RuntimeError, match="inference only"):
        trained(hidden, context)
    with torch.no_grad():
        trained(hidden, context)
    plan(hidden, context)  # grad mode, nothing asks for gradients
    opts["mlp_w"].requires_grad_()  # unfrozen after the plan was built: refused as well
    with pytest.raises(RuntimeError, match="inference only"):
        plan(hidden, context)


def test_plan_off_the_cpu_kernel_calls_reading_layer(monkeypatch):
    """Where the CPU kernel does not run the layer (the reference chosen, or a
    dtype it does not read), the plan calls reading_layer with its operands."""
    hidden, kw, opts = layer_inputs(B=2, T=3, Hk=1, per_kv=2, S=6, dtype=torch.float16,
                                    shared=True)
    with pytest.raises(ValueError, match="cpu reading_layer kernel takes float32/float64"):
        memkernels.reading_layer_plan(kw["query_w"], kw["keys"], kw["values"], kw["out_w"],
                                      backend="cpu")
    plan, reference = _plan_and_layer(kw, opts)  # auto: float16 on the reference
    assert "reference" in repr(plan)
    with torch.no_grad():
        assert torch.equal(plan(hidden), reference(hidden))
    hidden, kw, opts = layer_inputs(B=2, T=3, Hk=1, per_kv=2, S=6, dtype=torch.float64,
                                    shared=True)
    monkeypatch.setenv("MEMKERNELS_BACKEND", "reference")
    plan, reference = _plan_and_layer(kw, opts, scale=1.5)
    assert "reference" in repr(plan)
    with torch.no_grad():
        assert torch.equal(plan(hidden), reference(hidden))
    with pytest.raises(ValueError, match="inference only"):
        plan(hidden.requires_grad_())
