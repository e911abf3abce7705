"""The blend rule and its banks: persistence, the fused inference read, narrow caches."""
from __future__ import annotations

import os

import pytest
import torch

import memkernels
from memkernels import MemoryBank, MemoryConfig, MemoryModel
from memkernels.hf import write_layer_hidden

from tiny_models import MODELS, ids, make_memory, random_bank


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
        handle.bank = memkernels.store(merged.memory, model, None, [[1, 2, 3]], bank=merged)  # a merged bank can be written
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
    from memkernels.hf.attach import check_kv_dtype
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


@pytest.mark.parametrize("slots", [1, 64])
def test_memory_learns_to_copy_a_written_token_without_an_llm(slots):
    """The write -> read path can learn a copy: episodes write 6 token vectors,
    one of them an 'object' among 10; a fixed query must return it. Fresh
    episodes every step, so only a general copy fits (the recall benchmark's
    written memory, through a frozen LM, did not learn this: see docs/log.md)."""
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
