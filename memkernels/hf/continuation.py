"""Keeping a copied answer on the stored text it copies: a logits processor
for `model.generate`.

The copy rule reads, at every answer token, which slot holds the next token
(memkernels.memory.copy). A read that finds the right fact can still lose its
place inside a long new word: "Likotoreth" comes out as "Lik" (the read went
to the period), "Bematoter" as "Bemater" (a slot skipped). Once the tokens
generated so far are a run of a stored text, that text says what comes next.
StoredTextContinuation looks the generated tokens up in the bank's stored
texts (MemoryBank.entries, the token ids store() keeps for the lexical index)
and, where the longest run that matches has one continuation, moves `weight`
of the distribution onto it (docs/design.md, "Keeping a copy in place").

Only tokens generated in this call count (never the prompt's: a question's
":" would match a statement's), so the first answer token is the read's alone.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from memkernels.memory.bank import MemoryBank
from memkernels.memory.lexical import Entries


# above 0.5, so that a greedy decode follows the text; chosen on the recall benchmark's dev
# split (docs/performance.md, "Keeping a copy in place")
DEFAULT_WEIGHT = 0.6


class StoredTextContinuation:
    """A `logits_processor` for transformers' `generate` (any callable of
    (input_ids [B, L], scores [B, V]) -> scores): with the continuation c of
    the generated tokens in the texts `bank` stored (its entries, or
    Entries), p' = (1 - weight) p + weight [y = c], returned as log p'.
    weight 0 changes nothing; above 0.5 a greedy decode always follows the
    stored text where one continues it (DEFAULT_WEIGHT, 0.6, leaves the model
    40% when sampling at temperature 1 without top-k/top-p: generate applies
    those after the processors given to it).

    max_run: the longest run of generated tokens looked up (a longer match
    changes nothing once a run is unique). The prompt's length is taken from
    the first call and from any call that does not add one token to the
    last, so one processor serves generate calls in turn; give each call its
    own where a new prompt may be one token longer than the last sequence."""

    def __init__(self, bank: Union[MemoryBank, Entries], weight: float = DEFAULT_WEIGHT,
                 max_run: int = 16):
        if not isinstance(bank, (MemoryBank, Entries)):
            raise TypeError(f"bank must be a MemoryBank (or its Entries), got "
                            f"{type(bank).__name__}")
        entries = bank.entries if isinstance(bank, MemoryBank) else bank
        if entries is None:
            raise ValueError("bank holds no stored texts (MemoryBank.entries): a one-row bank "
                             "that store() just filled keeps them")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
        if isinstance(max_run, bool) or not isinstance(max_run, int) or max_run < 1:
            raise ValueError(f"max_run must be a positive int, got {max_run!r}")
        self.weight, self.max_run = float(weight), max_run
        self._tokens = entries.tokens
        # per token position: whether a token follows it in the same text
        ends = torch.zeros(entries.tokens.numel(), dtype=torch.bool)
        ends[(entries.offsets[1:] - 1)[entries.offsets[1:] > entries.offsets[:-1]]] = True
        self._has_next = ~ends
        self._text_start = torch.repeat_interleave(entries.offsets[:-1],
                                                   entries.offsets[1:] - entries.offsets[:-1])
        self._prompt_length: Optional[int] = None
        self._last_length: Optional[int] = None

    def continuation(self, generated: list[int]) -> Optional[int]:
        """The token that follows the longest run of `generated`'s last tokens
        found in a stored text, when every place that run occurs agrees; None
        otherwise (no run found, or places that disagree)."""
        if not generated:
            return None
        tokens = self._tokens
        # positions p of the last generated token that a token follows in its text
        places = ((tokens == generated[-1]) & self._has_next).nonzero().flatten()
        for back in range(1, min(len(generated), self.max_run)):
            if places.numel() == 0:
                break
            start = places - back
            longer = places[(start >= self._text_start[places])]
            longer = longer[tokens[longer - back] == generated[-1 - back]]
            if longer.numel() == 0:
                break  # the longest run that matches is `back` tokens: keep its places
            places = longer
        following = tokens[places + 1].unique() if places.numel() else places
        return int(following[0]) if following.numel() == 1 else None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if self._last_length is None or length != self._last_length + 1:
            self._prompt_length = length  # a new generate call: its prompt
        self._last_length = length
        if self.weight == 0.0 or input_ids.shape[1] <= self._prompt_length:
            return scores
        generated = input_ids[:, self._prompt_length:].tolist()
        rows, targets = [], []
        for b, row in enumerate(generated):
            c = self.continuation(row)
            if c is not None and c < scores.shape[-1]:
                rows.append(b)
                targets.append(c)
        if not rows:
            return scores
        out = scores.clone()
        dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16 logits: mixed in float32
        log_p = torch.log_softmax(scores[rows].to(dtype), dim=-1)
        # log((1 - w) p + w [y = c]) in log space: p's small entries do not underflow
        follow = torch.full_like(log_p, float("-inf"))
        follow[torch.arange(len(rows)), torch.tensor(targets)] = math.log(self.weight)
        mixed = torch.logaddexp(log_p + math.log1p(-self.weight) if self.weight < 1.0
                                else torch.full_like(log_p, float("-inf")), follow)
        out[rows] = mixed.to(scores.dtype)
        return out
