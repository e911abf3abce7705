"""The open-vocabulary facts' held-out splits never overlap, over many draws."""
from __future__ import annotations

import random
import re

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


def test_the_open_recall_command_runs_on_a_few_facts():
    import pytest
    pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")
    from memkernels.apps.recall import open_recall
    rows = open_recall.run([4], questions=4, log=lambda *_: None)
    assert {(r["world"], r["relations"]) for r in rows} == {("closed", "seen"), ("open", "seen"),
                                                           ("open", "held")}
    assert {r["condition"] for r in rows} == {"written memory", "LM alone", "facts in context",
                                             "BM25 top-3"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["questions"] >= 1 for r in rows)


def test_the_open_lm_corpus_never_holds_a_benchmark_value():
    """No held-out subject or object word, and no held-out phrasing, in the
    base LM's corpus (month names are shared by every date)."""
    import re
    from memkernels.apps.recall import open_lm
    docs = " ".join(open_lm.corpus(1500, seed=7))
    tokens = set(re.findall(r"[A-Za-z]+", docs))
    held_out = of.make_open_facts(300, seed=8, split="eval")
    words = {w for f in held_out for w in re.findall(r"[A-Za-z]+", f"{f.subject} {f.object}")
             if len(w) >= 6 and w not in of.MONTHS}
    assert len(words) > 200 and not words & tokens
    for phrasing in of.phrasings("statement", "eval") + of.phrasings("question", "eval"):
        literal = max(re.split(r"\{[a-z]\}", phrasing), key=len)
        if len(literal) >= 8:
            assert literal not in docs, phrasing
