"""The CPU write keeps its attention probabilities for the backward (T <= 512,
save_probs=True, the default): the kept probabilities are softmax's own, the
backward from them matches the recomputing one and the reference, the fake
(torch.compile) shapes match the real ones, bad saved tensors are refused by
name, and the host buffers they live on are reused and released."""
import os
import signal
import time

import pytest
import torch

from helpers import cpu_extension
from memkernels import memory_write
from memkernels.ops import reference
from memkernels.ops.api import saved_probs_shape


def inputs(B, H, S, T, D, gate=1, dtype=torch.float64, logit_scale=1.0, masked_row=True):
    tensors = [torch.randn(B, H, S, D, dtype=dtype), logit_scale * torch.randn(B, H, S, D, dtype=dtype),
               torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype),
               torch.randn(B, H, S, gate, dtype=dtype), torch.randn(B, H, S, gate, dtype=dtype)]
    mask = torch.rand(B, T) > 0.3
    mask[:, T // 2] = True
    if masked_row and B > 1:
        mask[0] = False  # a batch row with no token: upd = 0, zero attention gradients
    return [t.requires_grad_() for t in tensors], mask


def grads(tensors, mask, **kw):
    out = memory_write(*tensors, token_mask=mask, **kw)
    g = torch.Generator().manual_seed(1)
    seed = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return [out, *torch.autograd.grad(out, tensors, seed)]


# T across the saved tile's column padding (16) and the 512-key limit (513: recomputed)
@pytest.mark.parametrize("shape", [(2, 3, 5, 1, 3), (1, 2, 37, 15, 64), (2, 1, 70, 16, 32),
                                   (2, 2, 300, 17, 64), (1, 1, 260, 512, 16),
                                   (2, 1, 9, 513, 8), (1, 2, 40, 33, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gate", [1, "D"])
def test_kept_and_recomputed_probabilities_give_the_reference_gradients(shape, gate):
    cpu_extension()
    torch.manual_seed(0)
    B, H, S, T, D = shape
    tensors, mask = inputs(B, H, S, T, D, gate=D if gate == "D" else 1)
    kept = grads(tensors, mask, backend="cpu", save_probs=True)
    recomputed = grads(tensors, mask, backend="cpu", save_probs=False)
    want = grads(tensors, mask, backend="reference")
    for name, a, b, r in zip(["new_mem", "dmem", "dq", "dk", "dv", "df", "di"], kept, recomputed,
                             want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} kept: {m}")
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("logit_scale", [1.0, 50.0])
def test_float32_kept_probabilities_match_float64(logit_scale):
    cpu_extension()
    torch.manual_seed(2)
    tensors, mask = inputs(2, 2, 300, 200, 64, dtype=torch.float32, logit_scale=logit_scale)
    got = grads(tensors, mask, backend="cpu")
    want = grads([t.detach().double().requires_grad_() for t in tensors], mask,
                 backend="reference")
    # x50 logits: |scores| ~ 300, so float32's rounding of a score moves its
    # probability by up to ~2e-5 relative, as on the recomputing path
    tol = 2e-4 if logit_scale > 1 else 2e-5
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)


# float32 kept probabilities take dS in the dP product's epilogue (tile_gemm.h,
# ProbsGradEpilogue): its column strips (T across 16-float vectors and 64-column
# panels), row blocks (S of 6 and remainders of 1-5 rows, two row tiles at 263),
# the product's depth D (how many k-steps a block has to prefetch the next one's
# P in: fewer than its lines at D < 48), a batch row with no token (lse -inf)
@pytest.mark.parametrize("D", [8, 24, 48, 80, 256])
@pytest.mark.parametrize("S,T", [(5, 7), (263, 40), (13, 100), (7, 512), (9, 33), (16, 64)])
def test_float32_kept_probabilities_across_the_epilogue_blocks(D, S, T):
    cpu_extension()
    torch.manual_seed(D + S + T)
    tensors, mask = inputs(2, 1, S, T, D, dtype=torch.float32)
    kept = grads(tensors, mask, backend="cpu", save_probs=True)
    recomputed = grads(tensors, mask, backend="cpu", save_probs=False)
    want = grads([t.detach().double().requires_grad_() for t in tensors], mask,
                 backend="reference")
    for name, a, b, r in zip(["new_mem", "dmem", "dq", "dk", "dv", "df", "di"], kept, recomputed,
                             want):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name} kept: {m}")
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{name} kept vs recomputed: {m}")
    assert (kept[3][0] == 0).all() and (kept[4][0] == 0).all()  # no token: no key gradient


def test_nan_in_a_slot_query_stays_in_its_row():
    cpu_extension()
    tensors, mask = inputs(2, 2, 20, 30, 16, dtype=torch.float32, masked_row=False)
    with torch.no_grad():
        tensors[1][1, 0, 3, 5] = float("nan")
    out, dmem, dq, dk, dv, df, di = grads(tensors, mask, backend="cpu")
    assert out[1, 0, 3].isnan().all() and not out[1, 0, [0, 1, 2, 4]].isnan().any()
    assert dq[1, 0, 3].isnan().all() and not dq[1, 0, [0, 1, 2, 4]].isnan().any()
    assert not dq[0].isnan().any() and not dk[0].isnan().any()


def test_a_nan_gradient_on_a_row_with_no_token_gives_no_nan_query_or_key_gradient():
    """A batch row with no token has lse -inf: its dS is 0 whatever reaches
    it (as the recomputing path's softmax gradient gives), so a NaN or inf in
    its incoming gradient does not reach dq or dk."""
    cpu_extension()
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        tensors, mask = inputs(2, 2, 20, 30, 16, dtype=dtype)  # batch row 0: no token
        results = []
        for save in (True, False):
            out = memory_write(*tensors, token_mask=mask, backend="cpu", save_probs=save)
            seed = torch.ones_like(out)
            seed[0, 0, 3, 2] = float("nan")
            seed[0, 1, 7, 0] = float("inf")
            results.append(torch.autograd.grad(out, tensors, seed))
        kept, recomputed = results
        for name, a, b in zip(["dmem", "dq", "dk", "dv", "df", "di"], kept, recomputed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{name} ({dtype}): {m}")
        assert kept[1].isfinite().all() and kept[2].isfinite().all()


def test_the_kept_probabilities_padding_is_zero():
    """The columns past T (up to the next multiple of 16) are 0, not what the
    score tile's scratch held before (a row with no token included)."""
    C = cpu_extension()
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        for S, T in ((300, 17), (20, 3), (300, 17)):  # twice: the second reuses the scratch
            (m, qs, k, v, f, i), mask = inputs(2, 3, S, T, 8, dtype=dtype)
            probs = C.write_fwd(m, qs, k, v, f, i, mask, 0.3, save_probs=True)[3]
            assert probs.shape[-1] == (T + 15) // 16 * 16
            assert (probs[..., T:] == 0).all()


def test_the_kept_probabilities_are_the_softmax():
    C = cpu_extension()
    torch.manual_seed(3)
    for T in (1, 16, 100, 512):
        (m, qs, k, v, f, i), mask = inputs(2, 3, 40, T, 32, dtype=torch.float32)
        scale = 32 ** -0.5
        new, upd, lse, probs = C.write_fwd(m, qs, k, v, f, i, mask, scale, save_probs=True)
        cols = (T + 15) // 16 * 16
        assert probs.shape == (2, 3, 40, cols) and probs.dtype == torch.float32
        scores = scale * qs.double() @ k.double().transpose(-1, -2)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        want = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no token: all 0
        torch.testing.assert_close(probs[..., :T].double(), want, rtol=1e-5, atol=1e-6)
        assert torch.isneginf(lse[0]).all()


def test_probabilities_are_kept_only_where_asked_and_within_one_key_block():
    C = cpu_extension()
    (m, qs, k, v, f, i), _ = inputs(1, 2, 8, 513, 16)
    assert C.write_fwd(m, qs, k, v, f, i, None, 0.25, save_probs=True)[3].numel() == 0
    (m, qs, k, v, f, i), _ = inputs(1, 2, 8, 40, 16)
    assert C.write_fwd(m, qs, k, v, f, i, None, 0.25)[3].numel() == 0
    assert C.write_fwd(m, qs, k, v, f, i, None, 0.25, save_probs=True)[3].shape == (1, 2, 8, 48)
    assert C.WRITE_PROBS_MAX_TOKENS == 512 and C.WRITE_PROBS_COLUMN_MULTIPLE == 16
    # memory_write at inference keeps nothing, and no backend but the CPU's keeps any
    before = C.cpu_cached_bytes()
    with torch.no_grad():
        memory_write(m, qs, k, v, f, i, backend="cpu")
    assert C.cpu_cached_bytes() == before


@pytest.mark.parametrize("T", [1, 16, 17, 512, 513])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_fake_shapes_match_the_real_ones(T, dtype):
    cpu_extension()
    (m, qs, k, v, f, i), _ = inputs(2, 1, 6, T, 8, dtype=dtype)
    for backend in ("cpu", "reference"):
        for save in (True, False):
            real = torch.ops.memkernels.write_fwd(m, qs, k, v, f, i, None, 0.3, backend, save)
            assert tuple(real[3].shape) == saved_probs_shape(m, k, backend, save)
            stat = torch.float64 if dtype == torch.float64 else torch.float32
            assert real[3].dtype == stat


def test_bad_saved_probabilities_are_refused_by_name():
    C = cpu_extension()
    (m, qs, k, v, f, i), _ = inputs(1, 2, 8, 40, 16, dtype=torch.float32)
    new, upd, lse, probs = C.write_fwd(m, qs, k, v, f, i, None, 0.25, save_probs=True)
    args = (torch.ones_like(m), m, qs, k, v, f, i, None, upd, lse, 0.25)
    with pytest.raises(RuntimeError, match=r"probs must have shape \[1, 2, 8, 48\]"):
        C.write_bwd(*args, probs[..., :40].contiguous())
    with pytest.raises(RuntimeError, match="probs must have dtype Float"):
        C.write_bwd(*args, probs.double())
    (m2, qs2, k2, v2, f2, i2), _ = inputs(1, 2, 8, 600, 16, dtype=torch.float32)
    _, upd2, lse2, _ = C.write_fwd(m2, qs2, k2, v2, f2, i2, None, 0.25)
    with pytest.raises(RuntimeError, match="probs must be empty for T = 600"):
        C.write_bwd(torch.ones_like(m2), m2, qs2, k2, v2, f2, i2, None, upd2, lse2, 0.25,
                    torch.zeros(1, 2, 8, 608))
    # None, or an empty tensor: recomputed, the same gradients
    a = C.write_bwd(*args, probs)
    for b in (C.write_bwd(*args), C.write_bwd(*args, torch.empty(0))):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_a_kept_graph_runs_its_backward_twice():
    cpu_extension()
    tensors, mask = inputs(2, 2, 50, 30, 16)
    out = memory_write(*tensors, token_mask=mask, backend="cpu")
    first = torch.autograd.grad(out.sum(), tensors, retain_graph=True)
    second = torch.autograd.grad(out.sum(), tensors)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_the_host_buffers_are_reused_then_released():
    """From 4 MiB the probabilities live on pooled mappings: handed back when
    the tensor dies, reused by the next request that fits (up to twice its
    size), unmapped by cpu_empty_cache. Smaller ones are plain tensors."""
    C = cpu_extension()
    C.cpu_empty_cache()
    (m, qs, k, v, f, i), _ = inputs(1, 32, 1024, 512, 4, dtype=torch.float32)
    probs = C.write_fwd(m, qs, k, v, f, i, None, 0.5, save_probs=True)[3]  # 64 MiB
    assert probs.data_ptr() % (2 << 20) == 0
    where = probs.data_ptr()
    del probs  # back to the pool
    assert C.cpu_cached_bytes() == 64 << 20
    again = C.write_fwd(m, qs, k, v, f, i, None, 0.5, save_probs=True)[3]
    assert again.data_ptr() == where and C.cpu_cached_bytes() == 0
    del again
    (m2, qs2, k2, v2, f2, i2), _ = inputs(1, 32, 1024, 300, 4, dtype=torch.float32)
    smaller = C.write_fwd(m2, qs2, k2, v2, f2, i2, None, 0.5, save_probs=True)[3]  # 38 MiB
    assert smaller.data_ptr() == where and C.cpu_cached_bytes() == 0
    del smaller
    (m3, qs3, k3, v3, f3, i3), _ = inputs(1, 2, 64, 100, 4, dtype=torch.float32)
    small = C.write_fwd(m3, qs3, k3, v3, f3, i3, None, 0.5, save_probs=True)[3]  # 56 KiB
    assert small.shape == (1, 2, 64, 112) and small.data_ptr() % 64 == 0
    del small
    assert C.cpu_cached_bytes() == 64 << 20
    assert C.cpu_empty_cache() == 64 << 20 and C.cpu_cached_bytes() == 0


def test_a_forked_child_keeps_using_the_host_buffers():
    """A child forked after the pool cached a buffer takes it, hands it back
    and unmaps it (the pool's lock is held across fork(): pthread_atfork)."""
    C = cpu_extension()
    C.cpu_empty_cache()
    (m, qs, k, v, f, i), _ = inputs(1, 32, 1024, 512, 4, dtype=torch.float32)
    probs = C.write_fwd(m, qs, k, v, f, i, None, 0.5, save_probs=True)[3]  # 64 MiB
    del probs  # cached
    assert C.cpu_cached_bytes() == 64 << 20
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it (no pytest teardown here)
        code = 1
        try:
            torch.set_num_threads(1)
            probs = C.write_fwd(m, qs, k, v, f, i, None, 0.5, save_probs=True)[3]
            ok = C.cpu_cached_bytes() == 0
            del probs
            ok = ok and C.cpu_cached_bytes() == 64 << 20 and C.cpu_empty_cache() == 64 << 20
            code = 0 if ok else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung using the host buffer pool")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert C.cpu_cached_bytes() == 64 << 20  # the parent's cache is its own
    C.cpu_empty_cache()


def test_nothing_is_kept_without_a_gradient_or_when_asked_not_to():
    """No P without a gradient to take (no_grad, inputs without requires_grad,
    under torch.compile too) or with save_probs=False: the pool stays as it was."""
    C = cpu_extension()
    C.cpu_empty_cache()
    tensors, _ = inputs(1, 32, 1024, 512, 4, dtype=torch.float32)  # 64 MiB of P if kept
    plain = [t.detach() for t in tensors]
    with torch.no_grad():
        memory_write(*tensors, backend="cpu")
    memory_write(*plain, backend="cpu")
    memory_write(*tensors, backend="cpu", save_probs=False).sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: memory_write(*t, backend="cpu"), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        compiled(*tensors)
    assert C.cpu_cached_bytes() == 0
    memory_write(*tensors, backend="cpu").sum().backward()  # kept, then handed back
    assert C.cpu_cached_bytes() == 64 << 20
    C.cpu_empty_cache()
