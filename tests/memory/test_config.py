"""MemoryConfig: sizes, rule options, the saved flat form."""
from __future__ import annotations

import pytest

from memkernels import AppendOptions, BlendOptions, MemoryConfig, MemoryModel

from tiny_models import tiny_gpt2, tiny_llama


# --- config ---------------------------------------------------------------------

def test_config_from_hf_reads_sizes_and_picks_layers():
    c = MemoryConfig.from_hf(tiny_llama().config)
    assert (c.hidden_size, c.num_layers) == (48, 3)
    assert c.resolved_read_layers == (1, 2) and c.resolved_write_layer == 0
    c = MemoryConfig.from_hf(tiny_gpt2().config, read_layers=(-1,), write_layer=1)
    assert (c.hidden_size, c.resolved_read_layers, c.resolved_write_layer) == (48, (2,), 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(read_layers=(5,)), "out of range"),
    (dict(read_layers=()), "at least one"),
    (dict(read_layers=(1, -2)), "duplicates"),
    (dict(num_slots=0), "num_slots"),
    (dict(write_layer=-4), "out of range"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**{**dict(hidden_size=8, num_layers=3), **kwargs})


A = AppendOptions


@pytest.mark.parametrize("kwargs, match", [
    (dict(write_rule="hash"), "write_rule"),
    (dict(write_rule="append", num_heads=3), "num_heads must be even"),
    (dict(write_rule="append", append=A(null_slots=16)), "null_slots"),
    (dict(write_rule="append", append=A(read_scale=0.0)), "read_scale"),
    (dict(write_rule="append", append=A(mlp_hidden=0)), "mlp_hidden"),
    (dict(write_rule="append", append=A(store_threshold=1.0)), "store_threshold"),
    (dict(write_rule="append", append=A(store_threshold=-0.1)), "store_threshold"),
    (dict(write_rule="blend", append=A(store_threshold=0.5)),
     "store_threshold needs write_rule='append'"),
    (dict(write_rule="append", append=A(context_decay=1.0)), "context_decay"),
    (dict(write_rule="append", append=A(context_decay=-0.5)), "context_decay"),
    (dict(write_rule="blend", append=A(context_decay=0.7)), "context_decay needs write_rule='append'"),
    (dict(write_rule="append", blend=BlendOptions(forget_bias=0.0)),
     "forget_bias needs write_rule='blend'"),
    (dict(head_dim=300), "head_dim must be at most 256"),
])
def test_config_rejects_bad_rule_settings(kwargs, match):
    base = dict(hidden_size=24, num_layers=3, num_heads=4, head_dim=8, num_slots=16)
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**{**base, **kwargs})


def test_config_saves_flat_and_reads_flat_and_nested_forms():
    """Saved files keep the flat dict (as before the options were grouped);
    from_dict reads it, a nested form, and ignores the other rule's options."""
    config = MemoryConfig(hidden_size=24, num_layers=3, num_heads=4, head_dim=8, num_slots=16,
                          write_rule="append", append=A(null_slots=3, context_decay=0.7))
    flat = config.to_dict()
    assert flat["null_slots"] == 3 and flat["context_decay"] == 0.7 and "append" not in flat
    assert MemoryConfig.from_dict(flat) == config
    nested = {**{k: v for k, v in flat.items() if k not in ("null_slots", "context_decay")},
              "append": {"null_slots": 3, "context_decay": 0.7}}
    assert MemoryConfig.from_dict(nested) == config
    blend = MemoryConfig(hidden_size=24, num_layers=3).to_dict()
    assert MemoryConfig.from_dict({**blend, "null_slots": 99}).append == A()  # not its rule's
    with pytest.raises(ValueError, match="unknown memory config fields"):
        MemoryConfig.from_dict({**blend, "slots": 3})


def test_fingerprint_of_the_shipped_memory_is_unchanged():
    """The written memory that ships loads, and hashes as it did before the
    config grouped its options (the fingerprint reads the flat config), so
    banks saved for it keep loading with strict=True."""
    from memkernels.apps.recall.benchmark import WRITTEN_MEMORY
    memory = MemoryModel.from_pretrained(WRITTEN_MEMORY)
    assert type(memory).__name__ == "AppendMemory"
    assert memory.fingerprint() == "84cea46424ccf37732cc55bdd2c1e321"  # as before the redesign
