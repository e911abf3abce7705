"""An attached memory beside threads, beam search and bad store() calls:
each thread's forward keeps its own state (reads on or off, the bank, the
context), stores capture only their own call, and misuse raises clearly."""
from __future__ import annotations

import threading

import pytest
import torch

import memkernels
from memkernels import AppendOptions, MemoryConfig, MemoryModel

from tiny_models import MODELS, VOCAB, make_memory, tiny_llama


def run_threads(*targets, timeout=120):
    """Runs each target in its own thread; returns the exceptions they raised."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 (reported to the test)
                errors.append(exc)
        return run
    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"
    return errors


def test_reads_beside_a_concurrent_store_are_right_and_the_store_is_its_own():
    torch.manual_seed(3)
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    texts = [[5, 6, 7, 8], [9, 10, 11]]
    ids = torch.randint(1, VOCAB, (2, 7))
    handle = memkernels.attach(model, memory, memkernels.store(memory, model, None, texts))
    with torch.no_grad():
        expected = model(ids).logits
        stored_alone = memkernels.store(memory, model, None, [[20, 21, 22]] * 3).mem
    results, stores = [], []

    def reader():
        for _ in range(6):
            with torch.no_grad():
                results.append(model(ids).logits)

    def storer():
        for _ in range(6):
            stores.append(memkernels.store(memory, model, None, [[20, 21, 22]] * 3).mem)
    try:
        errors = run_threads(reader, reader, storer)
        assert not errors, errors
        assert len(results) == 12 and len(stores) == 6
        for logits in results:
            torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        for mem in stores:  # captured only its own forward's states
            torch.testing.assert_close(mem, stored_alone, rtol=0, atol=0)
        assert handle.reading
    finally:
        handle.detach()


def test_overlapping_stores_leave_reads_on():
    model = MODELS["gpt2"]()
    memory = make_memory(model, open_gates=True)
    handle = memkernels.attach(model, memory)
    try:
        def storer():
            for _ in range(5):
                memkernels.store(memory, model, None, [[1, 2, 3, 4]] * 4)
        assert not run_threads(storer, storer)
        assert handle.reading
        with torch.no_grad():
            ids = torch.randint(1, VOCAB, (1, 5))
            with handle.reads_disabled():
                base = model(ids).logits
            assert not torch.equal(model(ids).logits, base)  # the memory is still read
    finally:
        handle.detach()


def context_memory(model):
    torch.manual_seed(11)
    config = MemoryConfig.from_hf(model.config, num_heads=4, head_dim=8, num_slots=20,
                                  write_rule="append",
                                  append=AppendOptions(null_slots=3, mlp_hidden=16,
                                                       context_decay=0.7))
    memory = MemoryModel(config).double()
    with torch.no_grad():
        for r in memory.readers:
            r.gate.uniform_(0.5, 1.5)
    return memory


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, **kwargs)


def test_concurrent_generate_with_a_context_memory_matches_one_at_a_time():
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    memory = context_memory(model)
    prompts = [torch.randint(1, VOCAB, (1, n)) for n in (5, 8, 6, 9)]
    with memkernels.attach(model, memory, memkernels.store(memory, model, None, [[5, 6, 7, 8]])):
        alone = [generate(model, p) for p in prompts]
        together = [None] * len(prompts)

        def job(i):
            return lambda: together.__setitem__(i, generate(model, prompts[i]))
        assert not run_threads(*(job(i) for i in range(len(prompts))))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_beam_search_with_a_context_memory_follows_the_reordered_cache():
    """Beam search reorders the KV cache's rows; the context state follows:
    with the cache it picks what a recomputation of every step picks."""
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    memory = context_memory(model)
    ids = torch.randint(1, VOCAB, (2, 6))
    with memkernels.attach(model, memory, memkernels.store(memory, model, None, [[5, 6, 7]])):
        cached = generate(model, ids, num_beams=3, use_cache=True)
        recomputed = generate(model, ids, num_beams=3, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_detaching_a_stale_handle_leaves_the_live_one_alone():
    model = MODELS["llama"]()
    memory = make_memory(model)
    first = memkernels.attach(model, memory)
    first.detach()
    live = memkernels.attach(model, memory)
    try:
        first.detach()  # stale: nothing left to do
        assert not any(p.requires_grad for p in model.parameters())
        assert live.attached
    finally:
        live.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_store_refuses_bad_lengths_and_ids():
    model = MODELS["llama"]()  # 128 positions
    memory = make_memory(model)
    with pytest.raises(ValueError, match="past the model's 128 positions"):
        memkernels.store(memory, model, None, [list(range(1, 90)) * 2])
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_length must be None or an int >= 1"):
            memkernels.store(memory, model, None, [[1, 2, 3]], max_length=bad)
    with pytest.raises(TypeError, match="integer tensor"):
        memkernels.store(memory, model, None, torch.tensor([1.7, 2.2, 3.9]))
    with pytest.raises(TypeError, match="memory must be a MemoryModel"):
        memkernels.store(memory.new_bank(), model, None, [[1, 2]])
    cut = memkernels.store(memory, model, None, [list(range(1, 90)) * 2], max_length=100)
    assert cut.batch_size == 1
