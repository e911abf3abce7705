"""store(): text through the frozen model into a bank."""
from __future__ import annotations


import pytest
import torch

import memkernels
from memkernels import reference

from tiny_models import MODELS, VOCAB, ids, make_memory, random_bank


# --- store ------------------------------------------------------------------------

@pytest.mark.parametrize("values_from", ["write_layer", "embeddings"])
def test_store_equals_the_reference_write_of_the_hidden_states(values_from):
    model = MODELS["llama"]()
    memory = make_memory(model, values_from=values_from)
    texts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    bank = memkernels.store(memory, model, None, texts, chunk_size=8)
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

    one = memkernels.store(memory, model, tokenizer, ["alpha is red", "beta is blue", "gamma"], chunk_size=2)
    assert not torch.equal(one.mem, memory.init_bank[None])
    rows = memory.new_bank(batch_size=2)
    rows = memkernels.store(memory, model, tokenizer, [["alpha is red", "beta is blue", "gamma"], ["x y"]],
                        bank=rows, chunk_size=2)
    # row 0 got the same writes as the one-row bank; row 1 one write only
    torch.testing.assert_close(rows.mem[0], one.mem[0], rtol=1e-10, atol=1e-12)
    row1 = memkernels.store(memory, model, tokenizer, ["x y"])
    torch.testing.assert_close(rows.mem[1], row1.mem[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="2 rows: items must be a list of 2"):
        memkernels.store(memory, model, tokenizer, ["a"], bank=rows)
    with pytest.raises(ValueError, match="tokenizer"):
        memkernels.store(memory, model, None, ["a"])


def test_store_reads_the_base_model_even_when_attached():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    texts = [[3, 4, 5], [6, 7]]
    detached = memkernels.store(memory, model, None, texts)
    with memkernels.attach(model, memory, random_bank(memory)):
        attached = memkernels.store(memory, model, None, texts)
    assert torch.equal(detached.mem, attached.mem)


def test_stored_text_changes_what_is_read():
    model = MODELS["llama"]()
    memory = make_memory(model, open_gates=True)
    x = ids(1, 5)
    with memkernels.attach(model, memory) as handle:
        before = model(x).logits
        memkernels.store(handle.bank.memory, model, None, [[1, 2, 3, 4]], bank=handle.bank)
        after = model(x).logits  # the bank's cached keys/values were refreshed
    assert not torch.allclose(before, after)
