"""Bad and extreme calls of the ops and of the extension itself: no call
crashes the process, empty problems give empty results, NaN and Inf
propagate as in the reference, on every backend."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest
import torch

import memkernels
from memkernels import reference
from memkernels.ops import backend as _backend

from helpers import cpu_extension

# Direct calls that crashed the process (SIGFPE, or MKL's SGEMM parameter
# error) before their arguments were checked. Each runs in a subprocess: a
# crash fails the test, not the run.
CRASH_CASES = {
    "read_fwd Dh=0, T=1, no mask": """
        q, k = torch.randn(1, 1, 1, 0), torch.randn(1, 4, 0)
        _C.read_fwd(q, k, k, None, 1.0)""",
    "read_fwd Dh=0 on the tile path": """
        q, k = torch.randn(2, 2, 300, 0), torch.randn(2, 600, 0)
        _C.read_fwd(q, k, k, None, 1.0)""",
    "the custom op, Dh=0": """
        q, k = torch.randn(1, 1, 1, 0), torch.randn(1, 4, 0)
        torch.ops.memkernels.read_fwd(q, k, k, None, 1.0, "cpu")""",
    "write_fwd Dh=0": """
        m, t, g = torch.randn(1, 1, 3, 0), torch.randn(1, 1, 2, 0), torch.randn(1, 1, 3, 1)
        _C.write_fwd(m, m, t, t, g, g, None, 1.0)""",
    "reader_fwd keys [0, S, Dh]": """
        h, w = torch.randn(1, 1, 8), torch.randn(4, 8)
        _C.reader_fwd(h, w, torch.randn(0, 5, 4), torch.randn(0, 5, 4), w, 1e-6, 0.5)""",
    "reader_fwd hidden size 0": """
        h, w = torch.randn(1, 1, 0), torch.randn(4, 0)
        _C.reader_fwd(h, w, torch.randn(1, 5, 4), torch.randn(1, 5, 4), w, 1e-6, 0.5)""",
    "reader_fwd query_w [0, C]": """
        h, w = torch.randn(1, 1, 8), torch.randn(0, 8)
        _C.reader_fwd(h, w, torch.randn(1, 5, 4), torch.randn(1, 5, 4), w, 1e-6, 0.5)""",
    "read_bwd with dout on another device": """
        q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 3, 4)
        out, lse = _C.read_fwd(q, k, k, None, 0.5)
        _C.read_bwd(torch.empty(q.shape, device="meta"), q, k, k, out, lse, None, 0.5)""",
}


@pytest.mark.parametrize("case", sorted(CRASH_CASES))
def test_direct_extension_calls_raise_instead_of_crashing(case):
    cpu_extension()
    body = textwrap.indent(textwrap.dedent(CRASH_CASES[case]).strip(), "    ")
    script = ("import torch\nimport memkernels\nfrom memkernels import _C\ntry:\n" + body +
              "\n    print('returned')\nexcept (RuntimeError, ValueError, TypeError) as exc:\n"
              "    print('raised', type(exc).__name__, str(exc).splitlines()[0])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("raised"), proc.stdout + proc.stderr


def test_the_probe_bindings_take_any_integer_without_crashing():
    # cpu_few_rows_chunk(rows, 0) divided by zero (SIGFPE) before it checked the width; a
    # width near 2^62 overflowed the chunk's byte count the same way. Each answer: 0 where no
    # vector body takes the rows, else a positive multiple of 4 keys.
    cpu_extension()
    script = textwrap.dedent('''
        from memkernels import _C
        sizes = [-(2 ** 62), -64, -1, 0, 1, 8, 15, 16, 17, 64, 4096, 2 ** 62]
        chunks = [_C.cpu_few_rows_chunk(r, d) for r in sizes for d in sizes]
        layouts = {_C.cpu_few_rows_key_major(r, d) for r in sizes for d in sizes}
        assert layouts <= {0, 1, 2}, layouts
        bursts = [b(s) for b in (_C.cpu_fma_burst, _C.cpu_gemm_l1_burst)
                  for s in (-(2 ** 62), -5, 0)]
        print((chunks.count(0), len(chunks), sorted(set(chunks) - {0}), bursts))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    zeros, total, chunks, bursts = ast.literal_eval(proc.stdout.strip())
    assert total == 144 and all(c > 0 and c % 4 == 0 for c in chunks), proc.stdout
    assert bursts == [0] * 6, proc.stdout
    if _backend.extension()[0].cpu_isa() != "generic":
        # rows 1, 8, 15, 16 over widths 16, 64, 4096, 2^62 (and 8 on AVX2) take a body
        assert zeros < total and 16 in chunks, proc.stdout  # 2^62 wide: the 16-key floor


@pytest.mark.parametrize("shape", [(0, 2, 3, 8), (2, 2, 0, 8), (2, 0, 3, 8)],
                         ids=["B=0", "T=0", "H=0"])
@pytest.mark.parametrize("shared", [True, False])
def test_empty_reads_give_empty_results_on_every_backend(backend, device, shape, shared):
    B, H, T, D = shape
    q = torch.randn(shape, device=device, requires_grad=True)
    bank = (H, 5, D) if shared else (B, H, 5, D)
    k = torch.randn(bank, device=device, requires_grad=True)
    v = torch.randn(bank, device=device, requires_grad=True)
    out, lse = memkernels.memory_read(q, k, v, return_lse=True, backend=backend)
    want, want_lse = reference.memory_read(q, k, v, return_lse=True)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    out.sum().backward()  # no query: zero gradients
    assert float(k.grad.abs().sum()) == 0 and float(v.grad.abs().sum()) == 0


def test_empty_writes_give_empty_results_on_every_backend(backend, device):
    mem = torch.randn(0, 2, 4, 8, device=device, requires_grad=True)
    tok = torch.randn(0, 2, 3, 8, device=device)
    gate = torch.randn(0, 2, 4, 1, device=device)
    new = memkernels.memory_write(mem, mem, tok, tok, gate, gate, backend=backend)
    assert new.shape == mem.shape
    new.sum().backward()
    assert mem.grad.shape == mem.shape


def nan_pattern(x):
    return torch.isnan(x.double().cpu())


@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_nan_propagates_through_a_read_as_in_the_reference(backend, device, where):
    q = torch.randn(2, 2, 5, 8, device=device)
    k, v = torch.randn(2, 7, 8, device=device), torch.randn(2, 7, 8, device=device)
    {"query": q[1, 0, 2], "key": k[1, 3], "value": v[0, 6]}[where][4] = float("nan")
    out, lse = memkernels.memory_read(q, k, v, return_lse=True, backend=backend)
    want, want_lse = reference.memory_read(q, k, v, return_lse=True)
    assert nan_pattern(want).any()
    assert torch.equal(nan_pattern(out), nan_pattern(want))
    assert torch.equal(nan_pattern(lse), nan_pattern(want_lse))
    finite = ~nan_pattern(want)
    torch.testing.assert_close(out.double().cpu()[finite], want.double().cpu()[finite],
                               rtol=1e-4, atol=1e-4)


def test_nan_in_a_slot_query_propagates_through_a_write(backend, device):
    mem = torch.randn(2, 2, 4, 8, device=device)
    q_slots = torch.randn(2, 2, 4, 8, device=device)
    tok = torch.randn(2, 2, 3, 8, device=device)
    gate = torch.randn(2, 2, 4, 1, device=device)
    q_slots[1, 1, 2, 0] = float("nan")
    new = memkernels.memory_write(mem, q_slots, tok, tok, gate, gate, backend=backend)
    want = reference.memory_write(mem, q_slots, tok, tok, gate, gate)
    assert nan_pattern(want).any() and torch.equal(nan_pattern(new), nan_pattern(want))


def test_inf_scores_follow_the_reference(backend, device):
    """An infinite score: the read is NaN where the reference's is (inf - inf)
    and finite elsewhere, on every backend."""
    q = torch.randn(2, 2, 3, 8, device=device)
    k, v = torch.randn(2, 6, 8, device=device), torch.randn(2, 6, 8, device=device)
    k[0, 2, 1] = float("inf")
    out = memkernels.memory_read(q, k, v, backend=backend)
    want = reference.memory_read(q, k, v)
    assert torch.equal(nan_pattern(out), nan_pattern(want))
    finite = ~nan_pattern(want)
    torch.testing.assert_close(out.double().cpu()[finite], want.double().cpu()[finite],
                               rtol=1e-4, atol=1e-4)


def test_bf16_on_the_interpreted_triton_backend_is_refused():
    if not (_backend.triton_available() and _backend.triton_interpreted()):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    q, k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 5, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        memkernels.memory_read(q, k, k, backend="triton")


if _backend.triton_available():  # a probe of the kernels' offset helper (triton is optional)
    import triton
    import triton.language as tl

    from memkernels.ops.triton.attention import _mask_rows

    @triton.jit
    def _mask_offset_probe(Out, g0, group_div, group_stride, row_div, row_stride,
                           BLOCK: tl.constexpr):
        g = tl.program_id(0) + g0  # int32, as in the kernels
        rows = tl.arange(0, BLOCK)
        tl.store(Out + rows, _mask_rows(g, rows, group_div, group_stride, row_div, row_stride))


def test_triton_mask_offsets_do_not_wrap_at_2_to_31():
    """A [B, S] slot mask of a bank shared by the batch passes 2^31 elements
    from B = 2048 rows of 2^20 slots: the mask row offset is computed in int64
    (in int32 it wrapped around)."""
    if not (_backend.triton_available() and (_backend.triton_interpreted()
                                             or torch.cuda.is_available())):
        pytest.skip("needs triton on a GPU or under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(4, dtype=torch.int64, device=device)
    _mask_offset_probe[(1,)](out, 4096, 1, 1 << 20, 1, 3, BLOCK=4)
    assert out.tolist() == [4096 * (1 << 20) + 3 * r for r in range(4)]
