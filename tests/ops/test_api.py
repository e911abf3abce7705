"""gradcheck on the fused kernels, property-based tests, torch.compile,
backend selection and bad-input errors."""
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import memkernels
from helpers import read_inputs, upcast, write_inputs
from memkernels import memory_read, memory_write, reference
from memkernels.ops import backend as _backend

needs_cpu_ext = pytest.mark.skipif(_backend.extension()[0] is None,
                                   reason="memkernels._C is not built")


# --- gradcheck (float64) ----------------------------------------------------

@pytest.mark.parametrize("shared,mask", [(True, "BS"), (False, "S"), (True, None)])
def test_gradcheck_read(backend, device, shared, mask):
    if backend == "triton" and device.type == "cuda":
        pytest.skip("triton has no float64 dot")
    q, k, v, m = read_inputs(2, 2, 3, 9, 5, shared=shared, mask=mask, dtype=torch.float64,
                             device=device)
    assert torch.autograd.gradcheck(
        lambda q, k, v: memory_read(q, k, v, slot_mask=m, backend=backend), (q, k, v))


@pytest.mark.parametrize("gate_dim,mask", [(1, True), (4, False)])
def test_gradcheck_write(backend, device, gate_dim, mask):
    if backend == "triton" and device.type == "cuda":
        pytest.skip("triton has no float64 dot")
    inputs, tm = write_inputs(2, 2, 6, 5, 4, gate_dim=gate_dim, mask=mask, dtype=torch.float64,
                              device=device)
    assert torch.autograd.gradcheck(
        lambda *a: memory_write(*a, token_mask=tm, backend=backend), tuple(inputs))


# --- property-based: random shapes against the reference --------------------

@needs_cpu_ext
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 40), S=st.integers(1, 300),
       D=st.integers(1, 96), shared=st.booleans(), mask=st.sampled_from([None, "S", "BS"]))
def test_read_matches_reference_hypothesis(B, H, T, S, D, shared, mask):
    q, k, v, m = read_inputs(B, H, T, S, D, shared=shared, mask=mask, dtype=torch.float64,
                             device="cpu")
    out = memory_read(q, k, v, slot_mask=m, backend="cpu")
    ref = reference.memory_read(q, k, v, slot_mask=m)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


@needs_cpu_ext
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(1, 200), T=st.integers(1, 100),
       D=st.integers(1, 96), per_channel=st.booleans(), mask=st.booleans())
def test_write_matches_reference_hypothesis(B, H, S, T, D, per_channel, mask):
    inputs, tm = write_inputs(B, H, S, T, D, gate_dim=D if per_channel else 1, mask=mask,
                              dtype=torch.float64, device="cpu")
    out = memory_write(*inputs, token_mask=tm, backend="cpu")
    ref = reference.memory_write(*inputs, token_mask=tm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-8)


# --- torch.compile ------------------------------------------------------------

class ReadWrite(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, mem, qs, kt, vt, f, i, slot_mask, token_mask):
        new_mem = memory_write(mem, qs, kt, vt, f, i, token_mask=token_mask, backend=self.backend)
        out = memory_read(q, new_mem, v, slot_mask=slot_mask, backend=self.backend)
        return out.square().sum()


def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    B, H, T, S, D = 2, 2, 5, 24, 16
    q, _, v, m = read_inputs(B, H, T, S, D, shared=False, mask="BS", dtype=torch.float32,
                             device=device)
    w, tm = write_inputs(B, H, S, 7, D, gate_dim=1, mask=True, dtype=torch.float32, device=device)
    args = (q, w[0], v, *w, m, tm)
    module = ReadWrite(backend)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, [q, v, *w])
    loss_e = module(*args)
    grads_e = torch.autograd.grad(loss_e, [q, v, *w])
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


@needs_cpu_ext
def test_torch_compile_inductor_cpu():
    """The real compiler path (inductor) over the custom ops, no graph break."""
    torch._dynamo.reset()
    q, k, v, m = read_inputs(2, 2, 3, 17, 8, shared=True, mask="S", dtype=torch.float32,
                             device="cpu")
    fn = torch.compile(lambda q, k, v: (memory_read(q, k, v, slot_mask=m, backend="cpu") * 2).sum(),
                       fullgraph=True)
    loss = fn(q, k, v)
    torch.testing.assert_close(loss, (reference.memory_read(q, k, v, slot_mask=m) * 2).sum(),
                               atol=1e-5, rtol=1e-5)
    loss.backward()
    assert q.grad is not None and torch.isfinite(k.grad).all()


# --- backends -----------------------------------------------------------------

def test_reference_backend_needs_no_extension():
    q, k, v, _ = read_inputs(1, 1, 2, 3, 4, shared=True, mask=None, dtype=torch.float32,
                             device="cpu")
    torch.testing.assert_close(memory_read(q, k, v, backend="reference"),
                               reference.memory_read(q, k, v))


def test_unknown_backend_is_named():
    q, k, v, _ = read_inputs(1, 1, 2, 3, 4, shared=True, mask=None, dtype=torch.float32,
                             device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        memory_read(q, k, v, backend="tpu")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MEMKERNELS_BACKEND", "reference")
    assert _backend.resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("MEMKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MEMKERNELS_BACKEND"):
        _backend.resolve(None, torch.device("cpu"))


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "extension", lambda: (None, "simulated missing build"))
    monkeypatch.delenv("MEMKERNELS_BACKEND", raising=False)
    _backend._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        assert _backend.resolve("auto", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="unavailable"):
        _backend.resolve("cpu", torch.device("cpu"))


@needs_cpu_ext
def test_auto_picks_cpu_kernel():
    assert _backend.resolve("auto", torch.device("cpu")) == "cpu"
    assert "cpu" in memkernels.available_backends("cpu")


# --- bad input ----------------------------------------------------------------

def _read_args(**over):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(3, 5, 8), v=torch.randn(3, 5, 8))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(q=torch.randn(3, 4, 8)), ValueError, r"q must be \[B, H, T, Dh\]"),
    (dict(q=torch.randint(0, 3, (2, 3, 4, 8))), TypeError, "q must be float16"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(5, 8)), ValueError, "k must be"),
    (dict(k=torch.randn(4, 5, 8)), ValueError, r"k must be \[H, S, Dh\]"),
    (dict(k=torch.randn(3, 5, 7)), ValueError, "k must be"),
    (dict(k=torch.randn(3, 5, 8).double()), TypeError, "k must have the dtype of q"),
    (dict(k=torch.randn(3, 0, 8), v=torch.randn(3, 0, 8)), ValueError, "at least one slot"),
    (dict(v=torch.randn(3, 6, 8)), ValueError, "v must be the shape of k"),
    (dict(k=torch.randn(1, 3, 5, 8), v=torch.randn(1, 3, 5, 8)), ValueError, r"\[B, H, S, Dh\]"),
    (dict(q=torch.randn(2, 3, 4, 300), k=torch.randn(3, 5, 300), v=torch.randn(3, 5, 300)),
     ValueError, "head dim must be in 1..256"),
])
def test_read_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        memory_read(**_read_args(**over))


@pytest.mark.parametrize("mask,exc,pattern", [
    (torch.ones(5), TypeError, "slot_mask must be a bool tensor"),
    (torch.ones(4, dtype=torch.bool), ValueError, r"slot_mask must be \[S\]"),
    (torch.ones(3, 5, dtype=torch.bool), ValueError, r"\[B, S\] = \(2, 5\)"),
    ("yes", TypeError, "slot_mask must be a bool torch.Tensor"),
])
def test_read_bad_mask(mask, exc, pattern):
    with pytest.raises(exc, match=pattern):
        memory_read(**_read_args(), slot_mask=mask)


@pytest.mark.parametrize("scale,exc", [("big", TypeError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), (True, TypeError)])
def test_bad_scale(scale, exc):
    with pytest.raises(exc, match="scale"):
        memory_read(**_read_args(), scale=scale)


def _write_args(**over):
    B, H, S, T, D = 2, 3, 5, 4, 8
    args = dict(mem=torch.randn(B, H, S, D), q_slots=torch.randn(B, H, S, D),
                k_tok=torch.randn(B, H, T, D), v_tok=torch.randn(B, H, T, D),
                forget_logit=torch.randn(B, H, S, 1), input_logit=torch.randn(B, H, S, 1))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(mem=torch.randn(3, 5, 8)), ValueError, r"mem must be \[B, H, S, Dh\]"),
    (dict(q_slots=torch.randn(2, 3, 6, 8)), ValueError, "q_slots must be"),
    (dict(k_tok=torch.randn(2, 3, 4, 7)), ValueError, "k_tok must be"),
    (dict(k_tok=torch.randn(2, 3, 0, 8), v_tok=torch.randn(2, 3, 0, 8)), ValueError, "at least one token"),
    (dict(v_tok=torch.randn(2, 3, 5, 8)), ValueError, "v_tok must be"),
    (dict(forget_logit=torch.randn(2, 3, 5, 2)), ValueError, "forget_logit must be"),
    (dict(input_logit=torch.randn(2, 3, 5, 8)), ValueError, "input_logit must have the shape"),
    (dict(v_tok=torch.randn(2, 3, 4, 8).half()), TypeError, "v_tok must have the dtype of mem"),
    (dict(mem=torch.randn(2, 3, 0, 8)), ValueError, "at least one slot"),
])
def test_write_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        memory_write(**_write_args(**over))


def test_write_bad_token_mask():
    with pytest.raises(ValueError, match=r"token_mask must be \[B, T\]"):
        memory_write(**_write_args(), token_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask must be a bool"):
        memory_write(**_write_args(), token_mask=torch.ones(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="k must be on the device of q"):
        memory_read(**_read_args(k=torch.randn(3, 5, 8, device="cuda")))


_DIRECT_CALLS = {
    "k shape": ("_C.read_fwd(q, torch.randn(3, 5, 7), v, None, 1.0)", "k must have shape"),
    "mask dtype": ("_C.read_fwd(q, k, v, torch.ones(5), 1.0)", "slot_mask must be a bool"),
    "mask shape": ("_C.read_fwd(q, k, v, torch.ones(7, dtype=torch.bool), 1.0)", "slot_mask must be"),
    "lse shape": ("_C.read_bwd(q, q, k, v, q, torch.zeros(2), None, 1.0)", "lse must have shape"),
    "mask device": ("_C.read_fwd(q, k, v, torch.ones(5, dtype=torch.bool, device='meta'), 1.0)",
                    "slot_mask must be on"),
    "gate shape": ("_C.write_fwd(m, m, t, t, torch.randn(2, 3, 5, 3), g, None, 1.0)",
                   "forget_logit must be"),
    "token mask": ("_C.write_fwd(m, m, t, t, g, g, torch.ones(2, 9, dtype=torch.bool), 1.0)",
                   "token_mask must have shape"),
    "int dtype": ("_C.read_fwd(q.long(), k.long(), v.long(), None, 1.0)", "floating-point"),
    # a backward's gradient and saved results are converted to the compute type: an integer
    # or complex tensor there is refused, not truncated
    "int dout": ("_C.read_bwd(q.long(), q, k, v, q, torch.zeros(2, 3, 4), None, 1.0)",
                 "dout must be a floating-point"),
    "complex lse": ("_C.write_bwd(m, m, m, t, t, g, g, None, m, torch.zeros(2, 3, 5, "
                    "dtype=torch.complex64), 1.0)", "lse must be a floating-point"),
}


_HAS_CUDA_EXT = bool(_backend.extension()[0] is not None and _backend.extension()[0].with_cuda
                     and torch.cuda.is_available())


@needs_cpu_ext
@pytest.mark.parametrize("kernels", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _HAS_CUDA_EXT, reason="needs a GPU and memkernels._C built with CUDA"))])
@pytest.mark.parametrize("call", list(_DIRECT_CALLS), ids=list(_DIRECT_CALLS))
def test_direct_extension_calls_check_their_inputs(call, kernels):
    """memkernels._C (and _C.cuda) re-check what the kernels rely on. Each
    call runs in a child process, so a crash would fail this test (with its
    stderr) instead of taking the test run down."""
    code, pattern = _DIRECT_CALLS[call]
    if kernels == "cuda":
        code = code.replace("_C.", "_C.cuda.")
    dev = "cuda" if kernels == "cuda" else "cpu"
    script = (
        f"import torch\nfrom memkernels import _C\ntorch.set_default_device('{dev}')\n"
        "q = torch.randn(2, 3, 4, 8); k = torch.randn(3, 5, 8); v = torch.randn(3, 5, 8)\n"
        "m = torch.randn(2, 3, 5, 8); t = torch.randn(2, 3, 4, 8); g = torch.randn(2, 3, 5, 1)\n"
        f"try:\n    {code}\nexcept RuntimeError as e:\n    print('RAISED', e)\n"
        "if torch.cuda.is_available(): torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"process died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert "RAISED" in proc.stdout and pattern in proc.stdout, proc.stdout + proc.stderr


def _op_call(op: str, **over):
    """A valid direct call of torch.ops.memkernels.<op> (backend last), with `over` swapped in."""
    q, k = torch.randn(2, 3, 4, 8), torch.randn(3, 5, 8)
    m, t, g = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 1)
    out, lse = reference.memory_read(q, k, k, scale=0.5, return_lse=True)
    new, upd, wlse, _ = torch.ops.memkernels.write_fwd(m, m, t, t, g, g, None, 0.5, "reference")
    h, w = torch.randn(1, 1, 8), torch.randn(4, 8)
    args = {
        "read_fwd": dict(q=q, k=k, v=k, slot_mask=None, scale=0.5),
        "read_bwd": dict(dout=q, q=q, k=k, v=k, out=out, lse=lse, slot_mask=None, scale=0.5),
        "write_fwd": dict(mem=m, q_slots=m, k_tok=t, v_tok=t, forget_logit=g, input_logit=g,
                          token_mask=None, scale=0.5),
        "write_bwd": dict(dnew=m, mem=m, q_slots=m, k_tok=t, v_tok=t, forget_logit=g,
                          input_logit=g, token_mask=None, upd=upd, lse=wlse, scale=0.5),
        "reading_layer": dict(hidden=h, query_w=w, keys=torch.randn(1, 5, 4),
                              values=torch.randn(1, 5, 4), out_w=w, eps=1e-6, scale=0.5,
                              key_scale=None, value_scale=None, mlp_w=None, mlp_b=None,
                              query_b=None, unit_queries=False, context=None, context_w=None,
                              centroids=None, cluster_starts=None, probes=0),
    }[op]
    args.update(over)
    return list(args.values())


# Direct torch.ops.memkernels calls with bad arguments: the ops check them as the
# public functions do, on every backend (before, the reference backend raised
# AttributeError / IndexError / ZeroDivisionError from deep inside).
_OP_CALLS = {
    "read_fwd q None": ("read_fwd", dict(q=None), TypeError, "q must be a torch.Tensor"),
    "read_fwd k 0-d": ("read_fwd", dict(k=torch.tensor(1.0)), ValueError, "k must be"),
    "read_fwd no slots": ("read_fwd", dict(k=torch.randn(3, 0, 8), v=torch.randn(3, 0, 8)),
                          ValueError, "k must hold at least one slot"),
    "read_fwd NaN scale": ("read_fwd", dict(scale=float("nan")), ValueError, "scale must be finite"),
    "read_bwd dout None": ("read_bwd", dict(dout=None), TypeError, "dout must be a torch.Tensor"),
    "read_bwd lse shape": ("read_bwd", dict(lse=torch.zeros(2, 3, 5)), ValueError, "lse must be"),
    "read_bwd out shape": ("read_bwd", dict(out=torch.zeros(2, 3, 4, 7)), ValueError, "out must be"),
    "write_fwd k_tok 0-d": ("write_fwd", dict(k_tok=torch.tensor(1.0)), ValueError, "k_tok must be"),
    "write_fwd gate shape": ("write_fwd", dict(forget_logit=torch.randn(2, 3, 5, 3)), ValueError,
                             "forget_logit must be"),
    "write_bwd dnew shape": ("write_bwd", dict(dnew=torch.randn(2, 3, 6, 8)), ValueError,
                             "dnew must be"),
    "write_bwd upd None": ("write_bwd", dict(upd=None), TypeError, "upd must be a torch.Tensor"),
    "reading_layer hidden None": ("reading_layer", dict(hidden=None), TypeError,
                                  "hidden must be a torch.Tensor"),
    "reading_layer Dh 0": ("reading_layer", dict(keys=torch.randn(1, 5, 0),
                                                 values=torch.randn(1, 5, 0)),
                           ValueError, "keys head dim must be in 1..256"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", list(_OP_CALLS), ids=list(_OP_CALLS))
def test_direct_op_calls_check_their_arguments(case, backend):
    if backend == "cpu" and _backend.extension()[0] is None:
        pytest.skip("memkernels._C is not built")
    op, over, exc, pattern = _OP_CALLS[case]
    with pytest.raises(exc, match=re.escape(pattern)):
        getattr(torch.ops.memkernels, op)(*_op_call(op, **over), backend)


def test_the_reading_layer_op_names_its_backends():
    with pytest.raises(ValueError, match="backend 'cpu' or 'reference', got 'triton'"):
        torch.ops.memkernels.reading_layer(*_op_call("reading_layer"), "triton")


def test_bf16_on_cpu_accumulates_in_float32():
    if _backend.extension()[0] is None:
        pytest.skip("memkernels._C is not built")
    q, k, v, _ = read_inputs(2, 2, 3, 700, 32, shared=True, mask=None, dtype=torch.bfloat16,
                             device="cpu")
    out = memory_read(q, k, v, backend="cpu")
    ref = reference.memory_read(*upcast([q, k, v]))
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("name", ["auto", "reference", "cpu"])
def test_drop_in_functions_take_the_public_defaults(name):
    """MemoryReadFunction.apply(q, k, v) and MemoryWriteFunction.apply(mem, ...)
    work with the public functions' defaults (scale=None, backend="auto"), on
    every backend including the reference, and give their gradients."""
    if name == "cpu" and _backend.extension()[0] is None:
        pytest.skip("memkernels._C is not built")
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    args = () if name == "auto" else (None, None, name)
    out, lse = memkernels.MemoryReadFunction.apply(q, k, v, *args)
    want, want_lse = reference.memory_read(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, ref in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(got, ref)
    mem = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    gate = torch.randn(2, 3, 5, 1, dtype=torch.float64)
    wargs = () if name == "auto" else (None, None, name)
    new, _, _ = memkernels.MemoryWriteFunction.apply(mem, mem, tok, tok, gate, gate, *wargs)
    torch.testing.assert_close(new, reference.memory_write(mem, mem, tok, tok, gate, gate))
    new.sum().backward()
    assert mem.grad is not None and torch.isfinite(mem.grad).all()
