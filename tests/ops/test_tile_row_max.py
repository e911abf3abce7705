"""The CPU tile forward's row max (mask_and_max, or any faster way to find
it): where no mask applies, the padded columns of a key block's last panel
must not count (zero scores there would outrank rows whose scores are all far
below 0 and underflow them to an empty row), a NaN score is skipped by the max
but makes its row NaN through the exp, and a row of NaN scores reads NaN. Each
case against the float64 reference, with the read's and the write's forward
(both run the tile forward), keys across the 512-key blocks and the panels'
widths. (A max kept in the score product's epilogue that counted the padding
failed 6 of these 14.)"""
import pytest
import torch

from helpers import cpu_extension
from memkernels import memory_read, memory_write, reference


def _close(got, want, what, tol=2e-5):
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# scores near -200: float32's rounding of a score (~1e-5 there) moves its
# probability by as much, relative
FAR_TOL = 3e-4


@pytest.mark.parametrize("S", [1, 7, 37, 100, 512, 549, 1000])
def test_rows_far_below_zero_are_not_outranked_by_padding(S):
    """Every score near -200: a padded column's 0 taken as the max would make
    every exp underflow and the row read as empty (zeros, lse -inf)."""
    cpu_extension()
    torch.manual_seed(S)
    D = 64
    direction = torch.randn(D)
    direction /= direction.norm()
    q = (20.0 * direction).expand(2, 2, 40, D).contiguous()
    k = -10.0 * direction + 0.05 * torch.randn(2, S, D)  # q . k ~ -200, spread by ~1
    v = torch.randn(2, S, D)
    out, lse = memory_read(q, k, v, scale=1.0, return_lse=True, backend="cpu")
    want, want_lse = reference.memory_read(q.double(), k.double(), v.double(), scale=1.0,
                                           return_lse=True)
    assert (lse < -150).all() and torch.isfinite(lse).all()
    _close(out, want, f"read out S={S}", FAR_TOL)
    _close(lse, want_lse, f"read lse S={S}", FAR_TOL)


@pytest.mark.parametrize("S", [9, 37, 512, 549])
def test_a_nan_score_makes_its_row_nan_and_a_nan_query_row_reads_nan(S):
    cpu_extension()
    torch.manual_seed(S + 1)
    q, k, v = torch.randn(2, 2, 40, 32), torch.randn(2, S, 32), torch.randn(2, S, 32)
    k[0, S // 2, 3] = float("nan")  # one key: a NaN score in every row of head 0
    q[1, 1, 5, 0] = float("nan")    # one query row: all its scores NaN
    out = memory_read(q, k, v, backend="cpu")
    want = reference.memory_read(q.double(), k.double(), v.double())
    assert out[:, 0].isnan().all() and want[:, 0].isnan().all()
    assert out[1, 1, 5].isnan().all() and not out[1, 1, [4, 6]].isnan().any()
    assert torch.equal(out[:, 1].isnan().any(-1), want[:, 1].isnan().any(-1))
    _close(out, want, f"read with NaN S={S}")


@pytest.mark.parametrize("T", [5, 40, 512])
def test_write_forward_with_scores_far_below_zero(T):
    """The write's forward (slots over tokens, no token mask) on the same
    epilogue: scores near -200 across the tokens' padded panel."""
    cpu_extension()
    torch.manual_seed(T)
    B, H, S, D = 2, 2, 30, 32
    direction = torch.randn(D)
    direction /= direction.norm()
    q_slots = (20.0 * direction).expand(B, H, S, D).contiguous()
    k_tok = -10.0 * direction + 0.05 * torch.randn(B, H, T, D)
    inputs = [torch.randn(B, H, S, D), q_slots, k_tok, torch.randn(B, H, T, D),
              torch.randn(B, H, S, 1), torch.randn(B, H, S, 1)]
    got = memory_write(*inputs, scale=1.0, backend="cpu")
    want = reference.memory_write(*[t.double() for t in inputs], scale=1.0)
    _close(got, want, f"write T={T}", FAR_TOL)
