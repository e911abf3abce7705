"""The CPU read keeps its attention probabilities for the backward
(save_probs=True, the default, up to READ_PROBS_MAX_BYTES): each key block's
exp(S - m) with m the rows' running max after the block, rescaled in the
backward by exp(m - lse). The backward from them matches the recomputing one
and the reference (shapes across the 512-key blocks, masks with all-masked
rows, x50 logits whose running max moves from block to block, NaN), the kept
tensors are what they claim, the fake (torch.compile) shapes match the real
ones, and bad kept tensors are refused by name."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import cpu_extension
from memkernels import memory_read
from memkernels.ops import api
from memkernels.ops.api import read_probs_shapes


def inputs(B, H, T, S, D, shared=True, dtype=torch.float64, logit_scale=1.0, masked_row=True):
    bank = (H, S, D) if shared else (B, H, S, D)
    q = logit_scale * torch.randn(B, H, T, D, dtype=dtype)
    tensors = [q, torch.randn(*bank, dtype=dtype), torch.randn(*bank, dtype=dtype)]
    mask = torch.rand(B, S) > 0.3
    mask[:, S // 2] = True
    if masked_row and B > 1:
        mask[0] = False  # a batch row with no slot: zeros out, zero gradients
    return [t.requires_grad_() for t in tensors], mask


def grads(tensors, mask, **kw):
    out = memory_read(*tensors, slot_mask=mask, **kw)
    g = torch.Generator().manual_seed(1)
    seed = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return [out, *torch.autograd.grad(out, tensors, seed)]


NAMES = ["out", "dq", "dk", "dv"]


@pytest.fixture
def kept_calls(monkeypatch):
    """The calls that reached the extension's keeping forward (a list that grows
    by one a call): where the kept path ran, not only where its results agree."""
    ext = cpu_extension()
    calls, real = [], ext.read_fwd_keeping_probs

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(ext, "read_fwd_keeping_probs", spy)
    return calls


# S across the 512-key blocks (1, 511, 512, 513, 1100: a short last block) and
# the 16-column padding; T across the 256-row tiles; Dh 1 to 256
@pytest.mark.parametrize("shape", [(2, 3, 5, 1, 3), (1, 2, 37, 511, 64), (2, 1, 70, 512, 32),
                                   (2, 2, 300, 513, 8), (1, 1, 260, 1100, 16),
                                   (2, 1, 1, 1537, 1), (1, 2, 40, 33, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared", [True, False], ids=["shared bank", "a bank a row"])
def test_kept_and_recomputed_probabilities_give_the_reference_gradients(shape, shared,
                                                                        kept_calls):
    torch.manual_seed(0)
    tensors, mask = inputs(*shape, shared=shared)
    kept = grads(tensors, mask, backend="cpu", save_probs=True)
    assert len(kept_calls) == 1
    recomputed = grads(tensors, mask, backend="cpu", save_probs=False)
    assert len(kept_calls) == 1
    want = grads(tensors, mask, backend="reference")
    for name, a, b, r in zip(NAMES, kept, recomputed, want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} kept: {m}")
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    if shape[0] > 1:  # batch row 0 has no slot: no query gradient
        assert (kept[1][0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_first_or_last_key_blocks_are_all_masked(dtype, kept_calls):
    """A row's running max -inf over its first blocks, then finite (their kept
    values 0, their factor exp(-inf - lse) = 0), and a row whose later blocks
    are all masked (their running max the earlier blocks')."""
    torch.manual_seed(7)
    tensors, mask = inputs(3, 2, 40, 1300, 16, dtype=dtype, masked_row=False)
    mask[0, :1024] = False  # blocks 0 and 1 masked, block 2 partly valid
    mask[1, 600:] = False   # blocks 1 and 2 masked
    mask[2, 512:1024] = False  # the middle block masked
    mask[0, 1200] = True
    kept = grads(tensors, mask, backend="cpu")
    assert len(kept_calls) == 1
    want = grads([t.detach().double().requires_grad_() for t in tensors], mask,
                 backend="reference")
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    for name, a, r in zip(NAMES, kept, want):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("logit_scale", [1.0, 50.0])
@pytest.mark.parametrize("D", [8, 24, 64, 80])
def test_float32_kept_probabilities_match_float64(logit_scale, D, kept_calls):
    """float32 takes dS in the dP product's epilogue (ProbsGradEpilogue) over
    the rescaled dO; x50 logits move a row's running max by hundreds from one
    key block to the next, so an early block's factor exp(m - lse) underflows
    to 0 where its probabilities do."""
    torch.manual_seed(D)
    tensors, mask = inputs(2, 2, 263, 1100, D, dtype=torch.float32, logit_scale=logit_scale)
    kept = grads(tensors, mask, backend="cpu")
    assert len(kept_calls) == 1
    recomputed = grads(tensors, mask, backend="cpu", save_probs=False)
    want = grads([t.detach().double().requires_grad_() for t in tensors], mask,
                 backend="reference")
    tol = 2e-4 * logit_scale if logit_scale > 1 else 5e-5
    for name, a, b, r in zip(NAMES, kept, recomputed, want):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name} kept: {m}")
        torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                   msg=lambda m: f"{name} kept vs recomputed: {m}")


def test_nan_in_a_query_stays_in_its_row():
    cpu_extension()
    torch.manual_seed(6)
    tensors, mask = inputs(2, 2, 30, 700, 16, dtype=torch.float32, masked_row=False)
    with torch.no_grad():
        tensors[0][1, 0, 3, 5] = float("nan")
    kept = grads(tensors, mask, backend="cpu")
    recomputed = grads(tensors, mask, backend="cpu", save_probs=False)
    out, dq = kept[0], kept[1]
    assert out[1, 0, 3].isnan().all() and not out[1, 0, [0, 1, 2, 4]].isnan().any()
    assert dq[1, 0, 3].isnan().all() and not dq[1, 0, [0, 1, 2, 4]].isnan().any()
    assert not dq[0].isnan().any() and not dq[1, 1].isnan().any()
    for name, a, b in zip(NAMES, kept, recomputed):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN where the recomputing path has none"


def test_a_nan_gradient_on_a_row_with_no_slot_gives_no_nan_query_or_key_gradient():
    """A batch row with no valid slot has lse -inf: its dS is 0 whatever
    reaches it (the rescale factor is 0 there, not exp(-inf + inf))."""
    cpu_extension()
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        tensors, mask = inputs(2, 2, 20, 600, 16, dtype=dtype)  # batch row 0: no slot
        results = []
        for save in (True, False):
            out = memory_read(*tensors, slot_mask=mask, backend="cpu", save_probs=save)
            seed = torch.ones_like(out)
            seed[0, 0, 3, 2] = float("nan")
            seed[0, 1, 7, 0] = float("inf")
            results.append(torch.autograd.grad(out, tensors, seed))
        kept, recomputed = results
        for name, a, b in zip(NAMES[1:], kept, recomputed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{name} ({dtype}): {m}")
        assert kept[0].isfinite().all() and kept[1].isfinite().all()  # dq, dk


@pytest.mark.parametrize("shared", [True, False], ids=["shared bank", "a bank a row"])
def test_the_kept_probabilities_rescale_to_the_softmax(shared):
    C = cpu_extension()
    torch.manual_seed(3)
    B, H, T, S, D = 2, 3, 40, 1100, 32
    (q, k, v), mask = inputs(B, H, T, S, D, shared=shared, dtype=torch.float32, logit_scale=4.0)
    scale = D ** -0.5
    out, lse, probs, probs_max = C.read_fwd_keeping_probs(q, k, v, mask, scale)
    shapes = read_probs_shapes(q, k, "cpu", True)
    assert (tuple(probs.shape), tuple(probs_max.shape)) == shapes
    G, blocks, M, cols = probs.shape
    assert (G, blocks, M, cols) == ((H, 3, B * T, 512) if shared else (B * H, 3, T, 512))
    assert probs.data_ptr() % 64 == 0
    # groups and rows as the kernels fold them: [G, M, S]
    scores = scale * q.double() @ k.double().transpose(-1, -2)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse64 = torch.logsumexp(scores, -1)
    if shared:
        scores, lse64 = (x.transpose(0, 1).reshape(H, B * T, *x.shape[3:]) for x in (scores, lse64))
    else:
        scores, lse64 = (x.reshape(B * H, T, *x.shape[3:]) for x in (scores, lse64))
    want = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no slot: all 0
    factor = torch.exp(probs_max.double() - lse64[:, None, :])
    factor = torch.where(torch.isneginf(lse64)[:, None, :], torch.zeros_like(factor), factor)
    rescaled = (probs.double() * factor[..., None]).permute(0, 2, 1, 3).reshape(G, M, -1)
    torch.testing.assert_close(rescaled[..., :S], want, rtol=1e-5, atol=1e-6)
    # each block's running max is the max of the scores so far
    running = torch.stack([scores[..., :min(S, 512 * (b + 1))].amax(-1) for b in range(blocks)], 1)
    torch.testing.assert_close(probs_max.double(), running, rtol=1e-5, atol=1e-5)
    assert (probs[:, -1, :, S - 1024:80] == 0).all()  # the last block's padding to 16 is 0
    valid = rescaled.new_zeros(G, M, blocks * 512, dtype=torch.bool)
    valid[..., :S] = True  # the last block's columns past S - 1024 + 16 are scratch
    kept = probs.permute(0, 2, 1, 3).reshape(G, M, -1)[valid]
    assert (kept <= 1).all() and (kept >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,S", [(2, 1), (2, 512), (2, 513), (0, 40)])
def test_the_fake_shapes_match_the_real_ones(dtype, B, S):
    cpu_extension()
    (q, k, v), _ = inputs(B, 3, 5, S, 8, dtype=dtype)
    q, k, v = (t.detach() for t in (q, k, v))
    for backend in ("cpu", "reference"):
        real = torch.ops.memkernels.read_fwd_keeping_probs(q, k, v, None, 0.3, backend)
        want = read_probs_shapes(q, k, backend, True)
        assert (tuple(real[2].shape), tuple(real[3].shape)) == want
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        assert real[2].dtype == stat and real[3].dtype == stat
        out, lse = torch.ops.memkernels.read_fwd(q, k, v, None, 0.3, backend)
        torch.testing.assert_close(real[0], out)
        torch.testing.assert_close(real[1], lse)
        with FakeTensorMode() as mode:  # the fake implementation, as torch.compile traces it
            fake = torch.ops.memkernels.read_fwd_keeping_probs(
                *(mode.from_tensor(t) for t in (q, k, v)), None, 0.3, backend)
        assert [(tuple(f.shape), f.dtype) for f in fake] == [(tuple(r.shape), r.dtype)
                                                             for r in real]


def test_bad_kept_probabilities_are_refused_by_name():
    C = cpu_extension()
    (q, k, v), _ = inputs(1, 2, 8, 600, 16, dtype=torch.float32)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, probs, probs_max = C.read_fwd_keeping_probs(q, k, v, None, 0.25)
    args = (torch.ones_like(q), q, k, v, out, lse, None, 0.25)
    with pytest.raises(RuntimeError, match=r"probs must have shape \[2, 2, 8, 512\]"):
        C.read_bwd(*args, probs[..., :500].contiguous(), probs_max)
    with pytest.raises(RuntimeError, match=r"probs_max must have shape \[2, 2, 8\]"):
        C.read_bwd(*args, probs, probs_max[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="probs must have dtype Float"):
        C.read_bwd(*args, probs.double(), probs_max)
    with pytest.raises(RuntimeError, match="probs and probs_max must be given together"):
        C.read_bwd(*args, probs, None)
    with pytest.raises(RuntimeError, match="probs and probs_max must be given together"):
        C.read_bwd(*args, None, probs_max)
    # None, or empty tensors: recomputed, the same gradients
    a = C.read_bwd(*args, probs, probs_max)
    for b in (C.read_bwd(*args), C.read_bwd(*args, torch.empty(0), torch.empty(0))):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_kept_graph_runs_its_backward_twice():
    cpu_extension()
    tensors, mask = inputs(2, 2, 50, 700, 16)
    out = memory_read(*tensors, slot_mask=mask, backend="cpu")
    first = torch.autograd.grad(out.sum(), tensors, retain_graph=True)
    second = torch.autograd.grad(out.sum(), tensors)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_probabilities_are_kept_only_with_a_gradient_and_within_the_cap(monkeypatch):
    """No P at inference, with save_probs=False, off the CPU backend, or past
    READ_PROBS_MAX_BYTES (then the backward recomputes): the pool stays as it
    was; within the cap, kept and handed back to it."""
    C = cpu_extension()
    C.cpu_empty_cache()
    tensors, _ = inputs(1, 16, 256, 1024, 16, dtype=torch.float32)  # 16 MiB of P if kept
    plain = [t.detach() for t in tensors]
    with torch.no_grad():
        memory_read(*tensors, backend="cpu")
    memory_read(*plain, backend="cpu")
    memory_read(*tensors, backend="cpu", save_probs=False).sum().backward()
    monkeypatch.setattr(api, "READ_PROBS_MAX_BYTES", (16 << 20) - 1)
    assert read_probs_shapes(tensors[0], tensors[1], "cpu", True) == ((0,), (0,))
    capped = grads(tensors, None, backend="cpu")
    assert C.cpu_cached_bytes() == 0
    monkeypatch.setattr(api, "READ_PROBS_MAX_BYTES", 16 << 20)
    kept = grads(tensors, None, backend="cpu")  # kept, then handed back
    assert C.cpu_cached_bytes() == 16 << 20
    for a, b in zip(kept, capped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    C.cpu_empty_cache()


def test_a_compiled_training_step_keeps_the_probabilities(kept_calls):
    torch._dynamo.reset()
    tensors, mask = inputs(2, 2, 30, 600, 16, dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: memory_read(q, k, v, slot_mask=mask, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    out = fn(*tensors)
    assert len(kept_calls) == 1
    g = torch.Generator().manual_seed(1)
    seed = torch.randn(out.shape, generator=g, dtype=torch.float64).float()
    compiled = [out, *torch.autograd.grad(out, tensors, seed)]
    want = grads(tensors, mask, backend="cpu", save_probs=False)
    for name, a, b in zip(NAMES, compiled, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_nothing_is_kept_under_vmap(kept_calls):
    """torch.func transforms recompute: vmap would keep a P per instance."""
    tensors, _ = inputs(3, 2, 20, 600, 8, dtype=torch.float32)
    q, k, v = (t.detach() for t in tensors)

    def loss(q1, k1, v1):
        return memory_read(q1[None], k1, v1, backend="cpu").square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None))(q, k, v)
    assert kept_calls == []
    for i in range(3):
        qi = q[i:i + 1].clone().requires_grad_()
        want, = torch.autograd.grad(memory_read(qi, k, v, backend="cpu").square().sum(), qi)
        torch.testing.assert_close(per_sample[i], want[0], rtol=1e-5, atol=1e-6)
