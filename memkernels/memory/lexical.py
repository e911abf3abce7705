"""What store() wrote, text by text, and a lexical index over it.

`Entries`: the token ids of each text a store() wrote into a fresh one-row
bank and which slots each took (slot-per-token rules: append, copy). With
it, a bank can be cut down to a few of its texts (MemoryBank.select_entries)
and a question can pick those texts by the words it shares with them
(`LexicalIndex`, BM25 over token ids; MemoryBank.lexical_select): the dense
read then picks among a few stored facts, not among 10^5 (docs/design.md,
"A lexical index in front of the read").

BM25 here is over token ids with an inverted index (postings per token):
scoring a question touches only the texts that share a token with it, in
one op (memkernels.ops.postings_top, a C++ kernel on the CPU).
rank_bm25 (the recall benchmark's baseline retriever) scores every text for
every query word in Python: at 10^5 texts that is ~0.1 s per question, more
than the whole answer costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from memkernels.ops.postings import postings_top


@dataclass(frozen=True)
class Entries:
    """tokens: the token ids of every text, concatenated (int64 [total]);
    offsets: where text e's ids start, int64 [E + 1]; slot_entry: the text
    each slot of the bank holds a token of, int64 [S], -1 for none (empty
    and null slots)."""
    tokens: Tensor
    offsets: Tensor
    slot_entry: Tensor

    @staticmethod
    def from_texts(token_ids: Sequence[Sequence[int]], slot_entry: Tensor) -> "Entries":
        lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
        offsets = torch.zeros(len(token_ids) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        tokens = torch.tensor([i for t in token_ids for i in t], dtype=torch.long)
        return Entries(tokens, offsets, slot_entry.to(torch.long).cpu())

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def text(self, entry: int) -> list[int]:
        return self.tokens[self.offsets[entry]:self.offsets[entry + 1]].tolist()

    def check(self, num_slots: int) -> None:
        """Raises ValueError unless the tables are consistent with a bank of num_slots."""
        if any(t.dtype != torch.long or t.dim() != 1
               for t in (self.tokens, self.offsets, self.slot_entry)):
            raise ValueError("entries: tokens, offsets and slot_entry must be 1-d int64 tensors")
        E = len(self)
        if E < 0 or int(self.offsets[0]) != 0 or \
                int(self.offsets[-1]) != self.tokens.numel() or \
                bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("entries: offsets must rise from 0 to the number of tokens")
        if self.slot_entry.shape != (num_slots,):
            raise ValueError(f"entries: slot_entry must be [S] = [{num_slots}], got "
                             f"{tuple(self.slot_entry.shape)}")
        if self.slot_entry.numel() and (int(self.slot_entry.min()) < -1
                                        or int(self.slot_entry.max()) >= E):
            raise ValueError(f"entries: slot_entry values must be -1 or a text in [0, {E})")

    def subset(self, chosen: Tensor, slot_order: Tensor) -> "Entries":
        """The entries `chosen` (renumbered 0..k-1 in that order) for the slots
        `slot_order` of this bank (the kept slots, in their new order)."""
        renumber = torch.full((len(self),), -1, dtype=torch.long)
        renumber[chosen] = torch.arange(chosen.numel())
        old = self.slot_entry[slot_order]
        slot_entry = torch.where(old >= 0, renumber[old.clamp(min=0)], old)
        return Entries.from_texts([self.text(int(e)) for e in chosen], slot_entry)


def _terms(tokens: Tensor) -> Tensor:
    """A text's terms: its token ids and its pairs of consecutive ids (as
    one id past every token id). Pairs make a word of several sub-word
    tokens (a name never seen in training) a term of its own."""
    tokens = tokens.to(torch.long)
    pairs = (tokens[:-1] + 1) * _PAIR_BASE + tokens[1:]
    return torch.cat([tokens, pairs])


_PAIR_BASE = 1 << 24  # above any vocabulary's token ids

# MemoryBank.lexical_select's defaults, chosen on the recall benchmark's dev
# phrasings (docs/performance.md, "A lexical index in front of the read";
# "Common words out of the selection"): the best text and its near ties, at
# most 3, scored on the question's terms that at most a tenth of the texts hold
LEXICAL_K = 3
LEXICAL_MIN_SCORE_RATIO = 0.9
LEXICAL_MAX_DF = 0.1
# a term held by this many texts or fewer always counts, whatever the share:
# in a small bank every term is in a large share of it
LEXICAL_MAX_DF_FLOOR = 10


class LexicalIndex:
    """Okapi BM25 over the token ids of a bank's stored texts (k1, b as
    usual), as an inverted index: per token id, the texts holding it and how
    often."""

    def __init__(self, entries: Entries, k1: float = 1.5, b: float = 0.75):
        self.size = len(entries)
        # every text's terms at once: its tokens, and the pairs that do not
        # cross into the next text
        tokens = entries.tokens
        text_of_token = torch.repeat_interleave(torch.arange(self.size),
                                                entries.offsets[1:] - entries.offsets[:-1])
        same_text = text_of_token[1:] == text_of_token[:-1]
        pairs = ((tokens[:-1] + 1) * _PAIR_BASE + tokens[1:])[same_text]
        terms = torch.cat([tokens, pairs])
        text_of_term = torch.cat([text_of_token, text_of_token[:-1][same_text]])
        lengths = torch.bincount(text_of_term, minlength=self.size).to(torch.float64)
        # term ids renumbered 0..V-1 (a bigram's id is large), one posting per
        # (term, text) pair with its count, sorted by term
        self.vocab, term = torch.unique(terms, return_inverse=True)
        pairs, tf = torch.unique(term * self.size + text_of_term, return_counts=True)
        term, self.post_text = pairs // max(self.size, 1), pairs % max(self.size, 1)
        df = torch.bincount(term, minlength=self.vocab.numel())
        self.starts = torch.zeros(self.vocab.numel() + 1, dtype=torch.long)
        self.starts[1:] = df.cumsum(0)
        self._starts = self.starts.tolist()  # read per query term: ints, not tensor items
        # a question's ~20 terms are looked up with numpy (a few small ATen
        # ops cost more; a dict of the vocabulary would take ~100 bytes a term)
        self._vocab = self.vocab.numpy()
        # idf as rank_bm25's BM25Okapi (log((N - df + 0.5) / (df + 0.5)), floored
        # at eps * the mean idf) so that the recall benchmark's baseline and this
        # index rank alike
        n = float(self.size)
        idf = torch.log((n - df.double() + 0.5) / (df.double() + 0.5))
        present = df > 0
        floor = 0.25 * float(idf[present].mean()) if bool(present.any()) else 0.0
        self.idf = torch.where(idf < 0, torch.full_like(idf, floor), idf)
        avg = float(lengths.mean()) if self.size else 1.0
        norm = k1 * (1 - b + b * lengths / max(avg, 1e-9))
        tf = tf.double()
        # each posting's whole score, precomputed: idf x tf (k1 + 1) / (tf + norm)
        # (a question then adds its terms' postings, nothing more)
        self.post_score = self.idf[term] * tf * (k1 + 1) / (tf + norm[self.post_text])

    def _query_terms(self, query_ids: Sequence[int]) -> Tensor:
        """The query's terms that some text holds, as indices into vocab (a
        term as often as the query has it), int64."""
        ids = [int(i) for i in query_ids]
        terms = np.array(ids + [(a + 1) * _PAIR_BASE + b for a, b in zip(ids, ids[1:])],
                         dtype=np.int64)  # as _terms
        where = np.searchsorted(self._vocab, terms).clip(max=max(len(self._vocab) - 1, 0))
        if not len(self._vocab):
            return torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(where[self._vocab[where] == terms])

    def scores(self, query_ids: Sequence[int]) -> Tensor:
        """BM25 score of every text for the query (float64 [E]); a query token
        counts once per occurrence, as BM25Okapi does."""
        out = torch.zeros(self.size, dtype=torch.float64)
        for i in self._query_terms(query_ids).tolist():
            lo, hi = self._starts[i], self._starts[i + 1]
            out.index_add_(0, self.post_text[lo:hi], self.post_score[lo:hi])
        return out

    def top(self, query_ids: Sequence[int], k: int, min_score_ratio: float = 0.0,
            max_df: float = 1.0) -> Tensor:
        """The k texts of highest score, best first (equal scores: the text
        stored first), among those sharing a term with the query (fewer, or
        none, when fewer do) and scoring at least min_score_ratio x the best
        score (1.0: the best and its exact ties). Terms held by more than
        max_df of the texts (and by more than LEXICAL_MAX_DF_FLOOR) do not
        count, unless no other term would (max_df as scikit-learn's
        vectorizers: corpus-specific stop words). One op over the postings of
        the query's terms (memkernels.ops.postings_top)."""
        terms = self._query_terms(query_ids)
        if max_df < 1.0 and terms.numel():
            df = self.starts[terms + 1] - self.starts[terms]
            rare = df <= max(max_df * self.size, LEXICAL_MAX_DF_FLOOR)
            # a question of common words only is scored on them all: BM25's
            # idf still ranks them
            if bool(rare.any()):
                terms = terms[rare]
        return postings_top(self.starts, self.post_text, self.post_score, self.size,
                            terms, k, min_score_ratio)
