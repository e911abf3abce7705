"""Attaching a memory to tiny HF models: hooks, frozen LLM, generation with a KV cache."""
from __future__ import annotations


import pytest
import torch

import memkernels
from memkernels import MemoryBank, MemoryConfig, MemoryModel
from memkernels.hf import attached_handle, write_layer_hidden

from tiny_models import MODELS, ids, make_memory, random_bank


# --- attach / detach --------------------------------------------------------------

@pytest.mark.parametrize("name, path", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                        ("neox", "gpt_neox.layers")])
def test_finds_decoder_layers_by_structure(name, path):
    model = MODELS[name]()
    expected = model
    for part in path.split("."):
        expected = getattr(expected, part)
    assert memkernels.find_decoder_layers(model) is expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_closed_gates_leave_logits_bitwise_equal(name):
    model = MODELS[name]()
    x = ids(3, 11)
    base = model(x).logits
    memory = make_memory(model)
    # a non-trivial bank: a closed gate, not an empty bank, makes it a no-op
    with memkernels.attach(model, memory, random_bank(memory, rows=3)):
        attached = model(x).logits
    assert torch.equal(base, attached)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_detach_restores_the_model_exactly(name):
    model = MODELS[name]()
    model.lm_head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids(2, 9)
    base = model(x).logits
    memory = make_memory(model, open_gates=True)
    handle = memkernels.attach(model, memory, random_bank(memory))
    assert not any(p.requires_grad for p in model.parameters())  # frozen while attached
    assert not torch.equal(model(x).logits, base)  # open gates do change the output
    handle.detach()
    assert attached_handle(model) is None
    assert all(len(layer._forward_hooks) == 0 for layer in memkernels.find_decoder_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(x).logits, base)


def test_explicit_layers_for_unknown_models():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    x = ids(1, 5)
    with memkernels.attach(model, memory, random_bank(memory)) as h:
        auto = model(x).logits
    with memkernels.attach(model, memory, h.bank, layers=list(model.model.layers)):
        explicit = model(x).logits
    assert torch.equal(auto, explicit)


def test_attach_errors_name_the_problem():
    model = MODELS["llama"]()
    memory = make_memory(model)
    with pytest.raises(ValueError, match="hidden_size=64"):
        memkernels.attach(model, MemoryModel(MemoryConfig(hidden_size=64, num_layers=3)).double())
    with pytest.raises(ValueError, match="4 decoder layers"):
        memkernels.attach(model, MemoryModel(MemoryConfig(hidden_size=48, num_layers=4)).double())
    with pytest.raises(ValueError, match="dtype"):
        memkernels.attach(model, make_memory(model).float())
    with pytest.raises(TypeError, match="MemoryModel"):
        memkernels.attach(model, object())
    with memkernels.attach(model, memory) as handle:
        with pytest.raises(ValueError, match="already attached"):
            memkernels.attach(model, memory)
        handle.bank = random_bank(memory, rows=2)
        with pytest.raises(ValueError, match="bank has 2 rows but the model's batch has 3"):
            model(ids(3, 4))
        with pytest.raises(TypeError, match="MemoryBank"):
            handle.bank = torch.zeros(1)


# --- training keeps the LLM frozen ---------------------------------------------------

def test_training_step_changes_only_memory_parameters():
    model = MODELS["llama"]()
    memory = make_memory(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = memkernels.attach(model, memory)
    opt = torch.optim.AdamW(memory.parameters(), lr=1e-2)
    x = ids(2, 12)
    for _ in range(2):
        handle.bank = memory.trainable_bank()
        written = memory.write(handle.bank.mem.expand(2, -1, -1, -1),
                               write_layer_hidden(model, memory, x, torch.ones_like(x))[0])
        handle.bank = MemoryBank(memory, written)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    handle.detach()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # every memory parameter took part: gates first, the rest through them
    grads = {n: p.grad for n, p in memory.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["readers.0.gate"].abs().sum() > 0 and grads["init_bank"].abs().sum() > 0


def test_memory_gradients_match_the_reference_ops():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    x = ids(2, 7)

    def loss_with(backend):
        memory.config.backend = backend
        for r in memory.readers:
            r.backend = backend
        memory.zero_grad()
        with memkernels.attach(model, memory, memory.trainable_bank()) as h:
            hidden, *_ = write_layer_hidden(model, memory, x, torch.ones_like(x))
            h.bank = MemoryBank(memory, memory.write(h.bank.mem.expand(2, -1, -1, -1), hidden))
            model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in memory.named_parameters()}

    try:
        ours, ref = loss_with("cpu"), loss_with("reference")
    finally:
        loss_with(None)
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-11, msg=n)


# --- generation -------------------------------------------------------------------

def recompute_logits(model, sequences, prompt_len):
    """Next-token logits at every generated position, from full forward passes
    without a KV cache: the step-by-step reference."""
    return [model(sequences[:, :t], use_cache=False).logits[:, -1]
            for t in range(prompt_len, sequences.shape[1])]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_generate_with_kv_cache_matches_step_by_step(name, sample):
    model = MODELS[name]()
    memory = make_memory(model, open_gates=True)
    banks = [random_bank(memory), random_bank(memory)]
    x = ids(2, 6)
    with memkernels.attach(model, memory, MemoryBank.stack(banks)):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                             do_sample=sample, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True,
                             **({"top_k": 0} if sample else {}))
        # generate() hands logits back in float32
        for got, want in zip(out.logits, recompute_logits(model, out.sequences, x.shape[1])):
            torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
        if not sample:
            steps = torch.stack([lg.argmax(-1) for lg in out.logits], dim=1)
            assert torch.equal(steps, out.sequences[:, x.shape[1]:])
        # each row read its own bank: row 0 alone with bank 0 gives the same text
        if not sample:
            with attached_handle(model).using(banks[0]):
                alone = model.generate(x[:1], attention_mask=torch.ones_like(x[:1]),
                                       max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)
            assert torch.equal(alone, out.sequences[:1])
    # the memory did something: the base model generates other logits
    base = model(out.sequences[:, :x.shape[1]]).logits[:, -1]
    assert not torch.allclose(base.float(), out.logits[0])
