"""The copy rule, MemoryConfig(write_rule="copy"): a memory that answers with
the tokens it stored, at the host LM's output distribution.

Why (docs/design.md, "Copying new words"): a read added to the hidden states
has to get a never-seen word out through the frozen LM's upper layers and
head, and a memory trained that way learned to pick among the answers its
training saw (0% on new words). Here the read's weights over the stored
slots become a distribution over the tokens those slots stored, mixed with
the LM's own by a learned gate (the kNN-LM / Memory Decoder form), so a
stored token comes out as itself, however rare or new.

Bank layout: the append rule's (memkernels.memory.append), P = num_heads / 2
pairs with P * head_dim == hidden_size:
- heads [0, P): a slot's address, tanh(MLP(norm(h_t))) of what the LM head
  reads at token t (the final norm's output: where reads query; with
  AppendOptions.context_decay, beside the decayed context), as the append
  rule makes it;
- heads [P, 2P): its content, the unit-length row of the LM's output
  embedding (lm_head weight) of the token after t, cut into P heads: fixed,
  nothing learned, so the stored word is the word.

A read (CopyReader) queries with the state the LM head reads (the final
norm's output) through the query MLP; each pair p's read of the content
heads gives out_p = sum_i w_pi E_p[token_i], and the memory's logits are
sharpness * out . E^T (E the unit output embeddings): when every pair puts
its weight on one slot, its stored token has the largest logit by a margin
of sharpness * (1 - the largest cosine to another token). The mixture:

    p(y) = g p_memory(y) + (1 - g) p_LM(y),
    g = sigmoid(gate_bias + gate_confidence * |out|^2 + w . norm(h))

|out|^2 is 1 when the pairs agree on one stored token and near 0 on the null
slots (zero content): the "nothing stored here" signal. The mixture is
memkernels.ops.copy_mix (one CPU kernel call per decode step). The read itself is
the fused reading layer on the CPU at inference (with an identity output
projection; through a large bank's index, MemoryBank.build_index) and
memory_read, the project's attention op, everywhere else.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkernels.memory import fused
from memkernels.memory.append import AppendMemory, QueryReader
from memkernels.memory.bank import Int8Rows, MemoryBank, check_same_memory
from memkernels.memory.cache import Versioned, cached
from memkernels.memory.config import MemoryConfig
from memkernels.ops import copy_mix, memory_read


class CopyReader(QueryReader):
    """The copy rule's read and mixture (see the module docstring)."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config, config.num_heads // 2 * config.head_dim)
        C = config.hidden_size
        # the memory's logits are sharpness x cosine: 20 puts a margin of 10
        # nats on a stored token over one at cosine 0.5
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(20.0)))
        # closed unless the pairs agree on a stored token (|out|^2 near 1)
        self.gate_bias = nn.Parameter(torch.tensor(-4.0))
        self.gate_confidence = nn.Parameter(torch.tensor(8.0))
        self.gate = nn.Linear(C, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self._mix_operands: Optional[Versioned] = None
        self._unit_scale: Optional[Versioned] = None

    def raw_queries(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, P, Dh], before normalisation."""
        B, T, _ = hidden.shape
        return self.query(self.query_input(hidden, context)).view(B, T, self.pairs, self.head_dim)

    def queries(self, hidden: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """[B, T, 1, P, Dh], unit length (one query per pair; the append
        reader's layout with one copy, as pretrain_address indexes it)."""
        return F.normalize(self.raw_queries(hidden, context), dim=-1)[:, :, None]

    def read(self, hidden: Tensor, keys, values, slot_mask: Optional[Tensor],
             context: Optional[Tensor] = None) -> Tensor:
        """out [B, T, P * Dh]: each pair's weighted sum of stored unit embeddings."""
        B, T, _ = hidden.shape
        if isinstance(keys, Int8Rows):
            keys, values = keys.dequantize(hidden.dtype), values.dequantize(hidden.dtype)
        q = self.queries(hidden, context)[:, :, 0].transpose(1, 2)  # [B, P, T, Dh]
        out = memory_read(q.to(keys.dtype).contiguous(), keys, values, scale=self.scale,
                          slot_mask=slot_mask, backend=self.backend)
        return out.transpose(1, 2).reshape(B, T, -1).to(hidden.dtype)

    def weight_sources(self) -> tuple[Tensor, ...]:
        """The tensors the fused read's folded weights come from."""
        return self.query_weight_sources()

    def reading_layer_arguments(self, keys, values, key_scale, value_scale) -> tuple[tuple, dict]:
        """(args, kwargs) after `hidden` of the fused reading layer: the query
        MLP folded (fold_query) and an identity output projection, so the op
        returns hidden + out (CopyMemory.mix_logits takes hidden off again)."""
        sources = self.weight_sources()

        @torch.no_grad()
        def fold():
            w1, b1, w2, b2, w1_context = self.fold_query(*sources)
            identity = torch.eye(w2.shape[0], dtype=w2.dtype, device=w2.device)
            return w1, b1, w2, b2, identity, w1_context
        self._folded = cached(self._folded, sources, fold)
        return self.layer_arguments(*self._folded.value, keys, values, key_scale, value_scale)

    def mix_sources(self, head_weight: Tensor) -> tuple[Tensor, ...]:
        """The tensors mix_operands derives from."""
        return (head_weight, self.gate.weight, self.norm.weight, self.log_sharpness,
                self.gate_bias, self.gate_confidence)

    def mix_operands(self, head_weight: Tensor) -> tuple:
        """(unit_scale, gate_w, sharpness, gate_bias, gate_confidence) for
        ops.copy_mix with units = head_weight: 1 / the head's row lengths
        (detached: the output embeddings are the frozen LM's), the gate's
        weight with the norm's folded in, and the scalars: 0-d tensors while
        gradients flow to them, else numbers, all cached while their sources
        are unchanged (a decode step pays no op for them)."""
        sources = self.mix_sources(head_weight)
        # 1 / the head's row lengths, as F.normalize: cached on the head alone (a
        # training step reads a large vocabulary's head without re-measuring it)
        self._unit_scale = cached(
            self._unit_scale, (head_weight,),
            lambda: 1.0 / head_weight.detach().norm(dim=-1).clamp(min=1e-12),
            (torch.is_inference_mode_enabled(),))
        unit_scale = self._unit_scale.value
        if torch.is_grad_enabled() and any(p.requires_grad for p in sources[1:]):
            return (unit_scale, self.gate.weight[0] * self.norm.weight,
                    self.log_sharpness.exp(), self.gate_bias, self.gate_confidence)

        @torch.no_grad()
        def fold():
            return (unit_scale, (self.gate.weight[0] * self.norm.weight).detach(),
                    float(self.log_sharpness.exp()), float(self.gate_bias),
                    float(self.gate_confidence))
        # keyed on inference mode: a tensor made there cannot be saved for backward
        self._mix_operands = cached(self._mix_operands, sources, fold,
                                    (torch.is_inference_mode_enabled(),))
        return self._mix_operands.value

    def mix(self, hidden: Tensor, logits: Tensor, out: Tensor, head_weight: Tensor) -> Tensor:
        """log p of the mixture [B, T, V] (float32 at least): the LM's logits
        and the memory's read `out` for the same positions (ops.copy_mix)."""
        unit_scale, gate_w, sharpness, gate_bias, gate_confidence = self.mix_operands(head_weight)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        if hidden.dtype != dtype or logits.dtype != dtype or out.dtype != dtype:
            hidden, logits, out = hidden.to(dtype), logits.to(dtype), out.to(dtype)
        return copy_mix(hidden, logits, out, head_weight.detach().to(dtype), gate_w.to(dtype),
                        self.norm.eps, sharpness, gate_bias, gate_confidence,
                        unit_scale.to(dtype), self.backend)


class CopyMemory(AppendMemory, write_rule="copy"):
    """The trained parameters of a copy-rule memory (see the module docstring)."""

    reads_logits = True  # memkernels.attach hooks the LM head, not decoder layers

    def __init__(self, config: MemoryConfig):
        P, D, C = config.num_heads // 2, config.head_dim, config.hidden_size
        if config.num_heads % 2 or P * D != C:
            raise ValueError(f"write_rule='copy' stores the hidden-size output embedding of a "
                             f"token in num_heads / 2 content heads: num_heads / 2 x head_dim "
                             f"must equal hidden_size ({C}), got {config.num_heads} heads x "
                             f"{D}; MemoryConfig.for_copy(hf_config) picks them")
        if config.values_from != "output_embeddings":
            raise ValueError(f"write_rule='copy' needs MemoryConfig(values_from="
                             f"'output_embeddings'), got {config.values_from!r}")
        if config.resolved_read_layers != (config.num_layers - 1,):
            raise ValueError(f"write_rule='copy' reads once, at the LM head: read_layers must "
                             f"be (-1,), got {config.read_layers}")
        super().__init__(config)
        del self.token_value  # the content is the output embedding itself
        self.slot_value.requires_grad_(False)  # kept as the bank's projection source: identity
        self.readers = nn.ModuleList([CopyReader(config)])

    @property
    def fixed_bank_heads(self) -> tuple[int, ...]:
        """The content heads: a slot's content is its token's output
        embedding (the stored word is the word), so a trained bank moves only
        the addresses."""
        return tuple(range(self.pairs, 2 * self.pairs))

    # --- banks: null slots hold an address and no content ------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        mem = super().fresh_mem(batch_size, num_slots)
        null = self.config.append.null_slots
        keep = torch.ones_like(mem[:1, :, :1, :1])
        keep[:, self.pairs:] = 0  # the null slots' content heads: zero, "nothing stored"
        return torch.cat([mem[:, :, :-null], mem[:, :, -null:] * keep], 2)

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Keys as the append rule's; values the content heads as stored."""
        P = self.pairs
        if mem.shape[0] == 1:
            used = self.slot_mask(mem)[0]
            if not bool(used.any()):
                raise ValueError("the bank has no written slot and no null slot (all zeros): "
                                 "a copy-rule bank starts from memory.new_bank()")
            mem = mem[0][:, used]
            keys = F.normalize(torch.einsum("psd,pde->pse", mem[:P], self.slot_key), dim=-1)
            return keys.to(mem.dtype).contiguous(), mem[P:].contiguous()
        keys = F.normalize(torch.einsum("bpsd,pde->bpse", mem[:, :P], self.slot_key), dim=-1)
        return keys.to(mem.dtype).contiguous(), mem[:, P:].contiguous()

    def token_contents(self, value_hidden: Tensor) -> Tensor:
        """[B, T, P, Dh]: the unit output embedding of each token, in P heads."""
        B, T, _ = value_hidden.shape
        return F.normalize(value_hidden, dim=-1).view(B, T, self.pairs, -1)

    # --- read ---------------------------------------------------------------------------

    def fused_read_applies(self, bank: MemoryBank) -> bool:
        # one row, compacted (several rows need a slot mask: read through ATen ops)
        return bank.batch_size == 1

    def read(self, reader_index, hidden, bank, kv_dtype=None, context=None):
        raise TypeError("a copy-rule memory reads at the LM head: mix_logits(hidden, logits, "
                        "head_weight, bank), or through memkernels.attach")

    def mix_logits(self, hidden: Tensor, logits: Tensor, head_weight: Tensor, bank: MemoryBank,
                   kv_dtype: Optional[torch.dtype] = None,
                   context: Optional[Tensor] = None) -> Tensor:
        """log p [B, T, V] of the mixture of the LM's distribution (logits)
        and the stored tokens the read of `bank` finds. hidden: the LM head's
        input [B, T, C]; head_weight: its weight [V, C]."""
        if bank.memory is not self:
            check_same_memory(bank, self, "bank")
        self._check_bank_rows(bank, hidden)
        self._check_context(context, hidden)
        if logits.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"logits {tuple(logits.shape)} and hidden {tuple(hidden.shape)} "
                             f"must cover the same [B, T] positions")
        if head_weight.dim() != 2 or head_weight.shape != (logits.shape[-1], hidden.shape[-1]):
            raise ValueError(f"head_weight must be [V, C] = [{logits.shape[-1]}, "
                             f"{hidden.shape[-1]}], got {tuple(head_weight.shape)}")
        reader = self.readers[0]
        out = None
        if not torch.is_grad_enabled():
            # the fused reading layer (its index with build_index), then the
            # mixture kernel, operands memoised per bank (fused.read_and_mix)
            fused_out = fused.read_and_mix(self, bank, hidden, logits, head_weight, kv_dtype,
                                           None if context is None else context.to(hidden.dtype))
            if fused_out is not None:
                out, mixed = fused_out
                if mixed is not None:
                    return mixed
        if out is None:
            keys, values = bank.keys_values(kv_dtype)
            shared = bank.batch_size == 1
            out = reader.read(hidden, keys, values, None if shared else bank.slot_mask(), context)
        return reader.mix(hidden, logits, out, head_weight)
