"""Attach a MemoryModel to any Hugging Face causal LM, kept frozen.

    handle = memkernels.attach(model, memory)        # reads a fresh bank
    handle.bank = memkernels.store(memory, model, tok, facts)  # or MemoryBank.load(...)
    model.generate(...)                              # prefill and decode read memory
    handle.detach()                                  # the model as it was

Reads are forward hooks on the chosen decoder layers (the copy rule's: on
the LM head, whose logits it mixes with the stored tokens): no module of the LLM
is replaced and none of its parameters change (attach freezes them and
detach restores their requires_grad flags). A read only depends on the
current token's hidden state and the bank (and, with
AppendOptions.context_decay, on the decayed mean of the embeddings so far,
which the handle carries from one forward call to the next: a call with an
empty or no KV cache starts it afresh), so it composes with the KV cache.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from memkernels.memory.bank import KV_DTYPES, MemoryBank, check_same_memory
from memkernels.memory.base import MemoryModel
from memkernels.memory.context import decayed_context

# Where common HF causal LMs keep their decoder layers (Llama, Mistral, Qwen2,
# Phi, Gemma: model.layers; GPT-2, GPT-J: transformer.h; GPT-NeoX, Pythia:
# gpt_neox.layers; OPT: model.decoder.layers).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "transformer.blocks", "layers")

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, MemoryHandle]" = weakref.WeakKeyDictionary()


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, found by structure: the known
    attribute paths first, else the longest ModuleList of same-type modules."""
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__}; pass "
                         f"layers=[...] (the model's decoder layer modules, in order)")
    return best


class _CallState(threading.local):
    """What one thread's forward calls of the attached model carry: whether
    reads are on, the bank this call reads (taken when the call starts, so a
    concurrent `handle.bank = ...` never splits a forward), the attention mask
    and whether the call continues the previous one, and the context."""
    reading: bool = True
    bank: Optional[MemoryBank] = None
    in_call: bool = False
    call: tuple = (None, False)  # (attention mask, continues a KV cache)
    context: Optional[Tensor] = None
    context_state: Optional[tuple[Tensor, Tensor]] = None


class MemoryHandle:
    """A memory attached to a model. Set `bank` to choose what is read (one
    row shared by the batch, or one row per sequence); `detach()` removes
    every hook and restores the model exactly. Also a context manager.

    Threads: each thread's forward calls keep their own state (reads on or
    off, the bank read, the context), so threads may run the model, store()
    and generate() side by side; `handle.bank = ...` applies from the next
    forward call of each thread."""

    def __init__(self, model: nn.Module, memory: MemoryModel, layers: Sequence[nn.Module],
                 bank: Optional[MemoryBank], kv_dtype: Optional[torch.dtype] = None):
        self.model, self.memory, self.layers = model, memory, list(layers)
        self._bank: Optional[MemoryBank] = None
        self.bank = bank
        self.kv_dtype = kv_dtype
        self._local = _CallState()
        self._requires_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        if getattr(memory, "reads_logits", False):  # the copy rule: at the LM head
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None or getattr(head, "weight", None) is None:
                raise ValueError(f"a {type(memory).__name__} reads at the LM head, and "
                                 f"{type(model).__name__} has none (get_output_embeddings())")
            self._hooks = [head.register_forward_hook(self._mix_hook())]
        else:
            self._hooks = [self.layers[i].register_forward_hook(self._read_hook(r))
                           for r, i in enumerate(memory.config.resolved_read_layers)]
        self._hooks += [model.register_forward_pre_hook(self._begin_call, with_kwargs=True),
                        model.register_forward_hook(self._end_call, always_call=True)]
        if memory.config.context_decay:
            self._hooks.append(
                self.layers[0].register_forward_pre_hook(self._track_context, with_kwargs=True))
        _ATTACHED[model] = self

    @property
    def reading(self) -> bool:
        """Whether this thread's forward calls read the memory (reads_disabled)."""
        return self._local.reading

    @property
    def context(self) -> Optional[Tensor]:
        """This thread's context [B, T, C] of its last forward call's tokens
        (AppendOptions.context_decay), or None."""
        return self._local.context

    def _bank_to_read(self) -> Optional[MemoryBank]:
        """The bank this thread's current forward call reads, or None (no
        bank, or reads off)."""
        local = self._local
        if not local.reading:
            return None
        return local.bank if local.in_call else self._bank

    def _read_hook(self, reader_index: int):
        memory = self.memory
        uses_context = bool(memory.config.context_decay)
        local = self._local

        def hook(module, args, output):
            bank = self._bank_to_read()
            if bank is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            read = memory.read(reader_index, hidden, bank, self.kv_dtype,
                               local.context if uses_context else None)
            # transformers < 5 returns (hidden, ...)
            return (read, *output[1:]) if isinstance(output, tuple) else read
        return hook

    def _mix_hook(self):
        memory = self.memory
        uses_context = bool(memory.config.context_decay)
        local = self._local

        def hook(module, args, output):
            bank = self._bank_to_read()
            if bank is None:
                return None
            hidden = args[0]
            context = None
            if uses_context:  # the head may see only the last positions (logits_to_keep)
                context = local.context[:, -hidden.shape[1]:]
            return memory.mix_logits(hidden, output, module.weight, bank, self.kv_dtype, context)
        return hook

    def _begin_call(self, module, args, kwargs):
        """A forward call of the model: the bank it reads, its attention mask
        (to skip padding), and whether it continues the previous call's
        sequences (a non-empty KV cache) or starts new ones."""
        local = self._local
        local.bank, local.in_call = self._bank, True
        if not self.memory.config.context_decay:
            return
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        past = kwargs.get("past_key_values")
        if past is not None and hasattr(past, "get_seq_length"):
            cached = past.get_seq_length()
            self._follow_reordering(past)
        elif isinstance(past, (tuple, list)) and past and past[0] is not None:
            cached = past[0][0].shape[-2]  # legacy (key, value) tuples
        else:
            cached = 0
        local.call = (mask, cached > 0)

    def _end_call(self, module, args, output):
        self._local.in_call = False

    def _follow_reordering(self, cache) -> None:
        """Beam search reorders the KV cache's rows between steps: the context
        state of each row follows them (wrapping the cache's reorder_cache once)."""
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is None or getattr(reorder, "_memkernels_follows", False):
            return
        local = self._local

        def reorder_with_context(beam_idx):
            reorder(beam_idx)
            state = local.context_state
            if state is not None:
                local.context_state = tuple(t.index_select(0, beam_idx.to(t.device))
                                            for t in state)
        reorder_with_context._memkernels_follows = True
        cache.reorder_cache = reorder_with_context

    def _track_context(self, module, args, kwargs):
        """The first decoder layer's input: the context of this call's tokens
        (not while reads are off: encoding text to store leaves a decode's
        context as it was)."""
        local = self._local
        if not local.reading:
            return
        embeddings = args[0] if args else kwargs["hidden_states"]
        B, T, _ = embeddings.shape
        mask, continues = local.call
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < T):
            mask = None  # not a [B, past + T] padding mask: every token is real
        state = local.context_state
        if not continues or state is None or state[0].shape[0] != B:
            state = None
        local.context, local.context_state = decayed_context(
            embeddings.detach(), None if mask is None else mask[:, -T:],
            self.memory.config.context_decay, state)
        local.call = (None, False)  # a later call without the model's forward starts afresh

    @property
    def bank(self) -> Optional[MemoryBank]:
        return self._bank

    @bank.setter
    def bank(self, bank: Optional[MemoryBank]) -> None:
        if bank is not None:
            check_same_memory(bank, self.memory, "bank")
            p = self.memory.init_bank
            if bank.mem.device != p.device or bank.mem.dtype != p.dtype:
                raise ValueError(f"bank must be on the memory's device/dtype ({p.device}, "
                                 f"{p.dtype}), got ({bank.mem.device}, {bank.mem.dtype})")
        self._bank = bank

    @contextlib.contextmanager
    def using(self, bank: Optional[MemoryBank]) -> Iterator["MemoryHandle"]:
        """Reads `bank` inside the block, then the previous bank again."""
        previous = self._bank
        self.bank = bank
        try:
            yield self
        finally:
            self._bank = previous

    @contextlib.contextmanager
    def reads_disabled(self) -> Iterator["MemoryHandle"]:
        """The base model inside the block, for this thread's calls (used while
        encoding text to store)."""
        local = self._local
        previous, local.reading = local.reading, False
        try:
            yield self
        finally:
            local.reading = previous

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def detach(self) -> None:
        """Removes the hooks and restores the parameters' requires_grad flags.
        Once: detaching again (a stale handle, after another attach) does nothing."""
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> "MemoryHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def check_kv_dtype(kv_dtype: Optional[torch.dtype], memory_dtype: torch.dtype,
                   device: torch.device) -> None:
    """attach()'s kv_dtype: None, the memory's dtype, bfloat16, or (CPU only) int8."""
    if kv_dtype not in (None, memory_dtype, *KV_DTYPES):
        raise ValueError(f"kv_dtype must be None, the memory's dtype ({memory_dtype}), "
                         f"torch.bfloat16 or torch.int8, got {kv_dtype}")
    if kv_dtype == torch.int8 and torch.device(device).type != "cpu":
        # only the fused CPU reader reads int8 in place; elsewhere every read
        # would dequantize the whole bank first, slower than no cache at all
        raise ValueError(f"kv_dtype=torch.int8 is read in place only on the CPU; the memory is "
                         f"on {device}: use kv_dtype=torch.bfloat16 there")


def attach(model: nn.Module, memory: MemoryModel, bank: Optional[MemoryBank] = None, *,
           layers: Optional[Sequence[nn.Module]] = None,
           kv_dtype: Optional[torch.dtype] = None) -> MemoryHandle:
    """Attaches `memory` to `model` (a Hugging Face causal LM or any model
    whose decoder layers map hidden states [B, T, hidden] to the same).

    bank: what the layers read; default a fresh one-row bank (with the gates
    closed at initialisation, the model's outputs are unchanged). layers:
    the decoder layer modules, for models not found by structure. The
    model's parameters are frozen until detach(). kv_dtype: the dtype of
    the bank keys/values cached for reads without gradients (decoding);
    torch.bfloat16 halves the bytes a decode step streams per reading layer,
    at bf16 rounding of keys and values; torch.int8 quarters them (one
    float32 scale per slot, error at most half a step of 1/127 of the slot's
    largest entry; CPU only). Queries, scores and sums stay float32. The int8
    cache is read in place by the fused CPU reader (the reference backend
    dequantizes it).
    """
    if not isinstance(memory, MemoryModel):
        raise TypeError(f"memory must be a MemoryModel, got {type(memory).__name__}")
    if model in _ATTACHED:
        raise ValueError(f"a memory is already attached to this {type(model).__name__}; "
                         f"detach() it first")
    layers = list(find_decoder_layers(model) if layers is None else layers)
    c = memory.config
    if len(layers) != c.num_layers:
        raise ValueError(f"memory was configured for {c.num_layers} decoder layers, the model "
                         f"has {len(layers)}")
    hidden = _hf_hidden_size(model)
    if hidden is not None and hidden != c.hidden_size:
        raise ValueError(f"memory was configured for hidden_size={c.hidden_size}, the model "
                         f"has hidden_size={hidden}")
    ref = next(model.parameters(), None)
    p = memory.init_bank
    if ref is not None and (ref.device != p.device or (ref.is_floating_point() and ref.dtype != p.dtype)):
        raise ValueError(f"memory must be on the model's device and dtype ({ref.device}, "
                         f"{ref.dtype}), got ({p.device}, {p.dtype}); use memory.to(...)")
    check_kv_dtype(kv_dtype, p.dtype, p.device)
    return MemoryHandle(model, memory, layers, memory.new_bank() if bank is None else bank,
                        kv_dtype)


def attached_handle(model: nn.Module) -> Optional[MemoryHandle]:
    """The handle of the memory attached to `model`, or None."""
    return _ATTACHED.get(model)


def _hf_hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None
