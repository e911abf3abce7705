"""The lexical index's selection (memkernels.ops.postings_top): the CPU
kernel (memkernels._C.postings_top) against the pure-PyTorch reference and a
plain-Python count on fresh random indexes, its ordering and edge cases, and
its argument checks (a direct extension call included)."""
from __future__ import annotations

import random

import pytest
import torch

from memkernels.ops import reference
from memkernels.ops.postings import postings_top

from helpers import cpu_extension


def random_index(num_texts: int, num_terms: int, seed: int, max_df: int = 12,
                 integer_scores: bool = False):
    """(starts, post_text, post_score): each term's postings on distinct
    texts, sorted by text, as LexicalIndex builds them."""
    rng = random.Random(seed)
    starts, texts, scores = [0], [], []
    for _ in range(num_terms):
        df = rng.randrange(0, min(max_df, num_texts) + 1)
        chosen = sorted(rng.sample(range(num_texts), df))
        texts += chosen
        # integer scores make exact ties common (the order among equals is tested)
        scores += [float(rng.randrange(1, 4)) if integer_scores else rng.uniform(0.01, 3.0)
                   for _ in chosen]
        starts.append(len(texts))
    return (torch.tensor(starts, dtype=torch.long), torch.tensor(texts, dtype=torch.long),
            torch.tensor(scores, dtype=torch.float64))


def by_hand(starts, post_text, post_score, num_texts, terms, k, ratio):
    total = [0.0] * num_texts
    for t in terms:
        for j in range(int(starts[t]), int(starts[t + 1])):
            total[int(post_text[j])] += float(post_score[j])
    best = max(total, default=0.0)
    if not best > 0:
        return []
    near = [e for e in range(num_texts) if total[e] > 0 and total[e] >= ratio * best]
    return sorted(near, key=lambda e: (-total[e], e))[:k]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("num_texts, num_terms", [(1, 1), (7, 5), (60, 40), (1000, 300)])
def test_matches_a_plain_count(backend, num_texts, num_terms):
    if backend == "cpu":
        cpu_extension()
    for seed in range(6):
        index = random_index(num_texts, num_terms, seed, integer_scores=seed % 2 == 1)
        rng = random.Random(100 + seed)
        for _ in range(10):
            terms = [rng.randrange(num_terms) for _ in range(rng.randrange(0, 9))]
            for k in (1, 3, 50):
                for ratio in (0.0, 0.5, 0.9, 1.0):
                    got = postings_top(*index, num_texts, torch.tensor(terms, dtype=torch.long),
                                       k, ratio, backend=backend)
                    assert got.dtype == torch.long
                    assert got.tolist() == by_hand(*index, num_texts, terms, k, ratio)


def test_the_kernel_sums_in_the_reference_order_bit_for_bit():
    """Scores of mixed magnitudes, long queries with repeats: the kernel's
    sums (term by term) equal the reference's exactly, so near ties and
    their order never differ between the two."""
    ext = cpu_extension()
    g = torch.Generator().manual_seed(5)
    starts, texts, _ = random_index(5000, 400, seed=5, max_df=2000)
    scores = torch.rand(texts.numel(), generator=g, dtype=torch.float64) * \
        10 ** torch.randint(-6, 4, (texts.numel(),), generator=g).double()
    for _ in range(30):
        terms = torch.randint(0, 400, (int(torch.randint(1, 40, (1,), generator=g)),),
                              generator=g)
        for ratio in (0.0, 0.9, 0.999):
            want = reference.postings_top(starts, texts, scores, 5000, terms, 200, ratio)
            assert ext.postings_top(starts, texts, scores, 5000, terms, 200, ratio).tolist() \
                == want.tolist()


def test_edge_cases():
    cpu_extension()
    starts, texts, scores = (torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 1]),
                             torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
    for backend in ("cpu", "reference"):
        def top(terms, k=3, ratio=0.0, s=scores, n=3):
            return postings_top(starts, texts, s, n, torch.tensor(terms, dtype=torch.long), k,
                                ratio, backend=backend).tolist()
        assert top([]) == []                   # no term: nothing
        assert top([1]) == []                  # a term no text holds
        assert top([0, 2]) == [1, 2, 0]        # equal scores: the lower text first
        assert top([0, 2], k=1) == [1]
        assert top([0, 2], ratio=1.0) == [1, 2]
        assert top([0, 0]) == [2, 0]           # a repeated term adds again
        assert top([0], n=5) == [2, 0]         # texts without postings score 0: never chosen
        negative = torch.tensor([-1.0, -2.0, 2.0], dtype=torch.float64)
        assert top([0, 2], s=negative) == [1]  # only texts scoring > 0
        assert top([0], s=negative) == []      # the best <= 0: nothing
        nan = torch.tensor([float("nan"), 2.0, 2.0], dtype=torch.float64)
        assert top([0, 2], s=nan) == []        # a NaN score ranks nothing
        empty = postings_top(torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.float64), 0,
                             torch.zeros(0, dtype=torch.long), 2, 0.5, backend=backend)
        assert empty.tolist() == []


def test_bad_arguments_are_named():
    starts, texts, scores = random_index(10, 4, seed=1)
    terms = torch.tensor([0, 1])
    cases = [
        (dict(starts=starts.int()), "starts must be a 1-d torch.int64 CPU tensor"),
        (dict(post_text=texts[None]), "post_text must be a 1-d"),
        (dict(post_score=scores.float()), "post_score must be a 1-d torch.float64"),
        (dict(post_score=scores[:-1]), "post_score must be \\[P\\]"),
        (dict(terms=[0, 1]), "terms must be a 1-d"),
        (dict(terms=torch.tensor([4])), "terms must be term indices in \\[0, 4\\)"),
        (dict(terms=torch.tensor([-1])), "terms must be term indices"),
        (dict(num_texts=-1), "num_texts must be an int >= 0"),
        (dict(k=0), "k must be a positive int"),
        (dict(min_score_ratio=1.5), "min_score_ratio must be a number in \\[0, 1\\]"),
        (dict(starts=torch.zeros(0, dtype=torch.long)), "starts must be \\[num_terms \\+ 1\\]"),
        (dict(backend="triton"), "postings_top runs on the CPU"),
        (dict(starts=torch.tensor([0, 3, 2, 4, starts[-1].item()])), "starts must rise"),
        (dict(starts=torch.tensor([0, 10 ** 6, 10 ** 6, 10 ** 6, 10 ** 6])), "starts must rise"),
    ]
    args = dict(starts=starts, post_text=texts, post_score=scores, num_texts=10, terms=terms,
                k=2, min_score_ratio=0.5)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            postings_top(**{**args, **change})


def test_a_direct_extension_call_with_bad_tensors_raises():
    """Out-of-range terms, posting ranges or texts reach no memory access:
    the kernel checks them and the binding raises (the process lives)."""
    ext = cpu_extension()
    starts, texts, scores = random_index(10, 4, seed=2)
    ok = ext.postings_top(starts, texts, scores, 10, torch.tensor([0, 3]), 2, 0.0)
    assert ok.dtype == torch.long
    assert texts.numel() > 3 and int(texts.max()) >= 1  # the "text outside" case below has one
    # non-contiguous views are read as what they show
    strided = torch.stack([texts, torch.full_like(texts, -7)], 1)[:, 0]
    assert not strided.is_contiguous()
    assert ext.postings_top(starts, strided, scores, 10, torch.tensor([0, 3]), 2, 0.0).tolist() \
        == ok.tolist()
    bad = [
        ((starts, texts, scores, 10, torch.tensor([4]), 2, 0.0), "terms must be term indices"),
        ((starts, texts, scores, 10, torch.tensor([-3]), 2, 0.0), "terms must be term indices"),
        ((torch.tensor([0, 10 ** 9, 3, 3, 3]), texts, scores, 10, torch.tensor([0]), 2, 0.0),
         "starts must rise"),
        ((torch.tensor([5, 2, 3, 3, 3]), texts, scores, 10, torch.tensor([0]), 2, 0.0),
         "starts must rise"),
        ((starts, texts, scores, 1, torch.tensor([0, 1, 2, 3]), 2, 0.0),
         "post_text must hold texts in \\[0, 1\\)"),
        ((starts, texts, scores, 2 ** 40, torch.tensor([0]), 2, 0.0),
         "num_texts must be in \\[0, 2\\^28\\]"),
        ((starts, texts.int(), scores, 10, torch.tensor([0]), 2, 0.0), "post_text must be"),
        ((starts, texts, scores.float(), 10, torch.tensor([0]), 2, 0.0), "post_score must be"),
        ((starts, texts, scores[:-1], 10, torch.tensor([0]), 2, 0.0), "post_score must be"),
        ((starts, texts, scores, 10, torch.tensor([0]), 0, 0.0), "k must be >= 1"),
        ((starts, texts, scores, 10, torch.tensor([0]), 2, float("nan")), "min_score_ratio"),
        ((starts, texts, scores, -1, torch.tensor([0]), 2, 0.0), "num_texts must be in"),
        ((torch.zeros(0, dtype=torch.long), texts, scores, 10, torch.tensor([0]), 2, 0.0),
         "starts must be"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ext.postings_top(*args)


def test_the_backend_is_named_and_a_stale_build_is_not_silently_skipped(monkeypatch):
    from memkernels.ops import backend as _backend
    index = random_index(10, 4, seed=1)
    terms = torch.tensor([0, 1])
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # a GPU backend named: the CPU path here
    want = postings_top(*index, 10, terms, 3, backend="reference").tolist()
    assert postings_top(*index, 10, terms, 3).tolist() == want
    monkeypatch.setenv(_backend.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="MEMKERNELS_BACKEND must be one of"):
        postings_top(*index, 10, terms, 3)
    monkeypatch.delenv(_backend.ENV_VAR)
    cpu_extension()
    monkeypatch.setattr(_backend, "extension", lambda: (object(), ""))  # built before the op
    with pytest.raises(RuntimeError, match="has no postings_top"):
        postings_top(*index, 10, terms, 3, backend="cpu")
    assert postings_top(*index, 10, terms, 3).tolist() == want  # auto: the reference
