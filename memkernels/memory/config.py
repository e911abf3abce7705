"""MemoryConfig: the sizes and choices of a memory attached to a host LLM.

Options that only one write rule reads are grouped (BlendOptions,
AppendOptions), so a config says which rule it configures. Saved files
(config.json of a memory, a bank's metadata) keep the flat dict of
to_dict(), as before the groups existed: from_dict reads both forms, and the
fingerprint of a saved memory does not change. Why each default: docs/design.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

WRITE_RULES = ("blend", "append", "copy")
VALUE_SOURCES = ("write_layer", "embeddings", "output_embeddings")


@dataclasses.dataclass
class BlendOptions:
    """write_rule="blend": the slots attend over the tokens of a write and
    blend the result in through learned gates (the fused write op)."""
    # Initial logits of the forget/input gates. A fresh slot's content is its
    # address (it sets the slot's write query), so the first write should
    # mostly replace it: sigmoid(-2) = 0.12 kept, sigmoid(2) = 0.88 written.
    forget_bias: float = -2.0
    input_bias: float = 2.0


@dataclasses.dataclass
class AppendOptions:
    """write_rule="append": each stored token takes the next empty slot, an
    address (MLP of the write layer's state) in heads [0, H/2) and a content
    (the next token's value) in heads [H/2, H); reads score cosine x
    read_scale through an MLP query (memkernels.memory.append)."""
    # learned default slots at the end of every bank: the "nothing stored" answer
    null_slots: int = 8
    # reads score cosine(query, key) x read_scale
    read_scale: float = 20.0
    # width of the query and address MLPs
    mlp_hidden: int = 512
    # 0 stores every real token; in (0, 1) a learned store gate keeps the
    # tokens whose probability reaches it (a slot per fact, not per token)
    store_threshold: float = 0.0
    # 0 keys on the hidden state alone; d in (0, 1) also feeds the address and
    # query MLPs the decayed mean of the embeddings so far (memory.context)
    context_decay: float = 0.0
    # True: a slot's address also reads the write state of the token after it
    # (the one the slot stores), which a write sees and a causal LM at the
    # slot's own token does not: docs/design.md, "Keying on what follows"
    lookahead: bool = False


@dataclasses.dataclass
class MemoryConfig:
    """The shape of a memory and where it meets the host LLM."""
    # the host LLM's hidden size and decoder layer count
    hidden_size: int
    num_layers: int
    # the memory's width: num_heads x head_dim (head_dim 1..256)
    num_heads: int = 4
    head_dim: int = 32
    # slots per head of a fresh bank (append: the smallest bank store() makes)
    num_slots: int = 1024
    # decoder layers whose output gets the memory read added (negative: from the end)
    read_layers: tuple[int, ...] = (-1,)
    # decoder layer whose output hidden states a write keys on
    write_layer: int = -1
    # the read gates are tanh(gate_init): 0 is closed, so a fresh memory
    # leaves the LLM's outputs unchanged
    gate_init: float = 0.0
    # where written token values come from: "write_layer" (the states the keys
    # come from), "embeddings" (the first decoder layer's input, where a
    # token is still itself; a small LM blurs it within a layer or two) or
    # "output_embeddings" (the LM head's row of the token: the copy rule)
    values_from: str = "write_layer"
    # how a write enters the bank: "blend", "append" or "copy" (the options
    # below; "copy" takes the append options: memkernels.memory.copy)
    write_rule: str = "blend"
    blend: BlendOptions = dataclasses.field(default_factory=BlendOptions)
    append: AppendOptions = dataclasses.field(default_factory=AppendOptions)
    # forces a kernel backend for reads and writes (None: auto)
    backend: Optional[str] = None

    def __post_init__(self):
        self.read_layers = tuple(int(i) for i in self.read_layers)
        if isinstance(self.blend, dict):
            self.blend = BlendOptions(**self.blend)
        if isinstance(self.append, dict):
            self.append = AppendOptions(**self.append)
        if self.values_from not in VALUE_SOURCES:
            raise ValueError(f"MemoryConfig.values_from must be one of {VALUE_SOURCES}, "
                             f"got {self.values_from!r}")
        if self.write_rule not in WRITE_RULES:
            raise ValueError(f"MemoryConfig.write_rule must be one of {WRITE_RULES}, "
                             f"got {self.write_rule!r}")
        if not isinstance(self.blend, BlendOptions) or not isinstance(self.append, AppendOptions):
            raise TypeError("MemoryConfig.blend / .append must be BlendOptions / AppendOptions")
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "num_slots"):
            _positive_int(getattr(self, name), f"MemoryConfig.{name}")
        if self.head_dim > 256:
            raise ValueError(f"MemoryConfig.head_dim must be at most 256 (the kernels' limit), "
                             f"got {self.head_dim}")
        if not self.read_layers:
            raise ValueError("MemoryConfig.read_layers must name at least one decoder layer")
        for i in (*self.read_layers, self.write_layer):
            if not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"MemoryConfig: layer index {i} is out of range for a model with "
                                 f"{self.num_layers} decoder layers")
        if len(set(self.resolved_read_layers)) != len(self.read_layers):
            raise ValueError(f"MemoryConfig.read_layers has duplicates: {self.read_layers}")
        self._check_rule_options()

    def _check_rule_options(self) -> None:
        other = "append" if self.write_rule == "blend" else "blend"
        default = BlendOptions() if other == "blend" else AppendOptions()
        for field in dataclasses.fields(default):  # options of the rule not in use stay default
            if getattr(getattr(self, other), field.name) != getattr(default, field.name):
                raise ValueError(f"MemoryConfig.{other}.{field.name} needs write_rule='{other}' "
                                 f"(this config's rule is {self.write_rule!r})")
        a = self.append
        if not isinstance(a.lookahead, bool):
            raise ValueError(f"MemoryConfig.append.lookahead must be a bool, got {a.lookahead!r}")
        for name in ("null_slots", "mlp_hidden"):
            _positive_int(getattr(a, name), f"MemoryConfig.append.{name}")
        for name in ("store_threshold", "context_decay"):  # in [0, 1), 0 = off
            value = getattr(a, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"MemoryConfig.append.{name} must be a number in [0, 1), "
                                 f"got {value!r}")
        if self.write_rule in ("append", "copy"):
            if self.num_heads % 2:
                raise ValueError(f"MemoryConfig.num_heads must be even with write_rule='append' "
                                 f"(half address, half content heads), got {self.num_heads}")
            if a.null_slots >= self.num_slots:
                raise ValueError(f"MemoryConfig.append.null_slots ({a.null_slots}) must be below "
                                 f"num_slots ({self.num_slots})")
            if not (isinstance(a.read_scale, (int, float)) and a.read_scale > 0):
                raise ValueError(f"MemoryConfig.append.read_scale must be a positive number, "
                                 f"got {a.read_scale!r}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def resolved_read_layers(self) -> tuple[int, ...]:
        return tuple(i % self.num_layers for i in self.read_layers)

    @property
    def resolved_write_layer(self) -> int:
        return self.write_layer % self.num_layers

    @property
    def context_decay(self) -> float:
        """The append rule's context decay (0: no context; always 0 for blend)."""
        return self.append.context_decay

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

    @classmethod
    def for_copy(cls, hf_config, **overrides) -> "MemoryConfig":
        """A copy-rule config (memkernels.memory.copy) for a Hugging Face
        model: the content heads hold a token's output embedding, so
        num_heads / 2 x head_dim = hidden_size (head_dim 64 where it divides
        the hidden size, else its largest divisor up to 256); the read at
        the LM head; the write keys on the last decoder layer's states."""
        probe = cls.from_hf(hf_config)
        C = probe.hidden_size
        head_dim = 64 if C % 64 == 0 else max(d for d in range(1, 257) if C % d == 0)
        defaults = dict(num_heads=2 * (C // head_dim), head_dim=head_dim, read_layers=(-1,),
                        write_layer=-1, values_from="output_embeddings", write_rule="copy")
        return cls.from_hf(hf_config, **{**defaults, **overrides})

    def to_dict(self) -> dict:
        """The flat dict saved files hold (every option at the top level)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("blend", "append")}
        d["read_layers"] = list(self.read_layers)
        d.update(dataclasses.asdict(self.blend))
        d.update(dataclasses.asdict(self.append))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        """A config from to_dict()'s flat form (or with nested blend/append dicts)."""
        if not isinstance(d, dict):
            raise ValueError(f"a memory config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        groups = {}
        for name, options in (("blend", BlendOptions), ("append", AppendOptions)):
            nested = d.pop(name, None) or {}
            flat = {f.name: d.pop(f.name) for f in dataclasses.fields(options) if f.name in d}
            groups[name] = {**flat, **nested}
        # a flat dict names both groups' options: only the rule in use reads its own
        rule = d.get("write_rule", "blend")
        other = "append" if rule == "blend" else "blend"
        groups[other] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown memory config fields: {unknown}")
        return cls(**d, **groups)


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
