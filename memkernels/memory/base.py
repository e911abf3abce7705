"""MemoryModel: the trained parameters of a slot-bank memory for one host LLM,
the base of the write rules (memkernels.memory.blend, .append).

What every rule provides (and the bank, the fused read, the HF layer and the
trainer rely on, never on a rule's class):
- banks: fresh_mem, new_bank, slots_to_store, shrink_to_fit, slot_mask,
  bank_keys_values (the read keys/values of a bank);
- write(mem, hidden, token_mask, value_hidden, context) -> the new bank,
  differentiable;
- read(reader_index, hidden, bank, kv_dtype, context): the gated read of
  reading layer i, through the fused reading layer when it applies
  (memkernels.memory.fused), else through memory_read;
- fingerprint, save_pretrained, from_pretrained.

MemoryModel(config) builds the rule that config.write_rule names.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Union

import torch
import safetensors.torch
from torch import Tensor, nn

from memkernels.memory import fused
from memkernels.memory.bank import MemoryBank, check_same_memory
from memkernels.memory.config import MemoryConfig
from memkernels.memory.files import atomic_write

MEMORY_FORMAT = "memkernels.memory"


class MemoryModel(nn.Module):
    """The trained parameters of a memory. Subclasses: one per write rule,
    registered by `class X(MemoryModel, write_rule="name")`."""

    _rules: dict[str, type] = {}
    write_rule: str = ""

    def __init_subclass__(cls, write_rule: Optional[str] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if write_rule is not None:
            cls.write_rule = write_rule
            MemoryModel._rules[write_rule] = cls

    def __new__(cls, config: Optional[MemoryConfig] = None, *args, **kwargs):
        # MemoryModel(config) is the rule's class; copy/pickle call __new__ bare
        if cls is MemoryModel and config is not None:
            cls = MemoryModel._rules[config.write_rule]
        return super().__new__(cls)

    def __init__(self, config: MemoryConfig):
        if type(self) is MemoryModel:
            raise TypeError("MemoryModel is the base of the write rules")
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        if config.write_rule != self.write_rule:
            raise ValueError(f"{type(self).__name__} needs MemoryConfig(write_rule="
                             f"{self.write_rule!r}), got {config.write_rule!r}")
        super().__init__()
        self.config = config

    # --- banks (each rule) -----------------------------------------------------------

    def fresh_mem(self, batch_size: int = 1, num_slots: Optional[int] = None) -> Tensor:
        """The content of a fresh bank [batch_size, H, S, Dh], differentiable
        in the trained parameters it starts from (what a training episode
        writes into)."""
        raise NotImplementedError

    def slots_to_store(self, tokens: int) -> Optional[int]:
        """The num_slots of a fresh bank that can take `tokens` tokens (None:
        the trained size)."""
        raise NotImplementedError

    def shrink_to_fit(self, mem: Tensor) -> Tensor:
        """A fresh bank that store() filled, without the slots it left empty."""
        raise NotImplementedError

    def slot_mask(self, mem: Tensor) -> Optional[Tensor]:
        """Which slots a read sees, bool [B, S] (None: all of them)."""
        raise NotImplementedError

    @property
    def fixed_bank_heads(self) -> tuple[int, ...]:
        """The heads of a bank [B, H, S, Dh] that training the bank's slots
        (Trainer(bank=...)) leaves as written: none, unless the rule fixes
        what they mean."""
        return ()

    def bank_keys_values(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Read keys and values of a bank [B, H, S, Dh]; a one-row bank's in
        the shared-bank layout [H', S', Dh] that the kernels read once for a
        whole batch."""
        raise NotImplementedError

    def write(self, mem: Tensor, hidden: Tensor, token_mask: Optional[Tensor] = None,
              value_hidden: Optional[Tensor] = None, context: Optional[Tensor] = None) -> Tensor:
        """Writes tokens into a bank: differentiable, returns the new bank.

        mem: [B, H, S, Dh]; hidden: the write layer's hidden states
        [B, T, hidden_size]; token_mask: bool [B, T], True = real token;
        value_hidden: the hidden states the token values come from (same
        shape; default `hidden`; MemoryConfig.values_from); context: each
        token's (AppendOptions.context_decay), else None."""
        raise NotImplementedError

    def read_unfused(self, reader_index: int, hidden: Tensor, bank: MemoryBank,
                     kv_dtype: Optional[torch.dtype], context: Optional[Tensor]) -> Tensor:
        """read() through memory_read (with gradients, or where the fused
        reading layer does not apply)."""
        raise NotImplementedError

    def fused_read_applies(self, bank: MemoryBank) -> bool:
        """Whether a read of `bank` can be one fused reading layer call."""
        raise NotImplementedError

    def new_bank(self, batch_size: int = 1, num_slots: Optional[int] = None) -> MemoryBank:
        """A fresh bank (state, detached from the parameters): batch_size rows.
        One row is shared by every sequence of a batch. num_slots: see the
        rule's fresh_mem."""
        return MemoryBank(self, self.fresh_mem(batch_size, num_slots).detach().clone())

    # --- read -------------------------------------------------------------------------

    def read(self, reader_index: int, hidden: Tensor, bank: MemoryBank,
             kv_dtype: Optional[torch.dtype] = None, context: Optional[Tensor] = None) -> Tensor:
        """hidden [B, T, hidden_size] plus the gated memory read of reader i.
        kv_dtype: the dtype of the bank's cached keys/values (MemoryBank.keys_values);
        context: the decayed context [B, T, C] with AppendOptions.context_decay."""
        if bank.memory is not self:  # identity first: this runs per layer per decode token
            check_same_memory(bank, self, "bank")
        self._check_bank_rows(bank, hidden)
        self._check_context(context, hidden)
        if context is not None:
            context = context.to(hidden.dtype)  # the fused call takes both in one dtype
        if not torch.is_grad_enabled():
            out = fused.read(self, bank, reader_index, hidden, kv_dtype, context)
            if out is not None:
                return out
        return self.read_unfused(reader_index, hidden, bank, kv_dtype, context)

    # --- argument checks ---------------------------------------------------------------

    @staticmethod
    def _check_bank_rows(bank: MemoryBank, hidden: Tensor) -> None:
        if bank.mem.shape[0] not in (1, hidden.shape[0]):
            raise ValueError(f"bank has {bank.batch_size} rows but the model's batch has "
                             f"{hidden.shape[0]}; use a one-row bank (shared by the batch) or "
                             f"one row per sequence (MemoryBank.stack)")

    def _check_context(self, context: Optional[Tensor], hidden: Tensor) -> None:
        """context goes with AppendOptions.context_decay > 0, shaped as hidden."""
        if not self.config.context_decay:
            if context is not None:
                raise ValueError("context is given but this memory does not key on it "
                                 "(MemoryConfig.append.context_decay is 0)")
            return
        if context is None:
            raise ValueError("this memory keys on the context (MemoryConfig.append.context_decay "
                             "> 0): pass context=memkernels.memory.decayed_context(embeddings, "
                             "mask, decay)[0], or read through memkernels.attach, which tracks it")
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
        self._check_write_context(context, hidden)

    @property
    def write_context_width(self) -> int:
        """The width of a write's context (WriteInputs.context); 0: none (the
        append rule's writes have one: AppendMemory.write_context_width)."""
        return 0

    def _check_write_context(self, context: Optional[Tensor], hidden: Tensor) -> None:
        """A write's context: [B, T, write_context_width], None where that is 0."""
        width = self.write_context_width
        if not width:
            if context is not None:
                raise ValueError("context is given but this memory's writes do not key on one "
                                 "(MemoryConfig.append.context_decay is 0, lookahead False)")
            return
        if context is None:
            raise ValueError("this memory keys on the context in its writes (context_decay > 0 "
                             "or lookahead): pass the one memkernels.hf.write_layer_hidden returns "
                             "(WriteInputs.context)")
        want = (*hidden.shape[:-1], width)
        if context.shape != want:
            raise ValueError(f"context must have the shape {list(want)} (hidden's, last dim the "
                             f"write_context_width), got {tuple(context.shape)}")

    # --- persistence of the trained memory -----------------------------------------------

    def fingerprint(self) -> str:
        """Hash of the config and the parameters that give a bank's content its
        meaning (bank projections, write projections, gates). A saved bank
        records it; loading with another memory is refused unless strict=False.
        Hashes the flat config dict as it was before options were grouped, so
        saved banks keep loading."""
        config = self.config.to_dict()
        if self.config.write_rule == "blend":  # as before these fields existed
            for key in ("write_rule", "null_slots", "read_scale", "mlp_hidden"):
                del config[key]
        for key in ("store_threshold", "context_decay", "lookahead"):  # as before these options existed
            if not config[key]:
                del config[key]
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, p in sorted(self.named_parameters()):
            if name.startswith(("slot_", "token_", "write_norm", "forget", "input", "address")):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """config.json + memory.safetensors (each atomically replaced)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, "memory.safetensors"),
                     lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": MEMORY_FORMAT}))
        text = json.dumps(self.config.to_dict(), indent=2)
        atomic_write(os.path.join(directory, "config.json"),
                     lambda tmp: open(tmp, "w").write(text))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike],
                        map_location: Union[str, torch.device] = "cpu") -> "MemoryModel":
        """A memory saved by save_pretrained (its rule's class), on map_location."""
        with open(os.path.join(directory, "config.json")) as f:
            config = MemoryConfig.from_dict(json.load(f))
        state = safetensors.torch.load_file(os.path.join(directory, "memory.safetensors"))
        memory = MemoryModel(config)
        if cls is not MemoryModel and not isinstance(memory, cls):
            raise ValueError(f"{directory!r} holds a {type(memory).__name__}, not a {cls.__name__}")
        memory = memory.to(dtype=state["init_bank"].dtype)  # keep the saved precision
        memory.load_state_dict(state)
        return memory.to(map_location)
