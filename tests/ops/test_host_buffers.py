"""The CPU ops' large outputs (from 4 MiB: the read's and write's outputs and
gradients, the write's saved probabilities) live on host buffers that are
reused from one training step to the next rather than mapped afresh. A reused
buffer holds whatever its last tensor held: these tests fill every buffer
with NaN before it goes back, then ask the next step for the reference's
results (a kernel that left any element unwritten would show it), and check
that the buffers were in fact reused."""
import pytest
import torch

from helpers import cpu_extension
from memkernels import memory_read, memory_write
from memkernels.ops import reference

POOLED = 4 << 20  # host_buffer_pool.h: kMinPooledBytes


def poisoned(tensors):
    """Fills each tensor with NaN; returns the data pointers of the pooled ones."""
    ptrs = set()
    for t in tensors:
        if t is not None and t.numel() > 0:
            if t.numel() * t.element_size() >= POOLED:
                ptrs.add(t.data_ptr())
            t.detach().fill_(float("nan"))
    return ptrs


def write_inputs(B, H, S, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    dims = [(B, H, S, D), (B, H, S, D), (B, H, T, D), (B, H, T, D), (B, H, S, 1), (B, H, S, 1)]
    tensors = [torch.randn(*d, generator=g).requires_grad_() for d in dims]
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # a batch row with no token: its update is 0, its attention gradients 0
    mask[1:, 0] = True
    return tensors, mask


def write_step(tensors, mask, backend, **kw):
    out = memory_write(*tensors, token_mask=mask, backend=backend, **kw)
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return [out, *torch.autograd.grad(out, tensors, seed)]


# (S, T): outputs and dmem/dq pooled with P kept (T <= 512), then dk/dv pooled with P recomputed
@pytest.mark.parametrize("S,T", [(1024, 512), (64, 1024)])
def test_a_write_step_on_reused_buffers_gives_the_reference_results(S, T):
    C = cpu_extension()
    C.cpu_empty_cache()
    B, H, D = 2, 16, 64
    tensors, mask = write_inputs(B, H, S, T, D, seed=0)
    # the internal tensors (upd, lse, P) and the step's outputs: poisoned, then dropped
    raw = C.write_fwd(*[t.detach() for t in tensors], mask, D ** -0.5, True)
    ptrs = poisoned(raw)
    ptrs |= poisoned(write_step(tensors, mask, "cpu"))
    del raw
    assert C.cpu_cached_bytes() >= POOLED
    tensors, mask = write_inputs(B, H, S, T, D, seed=1)
    got = write_step(tensors, mask, "cpu")
    assert ptrs & {t.data_ptr() for t in got}, "no output took a reused buffer"
    want = write_step([t.detach().double().requires_grad_() for t in tensors], mask, "reference")
    for name, a, b in zip(["new_mem", "dmem", "dq", "dk", "dv", "df", "di"], got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    C.cpu_empty_cache()


# (B, H, T, S): the tile path; few query rows a group (the decode's kernel, the batch folded
# on a shared bank) over a small bank, with many heads so that the output is pooled
READ_SHAPES = [(2, 16, 512, 1024), (32, 64, 8, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", READ_SHAPES, ids=["tile path", "few rows"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row bank", "shared bank"])
def test_a_read_step_on_reused_buffers_gives_the_reference_results(shared, shape, dtype):
    C = cpu_extension()
    C.cpu_empty_cache()
    B, H, T, S = shape
    D = 64
    tol = 1e-4 if dtype == torch.float32 else 1e-10

    def step(seed, backend, dtype=dtype):
        g = torch.Generator().manual_seed(seed)
        bank = (H, S, D) if shared else (B, H, S, D)
        q = torch.randn(B, H, T, D, generator=g)
        k, v = torch.randn(*bank, generator=g), torch.randn(*bank, generator=g)
        mask = torch.rand(B, S, generator=g) > 0.5
        mask[0] = False  # a batch row that reads no slot: 0, and no gradient
        q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
        out = memory_read(q, k, v, slot_mask=mask, backend=backend)
        seed_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        return [out, *torch.autograd.grad(out, (q, k, v), seed_grad)]

    ptrs = poisoned(step(0, "cpu"))
    assert C.cpu_cached_bytes() >= POOLED
    got = step(1, "cpu")
    # a shared bank's out and dq are copies out of the kernel's layout (its own buffers,
    # reused unseen): only its dk and dv come back pooled, where they are large enough
    if not shared or H * S * D * torch.finfo(dtype).bits // 8 >= POOLED:
        assert ptrs & {t.data_ptr() for t in got}, "no output took a reused buffer"
    want = step(1, "reference", torch.float64)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    C.cpu_empty_cache()


def test_the_cache_is_bounded_and_released_on_request():
    """At inference too freed outputs stay for the next call (the write's upd
    and lse, dropped by memory_write, included): cpu_cached_bytes says how
    much, empty_cpu_cache gives it back."""
    from memkernels.ops import cpu_cached_bytes, empty_cpu_cache
    cpu_extension()
    empty_cpu_cache()
    tensors, mask = write_inputs(2, 16, 1024, 64, 64, seed=4)
    with torch.no_grad():
        for _ in range(3):
            memory_write(*tensors, token_mask=mask, backend="cpu")
    held = cpu_cached_bytes()
    assert POOLED <= held <= 2 << 30
    assert empty_cpu_cache() == held and cpu_cached_bytes() == 0


def test_a_pooled_output_is_an_ordinary_tensor():
    """What a caller may do with an output: keep it past the pool's release,
    grow it in place by autograd's accumulation, save and load it, share it."""
    C = cpu_extension()
    C.cpu_empty_cache()
    tensors, mask = write_inputs(2, 16, 1024, 64, 64, seed=3)
    out = memory_write(*tensors, token_mask=mask, backend="cpu")
    assert out.numel() * out.element_size() >= POOLED
    kept = out.detach().clone()
    out.sum().backward()
    grad = tensors[0].grad
    first = grad.clone()
    memory_write(*tensors, token_mask=mask, backend="cpu").sum().backward()  # accumulates
    torch.testing.assert_close(tensors[0].grad, 2 * first)
    C.cpu_empty_cache()  # unmaps only what no tensor holds
    assert torch.equal(out.detach(), kept)
    import io
    buf = io.BytesIO()
    torch.save(out.detach(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), kept)
    shared = out.detach().share_memory_()
    assert shared.is_shared() and torch.equal(shared, kept)
    with pytest.raises(RuntimeError):
        out.detach().resize_(out.numel() + 1)  # its storage cannot grow: said, not corrupted
    assert torch.equal(out.detach(), kept)
