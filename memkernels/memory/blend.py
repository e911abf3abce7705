"""The blend rule, MemoryConfig(write_rule="blend"): a fixed bank of S
trained slots; a write lets every slot attend over the tokens and blends
the result in through learned forget/input gates (the fused write op,
LM2/NTM-style); a read is a linear query over keys linear in the slots.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkernels.memory.bank import Int8Rows, MemoryBank
from memkernels.memory.base import MemoryModel
from memkernels.memory.cache import Versioned, cached
from memkernels.memory.config import MemoryConfig
from memkernels.ops import memory_read, memory_write


def per_head_identity(heads: int, dim: int) -> nn.Parameter:
    """[heads, dim, dim]: identity plus noise (a slot's key starts as its content)."""
    return nn.Parameter(torch.eye(dim).repeat(heads, 1, 1)
                        + torch.randn(heads, dim, dim) * dim ** -0.5 / 4)


class BlendReader(nn.Module):
    """One reading layer: h <- h + tanh(gate) * W_o(memory_read(W_q norm(h), K, V))."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.query = nn.Linear(config.hidden_size, config.width, bias=False)
        self.out = nn.Linear(config.width, config.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.full((config.hidden_size,), float(config.gate_init)))
        self.backend = config.backend
        self._folded: Optional[Versioned] = None

    def weight_sources(self) -> tuple[Tensor, ...]:
        """The tensors this layer's folded weights come from, looked up in the
        module dicts (nn.Module.__getattr__ costs ~0.7 us a lookup, paid per
        reading layer per decode token)."""
        modules = self._modules
        return (modules["norm"]._parameters["weight"], modules["query"]._parameters["weight"],
                modules["out"]._parameters["weight"], self._parameters["gate"])

    def reading_layer_arguments(self, keys, values, key_scale, value_scale) -> tuple[tuple, dict]:
        """(args, kwargs) after `hidden` of the fused reading layer for this layer."""
        query_w, out_w = self._folded_weights()
        return (query_w, keys, values, out_w, self.norm.eps or 1e-6, self.head_dim ** -0.5,
                key_scale, value_scale), {}

    def forward(self, hidden: Tensor, keys, values) -> Tensor:
        """keys/values: [H, S, Dh] (shared) or [B, H, S, Dh] tensors, or
        Int8Rows (dequantized here)."""
        B, T, C = hidden.shape
        if isinstance(keys, Int8Rows):
            keys, values = keys.dequantize(hidden.dtype), values.dequantize(hidden.dtype)
        if torch.is_grad_enabled() and (self.gate.requires_grad or self.query.weight.requires_grad
                                        or self.out.weight.requires_grad or hidden.requires_grad):
            q = self.query(self.norm(hidden))
            # under autocast q may be bf16 while the bank is not: the read runs in the bank's dtype
            q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).to(keys.dtype)
            read = memory_read(q, keys, values, backend=self.backend).to(hidden.dtype)
            return hidden + torch.tanh(self.gate) * self.out(read.transpose(1, 2).reshape(B, T, -1))
        # Inference: the norm weight folded into the query projection and the gate
        # into the output projection, 6 ATen ops
        query_w, out_w = self._folded_weights()
        q = F.linear(F.rms_norm(hidden, (C,), eps=self.norm.eps), query_w)
        read = memory_read(q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                           .to(keys.dtype), keys, values, backend=self.backend).to(hidden.dtype)
        out = torch.addmm(hidden.reshape(B * T, C), read.transpose(1, 2).reshape(B * T, -1), out_w)
        return out.view(B, T, C)

    def _folded_weights(self) -> tuple[Tensor, Tensor]:
        """(query_w * norm_w, (out_w * tanh(gate))^T): exact folds, rebuilt
        when a weight changes."""
        sources = self.weight_sources()

        @torch.no_grad()
        def fold():
            norm_w, query_w, out_w, gate = sources
            return query_w * norm_w, (out_w * torch.tanh(gate)[:, None]).t().contiguous()
        self._folded = cached(self._folded, sources, fold)
        return self._folded.value


class BlendMemory(MemoryModel, write_rule="blend"):
    """The trained parameters of a blend-rule memory: the initial bank, the
    slot key/value/query projections, the token key/value projections, the
    gates, and one BlendReader per reading layer."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        H, S, D, W = config.num_heads, config.num_slots, config.head_dim, config.width
        self.init_bank = nn.Parameter(torch.randn(H, S, D))
        self.slot_key = per_head_identity(H, D)
        self.slot_value = per_head_identity(H, D)
        self.slot_query = per_head_identity(H, D)
        self.write_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.token_key = nn.Linear(config.hidden_size, W, bias=False)
        self.token_value = nn.Linear(config.hidden_size, W, bias=False)
        self.forget = nn.Parameter(torch.zeros(H, D))
        self.forget_bias = nn.Parameter(torch.full((H,), float(config.blend.forget_bias)))
        self.input = nn.Parameter(torch.zeros(H, D))
        self.input_bias = nn.Parameter(torch.full((H,), float(config.blend.input_bias)))
        self.readers = nn.ModuleList(BlendReader(config) for _ in config.read_layers)
        # Sharp attention from the start (score std ~4 against unit-scale slots):
        # with the default Linear init a slot averages all tokens of a write
        # (and a query all slots) nearly uniformly, and nothing can be learned
        # from a uniform average.
        sharp = 4.0 / math.sqrt(config.hidden_size)
        nn.init.normal_(self.token_key.weight, std=sharp)
        for reader in self.readers:
            nn.init.normal_(reader.query.weight, std=sharp)

    # --- banks -------------------------------------------------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        """The trained initial bank, batch_size times (num_slots: only the
        trained config.num_slots, the blend rule's slots are trained)."""
        if num_slots not in (None, self.config.num_slots):
            raise ValueError(f"num_slots: a blend-rule bank has the trained "
                             f"{self.config.num_slots} slots, got {num_slots}")
        return self.init_bank.unsqueeze(0).expand(batch_size, -1, -1, -1)

    def slots_to_store(self, tokens: int) -> Optional[int]:
        return None  # the trained size, whatever is written

    def shrink_to_fit(self, mem: Tensor) -> Tensor:
        return mem  # every slot holds something

    def slot_mask(self, mem: Tensor) -> Optional[Tensor]:
        return None  # every slot is read

    def trainable_bank(self) -> MemoryBank:
        """The initial bank as a view of the parameter (for training the bank
        itself: gradients flow into init_bank)."""
        return MemoryBank(self, self.init_bank.unsqueeze(0))

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        spec = "bhsd,hde->bhse"
        if mem.shape[0] == 1:
            mem, spec = mem[0], "hsd,hde->hse"
        # in the bank's dtype, also under autocast
        return (torch.einsum(spec, mem, self.slot_key).to(mem.dtype).contiguous(),
                torch.einsum(spec, mem, self.slot_value).to(mem.dtype).contiguous())

    # --- read and write ------------------------------------------------------------------

    def fused_read_applies(self, bank: MemoryBank) -> bool:
        return True

    def read_unfused(self, reader_index: int, hidden: Tensor, bank: MemoryBank,
                     kv_dtype: Optional[torch.dtype], context: Optional[Tensor]) -> Tensor:
        return self.readers[reader_index](hidden, *bank.keys_values(kv_dtype))

    def write(self, mem: Tensor, hidden: Tensor, token_mask: Optional[Tensor] = None,
              value_hidden: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        """The slots attend over the tokens (memory_write). A row with no real
        token is left unchanged (no forgetting either)."""
        self._check_write_args(mem, hidden, value_hidden, context)
        B, T, _ = hidden.shape
        H, D = self.config.num_heads, self.config.head_dim
        x = self.write_norm(hidden)
        xv = x if value_hidden is None else self.write_norm(value_hidden)
        k_tok = self.token_key(x).view(B, T, H, D).transpose(1, 2).to(mem.dtype).contiguous()
        v_tok = self.token_value(xv).view(B, T, H, D).transpose(1, 2).to(mem.dtype).contiguous()
        # .to(mem.dtype): under autocast the einsums come out in bf16
        q_slots = torch.einsum("bhsd,hde->bhse", mem, self.slot_query).to(mem.dtype).contiguous()
        f = (torch.einsum("bhsd,hd->bhs", mem, self.forget) + self.forget_bias[:, None])[..., None]
        i = (torch.einsum("bhsd,hd->bhs", mem, self.input) + self.input_bias[:, None])[..., None]
        f, i = f.to(mem.dtype).contiguous(), i.to(mem.dtype).contiguous()
        new = memory_write(mem, q_slots, k_tok, v_tok, f, i,
                           token_mask=token_mask, backend=self.config.backend)
        if token_mask is not None:
            has_tokens = token_mask.any(dim=1)
            if not bool(has_tokens.all()):
                new = torch.where(has_tokens[:, None, None, None], new, mem)
        return new
