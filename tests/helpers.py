"""Input builders and comparisons used by every backend's tests."""
from __future__ import annotations

import math
from typing import Optional

import torch

from memkernels import reference

# Error allowed on top of k x PyTorch's same-dtype error, per unit of magnitude.
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def rand(*shape, dtype, device, scale=1.0, noncontig=False):
    """Fresh normal values; noncontig gives a transposed view of the same shape."""
    if noncontig and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).transpose(-1, -2)
    else:
        t = torch.randn(*shape, dtype=torch.float64)
    return (t * scale).to(device=device, dtype=dtype).requires_grad_()


def read_inputs(B, H, T, S, D, *, shared, mask, dtype, device, logit_scale=1.0,
                noncontig=False):
    """q, k, v and a slot mask: mask in (None, 'S', 'BS'); 'BS' leaves row 0 all-masked
    when B > 1, so the empty-row rule is always exercised."""
    bank = (H, S, D) if shared else (B, H, S, D)
    q = rand(B, H, T, D, dtype=dtype, device=device, scale=logit_scale, noncontig=noncontig)
    k = rand(*bank, dtype=dtype, device=device, noncontig=noncontig)
    v = rand(*bank, dtype=dtype, device=device)
    slot_mask = None
    if mask == "S":
        slot_mask = torch.rand(S) > 0.3
        slot_mask[S // 2] = True
    elif mask == "BS":
        slot_mask = torch.rand(B, S) > 0.3
        slot_mask[:, S // 2] = True
        if B > 1:
            slot_mask[0] = False
    if slot_mask is not None:
        slot_mask = slot_mask.to(device)
    return q, k, v, slot_mask


def write_inputs(B, H, S, T, D, *, gate_dim, mask, dtype, device, logit_scale=1.0,
                 noncontig=False):
    mem = rand(B, H, S, D, dtype=dtype, device=device)
    q_slots = rand(B, H, S, D, dtype=dtype, device=device, scale=logit_scale, noncontig=noncontig)
    k_tok = rand(B, H, T, D, dtype=dtype, device=device, noncontig=noncontig)
    v_tok = rand(B, H, T, D, dtype=dtype, device=device)
    forget = rand(B, H, S, gate_dim, dtype=dtype, device=device, scale=2.0)
    inp = rand(B, H, S, gate_dim, dtype=dtype, device=device, scale=2.0)
    token_mask = None
    if mask:
        token_mask = torch.rand(B, T) > 0.3
        token_mask[:, T // 2] = True
        if B > 1:
            token_mask[0] = False
        token_mask = token_mask.to(device)
    return [mem, q_slots, k_tok, v_tok, forget, inp], token_mask


def upcast(tensors):
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs, grad_out_seed: Optional[torch.Tensor] = None):
    out = fn(*inputs)
    g = grad_out_seed if grad_out_seed is not None else torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g.to(out.dtype))
    return out, grads, g


def exponent_error(queries, keys):
    """Relative error of a softmax probability that comes from its float32
    exponent alone. The kernels keep each row's log-sum-exp in float32 and
    recompute p = exp2(s*log2e - lse*log2e) (FlashAttention's scheme), so each
    rounding of that argument is up to eps*|s|*log2e of p: 2e-5 at |s| ~ 300
    (the x50-logit tests), whatever the input dtype; negligible at |s| ~ 5.
    PyTorch's softmax subtracts the row max first, so its error lacks this term."""
    q, k = queries.detach().double().cpu(), keys.detach().double().cpu()
    max_score = (q @ k.transpose(-1, -2)).abs().max().item() / math.sqrt(q.shape[-1])
    return 4 * torch.finfo(torch.float32).eps * max_score * math.log2(math.e)


def assert_close(actual, expected_f64, same_dtype_ref=None, name="", k=3.0, exp_error=0.0):
    """float64: allclose to the float64 reference. Lower precisions
    (FlashAttention's rule): error at most k times that of PyTorch's own
    same-dtype computation, plus a floor scaled by the tensor's magnitude
    (with `exp_error`, the kernels' own float32 exponent error, added)."""
    actual = actual.detach().cpu()
    expected = expected_f64.detach().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    magnitude = max(1.0, expected.abs().max().item())  # x50 logits give x50 grads
    if actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, atol=1e-10 * magnitude, rtol=1e-8,
                                   msg=lambda m: f"{name}: {m}")
        return
    err = (actual.double() - expected).abs().max().item()
    base = (same_dtype_ref.detach().cpu().double() - expected).abs().max().item()
    floor = (FLOOR[actual.dtype] + exp_error) * magnitude
    assert err <= k * base + floor, (f"{name}: error {err:.3g} > {k} x same-dtype error "
                                     f"{base:.3g} + {floor:.3g}")


def reference_read(slot_mask, scale=None):
    return lambda q, k, v: reference.memory_read(q, k, v, scale=scale, slot_mask=slot_mask)


def reference_write(token_mask, scale=None):
    return lambda *a: reference.memory_write(*a, scale=scale, token_mask=token_mask)


def cpu_extension():
    """memkernels._C, or skip the test with the reason (not built)."""
    import pytest  # noqa: PLC0415
    from memkernels.ops import backend as _backend
    ext = _backend.extension()[0]
    if ext is None:
        pytest.skip("memkernels._C is not built")
    return ext


def sorted_index(keys, clusters):
    """Keys sorted into `clusters` contiguous ranges per head (an index as
    MemoryBank.build_index makes one): (keys, centroids, cluster_starts)."""
    Hk, S, _ = keys.shape
    assign = torch.randint(0, clusters, (Hk, S))
    order = torch.argsort(assign, dim=1, stable=True)
    keys = torch.gather(keys, 1, order[..., None].expand_as(keys))
    counts = torch.zeros(Hk, clusters, dtype=torch.long).scatter_add_(1, assign,
                                                                       torch.ones_like(assign))
    starts = torch.cat([counts.new_zeros(Hk, 1), counts.cumsum(1)], 1)
    return keys, torch.nn.functional.normalize(torch.randn(Hk, clusters, keys.shape[-1],
                                                           dtype=keys.dtype), dim=-1), starts
