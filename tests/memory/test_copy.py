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
    head = model.get_output_embeddings().weight.detach().double()  # one tensor: memoised
    keys, values = bank.keys_values()

    def formula():
        """per pair, softmax over the bank's slots of cosine x read_scale, then the mixture"""
        with torch.no_grad():
            q = F.normalize(reader.raw_queries(hidden, context), dim=-1)  # [B, T, P, Dh]
            w = torch.softmax(torch.einsum("btpd,psd->btps", q, keys.double()) * reader.scale, -1)
            out = torch.einsum("btps,psd->btpd", w, values.double()).reshape(B, T, C)
            gate = (reader.gate_bias + reader.gate_confidence * out.pow(2).sum(-1)
                    + reader.gate(reader.norm(hidden))[..., 0])[..., None]
            memory_logits = math.exp(reader.log_sharpness.item()) * out @ F.normalize(head, dim=-1).T
            return torch.log(torch.sigmoid(gate) * memory_logits.softmax(-1)
                             + torch.sigmoid(-gate) * logits.softmax(-1))

    got = memory.mix_logits(hidden, logits, head, bank, context=context)  # autograd: ATen ops
    torch.testing.assert_close(got.double(), formula(), rtol=1e-5, atol=1e-5)
    # at inference: the fused read and the mixture kernel, memoised per bank; the memo goes
    # stale after in-place changes to the gate and the norm
    for changed in (False, True):
        if changed:
            with torch.no_grad():
                reader.gate.weight.mul_(-2.0)
                reader.gate_bias.add_(1.5)
                reader.norm.weight.mul_(0.5)
        want = formula()
        with torch.no_grad():
            torch.testing.assert_close(memory.mix_logits(hidden, logits, head, bank,
                                                         context=context), want,
                                       rtol=1e-8, atol=1e-8)
    from memkernels.memory import fused
    from memkernels.ops.copy_mix import cpu_kernel
    if cpu_kernel(torch.float64, torch.device("cpu")) is not None:  # the extension is built
        # the calls without gradients took the memoised read and its mixture kernel
        assert bank.fused_plans[fused._MIX].value[1] is not None


def _mix_inputs(model, memory, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    B, T, C = 2, 4, model.config.hidden_size
    hidden = torch.randn(B, T, C, generator=g, dtype=dtype) * 3
    context = torch.randn(B, T, C, generator=g, dtype=dtype)
    logits = torch.randn(B, T, VOCAB, generator=g, dtype=dtype) * 5
    head = model.get_output_embeddings().weight.detach().to(dtype)
    return hidden, logits, head, context if memory.config.context_decay else None


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float64, None), (torch.float32, None),
                                            (torch.float32, torch.bfloat16),
                                            (torch.float32, torch.int8)])
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_the_fused_read_at_inference_matches_the_composed_one(dtype, kv_dtype, decay):
    """Without gradients a one-row bank is read by the fused reading layer
    (identity output projection): the mixture equals the memory_read one."""
    from memkernels.memory import fused
    from memkernels.ops.reading_layer import cpu_kernel
    if cpu_kernel(torch.zeros(1, dtype=dtype), kv_dtype or dtype) is None:
        pytest.skip("memkernels._C is not built")
    model = MODELS["llama"]().to(dtype)
    memory = copy_memory(model, context_decay=decay).to(dtype)
    with torch.no_grad():
        memory.readers[0].gate.weight.normal_()
    texts = [torch.randint(1, VOCAB, (11,)).tolist() for _ in range(5)]
    bank = memkernels.store(memory, model, None, texts)
    args = _mix_inputs(model, memory, dtype)
    with torch.no_grad():
        got = memory.mix_logits(*args[:3], bank, kv_dtype, context=args[3])
        assert fused._MIX in bank.fused_plans  # the fused path ran
        if kv_dtype == torch.bfloat16:
            # the kernel reads bf16 rows with float32 queries: compose the
            # same math in float32 (memory_read would round the queries too)
            keys, values = (t.to(dtype) for t in bank.keys_values(kv_dtype))
            reader = memory.readers[0]
            out = reader.read(args[0], keys, values, None, args[3])
            want = reader.mix(args[0], args[1], out, args[2])
        else:
            fused.enabled = False
            try:
                composed_bank = bank.clone()
                want = memory.mix_logits(*args[:3], composed_bank, kv_dtype, context=args[3])
                assert not composed_bank.fused_plans
            finally:
                fused.enabled = True
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)


def test_an_index_reads_the_nearest_clusters_and_all_of_them_is_exact():
    from memkernels.ops.reading_layer import cpu_kernel
    if cpu_kernel(torch.zeros(1, dtype=torch.float64), torch.float64) is None:
        pytest.skip("memkernels._C is not built")
    model = MODELS["gpt2"]()
    memory = copy_memory(model, context_decay=0.5)
    g = torch.Generator().manual_seed(4)
    texts = [torch.randint(1, VOCAB, (10,), generator=g).tolist() for _ in range(8)]
    bank = memkernels.store(memory, model, None, texts)
    args = _mix_inputs(model, memory, torch.float64)
    with torch.no_grad():
        exact = memory.mix_logits(*args[:3], bank.clone(), context=args[3])
        bank.build_index(probes=1, clusters=8)
        probed = memory.mix_logits(*args[:3], bank, context=args[3])
        assert not torch.allclose(probed, exact)  # 1 of 8 clusters: not the whole read
        bank.build_index(probes=8, clusters=8)  # every cluster: the exact read
        torch.testing.assert_close(memory.mix_logits(*args[:3], bank, context=args[3]), exact)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_stored_continuation_comes_back_through_an_index(name):
    """The generate() round trip of a hand-set memory, reading a bank through
    its index (2 probes of 8 clusters)."""
    model = MODELS[name]()
    memory = hand_set(copy_memory(model))
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(1, VOCAB, (12,), generator=g).tolist() for _ in range(8)]
    bank = memkernels.store(memory, model, None, texts).build_index(probes=2, clusters=8)
    prompt = torch.tensor([texts[6][:5]])
    with torch.no_grad(), memkernels.attach(model, memory, bank):
        copied = model.generate(prompt, max_new_tokens=7, do_sample=False)[0, 5:].tolist()
    assert copied == texts[6][5:]


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


def test_set_read_scale_sharpens_reads_and_is_saved(tmp_path):
    model = MODELS["llama"]()
    memory = copy_memory(model, context_decay=0.5)
    texts = [torch.randint(1, VOCAB, (9,)).tolist() for _ in range(4)]
    bank = memkernels.store(memory, model, None, texts)
    args = _mix_inputs(model, memory, torch.float64)
    with torch.no_grad():
        before = memory.mix_logits(*args[:3], bank, context=args[3])
        memory.set_read_scale(40.0)
        after = memory.mix_logits(*args[:3], bank, context=args[3])  # the memo is rebuilt
        fresh = memory.mix_logits(*args[:3], bank.clone(), context=args[3])
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)
    memory.save_pretrained(tmp_path / "m")
    loaded = MemoryModel.from_pretrained(tmp_path / "m")
    assert loaded.config.append.read_scale == 40.0 and loaded.readers[0].scale == 40.0
    for bad in (0, -1.0, True, "40"):
        with pytest.raises(ValueError, match="positive"):
            memory.set_read_scale(bad)
