"""The memory model: what users train and what holds their knowledge.

- MemoryConfig: sizes, which decoder layers read, which layer is written.
- MemoryModel: the trained parameters (the initial slot bank, the slot
  key/value/query projections, the write projections and gates, and one
  reader per reading layer with a gate that starts closed).
- MemoryBank: run-time state, one bank per user or sequence. Updated by
  store(), read by the attached layers, saved and loaded as safetensors.

Every read goes through memkernels.memory_read and every write through
memkernels.memory_write, so the fused kernels run on both paths. Attaching
to an LLM is memkernels.integration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import tempfile
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkernels import _backend
from memkernels._nvtx import nvtx_range
from memkernels.ops import memory_read, memory_write

BANK_FORMAT = "memkernels.bank"
BANK_FORMAT_VERSION = 1


@dataclasses.dataclass
class MemoryConfig:
    """Sizes of a memory attached to a host LLM.

    hidden_size: the host LLM's hidden size. num_heads x head_dim: the
    memory's width. num_slots: slots per head in a fresh bank. read_layers:
    decoder layers whose output gets the memory read added (negative indices
    count from the end). write_layer: decoder layer whose output hidden
    states are written. gate_init: the read gates are tanh(gate_init); 0 is
    closed, so a fresh memory leaves the LLM's outputs unchanged.
    forget_bias / input_bias: initial gate logits of the write. A fresh
    slot's content is its address (it sets the slot's write query), so the
    first write mostly replaces it: sigmoid(-2) = 0.12 kept, sigmoid(2) =
    0.88 written (gate biases move slowly under AdamW, ~lr per step, so a
    wrong start is not unlearned in a short run). values_from: where the
    written token values come from: "write_layer" (the same hidden states as
    the keys) or "embeddings" (the input of the first decoder layer). A
    small LM overwrites a token's identity within a layer or two (the recall
    base LM: 100% at the embeddings, 8% at its write layer, nearest-centroid),
    so a value taken from a late layer no longer says which token it was,
    while the key needs the late layer's context (who a statement is about).
    write_rule: how a write enters the bank. "blend": the slots attend over
    the tokens and blend the result in through the forget/input gates (the
    fused write op; a fixed-size bank). "append": each real token takes the
    next empty slot, holding an address (from the write layer, through an
    MLP) in bank heads [0, H/2) and a content (the next token's value) in
    heads [H/2, H); reads score cosine x read_scale through an MLP query,
    over the written slots and null_slots learned default slots (the
    "nothing stored" answer). A bank then holds at most num_slots - null_slots
    written tokens (MemoryModel.new_bank(num_slots=...) makes a bigger one);
    facts cannot blur together (memkernels.append_memory).
    null_slots, read_scale, mlp_hidden: "append" only (see above; mlp_hidden
    is the width of the query and address MLPs). store_threshold: "append"
    only; 0 stores every real token; above 0 adds a learned store gate (an
    MLP on the write layer's state, trained by
    memkernels.train.pretrain_address to pick the tokens reads look for) and
    a write stores a token only when the gate's probability reaches it: a
    bank then holds a few slots per fact instead of one per token.
    context_decay: "append" only; 0 keys on the hidden state alone; d in
    (0, 1) also feeds the address and query MLPs the context of each token:
    the mean of the embeddings (the first decoder layer's input) of the real
    tokens so far, token t-k weighted d^k (append_memory.decayed_context).
    The tokens themselves say exactly which name a text is about, where the
    late hidden states of a small LM blur it (benchmarks/NOTES.md, session 10).
    backend: forces a kernel backend (None = auto).
    """
    hidden_size: int
    num_layers: int
    num_heads: int = 4
    head_dim: int = 32
    num_slots: int = 1024
    read_layers: tuple[int, ...] = (-1,)
    write_layer: int = -1
    gate_init: float = 0.0
    forget_bias: float = -2.0
    input_bias: float = 2.0
    values_from: str = "write_layer"
    write_rule: str = "blend"
    null_slots: int = 8
    read_scale: float = 20.0
    mlp_hidden: int = 512
    store_threshold: float = 0.0
    context_decay: float = 0.0
    backend: Optional[str] = None

    def __post_init__(self):
        self.read_layers = tuple(int(i) for i in self.read_layers)
        if self.values_from not in ("write_layer", "embeddings"):
            raise ValueError(f"MemoryConfig.values_from must be 'write_layer' or 'embeddings', "
                             f"got {self.values_from!r}")
        if self.write_rule not in ("blend", "append"):
            raise ValueError(f"MemoryConfig.write_rule must be 'blend' or 'append', "
                             f"got {self.write_rule!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "num_slots",
                     "null_slots", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MemoryConfig.{name} must be a positive int, got {value!r}")
        if not self.read_layers:
            raise ValueError("MemoryConfig.read_layers must name at least one decoder layer")
        for i in (*self.read_layers, self.write_layer):
            if not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"MemoryConfig: layer index {i} is out of range for a model with "
                                 f"{self.num_layers} decoder layers")
        if len(set(self.resolved_read_layers)) != len(self.read_layers):
            raise ValueError(f"MemoryConfig.read_layers has duplicates: {self.read_layers}")
        if self.write_rule == "append":
            if self.num_heads % 2:
                raise ValueError(f"MemoryConfig.num_heads must be even with write_rule='append' "
                                 f"(half address, half content heads), got {self.num_heads}")
            if self.null_slots >= self.num_slots:
                raise ValueError(f"MemoryConfig.null_slots ({self.null_slots}) must be below "
                                 f"num_slots ({self.num_slots})")
            if not (isinstance(self.read_scale, (int, float)) and self.read_scale > 0):
                raise ValueError(f"MemoryConfig.read_scale must be a positive number, "
                                 f"got {self.read_scale!r}")
        # the append rule's options in [0, 1), 0 = off
        for name, why in (("store_threshold", "the blend rule writes every token into every slot"),
                          ("context_decay", "the append rule's MLPs take the context")):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"MemoryConfig.{name} must be a number in [0, 1), got {value!r}")
            if value and self.write_rule != "append":
                raise ValueError(f"MemoryConfig.{name} needs write_rule='append' ({why})")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def resolved_read_layers(self) -> tuple[int, ...]:
        return tuple(i % self.num_layers for i in self.read_layers)

    @property
    def resolved_write_layer(self) -> int:
        return self.write_layer % self.num_layers

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "MemoryConfig":
        """Reads the hidden size and layer count from a Hugging Face config.

        Defaults: read at the middle and the last decoder layer, write the
        hidden states of the layer before the middle one.
        """
        def first(*names):
            for n in names:
                if getattr(hf_config, n, None) is not None:
                    return int(getattr(hf_config, n))
            raise ValueError(f"hf_config has none of {names}; pass hidden_size/num_layers "
                             f"to MemoryConfig directly")
        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        mid = layers // 2
        defaults = dict(hidden_size=hidden, num_layers=layers,
                        read_layers=tuple(sorted({mid, layers - 1})),
                        write_layer=max(mid - 1, 0))
        defaults.update(overrides)
        return cls(**defaults)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["read_layers"] = list(self.read_layers)
        return d


def _tracked(mem: Tensor) -> Tensor:
    """A bank tensor whose in-place changes bump a version counter (which the
    key/value cache checks): an inference tensor (made under
    torch.inference_mode) has none, so it is copied to a normal one."""
    if mem.is_inference():
        with torch.inference_mode(False):
            return mem.clone()
    return mem


class Int8Rows(NamedTuple):
    """Bank keys or values cached as int8 with one float32 scale per slot:
    x[..., s, :] ~= scale[..., s] * data[..., s, :] (symmetric, per row of Dh,
    rounding error at most scale / 2 per element). A decode step streams a
    quarter of float32's bytes (plus 4 per slot). Made by
    MemoryBank.keys_values(torch.int8); the fused CPU reader reads it as is,
    other paths dequantize it first."""
    data: Tensor   # int8 [..., S, Dh]
    scale: Tensor  # float32 [..., S]

    @staticmethod
    def quantize(x: Tensor) -> "Int8Rows":
        x = x.float()
        scale = x.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays 0
        data = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return Int8Rows(data.contiguous(), scale.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.data.to(dtype) * self.scale[..., None].to(dtype)


def _reader_operands(keys, values) -> tuple:
    """(keys, values, key_scale, value_scale) as memkernels._C.reader_fwd takes them."""
    if isinstance(keys, Int8Rows):
        return keys.data, values.data, keys.scale, values.scale
    return keys, values, None, None


KV_DTYPES = (torch.bfloat16, torch.int8)  # narrow caches beside the memory's own dtype

_FUSED_READER_CHOICE: dict = {}
_VERSION = operator.attrgetter("_version")
# Counts parameter/submodule (re)assignments on a memory's modules: a memoised
# read (MemoryBank._memoised_fused_read) built before one is rebuilt. The hooks
# are global in torch; modules of a MemoryModel carry _MEMORY_OWNED.
_REGISTRATIONS = [0]
_MEMORY_OWNED = "_memkernels_memory_module"


def _mark_owned(module: nn.Module) -> None:
    for m in module.modules():
        m.__dict__[_MEMORY_OWNED] = True


def _count_parameter_registration(module, name, value):
    if module.__dict__.get(_MEMORY_OWNED):
        _REGISTRATIONS[0] += 1


def _count_module_registration(module, name, value):
    if module.__dict__.get(_MEMORY_OWNED):
        _REGISTRATIONS[0] += 1
        if isinstance(value, nn.Module):
            _mark_owned(value)


torch.nn.modules.module.register_module_parameter_registration_hook(
    _count_parameter_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_module_registration)


def _fused_read_operands(sources: tuple, bank: "MemoryBank", kv_dtype: Optional[torch.dtype],
                         hidden: Tensor, backend: Optional[str]) -> Optional[tuple]:
    """(reader_fwd, keys, values, key_scale, value_scale) for a fused read of
    `bank`'s key/value cache, or None where the fused CPU layer does not apply
    (or a source of the memo is an inference tensor: no version to check)."""
    if any(t.is_inference() for t in sources):
        return None
    keys, values = bank.keys_values(kv_dtype)
    fused = _fused_cpu_reader(hidden, keys, backend)
    return None if fused is None else (fused, *_reader_operands(keys, values))


def _fused_cpu_reader(hidden: Tensor, keys, backend: Optional[str]):
    """memkernels._C.reader_fwd when it applies (CPU backend, float32/64, eager), else None.
    Memoised per (device, dtypes, backend request): it runs once per reading layer per
    decode token."""
    if torch.compiler.is_compiling():
        return None
    keys = keys.data if isinstance(keys, Int8Rows) else keys
    key = (hidden.device.type, hidden.dtype, keys.dtype, backend,
           os.environ.get(_backend.ENV_VAR))
    try:
        return _FUSED_READER_CHOICE[key]
    except KeyError:
        pass
    kv_ok = keys.dtype == hidden.dtype or (keys.dtype in KV_DTYPES
                                           and hidden.dtype == torch.float32)
    fused = None
    if (hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64) and kv_ok
            and _backend.resolve(backend, hidden.device) == "cpu"):
        fused = getattr(_backend.extension()[0], "reader_fwd", None)
    _FUSED_READER_CHOICE[key] = fused
    return fused


class MemoryReader(nn.Module):
    """One reading layer: h <- h + tanh(gate) * W_o(memory_read(W_q norm(h), K, V))."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.query = nn.Linear(config.hidden_size, config.width, bias=False)
        self.out = nn.Linear(config.width, config.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.full((config.hidden_size,), float(config.gate_init)))
        self.backend = config.backend

        self._folded: Optional[tuple] = None

    def fused_plan(self, memory: "MemoryModel", bank: "MemoryBank",
                   kv_dtype: Optional[torch.dtype], hidden: Tensor) -> Optional[tuple]:
        """(sources, fused, args, kwargs) of this layer's fused CPU read of
        `bank` (MemoryBank._memoised_fused_read), or None where it does not apply."""
        sources = (bank._mem, memory.slot_key, memory.slot_value, self.norm.weight,
                   self.query.weight, self.out.weight, self.gate)
        operands = _fused_read_operands(sources, bank, kv_dtype, hidden, self.backend)
        if operands is None:
            return None
        fused, k, v, k_scale, v_scale = operands
        query_w, out_w = self._folded_weights()
        return sources, fused, (query_w, k, v, out_w, self.norm.eps or 1e-6,
                                self.head_dim ** -0.5, k_scale, v_scale), {}

    def forward(self, hidden: Tensor, keys, values) -> Tensor:
        """keys/values: tensors, or Int8Rows (from a no-grad int8 cache)."""
        B, T, C = hidden.shape
        with_grad = torch.is_grad_enabled() and (
            self.gate.requires_grad or self.query.weight.requires_grad
            or self.out.weight.requires_grad or hidden.requires_grad)
        if not with_grad:
            # Inference: the norm weight is folded into the query projection and the
            # gate into the output projection. On the CPU backend the whole layer is
            # one fused C++ call; elsewhere 6 ATen ops. Per decode token, the fixed
            # cost of ~10 small ops was as large as the read of a small bank.
            query_w, out_w = self._folded_weights()
            fused = _fused_cpu_reader(hidden, keys, self.backend)
            if fused is not None:
                k, v, k_scale, v_scale = _reader_operands(keys, values)
                with nvtx_range("memkernels.reader_fwd[cpu]"):
                    return fused(hidden, query_w, k, v, out_w, self._modules["norm"].eps or 1e-6,
                                 self.head_dim ** -0.5, k_scale, v_scale)
        if isinstance(keys, Int8Rows):  # only the fused CPU reader reads int8 in place
            keys, values = keys.dequantize(hidden.dtype), values.dequantize(hidden.dtype)
        if with_grad:
            q = self.query(self.norm(hidden))
            # under autocast q may be bf16 while the bank is not: the read runs in the bank's dtype
            q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).to(keys.dtype)
            read = memory_read(q, keys, values, backend=self.backend).to(hidden.dtype)
            return hidden + torch.tanh(self.gate) * self.out(read.transpose(1, 2).reshape(B, T, -1))
        q = F.linear(F.rms_norm(hidden, (C,), eps=self.norm.eps), query_w)
        read = memory_read(q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                           .to(keys.dtype), keys, values, backend=self.backend).to(hidden.dtype)
        out = torch.addmm(hidden.reshape(B * T, C), read.transpose(1, 2).reshape(B * T, -1), out_w)
        return out.view(B, T, C)

    def _params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(norm weight, query weight, out weight, gate), looked up in the module
        dicts: nn.Module.__getattr__ costs ~0.7 us a lookup, paid per reading
        layer per decode token."""
        modules = self._modules
        return (modules["norm"]._parameters["weight"], modules["query"]._parameters["weight"],
                modules["out"]._parameters["weight"], self._parameters["gate"])

    def _folded_weights(self) -> tuple[Tensor, Tensor]:
        norm_w, query_w, out_w, gate = self._params()
        try:
            stamp = (norm_w._version, query_w._version, out_w._version, gate._version,
                     norm_w.data_ptr(), query_w.data_ptr(), out_w.data_ptr(), gate.data_ptr())
        except RuntimeError:  # parameters created under inference_mode: no version to trust
            stamp = None
        folded = self._folded
        if folded is None or stamp is None or folded[0] != stamp:
            with torch.no_grad():
                folded = (stamp, query_w * norm_w,
                          (out_w * torch.tanh(gate)[:, None]).t().contiguous())
            self._folded = folded
        return folded[1], folded[2]


class MemoryModel(nn.Module):
    """The trained parameters of a slot-bank memory for one host LLM."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        H, S, D, W = config.num_heads, config.num_slots, config.head_dim, config.width

        def per_head_identity():  # identity plus noise: a slot's key starts as its content
            return nn.Parameter(torch.eye(D).repeat(H, 1, 1) + torch.randn(H, D, D) * D ** -0.5 / 4)

        self.init_bank = nn.Parameter(torch.randn(H, S, D))
        self.slot_key = per_head_identity()
        self.slot_value = per_head_identity()
        self.slot_query = per_head_identity()
        self.write_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.token_key = nn.Linear(config.hidden_size, W, bias=False)
        self.token_value = nn.Linear(config.hidden_size, W, bias=False)
        self.forget = nn.Parameter(torch.zeros(H, D))
        self.forget_bias = nn.Parameter(torch.full((H,), float(config.forget_bias)))
        self.input = nn.Parameter(torch.zeros(H, D))
        self.input_bias = nn.Parameter(torch.full((H,), float(config.input_bias)))
        self.readers = nn.ModuleList(MemoryReader(config) for _ in config.read_layers)
        # Sharp attention from the start (score std ~4 against unit-scale slots):
        # with the default Linear init a slot averages all tokens of a write
        # (and a query all slots) nearly uniformly, and nothing can be learned
        # from a uniform average.
        sharp = 4.0 / math.sqrt(config.hidden_size)
        nn.init.normal_(self.token_key.weight, std=sharp)
        for reader in self.readers:
            nn.init.normal_(reader.query.weight, std=sharp)
        _mark_owned(self)  # see _REGISTRATIONS

    # --- banks ------------------------------------------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        """The content of a fresh bank [batch_size, H, S, Dh], differentiable
        in the trained initial bank (what a training episode writes into).
        num_slots: only config.num_slots for the blend rule (its slots are
        trained); any size above null_slots for the append rule."""
        if num_slots not in (None, self.config.num_slots):
            raise ValueError(f"num_slots: a blend-rule bank has the trained "
                             f"{self.config.num_slots} slots, got {num_slots}")
        return self.init_bank.unsqueeze(0).expand(batch_size, -1, -1, -1)

    def new_bank(self, batch_size: int = 1, num_slots: Optional[int] = None) -> "MemoryBank":
        """A fresh bank (state, detached from the parameters): batch_size rows,
        each a copy of the trained initial bank. One row is shared by every
        sequence of a batch. num_slots: see fresh_mem."""
        return MemoryBank(self, self.fresh_mem(batch_size, num_slots).detach().clone())

    def slots_to_store(self, tokens: int) -> Optional[int]:
        """The num_slots of a fresh bank that can take `tokens` tokens: None
        (the trained size) for the blend rule, whatever is written."""
        return None

    def shrink_to_fit(self, mem: Tensor) -> Tensor:
        """A fresh bank that store() filled, without the slots it left empty
        (append rule; the blend rule's bank is returned as it is)."""
        return mem

    def trainable_bank(self) -> "MemoryBank":
        """The initial bank as a view of the parameter (for training the bank
        itself: gradients flow into init_bank)."""
        return MemoryBank(self, self.init_bank.unsqueeze(0))

    def slot_mask(self, mem: Tensor) -> Optional[Tensor]:
        """Which slots a read sees, bool [B, S] (None: all of them)."""
        return None

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Read keys and values of a bank [B, H, S, Dh]; a one-row bank is
        returned as [H, S, Dh], the shared-bank layout the kernels read once
        for a whole batch."""
        spec = "bhsd,hde->bhse"
        if mem.shape[0] == 1:
            mem, spec = mem[0], "hsd,hde->hse"
        # in the bank's dtype, also under autocast
        return (torch.einsum(spec, mem, self.slot_key).to(mem.dtype).contiguous(),
                torch.einsum(spec, mem, self.slot_value).to(mem.dtype).contiguous())

    # --- read and write -----------------------------------------------------------

    def read(self, reader_index: int, hidden: Tensor, bank: "MemoryBank",
             kv_dtype: Optional[torch.dtype] = None, context: Optional[Tensor] = None) -> Tensor:
        """hidden [B, T, hidden_size] plus the gated memory read of reader i
        (kv_dtype: see MemoryBank.keys_values; context: MemoryConfig.context_decay,
        never used by this rule)."""
        self._check_bank_rows(bank, hidden)
        self._check_context(context, hidden)
        if not torch.is_grad_enabled():
            out = bank._memoised_fused_read(reader_index, hidden, kv_dtype)
            if out is not None:
                return out
        keys, values = bank.keys_values(kv_dtype)
        return self.readers[reader_index](hidden, keys, values)

    def write(self, mem: Tensor, hidden: Tensor, token_mask: Optional[Tensor] = None,
              value_hidden: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        """Writes tokens into a bank: differentiable, returns the new bank.

        mem: [B, H, S, Dh]; hidden: the write layer's hidden states
        [B, T, hidden_size]; token_mask: bool [B, T], True = real token;
        value_hidden: the hidden states the token values are projected from
        (same shape; default `hidden`; see MemoryConfig.values_from);
        context: MemoryConfig.context_decay (never used by this rule).
        A row with no real token is left unchanged (no forgetting either).
        """
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

    @staticmethod
    def _check_bank_rows(bank: "MemoryBank", hidden: Tensor) -> None:
        if bank.mem.shape[0] not in (1, hidden.shape[0]):
            raise ValueError(f"bank has {bank.batch_size} rows but the model's batch has "
                             f"{hidden.shape[0]}; use a one-row bank (shared by the batch) or "
                             f"one row per sequence (MemoryBank.stack)")

    def _check_context(self, context: Optional[Tensor], hidden: Tensor) -> None:
        """context goes with MemoryConfig.context_decay > 0, shaped as hidden."""
        if not self.config.context_decay:
            if context is not None:
                raise ValueError("context is given but this memory does not key on it "
                                 "(MemoryConfig.context_decay is 0)")
            return
        if context is None:
            raise ValueError("this memory keys on the context (MemoryConfig.context_decay > 0): "
                             "pass context=append_memory.decayed_context(embeddings, mask, decay)"
                             "[0], or read through memkernels.attach, which tracks it")
        if context.shape != hidden.shape:
            raise ValueError(f"context must have the shape of hidden {tuple(hidden.shape)}, "
                             f"got {tuple(context.shape)}")

    def _check_write_args(self, mem: Tensor, hidden: Tensor, value_hidden: Optional[Tensor],
                          context: Optional[Tensor] = None) -> None:
        B = hidden.shape[0]
        H, D = self.config.num_heads, self.config.head_dim
        if mem.dim() != 4 or mem.shape[0] != B or mem.shape[1] != H or mem.shape[3] != D:
            raise ValueError(f"mem must be [B, H, S, Dh] = [{B}, {H}, S, {D}] for hidden of "
                             f"shape {tuple(hidden.shape)}, got {tuple(mem.shape)}")
        if value_hidden is not None and value_hidden.shape != hidden.shape:
            raise ValueError(f"value_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                             f"got {tuple(value_hidden.shape)}")
        self._check_context(context, hidden)

    def store(self, model, tokenizer, items, bank: Optional["MemoryBank"] = None, *,
              chunk_size: int = 64, max_length: Optional[int] = None,
              progress: Optional[bool] = None) -> "MemoryBank":
        """Writes texts (or token ids) into a bank through the frozen model.

        items: for a one-row bank, a str, a list of str, or a list of token-id
        lists; for a bank of B rows, a list of B such lists (row b's texts go
        to row b). Every text is encoded on its own (no attention across
        texts); chunk_size texts per row make one write. The write layer's
        hidden states come from the base model (memory reads are off while
        encoding). Returns the bank (if bank is None, a new one-row bank: under
        the append rule with a slot per stored token, at least num_slots, so
        exactly full once past num_slots; store more into a bigger one,
        memory.new_bank(num_slots=...)).
        """
        from memkernels.integration import encode_for_write  # noqa: PLC0415 (import cycle)
        return encode_for_write(self, model, tokenizer, items, bank, chunk_size=chunk_size,
                                max_length=max_length, progress=progress)

    # --- persistence of the trained memory -----------------------------------------

    def fingerprint(self) -> str:
        """Hash of the config and the parameters that give a bank's content its
        meaning (bank projections, write projections, gates). A saved bank
        records it; loading with another memory is refused unless strict=False."""
        config = self.config.to_dict()
        if self.config.write_rule == "blend":  # as before these fields existed
            for key in ("write_rule", "null_slots", "read_scale", "mlp_hidden"):
                del config[key]
        for key in ("store_threshold", "context_decay"):  # as before these options existed
            if not config[key]:
                del config[key]
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, p in sorted(self.named_parameters()):
            if name.startswith(("slot_", "token_", "write_norm", "forget", "input", "address")):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """config.json + memory.safetensors (atomically replaced)."""
        from safetensors.torch import save_file  # noqa: PLC0415
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(os.path.join(directory, "memory.safetensors"),
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "memkernels.memory"}))
        _atomic_write(os.path.join(directory, "config.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(self.config.to_dict(), indent=2)))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike],
                        map_location: Union[str, torch.device] = "cpu") -> "MemoryModel":
        from safetensors.torch import load_file  # noqa: PLC0415
        with open(os.path.join(directory, "config.json")) as f:
            config = MemoryConfig(**json.load(f))
        state = load_file(os.path.join(directory, "memory.safetensors"))
        memory = (build_memory(config) if cls is MemoryModel else cls(config))
        memory = memory.to(dtype=state["init_bank"].dtype)  # keep the saved precision
        memory.load_state_dict(state)
        return memory.to(map_location)


def build_memory(config: MemoryConfig) -> MemoryModel:
    """The memory model that config.write_rule names."""
    if config.write_rule == "append":
        from memkernels.append_memory import AppendMemory  # noqa: PLC0415 (import cycle)
        return AppendMemory(config)
    return MemoryModel(config)


def _atomic_write(path: str, write) -> None:
    """write(tmp_path) to a temporary file beside `path`, then rename it over
    `path`: a crash never leaves a half-written file under the real name."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class MemoryBank:
    """The content of a memory at run time: [B, H, S, Dh], one row per user or
    sequence (one row = shared by a whole batch).

    Not a parameter: writes replace the tensor (never modify it in place, so
    a failed write leaves the bank as it was). Read keys and values are
    projected once and cached until the next write or parameter update.
    """

    def __init__(self, memory: MemoryModel, mem: Tensor):
        c = memory.config
        if mem.dim() != 4 or mem.shape[1] != c.num_heads or mem.shape[3] != c.head_dim:
            raise ValueError(f"bank tensor must be [B, H, S, Dh] with H={c.num_heads}, "
                             f"Dh={c.head_dim}, got {tuple(mem.shape)}")
        self.memory = memory
        self._mem = _tracked(mem)
        self._cache: Optional[tuple] = None
        self._mask_cache: Optional[tuple] = None
        self._index_spec: Optional[tuple[int, Optional[int]]] = None  # build_index: (probes, clusters)
        self._plans: dict = {}  # reader index -> memoised fused read (_memoised_fused_read)

    @property
    def mem(self) -> Tensor:
        return self._mem

    @mem.setter
    def mem(self, value: Tensor) -> None:
        self._mem = _tracked(value)
        self._cache = None
        self._mask_cache = None
        self._plans = {}

    @property
    def batch_size(self) -> int:
        return self._mem.shape[0]

    @property
    def num_slots(self) -> int:
        return self._mem.shape[2]

    def __repr__(self) -> str:
        return (f"MemoryBank(rows={self.batch_size}, heads={self._mem.shape[1]}, "
                f"slots={self.num_slots}, head_dim={self._mem.shape[3]}, dtype={self._mem.dtype}, "
                f"device={self._mem.device})")

    def keys_values(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(keys, values) for memory_read, cached while neither the bank nor
        the projections change. dtype: the cache's dtype (default the bank's;
        torch.bfloat16 halves what a decode step reads; torch.int8 quarters
        it, returned as Int8Rows with a scale per slot). With autograd
        recording and a trainable bank or projection, they are recomputed in
        the bank's dtype so gradients reach them."""
        m, mem = self.memory, self._mem
        # the module dict, not nn.Module.__getattr__: see MemoryReader._params
        slot_key, slot_value = m._parameters["slot_key"], m._parameters["slot_value"]
        if torch.is_grad_enabled() and (mem.requires_grad or slot_key.requires_grad
                                        or slot_value.requires_grad):
            return m.bank_keys_values(mem)
        return self._cached_keys_values(dtype)[0]

    def _cached_keys_values(self, dtype: Optional[torch.dtype]) -> tuple:
        """((keys, values), index or None), cached; with an index (build_index)
        the slots come sorted by cluster (a read over all of them is the
        same: a softmax does not depend on the order of its slots)."""
        m, mem = self.memory, self._mem
        slot_key, slot_value = m._parameters["slot_key"], m._parameters["slot_value"]
        dtype = dtype or mem.dtype
        try:
            stamp = (mem._version, slot_key._version, slot_value._version, mem.data_ptr(),
                     slot_key.data_ptr(), slot_value.data_ptr(), dtype, self._index_spec)
        except RuntimeError:  # projections created under inference_mode: no version to trust
            stamp = None
        cache = self._cache
        if cache is None or stamp is None or cache[0] != stamp:
            with torch.no_grad():
                keys, values = m.bank_keys_values(mem)
                index = None
                if self._index_spec is not None and keys.dim() == 3:  # one row, compacted
                    from memkernels.append_memory import cluster_slots  # noqa: PLC0415
                    probes, clusters = self._index_spec
                    S = keys.shape[1]
                    order, centroids, starts = cluster_slots(
                        keys, clusters or max(1, round(math.sqrt(S))))
                    keys, values = (torch.gather(t, 1, order[..., None].expand_as(t)).contiguous()
                                    for t in (keys, values))
                    index = (centroids.to(mem.dtype).contiguous(), starts.cpu().contiguous(), probes)
                if dtype == torch.int8:
                    kv = Int8Rows.quantize(keys), Int8Rows.quantize(values)
                else:
                    kv = keys.to(dtype), values.to(dtype)
                cache = self._cache = (stamp, (kv, index))
        return cache[1]

    def build_index(self, probes: int = 8, clusters: Optional[int] = None) -> "MemoryBank":
        """Approximate reads for a large one-row bank: its keys are clustered
        (spherical k-means per kv head, `clusters` clusters, default sqrt of
        the slots) and each query row reads the slots of its `probes`
        nearest clusters only, not all S (an inverted-file index, as vector
        search does it). Applies to the append rule's fused CPU read, where
        a cosine x 20 read puts nearly all its weight on a few slots; every
        other read stays exact. Rebuilt lazily when the bank or the memory's
        weights change; not saved with the bank, nor carried by clone/stack/
        merge (build it again there). Returns the bank."""
        if self.batch_size != 1:
            raise ValueError(f"build_index: a one-row bank (shared by the batch), this one has "
                             f"{self.batch_size} rows")
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        if clusters is not None and (not isinstance(clusters, int) or clusters < 1):
            raise ValueError(f"clusters must be a positive int or None, got {clusters!r}")
        self._index_spec = (probes, clusters)
        self._plans = {}
        return self

    def drop_index(self) -> "MemoryBank":
        """Exact reads again (see build_index)."""
        self._index_spec = None
        self._plans = {}
        return self

    def read_index(self, dtype: Optional[torch.dtype] = None) -> Optional[tuple]:
        """(centroids [Hk, clusters, Dh], cluster_starts [Hk, clusters + 1],
        probes) of the keys keys_values(dtype) returns, or None without an index."""
        return self._cached_keys_values(dtype)[1]

    def slot_mask(self) -> Optional[Tensor]:
        """Which slots reads see, bool [B, S], or None for all of them (the
        memory's rule: MemoryModel.slot_mask), cached until the bank changes."""
        mem = self._mem
        try:
            stamp = (mem._version, mem.data_ptr())
        except RuntimeError:
            stamp = None
        cache = self._mask_cache
        if cache is None or stamp is None or cache[0] != stamp:
            cache = self._mask_cache = (stamp, self.memory.slot_mask(mem))
        return cache[1]

    def _memoised_fused_read(self, reader_index: int, hidden: Tensor,
                             kv_dtype: Optional[torch.dtype],
                             context: Optional[Tensor] = None) -> Optional[Tensor]:
        """Reader i's inference read through the fused CPU layer, its operands
        (keys/values, folded weights) memoised; None where that path does not
        apply. context: [B, T, C], the append rule's (MemoryConfig.context_decay).

        Why memoised this way: in a decode step every Python function and
        every object a read touches is cold, evicted by the weights streamed
        since the last token; in the decode loop the general path spent ~90 us
        per read outside the C++ call, ~12 us of it on a few dict lookups. So
        a valid memo is checked in builtins only, on the tensors it was built
        from (version and storage: in-place updates, `.data =`), the dtypes and
        a count of parameter/submodule assignments on the memory's modules (a
        reassigned parameter or reader). The backend is picked when the memo is built
        (a change of $MEMKERNELS_BACKEND applies from the next change of the
        bank or the memory's parameters)."""
        plan = self._plans.get(reader_index)
        if plan is not None:
            sources = plan[3]
            try:
                stamp = (_REGISTRATIONS[0], hidden.dtype, hidden.is_cpu, kv_dtype,
                         *map(_VERSION, sources), *map(Tensor.data_ptr, sources))
            except RuntimeError:  # inference tensors (parameters made under inference_mode)
                return None
            if stamp == plan[0]:
                kwargs = plan[4] if context is None else {**plan[4], "context": context}
                with nvtx_range("memkernels.reader_fwd[cpu]"):
                    return plan[1](hidden, *plan[2], **kwargs)
        built = self.memory.readers[reader_index].fused_plan(self.memory, self, kv_dtype, hidden)
        if built is None:
            self._plans.pop(reader_index, None)
            return None
        sources, fused, args, kwargs = built
        stamp = (_REGISTRATIONS[0], hidden.dtype, hidden.is_cpu, kv_dtype,
                 *map(_VERSION, sources), *map(Tensor.data_ptr, sources))
        self._plans[reader_index] = (stamp, fused, args, sources, kwargs)
        if context is not None:
            kwargs = {**kwargs, "context": context}
        with nvtx_range("memkernels.reader_fwd[cpu]"):
            return fused(hidden, *args, **kwargs)

    def store(self, model, tokenizer, items, **kwargs) -> "MemoryBank":
        """Writes texts into this bank (see MemoryModel.store)."""
        return self.memory.store(model, tokenizer, items, bank=self, **kwargs)

    def clone(self) -> "MemoryBank":
        return MemoryBank(self.memory, self._mem.detach().clone())

    def row(self, index: int) -> "MemoryBank":
        """Row `index` as a one-row bank (a copy)."""
        return MemoryBank(self.memory, self._mem[index:index + 1].detach().clone())

    @staticmethod
    def stack(banks: Sequence["MemoryBank"]) -> "MemoryBank":
        """One batched bank from several (row order kept): each sequence of a
        batch reads its own bank."""
        _check_compatible(banks, "stack")
        return MemoryBank(banks[0].memory, torch.cat([b.mem.detach() for b in banks], dim=0))

    @staticmethod
    def merge(a: "MemoryBank", b: "MemoryBank") -> "MemoryBank":
        """Joins two banks by concatenating their slots (S_a + S_b): reads see
        what either bank holds, without retraining. Write queries come from
        slot content, so the merged bank can be written to as well."""
        _check_compatible((a, b), "merge")
        if a.batch_size != b.batch_size:
            raise ValueError(f"merge needs banks with as many rows, got {a.batch_size} and "
                             f"{b.batch_size}")
        return MemoryBank(a.memory, torch.cat([a.mem.detach(), b.mem.detach()], dim=2))

    # --- persistence -------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Saves the bank as safetensors with its config, the memory's
        fingerprint and a checksum; written to a temporary file and renamed,
        so `path` is never half-written."""
        from safetensors.torch import save_file  # noqa: PLC0415
        mem = self._mem.detach().cpu().contiguous()
        metadata = {
            "format": BANK_FORMAT, "format_version": str(BANK_FORMAT_VERSION),
            "config": json.dumps(self.memory.config.to_dict(), sort_keys=True),
            "memory_fingerprint": self.memory.fingerprint(),
            "sha256": _tensor_sha256(mem),
        }
        _atomic_write(os.fspath(path), lambda tmp: save_file({"mem": mem}, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], memory: MemoryModel, *,
             strict: bool = True) -> "MemoryBank":
        """Loads a bank saved by save() for use with `memory`.

        Raises ValueError when the file is not a bank, has another format
        version, is corrupt (checksum), or was made for a memory of other
        sizes; with strict=True also when it was made with other trained
        parameters (memory fingerprint). The bank goes to the memory's device
        and dtype.
        """
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no memory bank file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                mem = f.get_tensor("mem") if "mem" in f.keys() else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path!r} is not a readable safetensors file (corrupt or "
                             f"truncated?): {exc}") from exc
        if meta.get("format") != BANK_FORMAT or mem is None:
            raise ValueError(f"{path!r} is not a memkernels bank (format "
                             f"{meta.get('format')!r}, expected {BANK_FORMAT!r})")
        if meta.get("format_version") != str(BANK_FORMAT_VERSION):
            raise ValueError(f"{path!r} has bank format version {meta.get('format_version')}, "
                             f"this memkernels reads version {BANK_FORMAT_VERSION}")
        if meta.get("sha256") != _tensor_sha256(mem):
            raise ValueError(f"{path!r} is corrupt: its content does not match its checksum")
        saved = json.loads(meta.get("config", "{}"))
        ours = memory.config.to_dict()
        for key in ("hidden_size", "num_heads", "head_dim"):
            if saved.get(key) != ours[key]:
                raise ValueError(f"{path!r} was saved for a memory with {key}={saved.get(key)}, "
                                 f"this memory has {key}={ours[key]}")
        if strict and meta.get("memory_fingerprint") != memory.fingerprint():
            raise ValueError(f"{path!r} was written by a memory with other trained parameters "
                             f"(fingerprint {meta.get('memory_fingerprint')} != "
                             f"{memory.fingerprint()}); pass strict=False to load it anyway")
        p = memory.init_bank
        return cls(memory, mem.to(device=p.device, dtype=p.dtype))


def _check_compatible(banks: Sequence[MemoryBank], what: str) -> None:
    if not banks:
        raise ValueError(f"{what} needs at least one bank")
    first = banks[0]
    for b in banks[1:]:
        if b.memory is not first.memory and b.memory.fingerprint() != first.memory.fingerprint():
            raise ValueError(f"{what}: banks belong to different memories")
        if b.mem.shape[1] != first.mem.shape[1] or b.mem.shape[3] != first.mem.shape[3]:
            raise ValueError(f"{what}: banks have different heads/head_dim: "
                             f"{tuple(first.mem.shape)} vs {tuple(b.mem.shape)}")
        if what == "stack" and b.num_slots != first.num_slots:
            raise ValueError(f"stack needs banks with as many slots, got {first.num_slots} and "
                             f"{b.num_slots}")
        if b.mem.dtype != first.mem.dtype or b.mem.device != first.mem.device:
            raise ValueError(f"{what}: banks differ in dtype/device: {first.mem.dtype}/"
                             f"{first.mem.device} vs {b.mem.dtype}/{b.mem.device}")


def _tensor_sha256(t: Tensor) -> str:
    data = t.contiguous().view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()

