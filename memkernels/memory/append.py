"""The append rule, MemoryConfig(write_rule="append"): one slot per written
token, found by an MLP address and a cosine read.

Why (docs/design.md, "Two write rules"): the blend write lets every slot
attend over all tokens of a write, so facts blur together; and a linear query
against keys linear in the slot content finds a question's statement among
100 about a third of the time on the recall base LM, where two MLPs find it
91% of the time.

Bank layout, P = num_heads / 2 pairs of heads:
- heads [0, P): a slot's address, tanh(MLP(norm(h_t))) from the write layer's
  state of token t: who and what the context is about there (with
  AppendOptions.context_decay, MLP([norm(h_t), c_t]), c_t the decayed mean
  of the embeddings so far: memkernels.memory.context; with
  AppendOptions.lookahead, h_{t+1} beside them: what the slot stores, which
  a write sees and the LM at t did not);
- heads [P, 2P): its content, tanh(W_v norm(e_{t+1})) from the value states
  (MemoryConfig.values_from) of the token after t: what came next (zero
  where padding comes next).

A write puts a row's real tokens, in order, into its first empty slots (with
AppendOptions.store_threshold > 0 only those a learned store gate keeps; an
empty slot is all zeros; a fresh bank is empty but for null_slots learned
defaults at its end, the "nothing stored" answer). A read sees the non-empty
slots only: keys are slot_key . address (unit length), values slot_value .
content; each reader has 2P query heads from an MLP (unit length; its input
is [norm(h_t), c_t] with a context); heads p and P + p both read pair p,
scored cosine x read_scale.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkernels.memory import fused
from memkernels.memory.bank import Int8Rows, MemoryBank
from memkernels.memory.base import MemoryModel
from memkernels.memory.blend import per_head_identity
from memkernels.memory.cache import Versioned, cached
from memkernels.memory.config import MemoryConfig
from memkernels.ops import memory_read


class Standardize(nn.Module):
    """x -> (x - mean) / std per feature, with statistics fitted once from data
    (fit) and then fixed; the identity until fitted. Hidden states share a
    large mean direction that an RMS norm keeps; centred and scaled inputs let
    the MLP's first layer spend its width on what tells tokens apart."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if flat.shape[0] < 2:
            raise ValueError(f"Standardize.fit needs at least 2 rows, got {flat.shape[0]}")
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0) + 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(Standardize(width_in), nn.Linear(width_in, hidden), nn.GELU(),
                         nn.Linear(hidden, width_out))


def address_nll(queries: Tensor, keys: Tensor, targets: Tensor, scale: float) -> Tensor:
    """Mean -log of the weight a read puts on each query's target slot, in the
    read's own geometry: cosine x scale per head, softmax over the slots per
    head, weights averaged over heads. queries [A, P, Dh], keys [K, P, Dh]
    (unit length, as AppendMemory.address_keys gives them), targets [A]
    (indices into K)."""
    scores = torch.einsum("apd,kpd->apk", F.normalize(queries, dim=-1), keys) * scale
    # the target's log-weight per head, then averaged over heads in log space
    per_head = scores.log_softmax(-1).gather(2, targets[:, None, None].expand(-1, queries.shape[1], 1))
    return -(torch.logsumexp(per_head[..., 0], dim=1) - math.log(queries.shape[1])).mean()


def address_contrastive(queries: Tensor, keys: Tensor, targets: Tensor,
                        temperature: float) -> Tensor:
    """Cross-entropy of each query against all keys, its target the right one,
    scored by the cosine over all heads at once / temperature (InfoNCE; the
    joint training's address loss, TrainConfig.address_loss). queries [A, P, Dh],
    keys [K, P, Dh] (raw: AppendReader.raw_queries, AppendMemory.raw_address_keys),
    targets [A] (indices into K)."""
    scores = F.normalize(queries.flatten(1), dim=-1) @ F.normalize(keys.flatten(1), dim=-1).T
    return F.cross_entropy(scores / temperature, targets)


class QueryReader(nn.Module):
    """What the append and copy readers share: a query MLP of norm(h) (and
    the context beside it, with AppendOptions.context_decay), read_scale."""

    def __init__(self, config: MemoryConfig, query_width: int):
        super().__init__()
        self.pairs, self.head_dim = config.num_heads // 2, config.head_dim
        self.scale = float(config.append.read_scale)
        self.uses_context = bool(config.append.context_decay)
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.query = _mlp(config.hidden_size * (2 if self.uses_context else 1),
                          config.append.mlp_hidden, query_width)
        self.backend = config.backend
        self._folded: Optional[Versioned] = None

    def query_weight_sources(self) -> tuple[Tensor, ...]:
        """The tensors the folded query weights come from."""
        standardize, first, second = self.query[0], self.query[1], self.query[3]
        return (self.norm.weight, standardize.mean, standardize.std, first.weight, first.bias,
                second.weight, second.bias)

    def fold_query(self, norm_w, mean, std, w_first, b_first, w_second,
                   b_second) -> tuple[Tensor, ...]:
        """(w1, b1, w2, b2, w1_context) of the query MLP for reads without
        gradients: the norm's weight and the Standardize statistics folded
        into its first layer (exact up to rounding), so a decode step runs
        2 fewer elementwise passes. With a context, w1 is the first layer's
        columns for norm(h) and w1_context those for the context (else None)."""
        C = norm_w.shape[0]
        w = w_first / std[None, :]  # (x - mean) / std, then W1
        b1 = b_first - w @ mean
        w1 = (w[:, :C] * norm_w[None, :]).contiguous()  # x * norm_w
        w1_context = w[:, C:].contiguous() if self.uses_context else None
        return w1, b1, w_second, b_second, w1_context

    def layer_arguments(self, w1, b1, w2, b2, out_w, w1_context, keys, values, key_scale,
                        value_scale) -> tuple[tuple, dict]:
        """(args, kwargs) after `hidden` of the fused reading layer from folded
        weights (with a context, the call adds context=, per call)."""
        kwargs = dict(mlp_w=w1, mlp_b=b1, query_b=b2, unit_queries=True)
        if self.uses_context:
            kwargs["context_w"] = w1_context
        return ((w2, keys, values, out_w, self.norm.eps, self.scale, key_scale, value_scale),
                kwargs)

    def query_input(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """What the query MLP reads: norm(h), and the context beside it."""
        if not self.uses_context:
            return self.norm(hidden)
        if context is None:
            raise ValueError("this reader keys on the context (AppendOptions.context_decay > 0): "
                             "pass context")
        return torch.cat([self.norm(hidden), context.to(hidden.dtype)], -1)


class AppendReader(QueryReader):
    """One reading layer: h <- h + tanh(gate) * W_o(read(MLP(norm(h))))
    (MLP([norm(h), context]) with AppendOptions.context_decay)."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config, config.width)
        self.out = nn.Linear(config.width, config.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.full((config.hidden_size,), float(config.gate_init)))

    def queries(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, 2, P, Dh], unit length: copy c of pair p is query head c * P + p."""
        B, T, _ = hidden.shape
        q = self.query(self.query_input(hidden, context)).view(B, T, 2, self.pairs, self.head_dim)
        return F.normalize(q, dim=-1)

    def raw_queries(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, P, Dh]: copy 0 of each pair's query, before normalisation."""
        B, T, _ = hidden.shape
        q = self.query(self.query_input(hidden, context))
        return q.view(B, T, 2, self.pairs, self.head_dim)[:, :, 0]

    def forward(self, hidden: Tensor, keys, values, slot_mask: Optional[Tensor],
                context: Optional[Tensor] = None) -> Tensor:
        """keys/values [P, S, Dh] (a bank shared by the batch) or [B, P, S, Dh],
        or Int8Rows (dequantized here); slot_mask None or bool [B, S] (True =
        read); context [B, T, C] with AppendOptions.context_decay."""
        B, T, _ = hidden.shape
        inference = not torch.is_grad_enabled()
        if self.uses_context and context is None:
            self.query_input(hidden, context)  # raises, naming the argument
        if isinstance(keys, Int8Rows):
            keys, values = keys.dequantize(hidden.dtype), values.dequantize(hidden.dtype)
        if inference:  # the same math in fewer ops: see _folded_weights
            w1, b1, w2, b2, out_w, w1_context = self._folded_weights()
            x = F.rms_norm(hidden, (hidden.shape[-1],), eps=self.norm.eps)
            first = F.linear(x, w1, b1)
            if self.uses_context:
                first = first + F.linear(context.to(x.dtype), w1_context)
            q = F.linear(F.gelu(first), w2, b2)
            q = F.normalize(q.view(B, T, 2, self.pairs, self.head_dim), dim=-1)
        else:
            q = self.queries(hidden, context)
        # both query copies of a pair read it as one query sequence of 2T rows
        q = q.permute(0, 3, 2, 1, 4).reshape(B, self.pairs, 2 * T, -1)
        read = memory_read(q.to(keys.dtype).contiguous(), keys, values, scale=self.scale,
                           slot_mask=slot_mask, backend=self.backend)
        read = read.view(B, self.pairs, 2, T, -1).permute(0, 3, 2, 1, 4).reshape(B * T, -1)
        if inference:
            C = hidden.shape[-1]
            return torch.addmm(hidden.reshape(B * T, C), read.to(hidden.dtype), out_w).view(B, T, C)
        return hidden + torch.tanh(self.gate) * self.out(read.to(hidden.dtype)).view(B, T, -1)

    def weight_sources(self) -> tuple[Tensor, ...]:
        """The tensors this layer's folded weights come from."""
        return (*self.query_weight_sources(), self.out.weight, self.gate)

    def reading_layer_arguments(self, keys, values, key_scale, value_scale) -> tuple[tuple, dict]:
        """(args, kwargs) after `hidden` of the fused reading layer for this
        layer (with a context, the call adds context=, per call)."""
        return self.layer_arguments(*self._folded_weights(), keys, values, key_scale,
                                    value_scale)

    def _folded_weights(self) -> tuple[Tensor, ...]:
        """(w1, b1, w2, b2, out_w, w1_context) for reads without gradients:
        the query MLP folded (fold_query), the gate into the output projection
        (exact up to rounding), rebuilt when a parameter or statistic changes:
        2 fewer ops per layer and decode step."""
        sources = self.weight_sources()

        @torch.no_grad()
        def fold():
            *query_sources, out_w, gate = sources
            w1, b1, w2, b2, w1_context = self.fold_query(*query_sources)
            folded_out = (out_w * torch.tanh(gate)[:, None]).t().contiguous()
            return w1, b1, w2, b2, folded_out, w1_context
        self._folded = cached(self._folded, sources, fold)
        return self._folded.value


class AppendMemory(MemoryModel, write_rule="append"):
    """The trained parameters of an append-rule memory (see the module docstring)."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        P, D, C = config.num_heads // 2, config.head_dim, config.hidden_size
        options = config.append
        self.init_bank = nn.Parameter(torch.randn(config.num_heads, options.null_slots, D))
        self.slot_key = per_head_identity(P, D)
        self.slot_value = per_head_identity(P, D)
        self.write_norm = nn.RMSNorm(C, eps=1e-6)
        self.address = _mlp(C + self.write_context_width, options.mlp_hidden, P * D)
        self.token_value = nn.Linear(C, P * D, bias=False)
        # the store gate: which tokens a write keeps (None: every real token)
        self.keep = (_mlp(C, max(1, options.mlp_hidden // 4), 1) if options.store_threshold > 0
                     else None)
        self.readers = nn.ModuleList(AppendReader(config) for _ in config.read_layers)

    @property
    def pairs(self) -> int:
        return self.config.num_heads // 2

    @property
    def write_context_width(self) -> int:
        """A write's context: the decayed context (AppendOptions.context_decay),
        then, with AppendOptions.lookahead, the next token's write state."""
        C, options = self.config.hidden_size, self.config.append
        return C * (bool(options.context_decay) + options.lookahead)

    # --- banks -------------------------------------------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        """Empty slots, then the null_slots learned defaults (differentiable in them)."""
        S, null = num_slots or self.config.num_slots, self.config.append.null_slots
        if not isinstance(S, int) or S <= null:
            raise ValueError(f"num_slots must be an int above null_slots ({null}), got {S!r}")
        defaults = self.init_bank.unsqueeze(0).expand(batch_size, -1, -1, -1)
        return torch.cat([defaults.new_zeros(batch_size, defaults.shape[1], S - null,
                                             defaults.shape[3]), defaults], 2)

    def set_read_scale(self, scale: float) -> None:
        """Reads score cosine x `scale` from now on (AppendOptions.read_scale,
        saved with the memory): a memory trained at one scale may read large
        banks more sharply (docs/design.md, "Phrasings no training saw")."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self.config.append.read_scale = float(scale)
        for reader in self.readers:
            reader.scale = float(scale)
        fused.forget_plans()  # a memoised fused read holds the old scale

    def set_store_threshold(self, threshold: float) -> None:
        """store() keeps a token's slot when the store gate gives it at least
        `threshold` from now on (AppendOptions.store_threshold, saved with the
        memory): a gate trained at one threshold may drop tokens of sentence
        shapes it never saw, which a lower one keeps, for more bank bytes per
        fact (docs/design.md, "Phrasings no training saw")."""
        if self.keep is None:
            raise ValueError("this memory has no store gate (AppendOptions.store_threshold was 0 "
                             "when it was made): it stores every token")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        self.config.append.store_threshold = float(threshold)

    def slots_to_store(self, tokens: int) -> int:
        """One slot per token plus the null slots (at least config.num_slots)."""
        return max(self.config.num_slots, tokens + self.config.append.null_slots)

    def shrink_to_fit(self, mem: Tensor) -> Tensor:
        """Drops the empty slots after the last written one (of any row), keeping
        the null slots and at least config.num_slots: a bank that store() made
        for a write a store gate thinned holds what it kept, not a slot per token."""
        S, null = mem.shape[2], self.config.append.null_slots
        written = self.slot_mask(mem)[:, :S - null].any(0).nonzero()
        keep = max(int(written[-1]) + 1 if len(written) else 0, self.config.num_slots - null)
        if keep >= S - null:
            return mem
        return torch.cat([mem[:, :, :keep], mem[:, :, S - null:]], 2).contiguous()

    def slot_mask(self, mem: Tensor) -> Tensor:
        """The non-empty slots (written or learned defaults), bool [B, S]."""
        return mem.ne(0).any(3).any(1)

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values [B, P, S, Dh]; a one-row bank's as [P, S_used, Dh], its
        non-empty slots only (the shared-bank layout, read once for a whole
        batch, with no slot mask: a read never streams the empty slots)."""
        P, spec = self.pairs, "bpsd,pde->bpse"
        if mem.shape[0] == 1:
            used = self.slot_mask(mem)[0]
            if not bool(used.any()):
                raise ValueError("the bank has no written slot and no null slot (all zeros): "
                                 "an append-rule bank starts from memory.new_bank(), which "
                                 "holds the learned null slots")
            mem, spec = mem[0][:, used], "psd,pde->pse"
        address, content = mem[..., :P, :, :], mem[..., P:, :, :]
        keys = F.normalize(torch.einsum(spec, address, self.slot_key), dim=-1)
        values = torch.einsum(spec, content, self.slot_value)
        return keys.to(mem.dtype).contiguous(), values.to(mem.dtype).contiguous()

    # --- read and write -----------------------------------------------------------

    def fused_read_applies(self, bank: MemoryBank) -> bool:
        return bank.batch_size == 1  # several rows need a slot mask: read through ATen ops

    def read_unfused(self, reader_index: int, hidden: Tensor, bank: MemoryBank,
                     kv_dtype: Optional[torch.dtype], context: Optional[Tensor]) -> Tensor:
        keys, values = bank.keys_values(kv_dtype)
        shared = bank.batch_size == 1  # compacted: no empty slot left to mask
        return self.readers[reader_index](hidden, keys, values,
                                          None if shared else bank.slot_mask(), context)

    def address_input(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """What the address MLP reads: write_norm(h), and the write's context
        beside it (write_context_width)."""
        x = self.write_norm(hidden)
        self._check_write_context(context, hidden)
        return x if context is None else torch.cat([x, context.to(x.dtype)], -1)

    def token_addresses(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, P, Dh]: what each token writes into the address heads."""
        B, T, _ = hidden.shape
        x = self.address_input(hidden, context)
        return torch.tanh(self.address(x)).view(B, T, self.pairs, -1)

    def raw_address_keys(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, P, Dh]: the read key a slot gets from this token, before normalisation."""
        return torch.einsum("btpd,pde->btpe", self.token_addresses(hidden, context), self.slot_key)

    def address_keys(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, P, Dh]: the read key a slot gets from this token (unit length)."""
        return F.normalize(self.raw_address_keys(hidden, context), dim=-1)

    def token_contents(self, value_hidden: Tensor) -> Tensor:
        """[B, T, P, Dh]: what each token gives the slot of the token before it."""
        B, T, _ = value_hidden.shape
        return torch.tanh(self.token_value(self.write_norm(value_hidden))).view(B, T, self.pairs, -1)

    def keep_logits(self, hidden: Tensor) -> Tensor:
        """[B, T]: the store gate's logit per token (AppendOptions.store_threshold)."""
        if self.keep is None:
            raise ValueError("this memory has no store gate: AppendOptions.store_threshold is 0")
        return self.keep(self.write_norm(hidden))[..., 0]

    def stored_tokens(self, hidden: Tensor, token_mask: Tensor) -> Tensor:
        """bool [B, T]: the tokens a write stores: the real ones (token_mask),
        and with a store gate only those whose probability reaches the threshold."""
        stored = token_mask.bool()
        if self.keep is not None:
            with torch.no_grad():
                kept = torch.sigmoid(self.keep_logits(hidden).float()) >= self.config.append.store_threshold
            stored = stored & kept
        return stored

    def write(self, mem: Tensor, hidden: Tensor, token_mask: Optional[Tensor] = None,
              value_hidden: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        """Appends each stored token of a row (stored_tokens) to the row's
        next empty slot (differentiable; returns the new bank). context: each
        token's (decayed_context of its own text), with AppendOptions.context_decay.
        Raises ValueError, leaving `mem` as it was, when a row has fewer empty
        slots than tokens to store."""
        self._check_write_args(mem, hidden, value_hidden, context)
        B, T, _ = hidden.shape
        S = mem.shape[2]
        if token_mask is None:
            token_mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        token_mask = token_mask.bool()
        stored = self.stored_tokens(hidden, token_mask)
        empty = ~self.slot_mask(mem)
        tokens_in, empty_slots = stored.sum(1), empty.sum(1)
        if bool((tokens_in > empty_slots).any()):
            b = int((tokens_in > empty_slots).nonzero()[0])
            raise ValueError(f"write: bank row {b} has {int(empty_slots[b])} empty slots, the "
                             f"write has {int(tokens_in[b])} tokens to store; an append-rule bank holds "
                             f"num_slots - null_slots tokens, make a bigger one with "
                             f"memory.new_bank(num_slots=...)")
        content = self.token_contents(hidden if value_hidden is None else value_hidden)
        # what follows token t (nothing where padding follows it)
        content = torch.cat([content[:, 1:] * token_mask[:, 1:, None, None],
                             torch.zeros_like(content[:, :1])], 1)
        tokens = torch.cat([self.token_addresses(hidden, context), content], 2)  # [B, T, 2P, Dh]
        # the k-th empty slot of a row takes the row's k-th stored token
        real_first = torch.sort((~stored).to(torch.int8), dim=1, stable=True).indices
        rank = empty.long().cumsum(1) - 1
        takes = empty & (rank < tokens_in[:, None])
        source = real_first.gather(1, rank.clamp(0, T - 1))
        picked = tokens.gather(1, source[:, :, None, None].expand(B, S, *tokens.shape[2:]))
        return torch.where(takes[:, None, :, None], picked.transpose(1, 2).to(mem.dtype), mem)

    # --- fitting the MLP inputs ------------------------------------------------------

    def fit_statistics(self, address_states: Tensor, reader_states: list[Tensor],
                       address_context: Optional[Tensor] = None,
                       reader_contexts: Optional[list[Tensor]] = None) -> None:
        """Fits the Standardize layers: the address MLP's (and the store
        gate's) on write-layer states of written tokens [N, C], reader i's on
        states of its layer [N_i, C] at the positions it answers from (before
        its norm); with AppendOptions.context_decay or lookahead, the write
        contexts of the address states [N, write_context_width] and the
        readers' contexts [N_i, C] beside them."""
        if len(reader_states) != len(self.readers):
            raise ValueError(f"reader_states: one tensor per reader ({len(self.readers)}), "
                             f"got {len(reader_states)}")
        contexts = reader_contexts if reader_contexts is not None else [None] * len(self.readers)
        if len(contexts) != len(self.readers):
            raise ValueError(f"reader_contexts: one tensor per reader ({len(self.readers)}), "
                             f"got {len(contexts)}")
        with torch.no_grad():
            self.address[0].fit(self.address_input(address_states, address_context))
            if self.keep is not None:
                self.keep[0].fit(self.write_norm(address_states))
            for reader, states, context in zip(self.readers, reader_states, contexts):
                if reader.uses_context:
                    self._check_context(context, states)
                reader.query[0].fit(reader.query_input(states, context))
