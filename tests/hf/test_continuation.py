"""StoredTextContinuation: a generate-time logits processor that keeps a copy
on the stored text it continues (memkernels.hf.continuation)."""
from __future__ import annotations

import random

import pytest
import torch

import memkernels
from memkernels import MemoryConfig, MemoryModel
from memkernels.hf import StoredTextContinuation
from memkernels.memory.config import AppendOptions
from memkernels.memory.lexical import Entries

from tiny_models import MODELS, VOCAB, ids, make_memory, random_bank


def entries_of(texts):
    return Entries.from_texts(texts, torch.full((4,), -1))


def brute_continuation(texts, generated, max_run):
    """The longest run of generated's last tokens (at most max_run) found in a
    text with a token after it; its continuation if all places agree."""
    for run in range(min(len(generated), max_run), 0, -1):
        tail = generated[-run:]
        following = {t[i + run] for t in texts for i in range(len(t) - run)
                     if t[i:i + run] == tail}
        if following:
            return following.pop() if len(following) == 1 else None
    return None


def test_the_longest_run_found_decides_and_places_that_disagree_give_nothing():
    texts = [[5, 6, 7, 8, 9], [1, 6, 7, 3], [2, 4, 4, 2, 9], [11]]
    proc = StoredTextContinuation(entries_of(texts))
    assert proc.continuation([6]) == 7  # both places of 6 go on with 7
    assert proc.continuation([6, 7]) is None  # ... then 8 or 3
    assert proc.continuation([5, 6, 7]) == 8 and proc.continuation([1, 6, 7]) == 3
    assert proc.continuation([0, 1, 6, 7]) == 3  # the longest run that is found: [1, 6, 7]
    assert proc.continuation([9]) is None  # a text's last token has no continuation
    assert proc.continuation([11]) is None and proc.continuation([42]) is None
    assert proc.continuation([2, 4, 4]) == 2 and proc.continuation([4]) is None
    assert proc.continuation([]) is None
    # a run never crosses from one text into the next
    crossing = StoredTextContinuation(entries_of([[1, 2], [3, 4], [5, 3, 6]]))
    assert crossing.continuation([2, 3]) is None  # [2, 3] only across texts 0 and 1


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_brute_force_search_on_random_texts(seed):
    rng = random.Random(seed)
    texts = [[rng.randrange(6) for _ in range(rng.randrange(1, 12))]
             for _ in range(rng.randrange(1, 8))]
    max_run = rng.choice([1, 2, 3, 16])
    proc = StoredTextContinuation(entries_of(texts), max_run=max_run)
    for _ in range(200):
        generated = [rng.randrange(6) for _ in range(rng.randrange(1, 7))]
        assert proc.continuation(generated) == brute_continuation(texts, generated, max_run), \
            (texts, generated, max_run)


def test_scores_move_weight_onto_the_continuation_after_the_prompt_only():
    texts = [[3, 4, 5]]
    scores = torch.randn(3, 9, dtype=torch.float64)
    prompt = torch.tensor([[0, 3], [3, 4], [1, 2]])  # a prompt's own run never counts
    proc = StoredTextContinuation(entries_of(texts), weight=0.3)
    assert torch.equal(proc(prompt, scores), scores)
    step = torch.cat([prompt, torch.tensor([[3], [4], [8]])], 1)
    out = proc(step, scores)
    p = scores.softmax(-1)
    for row, target in ((0, 4), (1, 5)):
        expected = 0.7 * p[row]
        expected[target] += 0.3
        torch.testing.assert_close(out[row].exp(), expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(out[2], scores[2])  # 8 is stored nowhere: unchanged
    nan = scores.clone()
    nan[0, 2] = float("nan")  # a NaN logit: its row's mixture is NaN, the others' not
    with_nan = StoredTextContinuation(entries_of(texts), weight=0.3)
    with_nan(prompt, scores)
    mixed = with_nan(step, nan)
    assert bool(mixed[0].isnan().all()) and not bool(mixed[1:].isnan().any())
    off = StoredTextContinuation(entries_of(texts), weight=0.0)
    off(prompt, scores)
    assert torch.equal(off(step, scores), scores)
    # low-precision logits are mixed in float32 and returned in their dtype
    half = StoredTextContinuation(entries_of(texts), weight=0.3)
    half(prompt, scores.bfloat16())
    out16 = half(step, scores.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16[:2].float().exp(), out[:2].float().exp(), atol=1e-2,
                               rtol=1e-2)
    # tiny probabilities stay finite (log space, no underflow to -inf)
    peaked = torch.zeros(1, 9, dtype=torch.float32)
    peaked[0, 0] = 200.0
    sharp = StoredTextContinuation(entries_of(texts), weight=0.3)
    sharp(prompt[:1], peaked)
    assert bool(sharp(step[:1], peaked).isfinite().all())
    # weight 1: only the continuation is left
    only = StoredTextContinuation(entries_of(texts), weight=1.0)
    only(prompt, scores)
    forced = only(step, scores)
    assert forced[0].argmax() == 4
    assert bool((forced[0, torch.arange(9) != 4] == float("-inf")).all())


def test_a_processor_used_again_takes_the_new_prompt():
    proc = StoredTextContinuation(entries_of([[3, 4, 5]]), weight=0.9)
    scores = torch.zeros(1, 9)
    proc(torch.tensor([[3]]), scores)
    assert proc(torch.tensor([[3, 4]]), scores).argmax() == 5  # generated [4]: then 5
    # a new call: its prompt [1, 2, 3, 4] holds a run, but prompts never count
    assert torch.equal(proc(torch.tensor([[1, 2, 3, 4]]), scores), scores)
    assert proc(torch.tensor([[1, 2, 3, 4, 3]]), scores).argmax() == 4


def test_generate_follows_the_stored_text_a_decode_has_started_to_copy():
    """With the weight above 0.5, a greedy decode whose first token starts a
    stored text copies the rest of it; at 0 it decodes as without it."""
    torch.manual_seed(0)
    model = MODELS["gpt2"]()
    prompts = ids(2, 5)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding in row 1
    plain = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    first = plain[:, 5].tolist()
    others = [t for t in range(1, VOCAB) if t not in first]
    texts = [[first[0], *others[:6]], [first[1], *others[6:8]]]
    if first[0] == first[1]:
        texts[1][0] = others[8]
    config = MemoryConfig.from_hf(model.config, num_heads=4, head_dim=8, num_slots=20,
                                  write_rule="append", append=AppendOptions(mlp_hidden=16))
    bank = memkernels.store(MemoryModel(config).double(), model, None, texts)
    copied = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            pad_token_id=0, logits_processor=[StoredTextContinuation(bank, 0.9)])
    assert copied[0, 5:].tolist() == texts[0][:6]
    if first[0] != first[1]:  # then the text's end: no continuation, the model's own choice
        assert copied[1, 5:8].tolist() == texts[1]
    again = model.generate(prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=0, logits_processor=[StoredTextContinuation(bank, 0.0)])
    assert torch.equal(again, plain)


def test_bad_arguments_are_named():
    model = MODELS["gpt2"]()
    memory = make_memory(model)
    with pytest.raises(ValueError, match="MemoryBank.entries"):
        StoredTextContinuation(random_bank(memory))
    with pytest.raises(TypeError, match="bank must be a MemoryBank"):
        StoredTextContinuation([[1, 2]])
    for weight in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="weight"):
            StoredTextContinuation(entries_of([[1, 2]]), weight=weight)
    for max_run in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_run"):
            StoredTextContinuation(entries_of([[1, 2]]), max_run=max_run)
