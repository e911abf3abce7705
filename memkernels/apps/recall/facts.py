"""Synthetic facts: (subject, relation, object) with freshly generated names.

A fact is stated with one set of templates and asked with another, so recall
cannot be string matching. Objects come from a closed set per relation (a
city, a job, ...); subjects are made-up names from syllables, never seen by
the base LM's corpus when drawn from another seed stream (`split`).
"""
from __future__ import annotations

import dataclasses
import random
import zlib
from typing import Iterable

SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ga ge go gu ka ke ki ko ku la le li lo "
             "lu ma me mi mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta "
             "te ti to tu va ve vi vo za ze zi zo").split()

RELATIONS = {
    "city": dict(
        objects="Paris Lima Oslo Quito Cairo Delhi Tokyo Rome Berlin Madrid Vienna Dublin "
                "Prague Athens Sydney Nairobi Seoul Havana Lisbon Warsaw Bogota Manila Dakar "
                "Hanoi Kyiv Riga Tunis Accra Lagos Perth".split(),
        statements=["{s} lives in {o}.", "{s} has a home in {o}.", "The home of {s} is in {o}."],
        questions=["Where does {s} live?", "In which city does {s} live?"]),
    "job": dict(
        objects="baker doctor pilot farmer painter lawyer nurse teacher singer dancer chef "
                "writer sailor tailor miner judge plumber driver florist barber guard poet "
                "banker dentist".split(),
        statements=["{s} works as a {o}.", "{s} is a {o} by trade.", "The job of {s} is {o}."],
        questions=["What does {s} do for a living?", "What is the profession of {s}?"]),
    "pet": dict(
        objects="cat dog parrot rabbit horse goat turtle hamster snake lizard ferret pony "
                "duck goose owl frog mouse pig sheep llama".split(),
        statements=["{s} owns a {o}.", "{s} keeps a {o} as a pet.", "The pet of {s} is a {o}."],
        questions=["Which animal does {s} have?", "What kind of pet does {s} own?"]),
    "color": dict(
        objects="red blue green yellow purple orange black white pink brown gray silver gold "
                "teal navy maroon olive violet".split(),
        statements=["{s} likes the color {o}.", "The favorite color of {s} is {o}.",
                    "{s} always wears {o}."],
        questions=["Which color does {s} prefer?", "What color does {s} love most?"]),
}


@dataclasses.dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def statement(self, rng: random.Random) -> str:
        return rng.choice(RELATIONS[self.relation]["statements"]).format(s=self.subject,
                                                                         o=self.object)

    def question(self, rng: random.Random) -> str:
        return rng.choice(RELATIONS[self.relation]["questions"]).format(s=self.subject)


def qa_prompt(question: str) -> str:
    """How a question is put to the LM; the answer follows, then a period."""
    return f"Q: {question} A:"


def qa_text(fact: Fact, rng: random.Random) -> str:
    return f"{qa_prompt(fact.question(rng))} {fact.object}."


def name_split(name: str) -> str:
    """'eval' for 1 name in 8 (by a stable hash), else 'train': the benchmark
    draws its subjects from the eval split only, the base LM's corpus and the
    memory's training episodes from the train split, so no benchmark name is
    ever seen in training."""
    return "eval" if zlib.crc32(name.encode()) % 8 == 0 else "train"


def make_name(rng: random.Random, split: str = "train") -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
        if name_split(name) == split:
            return name


def similar_name(name: str, rng: random.Random) -> str:
    """A distractor name in the same split: one syllable of `name` changed."""
    parts = [name[i:i + 2].lower() for i in range(0, len(name), 2)]
    while True:
        j = rng.randrange(len(parts))
        changed = parts[:j] + [rng.choice([s for s in SYLLABLES if s != parts[j]])] + parts[j + 1:]
        candidate = "".join(changed).capitalize()
        if name_split(candidate) == name_split(name):
            return candidate


def make_facts(n: int, seed: int, *, distractors: bool = False, split: str = "eval",
               exclude: Iterable[str] = ()) -> tuple[list[Fact], list[Fact]]:
    """n facts about n distinct fresh subjects (one relation each), and, with
    distractors, n more facts about similar names with other objects.
    Returns (facts, distractor_facts)."""
    rng = random.Random(seed)
    taken = set(exclude)
    facts, others = [], []
    relations = sorted(RELATIONS)
    while len(facts) < n:
        name = make_name(rng, split)
        if name in taken:
            continue
        taken.add(name)
        rel = relations[len(facts) % len(relations)]
        facts.append(Fact(name, rel, rng.choice(RELATIONS[rel]["objects"])))
    if distractors:
        for f in facts:
            for _ in range(100):
                name = similar_name(f.subject, rng)
                if name not in taken:
                    break
            taken.add(name)
            other = rng.choice([o for o in RELATIONS[f.relation]["objects"] if o != f.object])
            others.append(Fact(name, f.relation, other))
    return facts, others


def all_objects() -> list[str]:
    return sorted({o for r in RELATIONS.values() for o in r["objects"]})
