"""The lexical index's selection as one op: sum the scores of a query's
postings per text (an inverted index: per term, the texts holding it and a
score each), then the best texts (memkernels.memory.lexical uses it for
BM25). The math is reference.postings_top; on the CPU it is one call of
memkernels._C.postings_top (csrc/cpu/postings_cpu.cpp): in ATen it takes an
index_add_ per term and four passes over every text's score, ~1.1 ms a
question at 10^5 texts.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from memkernels.ops import backend as _backend
from memkernels.ops import reference
from memkernels.ops.nvtx import nvtx_range


def _check(starts: Tensor, post_text: Tensor, post_score: Tensor, num_texts: int,
           terms: Tensor, k: int, min_score_ratio: float) -> None:
    for name, t, dtype in (("starts", starts, torch.long), ("post_text", post_text, torch.long),
                           ("post_score", post_score, torch.float64), ("terms", terms, torch.long)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != dtype or t.device.type != "cpu":
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t)
            raise ValueError(f"{name} must be a 1-d {dtype} CPU tensor, got {got}")
    if starts.numel() < 1:
        raise ValueError("starts must be [num_terms + 1], got an empty tensor")
    if post_score.numel() != post_text.numel():
        raise ValueError(f"post_score must be [P] = [{post_text.numel()}] as post_text, got "
                         f"{tuple(post_score.shape)}")
    if isinstance(num_texts, bool) or not isinstance(num_texts, int) or num_texts < 0:
        raise ValueError(f"num_texts must be an int >= 0, got {num_texts!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(min_score_ratio, bool) or not isinstance(min_score_ratio, (int, float)) \
            or not 0.0 <= min_score_ratio <= 1.0:
        raise ValueError(f"min_score_ratio must be a number in [0, 1], got {min_score_ratio!r}")
    num_terms = starts.numel() - 1
    if terms.numel() and (int(terms.min()) < 0 or int(terms.max()) >= num_terms):
        raise ValueError(f"terms must be term indices in [0, {num_terms}), got "
                         f"{terms.tolist()[:8]}")
    if terms.numel():  # the query's ranges only: a question has a few dozen terms
        lo, hi = starts[terms], starts[terms + 1]
        if bool((lo < 0).any() or (hi < lo).any() or (hi > post_text.numel()).any()):
            raise ValueError(f"starts must rise within [0, {post_text.numel()}] (the number of "
                             f"postings) at the query's terms")


def postings_top(starts: Tensor, post_text: Tensor, post_score: Tensor, num_texts: int,
                 terms: Tensor, k: int, min_score_ratio: float = 0.0,
                 backend: Optional[str] = None) -> Tensor:
    """The texts (int64 [<= k]) of highest summed posting score for `terms`,
    best first (equal scores: lower text first): those scoring > 0 and
    >= min_score_ratio x the best (0: every text sharing a term).

    starts [num_terms + 1] int64: term t's postings are [starts[t],
    starts[t + 1]); post_text / post_score [P] int64 / float64: each
    posting's text and score; terms int64: the query's term indices (a
    repeat adds again). All on the CPU. backend: 'cpu' (the kernel),
    'reference', or None ($MEMKERNELS_BACKEND where it names one of those,
    else the kernel where the extension is built)."""
    _check(starts, post_text, post_score, num_texts, terms, k, min_score_ratio)
    if backend not in (None, "auto", "cpu", "reference"):
        raise ValueError(f"backend: postings_top runs on the CPU ('cpu' or 'reference'), got "
                         f"{backend!r}")
    # the postings live on the CPU whatever the model runs on: a GPU backend
    # named in $MEMKERNELS_BACKEND means the best CPU path here
    name = backend or os.environ.get(_backend.ENV_VAR, "auto")
    if name not in _backend.BACKENDS:
        raise ValueError(f"${_backend.ENV_VAR} must be one of {_backend.BACKENDS}, got {name!r}")
    kernel = None
    if name != "reference" and not torch.compiler.is_compiling():
        if name == "cpu":
            _backend.resolve("cpu", starts.device)  # raises, saying why, when it cannot run
        kernel = getattr(_backend.extension()[0], "postings_top", None)
        if kernel is None and name == "cpu":
            raise RuntimeError(f"backend 'cpu': this build of memkernels._C has no postings_top "
                               f"(built before it); {_backend.REBUILD_HINT}")
    if kernel is not None:
        with nvtx_range("memkernels.postings_top[cpu]"):
            return kernel(starts, post_text, post_score, num_texts, terms, k,
                          float(min_score_ratio))
    return reference.postings_top(starts, post_text, post_score, num_texts, terms, k,
                                  float(min_score_ratio))
