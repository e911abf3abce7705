"""The append rule, MemoryConfig(write_rule="append"): one slot per written
token, found by an MLP address and a cosine read.

Why (benchmarks/NOTES.md, sessions 4-7): the blend write lets every slot
attend over all tokens of a write, so facts blur together; and a linear query
against keys linear in the slot content finds a question's statement among
100 about a third of the time on the recall base LM, where two MLPs find it
91% of the time. Written facts are recalled ~80% at N=100 this way, against
11% with the blend rule.

Bank layout, P = num_heads / 2 pairs of heads:
- heads [0, P): a slot's address, tanh(MLP(norm(h_t))) from the write layer's
  state of token t: who and what the context is about there (with
  MemoryConfig.context_decay, MLP([norm(h_t), c_t]), c_t the decayed mean
  of the embeddings so far: decayed_context);
- heads [P, 2P): its content, tanh(W_v norm(e_{t+1})) from the value states
  (MemoryConfig.values_from) of the token after t: what came next (zero
  where padding comes next).

A write puts a row's real tokens, in order, into its first empty slots (with
MemoryConfig.store_threshold > 0 only those a learned store gate keeps; an
empty slot is all zeros; a fresh bank is empty but for null_slots learned
defaults at its end, the "nothing stored" answer). A read sees the non-empty
slots only: keys are slot_key . address (unit length), values slot_value .
content; each reader has 2P query heads from an MLP (unit length; its input
is [norm(h_t), c_t] with a context); heads p and P + p both read pair p,
scored cosine x read_scale.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkernels._nvtx import nvtx_range
from memkernels.memory import (Int8Rows, MemoryBank, MemoryConfig, MemoryModel, _fused_cpu_reader,
                               _fused_read_operands, _mark_owned, _reader_operands)
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


def cluster_slots(keys: Tensor, clusters: int, iterations: int = 10,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """An inverted-file index of unit keys [P, S, Dh] (spherical k-means per
    kv head, `iterations` Lloyd steps from `clusters` distinct slots drawn
    with `seed`): (order [P, S], the slots sorted by cluster; centroids [P,
    clusters, Dh], unit length; starts [P, clusters + 1], where each
    cluster's range begins in the sorted order). MemoryBank.build_index."""
    P, S, D = keys.shape
    clusters = max(1, min(clusters, S))
    x = keys.detach()
    x = x if x.dtype == torch.float64 else x.float()
    gen = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(S, generator=gen)[:clusters] for _ in range(P)])
    centroids = torch.gather(x, 1, first.to(x.device)[..., None].expand(-1, -1, D))
    for _ in range(iterations):
        assign = torch.einsum("psd,pcd->psc", x, centroids).argmax(-1)  # [P, S]
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, D), x)
        # an emptied cluster keeps its centroid (it will hold nothing)
        centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1),
                                centroids)
    assign = torch.einsum("psd,pcd->psc", x, centroids).argmax(-1)
    order = torch.argsort(assign, dim=1, stable=True)
    counts = torch.zeros(P, clusters, dtype=torch.long, device=x.device).scatter_add_(
        1, assign, torch.ones_like(assign))
    starts = torch.cat([counts.new_zeros(P, 1), counts.cumsum(1)], 1)
    return order, centroids, starts


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


class AppendReader(nn.Module):
    """One reading layer: h <- h + tanh(gate) * W_o(read(MLP(norm(h))))
    (MLP([norm(h), context]) with MemoryConfig.context_decay)."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.pairs, self.head_dim = config.num_heads // 2, config.head_dim
        self.scale = float(config.read_scale)
        self.uses_context = bool(config.context_decay)
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.query = _mlp(config.hidden_size * (2 if self.uses_context else 1),
                          config.mlp_hidden, config.width)
        self.out = nn.Linear(config.width, config.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.full((config.hidden_size,), float(config.gate_init)))
        self.backend = config.backend

    def query_input(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """What the query MLP reads: norm(h), and the context beside it."""
        if not self.uses_context:
            return self.norm(hidden)
        if context is None:
            raise ValueError("this reader keys on the context (MemoryConfig.context_decay > 0): "
                             "pass context")
        return torch.cat([self.norm(hidden), context.to(hidden.dtype)], -1)

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
        or Int8Rows; slot_mask None or bool [B, S] (True = read); context
        [B, T, C] with MemoryConfig.context_decay."""
        B, T, _ = hidden.shape
        inference = not torch.is_grad_enabled()
        if self.uses_context and context is None:
            self.query_input(hidden, context)  # raises, naming the argument
        shared = (keys.data if isinstance(keys, Int8Rows) else keys).dim() == 3
        if inference and slot_mask is None and shared:
            # a shared, compacted bank on the CPU backend: the whole layer is one
            # fused C++ call (memkernels._C.reader_fwd with the MLP query)
            fused = _fused_cpu_reader(hidden, keys, self.backend)
            if fused is not None:
                args, kwargs = self._fused_arguments(*_reader_operands(keys, values))
                if self.uses_context:
                    kwargs["context"] = context.to(hidden.dtype)
                with nvtx_range("memkernels.reader_fwd[cpu]"):
                    return fused(hidden, *args, **kwargs)
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

    def fused_plan(self, memory: "AppendMemory", bank: MemoryBank,
                   kv_dtype: Optional[torch.dtype], hidden: Tensor) -> Optional[tuple]:
        """(sources, fused, args, kwargs) of this layer's fused CPU read of a
        one-row bank (MemoryBank._memoised_fused_read), or None where it does not apply."""
        if bank.batch_size != 1:  # several rows: a slot mask, read through ATen ops
            return None
        standardize, first, second = self.query[0], self.query[1], self.query[3]
        sources = (bank._mem, memory.slot_key, memory.slot_value, self.norm.weight,
                   standardize.mean, standardize.std, first.weight, first.bias, second.weight,
                   second.bias, self.out.weight, self.gate)
        operands = _fused_read_operands(sources, bank, kv_dtype, hidden, self.backend)
        if operands is None:
            return None
        args, kwargs = self._fused_arguments(*operands[1:])
        index = bank.read_index(kv_dtype)
        if index is not None:  # the keys are sorted by cluster: each row reads its nearest
            centroids, starts, probes = index
            kwargs.update(centroids=centroids.to(hidden.dtype), cluster_starts=starts,
                          probes=probes)
        return sources, operands[0], args, kwargs

    def _fused_arguments(self, keys, values, key_scale, value_scale) -> tuple[tuple, dict]:
        """(args, kwargs) after `hidden` of memkernels._C.reader_fwd for this layer
        (with a context, the call adds context=, per call)."""
        w1, b1, w2, b2, out_w, w1_context = self._folded_weights()
        kwargs = dict(mlp_w=w1, mlp_b=b1, query_b=b2, unit_queries=True)
        if self.uses_context:
            kwargs["context_w"] = w1_context
        return ((w2, keys, values, out_w, self.norm.eps, self.scale, key_scale, value_scale),
                kwargs)

    def _folded_weights(self) -> tuple[Tensor, ...]:
        """(w1, b1, w2, b2, out_w, w1_context) for reads without gradients: the
        norm's weight and the Standardize statistics folded into the first
        layer of the query MLP, the gate into the output projection (each fold
        is exact up to rounding), rebuilt when a parameter or statistic
        changes. A decode step then runs 2 fewer elementwise passes and 2
        fewer ops per layer. With a context, w1 is the first layer's columns
        for norm(h) and w1_context those for the context (else None)."""
        standardize, first, second = self.query[0], self.query[1], self.query[3]
        sources = (self.norm.weight, standardize.mean, standardize.std, first.weight, first.bias,
                   second.weight, second.bias, self.out.weight, self.gate)
        try:
            stamp = tuple((t._version, t.data_ptr()) for t in sources)
        except RuntimeError:  # made under inference_mode: no version to trust
            stamp = None
        folded = getattr(self, "_folded", None)
        if folded is None or stamp is None or folded[0] != stamp:
            with torch.no_grad():
                C = self.norm.weight.shape[0]
                w = first.weight / standardize.std[None, :]  # (x - mean) / std, then W1
                b1 = first.bias - w @ standardize.mean
                w1 = (w[:, :C] * self.norm.weight[None, :]).contiguous()  # x * norm_w
                w1_context = w[:, C:].contiguous() if self.uses_context else None
                out_w = (self.out.weight * torch.tanh(self.gate)[:, None]).t().contiguous()
            folded = self._folded = (stamp, (w1, b1, second.weight, second.bias, out_w,
                                             w1_context))
        return folded[1]


class AppendMemory(MemoryModel):
    """The trained parameters of an append-rule memory (see the module docstring)."""

    def __init__(self, config: MemoryConfig):
        nn.Module.__init__(self)  # none of the blend rule's write attention and gates
        if config.write_rule != "append":
            raise ValueError(f"AppendMemory needs MemoryConfig(write_rule='append'), got "
                             f"{config.write_rule!r}")
        self.config = config
        P, D, C = config.num_heads // 2, config.head_dim, config.hidden_size

        def per_pair_identity():  # identity plus noise, as MemoryModel's projections
            return nn.Parameter(torch.eye(D).repeat(P, 1, 1) + torch.randn(P, D, D) * D ** -0.5 / 4)

        self.init_bank = nn.Parameter(torch.randn(config.num_heads, config.null_slots, D))
        self.slot_key = per_pair_identity()
        self.slot_value = per_pair_identity()
        self.write_norm = nn.RMSNorm(C, eps=1e-6)
        self.address = _mlp(C * (2 if config.context_decay else 1), config.mlp_hidden, P * D)
        self.token_value = nn.Linear(C, P * D, bias=False)
        # the store gate: which tokens a write keeps (None: every real token)
        self.keep = (_mlp(C, max(1, config.mlp_hidden // 4), 1) if config.store_threshold > 0
                     else None)
        self.readers = nn.ModuleList(AppendReader(config) for _ in config.read_layers)
        _mark_owned(self)

    @property
    def pairs(self) -> int:
        return self.config.num_heads // 2

    # --- banks -------------------------------------------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        """Empty slots, then the null_slots learned defaults (differentiable in them)."""
        S, null = num_slots or self.config.num_slots, self.config.null_slots
        if not isinstance(S, int) or S <= null:
            raise ValueError(f"num_slots must be an int above null_slots ({null}), got {S!r}")
        defaults = self.init_bank.unsqueeze(0).expand(batch_size, -1, -1, -1)
        return torch.cat([defaults.new_zeros(batch_size, defaults.shape[1], S - null,
                                             defaults.shape[3]), defaults], 2)

    def slots_to_store(self, tokens: int) -> int:
        """One slot per token plus the null slots (at least config.num_slots)."""
        return max(self.config.num_slots, tokens + self.config.null_slots)

    def shrink_to_fit(self, mem: Tensor) -> Tensor:
        """Drops the empty slots after the last written one (of any row), keeping
        the null slots and at least config.num_slots: a bank that store() made
        for a write a store gate thinned holds what it kept, not a slot per token."""
        S, null = mem.shape[2], self.config.null_slots
        written = self.slot_mask(mem)[:, :S - null].any(0).nonzero()
        keep = max(int(written[-1]) + 1 if len(written) else 0, self.config.num_slots - null)
        if keep >= S - null:
            return mem
        return torch.cat([mem[:, :, :keep], mem[:, :, S - null:]], 2).contiguous()

    def trainable_bank(self) -> MemoryBank:
        raise ValueError("an append-rule memory has no trained bank: knowledge enters it by "
                         "writing (store), use write_rule='blend' to train a bank")

    def slot_mask(self, mem: Tensor) -> Tensor:
        """The non-empty slots (written or learned defaults), bool [B, S]."""
        return mem.ne(0).any(3).any(1)

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values [B, P, S, Dh]; a one-row bank's as [P, S_used, Dh], its
        non-empty slots only (the shared-bank layout, read once for a whole
        batch, with no slot mask: a read never streams the empty slots)."""
        P, spec = self.pairs, "bpsd,pde->bpse"
        if mem.shape[0] == 1:
            mem, spec = mem[0][:, self.slot_mask(mem)[0]], "psd,pde->pse"
        address, content = mem[..., :P, :, :], mem[..., P:, :, :]
        keys = F.normalize(torch.einsum(spec, address, self.slot_key), dim=-1)
        values = torch.einsum(spec, content, self.slot_value)
        return keys.to(mem.dtype).contiguous(), values.to(mem.dtype).contiguous()

    # --- read and write -----------------------------------------------------------

    def read(self, reader_index: int, hidden: Tensor, bank: MemoryBank,
             kv_dtype: Optional[torch.dtype] = None, context: Optional[Tensor] = None) -> Tensor:
        self._check_bank_rows(bank, hidden)
        self._check_context(context, hidden)
        if context is not None:
            context = context.to(hidden.dtype)  # the fused call takes both in one dtype
        reader = self.readers[reader_index]
        if not torch.is_grad_enabled():  # one fused C++ call, its operands memoised
            out = bank._memoised_fused_read(reader_index, hidden, kv_dtype, context)
            if out is not None:
                return out
        keys, values = bank.keys_values(kv_dtype)
        shared = bank.batch_size == 1  # compacted: no empty slot left to mask
        return reader(hidden, keys, values, None if shared else bank.slot_mask(), context)

    def address_input(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """What the address MLP reads: write_norm(h), and the context beside it."""
        x = self.write_norm(hidden)
        if not self.config.context_decay:
            return x
        self._check_context(context, hidden)
        return torch.cat([x, context.to(x.dtype)], -1)

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

    def keep_logits(self, hidden: Tensor) -> Tensor:
        """[B, T]: the store gate's logit per token (MemoryConfig.store_threshold)."""
        if self.keep is None:
            raise ValueError("this memory has no store gate: MemoryConfig.store_threshold is 0")
        return self.keep(self.write_norm(hidden))[..., 0]

    def stored_tokens(self, hidden: Tensor, token_mask: Tensor) -> Tensor:
        """bool [B, T]: the tokens a write stores: the real ones (token_mask),
        and with a store gate only those whose probability reaches the threshold."""
        stored = token_mask.bool()
        if self.keep is not None:
            with torch.no_grad():
                kept = torch.sigmoid(self.keep_logits(hidden).float()) >= self.config.store_threshold
            stored = stored & kept
        return stored

    def write(self, mem: Tensor, hidden: Tensor, token_mask: Optional[Tensor] = None,
              value_hidden: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        """Appends each stored token of a row (stored_tokens) to the row's
        next empty slot (differentiable; returns the new bank). context: each
        token's (decayed_context of its own text), with MemoryConfig.context_decay.
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
        xv = self.write_norm(hidden if value_hidden is None else value_hidden)
        # what follows token t (nothing where padding follows it)
        xv_next = torch.cat([xv[:, 1:] * token_mask[:, 1:, None], torch.zeros_like(xv[:, :1])], 1)
        content = torch.tanh(self.token_value(xv_next)).view(B, T, self.pairs, -1)
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
        its norm); with MemoryConfig.context_decay, the contexts of the same
        tokens beside them (same shapes)."""
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
