"""Training batches for the two ways knowledge enters a memory, and the
memory configuration the recall benchmark uses.

Every batch is a pure function of (seed, rank, step), so training resumes
exactly and DDP ranks see different data.
"""
from __future__ import annotations

import functools
import random
from typing import Callable, NamedTuple

import torch

from memkernels.memory import AppendOptions, MemoryConfig, MemoryModel
from memkernels.apps.recall import open_facts
from memkernels.apps.recall.facts import RELATIONS, Fact, make_facts, make_name, qa_prompt
from memkernels.hf import store
from memkernels.train import Batch


# the append memory's store gate keeps a token from this probability on (a
# missed statement costs a fact, an extra token only a slot)
STORE_THRESHOLD = 0.3
# the append memory's context (MemoryConfig.context_decay): the last few
# tokens, the asked name among them, weigh most (an address probe found the
# asked statement among 1000 99% of the time with 0.7 or 0.9, 71% without:
# docs/design.md, "Keying on the context")
CONTEXT_DECAY = 0.7


def default_memory(model, *, slots: int = 1024, seed: int = 0, write_rule: str = "blend",
                   store_threshold: float = 0.0, context_decay: float = 0.0) -> MemoryModel:
    """Reads at the last two decoder layers; a write keys on the (base
    model's) hidden states of the first of them (late enough that a
    statement's object position has gathered who the statement is about) and
    takes its values from the embeddings (where the object is still itself:
    at the write layer the base LM has overwritten it). blend: 4 heads x 32;
    append: 4 address + 4 content heads x 32 (memkernels.memory.append),
    store_threshold and context_decay as MemoryConfig's."""
    torch.manual_seed(seed)
    n = model.config.num_hidden_layers
    config = MemoryConfig.from_hf(model.config, num_heads=8 if write_rule == "append" else 4,
                                  head_dim=32, num_slots=slots,
                                  read_layers=(n - 2, n - 1), write_layer=max(n - 2, 0),
                                  values_from="embeddings", write_rule=write_rule,
                                  **(dict(append=AppendOptions(store_threshold=store_threshold,
                                                               context_decay=context_decay))
                                     if write_rule == "append" else {}))
    return MemoryModel(config)


def written_memory(model, *, slots: int = 1024, seed: int = 0) -> MemoryModel:
    """The written memory's configuration (the recall benchmark's and
    `python -m memkernels.apps.recall.train --world closed`'s): the append rule with a
    store gate and a context."""
    return default_memory(model, slots=slots, seed=seed, write_rule="append",
                          store_threshold=STORE_THRESHOLD, context_decay=CONTEXT_DECAY)


def copy_memory(model, *, slots: int = 1024, seed: int = 0, lookahead: bool = False,
                context_decay: float = CONTEXT_DECAY) -> MemoryModel:
    """The open-vocabulary memory's configuration: the copy rule
    (memkernels.memory.copy, MemoryConfig.for_copy) with the written
    memory's store gate and context; lookahead: AppendOptions.lookahead;
    context_decay: AppendOptions.context_decay."""
    torch.manual_seed(seed)
    config = MemoryConfig.for_copy(model.config, num_slots=slots, append=AppendOptions(
        store_threshold=STORE_THRESHOLD, context_decay=context_decay, lookahead=lookahead))
    return MemoryModel(config)


class AddressPairs(NamedTuple):
    """pretrain_address's pairs: question i must find token targets[i] of
    statements[i]; groups[i] is the fact's group, shared by facts drawn
    together about one subject (pretrain_address(groups=...))."""
    questions: list
    statements: list[str]
    targets: list[int]
    groups: list[tuple[int, str]]

    def nested_groups(self) -> list:
        """groups in which only a nested-name pair of facts (address_pairs'
        nested_names) shares one: every other fact is alone, so that
        pretrain_address brings the pair into a batch together and nothing
        else (--hard-negatives groups the several facts about one subject)."""
        return [g if g[0] == NESTED_DRAW else (g, s) for g, s in zip(self.groups, self.statements)]


# address_pairs' draw of nested-name pairs (its group key's first entry)
NESTED_DRAW = 3


def address_pairs(tokenizer, n: int = 8000, seed: int = 11, world: str = "closed",
                  varied: float = 0.0, realistic_names: float = 0.0,
                  several_per_subject: float = 0.0, composed: float = 0.0,
                  nested_names: float = 0.0) -> AddressPairs:
    """AddressPairs of n train-split facts for
    memkernels.train.pretrain_address: question i, put as the benchmark puts
    it, must find the last token before the object in statement i (where the
    statement has said whom it is about and which relation it states).

    world="open": open-vocabulary facts with answers of several tokens, one
    pair per answer token: the question followed by the answer's first j
    tokens (token ids, as generation sees them) must find the statement's
    token before answer token j (the slot whose content is that token), and
    the question followed by the whole answer the answer's last token (whose
    slot holds the period: where a copied answer ends); varied > 0 varies
    each statement's and question's phrasing (open_facts.vary);
    realistic_names / several_per_subject: the fractions of the facts about
    a person with a real first and family name / given 3 at a time about one
    subject (open_facts.make_open_facts; train-split words as every fact);
    composed: the fraction of facts stated and asked in the train cores
    recombined (open_facts.COMPOSED: sentence shapes the host never read);
    nested_names: the fraction of facts drawn in pairs about a real name and
    that name with a first name in front, same relation (open_facts
    make_open_facts(nested_names=True)), one group per pair (nested_groups)."""
    rng = random.Random(seed)
    if world == "closed":
        if varied or realistic_names or several_per_subject or composed or nested_names:
            raise ValueError("varied or composed phrasings, realistic or nested names and "
                             "several facts per subject apply to world='open'")
        facts = make_facts(n, seed=seed, split="train")[0]
        questions = [qa_prompt(f.question(rng)) for f in facts]
        statements = [f.statement(rng) for f in facts]
        targets = [len(tokenizer(s.rsplit(f.object, 1)[0].rstrip())["input_ids"]) - 1
                   for s, f in zip(statements, facts)]
        return AddressPairs(questions, statements, targets, [(0, f.subject) for f in facts])
    questions, statements, targets, groups = [], [], [], []
    n_real, n_several = round(n * realistic_names), round(n * several_per_subject)
    n_nested = round(n * nested_names)
    if not (0 <= n_real and 0 <= n_several and 0 <= n_nested
            and n_real + n_several + n_nested <= n):
        raise ValueError(f"realistic_names + several_per_subject + nested_names must be "
                         f"fractions summing to at most 1, got {realistic_names}, "
                         f"{several_per_subject} and {nested_names}")
    facts = open_facts.make_open_facts(n - n_real - n_several - n_nested, seed=seed,
                                       split="train", relation_split="train")
    draws = [0] * len(facts)  # which draw a fact comes from: names repeat across draws
    if n_real:
        facts += open_facts.make_open_facts(n_real, seed=seed + 1, split="train",
                                            relation_split="train", realistic_names=True)
        draws += [1] * (len(facts) - len(draws))
    if n_several:
        facts += open_facts.make_open_facts(n_several, seed=seed + 2, split="train",
                                            relation_split="train", facts_per_subject=3)
        draws += [2] * (len(facts) - len(draws))
    keys = [f.subject for f in facts]
    if n_nested:
        nested = open_facts.make_open_facts(n_nested, seed=seed + NESTED_DRAW, split="train",
                                            relation_split="train", realistic_names=True,
                                            nested_names=True)
        facts += nested
        draws += [NESTED_DRAW] * len(nested)
        keys += [f.subject for f in nested[0::2] for _ in range(2)][:len(nested)]
    for f, draw, key in zip(facts, draws, keys):
        recombined = bool(composed) and rng.random() < composed  # no draw at 0: same stream
        statement = f.statement(rng, varied=varied, composed=recombined)
        before = len(tokenizer(statement.rsplit(f.object, 1)[0].rstrip())["input_ids"]) - 1
        prompt = tokenizer(qa_prompt(f.question(rng, varied=varied, composed=recombined)))[
            "input_ids"]
        answer = tokenizer(f" {f.object}")["input_ids"]
        for j in range(len(answer) + 1):  # the answer's tokens, then the period after it
            questions.append(prompt + answer[:j])
            statements.append(statement)
            targets.append(before + j)
            groups.append((draw, key))
    return AddressPairs(questions, statements, targets, groups)


def _rng(*key: int) -> random.Random:
    return random.Random(hash(key))  # tuples of ints hash the same in every process


def qa_tokens(tokenizer, fact: Fact, rng: random.Random,
              follows: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of 'Q: question A: object.' (with a leading space when it
    follows another one) and labels scoring only the answer."""
    prompt = tokenizer((" " if follows else "") + qa_prompt(fact.question(rng)))["input_ids"]
    answer = tokenizer(f" {fact.object}.")["input_ids"]
    return prompt + answer, [-100] * len(prompt) + answer


def statement_tokens(tokenizer, fact: Fact, rng: random.Random) -> tuple[list[int], list[int]]:
    """Token ids of a statement and labels scoring only its object and period."""
    return object_scored(tokenizer, fact.statement(rng), fact.object)


def object_scored(tokenizer, statement: str, obj: str) -> tuple[list[int], list[int]]:
    """Token ids of `statement` and labels scoring only its (last) `obj` and
    what follows it."""
    if obj not in statement:
        raise ValueError(f"the statement {statement!r} does not hold its object {obj!r}")
    head, _, tail = statement.rpartition(obj)
    prompt = tokenizer(head.rstrip())["input_ids"]
    answer = tokenizer(f" {obj}{tail}")["input_ids"]
    return prompt + answer, [-100] * len(prompt) + answer


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def lm_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """A batch of (token ids, labels) rows, padded on the right (labels -100)."""
    ids = _pad([r[0] for r in rows], pad_id)
    return Batch(input_ids=ids, attention_mask=_pad([[1] * len(r[0]) for r in rows], 0),
                 labels=_pad([r[1] for r in rows], -100))


def random_fact(rng: random.Random, split: str = "train") -> Fact:
    rel = rng.choice(sorted(RELATIONS))
    return Fact(make_name(rng, split), rel, rng.choice(RELATIONS[rel]["objects"]))


def written_batches(tokenizer, batch: int, seed: int, facts_per_row: tuple[int, int] = (4, 128),
                    questions_per_row: int = 8, curriculum_steps: int = 0,
                    draw_fact: Callable = random_fact) -> Callable[[int, int], Batch]:
    """Episodes: each row writes k fresh facts (statements) into its own
    fresh bank, then answers questions about some of them (other templates).
    address_targets / asks: each statement's last token before its object,
    and each question's position that predicts the answer (Batch).
    Names come from the train split: the benchmark's never appear.
    curriculum_steps: the most facts per row grows geometrically from 1 to
    facts_per_row[1] over these steps (a memory learns to copy one fact
    first; started at 4-32 facts, its loss did not move in 200 steps)."""
    pad = tokenizer.pad_token_id
    lo, hi = facts_per_row

    def facts_range(step: int) -> tuple[int, int]:
        if step >= curriculum_steps:
            return lo, hi
        top = max(1, round(hi ** (step / curriculum_steps)))
        return min(lo, top), top

    def make(step: int, rank: int) -> Batch:
        rng = _rng(seed, rank, step, 1)
        rows, writes, targets, asks = [], [], [], []
        for r in range(batch):
            facts = [draw_fact(rng) for _ in range(rng.randint(*facts_range(step)))]
            statements = [statement_tokens(tokenizer, f, rng) for f in facts]
            writes.append([ids for ids, _ in statements])
            targets.append([_first_scored(labels) - 1 for _, labels in statements])
            ids, labels = [], []
            for j in rng.sample(range(len(facts)), min(questions_per_row, len(facts))):
                i, lab = qa_tokens(tokenizer, facts[j], rng, follows=bool(ids))
                asks.append((r, len(ids) + _first_scored(lab) - 1, j))  # predicts the answer
                ids, labels = ids + i, labels + lab
            rows.append((ids, labels))
        b = lm_batch(rows, pad)
        n = max(len(w) for w in writes)
        tw = max(len(t) for w in writes for t in w)
        b.write_ids = torch.full((batch, n, tw), pad, dtype=torch.long)
        b.write_mask = torch.zeros(batch, n, tw, dtype=torch.long)
        b.address_targets = torch.full((batch, n), -1, dtype=torch.long)
        for r, w in enumerate(writes):
            for j, t in enumerate(w):
                b.write_ids[r, j, :len(t)] = torch.tensor(t)
                b.write_mask[r, j, :len(t)] = 1
                b.address_targets[r, j] = targets[r][j]
        b.asks = torch.tensor(asks, dtype=torch.long)
        return b
    return make


def append_episodes(tokenizer, batch: int, seed: int, steps: int,
                    world: str = "closed",
                    realistic_names: float = 0.0) -> Callable[[int, int], Batch]:
    """The episodes of an append memory's joint training (the recall
    benchmark's and `python -m memkernels.apps.recall.train`'s): 4-16 facts written a
    row, reached by a curriculum from one over the first 1000 steps, and one
    question a row, asked alone as the benchmark asks it (the first reader's
    query is frozen at what pretrain_address fitted on questions alone).
    realistic_names (world="open"): the fraction of facts about a person with
    a real first and family name (train-split names)."""
    if world == "closed" and realistic_names:
        raise ValueError("realistic names apply to world='open'")
    draw = (random_fact if world == "closed" else functools.partial(
        open_facts.random_open_fact, realistic_names=realistic_names))
    return written_batches(tokenizer, batch, seed, facts_per_row=(4, 16), questions_per_row=1,
                           curriculum_steps=min(1000, steps), draw_fact=draw)


def _first_scored(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def stored_facts(memory: MemoryModel, model, tokenizer, n: int, seed: int = 0,
                 distractors: bool = False):
    """A bank that `memory` stored trained_facts(n, seed, distractors) in, one
    statement each (a trained append bank starts there)."""
    rng = random.Random(seed)
    return store(memory, model, tokenizer,
                 [f.statement(rng) for f in trained_facts(n, seed, distractors)],
                 chunk_size=256, progress=False)


def trained_facts(n: int, seed: int, distractors: bool = False) -> list[Fact]:
    """The facts a trained memory learns for a benchmark run of size n
    (the eval split, as the benchmark asks them)."""
    facts, others = make_facts(n, seed, distractors=distractors)
    return facts + others


def trained_batches(tokenizer, batch: int, seed: int, n_facts: int, *, distractors: bool = False,
                    eval_seed: int = 0, aux_facts: int = 2000,
                    qa_fraction: float = 0.5) -> Callable[[int, int], Batch]:
    """The corpus a trained memory learns: every benchmark fact as statements
    (never as questions; each row a statement template drawn at random), plus
    auxiliary train-split facts as statements and as questions, so the memory
    learns to answer questions from what it learned from statements (a blend
    bank learned from scratch; aux_facts=0: the statements alone, for a bank
    store() made from them). The benchmark's questions are never trained on."""
    pad = tokenizer.pad_token_id
    target = trained_facts(n_facts, eval_seed, distractors)
    aux = [random_fact(random.Random(seed * 7919 + i)) for i in range(aux_facts)]

    def make(step: int, rank: int) -> Batch:
        rng = _rng(seed, rank, step, 2)
        rows = []
        for _ in range(batch):
            if not aux:
                rows.append(statement_tokens(tokenizer, rng.choice(target), rng))
            elif rng.random() < qa_fraction:
                rows.append(qa_tokens(tokenizer, rng.choice(aux), rng))
            else:
                f = rng.choice(target) if rng.random() < 0.8 else rng.choice(aux)
                rows.append(statement_tokens(tokenizer, f, rng))
        return lm_batch(rows, pad)
    return make
