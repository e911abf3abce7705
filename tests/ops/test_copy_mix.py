"""The copy rule's mixture (memkernels.ops.copy_mix): the CPU kernel
(memkernels._C.copy_mix_fwd) against the pure-PyTorch reference on fresh
random inputs, where the op runs it, its gradients (the reference's), and
its argument checks."""
from __future__ import annotations

import pytest
import torch

from memkernels.ops import copy_mix, reference
from memkernels.ops.copy_mix import _kernel as chosen_kernel

from helpers import cpu_extension


def mix_inputs(B, T, C, V, dtype, seed=0, logit_scale=5.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=dtype) * 3
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * logit_scale
    read = torch.randn(B, T, C, generator=g, dtype=dtype) / C ** 0.5
    units = torch.nn.functional.normalize(torch.randn(V, C, generator=g, dtype=dtype), dim=-1)
    gate_w = torch.randn(C, generator=g, dtype=dtype)
    scalars = (20.0 * float(torch.rand(1, generator=g)) + 1, float(torch.randn(1, generator=g)),
               8.0 * float(torch.rand(1, generator=g)))
    return (hidden, logits, read, units, gate_w, 1e-6, *scalars)


def kernel(*args):
    return cpu_extension().copy_mix_fwd(*args)


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B, T, C, V", [(1, 1, 192, 1024), (1, 1, 1, 1), (2, 3, 5, 7),
                                        (1, 16, 64, 33), (3, 7, 48, 100), (1, 1, 17, 4096)],
                         ids=["decode-open-lm", "C1-V1", "odd", "16-rows", "21-rows", "odd-C"])
def test_the_kernel_matches_the_reference(dtype, B, T, C, V):
    for seed in range(3):
        args = mix_inputs(B, T, C, V, dtype, seed)
        got = kernel(*args)
        want = reference.copy_mix(*(a.double() if isinstance(a, torch.Tensor) else a
                                    for a in args)).to(dtype)
        assert got.dtype == dtype and got.shape == (B, T, V)
        torch.testing.assert_close(got, want, **tolerance(dtype))
        # a distribution: the probabilities of each row sum to 1
        torch.testing.assert_close(got.double().exp().sum(-1), torch.ones(B, T, dtype=torch.float64),
                                   **tolerance(dtype))
        # the LM head's own rows with 1 / their lengths (what the copy rule passes)
        weight = args[3] * (torch.rand(V, 1, dtype=dtype) * 3 + 0.1)
        scale = 1.0 / weight.norm(dim=-1)
        got = kernel(*args[:3], weight, *args[4:], scale)
        torch.testing.assert_close(got, want, **tolerance(dtype))
        torch.testing.assert_close(got, reference.copy_mix(*args[:3], weight, *args[4:], scale),
                                   **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_logits_nan_and_masked_vocabulary(dtype):
    args = list(mix_inputs(2, 3, 24, 50, dtype, seed=7, logit_scale=250.0))  # x50 the usual
    args[2] = args[2] * 50
    want = reference.copy_mix(*args)
    torch.testing.assert_close(kernel(*args), want, **tolerance(dtype))
    # a token the LM cannot emit (-inf logit) keeps only the memory's share
    args[1][0, 1, 3] = float("-inf")
    torch.testing.assert_close(kernel(*args), reference.copy_mix(*args), **tolerance(dtype))
    # +inf in a row's logits: that row is NaN, as torch's log_softmax makes it
    inf = list(args)
    inf[1] = inf[1].clone()
    inf[1][1, 2, 7] = float("inf")
    got = kernel(*inf)
    assert bool(got[1, 2].isnan().all()) and not bool(got[0].isnan().any())
    assert torch.equal(got.isnan(), reference.copy_mix(*inf).isnan())
    # NaN in a row's logits, read or hidden state: that row is NaN, the others are not
    for which, where in ((1, (1, 0, 5)), (2, (0, 2, 4)), (0, (1, 2, 0))):
        bad = list(args)
        bad[which] = bad[which].clone()
        bad[which][where] = float("nan")
        got, want = kernel(*bad), reference.copy_mix(*bad)
        assert torch.equal(got.isnan(), want.isnan())
        assert bool(got[where[0], where[1]].isnan().all())
        torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), **tolerance(dtype))


def test_the_op_runs_the_kernel_at_inference_and_the_reference_for_gradients():
    cpu_extension()
    args = mix_inputs(1, 2, 32, 40, torch.float32)
    scalars = args[6:]
    with torch.no_grad():
        assert chosen_kernel(*args[:5], None, scalars, None) is not None
        torch.testing.assert_close(copy_mix(*args), reference.copy_mix(*args),
                                   **tolerance(torch.float32))
    # many rows, other dtypes, a reference backend: the reference
    many = mix_inputs(2, 9, 32, 40, torch.float32)
    assert chosen_kernel(*many[:5], None, many[6:], None) is None
    mixed = list(args)
    mixed[1] = mixed[1].double()
    assert chosen_kernel(*mixed[:5], None, scalars, None) is None
    assert chosen_kernel(*args[:5], None, scalars, "reference") is None
    # gradients flow through the reference, in float64 (gradcheck)
    hidden, logits, read, units, gate_w, eps, *_ = mix_inputs(1, 2, 6, 9, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, logits, read, gate_w)]
    sharpness = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert chosen_kernel(leaves[0], leaves[1], leaves[2], units, leaves[3], None,
                         (sharpness, 0.5, 2.0), None) is None
    torch.autograd.gradcheck(
        lambda h, l, r, w, s: copy_mix(h, l, r, units, w, eps, s, 0.5, 2.0),
        (*leaves, sharpness))


def test_bad_arguments_are_named():
    args = list(mix_inputs(1, 2, 8, 10, torch.float32))
    for index, bad, match in ((0, torch.zeros(2, 8), "hidden must be"),
                              (1, torch.zeros(1, 3, 10), "logits must be"),
                              (2, torch.zeros(1, 2, 9), "read must be"),
                              (3, torch.zeros(10, 7), "units must be"),
                              (4, torch.zeros(9), "gate_w must be")):
        wrong = list(args)
        wrong[index] = bad
        with pytest.raises(ValueError, match=match):
            copy_mix(*wrong)
        # a direct extension call raises too, and never reaches the kernel
        ext = cpu_extension()
        with pytest.raises(RuntimeError, match=match.split()[0]):
            ext.copy_mix_fwd(*wrong)
    with pytest.raises(ValueError, match="unit_scale must be"):
        copy_mix(*args, unit_scale=torch.ones(9))
    ext = cpu_extension()
    with pytest.raises(RuntimeError, match="unit_scale must have shape"):
        ext.copy_mix_fwd(*args, torch.ones(9))  # "must have shape"
    with pytest.raises(RuntimeError, match="unit_scale must have dtype"):
        ext.copy_mix_fwd(*args, torch.ones(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="logits must have dtype"):
        ext.copy_mix_fwd(args[0], args[1].double(), *args[2:])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.copy_mix_fwd(*(a.half() if isinstance(a, torch.Tensor) else a for a in args))
    with pytest.raises(RuntimeError, match="eps must be finite"):
        ext.copy_mix_fwd(*args[:5], float("nan"), *args[6:])
    with pytest.raises(RuntimeError, match="sharpness must be finite in Float"):
        ext.copy_mix_fwd(*args[:6], 1e300, *args[7:])
    with pytest.raises(RuntimeError, match="gate_bias must be finite"):
        ext.copy_mix_fwd(*args[:7], float("inf"), args[8])
    empty = mix_inputs(1, 1, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="V >= 1"):
        copy_mix(empty[0], empty[1][..., :0], *empty[2:3], empty[3][:0], *empty[4:])
