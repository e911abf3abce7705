"""The copy rule (memkernels.memory.copy): its read and mixture against a
formula, a hand-set memory that copies a stored continuation token for token
through generate(), closed gates, errors, save/load."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import memkernels
from memkernels.memory import AppendOptions, CopyMemory, MemoryConfig, MemoryModel

from tiny_models import MODELS, VOCAB


def copy_memory(model, **append):
    config = MemoryConfig.for_copy(model.config, num_slots=16,
                                   append=AppendOptions(null_slots=2, **append))
    torch.manual_seed(0)
    return MemoryModel(config).double()


def hand_set(memory):
    """Query MLP = address MLP, small enough that tanh is nearly linear: a
    query finds the slot written from the very same state (a prompt that is
    a prefix of a stored text) at cosine ~1."""
    reader = memory.readers[0]
    with torch.no_grad():
        memory.address[3].weight.mul_(0.01)
        memory.address[3].bias.zero_()
        reader.query.load_state_dict(memory.address.state_dict())
        reader.gate_bias.fill_(0.0)
    return memory


@pytest.mark.parametrize("name", sorted(MODELS))
def test_for_copy_sizes_the_content_heads_to_the_hidden_size(name):
    model = MODELS[name]()
    config = MemoryConfig.for_copy(model.config)
    assert config.num_heads // 2 * config.head_dim == model.config.hidden_size
    assert config.write_rule == "copy" and config.values_from == "output_embeddings"
    assert isinstance(MemoryModel(config), CopyMemory)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_stored_continuation_comes_back_token_for_token(name):
    """store() of texts of random (never trained) tokens, then greedy decoding
    from a prefix of one of them returns the rest of it exactly: what the
    memory stored, not what the LM would say (checked to differ)."""
    model = MODELS[name]()
    memory = hand_set(copy_memory(model))
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, VOCAB, (12,), generator=g).tolist() for _ in range(6)]
    bank = memkernels.store(memory, model, None, texts)
    prompt = torch.tensor([texts[2][:5]])
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=7, do_sample=False)[0, 5:].tolist()
        with memkernels.attach(model, memory, bank):
            copied = model.generate(prompt, max_new_tokens=7, do_sample=False)[0, 5:].tolist()
    assert copied == texts[2][5:]
    assert plain != copied


def test_mix_logits_matches_the_formula():
    model = MODELS["llama"]()
    memory = copy_memory(model, context_decay=0.5)
    reader = memory.readers[0]
    with torch.no_grad():
        reader.gate.weight.normal_()
    texts = [torch.randint(1, VOCAB, (9,)).tolist() for _ in range(3)]
    bank = memkernels.store(memory, model, None, texts)
    B, T, C = 2, 5, model.config.hidden_size
    hidden, context = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    logits = torch.randn(B, T, VOCAB, dtype=torch.float64) * 5
    head = model.get_output_embeddings().weight
    got = memory.mix_logits(hidden, logits, head, bank, context=context)
    # the formula: per pair, softmax over the bank's slots of cosine x read_scale
    keys, values = bank.keys_values()
    q = F.normalize(reader.raw_queries(hidden, context), dim=-1)  # [B, T, P, Dh]
    w = torch.softmax(torch.einsum("btpd,psd->btps", q, keys) * reader.scale, -1)
    out = torch.einsum("btps,psd->btpd", w, values).reshape(B, T, C)
    gate = (reader.gate_bias + reader.gate_confidence * out.pow(2).sum(-1)
            + reader.gate(reader.norm(hidden))[..., 0])[..., None]
    memory_logits = math.exp(reader.log_sharpness.item()) * out @ F.normalize(head, dim=-1).T
    want = torch.log(torch.sigmoid(gate) * memory_logits.softmax(-1)
                     + torch.sigmoid(-gate) * logits.softmax(-1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_closed_gate_leaves_the_lm_and_gradients_reach_the_read():
    model = MODELS["llama"]()
    memory = copy_memory(model)
    bank = memkernels.store(memory, model, None, [list(range(1, 10))])
    x = torch.tensor([[3, 4, 5]])
    with memkernels.attach(model, memory, bank), torch.no_grad():
        memory.readers[0].gate_bias.fill_(-1e4)
        closed = model(x).logits
    with torch.no_grad():
        want = model(x).logits.log_softmax(-1)
    torch.testing.assert_close(closed, want)
    with torch.no_grad():
        memory.readers[0].gate_bias.fill_(0.0)
    with memkernels.attach(model, memory, bank):
        loss = model(x, labels=x).loss
    loss.backward()
    reader = memory.readers[0]
    for p in (reader.gate_bias, reader.log_sharpness, reader.query[1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_copy_config_errors_name_what_is_wrong():
    model = MODELS["llama"]()
    base = MemoryConfig.for_copy(model.config)
    import dataclasses
    with pytest.raises(ValueError, match="hidden_size"):
        MemoryModel(dataclasses.replace(base, num_heads=4))
    with pytest.raises(ValueError, match="output_embeddings"):
        MemoryModel(dataclasses.replace(base, values_from="embeddings"))
    with pytest.raises(ValueError, match="read_layers"):
        MemoryModel(dataclasses.replace(base, read_layers=(0, 2)))
    memory = copy_memory(model)
    bank = memory.new_bank()
    with pytest.raises(TypeError, match="LM head"):
        memory.read(0, torch.randn(1, 2, 48, dtype=torch.float64), bank)
    with pytest.raises(ValueError, match="head_weight"):
        memory.mix_logits(torch.randn(1, 2, 48, dtype=torch.float64),
                          torch.randn(1, 2, VOCAB, dtype=torch.float64),
                          torch.randn(VOCAB, 7, dtype=torch.float64), bank)


def test_null_slots_hold_no_content_and_the_memory_round_trips(tmp_path):
    model = MODELS["gpt2"]()
    memory = copy_memory(model)
    mem = memory.fresh_mem()
    P = memory.pairs
    assert mem[:, P:, -2:].abs().sum() == 0 and mem[:, :P, -2:].abs().sum() > 0
    memory.save_pretrained(tmp_path)
    again = MemoryModel.from_pretrained(tmp_path)
    assert isinstance(again, CopyMemory) and again.fingerprint() == memory.fingerprint()
    for (name, a), b in zip(memory.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
