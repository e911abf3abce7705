"""What store() wrote, text by text (MemoryBank.entries), a bank cut down to
some of its texts (select_entries), and the BM25 index over token ids that
picks them (memkernels.memory.lexical, MemoryBank.lexical_select)."""
from __future__ import annotations

import random

import pytest
import torch

import memkernels
from memkernels import MemoryBank
from memkernels.memory.lexical import (LEXICAL_K, LEXICAL_MAX_DF, LEXICAL_MAX_DF_FLOOR,
                                       LEXICAL_MIN_SCORE_RATIO, Entries, LexicalIndex, _terms)

from test_append import VOCAB, make_memory, tiny_llama


def gated_memory_and_texts(seed: int, threshold: float = 0.5):
    torch.manual_seed(seed)
    model = tiny_llama()
    memory = make_memory(model, slots=6, null_slots=2, store_threshold=threshold,
                         open_gates=True)
    if threshold:
        with torch.no_grad():
            memory.keep[3].weight.normal_(0.0, 3.0)  # some tokens kept, some not
    rng = random.Random(seed)
    texts = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))] for _ in range(13)]
    return model, memory, texts


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_store_records_which_text_each_slot_holds(chunk_size, threshold):
    model, memory, texts = gated_memory_and_texts(1, threshold)
    bank = memkernels.store(memory, model, None, texts, chunk_size=chunk_size)
    entries = bank.entries
    assert entries is not None and len(entries) == len(texts)
    assert [entries.text(e) for e in range(len(texts))] == texts
    written = int(bank.slot_mask().sum()) - 2
    # the first `written` slots, each a text's token in store order; the rest none
    assert bool((entries.slot_entry[:written] >= 0).all())
    assert bool((entries.slot_entry[written:] == -1).all())
    assert bool((entries.slot_entry[:written].diff() >= 0).all())
    for e, text in enumerate(texts):  # each text holds at most a slot per token
        assert int((entries.slot_entry == e).sum()) <= len(text)


@pytest.mark.parametrize("chosen", [[7, 3, 12], [0], [5, 6, 1, 2], []])
def test_a_selection_is_the_bank_of_those_texts_stored_alone(chosen):
    """select_entries keeps the chosen texts' slots (in the order chosen) and
    the null slots: slot for slot the bank store() makes of those texts
    alone (each text is encoded on its own; only the padding of its batch,
    hence the rounding, differs); reads agree."""
    model, memory, texts = gated_memory_and_texts(2)
    bank = memkernels.store(memory, model, None, texts, chunk_size=5)
    sub = bank.select_entries(chosen)
    alone = memkernels.store(memory, model, None, [texts[i] for i in chosen] or [[1]])
    if not chosen:  # nothing chosen: only the null slots
        assert sub.num_slots == 2 and bool(sub.slot_mask().all())
        return
    kept, made = sub.mem[:, :, sub.slot_mask()[0]], alone.mem[:, :, alone.slot_mask()[0]]
    torch.testing.assert_close(kept, made, rtol=1e-12, atol=1e-12)
    assert [sub.entries.text(e) for e in range(len(chosen))] == [texts[i] for i in chosen]
    hidden = torch.randn(2, 5, memory.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(memory.read(0, hidden, sub), memory.read(0, hidden, alone))
    # a selection of a selection
    again = sub.select_entries([len(chosen) - 1])
    last = memkernels.store(memory, model, None, [texts[chosen[-1]]])
    torch.testing.assert_close(again.mem[:, :, again.slot_mask()[0]],
                               last.mem[:, :, last.slot_mask()[0]], rtol=1e-12, atol=1e-12)


def bm25_by_hand(corpus: list[list[int]], query: list[int], k1=1.5, b=0.75, eps=0.25):
    """Okapi BM25 as rank_bm25's BM25Okapi computes it, over the same terms."""
    import math
    docs = [_terms(torch.tensor(d, dtype=torch.long))[0].tolist() for d in corpus]
    q = _terms(torch.tensor(query, dtype=torch.long))[0].tolist()
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    df = {}
    for d in docs:
        for t in set(d):
            df[t] = df.get(t, 0) + 1
    idf = {t: math.log(n - f + 0.5) - math.log(f + 0.5) for t, f in df.items()}
    mean = sum(idf.values()) / len(idf)
    idf = {t: (eps * mean if v < 0 else v) for t, v in idf.items()}
    scores = []
    for d in docs:
        s = 0.0
        for t in q:
            tf = d.count(t)
            s += idf.get(t, 0.0) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg))
        scores.append(s)
    return torch.tensor(scores, dtype=torch.float64)


def test_bm25_scores_match_rank_bm25_and_a_hand_computation():
    rng = random.Random(3)
    corpus = [[rng.randrange(0, 40) for _ in range(rng.randrange(1, 12))] for _ in range(60)]
    entries = Entries.from_texts(corpus, torch.zeros(0, dtype=torch.long))
    index = LexicalIndex(entries)
    for _ in range(20):
        query = [rng.randrange(0, 45) for _ in range(rng.randrange(1, 8))]
        want = bm25_by_hand(corpus, query)
        torch.testing.assert_close(index.scores(query), want)
        rank_bm25 = pytest.importorskip("rank_bm25")
        lib = rank_bm25.BM25Okapi([_terms(torch.tensor(d))[0].tolist() for d in corpus])
        torch.testing.assert_close(
            index.scores(query),
            torch.tensor(lib.get_scores(_terms(torch.tensor(query))[0].tolist()), dtype=torch.float64))
        top = index.top(query, 4)
        assert top.tolist() == torch.sort(want, descending=True, stable=True).indices[:4].tolist() \
            or torch.allclose(want[top], torch.sort(want, descending=True).values[:4])
        # near ties: of the top 4, those scoring at least ratio x the best
        for ratio in (0.0, 0.5, 0.9, 1.0):
            near = index.top(query, 4, ratio)
            if not top.numel():
                assert not near.numel()
                continue
            # the same scores as the top 4's near ties (texts of equal score may swap)
            expected = [t for t in top.tolist() if want[t] >= ratio * want[top[0]]]
            torch.testing.assert_close(want[near], want[expected])
            assert near.unique().numel() == near.numel() and float(want[near[0]]) == float(want.max())


def test_lexical_select_finds_the_text_a_question_shares_words_with():
    model, memory, _ = gated_memory_and_texts(4, threshold=0.0)
    rng = random.Random(4)
    texts = [[rng.randrange(1, VOCAB) for _ in range(6)] for _ in range(40)]
    bank = memkernels.store(memory, model, None, texts, chunk_size=16)
    for target in (0, 17, 39):
        question = texts[target][1:4] + [5]  # a run of the text's tokens
        sub = bank.lexical_select(question, k=2, min_score_ratio=0.0)
        assert sub.entries.text(0) == texts[target]
        assert len(sub.entries) == 2
    # k past the texts sharing a term: those only
    sharing = int((LexicalIndex(bank.entries).scores(texts[3]) > 0).sum())
    assert len(bank.lexical_select(texts[3], k=100, min_score_ratio=0.0).entries) == sharing
    # the default: the best text and its near ties only (at most LEXICAL_K)
    for target in (0, 17, 39):
        scores = LexicalIndex(bank.entries).scores(texts[target])
        near = int((scores >= LEXICAL_MIN_SCORE_RATIO * scores.max()).sum())
        sub = bank.lexical_select(texts[target])
        assert sub.entries.text(0) == texts[target]
        assert len(sub.entries) == min(near, LEXICAL_K)
    # no term in common with any stored text: the whole bank, not an arbitrary text
    assert bank.lexical_select([VOCAB + 7], k=1) is bank


def facts_about_subjects(subjects: int, seed: int, relations: int = 3):
    """Token-id texts shaped as the recall benchmark's several-per-subject
    facts: each subject (2 ids of its own) has `relations` facts of 40
    relations (an id each), each stated in one of four phrasings (3 ids
    each, common to a quarter of the texts), with an object (2 ids of its
    own). Ids: phrasings 1-12, relations 20-59, subjects 100.., objects
    10,000..; returns the texts and their (subject, relation)."""
    rng = random.Random(seed)
    phrasings = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    texts, about = [], []
    for s in range(subjects):
        subject = [100 + 2 * s, 101 + 2 * s]
        for r in rng.sample(range(20, 60), relations):
            obj = [10_000 + 2 * len(texts), 10_001 + 2 * len(texts)]
            texts.append(phrasings[len(texts) % 4] + subject + [r] + obj)
            about.append((s, r))
    return texts, about


def test_common_words_do_not_outvote_the_relations_word():
    """A question shares the subject with all its facts, the relation's word
    with one, and its phrasing's words with a quarter of the texts: counted,
    the phrasing picks a sibling stated the same way; above max_df those
    words do not count, and the asked fact wins."""
    texts, about = facts_about_subjects(subjects=120, seed=0)
    index = LexicalIndex(Entries.from_texts(texts, torch.full((1,), -1)))
    right = {True: 0, False: 0}
    for e, (s, r) in enumerate(about):
        sibling = next(j for j, (s2, _) in enumerate(about) if s2 == s and j != e)
        question = texts[sibling][:3] + [r] + texts[e][3:5]  # phrasing, relation, subject
        for filtered in (True, False):
            top = index.top(question, 1, 0.0, max_df=LEXICAL_MAX_DF if filtered else 1.0)
            right[filtered] += int(top[0]) == e
    assert right[True] == len(texts)
    assert right[False] == 0  # unfiltered, the phrasing's words outvote the relation's


def test_max_df_skips_only_terms_that_many_texts_hold():
    texts, about = facts_about_subjects(subjects=60, seed=1)
    index = LexicalIndex(Entries.from_texts(texts, torch.full((1,), -1)))
    question = [1, 2, 3, about[0][1], 100, 101]
    # ids 1-3 are in a quarter of the texts: over 0.1 of 180 and over the floor
    rare = [about[0][1], 100, 101]
    for k, ratio in ((1, 0.0), (5, 0.0), (5, 0.9)):
        assert torch.equal(index.top(question, k, ratio, max_df=0.1), index.top(rare, k, ratio))
    # a question of common words only is scored on them all
    assert torch.equal(index.top([1, 2, 3], 4, 0.0, max_df=0.1), index.top([1, 2, 3], 4, 0.0))
    # a small bank: no term is held by more than the floor, so every term counts
    small = texts[:LEXICAL_MAX_DF_FLOOR]
    small_index = LexicalIndex(Entries.from_texts(small, torch.full((1,), -1)))
    assert torch.equal(small_index.top(question, 5, 0.0, max_df=0.1),
                       small_index.top(question, 5, 0.0))


def test_entries_go_away_when_the_bank_changes_and_survive_save_load(tmp_path):
    model, memory, texts = gated_memory_and_texts(5)
    bank = memkernels.store(memory, model, None, texts)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path, memory)
    assert loaded.entries is not None
    for name in ("tokens", "offsets", "slot_entry"):
        assert torch.equal(getattr(loaded.entries, name), getattr(bank.entries, name))
    assert torch.equal(loaded.lexical_select(texts[2], 1).mem, bank.lexical_select(texts[2], 1).mem)
    assert bank.clone().entries is not None and bank.row(0).entries is not None
    # any change to the bank drops them: a new tensor, or a write in place
    bank.mem = bank.mem.clone()
    assert bank.entries is None
    with pytest.raises(ValueError, match="stored texts"):
        bank.lexical_select([1, 2])
    loaded.mem.mul_(1.0)
    assert loaded.entries is None
    # a bank without them still saves and loads (and two rows never have them)
    plain = MemoryBank(memory, memory.fresh_mem(2, 8))
    plain.save(tmp_path / "plain.safetensors")
    assert MemoryBank.load(tmp_path / "plain.safetensors", memory).entries is None
    from safetensors import safe_open  # nothing of format 3 to save: format 2, as older readers
    for name, version in (("plain.safetensors", "2"), ("bank.safetensors", "3")):
        with safe_open(tmp_path / name, framework="pt") as f:
            assert f.metadata()["format_version"] == version


def test_tampered_stored_texts_are_refused(tmp_path):
    import safetensors.torch
    model, memory, texts = gated_memory_and_texts(6)
    bank = memkernels.store(memory, model, None, texts)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    tensors = safetensors.torch.load_file(path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors["entry_tokens"][0] += 1
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="checksum"):
        MemoryBank.load(path, memory)
    del tensors["slot_entry"]
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="some of the stored-text tensors"):
        MemoryBank.load(path, memory)


def test_bad_arguments_are_named():
    model, memory, texts = gated_memory_and_texts(7)
    bank = memkernels.store(memory, model, None, texts)
    with pytest.raises(ValueError, match="k must be a positive int"):
        bank.lexical_select([1], k=0)
    for ratio in (-0.1, 1.5, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match="min_score_ratio must be a number in"):
            bank.lexical_select([1], min_score_ratio=ratio)
    for max_df in (0.0, -0.5, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="max_df must be a number in"):
            bank.lexical_select([1], max_df=max_df)
        with pytest.raises(ValueError, match="pair_max_df must be a number in"):
            bank.lexical_select([1], pair_max_df=max_df)
        with pytest.raises(ValueError, match="run_max_df must be a number in"):
            bank.lexical_choice([1], run_max_df=max_df)
    for whole in (1, "yes", None):
        with pytest.raises(ValueError, match="prefer_whole_runs must be a bool"):
            bank.lexical_choice([1], prefer_whole_runs=whole)
    with pytest.raises(TypeError, match="token ids"):
        bank.lexical_select("a question")
    with pytest.raises(ValueError, match="chosen: text indices"):
        bank.select_entries([len(texts)])
    with pytest.raises(ValueError, match="each text at most once"):
        bank.select_entries([1, 1])
    with pytest.raises(ValueError, match="one-row bank"):
        MemoryBank(memory, memory.fresh_mem(2, 8)).entries = bank.entries
    with pytest.raises(ValueError, match="slot_entry must be"):
        bank.entries = Entries.from_texts(texts, torch.full((3,), -1, dtype=torch.long))


# --- words: the index over a tokenizer's words (WordTable) -------------------------------

PIECES = [None, " Par", "is", " par", "PARIS", "'s", ",", " ", " is", " the", "-", "27", " 51",
          "\n", " capt", "ain", " captain", " (", "ab", " Ab", "h?", "(the", "a-b", " x.", "y"]


def reference_words(tokens, pieces):
    """The words of one text by the rules, from the strings: a piece's
    letters and digits (with the punctuation between them) go on the word
    before when the piece starts with a letter or digit and that word is
    still open, else start a word; punctuation after them closes the word;
    a piece of punctuation only is a word alone; whitespace and special
    tokens are none and close the word."""
    words, open_word = [], False
    for t in tokens:
        p = pieces[t]
        text = (p or "").strip().casefold()
        alnum = [i for i, c in enumerate(text) if c.isalnum()]
        if not text:
            open_word = False
        elif not alnum:
            words.append(text)
            open_word = False
        else:
            core = text[alnum[0]:alnum[-1] + 1]
            if p[0].isalnum() and open_word:
                words[-1] += core
            else:
                words.append(core)
            open_word = alnum[-1] == len(text) - 1
    return words


def term_of(word: str) -> int:
    """A word's term hashed from its whole text at once (terms() combines its
    tokens' hashes)."""
    from memkernels.memory.lexical import word_term
    return word_term(word)


def test_word_terms_follow_the_rules_on_random_token_runs():
    from memkernels.memory.lexical import WordTable
    table = WordTable.from_pieces(PIECES)
    rng = random.Random(0)
    for trial in range(300):
        lengths = [rng.randrange(0, 9) for _ in range(rng.randrange(1, 5))]
        texts = [[rng.randrange(len(PIECES)) for _ in range(n)] for n in lengths]
        tokens = torch.tensor([t for text in texts for t in text], dtype=torch.long)
        text_of = torch.tensor([e for e, text in enumerate(texts) for _ in text], dtype=torch.long)
        terms, text_of_term = table.terms(tokens, text_of)
        want = [(term_of(w), e) for e, text in enumerate(texts)
                for w in reference_words(text, PIECES)]
        assert list(zip(terms.tolist(), text_of_term.tolist())) == want


def test_one_word_is_one_term_however_it_is_tokenized():
    from memkernels.memory.lexical import WordTable
    table = WordTable.from_pieces(PIECES)
    terms = lambda ids: _terms(torch.tensor(ids), table)[0].tolist()  # noqa: E731
    paris = terms([1, 2])              # " Par" "is"
    assert terms([3, 2]) == paris      # " par" "is": case-folded
    assert terms([4]) == paris         # "PARIS" at a text's start, one token
    assert terms([1, 2, 5]) == paris + terms([5])  # "'s" is a word of its own
    assert terms([14, 15]) == terms([16])           # " capt" "ain" = " captain"
    assert terms([10, 11]) == terms([10]) + terms([11])  # after punctuation, a new word
    assert terms([18, 19]) == [term_of("ab"), term_of("ab")]
    assert terms([1, 20, 24]) == [term_of("parh"), term_of("y")]  # "h?" ends the word
    assert terms([21, 2]) == [term_of("theis")]                  # "(the" starts one
    assert terms([22]) == [term_of("a-b")] and terms([23]) == [term_of("x")]
    assert terms([7, 13, 0]) == []     # whitespace and special tokens: no term


def test_word_index_tells_a_subjects_facts_apart_where_sub_word_tokens_tie():
    """Subjects and objects made of shared syllables: over tokens, a fact
    about the asked subject ties with its siblings (and other subjects'
    syllables add noise); over words, the subject's word and the relation's
    pick the asked fact alone."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import open_facts
    from memkernels.hf.encode import word_table
    from memkernels.memory.lexical import WordTable
    tok = transformers.AutoTokenizer.from_pretrained(
        "memkernels/apps/recall/assets/open_lm")
    words = word_table(tok)
    assert isinstance(words, WordTable) and words.vocab_size == len(tok)
    assert word_table(tok) is words  # kept per tokenizer
    facts = open_facts.make_open_facts(600, seed=3, split="train", facts_per_subject=3)
    rng = random.Random(3)
    texts = [tok(f.statement(rng, "train"))["input_ids"] for f in facts]
    alone = {None: 0, "words": 0}
    for table in (None, words):
        index = LexicalIndex(Entries.from_texts(texts, torch.full((1,), -1), table))
        for i in range(0, 600, 7):
            question = tok(f"Q: {facts[i].question(rng, 'train')} A:")["input_ids"]
            top = index.top(question, LEXICAL_K, LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF).tolist()
            alone[None if table is None else "words"] += top == [i]
    assert alone["words"] >= 0.95 * len(range(0, 600, 7)) > alone[None]


def tokenizer_model_and_copy_memory(seed: int):
    """A BPE tokenizer of the open-LM corpus, a tiny untrained Llama over its
    vocabulary and an untrained copy memory for it."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import base_lm, open_lm, tasks
    tok = base_lm.train_tokenizer(open_lm.corpus(300), vocab_size=300)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    return tok, model, tasks.copy_memory(model, slots=64)


def test_store_records_the_tokenizers_word_table_and_save_load_keeps_it(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    import safetensors.torch
    from safetensors import safe_open
    from memkernels.hf.encode import word_table
    tok, model, memory = tokenizer_model_and_copy_memory(seed=8)
    texts = ["Paris has the port Fotenelith.", "the captain of Felezath is Numer Besas.",
             "Fotenel has the crew size 12.", "Numer Besas's hobby is fishing.",
             "the motto of Zadosox is Reposox.", "Besasath - port - Lozar."]
    bank = memkernels.store(memory, model, tok, texts)
    assert bank.entries.words is word_table(tok)
    # asked with another tokenization of the subject (no leading space)
    assert bank.lexical_choice(tok("Felezath: captain?")["input_ids"]).tolist() == [1]
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "4"
    loaded = MemoryBank.load(path, memory)
    assert torch.equal(loaded.entries.words.table, bank.entries.words.table)
    assert torch.equal(loaded.lexical_select(tok("Felezath?")["input_ids"]).mem,
                       bank.lexical_select(tok("Felezath?")["input_ids"]).mem)
    # the index is rebuilt for another run limit and kept while it stays
    first = bank._lexical.value
    assert bank.lexical_choice(tok("Felezath?")["input_ids"], run_max_df=1.0).tolist() == [1]
    assert bank._lexical.value is not first and bank._lexical.value._run_limit == len(texts)
    again = bank._lexical.value
    bank.lexical_choice(tok("Numer Besas?")["input_ids"], run_max_df=1.0)
    assert bank._lexical.value is again
    # token ids stored without a tokenizer: no table, the index scores token ids
    assert memkernels.store(memory, model, None, [tok(t)["input_ids"] for t in texts]) \
        .entries.words is None
    tensors = safetensors.torch.load_file(path)
    tensors["entry_word_table"][5, 2] += 1
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="checksum"):
        MemoryBank.load(path, memory)
    del tensors["entry_tokens"], tensors["entry_offsets"], tensors["slot_entry"]
    safetensors.torch.save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="word table"):
        MemoryBank.load(path, memory)


def test_a_bad_word_table_is_refused():
    from memkernels.memory.lexical import WordTable
    table = WordTable.from_pieces(PIECES)
    with pytest.raises(ValueError, match="token ids must lie in"):
        Entries.from_texts([[len(PIECES)]], torch.full((1,), -1), table).check(1)
    with pytest.raises(ValueError, match=r"int32 \[V, 5\]"):
        Entries.from_texts([[0]], torch.full((1,), -1), WordTable(table.table[:, :3])).check(1)
    with pytest.raises(ValueError, match="kinds must be in"):
        bad = table.table.clone()
        bad[0, 0] = 7
        Entries.from_texts([[0]], torch.full((1,), -1), WordTable(bad)).check(1)
    # a question's ids outside the table's vocabulary have no words, and no error
    index = LexicalIndex(Entries.from_texts([[1, 2], [16], [9], [14, 15, 8], [12]],
                                            torch.full((1,), -1), table))
    assert index.top([1, 2, 99, -3], 1).tolist() == [0]


@pytest.mark.parametrize("convention", ["byte-level", "metaspace"])
def test_word_table_reads_either_leading_space_convention(convention):
    """A byte-level BPE ("Ġ") and a SentencePiece-style one ("▁") mark a
    word's leading space differently; word_table decodes each id after a
    letter, so both give one term per word, at a text's start or not."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from memkernels.hf.encode import word_table
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if convention == "byte-level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?!.,:")
    corpus = ["the captain of Paris is Numer Besas.", "Paris, the port: Fotenelith!",
              "what is the captain of Felezath?"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>"], initial_alphabet=alphabet))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    words = word_table(hf)
    terms = lambda text: _terms(torch.tensor(hf(text)["input_ids"]), words)[0].tolist()  # noqa: E731
    assert terms("Paris") == terms(" Paris") == terms("PARIS") == [term_of("paris")]
    # "?" is a term where the tokenizer splits it off, dropped where it merges it ("h?")
    assert [t for t in terms("the captain of Felezath?") if t != term_of("?")] == \
        [term_of(w) for w in ("the", "captain", "of", "felezath")]
    assert words.table[hf.convert_tokens_to_ids("<s>"), 0] == 3  # special: no text


def test_split_characters_unspaced_scripts_and_unknown_ids():
    """Bytes of a character split across tokens (U+FFFD when decoded alone)
    keep their ids apart; a token of a script without spaces is a word of
    its own; a question's id outside the table ends the word around it."""
    from memkernels.memory.lexical import WordTable
    pieces = [" Zo", "\ufffd", "\ufffd", " \u5317\u4eac", "\u662f", "\u4e2d\u56fd", "is", " Par"]
    table = WordTable.from_pieces(pieces)
    terms = lambda ids: _terms(torch.tensor(ids), table)[0].tolist()  # noqa: E731
    assert terms([0, 1]) != terms([0, 2])                # "Zo" + one byte or another
    assert len(terms([0, 1, 2])) == 1                    # bytes go on their word
    assert terms([3, 4, 5]) == [term_of("\u5317\u4eac"), term_of("\u662f"),
                                term_of("\u4e2d\u56fd")]
    assert terms([7, 99, 6]) == [term_of("par"), term_of("is")]
    assert terms([7, -1, 6]) == terms([7, 99, 6]) and terms([7, 6]) == [term_of("paris")]


def test_a_wordpiece_tokenizer_makes_words_only_with_its_decoder():
    """WordPiece marks a continuation ("##is"), not a start: decoded with its
    decoder the table makes the right words; without it (every piece
    decodes with a space) the probe sentence comes out wrong and word_table
    gives None, so the index keeps to token ids."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from memkernels.hf.encode import word_table
    corpus = ["the captain of Paris is Numer Besas.", "Paris, the port: Fotenelith!",
              "The quick brown fox of Paris jumps over the lazy dog near Zadosox today"] * 20
    tables = {}
    for with_decoder in (True, False):
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if with_decoder:
            tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=90,
                                                                  special_tokens=["[UNK]"]))
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
        assert len(hf("Fotenelith")["input_ids"]) > 1  # a word of several pieces
        tables[with_decoder] = (hf, word_table(hf))
    hf, words = tables[True]
    assert words is not None
    assert _terms(torch.tensor(hf("Fotenelith captain")["input_ids"]), words)[0].tolist() == \
        [term_of("fotenelith"), term_of("captain")]
    assert tables[False][1] is None


def test_a_bank_file_with_a_bad_word_table_is_refused(tmp_path):
    """A table of the wrong shape or values under a valid checksum (a file
    written by other code) is a clear ValueError at load, never a crash."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    import safetensors.torch
    from safetensors import safe_open
    from memkernels.memory.bank import ENTRY_TENSORS, WORD_TABLE_TENSOR, _checksum
    tok, model, memory = tokenizer_model_and_copy_memory(seed=9)
    bank = memkernels.store(memory, model, tok, ["the captain of Paris is Numer.", "x is y."])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    good = safetensors.torch.load_file(path)
    for bad_table in (good[WORD_TABLE_TENSOR][:, :4].contiguous(),
                      good[WORD_TABLE_TENSOR].to(torch.int64),
                      good[WORD_TABLE_TENSOR].clone().index_fill_(1, torch.tensor([2]), 1 << 20),
                      good[WORD_TABLE_TENSOR][:3].contiguous()):
        tensors = {**good, WORD_TABLE_TENSOR: bad_table}
        meta["sha256"] = _checksum(tensors["mem"], meta,
                                   [tensors[k] for k in ENTRY_TENSORS + (WORD_TABLE_TENSOR,)])
        safetensors.torch.save_file(tensors, path, metadata=meta)
        with pytest.raises(ValueError, match="stored texts do not fit its bank: .*word table|"
                                             "token ids must lie in"):
            MemoryBank.load(path, memory)


def test_word_pairs_tell_nested_names_apart_and_skip_common_words():
    """Over words alone, "Sofia Smith" and "Sofia Maja Smith" hold the same
    words and tie; the pair "sofia smith" is held by the first only. A pair
    with a common word ("with" + a name) does not count: it would favour
    the texts stated with that word."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.hf.encode import word_table
    tok = transformers.AutoTokenizer.from_pretrained("memkernels/apps/recall/assets/open_lm")
    rng = random.Random(0)
    syllables = ["ba", "ke", "lo", "mi", "nu", "ra", "si", "tu", "ve", "zo"]
    filler = [f"The port of {''.join(rng.sample(syllables, 3)).title()} is "
              f"{''.join(rng.sample(syllables, 3)).title()}." for _ in range(30)]
    texts = filler + ["The mentor of Sofia Maja Smith is Mipoth Tunel.",
                      "The mentor of Sofia Smith is Gefipa Bizes.",
                      "A ship came with Felezath today."]
    texts += [f"They sailed with {''.join(rng.sample(syllables, 2)).title()}." for _ in range(10)]
    index = LexicalIndex(Entries.from_texts([tok(t)["input_ids"] for t in texts],
                                            torch.full((1,), -1), word_table(tok)))
    ask = lambda q: index.top(tok(q)["input_ids"], 3, 0.9, 0.1).tolist()  # noqa: E731
    assert ask("Q: who is the mentor of Sofia Smith? A:") == [31]
    assert ask("Q: who is the mentor of Sofia Maja Smith? A:") == [30]
    question = tok("Q: what sailed with Felezath? A:")["input_ids"]
    limit = max(0.1 * len(texts), 10)
    common = int((index.scores(tok("with")["input_ids"]) > 0).sum())
    assert common > limit  # "with" is a common word here
    counted = set(index._query_terms(*index._query_words(question)).tolist())
    rare_only = set(index._query_terms(*index._query_words(question), limit).tolist())
    assert rare_only < counted  # the pair "with felezath" (held by text 32) is left out


def word_level_index(texts: list[list[int]], vocab: int) -> LexicalIndex:
    """An index over texts whose every token is a word of its own (" w0", " w1", ...)."""
    from memkernels.memory.lexical import WordTable
    table = WordTable.from_pieces([f" w{i}" for i in range(vocab)])
    return LexicalIndex(Entries.from_texts(texts, torch.full((1,), -1), table))


def reference_run_edges(words: list[int], df: dict, limit: float) -> tuple[list, list]:
    """Where the runs of rare words (held by 1..limit texts) start and end, by hand."""
    rare = [0 < df.get(w, 0) <= limit for w in words]
    starts = [w for i, w in enumerate(words) if rare[i] and not (i and rare[i - 1])]
    ends = [w for i, w in enumerate(words)
            if rare[i] and not (i + 1 < len(words) and rare[i + 1])]
    return starts, ends


@pytest.mark.parametrize("seed,texts_range", [(0, (60, 200)), (1, (60, 200)), (2, (8, 40)),
                                              (3, (8, 40)), (4, (200, 400))])
def test_prefer_whole_runs_keeps_the_chosen_texts_holding_most_run_edges(seed, texts_range):
    """Against a hand computation on random word texts (a small vocabulary, so
    that words are rare or common and runs nest): of the texts top() chooses,
    prefer_whole_runs keeps, in order, those holding the most of the
    question's run edges; the texts chosen without it otherwise."""
    rng = random.Random(seed)
    vocab = 40
    texts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 7))]
             for _ in range(rng.randrange(*texts_range))]
    index = word_level_index(texts, vocab + 5)  # words vocab.. are in no text
    df = {w: sum(w in t for t in texts) for w in range(vocab)}
    limit = LEXICAL_MAX_DF * len(texts)
    text_edges = [reference_run_edges(t, df, limit) for t in texts]
    changed = 0
    for _ in range(150):
        question = [rng.randrange(vocab + 5) for _ in range(rng.randrange(1, 7))]
        chosen = index.top(question, 3, 0.0, LEXICAL_MAX_DF).tolist()
        starts, ends = reference_run_edges(question, df, limit)
        held = [sum(w in text_edges[c][0] for w in starts)
                + sum(w in text_edges[c][1] for w in ends) for c in chosen]
        want = [c for c, h in zip(chosen, held) if h == max(held)] if chosen else []
        got = index.top(question, 3, 0.0, LEXICAL_MAX_DF, prefer_whole_runs=True).tolist()
        assert got == want, (question, chosen, held)
        changed += got != chosen
    assert changed > 0  # the draw exercises the preference


def mentor_facts_index(seed: int, make_texts):
    """(open-LM tokenizer, word index over make_texts(word)): facts "The mentor
    of ... is ...", word(n) a made-up word of n syllables."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.hf.encode import word_table
    tok = transformers.AutoTokenizer.from_pretrained("memkernels/apps/recall/assets/open_lm")
    rng = random.Random(seed)
    syllables = ["ba", "ke", "lo", "mi", "nu", "ra", "si", "tu", "ve", "zo"]
    texts = make_texts(lambda n: "".join(rng.sample(syllables, n)).title())
    index = LexicalIndex(Entries.from_texts([tok(t)["input_ids"] for t in texts],
                                            torch.full((1,), -1), word_table(tok)))
    return tok, texts, index


def test_a_name_is_told_from_a_longer_name_that_holds_it():
    """"Gina Barros" and "Beatrice Gina Barros" (or "Gina Barros Lopez") share
    every word and the pair "gina barros": BM25 ties them, and only where the
    question's name starts and ends tells them apart."""
    tok, _, index = mentor_facts_index(1, lambda word: [
        f"The mentor of {word(2)} {word(3)} is {word(3)}." for _ in range(60)] + [
        "The mentor of Gina Barros is Mipoth.", "The mentor of Beatrice Gina Barros is Gefip.",
        "The mentor of Gina Barros Lopez is Tunel."])

    def ask(name, whole):
        return index.top(tok(f"Q: who is the mentor of {name}? A:")["input_ids"], LEXICAL_K,
                         LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF, prefer_whole_runs=whole).tolist()
    assert set(ask("Gina Barros", False)) == {60, 61, 62}  # near ties
    assert ask("Gina Barros", True) == [60]
    assert ask("Beatrice Gina Barros", True) == [61]
    assert ask("Gina Barros Lopez", True) == [62]


def test_in_a_small_bank_a_phrasings_words_are_not_part_of_a_name():
    """Ten facts in mixed phrasings: every word is in at most ten texts, yet
    only words in at most a tenth of them (here: one) make runs. Were every
    word rare, each text would be one run from its first word to its period,
    and "The story goes that Bosath, with the crew size ..." would win on
    starting with "the" as the question's "the crew size" does."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.hf.encode import word_table
    tok = transformers.AutoTokenizer.from_pretrained("memkernels/apps/recall/assets/open_lm")
    texts = ["Word is that the crew size on file for Regax is 473232.",
             "The story goes that Bosath, with the crew size 521498.",
             "The mentor of Kelomi Tusave is Ranuzo.", "Vekira lives in Mizotu.",
             "Born in Sarevo, Lumika grew up there.", "Nusilo has Bakemi as a mentor.",
             "The home town of Zotuve is Keralo.", "Ravemi, with the spouse Tulosi, sailed.",
             "Mikeba was born on 4 May 1901.", "The password of Lovezu is kemira."]
    question = tok("Q: Honestly, state the crew size of Regax. A:")["input_ids"]

    def top(run_max_df, whole):
        index = LexicalIndex(Entries.from_texts([tok(t)["input_ids"] for t in texts],
                                                torch.full((1,), -1), word_table(tok)),
                             run_max_df=run_max_df)
        return index.top(question, LEXICAL_K, LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF,
                         prefer_whole_runs=whole).tolist()

    assert top(LEXICAL_MAX_DF, whole=False) == [0, 1]  # BM25's near tie
    assert top(LEXICAL_MAX_DF, whole=True) == [0]
    assert top(1.0, whole=True) == [1]  # every word rare: the tie goes the wrong way


def test_a_family_name_many_facts_share_still_pairs_with_the_first_name():
    """A family name in 15% of the texts is a stop word at max_df 0.1; the pair
    it makes with a first name counts while both words are in at most
    pair_max_df of the texts, and picks the one fact about "Nina Horvat"."""
    tok, texts, index = mentor_facts_index(2, lambda word: [
        f"The mentor of {word(2)} Horvat is {word(3)}." for _ in range(14)] + [
        f"The mentor of Nina {word(3)} is {word(3)}." for _ in range(4)] + [
        f"The mentor of {word(2)} {word(3)} is {word(3)}." for _ in range(81)] + [
        "The mentor of Nina Horvat is Mipoth."])
    question = tok("Q: who is the mentor of Nina Horvat? A:")["input_ids"]
    assert sum("Horvat" in t for t in texts) > LEXICAL_MAX_DF * len(texts)
    assert index.top(question, LEXICAL_K, LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF,
                     pair_max_df=LEXICAL_MAX_DF).tolist() != [99]
    assert index.top(question, LEXICAL_K, LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF,
                     pair_max_df=0.2).tolist() == [99]
