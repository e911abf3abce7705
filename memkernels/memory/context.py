"""The context of each token (AppendOptions.context_decay): a decayed mean of
the embeddings so far.

Why: a small LM's late hidden states blur which made-up name a text is
about; the tokens themselves do not, and a decayed mean carries the last few
of them, the name among them, to where a question is answered
(docs/design.md, "Keying on the context"). It is a linear recurrence, so a
decode step costs O(C) per token and carries a small state.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

# the decayed sum runs over blocks of this many tokens (a [L, L] weight matrix
# each), its state carried from block to block
_CONTEXT_BLOCK = 64


def decayed_context(embeddings: Tensor, mask: Optional[Tensor], decay: float,
                    state: Optional[tuple[Tensor, Tensor]] = None
                    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The context of each token (MemoryConfig.context_decay): the mean of
    the embeddings of the real tokens up to and including it, token t-k
    weighted decay^k (zero before the first real token).

    embeddings [B, T, C]; mask [B, T] (True/1 = real token) or None (all
    real); state: what a previous call returned for the tokens before these
    (a decode step continues its prompt). Returns (context [B, T, C], state).
    Why: a small LM's late hidden states blur which made-up name a text is
    about; the tokens themselves do not, and a decayed mean carries the last
    few of them, the name among them, to where a question is answered. It is
    a linear recurrence, so a decode step costs O(C) per token."""
    B, T, C = embeddings.shape
    x = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
    m = x.new_ones(B, T) if mask is None else mask.to(x.dtype)
    total, weight = ((x.new_zeros(B, C), x.new_zeros(B)) if state is None
                     else (state[0].to(x.dtype), state[1].to(x.dtype)))
    if T == 1 and state is not None:  # a decode step: the recurrence itself, a few ops
        real = x[:, 0] if mask is None else x[:, 0] * m[:, 0, None]
        total = decay * total + real
        weight = decay * weight + m[:, 0]
        context = total / weight.clamp(min=1e-20)[:, None] * (weight > 0)[:, None]
        return context[:, None].to(embeddings.dtype), (total, weight)
    out = []
    for start in range(0, T, _CONTEXT_BLOCK):
        L = min(_CONTEXT_BLOCK, T - start)
        within, carried = _decay_weights(L, float(decay), x.dtype, x.device)
        mb = m[:, start:start + L]
        sums = within @ (x[:, start:start + L] * mb[..., None]) + carried[:, None] * total[:, None]
        weights = mb @ within.T + carried * weight[:, None]
        out.append(sums / weights.clamp(min=1e-20)[..., None] * (weights > 0)[..., None])
        total, weight = sums[:, -1], weights[:, -1]
    context = out[0] if len(out) == 1 else torch.cat(out, 1) if out else x.new_zeros(B, 0, C)
    return context.to(embeddings.dtype), (total, weight)


@functools.lru_cache(maxsize=64)
def _decay_weights(L: int, decay: float, dtype: torch.dtype,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """decayed_context's weights for a block of L tokens: within [L, L] (token
    j's weight at token i, decay^(i-j) for j <= i) and carried [L] (what the
    state before the block still weighs at token i). Cached: a decode step
    would otherwise rebuild them for every token."""
    steps = torch.arange(L, device=device, dtype=dtype)
    lag = steps[:, None] - steps[None, :]
    return torch.where(lag >= 0, decay ** lag.clamp(min=0), 0.0), decay ** (steps + 1)
