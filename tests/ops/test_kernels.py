"""Every backend's fused kernels against the reference, forward and every
gradient, on fresh random inputs over a grid of shapes, masks and dtypes."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import (assert_close, exponent_error, outputs_and_grads, read_inputs, reference_read,
                     reference_write, upcast, write_inputs)
from memkernels import memory_read, memory_write
from memkernels.ops import backend as _backend

# (B, H, T, S, Dh): every value of the grid appears: B, H in 1..4;
# T in 1, 7, 64, 300; S in 1, 5, 128, 1000; Dh in 1, 3, 64, 80, 128.
READ_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 7, 5, 3),
    (4, 2, 1, 128, 64),
    (2, 2, 7, 1000, 1),
    (1, 1, 64, 5, 128),
    (3, 1, 64, 1000, 80),
    (1, 4, 300, 128, 128),
    (2, 1, 300, 1000, 64),
    (3, 2, 1, 1000, 20),  # decode (one query row per group): the CPU's portable single-row loops,
    (1, 3, 1, 5, 3),      # their 4-key and 16-lane remainders
    (2, 3, 1, 1003, 32),  # ... and the few-row kernel (test_cpu_isa_paths.py has its full grid)
    (1, 2, 1, 6, 16),
    (1, 1, 1, 1, 48),
    (2, 1, 1, 129, 64),
    (2, 2, 5, 517, 128),  # the CUDA decode kernel: 2 row chunks when shared, 32 lanes per key
]
# (B, H, S, T, Dh)
WRITE_SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 7, 3),
    (4, 2, 128, 1, 64),
    (2, 2, 1000, 7, 1),
    (1, 1, 5, 64, 128),
    (3, 1, 128, 300, 80),
    (1, 4, 1000, 64, 64),
]
HEAVY_ELEMENTS = 3_000_000  # T*S*B*H above this is slow under the Triton interpreter


def interpreter_skips(backend, work, dtype):
    """The few cases the Triton interpreter cannot check; each runs on a GPU."""
    if backend != "triton" or not _backend.triton_interpreted():
        return
    if work > HEAVY_ELEMENTS:
        pytest.skip("too slow for the Triton interpreter; runs on a GPU (benchmarks/gpu_check.sh)")
    if dtype == torch.bfloat16:
        # triton 3.9's interpreter returns garbage for a bf16 tl.dot (a 16x16
        # product off by 1e10); fp16 exercises the same code path here.
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong; bf16 runs on a GPU")


def run_read(backend, device, shape, shared, mask, dtype, logit_scale=1.0, noncontig=False):
    B, H, T, S, D = shape
    interpreter_skips(backend, B * H * T * S, dtype)
    q, k, v, slot_mask = read_inputs(B, H, T, S, D, shared=shared, mask=mask, dtype=dtype,
                                     device=device, logit_scale=logit_scale, noncontig=noncontig)
    out, grads, g = outputs_and_grads(
        lambda q, k, v: memory_read(q, k, v, slot_mask=slot_mask, backend=backend), [q, k, v])
    m64 = None if slot_mask is None else slot_mask.cpu()
    ref_out, ref_grads, _ = outputs_and_grads(reference_read(m64), upcast([q, k, v]),
                                              g.double().cpu())
    same = [None] * 4
    if dtype != torch.float64:
        same_out, same_grads, _ = outputs_and_grads(reference_read(slot_mask), [q, k, v], g)
        same = [same_out, *same_grads]
    exp_err = exponent_error(q, k)
    for name, a, r, s in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads], same):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close(a, r, s, name=name, exp_error=exp_err)
    if mask == "BS" and B > 1:  # all-masked row: zeros out, zero grad
        assert (out[0] == 0).all() and (grads[0][0] == 0).all()


@pytest.mark.parametrize("mask", [None, "S", "BS"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_seq"])
@pytest.mark.parametrize("shape", READ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_read_float64(backend, device, shape, shared, mask):
    if device.type == "cuda" and backend == "triton":
        pytest.skip("triton has no float64 dot; float32 and bf16 cover it")
    run_read(backend, device, shape, shared, mask, torch.float64)


@pytest.mark.parametrize("mask", [None, "BS"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_seq"])
@pytest.mark.parametrize("shape", READ_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_read_float32(backend, device, shape, shared, mask):
    run_read(backend, device, shape, shared, mask, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 3), (4, 2, 1, 128, 64), (3, 1, 64, 1000, 80),
                                   (2, 2, 1, 300, 256),
                                   # the CUDA tensor-core kernels: a partial 64-row tile, a
                                   # partial 64-key tile, D=16, and a split over keys at D=128
                                   (2, 2, 33, 130, 16), (1, 2, 70, 300, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_read_half_precision(backend, device, shape, dtype):
    run_read(backend, device, shape, True, "BS", dtype)
    run_read(backend, device, shape, False, "S", dtype)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_seq"])
def test_read_large_logits(backend, device, shared):
    """Scores scaled x50: the online softmax must not overflow."""
    run_read(backend, device, (2, 2, 7, 300, 64), shared, "BS", torch.float32, logit_scale=50.0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_seq"])
def test_read_noncontiguous(backend, device, shared):
    run_read(backend, device, (2, 3, 7, 130, 33), shared, "S", torch.float32, noncontig=True)


def test_read_lse(backend, device):
    q, k, v, m = read_inputs(2, 2, 5, 77, 16, shared=True, mask="BS", dtype=torch.float32,
                             device=device)
    _, lse = memory_read(q, k, v, slot_mask=m, return_lse=True, backend=backend)
    _, ref = memory_read(*upcast([q, k, v]), slot_mask=m.cpu(), return_lse=True,
                         backend="reference")
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 5)
    assert torch.isneginf(lse[0]).all()  # row 0 is all-masked
    torch.testing.assert_close(lse[1:].cpu().double(), ref[1:], atol=1e-5, rtol=1e-5)


def run_write(backend, device, shape, gate_dim, mask, dtype, logit_scale=1.0, noncontig=False,
              save_probs=True):
    B, H, S, T, D = shape
    interpreter_skips(backend, B * H * T * S, dtype)
    gate_dim = D if gate_dim == "D" else 1
    inputs, token_mask = write_inputs(B, H, S, T, D, gate_dim=gate_dim, mask=mask, dtype=dtype,
                                      device=device, logit_scale=logit_scale, noncontig=noncontig)
    mem_before = inputs[0].detach().clone()
    out, grads, g = outputs_and_grads(
        lambda *a: memory_write(*a, token_mask=token_mask, backend=backend, save_probs=save_probs),
        inputs)
    assert torch.equal(inputs[0].detach(), mem_before), "memory_write modified mem in place"
    m64 = None if token_mask is None else token_mask.cpu()
    ref_out, ref_grads, _ = outputs_and_grads(reference_write(m64), upcast(inputs), g.double().cpu())
    same = [None] * 7
    if dtype != torch.float64:
        s_out, s_grads, _ = outputs_and_grads(reference_write(token_mask), inputs, g)
        same = [s_out, *s_grads]
    names = ["new_mem", "dmem", "dq_slots", "dk_tok", "dv_tok", "dforget", "dinput"]
    exp_err = exponent_error(inputs[1], inputs[2])
    for name, a, r, s in zip(names, [out, *grads], [ref_out, *ref_grads], same):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close(a, r, s, name=name, exp_error=exp_err)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("gate_dim", [1, "D"], ids=["gate1", "gateD"])
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_write_float64(backend, device, shape, gate_dim, mask):
    if device.type == "cuda" and backend == "triton":
        pytest.skip("triton has no float64 dot; float32 and bf16 cover it")
    run_write(backend, device, shape, gate_dim, mask, torch.float64)


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_write_float32(backend, device, shape, mask):
    run_write(backend, device, shape, 1, mask, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_write_recomputing_its_probabilities(backend, device, shape, dtype):
    """save_probs=False: the CPU backward recomputes P (the others always do)."""
    run_write(backend, device, shape, "D", True, dtype, save_probs=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_half_precision(backend, device, dtype):
    run_write(backend, device, (2, 3, 37, 19, 64), "D", True, dtype)
    run_write(backend, device, (1, 2, 130, 7, 80), 1, False, dtype)
    run_write(backend, device, (2, 1, 70, 130, 16), "D", True, dtype)


def test_cuda_tensor_core_kernels_match_the_reference():
    """The CUDA backend's tensor-core kernels (float16/bfloat16) are opt-in through
    MEMKERNELS_CUDA_TENSOR_CORES=1, read once per process: the half-precision tests
    run again in a subprocess with it set."""
    ok, why = _backend.available("cuda", torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    env = {**os.environ, "MEMKERNELS_CUDA_TENSOR_CORES": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", "cuda and half_precision"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_write_large_logits_noncontiguous(backend, device):
    run_write(backend, device, (2, 2, 33, 70, 48), 1, True, torch.float32, logit_scale=50.0,
              noncontig=True)


GENERIC_PATH_SCRIPT = r"""
import torch
from memkernels import MemoryBank, MemoryConfig, MemoryModel, memory_read, reference
torch.manual_seed(0)
for D, S in ((16, 6), (32, 1003), (48, 1), (64, 129)):
    q, k, v = torch.randn(2, 3, 1, D), 3 * torch.randn(2, 3, S, D), torch.randn(2, 3, S, D)
    want = reference.memory_read(q.double(), k.double(), v.double()).float()
    torch.testing.assert_close(memory_read(q, k, v, backend="cpu"), want, rtol=1e-5, atol=1e-5)
    memory = MemoryModel(MemoryConfig(hidden_size=40, num_layers=2, num_heads=2, head_dim=D,
                                      num_slots=S, gate_init=0.5))
    bank, hidden = MemoryBank(memory, torch.randn(3, 2, S, D)), torch.randn(3, 1, 40)
    for kv_dtype in (torch.bfloat16, torch.int8):
        with torch.no_grad():
            fused = memory.read(0, hidden, bank, kv_dtype)
            keys, values = (t.dequantize() if kv_dtype == torch.int8 else t.float()
                            for t in bank.keys_values(kv_dtype))
        want = memory.readers[0](hidden.clone().requires_grad_(), keys.clone(), values.clone())
        torch.testing.assert_close(fused, want.detach(), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_cpu_decode_read_generic_loops_match_the_reference():
    """The single-query read has the few-row kernel (AVX-512 / AVX2) and
    portable loops for other head dims and CPUs; MEMKERNELS_CPU_GENERIC=1
    forces the portable loops (read once per process, hence the subprocess),
    float32, bf16 and int8 keys/values, against the reference."""
    if _backend.extension()[0] is None:
        pytest.skip("needs memkernels._C")
    env = dict(os.environ, MEMKERNELS_CPU_GENERIC="1")
    done = subprocess.run([sys.executable, "-c", GENERIC_PATH_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
