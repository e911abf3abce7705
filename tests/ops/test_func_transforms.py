"""torch.func over the ops: grad and vjp take first derivatives through the
kernels, vmap runs them per instance (per-sample gradients, jacrev), a
second derivative fails by name rather than silently, and forward-mode AD is
refused.
Float64 on the CPU backend, against the reference differentiated the same way."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from helpers import cpu_extension
from memkernels import memory_read, memory_write

V = 3  # vmapped instances


def read_inputs(shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = (3, 7, 16) if shared else (2, 3, 7, 16)
    q = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)
    k = torch.randn(*bank, generator=g, dtype=torch.float64)
    v = torch.randn(*bank, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 7, generator=g) > 0.3
    mask[0] = False  # a batch row that reads no slot
    return q, k, v, mask


def write_inputs(seed=0, T=5):
    g = torch.Generator().manual_seed(seed)
    dims = [(2, 3, 9, 16), (2, 3, 9, 16), (2, 3, T, 16), (2, 3, T, 16), (2, 3, 9, 1), (2, 3, 9, 1)]
    tensors = [torch.randn(*d, generator=g, dtype=torch.float64) for d in dims]
    mask = torch.rand(2, T, generator=g) > 0.3
    mask[0] = False  # a batch row with no token
    return tensors, mask


def close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [True, False], ids=["shared bank", "per-row bank"])
def test_grad_and_vjp_through_a_read(shared):
    cpu_extension()
    q, k, v, mask = read_inputs(shared)

    def loss(q, k, v, backend):
        return memory_read(q, k, v, slot_mask=mask, backend=backend).pow(2).sum()

    got = grad(loss, argnums=(0, 1, 2))(q, k, v, "cpu")
    close(got, grad(loss, argnums=(0, 1, 2))(q, k, v, "reference"))
    seed = torch.randn(q.shape, dtype=torch.float64)
    sides = [vjp(lambda *x: memory_read(*x, slot_mask=mask, backend=b), q, k, v)
             for b in ("cpu", "reference")]
    close(sides[0][1](seed), sides[1][1](seed))


@pytest.mark.parametrize("save_probs", [True, False], ids=["kept P", "recomputed P"])
@pytest.mark.parametrize("T", [5, 600], ids=["T=5", "T=600 (P never kept)"])
def test_grad_through_a_write(save_probs, T):
    cpu_extension()
    tensors, mask = write_inputs(T=T)

    def loss(*x, backend):
        kw = {"save_probs": save_probs} if backend == "cpu" else {}
        return memory_write(*x, token_mask=mask, backend=backend, **kw).pow(2).sum()

    argnums = tuple(range(6))
    close(grad(lambda *x: loss(*x, backend="cpu"), argnums=argnums)(*tensors),
          grad(lambda *x: loss(*x, backend="reference"), argnums=argnums)(*tensors))


def test_vmap_runs_a_read_per_instance():
    """Forward, per-sample gradients (vmap of grad) with the bank shared by the
    instances or one per instance, and jacrev (vmap over vjp)."""
    cpu_extension()
    q, k, v, mask = read_inputs(shared=True)
    qs = torch.randn(V, *q.shape, dtype=torch.float64)
    ks = torch.randn(V, *k.shape, dtype=torch.float64)

    def read(q, k, backend):
        return memory_read(q, k, v, slot_mask=mask, backend=backend)

    close([vmap(read, in_dims=(0, None, None))(qs, k, "cpu")],
          [vmap(read, in_dims=(0, None, None))(qs, k, "reference")])

    def loss(q, k, backend):
        return read(q, k, backend).pow(2).sum()

    for in_dims in [(0, None, None), (0, 0, None)]:
        bank = k if in_dims[1] is None else ks
        got = vmap(grad(loss, argnums=(0, 1)), in_dims=in_dims)(qs, bank, "cpu")
        want = vmap(grad(loss, argnums=(0, 1)), in_dims=in_dims)(qs, bank, "reference")
        assert got[1].shape == (V, *k.shape)  # each instance's own gradient of the shared bank
        close(got, want)
    rows = q[1:, :, :2]  # a batch row that reads, two query rows: a small Jacobian
    close([jacrev(lambda q: memory_read(q, k, v, backend="cpu").sum(-1))(rows)],
          [jacrev(lambda q: memory_read(q, k, v, backend="reference").sum(-1))(rows)])


def test_vmap_over_no_instance():
    cpu_extension()
    q, k, v, mask = read_inputs(shared=True)
    none = torch.empty(0, *q.shape, dtype=q.dtype)
    for b in ("cpu", "reference"):
        out = vmap(lambda q: memory_read(q, k, v, slot_mask=mask, backend=b))(none)
        assert out.shape == (0, *q.shape) and out.dtype == q.dtype
    tensors, wmask = write_inputs()
    out = vmap(lambda m: memory_write(m, *tensors[1:], token_mask=wmask, backend="cpu"))(
        torch.empty(0, *tensors[0].shape, dtype=torch.float64))
    assert out.shape == (0, *tensors[0].shape)


def test_per_sample_gradients_of_a_write():
    cpu_extension()
    tensors, mask = write_inputs()
    mems = torch.randn(V, *tensors[0].shape, dtype=torch.float64)
    slots = torch.randn(V, *tensors[1].shape, dtype=torch.float64)

    def loss(*x, backend):
        return memory_write(*x, token_mask=mask, backend=backend).pow(2).sum()

    in_dims = (0, 0, None, None, None, None)
    per = [vmap(grad(lambda *x: loss(*x, backend=b), argnums=tuple(range(6))), in_dims=in_dims)(
        mems, slots, *tensors[2:]) for b in ("cpu", "reference")]
    assert per[0][2].shape == (V, *tensors[2].shape)
    close(per[0], per[1])


def test_a_second_derivative_fails_by_name():
    cpu_extension()
    q, k, v, mask = read_inputs(shared=True)
    q = q.requires_grad_()
    out = memory_read(q, k, v, slot_mask=mask, backend="cpu")
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="memory_read's kernels have no second derivative"):
        torch.autograd.grad(g.sum(), q)
    q = q.detach()
    twice = grad(lambda q: grad(lambda q: memory_read(q, k, v, backend="cpu").pow(2).sum())(q).sum())
    with pytest.raises(RuntimeError, match="memory_read's kernels have no second derivative"):
        twice(q)
    tensors, wmask = write_inputs()
    tensors[0].requires_grad_()
    new = memory_write(*tensors, token_mask=wmask, backend="cpu")
    (gm,) = torch.autograd.grad(new.pow(2).sum(), tensors[0], create_graph=True)
    with pytest.raises(RuntimeError, match="memory_write's kernels have no second derivative"):
        torch.autograd.grad(gm.sum(), tensors[0])
    # the reference, asked by name, differentiates twice
    hessian(lambda q: memory_read(q, k, v, backend="reference").pow(2).sum())(q[:1, :, :1])


def test_a_differentiable_gradient_may_be_changed_in_place():
    """create_graph=True: the gradients are the tensors' own (not views), so a
    hook or a clip may scale them in place."""
    cpu_extension()
    q, k, v, mask = read_inputs(shared=True)
    q = q.requires_grad_()
    x = q * 1
    x.register_hook(lambda g: g.mul_(2))
    (got,) = torch.autograd.grad(memory_read(x, k, v, slot_mask=mask, backend="cpu").sum(), q,
                                 create_graph=True)
    (want,) = torch.autograd.grad(memory_read(q, k, v, slot_mask=mask, backend="cpu").sum(), q)
    torch.testing.assert_close(got, 2 * want, rtol=1e-12, atol=1e-12)


def test_forward_mode_is_refused():
    """No jvp (torch.compile does not trace an autograd.Function that has one):
    PyTorch's own error names the missing jvp."""
    cpu_extension()
    q, k, v, mask = read_inputs(shared=True)
    with pytest.raises(RuntimeError, match="jvp"):
        jvp(lambda q: memory_read(q, k, v, backend="cpu"), (q,), (torch.ones_like(q),))
    with pytest.raises(RuntimeError, match="jvp"):
        hessian(lambda q: memory_read(q, k, v, backend="cpu").pow(2).sum())(q)
    with fwAD.dual_level():  # a dual tensor needing no gradient: refused, not its tangent dropped
        dual = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(RuntimeError, match="jvp"):
            memory_read(dual, k, v, backend="cpu")


def test_a_plain_training_step_takes_no_extra_node():
    """Outside create_graph and torch.func the backward's results are the
    kernel's tensors, with no graph of their own."""
    cpu_extension()
    q, k, v, mask = read_inputs(shared=False)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(memory_read(q, k, v, slot_mask=mask, backend="cpu").sum(), (q, k, v))
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)
