"""The append rule (memkernels.memory.append): one slot per written token, an
MLP address, a cosine read. Checked against plain PyTorch computations of the
same math, in float64, on tiny models built from configs."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F

import memkernels
from memkernels import AppendMemory, AppendOptions, BlendMemory, MemoryBank, MemoryConfig, MemoryModel
from memkernels.memory import fused
from memkernels.memory.append import address_contrastive, address_nll
from memkernels.train import pretrain_address


transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

VOCAB, HIDDEN = 61, 24


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def make_memory(model=None, *, slots=20, null_slots=3, open_gates=False, **overrides):
    """An append memory; overrides: AppendOptions fields or other MemoryConfig fields."""
    option_names = {f.name for f in dataclasses.fields(AppendOptions)}
    options = AppendOptions(null_slots=null_slots, mlp_hidden=16,
                            **{k: v for k, v in overrides.items() if k in option_names})
    overrides = {k: v for k, v in overrides.items() if k not in option_names}
    if model is None:
        config = MemoryConfig(hidden_size=HIDDEN, num_layers=3, read_layers=(1, 2), write_layer=1,
                              num_heads=4, head_dim=8, num_slots=slots, write_rule="append",
                              append=options, **overrides)
    else:
        config = MemoryConfig.from_hf(model.config, num_heads=4, head_dim=8, num_slots=slots,
                                      write_rule="append", append=options, **overrides)
    memory = MemoryModel(config).double()
    if open_gates:  # a "trained" memory: reads change the output
        with torch.no_grad():
            for r in memory.readers:
                r.gate.uniform_(0.5, 1.5)
    return memory


def expected_slots(memory, hidden, value_hidden, mask=None, context=None):
    """[T, 2P, Dh]: what each token of one row writes (address, from the
    context too when given | next token's content, none where padding comes next)."""
    x = memory.write_norm(hidden)
    x = x if context is None else torch.cat([x, context], -1)
    xv = memory.write_norm(value_hidden)
    xv_next = torch.stack([xv[t + 1] if t + 1 < len(xv) and (mask is None or mask[t + 1])
                           else torch.zeros_like(xv[0]) for t in range(len(xv))])
    P = memory.pairs
    address = torch.tanh(memory.address(x)).view(len(x), P, -1)
    content = torch.tanh(memory.token_value(xv_next)).view(len(x), P, -1)
    return torch.cat([address, content], 1)


def test_build_memory_picks_the_class_and_banks_have_their_sizes():
    memory = make_memory()
    assert isinstance(memory, AppendMemory)
    assert type(MemoryModel(MemoryConfig(hidden_size=HIDDEN, num_layers=3))) is BlendMemory
    bank = memory.new_bank(2, num_slots=50)
    assert bank.mem.shape == (2, 4, 50, 8)
    assert bank.slot_mask().sum(1).tolist() == [3, 3]  # the null slots alone
    assert torch.equal(bank.mem[0, :, -3:], memory.init_bank.detach())
    with pytest.raises(ValueError, match="num_slots"):
        memory.new_bank(num_slots=3)
    assert not hasattr(memory, "trainable_bank")  # no trained bank: knowledge enters by store()
    blend = MemoryModel(MemoryConfig(hidden_size=HIDDEN, num_layers=3, num_slots=16))
    with pytest.raises(ValueError, match="trained 16 slots"):
        blend.new_bank(num_slots=32)


# --- write ------------------------------------------------------------------------------

def test_write_appends_each_real_token_to_the_next_empty_slot():
    torch.manual_seed(0)
    memory = make_memory(slots=24)
    B, T = 2, 7
    hidden, values = torch.randn(B, T, HIDDEN).double(), torch.randn(B, T, HIDDEN).double()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = mask[0, 5] = False  # padding inside a row is skipped
    mask[1, 4:] = False
    mem = memory.write(memory.fresh_mem(B), hidden, mask, values)
    for b in range(B):
        want = expected_slots(memory, hidden[b], values[b], mask[b])[mask[b]]  # [n, 2P, Dh], in order
        n = len(want)
        torch.testing.assert_close(mem[b, :, :n].transpose(0, 1), want)
        assert torch.equal(mem[b, :, n:-3], torch.zeros_like(mem[b, :, n:-3]))  # still empty
        assert torch.equal(mem[b, :, -3:], memory.init_bank.detach())  # null slots kept
    # a second write goes on where the first stopped
    more = torch.randn(B, 3, HIDDEN).double()
    mem2 = memory.write(mem, more, None, more)
    for b in range(B):
        n = int(mask[b].sum())
        torch.testing.assert_close(mem2[b, :, n:n + 3].transpose(0, 1),
                                   expected_slots(memory, more[b], more[b]))
        assert torch.equal(mem2[b, :, :n], mem[b, :, :n])


def test_write_fills_the_holes_of_a_merged_bank_in_slot_order():
    memory = make_memory(slots=10, null_slots=2)
    a = MemoryBank(memory, memory.write(memory.fresh_mem(), torch.randn(1, 4, HIDDEN).double()))
    merged = MemoryBank.merge(a, a)  # [4 written, 4 empty, 2 null] twice
    hidden = torch.randn(1, 6, HIDDEN).double()
    new = memory.write(merged.mem, hidden)
    empty = (~merged.slot_mask()[0]).nonzero()[:, 0]
    assert len(empty) == 8
    torch.testing.assert_close(new[0][:, empty[:6]].transpose(0, 1),
                               expected_slots(memory, hidden[0], hidden[0]))
    assert MemoryBank(memory, new).slot_mask().sum() == 18


def test_store_gate_stores_only_the_tokens_it_keeps():
    """With store_threshold > 0 a write stores, in order, exactly the real
    tokens whose gate probability reaches the threshold; their content is still
    the next token's (kept or not), and a gate that keeps fewer tokens lets a
    bank hold more writes."""
    torch.manual_seed(3)
    memory = make_memory(slots=12, null_slots=2, store_threshold=0.5)
    assert make_memory().keep is None
    B, T = 2, 9
    hidden, values = torch.randn(B, T, HIDDEN).double(), torch.randn(B, T, HIDDEN).double()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    keep = torch.sigmoid(memory.keep_logits(hidden)) >= 0.5
    assert 0 < int((keep & mask).sum()) < int(mask.sum())  # this draw keeps some, drops some
    stored = memory.stored_tokens(hidden, mask)
    assert torch.equal(stored, keep & mask)
    mem = memory.write(memory.fresh_mem(B), hidden, mask, values)
    for b in range(B):
        want = expected_slots(memory, hidden[b], values[b], mask[b])[stored[b]]
        n = len(want)
        torch.testing.assert_close(mem[b, :, :n].transpose(0, 1), want)
        assert not bool(mem[b, :, n:-2].any())  # the rest stays empty
    with torch.no_grad():  # a gate that keeps nothing stores nothing
        memory.keep[3].bias.fill_(-50.0)
    assert torch.equal(memory.write(mem, hidden, mask, values), mem)
    plain = make_memory(slots=12, null_slots=2)
    with pytest.raises(ValueError, match="no store gate"):
        plain.keep_logits(hidden)


def test_store_into_no_bank_keeps_a_slot_per_stored_token_only():
    """store() with no bank sizes it for every token, then drops the slots a
    store gate left empty (never below num_slots); the reads are the same."""
    torch.manual_seed(9)
    model = tiny_llama()
    gated = make_memory(model, slots=6, null_slots=2, store_threshold=0.5, open_gates=True)
    texts = [[1 + (7 * i + j) % 50 for j in range(5)] for i in range(8)]  # 40 tokens
    with torch.no_grad():
        gated.keep[3].bias.fill_(0.0)
        gated.keep[3].weight.normal_(0.0, 3.0)  # some tokens kept, some not
    bank = memkernels.store(gated, model, None, texts)
    stored = int(bank.slot_mask().sum()) - 2
    assert 0 < stored < 40 and bank.num_slots == max(stored, 4) + 2
    assert bool(bank.slot_mask()[0, :stored].all())
    full = MemoryBank(gated, gated.fresh_mem(1, 42))
    memkernels.store(gated, model, None, texts, bank=full)
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(gated.read(0, model.model.embed_tokens(ids), bank),
                                   gated.read(0, model.model.embed_tokens(ids), full))
    plain = make_memory(model, slots=6, null_slots=2)  # no gate: a slot per token
    assert memkernels.store(plain, model, None, texts).num_slots == 42


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_store_into_a_fresh_bank_writes_window_by_window_as_the_whole_bank_would(chunk_size,
                                                                                 threshold):
    """store() into no bank writes each chunk into the window of slots it can
    fill (O(N) for N texts): the same bank, slot for slot, as the write of
    every chunk into the whole bank, then shrunk."""
    torch.manual_seed(10)
    model = tiny_llama()
    memory = make_memory(model, slots=6, null_slots=2, store_threshold=threshold)
    if threshold:
        with torch.no_grad():
            memory.keep[3].weight.normal_(0.0, 3.0)
    texts = [[1 + (5 * i + j) % 50 for j in range(2 + i % 5)] for i in range(11)]
    windowed = memkernels.store(memory, model, None, texts, chunk_size=chunk_size)
    whole = MemoryBank(memory, memory.fresh_mem(1, sum(map(len, texts)) + 2))
    memkernels.store(memory, model, None, texts, bank=whole, chunk_size=chunk_size)
    assert torch.equal(windowed.mem, memory.shrink_to_fit(whole.mem))


def test_a_lower_store_threshold_keeps_more_slots_and_is_checked():
    torch.manual_seed(12)
    model = tiny_llama()
    memory = make_memory(model, slots=6, null_slots=2, store_threshold=0.5)
    with torch.no_grad():
        memory.keep[3].weight.normal_(0.0, 3.0)  # some tokens kept, some not
    texts = [[1 + (7 * i + j) % 50 for j in range(3 + i % 4)] for i in range(9)]
    kept = []
    for threshold in (0.9, 0.5, 0.01):
        memory.set_store_threshold(threshold)
        assert memory.config.append.store_threshold == threshold
        bank = memkernels.store(memory, model, None, texts)
        kept.append(int(bank.slot_mask().sum()))
    assert kept[0] <= kept[1] <= kept[2] and kept[0] < kept[2]
    for bad in (0.0, 1.0, -0.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="threshold must be a number in"):
            memory.set_store_threshold(bad)
    with pytest.raises(ValueError, match="no store gate"):
        make_memory(model, slots=6, null_slots=2).set_store_threshold(0.1)


def test_a_full_bank_is_refused_and_left_as_it_was():
    model = tiny_llama()
    memory = make_memory(model, slots=8, null_slots=2)
    bank = memkernels.store(memory, model, None, [[1, 2, 3, 4]])
    before = bank.mem.clone()
    with pytest.raises(ValueError, match="row 0 has 2 empty slots, the write has 3 tokens"):
        memkernels.store(bank.memory, model, None, [[5, 6, 7]], bank=bank)
    assert torch.equal(bank.mem, before)
    memkernels.store(bank.memory, model, None, [[5, 6]], bank=bank)  # what fits still goes in
    assert bool(bank.slot_mask().all())


def test_write_gradients_reach_the_tokens_and_the_null_slots():
    memory = make_memory()
    hidden = torch.randn(2, 5, HIDDEN, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    torch.autograd.gradcheck(lambda h: memory.write(memory.fresh_mem(2).detach(), h, mask),
                             (hidden,))
    memory.write(memory.fresh_mem(2), hidden, mask).pow(2).sum().backward()
    assert memory.init_bank.grad is not None and bool(memory.init_bank.grad.ne(0).all())
    assert bool(hidden.grad[~mask].eq(0).all())  # padding writes nothing
    assert bool(hidden.grad[mask].ne(0).any(-1).all())


# --- read ----------------------------------------------------------------------------------

def plain_read(memory, reader, hidden, mem, context=None):
    """The reader's output in plain PyTorch: every query head softmaxes cosine x
    scale over the non-empty slots of its pair (the query MLP reads the
    context beside the normed hidden state when given)."""
    B, T, _ = hidden.shape
    P, D = memory.pairs, memory.config.head_dim
    x = reader.norm(hidden) if context is None else torch.cat([reader.norm(hidden), context], -1)
    q = F.normalize(reader.query(x).view(B, T, 2 * P, D), dim=-1)
    mem = mem.expand(B, -1, -1, -1)
    keys = F.normalize(torch.einsum("bpsd,pde->bpse", mem[:, :P], memory.slot_key), dim=-1)
    values = torch.einsum("bpsd,pde->bpse", mem[:, P:], memory.slot_value)
    keys, values = torch.cat([keys, keys], 1), torch.cat([values, values], 1)  # head c*P + p
    scores = torch.einsum("bthd,bhsd->bhts", q, keys) * reader.scale
    scores = scores.masked_fill(~mem.ne(0).any(3).any(1)[:, None, None, :], float("-inf"))
    read = torch.einsum("bhts,bhsd->bthd", scores.softmax(-1), values).reshape(B, T, -1)
    return hidden + torch.tanh(reader.gate) * reader.out(read)


@pytest.mark.parametrize("rows", [1, 3])
def test_read_matches_plain_pytorch_forward_and_backward(rows):
    torch.manual_seed(1)
    memory = make_memory(slots=30, open_gates=True)
    memory.fit_statistics(torch.randn(40, HIDDEN).double() * 3 + 1,
                          [torch.randn(40, HIDDEN).double() * 2 - 1 for _ in memory.readers])
    B, T = 3, 4
    written = torch.randn(rows, 9, HIDDEN).double()
    mask = torch.rand(rows, 9) < 0.8
    bank = MemoryBank(memory, memory.write(memory.fresh_mem(rows), written, mask).detach())
    hidden = torch.randn(B, T, HIDDEN, dtype=torch.float64, requires_grad=True)
    for reader_index, reader in enumerate(memory.readers):
        got = memory.read(reader_index, hidden, bank)
        want = plain_read(memory, reader, hidden, bank.mem)
        torch.testing.assert_close(got, want)
        params = [hidden, memory.slot_key, memory.slot_value, *reader.parameters()]
        g_got = torch.autograd.grad(got.pow(2).sum(), params, allow_unused=True)
        g_want = torch.autograd.grad(want.pow(2).sum(), params, allow_unused=True)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
        with torch.no_grad():  # the folded inference path, also after in-place updates
            torch.testing.assert_close(memory.read(reader_index, hidden, bank), want)
            reader.query[0].mean.add_(0.5)
            reader.query[1].bias.add_(0.1)
            reader.gate.mul_(0.5)
            torch.testing.assert_close(memory.read(reader_index, hidden, bank),
                                       plain_read(memory, reader, hidden, bank.mem))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5])  # the fused layer's GEMV path (<= 4 rows) and GEMM path
def test_inference_read_of_a_one_row_bank_is_one_fused_call(monkeypatch, dtype, tokens):
    """A read without gradients of a one-row bank on the CPU backend is one
    call of a memkernels._C.ReaderPlan (MLP query, unit queries, 2 query heads
    per bank pair), built once per reader, and matches the plain PyTorch read."""
    if fused.cpu_kernel(torch.zeros(1, dtype=dtype), dtype) is None:
        pytest.skip("memkernels._C is not built")
    torch.manual_seed(8)
    memory = make_memory(slots=30, open_gates=True).to(dtype)
    memory.fit_statistics(torch.randn(40, HIDDEN, dtype=dtype) * 3 + 1,
                          [torch.randn(40, HIDDEN, dtype=dtype) * 2 - 1 for _ in memory.readers])
    bank = MemoryBank(memory, memory.write(memory.fresh_mem(1), torch.randn(1, 9, HIDDEN,
                                                                            dtype=dtype)).detach())
    calls, built = [], []
    real = fused.reading_layer_plan

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        assert type(plan).__name__ == "ReaderPlan"  # the C++ plan, not the composed fallback
        built.append(1)
        return lambda *a: calls.append(1) or plan(*a)
    monkeypatch.setattr(fused, "reading_layer_plan", spy)  # the one place reads build it
    hidden = torch.randn(2, tokens, HIDDEN, dtype=dtype) * 4
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    first = []
    for i, reader in enumerate(memory.readers):
        with torch.no_grad():
            first.append(memory.read(i, hidden, bank))
        torch.testing.assert_close(first[-1], plain_read(memory, reader, hidden, bank.mem), **tol)
    assert len(calls) == 2 and len(built) == 2
    with torch.no_grad():  # memoised: a second read calls the same plan, to the same output
        assert torch.equal(memory.read(0, hidden, bank), first[0])
    assert len(calls) == 3 and len(built) == 2
    # a bank holding plans copies and pickles (without them: rebuilt on its first read)
    for twin in (copy.deepcopy(bank), pickle.loads(pickle.dumps(bank))):
        assert twin.fused_plans == {} and bank.fused_plans
        with torch.no_grad():
            assert torch.equal(memory.read(0, hidden, twin), first[0])
    assert len(built) == 4
    if dtype == torch.float32:  # the narrow caches, read in place
        with torch.no_grad():
            exact = memory.read(0, hidden, bank)
            bf16 = memory.read(0, hidden, bank, torch.bfloat16)
            int8 = memory.read(0, hidden, bank, torch.int8)
            monkeypatch.setattr(fused, "enabled", False)
            # the reader layer itself, unfused: dequantized, then read
            int8_unfused = memory.readers[0](hidden, *bank.keys_values(torch.int8), None)
        assert len(calls) == 8  # 5 before, 3 here
        torch.testing.assert_close(int8, int8_unfused, rtol=1e-5, atol=1e-5)
        # (the unfused bf16 read rounds the queries to bf16 too: compared to exact)
        torch.testing.assert_close(bf16, exact, atol=0.05, rtol=0)
        assert not torch.equal(bf16, exact)


def test_empty_slots_are_never_read():
    torch.manual_seed(2)
    memory = make_memory(slots=40, open_gates=True)
    written = torch.randn(1, 6, HIDDEN).double()
    big = MemoryBank(memory, memory.write(memory.fresh_mem(1, 40), written).detach())
    small = MemoryBank(memory, memory.write(memory.fresh_mem(1, 9), written).detach())
    hidden = torch.randn(2, 3, HIDDEN).double()
    with torch.no_grad():
        torch.testing.assert_close(memory.read(0, hidden, big), memory.read(0, hidden, small))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_narrow_key_value_caches_read_close_to_the_exact_bank(kv_dtype):
    torch.manual_seed(3)
    memory = make_memory(slots=20, open_gates=True).float()
    bank = MemoryBank(memory, memory.write(memory.fresh_mem(1), torch.randn(1, 8, HIDDEN)).detach())
    hidden = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        exact = memory.read(0, hidden, bank)
        narrow = memory.read(0, hidden, bank, kv_dtype)
    torch.testing.assert_close(narrow, exact, atol=0.05, rtol=0)
    assert not torch.equal(narrow, exact)  # the narrow cache was used


# --- on an LLM -------------------------------------------------------------------------------

def test_attached_with_closed_gates_the_logits_are_unchanged_and_open_they_change():
    torch.manual_seed(4)
    model = tiny_llama()
    ids = torch.randint(1, VOCAB, (2, 6))
    base = model(ids).logits
    memory = make_memory(model)
    bank = memkernels.store(memory, model, None, [[1, 2, 3], [4, 5, 6, 7]])
    with memkernels.attach(model, memory, bank):
        assert torch.equal(model(ids).logits, base)
    opened = make_memory(model, open_gates=True)
    with memkernels.attach(model, opened, memkernels.store(opened, model, None, [[1, 2, 3]])):
        assert not torch.allclose(model(ids).logits, base)


def test_save_load_pretrained_and_banks_roundtrip(tmp_path):
    torch.manual_seed(5)
    model = tiny_llama()
    memory = make_memory(model, open_gates=True)
    memory.fit_statistics(torch.randn(50, HIDDEN).double(),
                          [torch.randn(20, HIDDEN).double() for _ in memory.readers])
    memory.save_pretrained(tmp_path / "m")
    loaded = MemoryModel.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, AppendMemory) and loaded.init_bank.dtype == torch.float64
    for (name, a), b in zip(memory.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # buffers (the fitted statistics) too
    bank = memkernels.store(memory, model, None, [[1, 2, 3, 4], [5, 6]])
    bank.save(tmp_path / "bank.safetensors")
    back = MemoryBank.load(tmp_path / "bank.safetensors", loaded)
    ids = torch.randint(1, VOCAB, (1, 5))
    with memkernels.attach(model, memory, bank):
        want = model(ids).logits
    with memkernels.attach(model, loaded, back):
        assert torch.equal(model(ids).logits, want)
    assert memory.fingerprint() == loaded.fingerprint()


# --- the address pre-training ------------------------------------------------------------------

class CharTokenizer:
    """One id per character (ids 1..60): enough for a tiny LM built from a config."""

    def __call__(self, text):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


def test_address_nll_is_minus_the_log_of_the_mean_weight_over_heads():
    torch.manual_seed(6)
    q, keys = torch.randn(5, 3, 8).double(), F.normalize(torch.randn(11, 3, 8).double(), dim=-1)
    targets = torch.randint(0, 11, (5,))
    weights = (torch.einsum("apd,kpd->apk", F.normalize(q, dim=-1), keys) * 7).softmax(-1)
    want = -weights[torch.arange(5), :, targets].mean(1).log().mean()
    torch.testing.assert_close(address_nll(q, keys, targets, 7.0), want)


def test_address_contrastive_is_infonce_on_the_cosine_over_all_heads():
    torch.manual_seed(8)
    q, keys = torch.randn(4, 3, 8).double(), torch.randn(9, 3, 8).double()
    targets = torch.tensor([0, 8, 3, 3])
    cos = torch.stack([torch.stack([F.cosine_similarity(a.flatten(), k.flatten(), dim=0)
                                    for k in keys]) for a in q])
    want = -(cos / 0.1).log_softmax(1)[torch.arange(4), targets].mean()
    torch.testing.assert_close(address_contrastive(q, keys, targets, 0.1), want)


def test_pretrain_address_fits_the_statistics_and_lowers_its_loss():
    torch.manual_seed(7)
    model = tiny_llama()
    memory = make_memory(model)
    names = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(3)) for i in range(40)]
    queries = [f"who {n}?" for n in names]
    statements = [f"{n} is {names[(i + 5) % 40]}." for i, n in enumerate(names)]
    before = memory.slot_value.detach().clone()
    losses = pretrain_address(memory, model, CharTokenizer(), queries, statements,
                              [2] * len(names), steps=60, batch=16, lr=3e-3, progress=False)
    assert len(losses) == 60 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert not torch.equal(memory.address[0].std, torch.ones(HIDDEN, dtype=torch.float64))
    assert torch.equal(memory.slot_value, before)  # only the address and the query train
    gated = make_memory(model, store_threshold=0.5)
    last = [len(s) - 1 for s in statements]  # the "." (an easy target for a tiny random LM)
    losses = pretrain_address(gated, model, CharTokenizer(), queries, statements,
                              last, steps=80, batch=16, lr=3e-3, progress=False)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    # the gate learns to keep each statement's target token and little else
    ids = torch.tensor([CharTokenizer()(s)["input_ids"] for s in statements[:8]])
    from memkernels.hf import write_layer_hidden
    with torch.no_grad():
        hidden, *_ = write_layer_hidden(model, gated, ids, torch.ones_like(ids))
        kept = torch.sigmoid(gated.keep_logits(hidden)) >= 0.5
    assert kept[:, -1].float().mean() >= 0.75 and kept[:, :-1].float().mean() < 0.1
    with pytest.raises(ValueError, match=r"targets\[0\] = 99"):
        pretrain_address(memory, model, CharTokenizer(), queries, statements, [99] * 40, steps=1)
    with pytest.raises(TypeError, match="append-rule"):
        blend = MemoryModel(MemoryConfig.from_hf(model.config)).double()
        pretrain_address(blend, model, CharTokenizer(), queries, statements, [2] * 40, steps=1)


def test_pretrain_address_groups_bring_each_pair_its_sibling_statements():
    """groups: a pair drawn into a batch is followed by one pair of each other
    statement of its group (hard negatives); without groups, the batch is
    the random draw it always was."""
    from memkernels.train.append_recipe import MAX_GROUP_STATEMENTS, draw_rows, sibling_pairs
    statements = ["a1", "a1", "a2", "a3", "b1", "c1", "c2", "c2"]
    groups = ["a", "a", "a", "a", "b", "c", "c", "c"]
    siblings = sibling_pairs(statements, groups)
    assert siblings[0] == [[2], [3]] and siblings[2] == [[0, 1], [3]]
    assert siblings[4] == [] and siblings[5] == [[6, 7]] and siblings[6] == [[5]]
    gen = torch.Generator().manual_seed(0)
    for batch in (3, 4, 6):
        for _ in range(20):
            rows = draw_rows(len(statements), batch, gen, siblings, statements)
            # no statement twice (the 6 statements fill a batch of 6 exactly)
            assert len({statements[r] for r in rows}) == len(rows) <= batch
            assert len(rows) >= batch - 2
            i = 0
            while i < len(rows):  # each drawn pair, then one of each sibling statement, whole
                r = rows[i]
                following = rows[i + 1:i + 1 + len(siblings[r])]
                assert len(following) == len(siblings[r])
                for pairs, got in zip(siblings[r], following):
                    assert got in pairs
                i += 1 + len(siblings[r])
    with pytest.raises(ValueError, match="needs the pairs' statements"):
        draw_rows(8, 4, gen, siblings)
    with pytest.raises(ValueError, match="a group holds 17 statements"):
        sibling_pairs([str(i) for i in range(MAX_GROUP_STATEMENTS + 1)], [0] * 17)
    plain = draw_rows(100, 16, torch.Generator().manual_seed(3))
    assert plain == torch.randperm(100, generator=torch.Generator().manual_seed(3))[:16].tolist()
    torch.manual_seed(7)
    model = tiny_llama()
    memory = make_memory(model)
    queries = [f"who {n}?" for n in "abcdefgh"]
    with pytest.raises(ValueError, match="groups must have one entry per pair"):
        pretrain_address(memory, model, CharTokenizer(), queries, statements, [0] * 8,
                         steps=1, groups=groups[:3], progress=False)
    losses = pretrain_address(memory, model, CharTokenizer(), queries, statements, [0] * 8,
                              steps=3, batch=4, groups=groups, progress=False)
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))


def test_text_end_states_every_token_matches_each_text_run_alone():
    from memkernels.hf import text_end_states
    torch.manual_seed(9)
    model = tiny_llama()
    texts = ["ab", "hello there", "xyz?"]
    ends = text_end_states(model, CharTokenizer(), texts)
    every = text_end_states(model, CharTokenizer(), texts, every_token=True)
    assert ends.shape == (3, 4, HIDDEN) and every.shape == (sum(map(len, texts)), 4, HIDDEN)
    start = 0
    for i, text in enumerate(texts):
        ids = torch.tensor([CharTokenizer()(text)["input_ids"]])
        alone = torch.stack(model(ids, output_hidden_states=True).hidden_states, 2)[0]
        torch.testing.assert_close(every[start:start + len(text)], alone)
        torch.testing.assert_close(ends[i], alone[-1])
        start += len(text)


# --- the context (MemoryConfig.context_decay) ------------------------------------------------

def loop_context(x, mask, decay):
    """decayed_context, one token at a time."""
    total, weight = torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0, 0])
    out = []
    for t in range(x.shape[1]):
        m = mask[:, t].to(x.dtype)
        total, weight = decay * total + m[:, None] * x[:, t], decay * weight + m
        out.append(torch.where(weight[:, None] > 0, total / weight.clamp(min=1e-300)[:, None], 0.0))
    return torch.stack(out, 1)


def test_decayed_context_is_the_masked_decayed_mean_and_carries_its_state():
    from memkernels.memory.context import decayed_context
    torch.manual_seed(11)
    x = torch.randn(3, 150, 5, dtype=torch.float64)  # over two blocks of 64 tokens
    mask = torch.rand(3, 150) < 0.7
    mask[2] = False  # a row of padding only: zeros, never NaN
    mask[1, :20] = False  # left padding
    want = loop_context(x, mask, 0.7)
    got, _ = decayed_context(x, mask, 0.7)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    assert bool(got[2].eq(0).all()) and bool(got[1, :20].eq(0).all())
    # a prompt, then a token at a time (a decode loop), carrying the state
    pieces, state = [], None
    for start, stop in [(0, 70), *[(t, t + 1) for t in range(70, 150)]]:
        piece, state = decayed_context(x[:, start:stop], mask[:, start:stop], 0.7, state)
        pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, 1), want)
    every = loop_context(x, torch.ones(3, 150, dtype=torch.bool), 0.3)
    torch.testing.assert_close(decayed_context(x, None, 0.3)[0], every)
    # the same decode loop without a mask (every token real)
    pieces, state = [], None
    for start, stop in [(0, 5), *[(t, t + 1) for t in range(5, 150)]]:
        piece, state = decayed_context(x[:, start:stop], None, 0.3, state)
        pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, 1), every)


def fitted_context_memory(dtype=torch.float64, **overrides):
    memory = make_memory(slots=30, open_gates=True, context_decay=0.6, **overrides).to(dtype)
    states = lambda: torch.randn(40, HIDDEN, dtype=dtype)  # noqa: E731
    memory.fit_statistics(states() * 3 + 1, [states() * 2 - 1 for _ in memory.readers],
                          states() + 2, [states() - 1 for _ in memory.readers])
    return memory


def test_context_write_keys_each_address_on_its_token_and_context():
    torch.manual_seed(12)
    memory = fitted_context_memory()
    hidden, values, context = (torch.randn(1, 6, HIDDEN).double() for _ in range(3))
    mem = memory.write(memory.fresh_mem(1), hidden, None, values, context)
    torch.testing.assert_close(mem[0, :, :6].transpose(0, 1),
                               expected_slots(memory, hidden[0], values[0], None, context[0]))
    with pytest.raises(ValueError, match="keys on the context"):
        memory.write(memory.fresh_mem(1), hidden, None, values)
    with pytest.raises(ValueError, match="context must have the shape"):
        memory.write(memory.fresh_mem(1), hidden, None, values, context[:, :2])
    plain = make_memory()
    with pytest.raises(ValueError, match="context_decay is 0"):
        plain.write(plain.fresh_mem(1), hidden, None, values, context)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows, tokens", [(1, 1), (1, 5), (3, 2)])
def test_context_read_matches_plain_pytorch_with_and_without_gradients(dtype, rows, tokens):
    """The training path (gradients), the folded inference path and, for a
    one-row bank, the fused C++ call (the context's share of the query MLP's
    first layer as a per-token bias) all match plain PyTorch."""
    torch.manual_seed(13)
    memory = fitted_context_memory(dtype)
    written = torch.randn(rows, 9, HIDDEN, dtype=dtype)
    bank = MemoryBank(memory, memory.write(memory.fresh_mem(rows), written, None, None,
                                           torch.randn(rows, 9, HIDDEN, dtype=dtype)).detach())
    hidden = torch.randn(rows, tokens, HIDDEN, dtype=dtype, requires_grad=True) * 3
    context = torch.randn(rows, tokens, HIDDEN, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for i, reader in enumerate(memory.readers):
        want = plain_read(memory, reader, hidden, bank.mem, context)
        got = memory.read(i, hidden, bank, context=context)
        torch.testing.assert_close(got, want, **tol)
        params = [hidden, *reader.query.parameters()]
        for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
            torch.testing.assert_close(a, b, **tol)
        with torch.no_grad():
            torch.testing.assert_close(memory.read(i, hidden, bank, context=context), want, **tol)
            reader.query[0].mean.add_(0.3)  # the folded weights follow the statistics
            torch.testing.assert_close(memory.read(i, hidden, bank, context=context),
                                       plain_read(memory, reader, hidden, bank.mem, context), **tol)
        with pytest.raises(ValueError, match="keys on the context"):
            memory.read(i, hidden, bank)


def test_attached_context_memory_decodes_with_a_kv_cache_as_one_forward():
    """The handle carries the context from the prompt to each decode step
    (and skips left padding): logits of a prefill then one token at a time
    with the KV cache equal one forward over the whole batch."""
    torch.manual_seed(14)
    model = tiny_llama()
    memory = make_memory(model, open_gates=True, context_decay=0.7)
    bank = memkernels.store(memory, model, None, [[5, 6, 7, 8], [9, 10, 11]])
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1: left padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with memkernels.attach(model, memory, bank) as handle, torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5],
                    use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for t in range(5, 9):
            if t == 7:  # storing text mid-decode leaves the decode's context alone
                handle.bank = memkernels.store(memory, model, None, [[5, 6, 7, 8], [9, 10, 11]])
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                        position_ids=positions[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
        torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()])
        # a new call without a cache starts afresh
        torch.testing.assert_close(model(ids[1:, 3:]).logits, full[1:, 3:])
        assert handle.context.shape == (1, 6, HIDDEN)


@pytest.mark.parametrize("lookahead", [False, True])
def test_pretrain_address_with_a_context_lowers_its_loss(lookahead):
    """With lookahead the write context holds each statement token's next
    state beside its decayed context, and the address statistics fit both."""
    torch.manual_seed(15)
    model = tiny_llama()
    memory = make_memory(model, context_decay=0.7, lookahead=lookahead)
    names = ["".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(3)) for i in range(40)]
    queries = [f"who {n}?" for n in names]
    statements = [f"{n} is {names[(i + 5) % 40]}." for i, n in enumerate(names)]
    losses = pretrain_address(memory, model, CharTokenizer(), queries, statements,
                              [2] * len(names), steps=60, batch=16, lr=3e-3, progress=False)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert memory.address[0].mean.shape == ((3 if lookahead else 2) * HIDDEN,)
    assert not torch.equal(memory.readers[0].query[0].std[HIDDEN:],
                           torch.ones(HIDDEN, dtype=torch.float64))  # fitted on the contexts
    if lookahead:  # fitted on the next states too
        assert not torch.equal(memory.address[0].std[2 * HIDDEN:],
                               torch.ones(HIDDEN, dtype=torch.float64))


# --- keying on what follows (AppendOptions.lookahead) ---------------------------------------

@pytest.mark.parametrize("decay", [0.0, 0.7])
def test_lookahead_write_context_is_the_next_tokens_state_within_each_text(decay):
    """write_layer_hidden with lookahead: the write context ends with the
    write state of the token after each one, zero at a text's last real
    token (padding follows) and at the end; the address MLP reads it beside
    norm(h) and the decayed context, and store() writes those addresses."""
    torch.manual_seed(21)
    model = tiny_llama()
    memory = make_memory(model, context_decay=decay, lookahead=True)
    C = model.config.hidden_size
    assert memory.write_context_width == C * (2 if decay else 1)
    assert memory.address[0].mean.shape == (C + memory.write_context_width,)
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # row 1: 4 real tokens, right-padded
    hidden, values, context = memkernels.hf.write_layer_hidden(model, memory, ids, mask)
    assert context.shape == (2, 6, memory.write_context_width)
    nxt = context[..., -C:]
    torch.testing.assert_close(nxt[0, :5], hidden[0, 1:])
    torch.testing.assert_close(nxt[1, :3], hidden[1, 1:4])
    assert not nxt[0, 5].any() and not nxt[1, 3:].any()
    if decay:
        plain = make_memory(model, context_decay=decay)
        torch.testing.assert_close(context[..., :C],
                                   memkernels.hf.write_layer_hidden(model, plain, ids, mask).context)
    values = hidden if values is None else values
    mem = memory.write(memory.fresh_mem(2), hidden, mask.bool(), values, context)
    for row, n in ((0, 6), (1, 4)):
        torch.testing.assert_close(mem[row, :, :n].transpose(0, 1),
                                   expected_slots(memory, hidden[row, :n], values[row, :n], None,
                                                  context[row, :n]))
    with pytest.raises(ValueError, match="context must have the shape"):
        memory.write(memory.fresh_mem(2), hidden, mask.bool(), values, context[..., :C // 2])
    with pytest.raises(ValueError, match="keys on the context"):
        memory.write(memory.fresh_mem(2), hidden, mask.bool(), values)


def test_lookahead_is_a_saved_bool_and_leaves_other_memories_unchanged(tmp_path):
    with pytest.raises(ValueError, match="lookahead must be a bool"):
        make_memory(lookahead=1)
    memory = make_memory(context_decay=0.5, lookahead=True)
    memory.save_pretrained(tmp_path)
    loaded = MemoryModel.from_pretrained(tmp_path)
    assert loaded.config.append.lookahead is True
    assert loaded.fingerprint() == memory.fingerprint()
    plain = make_memory(context_decay=0.5)
    assert plain.write_context_width == HIDDEN and plain.address[0].mean.shape == (2 * HIDDEN,)


# --- an index for large banks (MemoryBank.build_index) --------------------------------------

def test_cluster_slots_sorts_every_slot_into_its_nearest_centroid():
    from memkernels.memory.index import cluster_slots
    torch.manual_seed(16)
    keys = F.normalize(torch.randn(3, 50, 8, dtype=torch.float64), dim=-1)
    order, centroids, starts = cluster_slots(keys, 7)
    assert order.shape == (3, 50) and centroids.shape == (3, 7, 8) and starts.shape == (3, 8)
    for p in range(3):
        assert sorted(order[p].tolist()) == list(range(50))  # a permutation
        assert starts[p, 0] == 0 and starts[p, -1] == 50 and bool((starts[p].diff() >= 0).all())
        nearest = (keys[p] @ centroids[p].T).argmax(1)
        for c in range(7):  # cluster c's range holds exactly the slots nearest to centroid c
            members = order[p, starts[p, c]:starts[p, c + 1]]
            assert bool(nearest[members].eq(c).all())
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3, 7, dtype=torch.float64))


def probed_read(memory, reader, hidden, bank, context=None):
    """The read an index gives, in plain PyTorch: each query head softmaxes over
    the slots of its `probes` clusters of highest centroid score only."""
    (keys, values), (centroids, starts, probes) = bank._cached_keys_values(None)
    B, T, _ = hidden.shape
    P, D = memory.pairs, memory.config.head_dim
    x = reader.norm(hidden) if context is None else torch.cat([reader.norm(hidden), context], -1)
    q = F.normalize(reader.query(x).view(B * T, 2 * P, D), dim=-1)
    out = torch.zeros_like(q)
    for n in range(B * T):
        for h in range(2 * P):
            g = h % P
            best = (centroids[g] @ q[n, h]).topk(min(probes, centroids.shape[1])).indices
            slots = torch.cat([torch.arange(starts[g, c], starts[g, c + 1]) for c in best.tolist()])
            w = (keys[g, slots] @ q[n, h] * reader.scale).softmax(0)
            out[n, h] = w @ values[g, slots]
    return hidden + torch.tanh(reader.gate) * reader.out(out.view(B, T, -1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5])
def test_indexed_read_reads_the_nearest_clusters_and_all_of_them_is_exact(dtype, tokens):
    if fused.cpu_kernel(torch.zeros(1, dtype=dtype), dtype) is None:
        pytest.skip("memkernels._C is not built")
    torch.manual_seed(17)
    memory = fitted_context_memory(dtype)
    bank = MemoryBank(memory, memory.write(memory.fresh_mem(1, 70), torch.randn(1, 60, HIDDEN,
                                           dtype=dtype), None, None,
                                           torch.randn(1, 60, HIDDEN, dtype=dtype)).detach())
    hidden = torch.randn(2, tokens, HIDDEN, dtype=dtype) * 3
    context = torch.randn(2, tokens, HIDDEN, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    with torch.no_grad():
        exact = [memory.read(i, hidden, bank, context=context) for i in range(2)]
        bank.build_index(probes=2, clusters=6)
        for i, reader in enumerate(memory.readers):
            got = memory.read(i, hidden, bank, context=context)
            torch.testing.assert_close(got, probed_read(memory, reader, hidden, bank, context), **tol)
            assert not torch.allclose(got, exact[i])  # 2 of 6 clusters: not the whole read
        bank.build_index(probes=6, clusters=6)  # every cluster: the exact read
        for i in range(2):
            torch.testing.assert_close(memory.read(i, hidden, bank, context=context), exact[i], **tol)
        bank.drop_index()
        for i in range(2):
            torch.testing.assert_close(memory.read(i, hidden, bank, context=context), exact[i], **tol)
    with pytest.raises(ValueError, match="one-row bank"):
        MemoryBank.stack([bank, bank]).build_index()
    with pytest.raises(ValueError, match="probes must be a positive int"):
        bank.build_index(probes=0)
