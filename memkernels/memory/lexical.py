"""What store() wrote, text by text, and a lexical index over it.

`Entries`: the token ids of each text a store() wrote into a fresh one-row
bank and which slots each took (slot-per-token rules: append, copy). With
it, a bank can be cut down to a few of its texts (MemoryBank.select_entries)
and a question can pick those texts by the words it shares with them
(`LexicalIndex`, BM25 over token ids; MemoryBank.lexical_select): the dense
read then picks among a few stored facts, not among 10^5 (docs/design.md,
"A lexical index in front of the read").

BM25 scores words when the texts come with their tokenizer's `WordTable`
(store() through a Hugging Face tokenizer records one): a word is a run of
tokens, its term a hash of its text, case-folded and without its leading
space, so " Paris" and "Paris" (other token ids) are one term and a name's
syllables never match another name's; pairs of consecutive rare words are
terms too, so "Sofia Smith" is told from "Sofia Maja Smith", and where runs
of rare words start and end tells "Gina Barros" from "Beatrice Gina
Barros". Without a table (token ids stored by hand, banks saved before
format 4) the terms are the token ids and their consecutive pairs
(docs/design.md, "A lexical index in front of the read").

The index is inverted (postings per term):
scoring a question touches only the texts that share a token with it, in
one op (memkernels.ops.postings_top, a C++ kernel on the CPU).
rank_bm25 (the recall benchmark's baseline retriever) scores every text for
every query word in Python: at 10^5 texts that is ~0.1 s per question, more
than the whole answer costs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from memkernels.ops.postings import postings_top


# how a token joins words (WordTable's kind column)
CONTINUES_WORD, STARTS_WORD, STANDS_ALONE, NO_TEXT = 0, 1, 2, 3
KIND, ENDS_WORD, LENGTH, HASH1, HASH2 = range(5)  # WordTable's columns
# a word's term: two polynomial hashes of its characters, mod two primes below
# 2^31 (products fit int64, a hash fits int32), packed as hash1 * 2^31 + hash2
_PRIMES = (2_147_483_647, 2_147_483_629)
_BASE = 1_000_003
_MAX_TOKEN_CHARS = 1 << 16
# scripts written without spaces between words (CJK, kana, Thai, Lao, Myanmar,
# Khmer): a token of them is a word of its own, not the start of a long run
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff"
                       "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _string_hash(text: str, prime: int) -> int:
    h = 0
    for c in text:
        h = (h * _BASE + ord(c)) % prime
    return h


def word_term(word: str) -> int:
    """The term of one word (its text as the index keeps it: case-folded,
    without whitespace or the punctuation around it), as WordTable.terms
    makes it from the word's tokens."""
    text = word.casefold()
    return _string_hash(text, _PRIMES[0]) * (1 << 31) + _string_hash(text, _PRIMES[1])


def _power_mod(exponent: Tensor, prime: int) -> Tensor:
    """_BASE ** exponent mod prime, elementwise (int64; square and multiply)."""
    result = torch.ones_like(exponent)
    base = torch.full_like(exponent, _BASE % prime)
    e = exponent.clone()
    while bool((e > 0).any()):
        odd = (e & 1) == 1
        result = torch.where(odd, result * base % prime, result)
        base = base * base % prime
        e >>= 1
    return result


# _BASE^k for the short words that nearly all are (read-only once built)
_SHORT = 256
_SHORT_POWERS = tuple(torch.tensor([pow(_BASE, k, p) for k in range(_SHORT)], dtype=torch.long)
                      for p in _PRIMES)


@dataclass(frozen=True)
class WordTable:
    """How a tokenizer's token ids make words, for a lexical index over words.
    table: int32 [V, 5], per token id: its kind (CONTINUES_WORD: text that
    goes on the word before it; STARTS_WORD: after whitespace or punctuation;
    STANDS_ALONE: punctuation only, a term of its own; NO_TEXT: whitespace or
    a special token, no term), whether a word ends with it (punctuation after
    its letters, as SentencePiece merges "h?"; a token of a script written
    without spaces), then the length and two hashes of its text: case-folded,
    without whitespace, and without the punctuation before and after its
    letters and digits. A word's term hashes the concatenated text of its
    tokens, so a word split into tokens anywhere between its letters has one
    term (punctuation inside one token stays in the word: "a-b" as one token
    is one word, as three tokens two words and a mark)."""
    table: Tensor

    @staticmethod
    def from_pieces(pieces: Sequence[Optional[str]]) -> "WordTable":
        """From each token id's text as it decodes after a letter (its leading
        space kept); None: a special token. A piece holding U+FFFD (a byte of
        a character split across tokens) cannot be read as text: it is kept
        as its id (the same bytes, tokenized the same way, match)."""
        rows = []
        for token_id, piece in enumerate(pieces):
            text = (piece or "").strip().casefold()[:_MAX_TOKEN_CHARS - 1]
            alnum = [i for i, c in enumerate(text) if c.isalnum()]
            ends = False
            if not text:
                kind = NO_TEXT
            elif "\ufffd" in text:
                kind = STARTS_WORD if piece[0].isspace() else CONTINUES_WORD
                text = f"\x00{token_id}\x00"
            elif not alnum:
                kind = STANDS_ALONE
            else:
                kind = CONTINUES_WORD if piece[0].isalnum() else STARTS_WORD
                ends = alnum[-1] < len(text) - 1
                text = text[alnum[0]:alnum[-1] + 1]
                if _UNSPACED.search(text):
                    kind, ends = STARTS_WORD, True
            rows.append((kind, int(ends), len(text), _string_hash(text, _PRIMES[0]),
                         _string_hash(text, _PRIMES[1])))
        return WordTable(torch.tensor(rows, dtype=torch.int32).reshape(-1, 5))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def check(self) -> None:
        t = self.table
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 2 \
                or t.shape[1] != 5:
            raise ValueError(f"word table: must be an int32 [V, 5] tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.numel() and (int(t[:, KIND].min()) < CONTINUES_WORD
                          or int(t[:, KIND].max()) > NO_TEXT
                          or int(t[:, ENDS_WORD].min()) < 0 or int(t[:, ENDS_WORD].max()) > 1
                          or int(t[:, LENGTH].min()) < 0
                          or int(t[:, LENGTH].max()) >= _MAX_TOKEN_CHARS
                          or int(t[:, HASH1:].min()) < 0 or int(t[:, HASH1].max()) >= _PRIMES[0]
                          or int(t[:, HASH2].max()) >= _PRIMES[1]):
            raise ValueError(f"word table: kinds must be in [0, 3], word ends 0 or 1, lengths "
                             f"in [0, {_MAX_TOKEN_CHARS}), hashes below their primes")

    def terms(self, tokens: Tensor, text_of_token: Tensor) -> tuple[Tensor, Tensor]:
        """(term, text) of every word in `tokens` (int64 [n]), words never
        crossing from one text (text_of_token, int64 [n]) into the next. A
        run of CONTINUES_WORD tokens after a STARTS_WORD one is a word (up to
        a token that ends one); a STANDS_ALONE token is a word alone. Ids
        outside the table (a question's) have no text and end a word."""
        V = self.vocab_size
        valid = (tokens >= 0) & (tokens < V)
        row = self.table[tokens.clamp(0, max(V - 1, 0))].to(torch.long) if V else \
            torch.zeros(tokens.numel(), 5, dtype=torch.long)
        kind = torch.where(valid, row[:, KIND], NO_TEXT)
        start = kind != CONTINUES_WORD
        start[1:] |= (kind[:-1] >= STANDS_ALONE) | (row[:-1, ENDS_WORD] == 1) | \
            (text_of_token[1:] != text_of_token[:-1])
        if start.numel():
            start[0] = True
        kept = kind != NO_TEXT
        row, start, text_of_token = row[kept], start[kept], text_of_token[kept]
        if not row.shape[0]:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        word = start.cumsum(0) - 1
        first = start.nonzero().flatten()
        length = row[:, LENGTH]
        # characters after each token within its word: the power of the base
        # its hash is scaled by in the word's hash (Horner over the word's text)
        through = length.cumsum(0)
        word_end = through.new_zeros(first.numel()).index_add_(0, word, length) + \
            (through[first] - length[first])
        after = word_end[word] - through
        short = bool((after < _SHORT).all())
        term = torch.zeros(first.numel(), dtype=torch.long)
        for column, prime, table in zip((HASH1, HASH2), _PRIMES, _SHORT_POWERS):
            powers = table[after] if short else _power_mod(after, prime)
            h = torch.zeros(first.numel(), dtype=torch.long).index_add_(
                0, word, row[:, column] * powers % prime) % prime
            term = term * (1 << 31) + h
        return term, text_of_token[first]


@dataclass(frozen=True)
class Entries:
    """tokens: the token ids of every text, concatenated (int64 [total]);
    offsets: where text e's ids start, int64 [E + 1]; slot_entry: the text
    each slot of the bank holds a token of, int64 [S], -1 for none (empty
    and null slots); words: the tokenizer's WordTable (None: the lexical
    index scores token ids)."""
    tokens: Tensor
    offsets: Tensor
    slot_entry: Tensor
    words: Optional[WordTable] = None

    @staticmethod
    def from_texts(token_ids: Sequence[Sequence[int]], slot_entry: Tensor,
                   words: Optional[WordTable] = None) -> "Entries":
        lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
        offsets = torch.zeros(len(token_ids) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        tokens = torch.tensor([i for t in token_ids for i in t], dtype=torch.long)
        return Entries(tokens, offsets, slot_entry.to(torch.long).cpu(), words)

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
        if self.words is not None:
            if not isinstance(self.words, WordTable):
                raise ValueError(f"entries: words must be a WordTable or None, got "
                                 f"{type(self.words).__name__}")
            self.words.check()
            V = self.words.vocab_size
            if self.tokens.numel() and (int(self.tokens.min()) < 0
                                        or int(self.tokens.max()) >= V):
                raise ValueError(f"entries: token ids must lie in [0, {V}) (the word table's "
                                 f"vocabulary)")

    def subset(self, chosen: Tensor, slot_order: Tensor) -> "Entries":
        """The entries `chosen` (renumbered 0..k-1 in that order) for the slots
        `slot_order` of this bank (the kept slots, in their new order)."""
        renumber = torch.full((len(self),), -1, dtype=torch.long)
        renumber[chosen] = torch.arange(chosen.numel())
        old = self.slot_entry[slot_order]
        slot_entry = torch.where(old >= 0, renumber[old.clamp(min=0)], old)
        return Entries.from_texts([self.text(int(e)) for e in chosen], slot_entry, self.words)


def _terms(tokens: Tensor, words: Optional[WordTable] = None,
           text_of_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(term, text of term) of the texts' tokens (text_of_token: the text
    each token belongs to, default all one). With a word table, the words'
    terms; without, the token ids and their pairs of consecutive ids within a
    text (as one id past every token id: a name of several sub-word tokens
    then has a term of its own)."""
    tokens = tokens.to(torch.long)
    if text_of_token is None:
        text_of_token = torch.zeros_like(tokens)
    if words is not None:
        return words.terms(tokens, text_of_token)
    same_text = text_of_token[1:] == text_of_token[:-1]
    pairs = ((tokens[:-1] + 1) * _PAIR_BASE + tokens[1:])[same_text]
    return (torch.cat([tokens, pairs]),
            torch.cat([text_of_token, text_of_token[:-1][same_text]]))


_PAIR_BASE = 1 << 24  # above any vocabulary's token ids
_WORD_PAIR_BASE = 1 << 62  # above any word's term (two 31-bit hashes)

# MemoryBank.lexical_select's defaults, chosen on the recall benchmark's dev
# phrasings (docs/performance.md, "A lexical index in front of the read";
# "Common words out of the selection"): the best text and its near ties, at
# most 3, scored on the question's terms that at most a tenth of the texts hold
LEXICAL_K = 3
LEXICAL_MIN_SCORE_RATIO = 0.9
LEXICAL_MAX_DF = 0.1
# a pair of consecutive words counts while both its words are in at most this
# share of the texts: a family name that a tenth of the facts share still makes
# a rare pair with the first name before it ("Nina Horvat")
LEXICAL_PAIR_MAX_DF = 0.2
# of the texts chosen, keep those where the question's names stand whole
# (LexicalIndex.top's prefer_whole_runs)
LEXICAL_PREFER_WHOLE_RUNS = True
# a term held by this many texts or fewer always counts, whatever the share:
# in a small bank every term is in a large share of it
LEXICAL_MAX_DF_FLOOR = 10


def _run_edges(word: np.ndarray, rare: np.ndarray, joined: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The run-edge terms of a sequence of words and where each is: a run of
    rare words (word i and i + 1 one run where joined[i]) starts at a word w
    (term -1 - 2w) and ends at one (-2 - 2w). Negative, so that they never
    meet a word's term (a 62-bit hash) or a pair's (above it)."""
    starts, ends = rare.copy(), rare.copy()
    starts[1:] &= ~joined
    ends[:-1] &= ~joined
    at = np.concatenate([np.flatnonzero(starts), np.flatnonzero(ends)])
    return np.concatenate([-1 - 2 * word[starts], -2 - 2 * word[ends]]), at


class LexicalIndex:
    """Okapi BM25 over a bank's stored texts (k1, b as usual), its terms
    their words (with the entries' WordTable) or token ids and pairs, as an
    inverted index: per term, the texts holding it and how often. Over
    words it also keeps where each text's runs of rare words (in at most
    run_max_df of the texts) start and end, which top() uses to prefer the
    texts where a question's name stands whole; they are not BM25 terms."""

    def __init__(self, entries: Entries, k1: float = 1.5, b: float = 0.75,
                 run_max_df: float = LEXICAL_MAX_DF):
        self.size = len(entries)
        self.words = entries.words
        text_of_token = torch.repeat_interleave(torch.arange(self.size),
                                                entries.offsets[1:] - entries.offsets[:-1])
        terms, text_of_term = _terms(entries.tokens, self.words, text_of_token)
        edges = edge_text = torch.zeros(0, dtype=torch.long)
        # rare words (held by at most this many texts) make runs: a name. No floor,
        # unlike the question's terms: in a bank of 10 texts every word is in at
        # most 10, and the runs would be whole sentences
        self._run_limit = run_max_df * self.size
        if self.words is not None:
            # pairs of consecutive words within a text: "Sofia Smith" is a term
            # "Sofia Maja Smith" does not hold (a question counts a pair only
            # when both its words are rare: _query_terms)
            self._word_vocab, word = torch.unique(terms, return_inverse=True)
            same_text = text_of_term[1:] == text_of_term[:-1]
            pairs = _WORD_PAIR_BASE + (word[:-1] + 1) * (self._word_vocab.numel() + 1) + word[1:]
            # where each run of rare words starts and ends: "Gina Barros" starts
            # a run in its own fact, not in "Beatrice Gina Barros"'s
            n = max(self.size, 1)
            word_df = torch.bincount(torch.unique(word * n + text_of_term) // n,
                                     minlength=self._word_vocab.numel())
            rare = word_df[word] <= self._run_limit
            joined = same_text & rare[:-1] & rare[1:]
            edges, edge_text = _run_edges(word.numpy(), rare.numpy(), joined.numpy())
            edges, edge_text = torch.from_numpy(edges), text_of_term[edge_text]
            terms = torch.cat([terms, pairs[same_text]])
            text_of_term = torch.cat([text_of_term, text_of_term[:-1][same_text]])
        # a text's length and the idf floor count its words and pairs, not its run
        # edges: scores() stays BM25 over words and pairs
        lengths = torch.bincount(text_of_term, minlength=self.size).to(torch.float64)
        terms = torch.cat([terms, edges])
        text_of_term = torch.cat([text_of_term, edge_text])
        # term ids renumbered 0..V-1 (a word's or pair's id is large), one posting per
        # (term, text) pair with its count, sorted by term
        self.vocab, term = torch.unique(terms, return_inverse=True)
        pairs, tf = torch.unique(term * self.size + text_of_term, return_counts=True)
        term, self.post_text = pairs // max(self.size, 1), pairs % max(self.size, 1)
        df = torch.bincount(term, minlength=self.vocab.numel())
        self.starts = torch.zeros(self.vocab.numel() + 1, dtype=torch.long)
        self.starts[1:] = df.cumsum(0)
        self._starts = self.starts.tolist()  # read per query term: ints, not tensor items
        self._starts_np = self.starts.numpy()
        # a question's ~20 terms are looked up with numpy (a few small ATen
        # ops cost more; a dict of the vocabulary would take ~100 bytes a term)
        self._vocab = self.vocab.numpy()
        # idf as rank_bm25's BM25Okapi (log((N - df + 0.5) / (df + 0.5)), floored
        # at eps * the mean idf) so that the recall benchmark's baseline and this
        # index rank alike
        n = float(self.size)
        idf = torch.log((n - df.double() + 0.5) / (df.double() + 0.5))
        edge = self.vocab < 0  # run edges are the negative ids: no BM25 score
        present = (df > 0) & ~edge
        floor = 0.25 * float(idf[present].mean()) if bool(present.any()) else 0.0
        self.idf = torch.where(edge, 0.0, torch.where(idf < 0, floor, idf))
        avg = float(lengths.mean()) if self.size else 1.0
        norm = k1 * (1 - b + b * lengths / max(avg, 1e-9))
        tf = tf.double()
        # each posting's whole score, precomputed: idf x tf (k1 + 1) / (tf + norm)
        # (a question then adds its terms' postings, nothing more)
        self.post_score = self.idf[term] * tf * (k1 + 1) / (tf + norm[self.post_text])

    def _lookup(self, terms: np.ndarray) -> np.ndarray:
        """Each term's index into vocab, -1 where no text holds it."""
        if not len(self._vocab):
            return np.full(len(terms), -1, dtype=np.int64)
        where = np.searchsorted(self._vocab, terms).clip(max=len(self._vocab) - 1)
        return np.where(self._vocab[where] == terms, where, -1)

    def _query_words(self, query_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The query's terms (words, or token ids and pairs) and each one's
        index into vocab, -1 where no text holds it."""
        ids = torch.tensor([int(i) for i in query_ids], dtype=torch.long)
        terms = _terms(ids, self.words)[0].numpy()  # ids past the table end a word
        return terms, self._lookup(terms)

    def _query_terms(self, terms: np.ndarray, found: np.ndarray,
                     pair_max_df: Optional[float] = None) -> Tensor:
        """The query's terms that some text holds (its words or token ids:
        _query_words), as indices into vocab (a term as often as the query
        has it), int64. Over words, the pairs of consecutive words too, those
        whose words at most pair_max_df texts hold (None: all): a phrasing's
        common word beside a name ("with Felezath") would favour the texts
        stated that way."""
        if self.words is not None and len(terms) > 1:
            word, held, df = self._held_words(terms, found)
            both = held[:-1] & held[1:]
            if pair_max_df is not None:
                both &= (df[:-1] <= pair_max_df) & (df[1:] <= pair_max_df)
            vocab_size = self._word_vocab.numel()
            pairs = _WORD_PAIR_BASE + (word[:-1] + 1) * (vocab_size + 1) + word[1:]
            found = np.concatenate([found, self._lookup(pairs[both])])
        return torch.from_numpy(found[found >= 0])

    def _held_words(self, terms: np.ndarray, found: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query word: its index into the words' vocabulary, whether a
        text holds it, and how many texts do."""
        vocab = self._word_vocab.numpy()
        word = np.searchsorted(vocab, terms).clip(max=max(len(vocab) - 1, 0))
        held = found >= 0
        return word, held, np.where(held, self._starts_np[found + 1] - self._starts_np[found], 0)

    def _query_run_edges(self, terms: np.ndarray, found: np.ndarray) -> Tensor:
        """Where the query's runs of rare words (its words: _query_words)
        start and end (rare as the index counts them for its texts: some text
        holds the word, at most _run_limit do; a word no text holds ends a
        run), as indices into vocab of the edges some text holds; empty over
        token ids."""
        if self.words is None:
            return torch.zeros(0, dtype=torch.long)
        word, held, df = self._held_words(terms, found)
        rare = held & (df <= self._run_limit)
        found = self._lookup(_run_edges(word, rare, rare[:-1] & rare[1:])[0])
        return torch.from_numpy(found[found >= 0])

    def _prefer_whole_runs(self, chosen: Tensor, terms: np.ndarray,
                           found: np.ndarray) -> Tensor:
        """Of the chosen texts, those that hold the most of the query's run
        edges, in their order: "Gina Barros" is a whole run in its own fact
        and part of one in "Beatrice Gina Barros"'s, which ties with it on
        every word and pair."""
        if chosen.numel() < 2:
            return chosen
        edges = self._query_run_edges(terms, found)
        if not edges.numel():
            return chosen
        held = torch.zeros(chosen.numel(), dtype=torch.long)
        for i in edges.tolist():
            held += torch.isin(chosen, self.post_text[self._starts[i]:self._starts[i + 1]])
        return chosen[held == held.max()]

    def scores(self, query_ids: Sequence[int]) -> Tensor:
        """BM25 score of every text for the query (float64 [E]); a query token
        counts once per occurrence, as BM25Okapi does."""
        out = torch.zeros(self.size, dtype=torch.float64)
        for i in self._query_terms(*self._query_words(query_ids)).tolist():
            lo, hi = self._starts[i], self._starts[i + 1]
            out.index_add_(0, self.post_text[lo:hi], self.post_score[lo:hi])
        return out

    def top(self, query_ids: Sequence[int], k: int, min_score_ratio: float = 0.0,
            max_df: float = 1.0, pair_max_df: Optional[float] = None,
            prefer_whole_runs: bool = False) -> Tensor:
        """The k texts of highest score, best first (equal scores: the text
        stored first), among those sharing a term with the query (fewer, or
        none, when fewer do) and scoring at least min_score_ratio x the best
        score (1.0: the best and its exact ties). Terms held by more than
        max_df of the texts (and by more than LEXICAL_MAX_DF_FLOOR) do not
        count, unless no other term would (max_df as scikit-learn's
        vectorizers: corpus-specific stop words). Over words, a pair of
        consecutive words counts where both its words are in at most
        pair_max_df of the texts (None: max_df; 1.0: every pair). One op over
        the postings of the query's terms (memkernels.ops.postings_top).
        prefer_whole_runs: of the texts so chosen, keep those holding the most
        of the query's run edges, so that a name is told from a longer name
        that holds it ("Gina Barros", "Beatrice Gina Barros"):
        _prefer_whole_runs."""
        limit = max(max_df * self.size, LEXICAL_MAX_DF_FLOOR)
        pair_share = max_df if pair_max_df is None else pair_max_df
        pair_limit = max(pair_share * self.size, LEXICAL_MAX_DF_FLOOR) \
            if pair_share < 1.0 else None
        words, found = self._query_words(query_ids)
        terms = self._query_terms(words, found, pair_limit)
        if max_df < 1.0 and terms.numel():
            df = self.starts[terms + 1] - self.starts[terms]
            # word pairs were chosen by their words' shares above
            rare = (df <= limit) | (self.vocab[terms] >= _WORD_PAIR_BASE)
            # a question of common words only is scored on them all: BM25's
            # idf still ranks them
            if bool(rare.any()):
                terms = terms[rare]
        chosen = postings_top(self.starts, self.post_text, self.post_score, self.size,
                              terms, k, min_score_ratio)
        return self._prefer_whole_runs(chosen, words, found) if prefer_whole_runs else chosen
