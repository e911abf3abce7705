"""The memory model and its LLM integration, on tiny HF models built from configs.

Models run in float64 so that cached generation and full recomputation can be
compared tightly; the memory's reads and writes go through the CPU kernels
(float64 is supported there) and are checked against the reference ops.
"""
from __future__ import annotations

import os

import pytest
import torch

import memkernels
from memkernels import MemoryBank, MemoryConfig, MemoryModel, reference
from memkernels.integration import attached_handle, write_layer_hidden

from helpers import cpu_extension

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

VOCAB = 97


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def tiny_neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=128)
    return transformers.GPTNeoXForCausalLM(cfg).double().eval()


def _no_eos(build):
    def wrapped():  # random weights: let generation run its full length
        model = build()
        model.generation_config.eos_token_id = None
        return model
    return wrapped


MODELS = {name: _no_eos(b) for name, b in
          {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox}.items()}


def make_memory(model, *, slots=16, open_gates=False, **overrides):
    config = MemoryConfig.from_hf(model.config, num_heads=2, head_dim=8, num_slots=slots,
                                  **overrides)
    memory = MemoryModel(config).double()
    if open_gates:  # a "trained" memory: reads change the output
        with torch.no_grad():
            for r in memory.readers:
                r.gate.uniform_(0.5, 1.5)
                r.out.weight.mul_(4)
    return memory


def random_bank(memory, rows=1):
    return MemoryBank(memory, torch.randn(rows, memory.config.num_heads, memory.config.num_slots,
                                          memory.config.head_dim, dtype=torch.float64))


def ids(batch, length):
    return torch.randint(1, VOCAB, (batch, length))


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


# --- store ------------------------------------------------------------------------

@pytest.mark.parametrize("values_from", ["write_layer", "embeddings"])
def test_store_equals_the_reference_write_of_the_hidden_states(values_from):
    model = MODELS["llama"]()
    memory = make_memory(model, values_from=values_from)
    texts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    bank = memory.store(model, None, texts, chunk_size=8)
    # reference: the base model's hidden states at the write layer (keys) and
    # at the write layer or the embeddings (values), all three texts as one
    # masked token sequence, written with the reference op
    all_hs = model(torch.tensor([t + [0] * (4 - len(t)) for t in texts]),
                   attention_mask=torch.tensor([[1] * len(t) + [0] * (4 - len(t))
                                                for t in texts]),
                   output_hidden_states=True).hidden_states
    hs = all_hs[memory.config.write_layer + 1]
    vs = all_hs[0] if values_from == "embeddings" else hs
    mask = torch.tensor([[1] * len(t) + [0] * (4 - len(t)) for t in texts], dtype=torch.bool)
    hidden, value_hidden, mask = hs.reshape(1, 12, -1), vs.reshape(1, 12, -1), mask.reshape(1, 12)
    mem = memory.new_bank().mem
    m = memory
    H, D = m.config.num_heads, m.config.head_dim
    k = m.token_key(m.write_norm(hidden)).view(1, 12, H, D).transpose(1, 2)
    v = m.token_value(m.write_norm(value_hidden)).view(1, 12, H, D).transpose(1, 2)
    q = torch.einsum("bhsd,hde->bhse", mem, m.slot_query)
    f = (torch.einsum("bhsd,hd->bhs", mem, m.forget) + m.forget_bias[:, None])[..., None]
    i = (torch.einsum("bhsd,hd->bhs", mem, m.input) + m.input_bias[:, None])[..., None]
    want = reference.memory_write(mem, q, k, v, f, i, token_mask=mask)
    torch.testing.assert_close(bank.mem, want, rtol=1e-10, atol=1e-12)


def test_store_text_with_a_tokenizer_in_chunks_and_rows():
    model = MODELS["gpt2"]()
    memory = make_memory(model)

    def tokenizer(text):  # any callable returning {"input_ids": [...]} works
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    one = memory.store(model, tokenizer, ["alpha is red", "beta is blue", "gamma"], chunk_size=2)
    assert not torch.equal(one.mem, memory.init_bank[None])
    rows = memory.new_bank(batch_size=2)
    rows = memory.store(model, tokenizer, [["alpha is red", "beta is blue", "gamma"], ["x y"]],
                        bank=rows, chunk_size=2)
    # row 0 got the same writes as the one-row bank; row 1 one write only
    torch.testing.assert_close(rows.mem[0], one.mem[0], rtol=1e-10, atol=1e-12)
    row1 = memory.store(model, tokenizer, ["x y"])
    torch.testing.assert_close(rows.mem[1], row1.mem[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="2 rows: items must be a list of 2"):
        memory.store(model, tokenizer, ["a"], bank=rows)
    with pytest.raises(ValueError, match="tokenizer"):
        memory.store(model, None, ["a"])


def test_store_reads_the_base_model_even_when_attached():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    texts = [[3, 4, 5], [6, 7]]
    detached = memory.store(model, None, texts)
    with memkernels.attach(model, memory, random_bank(memory)):
        attached = memory.store(model, None, texts)
    assert torch.equal(detached.mem, attached.mem)


def test_stored_text_changes_what_is_read():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    x = ids(1, 5)
    with memkernels.attach(model, memory) as handle:
        before = model(x).logits
        handle.bank.store(model, None, [[1, 2, 3, 4]])
        after = model(x).logits  # the bank's cached keys/values were refreshed
    assert not torch.allclose(before, after)


# --- banks: save, load, merge ----------------------------------------------------------

def test_save_load_roundtrip_is_exact(tmp_path):
    memory = make_memory(MODELS["llama"]())
    bank = random_bank(memory, rows=2)
    bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(tmp_path / "bank.safetensors", memory)
    assert torch.equal(loaded.mem, bank.mem) and loaded.memory is memory
    assert os.listdir(tmp_path) == ["bank.safetensors"]  # no temporary file left behind


def test_load_refuses_mismatches_and_corruption(tmp_path):
    model = MODELS["llama"]()
    memory = make_memory(model)
    path = tmp_path / "bank.safetensors"
    random_bank(memory).save(path)
    other_sizes = MemoryModel(MemoryConfig.from_hf(model.config, num_heads=4, head_dim=8)).double()
    with pytest.raises(ValueError, match="num_heads=2"):
        MemoryBank.load(path, other_sizes)
    retrained = make_memory(model)  # same sizes, other parameters
    with pytest.raises(ValueError, match="other trained parameters"):
        MemoryBank.load(path, retrained)
    assert MemoryBank.load(path, retrained, strict=False).mem.shape == (1, 2, 16, 8)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        MemoryBank.load(tmp_path / "flipped.safetensors", memory)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        MemoryBank.load(tmp_path / "cut.safetensors", memory)
    memory.save_pretrained(tmp_path / "mem")
    with pytest.raises(ValueError, match="not a memkernels bank"):
        MemoryBank.load(tmp_path / "mem" / "memory.safetensors", memory)
    with pytest.raises(FileNotFoundError):
        MemoryBank.load(tmp_path / "missing.safetensors", memory)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    memory = make_memory(MODELS["llama"]())
    path = tmp_path / "bank.safetensors"
    first = random_bank(memory)
    first.save(path)
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        random_bank(memory).save(path)
    monkeypatch.undo()
    assert torch.equal(MemoryBank.load(path, memory).mem, first.mem)
    assert os.listdir(tmp_path) == ["bank.safetensors"]


def test_merge_concatenates_slots_and_keeps_what_each_bank_reads():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    a, b = random_bank(memory), random_bank(memory)
    merged = MemoryBank.merge(a, b)
    assert merged.num_slots == a.num_slots + b.num_slots
    x = ids(1, 6)
    with memkernels.attach(model, memory, a) as handle:
        alone = model(x).logits
        handle.bank = MemoryBank.merge(a, a)  # twice the same slots: the same softmax
        torch.testing.assert_close(model(x).logits, alone, rtol=1e-10, atol=1e-10)
        handle.bank = merged
        merged_logits = model(x).logits
        handle.bank = merged.store(model, None, [[1, 2, 3]])  # a merged bank can be written
        assert not torch.equal(model(x).logits, merged_logits)
    with pytest.raises(ValueError, match="as many rows"):
        MemoryBank.merge(a, random_bank(memory, rows=2))


def test_memory_save_and_load_pretrained(tmp_path):
    memory = make_memory(MODELS["llama"](), open_gates=True)
    memory.save_pretrained(tmp_path / "m")
    loaded = MemoryModel.from_pretrained(tmp_path / "m").double()
    assert loaded.config == memory.config
    assert loaded.fingerprint() == memory.fingerprint()
    for (n, p), (_, q) in zip(memory.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n


# --- the fused inference reader (CPU) ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, batch, tokens, hidden_size",
                         [(1, 3, 1, 48), (3, 3, 1, 48), (4, 4, 1, 53), (5, 5, 1, 53),
                          (3, 3, 5, 48), (1, 3, 7, 48)],
                         ids=["shared-decode", "per-row-decode", "decode-4-rows-odd-hidden",
                              "decode-5-rows-gemm", "per-row-prefill", "shared-prefill"])
def test_fused_cpu_reader_matches_the_autograd_path(dtype, rows, batch, tokens, hidden_size):
    """Up to 4 query rows the fused layer projects with its own GEMVs, above
    that with the vendor GEMM: both against the autograd path."""
    config = MemoryConfig(hidden_size=hidden_size, num_layers=2, num_heads=3, head_dim=8,
                          num_slots=37)
    memory = MemoryModel(config).to(dtype)
    with torch.no_grad():
        for r in memory.readers:
            r.gate.uniform_(-1, 1)
            r.norm.weight.uniform_(0.5, 1.5)
    bank = MemoryBank(memory, torch.randn(rows, 3, 37, 8, dtype=dtype))
    hidden = torch.randn(batch, tokens, hidden_size, dtype=dtype)
    with torch.no_grad():
        fused = memory.read(0, hidden, bank)  # inference: memkernels._C.reader_fwd
    unfused = memory.read(0, hidden.clone().requires_grad_(), bank)  # autograd path
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, unfused.detach(), **tol)


def test_bank_made_under_inference_mode_is_read_and_its_cache_follows_writes():
    """Inference tensors carry no version counter, which the key/value cache
    checks: a bank made under inference_mode is kept as a normal tensor."""
    config = MemoryConfig(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, num_slots=9,
                          gate_init=0.5)
    memory = MemoryModel(config)
    hidden = torch.randn(1, 1, 32)
    with torch.inference_mode():
        bank = MemoryBank(memory, torch.randn(1, 2, 9, 16))
        first = memory.read(0, hidden, bank, torch.bfloat16)
        bank.mem.mul_(-1.0)  # in place, inside inference mode
        second = memory.read(0, hidden, bank, torch.bfloat16)
        keys, values = (t.float() for t in bank.keys_values(torch.bfloat16))
    expected = memory.readers[0](hidden.clone().requires_grad_(), keys.clone(), values.clone())
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, expected.detach(), rtol=1e-5, atol=1e-5)


def test_fused_reader_follows_changed_reader_parameters():
    """The fused inference read is memoised (folded weights, keys/values): an
    in-place update (an optimiser step), a reassigned parameter or submodule,
    or `.data =` must not be served stale."""
    config = MemoryConfig(hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_slots=5)
    memory = MemoryModel(config)
    bank = memory.new_bank()
    hidden = torch.randn(2, 1, 32)
    reader = memory.readers[0]

    def fused_and_expected():
        with torch.no_grad():
            fused = memory.read(0, hidden, bank)
        return fused, memory.read(0, hidden.clone().requires_grad_(), bank).detach()

    def assert_fresh(fused, expected):
        # The unscaled randn weights below make scores ~10x the init's, so the
        # folded float32 math may differ by 2e-5; a stale read differs by O(1).
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    fused, expected = fused_and_expected()
    assert_fresh(fused, expected)
    with torch.no_grad():
        reader.gate.fill_(0.7)
        reader.norm.weight.mul_(1.5)
    fused, expected = fused_and_expected()
    assert not torch.equal(fused, hidden)
    assert_fresh(fused, expected)
    reader.out.weight = torch.nn.Parameter(torch.randn_like(reader.out.weight))
    fused, expected = fused_and_expected()
    assert_fresh(fused, expected)
    reader.query = torch.nn.Linear(32, 16, bias=False)  # a new submodule ...
    fused, expected = fused_and_expected()
    assert_fresh(fused, expected)
    reader.query.weight = torch.nn.Parameter(torch.randn(16, 32))  # ... and its parameter
    fused, expected = fused_and_expected()
    assert_fresh(fused, expected)
    memory.slot_value.data = torch.randn_like(memory.slot_value)  # no version bump
    fused, expected = fused_and_expected()
    assert_fresh(fused, expected)
    for kv_dtype in (torch.bfloat16, None):  # the memo is per dtype
        with torch.no_grad():
            fused = memory.read(0, hidden, bank, kv_dtype)
            keys, values = (t.float() for t in bank.keys_values(kv_dtype))
        assert_fresh(fused, reader(hidden, keys, values).detach())


NARROW_CACHE_SHAPES = pytest.mark.parametrize(
    "rows, tokens, slots, head_dim",
    [(1, 1, 37, 8), (3, 1, 1100, 40), (3, 1, 77, 32), (3, 5, 513, 8), (1, 7, 1, 40)],
    ids=["shared-decode", "per-row-decode-3-tiles", "per-row-decode-d32", "per-row-prefill",
         "shared-prefill-S1"])


def memory_with_open_gates(head_dim, slots):
    """A memory for hidden size 48 and 3 heads, its gates open at random."""
    memory = MemoryModel(MemoryConfig(hidden_size=48, num_layers=2, num_heads=3,
                                      head_dim=head_dim, num_slots=slots))
    with torch.no_grad():
        for r in memory.readers:
            r.gate.uniform_(-1, 1)
    return memory


def read_through_narrow_cache(kv_dtype, rows, tokens, slots, head_dim):
    """A memory read through a kv_dtype cache of a bank with large logits:
    (fused read, the cached keys and values, the float32 keys and values,
    the unfused float32 read of the cached ones widened)."""
    memory = memory_with_open_gates(head_dim, slots)
    bank = MemoryBank(memory, 3 * torch.randn(rows, 3, slots, head_dim))
    hidden = torch.randn(3, tokens, 48)
    with torch.no_grad():
        fused = memory.read(0, hidden, bank, kv_dtype)
        keys, values = bank.keys_values(kv_dtype)
        k32, v32 = bank.keys_values()
    widen = (lambda t: t.dequantize()) if kv_dtype == torch.int8 else (lambda t: t.float())
    expected = memory.readers[0](hidden.clone().requires_grad_(), widen(keys), widen(values))
    return fused, (keys, values), (k32, v32), expected.detach()


@NARROW_CACHE_SHAPES
def test_bf16_key_value_cache_reads_the_rounded_bank_exactly(rows, tokens, slots, head_dim):
    """kv_dtype=bfloat16: the fused read (bf16 widened in the kernel: in
    tiles for several query rows, per key for one) equals the float32 read of
    the same keys/values rounded to bf16."""
    fused, (keys, values), (k32, _), expected = read_through_narrow_cache(
        torch.bfloat16, rows, tokens, slots, head_dim)
    assert keys.dtype == values.dtype == torch.bfloat16
    torch.testing.assert_close(keys.float(), k32, rtol=1e-2, atol=1e-2)  # only rounded
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@NARROW_CACHE_SHAPES
def test_int8_key_value_cache_reads_the_dequantized_bank_exactly(rows, tokens, slots, head_dim):
    """kv_dtype=int8: keys/values are int8 with a float32 scale per slot; the
    fused read (widened and scaled in the kernel) equals the float32 read of
    the dequantized keys/values, and those are within half a step of the
    float32 ones."""
    fused, cached, exact, expected = read_through_narrow_cache(
        torch.int8, rows, tokens, slots, head_dim)
    for q, x in zip(cached, exact):
        assert isinstance(q, memkernels.Int8Rows)
        assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32
        assert q.data.shape == x.shape and q.scale.shape == x.shape[:-1]
        assert q.data.abs().amax(-1).eq(127).all()  # each slot uses the full range
        assert ((q.dequantize() - x).abs() <= 0.5001 * q.scale[..., None]).all()
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_bf16_cache_on_the_unfused_path_matches_the_fused_read():
    """Backends without the fused reader (here the reference) read a bf16
    cache by casting the query to bf16: close to the fused float32 math."""
    memory = memory_with_open_gates(head_dim=16, slots=300)
    bank = MemoryBank(memory, torch.randn(2, 3, 300, 16))
    hidden = torch.randn(2, 3, 48)
    with torch.no_grad():
        fused = memory.read(0, hidden, bank, torch.bfloat16)
        memory.readers[0].backend = "reference"
        unfused = memory.read(0, hidden, bank, torch.bfloat16)
    assert unfused.dtype == torch.float32
    torch.testing.assert_close(unfused, fused, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_narrow_cache_follows_writes_and_attach_reads_it(kv_dtype):
    model = MODELS["llama"]().float()
    memory = make_memory(model, open_gates=True).float()
    bank = memory.new_bank()

    def first_keys():
        keys = bank.keys_values(kv_dtype)[0]
        return keys.data if kv_dtype == torch.int8 else keys
    first = first_keys().clone()
    with torch.no_grad():
        bank.mem.mul_(-1.0)  # an in-place change: the cache must not be served stale
    assert not torch.equal(first_keys(), first)
    with pytest.raises(ValueError, match="kv_dtype must be None.*torch.int8, got torch.float16"):
        memkernels.attach(model, memory, kv_dtype=torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        with memkernels.attach(model, memory, bank):
            full = model(ids).logits
        with memkernels.attach(model, memory, bank, kv_dtype=kv_dtype):
            narrow = model(ids).logits
    assert not torch.equal(full, narrow)  # the narrow cache is what was read
    torch.testing.assert_close(narrow, full, rtol=0.05, atol=0.05)


def test_int8_cache_is_refused_off_the_cpu():
    from memkernels.integration import check_kv_dtype
    check_kv_dtype(torch.int8, torch.float32, torch.device("cpu"))
    check_kv_dtype(torch.bfloat16, torch.float32, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="int8 is read in place only on the CPU.*cuda:0"):
        check_kv_dtype(torch.int8, torch.float32, torch.device("cuda", 0))


def test_int8_rows_quantize_zero_and_extreme_rows():
    x = torch.zeros(2, 3, 4)
    x[0, 1] = torch.tensor([1e30, -1e30, 0.5, 0.0])
    x[1, 2] = torch.tensor([-1e-30, 1e-30, 0.0, 0.0])
    q = memkernels.Int8Rows.quantize(x)
    assert torch.equal(q.dequantize()[0, 0], torch.zeros(4))  # an all-zero row stays zero
    assert q.data[0, 1].tolist() == [127, -127, 0, 0]
    assert q.data[1, 2].tolist() == [-127, 127, 0, 0]
    assert torch.isfinite(q.scale).all()
    torch.testing.assert_close(q.dequantize(), x, rtol=0, atol=1e30 / 254 * 1.001)


def test_int8_cache_on_the_unfused_path_and_with_grad_matches_the_fused_read():
    """Backends without an int8 kernel (here the reference), and a read with
    autograd recording on a frozen memory, dequantize the cache first."""
    memory = memory_with_open_gates(head_dim=16, slots=300).requires_grad_(False)
    bank = MemoryBank(memory, torch.randn(2, 3, 300, 16))
    hidden = torch.randn(2, 3, 48)
    with torch.no_grad():
        fused = memory.read(0, hidden, bank, torch.int8)
    leaf = hidden.clone().requires_grad_()
    with_grad = memory.read(0, leaf, bank, torch.int8)
    with_grad.sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(with_grad.detach(), fused, rtol=1e-5, atol=1e-5)
    memory.readers[0].backend = "reference"
    with torch.no_grad():
        unfused = memory.read(0, hidden, bank, torch.int8)
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-5)


def test_fused_cpu_reader_rejects_bad_int8_scales():
    ext = cpu_extension()
    h, w = torch.randn(2, 1, 16), torch.randn(8, 16)
    k = torch.randint(-127, 128, (2, 5, 4), dtype=torch.int8)
    s = torch.rand(2, 5)
    with pytest.raises(RuntimeError, match="need key_scale and value_scale"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="need key_scale and value_scale"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, None)
    with pytest.raises(RuntimeError, match="key_scale must have shape"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s[:, :4], s)
    with pytest.raises(RuntimeError, match="value_scale must have dtype Float"):
        ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, s.double())
    with pytest.raises(RuntimeError, match="go only with int8"):
        ext.reader_fwd(h, w, k.float(), k.float(), w, 1e-6, 0.5, s, s)
    with pytest.raises(RuntimeError, match="go only with int8"):  # one scale alone, too
        ext.reader_fwd(h, w, k.float(), k.float(), w, 1e-6, 0.5, None, s)
    with pytest.raises(RuntimeError, match="keys must have dtype"):  # int8 only with f32 hidden
        ext.reader_fwd(h.double(), w.double(), k, k, w.double(), 1e-6, 0.5, s, s)
    out = ext.reader_fwd(h, w, k, k, w, 1e-6, 0.5, s, s)
    kf = k.float() * s[..., None]
    torch.testing.assert_close(out, ext.reader_fwd(h, w, kf, kf, w, 1e-6, 0.5),
                               rtol=1e-5, atol=1e-5)


def test_fused_cpu_reader_rejects_bad_tensors():
    ext = cpu_extension()
    h, w = torch.randn(2, 1, 16), torch.randn(8, 16)
    k = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="hidden must be"):
        ext.reader_fwd(h[0], w, k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="query_w must be \\[H \\* Dh, C\\]"):
        ext.reader_fwd(h, w[:3], k, k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="values must have dtype"):
        ext.reader_fwd(h, w, k, k.double(), w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="keys must have shape"):
        ext.reader_fwd(h, w, torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="values must have dtype"):  # bf16 keys, f32 values
        ext.reader_fwd(h, w, k.bfloat16(), k, w, 1e-6, 0.5)
    with pytest.raises(RuntimeError, match="keys must have dtype"):  # bf16 only with f32 hidden
        ext.reader_fwd(h.double(), w.double(), k.bfloat16(), k.bfloat16(), w.double(), 1e-6, 0.5)


@pytest.mark.parametrize("slots", [1, 64])
def test_memory_learns_to_copy_a_written_token_without_an_llm(slots):
    """The write -> read path can learn a copy: episodes write 6 token vectors,
    one of them an 'object' among 10; a fixed query must return it. Fresh
    episodes every step, so only a general copy fits (the recall benchmark's
    written memory, through a frozen LM, did not learn this: see NOTES)."""
    torch.manual_seed(0)
    C, vocab, objects, T, B = 64, 40, 10, 6, 32
    table = torch.randn(vocab, C)
    memory = MemoryModel(MemoryConfig(hidden_size=C, num_layers=1, num_heads=4, head_dim=16,
                                      num_slots=slots, read_layers=(0,), write_layer=0,
                                      gate_init=1.0))
    query = torch.randn(C)
    opt = torch.optim.Adam(memory.parameters(), lr=3e-3)

    def episode():
        tokens = torch.randint(objects, vocab, (B, T))
        obj = torch.randint(0, objects, (B,))
        tokens[torch.arange(B), torch.randint(0, T, (B,))] = obj
        bank = memory.write(memory.init_bank[None].expand(B, -1, -1, -1), table[tokens])
        read = memory.read(0, query.expand(B, 1, C).contiguous(), MemoryBank(memory, bank))
        return (read[:, 0] - query) @ table[:objects].T, obj

    for _ in range(250):
        logits, obj = episode()
        loss = torch.nn.functional.cross_entropy(logits, obj)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, obj = episode()
    assert (logits.argmax(1) == obj).float().mean() >= 0.9


def test_values_from_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="values_from"):
        MemoryConfig(hidden_size=8, num_layers=2, values_from="layer0")
    model = MODELS["llama"]()
    memory = make_memory(model, values_from="embeddings")
    memory.save_pretrained(tmp_path / "m")
    assert MemoryModel.from_pretrained(tmp_path / "m").config.values_from == "embeddings"
    x = ids(2, 5)
    keys_hidden, values_hidden, _ = write_layer_hidden(model, memory, x, torch.ones_like(x))
    torch.testing.assert_close(values_hidden, model.get_input_embeddings()(x))
    with pytest.raises(ValueError, match="value_hidden must have the shape"):
        memory.write(memory.new_bank(2).mem, keys_hidden, None, values_hidden[:, :2])



def test_fused_cpu_reader_rejects_a_bad_mlp_query():
    ext = cpu_extension()
    h, k = torch.randn(1, 2, 16), torch.randn(2, 5, 4)
    w1, b1, w2, wo = torch.randn(12, 16), torch.randn(12), torch.randn(16, 12), torch.randn(16, 16)
    with pytest.raises(RuntimeError, match="mlp_w needs mlp_b"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1)
    with pytest.raises(RuntimeError, match="mlp_b goes only with mlp_w"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_b=b1)
    with pytest.raises(RuntimeError, match="mlp_w must have shape"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1[:, :8], mlp_b=b1)
    with pytest.raises(RuntimeError, match="query_w must have shape"):  # [H * Dh, M] after an MLP
        ext.reader_fwd(h, w2[:, :8], k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1)
    with pytest.raises(RuntimeError, match="H a multiple of the keys' 2 heads"):
        ext.reader_fwd(h, w2[:12], k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1)
    with pytest.raises(RuntimeError, match="query_b must have shape"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, query_b=b1)
    with pytest.raises(RuntimeError, match="mlp_b must have dtype"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1.double())
    context, wc = torch.randn(1, 2, 16), torch.randn(12, 16)
    with pytest.raises(RuntimeError, match="context and context_w go together"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context)
    with pytest.raises(RuntimeError, match="context goes only with mlp_w"):
        ext.reader_fwd(h, w2[:, :16].contiguous(), k, k, wo, 1e-6, 0.5, context=context,
                       context_w=wc)
    with pytest.raises(RuntimeError, match=r"context must have shape \[1, 2, 16\]"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context[:, :1],
                       context_w=wc)
    with pytest.raises(RuntimeError, match=r"context_w must have shape \[12, 16\]"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context,
                       context_w=wc[:8])
    with pytest.raises(RuntimeError, match="context must have dtype"):
        ext.reader_fwd(h, w2, k, k, wo, 1e-6, 0.5, mlp_w=w1, mlp_b=b1, context=context.double(),
                       context_w=wc)
