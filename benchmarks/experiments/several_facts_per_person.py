"""Experiment (not product code): can the shipped written memory tell apart
several facts about one person? The recall benchmark gives each made-up
person one fact, so an address that knows the name is enough there. Here
each person has k facts (k relations), all stored; each question must get
its own relation's object. Figures: benchmarks/NOTES.md, "Session 10".

    python benchmarks/experiments/several_facts_per_person.py
"""
from __future__ import annotations

import random

import torch

import memkernels
from memkernels.memory import MemoryModel
from memkernels.recall import base_lm, benchmark
from memkernels.recall.facts import RELATIONS, Fact, make_facts, qa_prompt


def main() -> None:
    torch.manual_seed(0)
    model, tok = base_lm.load()
    memory = MemoryModel.from_pretrained(benchmark.WRITTEN_MEMORY)
    for people, k in [(100, 2), (100, 4), (500, 2)]:
        rng = random.Random(1)
        facts = [Fact(f.subject, rel, rng.choice(RELATIONS[rel]["objects"]))
                 for f in make_facts(people, seed=5)[0]
                 for rel in rng.sample(sorted(RELATIONS), k)]
        statements = [f.statement(rng) for f in facts]
        rng.shuffle(statements)
        bank = memory.store(model, tok, statements, chunk_size=len(statements), progress=False)
        asked = rng.sample(facts, min(300, len(facts)))
        with memkernels.attach(model, memory, bank):
            got = benchmark.answer(model, tok, [qa_prompt(f.question(rng)) for f in asked])
        right = sum(g == f.object for g, f in zip(got, asked))
        # a wrong answer that is another of the same person's objects: the relation confused
        confused = sum(g != f.object and any(h.subject == f.subject and h.object == g
                                             for h in facts) for g, f in zip(got, asked))
        print(f"{people} people x {k} relations ({len(facts)} facts stored, {len(asked)} asked): "
              f"exact match {right / len(asked):.3f}; answered with another fact of the same "
              f"person {confused / len(asked):.3f}")


if __name__ == "__main__":
    main()
