"""Open-vocabulary facts: subjects and objects from open generators, many
relations and phrasings, each with a held-out split built by construction.

Unlike facts.py (objects from closed lists that every training also sees),
an object here is a fresh made-up word, a two-word name, a number, a date or
a code: a memory can only answer by copying what was stored. Four things
have a split, each by a stable hash of its text, so that no draw of one
split can produce the other's: subjects, objects, relations and phrasings.
The eval split of each is for the benchmark only: the base LM's corpus and
the memory's training episodes draw from the train split (the held-out
relations may appear in the base LM's corpus, as a pretrained LLM knows the
language, but never in the memory's training).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
import zlib
from typing import Optional

SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ga ge go gu ka ke ki ko ku la le li lo "
             "lu ma me mi mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta "
             "te ti to tu va ve vi vo za ze zi zo").split()
CODAS = ("", "", "", "n", "r", "s", "l", "k", "th", "x")
MONTHS = ("January February March April May June July August September October November "
          "December").split()

# relation, subject kind, object kind, then its noun phrase: the generic
# phrasings below state and ask each through it ("the home town of X is Y")
_RELATION_TABLE = """
home_town person place home town
birthplace person place birthplace
office person place office city
school person place old school
capital country place capital
largest_city country place largest city
port country place main port
river country word longest river
currency country word currency
anthem country word anthem
founder company name founder
chief company name chief executive
product company word best product
headquarters company place headquarters
ticker company code ticker code
founded company date founding date
staff company number head count
captain ship name captain
home_port ship place home port
hull ship code hull number
launch ship date launch date
crew ship number crew size
spouse person name spouse
mentor person name mentor
best_friend person name best friend
pet_name person word pet's name
nickname person word nickname
password person word password
motto person word motto
dish person word favorite dish
instrument person word instrument
hobby person word hobby
birthday person date birthday
wedding person date wedding day
phone person number phone extension
locker person number locker number
badge person code badge code
plate person code licence plate
room person number room number
team person word team
moon planet word largest moon
discoverer planet name discoverer
catalog planet code catalog code
orbit planet number orbit in days
discovery planet date discovery date
star planet word star
author book name author
setting book place setting
hero book name hero
published book date publication date
"""
RELATIONS = [tuple(line.split(" ", 3)) for line in _RELATION_TABLE.strip().splitlines()]

# Phrasings are a prefix and a core, each split by hand: a train phrasing is a
# train prefix (or none) with a train core, an eval phrasing an eval prefix with
# an eval core, so no part of a held-out phrasing is ever trained on. The dev
# split is held out like eval (written after the open LM was trained, in no
# corpus and no memory training): choices about the memory's training are
# made on dev, and eval is only reported. Every statement core names the
# subject before the object (a memory that keys a token on what came before
# it cannot file an object under a later subject).
STATEMENT_CORES = {
    "train": ["the {r} of {s} is {o}", "{s}'s {r} is {o}", "for {s}, the {r} is {o}",
              "the {r} for {s} is {o}", "{s} has the {r} {o}", "about {s}: the {r} is {o}",
              "the {r} of {s} was {o}", "{s}'s {r} was {o}", "as for {s}, the {r} is {o}",
              "regarding {s}, the {r} is {o}", "{s}'s {r}: {o}", "of {s}, the {r} is {o}",
              "{s} - {r} - {o}", "the {r} belonging to {s} is {o}",
              "in the case of {s}, the {r} is {o}", "{s} reports the {r} as {o}"],
    "eval": ["the {r} that {s} has is {o}", "{s}, whose {r} is {o}",
             "the {r} known for {s} is {o}", "concerning {s}, its {r} is {o}"],
    "dev": ["the {r} on file for {s} is {o}", "{s}, with the {r} {o}",
            "the {r} tied to {s} is {o}", "on {s}: its {r} is {o}"]}
STATEMENT_PREFIXES = {
    "train": ["", "Records say ", "We learned that ", "In fact, ", "Note: ",
              "According to the files, ", "It is true that ", "Reportedly, ", "Some say ",
              "By all accounts, ", "The register says ", "Officially, ", "Today, ",
              "Apparently, ", "Last year, ", "Indeed, ", "I heard that ", "Our notes say ",
              "As expected, ", "Sources confirm ", "News: ", "Fact: ", "Once again, ",
              "For the record, "],
    "eval": ["Everyone knows that ", "It is noted that ", "Rumor has it that ", "People say ",
             "A letter says ", "As we found, "],
    "dev": ["They told me ", "Word is that ", "History shows ", "My friend says ",
            "We all agree ", "The story goes that "]}
QUESTION_CORES = {
    "train": ["what is the {r} of {s}?", "what is {s}'s {r}?", "do you know the {r} of {s}?",
              "name the {r} of {s}.", "what was the {r} of {s}?", "and the {r} of {s}?",
              "give the {r} of {s}.", "recall the {r} of {s}.", "what is the {r} for {s}?",
              "{s}'s {r} is what?", "can you say {s}'s {r}?", "which is the {r} of {s}?"],
    "eval": ["tell me the {r} of {s}.", "which {r} does {s} have?",
             "what do the files give as {s}'s {r}?", "remind me of the {r} of {s}."],
    "dev": ["state the {r} of {s}.", "which {r} is {s}'s?", "could you give {s}'s {r}?",
            "what {r} goes with {s}?"]}
QUESTION_PREFIXES = {"train": ["", "Quick question: ", "Please: ", "One more: ", "Now, ",
                               "Next: ", "Hmm, ", "Also, "],
                     "eval": ["Say, ", "Out of curiosity, ", "Just wondering: "],
                     "dev": ["Well, ", "Okay: ", "Honestly, "]}


def _sentence(prefix: str, core: str) -> str:
    text = prefix + core
    return text[0].upper() + text[1:]


PHRASING_SPLITS = ("train", "dev", "eval")
STATEMENTS = {split: [_sentence(p, c) + "." for p in STATEMENT_PREFIXES[split]
                      for c in STATEMENT_CORES[split]] for split in PHRASING_SPLITS}
QUESTIONS = {split: [_sentence(p, c) for p in QUESTION_PREFIXES[split]
                     for c in QUESTION_CORES[split]] for split in PHRASING_SPLITS}
SPLIT_EVERY = 6  # one in six subjects, objects and relations is held out

# The train cores recombined from their own parts (open_lm --composed-phrasings):
# a phrase naming the subject's relation, led in or not, then a copula before the
# object (statements) or a question frame around it. Only words of the train
# split, in shapes the hand-written cores do not all cover, so that a host LM
# trained on them reads the parts of a sentence rather than a few whole
# templates. Held-out phrasings stay as they are.
RELATION_PHRASES = ["the {r} of {s}", "{s}'s {r}", "the {r} for {s}", "the {r} belonging to {s}"]
LEAD_INS = ["for {s}, ", "about {s}: ", "as for {s}, ", "regarding {s}, ", "of {s}, ",
            "in the case of {s}, "]
COPULAS = [" is {o}", " was {o}", ": {o}"]
QUESTION_FRAMES = ["what is {x}?", "do you know {x}?", "name {x}.", "what was {x}?", "and {x}?",
                   "give {x}.", "recall {x}.", "{x} is what?", "can you say {x}?",
                   "which is {x}?"]


def _unique(items):
    return list(dict.fromkeys(items))


COMPOSED_STATEMENT_CORES = _unique(
    STATEMENT_CORES["train"]
    + [phrase + copula for phrase in RELATION_PHRASES for copula in COPULAS]
    + [lead + "the {r}" + copula for lead in LEAD_INS for copula in COPULAS
       if not (lead.endswith(": ") and copula.startswith(":"))])
COMPOSED_QUESTION_CORES = _unique(
    QUESTION_CORES["train"]
    + [frame.replace("{x}", phrase) for frame in QUESTION_FRAMES for phrase in RELATION_PHRASES]
    + [lead + frame.replace("{x}", "the {r}") for lead in LEAD_INS for frame in QUESTION_FRAMES
       if not frame.startswith("{x}")])
COMPOSED = {"statement": [_sentence(p, c) + "." for p in STATEMENT_PREFIXES["train"]
                          for c in COMPOSED_STATEMENT_CORES],
            "question": [_sentence(p, c) for p in QUESTION_PREFIXES["train"]
                         for c in COMPOSED_QUESTION_CORES]}


def _hashed(kind: str, text: str) -> str:
    return "eval" if zlib.crc32(f"{kind}:{text}".encode()) % SPLIT_EVERY == 0 else "train"


# words a varied training phrasing may gain: those of the train phrasings' parts
TRAIN_WORDS = tuple(sorted({w.lower() for part in (STATEMENT_CORES["train"] +
                                                    STATEMENT_PREFIXES["train"] +
                                                    QUESTION_CORES["train"] +
                                                    QUESTION_PREFIXES["train"])
                            for w in re.findall(r"[A-Za-z]{2,}", re.sub(r"\{[a-z]\}", "", part))}))


def vary(phrasing: str, rng: random.Random, p: float) -> str:
    """A training phrasing (a template with {s}, {r}, {o} slots) with each of
    its words but the slots and the last dropped with probability p / 2, and
    a word of the train phrasings (TRAIN_WORDS) inserted before it with
    probability p / 2: sentence shapes the base LM never read, so that a
    memory trained on them learns an address that does not hang on one shape
    (AppendMemory's address; `train --vary-phrasings`). Draws from the train
    split only; p=0 returns the phrasing unchanged."""
    if p <= 0:
        return phrasing
    words = phrasing.split(" ")
    out = []
    for i, word in enumerate(words):
        fixed = "{" in word or i == len(words) - 1
        if not fixed and rng.random() < p / 2:
            continue
        if rng.random() < p / 2:
            out.append(rng.choice(TRAIN_WORDS))
        out.append(word)
    text = " ".join(out)
    return text[0].upper() + text[1:]


def split_of(kind: str, text: str) -> str:
    """The split of a relation name (kind 'relation') or of a subject or object
    (kind 'value'): 1 in SPLIT_EVERY by a stable hash, else 'train'. A value
    made of words is split word by word, and belongs to a split only when all
    its words do ('mixed' otherwise, never drawn): no word of a held-out value
    ever appears in a training value, whole or as part of a name. Month names,
    shared by every date, do not count; a value with no word (a number) splits whole."""
    if kind == "relation":
        return _hashed(kind, text)
    words = [w.lower() for w in re.findall(r"[A-Za-z]{2,}", text) if w not in MONTHS]
    if not words:
        return _hashed("value", text)
    splits = {_hashed("word", w) for w in words}
    return splits.pop() if len(splits) == 1 else "mixed"


def relations(split: str) -> list[tuple]:
    return [r for r in RELATIONS if split_of("relation", r[0]) == split]


def phrasings(kind: str, split: str) -> list[str]:
    """Statement ('statement') or question ('question') phrasings of a split."""
    return (STATEMENTS if kind == "statement" else QUESTIONS)[split]


@functools.lru_cache(maxsize=None)
def _statement_patterns(split: str) -> list[tuple[re.Pattern, str]]:
    out = []
    for prefix in STATEMENT_PREFIXES[split]:
        for core in STATEMENT_CORES[split]:
            parts = re.split(r"\{[a-z]\}", _sentence(prefix, core) + ".")
            out.append((re.compile("(.+)".join(map(re.escape, parts)), re.DOTALL), core))
    return out


def statement_core(statement: str, split: str) -> str | None:
    """The core of `split` that an unvaried statement (OpenFact.statement) was
    phrased with, or None: for breaking results down by sentence shape. Where
    several phrasings match ("For the record, regarding X, ..." is also "for
    {s}, ..." with a longer subject), the one whose slots take the fewest
    characters, i.e. the most of the sentence from the phrasing itself."""
    if split not in PHRASING_SPLITS:
        raise ValueError(f"split must be one of {PHRASING_SPLITS}, got {split!r}")
    best, best_len = None, None
    for pattern, core in _statement_patterns(split):
        m = pattern.fullmatch(statement)
        if m is not None:
            slots = sum(len(g) for g in m.groups())
            if best_len is None or slots < best_len:
                best, best_len = core, slots
    return best


# Real first and family names (common in several languages), for the
# benchmark's "realistic names" split only: a person subject drawn from them
# keeps the split rule (every word of the name in the eval split by hash), so
# no training ever sees one of its words.
REAL_FIRST_NAMES = """
Aaron Abigail Adam Adrian Ahmed Aisha Alan Albert Alejandro Alexander Alice Amanda Amir Ana
Andrea Andrew Angela Anna Anton Arjun Astrid Beatriz Benjamin Bernard Bianca Boris Bruno Camila
Carlos Caroline Catherine Chen Chloe Christian Clara Daniel David Diana Diego Dmitri Elena Elif
Elijah Elizabeth Emily Emma Eric Eva Fatima Felix Fernando Fiona Francesca Gabriel George Grace
Hana Hannah Hassan Helen Hugo Ibrahim Igor Ines Isabel Ivan Jacob James Jasmine Javier Jonas
Jorge Julia Kai Karim Katarina Kenji Laura Leila Leon Lucas Lucia Luis Maja Marco Maria Mario
Martin Mateo Maya Mei Michael Miguel Mohammed Nadia Natalia Nikolai Noah Olga Oliver Omar Pablo
Patrick Paula Pedro Peter Priya Rafael Rahul Rosa Samuel Sara Sebastian Sergei Sofia Stefan
Tomas Valentina Victor Wei Yara Yusuf Zara""".split()
REAL_LAST_NAMES = """
Abbott Adams Alvarez Andersen Bauer Becker Bennett Bianchi Brown Campbell Carter Castillo Chang
Clarke Costa Cruz Dubois Fischer Flores Fontaine Garcia Gomez Gonzalez Graham Gupta Hansen
Harris Hoffmann Hughes Ivanov Jensen Johnson Kaplan Kato Keller Kim Klein Kowalski Kumar Larsen
Laurent Lee Lopez Marino Martin Meyer Miller Moreau Morales Moreno Murphy Nakamura Nguyen Novak
Olsen Ortiz Park Patel Petrov Popescu Ramos Reyes Ricci Rivera Romano Rossi Russo Sanchez
Santos Schmidt Schneider Silva Singh Smith Suzuki Tanaka Taylor Torres Valdez Vargas Walker
Weber Williams Wilson Wong Yamamoto Young Zhang Ziegler""".split()


# Real names for the dev check of the realistic-names split: in no list above,
# every word in the eval split by hash (so no open-world training value holds
# one; the closed world's object lists are another vocabulary),
# as many as the eval split has (eval_name_pool). The memory's pre-training
# draws the train split of the lists above; a dev check on those names measured
# names it trained on, and its gains did not reach eval (docs/performance.md,
# "More real names in the address pre-training").
DEV_REAL_FIRST_NAMES = """
Akira Aleksandra Amara Andre Anika Ayumi Beatrice Benedikt Dana Delia Denis Edgar Elisa Felipe
Filip Freya Gina Gloria Hiro Karl Linus Lotte Marta Nina""".split()
DEV_REAL_LAST_NAMES = """
Arnold Baker Barros Delgado Dietrich Eriksson Gray Greco Guerrero Horvat Jimenez""".split()


def made_up_word(rng: random.Random, syllables: tuple[int, int] = (2, 5)) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables))) + \
        rng.choice(CODAS)


def draw(kind: str, rng: random.Random) -> str:
    """A fresh value of a kind of subject or object (not yet split)."""
    if kind in ("place", "country", "planet", "ship", "company", "book"):
        word = made_up_word(rng).capitalize()
        if kind == "place" and rng.random() < 0.3:
            word = f"{word} {made_up_word(rng, (1, 3)).capitalize()}"
        return word
    if kind in ("name", "person"):
        return f"{made_up_word(rng, (1, 3)).capitalize()} {made_up_word(rng, (2, 4)).capitalize()}"
    if kind == "word":
        return made_up_word(rng, (1, 4))
    if kind == "number":
        return str(rng.randint(10, 999999))
    if kind == "date":
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1700, 2099)}"
    if kind == "code":
        letters = "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.randint(2, 3)))
        return f"{letters}-{rng.randint(10, 9999)}"
    raise ValueError(f"unknown kind {kind!r}")


@functools.lru_cache(maxsize=None)
def _real_names(split: str) -> tuple[list[str], list[str]]:
    """(first, family) names of a split: 'train' and 'eval' of REAL_*_NAMES,
    'dev' the DEV_REAL_*_NAMES (no training draws them either)."""
    if split == "dev":
        return list(DEV_REAL_FIRST_NAMES), list(DEV_REAL_LAST_NAMES)
    return tuple([n for n in names if split_of("value", n) == split]
                 for names in (REAL_FIRST_NAMES, REAL_LAST_NAMES))


def eval_name_pool() -> tuple[int, int]:
    """How many first and family names the eval split has: a dev draw from
    that many train names nests names ("Sofia Smith", "Sofia Maja Smith") as
    often as eval does."""
    first, last = _real_names("eval")
    return len(first), len(last)


def _name_lists(split: str, name_pool: Optional[tuple[int, int]]) -> tuple[list[str], list[str]]:
    first, last = _real_names(split)
    if name_pool is not None:
        if min(name_pool) < 1:
            raise ValueError(f"name_pool: (first names, family names), each >= 1, got {name_pool}")
        first, last = first[:name_pool[0]], last[:name_pool[1]]
    return first, last


def realistic_name(rng: random.Random, split: str,
                   name_pool: Optional[tuple[int, int]] = None) -> str:
    """A real first name, half the time a middle name, and a family name
    of `split` (_real_names: 'dev' is a list of its own); name_pool (F, L):
    from the split's first F first names and L family names only."""
    first, last = _name_lists(split, name_pool)
    middle = f" {rng.choice(first)}" if rng.random() < 0.5 else ""
    return f"{rng.choice(first)}{middle} {rng.choice(last)}"


def draw_in_split(kind: str, rng: random.Random, split: str) -> str:
    """A fresh value of `kind` whose split (split_of) is `split` (real names:
    realistic_name)."""
    while True:
        value = draw(kind, rng)
        if split_of("value", value) == split:
            return value


def similar_name(name: str, rng: random.Random, split: str) -> str:
    """Another name of `split` one edit from `name`: a syllable of its last
    word changed, added or dropped (Tur Mefopibo -> Tur Mefopiba, Tur
    Mefobibo, Tur Mefopi...): the distractor a memory must not confuse."""
    head, _, last = name.rpartition(" ")
    for _ in range(1000):
        syllables = re.findall(r"[^aeiou]*[aeiou]+(?:[^aeiou]+$)?", last.lower()) or [last.lower()]
        i = rng.randrange(len(syllables))
        edit = rng.random()
        if edit < 0.6:
            syllables[i] = rng.choice(SYLLABLES)
        elif edit < 0.8 or len(syllables) < 3:
            syllables.insert(i, rng.choice(SYLLABLES))
        else:
            del syllables[i]
        word = "".join(syllables).capitalize()
        other = f"{head} {word}" if head else word
        if other != name and split_of("value", other) == split:
            return other
    raise ValueError(f"no similar name of split {split!r} for {name!r}")


@dataclasses.dataclass(frozen=True)
class OpenFact:
    subject: str
    relation: str
    object: str

    @property
    def noun(self) -> str:
        return next(r[3] for r in RELATIONS if r[0] == self.relation)

    def statement(self, rng: random.Random, split: str = "train", varied: float = 0.0,
                  composed: bool = False) -> str:
        """A statement in a phrasing of `split` (varied: see vary(); composed:
        drawn from COMPOSED, train split only)."""
        return vary(rng.choice(_pool("statement", split, composed)), rng, varied).format(
            r=self.noun, s=self.subject, o=self.object)

    def question(self, rng: random.Random, split: str = "train", varied: float = 0.0,
                 composed: bool = False) -> str:
        return vary(rng.choice(_pool("question", split, composed)), rng, varied).format(
            r=self.noun, s=self.subject)


def _pool(kind: str, split: str, composed: bool) -> list[str]:
    if not composed:
        return phrasings(kind, split)
    if split != "train":
        raise ValueError(f"composed phrasings are of the train split only, not {split!r}")
    return COMPOSED[kind]


def random_open_fact(rng: random.Random, split: str = "train",
                     realistic_names: float = 0.0) -> OpenFact:
    """One fresh fact of `split` over the training relations (a training
    episode's); with probability realistic_names, about a person with a real
    first and family name of `split` (over the person relations)."""
    if realistic_names and rng.random() < realistic_names:  # no draw at 0: same stream
        rel = rng.choice([r for r in relations("train") if r[1] == "person"])
        subject = realistic_name(rng, split)
    else:
        rel = rng.choice(relations("train"))
        subject = draw_in_split(rel[1], rng, split)
    return OpenFact(subject, rel[0], draw_in_split(rel[2], rng, split))


def make_open_facts(n: int, seed: int, *, split: str = "eval", relation_split: str = "train",
                    facts_per_subject: int = 1, realistic_names: bool = False,
                    similar_names: bool = False, nested_names: bool = False,
                    name_pool: Optional[tuple[int, int]] = None,
                    name_split: Optional[str] = None) -> list[OpenFact]:
    """n facts with fresh subjects and objects of `split`, over the relations
    of `relation_split`; facts_per_subject > 1 gives each subject that many
    relations of its kind (a person with a home town, a spouse, a birthday...);
    realistic_names: every subject a person with a real first and family name
    (REAL_FIRST_NAMES, REAL_LAST_NAMES); similar_names: facts come in pairs,
    the second about a name one edit from the first's (similar_name), same
    relation, another object: facts[0::2] are asked, facts[1::2] distract;
    nested_names (with realistic_names): facts come in pairs, the first about
    a real first and family name, the second about that name with another
    first name in front ("Gina Barros", "Beatrice Gina Barros"), same
    relation, another object: the names a small pool nests, which a question
    about the shorter one must tell apart.
    name_pool (F, L): realistic names from the split's first F first and L
    family names (the dev check of a pool as small as eval's: eval_name_pool());
    name_split: the realistic names' split when not `split` ('dev': real names
    no training draws, DEV_REAL_FIRST_NAMES, with train-split objects)."""
    if similar_names:
        firsts = make_open_facts((n + 1) // 2, seed, split=split, relation_split=relation_split,
                                 realistic_names=realistic_names, name_pool=name_pool,
                                 name_split=name_split)
        rng = random.Random(seed + 1)
        taken = {f.subject for f in firsts}
        facts = []
        for f in firsts:
            twin = similar_name(f.subject, rng, split)
            while twin in taken:
                twin = similar_name(f.subject, rng, split)
            taken.add(twin)
            kind = next(r[2] for r in RELATIONS if r[0] == f.relation)
            other = draw_in_split(kind, rng, split)
            while other == f.object:
                other = draw_in_split(kind, rng, split)
            facts += [f, OpenFact(twin, f.relation, other)]
        return facts[:n]
    if nested_names:
        if not realistic_names or facts_per_subject != 1:
            raise ValueError("nested_names nests real names: give realistic_names=True, "
                             "one fact per subject")
        return _nested_name_facts(n, seed, split, relation_split,
                                  _name_lists(name_split or split, name_pool))
    rng = random.Random(seed)
    pool = relations(relation_split)
    if realistic_names:
        pool = [r for r in pool if r[1] == "person"]
    by_kind: dict[str, list[tuple]] = {}
    for r in pool:
        by_kind.setdefault(r[1], []).append(r)
    kinds = sorted(k for k, rs in by_kind.items() if len(rs) >= facts_per_subject)
    facts: list[OpenFact] = []
    subjects: set[str] = set()
    repeats = 0  # subjects drawn again in a row
    while len(facts) < n:
        kind = rng.choice(kinds)
        subject = (realistic_name(rng, name_split or split, name_pool) if realistic_names
                   else draw_in_split(kind, rng, split))
        if subject in subjects:
            repeats += 1
            if repeats > 10_000:
                raise ValueError(f"could not draw {n} facts with distinct subjects (realistic_"
                                 f"names={realistic_names}: the names of split "
                                 f"{name_split or split!r} ran out at {len(subjects)})")
            continue
        repeats = 0
        subjects.add(subject)
        for rel in rng.sample(by_kind[kind], facts_per_subject)[:n - len(facts)]:
            facts.append(OpenFact(subject, rel[0], draw_in_split(rel[2], rng, split)))
    return facts


def _nested_name_facts(n: int, seed: int, split: str, relation_split: str,
                       names: tuple[list[str], list[str]]) -> list[OpenFact]:
    """make_open_facts(nested_names=True): pairs about "F L" and "X F L"."""
    rng = random.Random(seed)
    first, last = names
    pool = [r for r in relations(relation_split) if r[1] == "person"]
    facts: list[OpenFact] = []
    subjects: set[str] = set()
    repeats = 0
    while len(facts) < n:
        inner = f"{rng.choice(first)} {rng.choice(last)}"
        outer = f"{rng.choice(first)} {inner}"
        if inner in subjects or outer in subjects:
            repeats += 1
            if repeats > 10_000:
                raise ValueError(f"could not draw {n} facts about nested names: the names ran "
                                 f"out at {len(subjects)}")
            continue
        repeats = 0
        subjects.update((inner, outer))
        rel = rng.choice(pool)
        inner_object = draw_in_split(rel[2], rng, split)
        outer_object = draw_in_split(rel[2], rng, split)
        while outer_object == inner_object:
            outer_object = draw_in_split(rel[2], rng, split)
        facts += [OpenFact(inner, rel[0], inner_object), OpenFact(outer, rel[0], outer_object)]
    return facts[:n]
