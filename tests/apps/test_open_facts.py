"""The open-vocabulary facts' held-out splits never overlap, over many draws."""
from __future__ import annotations

import random
import re

import pytest

from memkernels.apps.recall import open_facts as of


def test_there_are_enough_relations_and_phrasings_in_each_split():
    assert len(of.RELATIONS) >= 40 and len(of.relations("train")) >= 40
    assert of.relations("eval")
    for kind in ("statement", "question"):
        train, held_out = of.phrasings(kind, "train"), of.phrasings(kind, "eval")
        assert train and held_out and not set(train) & set(held_out)
    assert len({r[0] for r in of.RELATIONS}) == len(of.RELATIONS)


def test_drawn_values_land_in_their_split_and_the_splits_never_overlap():
    rng = random.Random(0)
    seen = {"train": set(), "eval": set()}
    for _ in range(3000):
        kind = rng.choice(("person", "place", "word", "name", "number", "date", "code", "country"))
        split = rng.choice(("train", "eval"))
        value = of.draw_in_split(kind, rng, split)
        assert of.split_of("value", value) == split
        seen[split].add(value)
    assert not seen["train"] & seen["eval"]


def test_benchmark_facts_use_only_held_out_subjects_and_objects():
    facts = of.make_open_facts(500, seed=1, split="eval", relation_split="train")
    train_facts = of.make_open_facts(2000, seed=2, split="train", relation_split="train")
    assert len(facts) == 500 and len({f.subject for f in facts}) == 500
    for f in facts:
        assert of.split_of("value", f.subject) == "eval"
        assert of.split_of("value", f.object) == "eval"
        assert of.split_of("relation", f.relation) == "train"
    values = lambda fs: {f.subject for f in fs} | {f.object for f in fs}  # noqa: E731
    assert not values(facts) & values(train_facts)
    words = lambda fs: {w for v in values(fs) for w in re.findall(r"[A-Za-z]{2,}", v)  # noqa: E731
                        if w not in of.MONTHS}
    assert not words(facts) & words(train_facts)  # not even a word of a name
    held_out = of.make_open_facts(100, seed=3, relation_split="eval")
    assert {f.relation for f in held_out} <= {r[0] for r in of.relations("eval")}


def test_questions_never_contain_their_answer_and_use_other_phrasings():
    rng = random.Random(4)
    for f in of.make_open_facts(300, seed=4, facts_per_subject=2):
        question, statement = f.question(rng, "eval"), f.statement(rng, "train")
        assert not re.search(rf"\b{re.escape(f.object)}\b", question)
        assert f.object in statement and f.subject in question
    subjects = {}
    for f in of.make_open_facts(40, seed=5, facts_per_subject=3):
        subjects.setdefault(f.subject, set()).add(f.relation)
    assert all(len(r) == 3 for r in list(subjects.values())[:-1])


def test_answers_have_from_one_to_several_words_and_kinds():
    facts = of.make_open_facts(400, seed=6)
    words = {len(f.object.split()) for f in facts}
    assert {1, 2, 3} <= words
    assert any(f.object.isdigit() for f in facts) and any("-" in f.object for f in facts)


def test_held_out_answers_are_almost_never_a_single_token_of_the_shipped_host():
    """Why the benchmark has almost no 1-token answers to compare with
    (README): a word the host's small vocabulary holds whole is a frequent
    corpus word, which the held-out generators rarely draw. 2,000 answers of
    each object kind."""
    from transformers import AutoTokenizer
    from memkernels.apps.recall import open_lm
    tok = AutoTokenizer.from_pretrained(open_lm.ASSET_DIR)
    rng = random.Random(11)
    for kind in sorted({r[2] for r in of.RELATIONS}):
        values = [of.draw_in_split(kind, rng, "eval") for _ in range(2000)]
        single = [v for v in values if len(tok(f" {v}")["input_ids"]) == 1]
        assert not single, (kind, single[:5])


def test_phrasing_parts_are_split_and_every_statement_names_the_subject_first():
    for parts in (of.STATEMENT_CORES, of.STATEMENT_PREFIXES, of.QUESTION_CORES,
                  of.QUESTION_PREFIXES):
        for a, b in (("train", "eval"), ("train", "dev"), ("dev", "eval")):
            assert parts[a] and parts[b] and not set(parts[a]) & set(parts[b])
        # a held-out phrasing always has a held-out prefix
        assert "" not in parts["eval"] and "" not in parts["dev"]
    for core in sum((of.STATEMENT_CORES[split] for split in of.PHRASING_SPLITS), []):
        assert core.index("{s}") < core.index("{o}") and core.endswith("{o}")
    assert len(of.phrasings("statement", "train")) >= 100
    assert len(of.phrasings("question", "train")) >= 50


def save_tiny_open_lm(path):
    """A tiny untrained Llama with a BPE tokenizer of the open-LM corpus, saved
    at path as a user's model directory; returns the model."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import base_lm, open_lm
    tok = base_lm.train_tokenizer(open_lm.corpus(300), vocab_size=300)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_the_open_recall_command_runs_on_a_few_facts(tmp_path, monkeypatch):
    """Every split and condition on a tiny LM with an untrained copy memory
    (the real figures come from the command on the shipped open LM)."""
    pytest.importorskip("rank_bm25", reason="needs rank_bm25 for the retrieval baseline")
    from memkernels.apps.recall import open_recall, tasks
    model = save_tiny_open_lm(tmp_path / "lm")
    tasks.copy_memory(model, slots=64).save_pretrained(tmp_path / "memory")
    LEXICAL_NAME = "memory, lexical top-3, >= 0.9 x best, words in <= 0.1 of texts"
    rows = open_recall.run([4], str(tmp_path / "lm"), str(tmp_path / "memory"), questions=4,
                           log=lambda *_: None)
    assert {r["split"] for r in rows} == set(open_recall.SPLITS)
    CONTINUED = f"{LEXICAL_NAME}, continuation {open_recall.CONTINUATION:g}"
    PROMPT_CONTINUED = f"{open_recall.LEXICAL_PROMPT}, continuation {open_recall.CONTINUATION:g}"
    assert {r["condition"] for r in rows} == {"written memory", "LM alone", "facts in context",
                                             "BM25 top-3", LEXICAL_NAME, CONTINUED,
                                             open_recall.LEXICAL_PROMPT, PROMPT_CONTINUED}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["questions"] >= 1 for r in rows)
    everything = [r for r in rows if r["answers"] == "all"]
    assert {r["answers"] for r in rows} - {"all"} <= set(open_recall.LENGTH_BUCKETS)
    assert all(r["prompt_tokens"] >= 3 for r in everything)
    by = {(r["split"], r["condition"]): r for r in everything}
    for split in open_recall.SPLITS:  # the prompt holds what the condition puts in it
        assert by[split, "facts in context"]["prompt_tokens"] > \
            by[split, "BM25 top-3"]["prompt_tokens"] > by[split, "LM alone"]["prompt_tokens"]
        assert by[split, open_recall.LEXICAL_PROMPT]["prompt_tokens"] > \
            by[split, "LM alone"]["prompt_tokens"] == by[split, LEXICAL_NAME]["prompt_tokens"]
        assert 0 <= by[split, LEXICAL_NAME]["slots_read"] <= by[split, "written memory"][
            "slots_read"]
        assert by[split, LEXICAL_NAME]["lexical_index_build_s"] > 0
    memory_rows = [r for r in rows if r["condition"] == "written memory" and r["answers"] == "all"]
    assert all(r["bank_bytes_per_fact"] > 0 and r["store_facts_per_s"] > 0 for r in memory_rows)
    table = open_recall.markdown(rows)
    assert all(f"**{split}**" in table for split in open_recall.SPLITS)
    assert "| written memory |" in table and "bank bytes per fact" in table
    assert f"| {LEXICAL_NAME} |" in table and "| tokens processed: written memory |" in table
    assert "| lexical, answers of 4-6 tokens |" in table
    assert "| lexical, continuation, answers of 4-6 tokens |" in table
    assert f"| {CONTINUED} |" in table and f"| {PROMPT_CONTINUED} |" in table
    continued = [r for r in rows if r["condition"] in (CONTINUED, PROMPT_CONTINUED)
                 and r["answers"] == "all"]
    assert continued and all(r["continuation"] == open_recall.CONTINUATION for r in continued)
    assert all(r["prompt_tokens"] == by[r["split"], LEXICAL_NAME if r["condition"] == CONTINUED
                                        else open_recall.LEXICAL_PROMPT]["prompt_tokens"]
               for r in continued)
    plain = open_recall.run([4], str(tmp_path / "lm"), str(tmp_path / "memory"), questions=4,
                            splits=["held-out"], continuation=0.0, trained_steps=3,
                            log=lambda *_: None)
    assert not any("continuation" in r["condition"] for r in plain)
    trained = {r["condition"]: r for r in plain if r["answers"] == "all"
               and r["condition"] in (open_recall.TRAINED, open_recall.TRAINED_LEXICAL)}
    assert set(trained) == {open_recall.TRAINED, open_recall.TRAINED_LEXICAL}
    assert trained[open_recall.TRAINED_LEXICAL]["trained_steps"] == 3
    assert trained[open_recall.TRAINED_LEXICAL]["trained_first_loss"] > 0
    assert trained[open_recall.TRAINED_LEXICAL]["slots_read"] > 0
    assert trained[open_recall.TRAINED]["slots_read"] == next(
        r["slots_read"] for r in plain if r["condition"] == "written memory")
    assert f"| {open_recall.TRAINED_LEXICAL} |" in open_recall.markdown(plain)
    assert "| trained memory: training, statement loss first -> last |" in \
        open_recall.markdown(plain)
    small = open_recall.run([4], str(tmp_path / "lm"), str(tmp_path / "memory"), questions=4,
                            splits=["held-out"], continuation=0.0, trained_steps=3,
                            trained_up_to=2, log=lambda *_: None)
    assert not any(r["condition"].startswith(open_recall.TRAINED) for r in small)
    pytest.importorskip("matplotlib")
    open_recall.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
    from memkernels.apps.bench.report import append_jsonl
    append_jsonl(str(tmp_path / "open-recall-cpu.jsonl"), rows, {"commit": "abc1234"})
    open_recall.main(["--replot", "abc1234", "--out", str(tmp_path)])
    assert (tmp_path / "open_recall.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no eval rows"):
        open_recall.replot(str(tmp_path / "open-recall-cpu.jsonl"), "0000000", "x.png")
    lexical = [r for r in rows if r["condition"] == LEXICAL_NAME and r["answers"] == "all"]
    assert lexical and all(r["lexical_k"] == 3 and r["lexical_min_score_ratio"] == 0.9
                           and r["seconds_per_question"] > 0 for r in lexical)
    drawn = []
    real_draw = of.make_open_facts

    def spy(n, seed, **kwargs):
        facts = real_draw(n, seed, **kwargs)
        drawn.extend(facts)
        return facts
    monkeypatch.setattr(of, "make_open_facts", spy)
    dev = open_recall.run([4], str(tmp_path / "lm"), str(tmp_path / "memory"), questions=4,
                          splits=["realistic names"], phrasings="dev", dev_names=True,
                          log=lambda *_: None)
    assert dev and all(r["phrasings"] == "dev" for r in dev)
    assert drawn and all(f.subject.split()[-1] in of.DEV_REAL_LAST_NAMES for f in drawn)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="dev_names"):
        open_recall.run([4], str(tmp_path / "lm"), str(tmp_path / "memory"), dev_names=True)
    with pytest.raises(SystemExit):
        open_recall.main(["--dev-names", "--facts", "4"])


@pytest.mark.parametrize("options", [{}, dict(max_facts=16, varied=0.3),
                                     dict(varied=0.3, composed=True)],
                         ids=["shipped", "longer-varied", "composed"])
def test_the_open_lm_corpus_never_holds_a_benchmark_value(options):
    """No held-out subject or object word, and no held-out phrasing, in the
    base LM's corpus, with or without its options (month names are shared by
    every date)."""
    from memkernels.apps.recall import open_lm
    _assert_holds_no_held_out(" ".join(open_lm.corpus(1500, seed=7, **options)))


def _assert_holds_no_held_out(text: str, relations: bool = False) -> None:
    """No held-out subject or object word, no held-out phrasing part (prefix,
    or a core's words in order) in `text`; relations: no held-out relation's
    noun either (the memory never trains on one; the base LM's corpus may)."""
    import re
    tokens = set(re.findall(r"[A-Za-z]+", text))
    held_out = of.make_open_facts(300, seed=8, split="eval")
    words = {w for f in held_out for w in re.findall(r"[A-Za-z]+", f"{f.subject} {f.object}")
             if len(w) >= 6 and w not in of.MONTHS}
    assert len(words) > 200 and not words & tokens
    # the real names of eval and of the dev check (held out from every training too)
    real_held_out = set(sum(of._real_names("eval"), [])) | set(sum(of._real_names("dev"), []))
    assert not real_held_out & tokens, real_held_out & tokens
    lowered = text.lower()
    held_out = ("dev", "eval")
    for prefix in sum((of.STATEMENT_PREFIXES[s] + of.QUESTION_PREFIXES[s] for s in held_out), []):
        assert prefix.strip().lower() not in lowered, prefix
    for core in sum((of.STATEMENT_CORES[s] + of.QUESTION_CORES[s] for s in held_out), []):
        # the core's words in order within a sentence, any subject, relation or object
        # between them
        pattern = r"[^.?!]{1,40}?".join(re.escape(part.lower())
                                        for part in re.split(r"\{[a-z]\}", core))
        assert not re.search(pattern, lowered), core
    if relations:
        for rel in of.relations("eval"):
            assert not re.search(rf"\b{re.escape(rel[3].lower())}\b", lowered), rel


def test_the_memory_training_never_sees_a_held_out_value_relation_or_phrasing():
    """What the open memory trains on, over many draws: the address
    pre-training's pairs (the shipped recipe's mix of varied, composed,
    real-name and several-per-subject facts) and the joint training's episodes
    (with real names as --joint-realistic-names draws them)."""
    from transformers import AutoTokenizer
    from memkernels.apps.recall import open_lm, tasks, train
    recipe = train.RECIPES["open"]
    tok = AutoTokenizer.from_pretrained(open_lm.ASSET_DIR)
    pairs = tasks.address_pairs(tok, n=1500, world="open", varied=recipe["vary_phrasings"],
                                realistic_names=recipe["realistic_names"],
                                several_per_subject=recipe["several_per_subject"],
                                composed=recipe["composed_phrasings"])
    texts = pairs.statements + [tok.decode(q) for q in pairs.questions[::4]]
    episodes = tasks.append_episodes(tok, batch=8, seed=3, steps=400, world="open",
                                     realistic_names=0.5)
    for step in range(0, 400, 8):
        batch = episodes(step, 0)
        texts += [tok.decode(row[mask.bool()].tolist())
                  for row, mask in zip(batch.input_ids, batch.attention_mask)]
        texts += [tok.decode(row[mask.bool()].tolist())  # the texts each row writes first
                  for rows, masks in zip(batch.write_ids, batch.write_mask)
                  for row, mask in zip(rows, masks)]
    _assert_holds_no_held_out(" ".join(texts), relations=True)


def test_statement_core_names_the_core_a_statement_was_phrased_with():
    rng = random.Random(11)
    facts = of.make_open_facts(200, seed=11, split="train")
    for split in of.PHRASING_SPLITS:
        seen = set()
        for f in facts:
            for core in of.STATEMENT_CORES[split]:
                prefix = rng.choice(of.STATEMENT_PREFIXES[split])
                text = of._sentence(prefix, core).format(r=f.noun, s=f.subject, o=f.object) + "."
                assert of.statement_core(text, split) == core, text
                seen.add(core)
            assert of.statement_core(f.statement(rng, split), split) in of.STATEMENT_CORES[split]
        assert seen == set(of.STATEMENT_CORES[split])
    assert of.statement_core("Nothing like a statement", "dev") is None
    with pytest.raises(ValueError, match="split"):
        of.statement_core("x", "test")


def test_realistic_names_are_real_words_of_their_split():
    facts = of.make_open_facts(300, seed=9, realistic_names=True)
    real = set(of.REAL_FIRST_NAMES) | set(of.REAL_LAST_NAMES)
    assert len({f.subject for f in facts}) == 300
    assert any(len(f.subject.split()) == 3 for f in facts)  # with a middle name
    for f in facts:
        assert set(f.subject.split()) <= real and of.split_of("value", f.subject) == "eval"
        assert next(r[1] for r in of.RELATIONS if r[0] == f.relation) == "person"
    train = of.make_open_facts(300, seed=9, split="train", realistic_names=True)
    words = lambda fs: {w for f in fs for w in f.subject.split()}  # noqa: E731
    assert not words(facts) & words(train)
    with pytest.raises(ValueError, match="ran out"):
        of.make_open_facts(100_000, seed=9, realistic_names=True)


def test_episode_facts_mix_in_realistic_names_and_leave_the_plain_stream_unchanged():
    """random_open_fact(realistic_names=P): about a fraction P of the facts
    name a real train-split person (a person relation); at P=0 it draws what
    it drew before the option existed (the shipped memories' episodes)."""
    first, last = of._real_names("train")
    person = {r[0] for r in of.relations("train") if r[1] == "person"}
    rng = random.Random(5)
    facts = [of.random_open_fact(rng, realistic_names=0.4) for _ in range(2000)]
    real = [f for f in facts if f.subject.split()[0] in first and f.subject.split()[-1] in last]
    assert 0.34 < len(real) / len(facts) < 0.46
    assert all(f.relation in person for f in real)
    assert all(of.split_of("value", f.object) == "train" for f in facts)
    a, b = random.Random(8), random.Random(8)
    for _ in range(200):
        rel = b.choice(of.relations("train"))
        plain = of.OpenFact(of.draw_in_split(rel[1], b, "train"), rel[0],
                            of.draw_in_split(rel[2], b, "train"))
        assert of.random_open_fact(a) == plain


def test_a_small_name_pool_draws_train_names_only_from_eval_sized_lists():
    """The dev check of nested names (misses --small-name-pool): train-split
    real names, from as many first and family names as eval has."""
    first_n, last_n = of.eval_name_pool()
    assert 0 < first_n < len(of.REAL_FIRST_NAMES) and 0 < last_n < len(of.REAL_LAST_NAMES)
    first, last = of._real_names("train")
    facts = of.make_open_facts(300, seed=4, split="train", realistic_names=True,
                               name_pool=(first_n, last_n))
    for f in facts:
        words = f.subject.split()
        assert set(words[:-1]) <= set(first[:first_n]) and words[-1] in last[:last_n]
    # the default pool is the whole split's, and the same seed draws the same facts
    whole = of.make_open_facts(300, seed=4, split="train", realistic_names=True)
    assert whole == of.make_open_facts(300, seed=4, split="train", realistic_names=True)
    assert any(f.subject.split()[-1] not in last[:last_n] for f in whole)
    with pytest.raises(ValueError, match="name_pool"):
        of.make_open_facts(5, seed=4, split="train", realistic_names=True, name_pool=(0, 3))


def test_dev_names_are_real_names_no_training_draws_as_many_as_eval_has():
    """The realistic-names dev check (misses / open_recall --dev-names): names
    in neither list the memory's pre-training or eval draw from, every word in
    the eval split by hash (so no training value holds one), and as many
    first and family names as eval has."""
    first, last = of._real_names("dev")
    assert (len(first), len(last)) == of.eval_name_pool()
    assert len(set(first)) == len(first) and len(set(last)) == len(last)
    assert not set(first + last) & set(of.REAL_FIRST_NAMES + of.REAL_LAST_NAMES)
    assert all(of.split_of("value", name) == "eval" for name in first + last)
    facts = of.make_open_facts(300, seed=6, split="train", realistic_names=True,
                               name_split="dev")
    for f in facts:
        words = f.subject.split()
        assert set(words[:-1]) <= set(first) and words[-1] in last
        assert of.split_of("value", f.object) == "train"
    # without name_split the same call draws train-split names, as before
    assert of.make_open_facts(50, seed=6, split="train", realistic_names=True) != facts[:50]
    assert all(f.subject.split()[-1] in of._real_names("train")[1]
               for f in of.make_open_facts(50, seed=6, split="train", realistic_names=True))


def test_similar_names_are_one_edit_away_with_another_object():
    facts = of.make_open_facts(400, seed=10, similar_names=True)
    assert len(facts) == 400 and len({f.subject for f in facts}) == 400
    for asked, twin in zip(facts[0::2], facts[1::2]):
        assert asked.relation == twin.relation and asked.object != twin.object
        a, b = asked.subject.split(), twin.subject.split()
        assert a[:-1] == b[:-1] and a[-1] != b[-1]  # only the last word differs
        assert of.split_of("value", twin.subject) == of.split_of("value", twin.object) == "eval"
    rng = random.Random(0)
    assert of.similar_name("Tur Mefopibo", rng, "train").startswith("Tur ")


def test_nested_names_come_in_pairs_a_first_name_apart_with_another_object():
    """make_open_facts(nested_names=True): "F L" then "X F L", same relation,
    another object, names and objects of the split asked for."""
    facts = of.make_open_facts(301, seed=4, split="train", realistic_names=True,
                               nested_names=True)
    assert len(facts) == 301 and len({f.subject for f in facts}) == 301
    first, last = of._real_names("train")
    for inner, outer in zip(facts[0::2], facts[1::2]):
        assert inner.relation == outer.relation and inner.object != outer.object
        a, b = inner.subject.split(), outer.subject.split()
        assert len(a) == 2 and b[1:] == a and b[0] in first and a[0] in first and a[1] in last
        assert of.split_of("value", inner.object) == of.split_of("value", outer.object) == "train"
    dev = of.make_open_facts(40, seed=4, split="train", realistic_names=True, nested_names=True,
                             name_split="dev")
    assert all(f.subject.split()[-1] in of.DEV_REAL_LAST_NAMES for f in dev)
    with pytest.raises(ValueError, match="realistic_names=True"):
        of.make_open_facts(10, seed=0, nested_names=True)
    with pytest.raises(ValueError, match="ran out"):  # 1 x 1 names nest one pair only
        of.make_open_facts(4, seed=0, realistic_names=True, nested_names=True, name_pool=(1, 1))


def test_address_pairs_bring_nested_names_into_one_group():
    """train --nested-names P: that fraction of the pre-training facts in
    nested pairs, each pair one group of nested_groups(), every other fact
    alone there (the several-per-subject facts share a group in .groups only)."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import open_recall, tasks
    tok = transformers.AutoTokenizer.from_pretrained(open_recall.OPEN_LM)
    pairs = tasks.address_pairs(tok, n=60, world="open", realistic_names=0.25,
                                several_per_subject=0.25, nested_names=0.5)
    facts = {}  # statement -> group, nested group
    for st, g, ng in zip(pairs.statements, pairs.groups, pairs.nested_groups()):
        assert facts.setdefault(st, (g, ng)) == (g, ng)  # a fact's pairs share their groups
    nested = [st for st, (g, _) in facts.items() if g[0] == tasks.NESTED_DRAW]
    assert len(nested) == 30
    by_group = {}
    for st, (_, ng) in facts.items():
        by_group.setdefault(ng, []).append(st)
    assert sorted(len(v) for v in by_group.values()) == [1] * 30 + [2] * 15
    for ng, sts in by_group.items():
        if len(sts) == 2:  # the pair: both statements name the shorter name
            assert ng[0] == tasks.NESTED_DRAW and all(ng[1] in st for st in sts)
    several = [g for st, (g, _) in facts.items() if g[0] == 2]
    assert max(several.count(g) for g in several) == 3
    plain = tasks.address_pairs(tok, n=60, world="open", realistic_names=0.25,
                                several_per_subject=0.25)
    again = tasks.address_pairs(tok, n=60, world="open", realistic_names=0.25,
                                several_per_subject=0.25, nested_names=0.0)
    assert plain == again  # nested_names=0 draws nothing more
    with pytest.raises(ValueError, match="summing to at most 1"):
        tasks.address_pairs(tok, n=10, world="open", realistic_names=0.6, nested_names=0.6)
    with pytest.raises(ValueError, match="apply to world='open'"):
        tasks.address_pairs(tok, n=10, nested_names=0.5)


def test_varied_phrasings_keep_their_slots_and_draw_train_words_only():
    rng = random.Random(3)
    held_out = {w.lower() for split in ("dev", "eval")
                for part in (of.STATEMENT_CORES[split] + of.STATEMENT_PREFIXES[split] +
                             of.QUESTION_CORES[split] + of.QUESTION_PREFIXES[split])
                for w in re.findall(r"[A-Za-z]{2,}", re.sub(r"\{[a-z]\}", "", part))}
    trained = set(of.TRAIN_WORDS)
    changed = 0
    for template in of.phrasings("statement", "train") * 3:
        varied = of.vary(template, rng, 0.4)
        assert varied.endswith("{o}.") and varied.index("{s}") < varied.index("{o}")
        new_words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", varied)} - \
            {w.lower() for w in re.findall(r"[A-Za-z]{2,}", template)}
        assert new_words <= trained and not new_words & (held_out - trained)
        changed += varied != template
    assert changed > 100
    assert of.vary("The {r} of {s} is {o}.", rng, 0.0) == "The {r} of {s} is {o}."


def test_address_pairs_mix_realistic_names_and_several_facts_per_subject(monkeypatch):
    """train --realistic-names / --several-per-subject: those fractions of the
    address pre-training's facts, train-split words only, each pair's target
    the token before the answer's next token."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import open_recall, tasks
    tok = transformers.AutoTokenizer.from_pretrained(open_recall.OPEN_LM)
    drawn = []
    real_draw = of.make_open_facts

    def spy(n, seed, **kwargs):
        facts = real_draw(n, seed, **kwargs)
        drawn.append((kwargs, list(facts)))
        return facts
    monkeypatch.setattr(of, "make_open_facts", spy)
    questions, statements, targets, groups = tasks.address_pairs(
        tok, n=40, world="open", realistic_names=0.25, several_per_subject=0.5)
    sizes = {(k.get("realistic_names", False), k.get("facts_per_subject", 1)): len(f)
             for k, f in drawn}
    assert sizes == {(False, 1): 10, (True, 1): 10, (False, 3): 20}
    facts = [f for _, batch in drawn for f in batch]
    assert all(k["split"] == "train" and k["relation_split"] == "train" for k, _ in drawn)
    assert all(of.split_of("value", f.subject) == "train" and
               of.split_of("value", f.object) == "train" for f in facts)
    # one pair per answer token and one for the period, each fact in the order drawn
    assert len(questions) == sum(len(tok(f" {f.object}")["input_ids"]) + 1 for f in facts)
    for q, s, t in zip(questions, statements, targets):
        ids = tok(s)["input_ids"]
        assert 0 <= t < len(ids) - 1
    # each pair's group is its draw and subject: the 3-per-subject facts share theirs,
    # a name drawn again in another draw is another person
    draw_of = {id(f): d for d, (_, batch) in enumerate(drawn) for f in batch}
    by_fact = [(draw_of[id(f)], f.subject) for f in facts
               for _ in range(len(tok(f" {f.object}")["input_ids"]) + 1)]
    assert groups == by_fact
    assert all(subject in s for s, (_, subject) in zip(statements, groups))
    assert max(len({st for st, g in zip(statements, groups) if g == x}) for x in groups) == 3
    with pytest.raises(ValueError, match="fractions summing to at most 1"):
        tasks.address_pairs(tok, n=10, world="open", realistic_names=0.6, several_per_subject=0.6)
    with pytest.raises(ValueError, match="apply to world='open'"):
        tasks.address_pairs(tok, n=10, realistic_names=0.5)
    with pytest.raises(ValueError, match="apply to world='open'"):
        tasks.address_pairs(tok, n=10, composed=0.5)


def test_address_pairs_phrase_a_fraction_in_composed_shapes_with_targets_on_the_answer():
    """train --composed-phrasings P: about a fraction P of the pre-training
    facts stated and asked in open_facts.COMPOSED shapes; every pair's target
    is still the statement token before the answer's next token."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import open_recall, tasks
    tok = transformers.AutoTokenizer.from_pretrained(open_recall.OPEN_LM)
    plain = tasks.address_pairs(tok, n=200, world="open")  # composed=0: no extra draw
    mixed = tasks.address_pairs(tok, n=200, world="open", composed=0.5)
    def new_shapes(pairs):  # statements in no train core (a recombined shape may be one)
        shapes = {st: of.statement_core(st, "train") for st in pairs.statements}
        return sum(core is None for core in shapes.values()) / len(shapes)
    assert new_shapes(plain) == 0.0 and 0.1 < new_shapes(mixed) < 0.6
    full = None  # a fact's pairs follow one another, the one before its first answer token first
    for q, st, t in zip(mixed.questions, mixed.statements, mixed.targets):
        answered = tok.decode(q).split(" A:", 1)[1]  # the answer's tokens so far
        rest = tok.decode(tok(st)["input_ids"][t + 1:])  # the target slot's content onwards
        if not answered:
            full = rest
            assert full.endswith(".") and len(full) > 2
        assert (answered + rest).replace(" ", "") == full.replace(" ", ""), (q, st, t)


def test_the_open_recall_command_refuses_a_lexical_setting_twice_and_a_bad_weight():
    from memkernels.apps.recall import open_recall
    with pytest.raises(SystemExit):
        open_recall.main(["--facts", "4", "--lexical-k", "3", "3", "--lexical-ratio", "0.9"])
    for weight in ("-0.5", "1.5"):
        with pytest.raises(SystemExit):
            open_recall.main(["--facts", "4", "--continuation", weight])
    with pytest.raises(ValueError, match="at most once"):
        open_recall.run([4], lexical=[(3, 0.9), (3, 0.9)])


def test_the_open_lm_builds_either_family():
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import base_lm
    gpt2 = base_lm.build_model(300, "gpt2")
    assert isinstance(gpt2, transformers.GPT2LMHeadModel) and gpt2.config.n_embd == 192
    llama = base_lm.build_model(300)
    assert isinstance(llama, transformers.LlamaForCausalLM) and llama.config.vocab_size == 300
    with pytest.raises(ValueError, match="family must be one of"):
        base_lm.build_model(300, "t5")


def test_the_open_lm_command_refuses_what_would_overwrite_or_cannot_train():
    from memkernels.apps.recall import open_lm
    for bad in (["--family", "gpt2"], ["--out", "x", "--steps", "0"],
                ["--out", "x", "--vocab", "100"]):
        with pytest.raises(SystemExit):
            open_lm.main(bad)
    for bad in (["--out", "x", "--seq-len", "8"], ["--out", "x", "--max-document-facts", "0"],
                ["--out", "x", "--varied-phrasings", "1.5"], ["--out", "x", "--windows", "docs"],
                ["--evaluate", "x", "--questions", "0"]):
        with pytest.raises(SystemExit):
            open_lm.main(bad)


def test_the_open_lm_command_defaults_to_the_shipped_recipe(monkeypatch):
    """`open_lm --out DIR` rebuilds the shipped LM's recipe (its training.json
    says how it was trained) and records the command in training.json;
    open_lm.train()'s own defaults are that recipe too."""
    import json
    import os
    from memkernels.apps.recall import open_lm
    import inspect
    defaults = {name: p.default for name, p in inspect.signature(open_lm.train).parameters.items()}
    captured = {}
    monkeypatch.setattr(open_lm, "train", lambda out, **kw: captured.update(out=out, **kw))
    open_lm.main(["--out", "x"])
    with open(os.path.join(open_lm.ASSET_DIR, "training.json")) as f:
        shipped = json.load(f)
    for option, recorded in (("steps", "steps"), ("batch", "batch"), ("seq_len", "seq_len"),
                             ("windows", "windows"), ("varied", "varied_phrasings"),
                             ("max_facts", "max_document_facts"), ("vocab_size", "vocab"),
                             ("family", "family")):
        assert captured[option] == shipped[recorded], option
    assert captured["out"] == "x"
    assert captured["command"] == "python -m memkernels.apps.recall.open_lm --out x"
    # the function's own defaults are the same recipe (one place: SHIPPED_RECIPE)
    for option, recorded in (("steps", "steps"), ("batch", "batch"), ("seq_len", "seq_len"),
                             ("windows", "windows"), ("varied", "varied_phrasings"),
                             ("max_facts", "max_document_facts"), ("vocab_size", "vocab"),
                             ("family", "family")):
        assert defaults[option] == shipped[recorded], option


def test_the_open_lm_corpus_options_leave_the_default_corpus_as_it_was():
    from memkernels.apps.recall import open_lm
    assert open_lm.corpus(200, seed=3) == open_lm.corpus(200, seed=3, max_facts=10, varied=0.0)
    assert open_lm.corpus(200, seed=3) != open_lm.corpus(200, seed=3, max_facts=16, varied=0.3)


def test_answer_kinds_tell_a_wrong_statement_from_a_broken_copy():
    from memkernels.apps.recall import open_lm
    facts = [of.OpenFact("Ba Ko", "spouse", "Di Rumek"), of.OpenFact("Lu Sa", "spouse", "Fo Ta")]
    kind = lambda answer: open_lm.answer_kind(answer, facts[0], facts)  # noqa: E731
    assert kind("Di Rumek") == "right"
    assert kind("Fo Ta") == "another fact's object"
    assert kind("Di Ru") == "cut short"
    assert kind("Di Rumeko") == "other" and kind("") == "other"
    assert set(open_lm.ERROR_KINDS) == {"right", "another fact's object", "cut short", "other"}


def test_the_in_context_report_accounts_for_every_question(tmp_path):
    """`open_lm --evaluate` on a tiny untrained LM: every question has one
    kind and one length bin, and the report file says the same as the call."""
    import json
    from memkernels.apps.recall import base_lm, open_lm
    save_tiny_open_lm(tmp_path / "lm")
    report = open_lm.evaluate(str(tmp_path / "lm"), "dev", 3, 7, str(tmp_path / "r.json"),
                              log=lambda *_: None)
    assert report["questions"] == 7 and report["phrasings"] == "dev"
    assert abs(sum(report["answer_kinds"].values()) - 1) < 1e-9
    assert sum(b["questions"] for b in report["by_prompt_tokens"].values()) == 7
    assert report["accuracy"] == report["answer_kinds"]["right"]
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == report["accuracy"]
    model, tok = base_lm.load(str(tmp_path / "lm"))
    perplexity = report["held_out_perplexity"]  # an untrained LM: near its vocabulary's size
    assert set(perplexity) == set(base_lm.WINDOWS)
    assert all(10 < v < 10 * len(tok) for v in perplexity.values())
    hidden = report["answers_without_statement"]  # no training.json: the default window
    assert hidden["seq_len"] == base_lm.SEQ_LEN and hidden["document"] == 0 < hidden["packed"]
    assert open_lm.in_context_accuracy(model, tok, 3, 7, phrasings="dev") == report["accuracy"]


def test_document_windows_start_at_a_document_and_packed_ones_are_unchanged():
    """base_lm.packed_batches(windows='document'): every window opens on a
    document's first token, so no answer in it lost its statement; 'packed'
    (the default) draws the same windows as before the option existed."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import base_lm, open_lm
    texts = open_lm.corpus(60, seed=5)
    tok = base_lm.train_tokenizer(texts, vocab_size=300)
    docs = [tok(t)["input_ids"] for t in texts]
    heads = {tuple(d[:8]) for d in docs}
    batches = base_lm.packed_batches(tok, texts, 64, 5, random.Random(1), windows="document")
    for _, x in zip(range(20), batches):
        assert x.shape == (5, 64)
        assert all(tuple(row[:8].tolist()) in heads for row in x)
    ids = [i for d in docs for i in d + [tok.eos_token_id]]
    rng = random.Random(2)
    x = next(base_lm.packed_batches(tok, texts, 64, 3, random.Random(2)))
    starts = [rng.randrange(0, len(ids) - 64 - 1) for _ in range(3)]
    assert x.tolist() == [ids[s:s + 64] for s in starts]
    with pytest.raises(ValueError, match="windows"):
        next(base_lm.packed_batches(tok, texts, 64, 3, random.Random(2), windows="docs"))
    with pytest.raises(ValueError, match="seq_len"):
        next(base_lm.packed_batches(tok, texts[:1], 10_000, 3, random.Random(2)))


def test_packed_windows_hide_statements_and_document_windows_never_do():
    """open_lm.answers_without_statement: a window cut anywhere holds answers
    whose statement lies before it; one that starts at a document holds
    none, at any length."""
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from memkernels.apps.recall import base_lm, open_lm
    texts = open_lm.corpus(200, seed=6)
    tok = base_lm.train_tokenizer(texts, vocab_size=300)
    for seq_len in (48, 160):
        packed = open_lm.answers_without_statement(tok, texts, seq_len, "packed", 2000)
        assert 0.1 < packed < 1
        assert open_lm.answers_without_statement(tok, texts, seq_len, "document", 2000) == 0
    # longer windows hide fewer statements
    assert (open_lm.answers_without_statement(tok, texts, 512, "packed", 2000) <
            open_lm.answers_without_statement(tok, texts, 48, "packed", 2000))


def test_composed_phrasings_recombine_train_words_only():
    """open_lm --composed-phrasings: every train core is kept, the new ones
    use only words of the train phrasings, and no held-out core is rebuilt."""
    import re
    for kind, cores in (("statement", of.COMPOSED_STATEMENT_CORES),
                        ("question", of.COMPOSED_QUESTION_CORES)):
        hand = of.STATEMENT_CORES if kind == "statement" else of.QUESTION_CORES
        assert set(hand["train"]) < set(cores) and len(cores) == len(set(cores))
        for core in cores:
            words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\{[a-z]\}", "", core))
            assert {w.lower() for w in words} <= set(of.TRAIN_WORDS), core
            assert core not in hand["dev"] + hand["eval"], core
    assert set(of.COMPOSED["statement"]) > set(of.STATEMENTS["train"])
    rng = random.Random(4)
    fact = of.make_open_facts(1, seed=4, split="train")[0]
    assert fact.object in fact.statement(rng, "train", composed=True)
    with pytest.raises(ValueError, match="train split only"):
        fact.question(rng, "eval", composed=True)
