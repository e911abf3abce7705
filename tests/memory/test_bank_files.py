"""A bank is read only with its own memory, and a crafted or damaged bank
file is refused with a clear error (never loaded and cast, never read as noise)."""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

import memkernels
from memkernels import AppendOptions, MemoryBank, MemoryConfig, MemoryModel
from memkernels.memory.files import tensor_sha256

from tiny_models import MODELS, make_memory, random_bank


def blend_and_append(hidden=48, layers=3):
    blend = MemoryModel(MemoryConfig(hidden_size=hidden, num_layers=layers, num_heads=2,
                                     head_dim=8, num_slots=16)).double()
    append = MemoryModel(MemoryConfig(hidden_size=hidden, num_layers=layers, num_heads=2,
                                      head_dim=8, num_slots=16, write_rule="append",
                                      append=AppendOptions(null_slots=2, mlp_hidden=8))).double()
    return blend, append


def test_a_bank_of_another_memory_is_refused_at_assignment_attach_and_read():
    model = MODELS["llama"]()
    memory, other = make_memory(model), make_memory(model)  # same sizes, other parameters
    foreign = random_bank(other)
    with memkernels.attach(model, memory) as handle:
        with pytest.raises(ValueError, match="belongs to another memory"):
            handle.bank = foreign
    with pytest.raises(ValueError, match="belongs to another memory"):
        memkernels.attach(model, memory, foreign)
    hidden = torch.randn(1, 2, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match="belongs to another memory"):
        memory.read(0, hidden, foreign)
    twin = copy.deepcopy(memory)  # another object, the same parameters: its banks are fine
    assert memory.read(0, hidden, random_bank(twin)).shape == hidden.shape
    with pytest.raises(TypeError, match="bank must be a MemoryBank"):
        memkernels.attach(model, memory, foreign.mem)


def test_load_refuses_a_bank_of_another_write_rule_even_when_not_strict(tmp_path):
    blend, append = blend_and_append()
    append.new_bank().save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="write_rule='append'"):
        MemoryBank.load(tmp_path / "a.safetensors", blend, strict=False)


def save_raw(path, tensors, metadata):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_crafted_metadata_and_content_are_refused(tmp_path):
    blend, _ = blend_and_append()
    path = tmp_path / "b.safetensors"
    random_bank(blend).save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, mem = f.metadata(), f.get_tensor("mem")
    cases = {
        "list config": ({**meta, "config": "[1, 2]"}, {"mem": mem}, "checksum"),
        "no mem tensor": (meta, {"other": mem}, "has no 'mem' tensor"),
        "tampered fingerprint": ({**meta, "memory_fingerprint": "0" * 32}, {"mem": mem},
                                 "checksum"),
        "tampered config": ({**meta, "config": meta["config"].replace('"gate_init": 0.0',
                                                                      '"gate_init": 1.0')},
                            {"mem": mem}, "checksum"),
    }
    for name, (metadata, tensors, match) in cases.items():
        save_raw(tmp_path / "x.safetensors", tensors, metadata)
        with pytest.raises(ValueError, match=match):
            MemoryBank.load(tmp_path / "x.safetensors", blend)
    # the same with a checksum made to match (a deliberate craft): still refused, clearly
    for name, tensors, match in (
            ("list config", {"mem": mem}, "must be a JSON object"),
            ("int64 bank", {"mem": mem.long()}, "floating-point"),
            ("empty bank", {"mem": mem[:, :, :0]}, "non-empty"),
            ("bool bank", {"mem": mem > 0}, "floating-point")):
        metadata = {**meta, "format_version": "1"}
        if name == "list config":
            metadata["config"] = "[1, 2]"
        metadata["sha256"] = tensor_sha256(tensors["mem"].contiguous())
        save_raw(tmp_path / "y.safetensors", tensors, metadata)
        with pytest.raises(ValueError, match=match):
            MemoryBank.load(tmp_path / "y.safetensors", blend, strict=False)


def test_a_format_1_bank_still_loads(tmp_path):
    """Format 1's checksum covered the tensor only."""
    blend, _ = blend_and_append()
    bank = random_bank(blend)
    mem = bank.mem.detach().contiguous()
    save_raw(tmp_path / "v1.safetensors", {"mem": mem}, {
        "format": "memkernels.bank", "format_version": "1",
        "config": json.dumps(blend.config.to_dict(), sort_keys=True),
        "memory_fingerprint": blend.fingerprint(), "sha256": tensor_sha256(mem)})
    assert torch.equal(MemoryBank.load(tmp_path / "v1.safetensors", blend).mem, bank.mem)


def test_an_all_zero_append_bank_is_refused_with_a_clear_error():
    _, append = blend_and_append()
    zero = MemoryBank(append, torch.zeros(1, 2, 6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="no written slot and no null slot"):
        with torch.no_grad():
            append.read(0, torch.randn(1, 1, 48, dtype=torch.float64), zero)


def test_cluster_slots_in_chunks_matches_one_pass():
    """The index's k-means assigns slots a chunk at a time (bounded memory
    for any number of clusters); the chunks give the one-pass result."""
    from memkernels.memory import index
    keys = torch.nn.functional.normalize(torch.randn(2, 300, 8), dim=-1)
    one_pass = index.cluster_slots(keys, 40)
    real = index._nearest
    try:
        index._nearest = lambda x, c: real(x, c, scores_per_chunk=64)
        chunked = index.cluster_slots(keys, 40)
    finally:
        index._nearest = real
    for a, b in zip(one_pass, chunked):
        assert torch.equal(a, b)
