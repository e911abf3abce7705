"""Open-vocabulary recall: a frozen LM and a written memory on facts no
training drew from (open_facts: held-out subjects, objects, relations and
phrasings), against the baselines a user would try.

    python -m memkernels.apps.recall.open_recall [--model DIR] [--memory DIR]
        [--facts 10 100 1000] [--questions 300] [--out DIR]

Defaults: the open LM and open memory that ship (assets/open_lm,
assets/open_memory). Splits, each a row of its own:
- "held-out": subjects and objects of the eval split, relations the memory
  trained on;
- "held-out relations": the same, over relations no memory training saw;
- "realistic names": every subject a person with a real first (middle) and
  family name, each word of the held-out split (open_facts.REAL_FIRST_NAMES);
- "several per subject": 3 facts per subject (a person with a home town, a
  spouse and a birthday...): the memory must tell the relations apart;
- "similar names": half the facts distract: a name one edit from an asked
  fact's subject, same relation, another object (only the others are asked);
and within each, answers of 1 / 2-3 / 4-6 / 7+ tokens (in the model's tokenizer).
Statements and questions use held-out phrasings, the question's never the
statement's. Conditions: the LM alone (first N only), the facts in its prompt
(N <= 10), the BM25 top-3 statements in its prompt (rank_bm25 over words), the
written memory (store() then questions), the written memory read through its
lexical index (each question reads the stored facts that share the most words
with it, the best and its near ties: MemoryBank.lexical_select), and the same
lexical selection's statements in the prompt instead (the retriever alone,
the LM reading); and those last two again decoded with the stored text's
continuation (memkernels.hf.StoredTextContinuation, --continuation); with
--trained-steps, the trained memory: each written bank's slots then trained
on its own statements (trained_bank), read over the whole bank and through
the index. At
small N a cell pools several independent sets of N facts (each its own bank
and prompt). Exact match of the greedy answer up to its
first period. Per condition, the tokens the LM processes per question (the
prompt's median; the memory conditions also read slots). For the memory, per
N: store throughput (facts/s), the lexical index's build time, bank bytes per
fact, and the median cost of a question (batch 1, paired with the same
question with reads off). With --out, rows are appended to
DIR/open-recall-cpu.jsonl, the tables written to DIR/open_recall.md and the
plot to DIR/open_recall.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.apps.recall import base_lm, benchmark, open_facts, tasks
from memkernels.apps.recall.facts import qa_prompt
from memkernels.hf.continuation import DEFAULT_WEIGHT, StoredTextContinuation
from memkernels.memory import MemoryModel
from memkernels.memory.lexical import (LEXICAL_K, LEXICAL_MAX_DF, LEXICAL_MIN_SCORE_RATIO,
                                       LEXICAL_PAIR_MAX_DF, LEXICAL_PREFER_WHOLE_RUNS,
                                       Entries)
from memkernels.train import Trainer, TrainConfig

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
OPEN_LM = os.path.join(ASSETS, "open_lm")
OPEN_MEMORY = os.path.join(ASSETS, "open_memory")
MAX_NEW_TOKENS = 12  # the longest answers are 8-9 tokens and a period
# banks of this many facts or more are read through an index (MemoryBank.build_index):
# an exact read of 10,000 facts (~70,000 slots) costs more than the LM's step
INDEX_FROM, INDEX_PROBES = 10_000, 8
# dev runs draw train-split values from seeds this far past the eval runs' seeds
DEV_VALUE_OFFSET = 10 ** 6
LEXICAL = "memory, lexical"  # its condition's name in the tables, then how it selects
LEXICAL_PROMPT = "lexical selection in the prompt"  # the first lexical setting's texts
# the trained memory (--trained-steps): the written bank's slots trained on its statements,
# read over the whole bank and through the first lexical setting's selection
TRAINED, TRAINED_LEXICAL = "trained memory", "trained memory, lexical index"
TRAINED_UP_TO = 1000  # its slots are parameters: Adam keeps two more copies of the bank
# the weight of the conditions decoded with memkernels.hf.StoredTextContinuation
CONTINUATION = DEFAULT_WEIGHT
LENGTH_BUCKETS = ("1 token", "2-3 tokens", "4-6 tokens", "7+ tokens")
SPLITS = {"held-out": dict(relation_split="train"),
          "held-out relations": dict(relation_split="eval"),
          "realistic names": dict(relation_split="train", realistic_names=True),
          "several per subject": dict(relation_split="train", facts_per_subject=3),
          "similar names": dict(relation_split="train", similar_names=True)}


def asked_facts_of(split: str, n: int) -> range:
    """The indices of a split's n facts that questions may ask: all, or in the
    similar-names split every other one (the rest distract)."""
    return range(0, n, 2 if SPLITS[split].get("similar_names") else 1)


def load_open(model_dir: Optional[str], memory_dir: Optional[str]):
    """(model, tokenizer, memory): the shipped open LM and memory by default."""
    model, tokenizer = base_lm.load(model_dir or OPEN_LM)
    return model, tokenizer, MemoryModel.from_pretrained(memory_dir or OPEN_MEMORY)


def prompt_tokens(tokenizer, prompts: Sequence[str]) -> float:
    """The median tokens of the prompts: what the LM processes before answering."""
    return statistics.median(len(tokenizer(p)["input_ids"]) for p in prompts)


def answers(model, tokenizer, statements, questions, memory=None, in_context=False,
            retrieve: int = 0, bank=None) -> tuple[list[str], float]:
    """(greedy answers, prompt_tokens): the LM alone, with all statements in the
    prompt (in_context), with the BM25 top-`retrieve` statements in the prompt,
    or reading `memory`'s `bank` (store() of the statements when not given)."""
    prompts = [qa_prompt(q) for q in questions]
    if in_context:
        prompts = [" ".join(statements) + " " + p for p in prompts]
    if retrieve:
        index = benchmark.BM25Retriever(statements)
        prompts = [" ".join(index.top(q, retrieve)) + " " + p for q, p in zip(questions, prompts)]
    tokens = prompt_tokens(tokenizer, prompts)
    if memory is None:
        return benchmark.answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS), tokens
    if bank is None:
        bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256,
                                progress=False)
    with memkernels.attach(model, memory, bank):
        return (benchmark.answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS),
                tokens)


def continued(texts, weight: float):
    """benchmark.answer's make_logits_processors: StoredTextContinuation over
    `texts` (a bank, or Entries) at `weight`; None at 0."""
    return (lambda: [StoredTextContinuation(texts, weight)]) if weight else None


def lexical_prompt_answers(model, tokenizer, bank, statements, questions, k: int = LEXICAL_K,
                           min_score_ratio: float = LEXICAL_MIN_SCORE_RATIO,
                           max_df: float = LEXICAL_MAX_DF,
                           continuation: float = 0.0) -> tuple[list[str], float]:
    """(greedy answers, prompt_tokens) with the statements the memory's lexical
    index selects for each question (MemoryBank.lexical_choice, the same
    setting) in the LM's prompt, no memory read: the retriever alone;
    continuation: the answers decoded with StoredTextContinuation over the
    selected statements (the same aid as the memory's)."""
    prompts, chosen_texts = [], []
    for q in questions:
        prompt = qa_prompt(q)
        chosen = bank.lexical_choice(tokenizer(prompt)["input_ids"], k, min_score_ratio,
                                     max_df).tolist()
        prompts.append(" ".join([statements[i] for i in chosen] + [prompt]))
        chosen_texts.append(chosen)
    if not continuation:
        return (benchmark.answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS),
                prompt_tokens(tokenizer, prompts))
    got = []
    for prompt, chosen in zip(prompts, chosen_texts):
        texts = Entries.from_texts([bank.entries.text(i) for i in chosen] or [[]],
                                   torch.zeros(0, dtype=torch.long))
        got += benchmark.answer(model, tokenizer, [prompt], max_new_tokens=MAX_NEW_TOKENS,
                                make_logits_processors=continued(texts, continuation))
    return got, prompt_tokens(tokenizer, prompts)


def lexical_condition(k: int, min_score_ratio: float, max_df: float = 1.0,
                      continuation: float = 0.0) -> str:
    """The lexical condition's name in the tables."""
    name = (f"{LEXICAL} top-{k}" + (f", >= {min_score_ratio:g} x best" if min_score_ratio else "")
            + (f", words in <= {max_df:g} of texts" if max_df < 1.0 else ""))
    return with_continuation(name, continuation)


def with_continuation(condition: str, continuation: float) -> str:
    """A condition's name when decoded with StoredTextContinuation (weight > 0)."""
    return f"{condition}, continuation {continuation:g}" if continuation else condition


def lexical_answers(model, tokenizer, memory, bank, questions, k: int = LEXICAL_K,
                    min_score_ratio: float = LEXICAL_MIN_SCORE_RATIO,
                    max_df: float = LEXICAL_MAX_DF,
                    latency_questions: int = 16,
                    continuation: float = 0.0) -> tuple[list[str], dict]:
    """Greedy answers reading, per question, only the stored facts that
    share the most words with it (MemoryBank.lexical_select: BM25 over the
    stored texts' words in front of the dense read; at most k, those scoring at least
    min_score_ratio x the best, on the words at most max_df of the texts
    hold), and the paired cost per question (the selection included) against
    the same question with the reads off; continuation: decoded with
    StoredTextContinuation over the selected texts at that weight."""
    got, ratios, times, slots = [], [], [], []
    # the index and the slot table are built on a bank's first selection: once,
    # here, outside the timed questions, and timed apart (a bank already
    # selected from keeps them: call this first)
    start = time.perf_counter()
    bank.lexical_select(tokenizer(qa_prompt(questions[0]))["input_ids"], k, min_score_ratio, max_df)
    build_seconds = time.perf_counter() - start
    with memkernels.attach(model, memory, None) as handle:
        for i, q in enumerate(questions):
            prompt = qa_prompt(q)
            start = time.perf_counter()
            selected = bank.lexical_select(tokenizer(prompt)["input_ids"], k, min_score_ratio,
                                           max_df)
            # the facts' slots, as memory_costs counts them (not the null slots)
            slots.append(int(selected.slot_mask().sum()) - memory.config.append.null_slots)
            with handle.using(selected):
                got += benchmark.answer(model, tokenizer, [prompt],
                                        max_new_tokens=MAX_NEW_TOKENS,
                                        make_logits_processors=continued(selected, continuation))
            if i < latency_questions:
                times.append(time.perf_counter() - start)
                with handle.reads_disabled():
                    base_start = time.perf_counter()
                    benchmark.answer(model, tokenizer, [prompt], max_new_tokens=MAX_NEW_TOKENS)
                    ratios.append(times[-1] / (time.perf_counter() - base_start) - 1)
    return got, dict(seconds_per_question=statistics.median(times),
                     read_cost=statistics.median(ratios), lexical_k=k,
                     lexical_min_score_ratio=min_score_ratio, lexical_max_df=max_df,
                     lexical_index_build_s=build_seconds,
                     prompt_tokens=prompt_tokens(tokenizer, [qa_prompt(q) for q in questions]),
                     slots_read=statistics.median(slots), continuation=continuation)


def trained_bank(model, tokenizer, memory, bank, facts, statements, steps: int,
                 lr: float = benchmark.TRAINED_LR, batch: int = 16, seed: int = 0):
    """(the trained memory's bank, its training info): `bank` (store() of
    `statements`, the facts' in that order) with its slots then trained for
    `steps` on those statements, as a user who has the texts would (a
    statement a row, its object and what follows it scored: what a question
    asks for), the LM and the memory frozen (Trainer(bank=...); the copy rule
    moves the addresses only, MemoryModel.fixed_bank_heads). Never on a
    question. It keeps the bank's stored texts, so the lexical index reads
    it as it reads the written bank."""
    rows = [tasks.object_scored(tokenizer, statement, fact.object)
            for fact, statement in zip(facts, statements)]

    def make_batch(step: int, rank: int):
        rng = random.Random(seed * 1_000_003 + step)
        return tasks.lm_batch([rng.choice(rows) for _ in range(batch)], tokenizer.pad_token_id)

    start = time.perf_counter()
    trainer = Trainer(model, memory, make_batch,
                      TrainConfig(steps=steps, lr=lr, seed=seed, warmup=min(50, steps),
                                  progress=False), bank=bank)
    try:
        history = trainer.train()["history"]
    finally:
        trainer.close()  # the LM unhooked and the memory given back, whatever happened
    tail_losses = [h["loss"] for h in history[-20:]]
    return trainer.bank, dict(trained_steps=steps, trained_lr=lr,
                              trained_seconds=time.perf_counter() - start,
                              trained_first_loss=history[0]["loss"],
                              trained_final_loss=statistics.mean(tail_losses))


def length_bucket(tokenizer, answer: str) -> str:
    """The answer's LENGTH_BUCKETS bucket: its tokens after a space."""
    n = len(tokenizer(f" {answer}")["input_ids"])
    return LENGTH_BUCKETS[0 if n == 1 else 1 if n <= 3 else 2 if n <= 6 else 3]


def memory_costs(model, tokenizer, memory, statements, questions, latency_questions: int = 16,
                 index_probes: int = 0):
    """(bank, dict of store facts/s, bank bytes per fact, median seconds per
    question and the paired cost of the reads). index_probes > 0: the bank
    is read through an index (MemoryBank.build_index, that many probes),
    built here and counted in the store time."""
    start = time.perf_counter()
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256, progress=False)
    if index_probes:
        bank.build_index(probes=index_probes)
        bank.keys_values()  # the index is built lazily: here, inside the store time
    seconds = time.perf_counter() - start
    mem = bank.mem
    written = int(bank.slot_mask().sum()) - memory.config.append.null_slots
    slot_bytes = mem.shape[1] * mem.shape[3] * mem.element_size()
    # the slots the facts took (a bank has at least num_slots: the rest stays empty)
    costs = dict(store_facts_per_s=len(statements) / seconds, index_probes=index_probes,
                 bank_bytes_per_fact=written * slot_bytes / len(statements),
                 slots_per_fact=written / len(statements),
                 slots_read=None if index_probes else written)
    with memkernels.attach(model, memory, bank) as handle:
        prompts = [qa_prompt(q) for q in questions[:latency_questions]]
        median, cost = benchmark.per_query_latency(model, tokenizer, prompts,
                                                   reps=latency_questions, handle=handle)
    costs.update(seconds_per_question=median, read_cost=cost)
    return bank, costs


def run(n_facts: list[int], model_dir: Optional[str] = None, memory_dir: Optional[str] = None,
        seed: int = 0, questions: int = 300, splits: Optional[list[str]] = None,
        phrasings: str = "eval", index_from: int = INDEX_FROM, index_probes: int = INDEX_PROBES,
        other_splits_up_to: Optional[int] = None, read_scale: Optional[float] = None,
        store_threshold: Optional[float] = None,
        lexical: Sequence[tuple[int, float, float]] = (
            (LEXICAL_K, LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF),),
        dev_names: bool = False, continuation: float = CONTINUATION,
        trained_steps: int = 0, trained_up_to: Optional[int] = TRAINED_UP_TO,
        log=print) -> list[dict]:
    """Rows of accuracy (and the memory's costs) per split, condition, N and
    answer length. phrasings="train" asks held-out facts with trained
    phrasings (a diagnosis of what held-out phrasings cost, not a result);
    "dev" asks with the dev phrasings (for tuning; see open_facts). Banks
    of index_from facts or more are read through an index (index_probes).
    other_splits_up_to: above that N, only the "held-out" split runs.
    read_scale: the memory reads at cosine x read_scale (set_read_scale; for
    tuning on dev), else at its saved scale. store_threshold: store() keeps the
    slots the store gate gives at least this (set_store_threshold; for tuning
    on dev), else the memory's saved threshold. lexical: (k, min_score_ratio,
    max_df) of each lexical condition (MemoryBank.lexical_select), on the
    same banks and questions. continuation > 0: each lexical condition, and
    the first one's statements in the prompt, again decoded with
    StoredTextContinuation at that weight. trained_steps > 0: the trained
    memory too (trained_bank), at N <= trained_up_to (None: every N)."""
    names = [lexical_condition(*setting) for setting in lexical]
    if len(set(names)) != len(names):
        raise ValueError(f"lexical: each (k, min_score_ratio, max_df) at most once, got "
                         f"{list(lexical)}")
    model, tokenizer, memory = load_open(model_dir, memory_dir)
    if read_scale is not None:
        memory.set_read_scale(read_scale)
    if store_threshold is not None:
        memory.set_store_threshold(store_threshold)
    rng = random.Random(seed)
    # dev phrasings tune the memory's training: their facts draw train-split
    # subjects and objects (fresh words all the same), so that tuning never
    # touches an eval value
    value_split, value_offset = ("train", DEV_VALUE_OFFSET) if phrasings == "dev" else ("eval", 0)
    if dev_names and phrasings != "dev":
        raise ValueError("dev_names draws the realistic names of the dev phrasings' facts: "
                         "use phrasings='dev'")
    name_split = "dev" if dev_names else None
    rows = []

    def record(split, condition, n, facts, got, extra=None):
        right = [g == f.object for g, f in zip(got, facts)]
        groups = {"all": right}
        for r, f in zip(right, facts):
            groups.setdefault(length_bucket(tokenizer, f.object), []).append(r)
        for group, values in groups.items():
            row = dict(split=split, condition=condition, n_facts=n, answers=group,
                       phrasings=phrasings,
                       questions=len(values), accuracy=statistics.mean(values),
                       **((extra or {}) if group == "all" else {}))
            rows.append(row)
            log(f"{split:20s} {condition:16s} N={n:6d} {group:10s} ({len(values):3d} q): "
                f"{100 * row['accuracy']:5.1f}%")

    for n in n_facts:
        # small N: several independent sets of n facts (each its own bank and
        # prompt), so that a cell still has min(questions, 100) questions
        draws = max(1, min(questions, 100) // n)
        for split in splits or list(SPLITS):
            if split != "held-out" and other_splits_up_to is not None and n > other_splits_up_to:
                continue
            got: dict[str, list] = {}
            tokens: dict[str, list] = {}  # per condition, each draw's median prompt tokens
            asked_facts, all_costs = [], []
            all_lexical_costs: dict[str, list] = {}
            for d in range(draws):
                try:
                    facts = open_facts.make_open_facts(n, seed=seed + n + 7919 * d + value_offset,
                                                       split=value_split, name_split=name_split,
                                                       **SPLITS[split])
                except ValueError as e:  # the real names run out before 10,000 subjects
                    log(f"{split:20s} N={n}: skipped ({e})")
                    break
                statements = [f.statement(rng, phrasings) for f in facts]
                askable = asked_facts_of(split, len(facts))
                asked = rng.sample(askable, min(questions, len(askable)))
                qs, fs = [facts[i].question(rng, phrasings) for i in asked], [facts[i] for i in asked]
                asked_facts += fs
                bank, costs = memory_costs(model, tokenizer, memory, statements, qs,
                                           latency_questions=max(1, 16 // draws),
                                           index_probes=index_probes if n >= index_from else 0)
                all_costs.append(costs)
                runs = {"written memory": dict(memory=memory, bank=bank), "BM25 top-3": dict(retrieve=3)}
                if n == n_facts[0]:
                    runs["LM alone"] = {}
                if n <= 10:
                    runs["facts in context"] = dict(in_context=True)
                for condition, kwargs in runs.items():
                    got_condition, condition_tokens = answers(model, tokenizer, statements, qs,
                                                              **kwargs)
                    got.setdefault(condition, []).extend(got_condition)
                    tokens.setdefault(condition, []).append(condition_tokens)
                for k, ratio, max_df in lexical:
                    for weight in (0.0, continuation) if continuation else (0.0,):
                        name = lexical_condition(k, ratio, max_df, weight)
                        got_lexical, lexical_costs = lexical_answers(
                            model, tokenizer, memory, bank, qs, k, ratio, max_df,
                            max(1, 16 // draws), weight)
                        got.setdefault(name, []).extend(got_lexical)
                        all_lexical_costs.setdefault(name, []).append(lexical_costs)
                # after lexical_answers: its first selection builds (and times) the index
                for weight in (0.0, continuation) if continuation else (0.0,):
                    name = with_continuation(LEXICAL_PROMPT, weight)
                    got_prompt, prompt_tokens_ = lexical_prompt_answers(
                        model, tokenizer, bank, statements, qs, *lexical[0], weight)
                    got.setdefault(name, []).extend(got_prompt)
                    tokens.setdefault(name, []).append(prompt_tokens_)
                if trained_steps and (trained_up_to is None or n <= trained_up_to):
                    trained, info = trained_bank(model, tokenizer, memory, bank, facts,
                                                 statements, trained_steps, seed=seed + d)
                    log(f"{split:20s} N={n}: trained the bank in {info['trained_seconds']:.0f} s, "
                        f"loss {info['trained_first_loss']:.3f} -> "
                        f"{info['trained_final_loss']:.3f}")
                    got_trained, trained_tokens = answers(model, tokenizer, statements, qs,
                                                          memory=memory, bank=trained)
                    got.setdefault(TRAINED, []).extend(got_trained)
                    tokens.setdefault(TRAINED, []).append(trained_tokens)
                    got_trained, trained_costs = lexical_answers(
                        model, tokenizer, memory, trained, qs, *lexical[0],
                        latency_questions=max(1, 16 // draws))
                    got.setdefault(TRAINED_LEXICAL, []).extend(got_trained)
                    all_lexical_costs.setdefault(TRAINED_LEXICAL, []).append(
                        {**trained_costs, **info})
            if not all_costs:
                continue
            costs = {k: _median_or_none([c[k] for c in all_costs]) for k in all_costs[0]}
            log(f"{split:20s} N={n}: store {costs['store_facts_per_s']:.0f} facts/s, "
                f"{costs['bank_bytes_per_fact']:.0f} bank bytes/fact, "
                f"{1e3 * costs['seconds_per_question']:.1f} ms/question, reads "
                f"{100 * costs['read_cost']:+.0f}%")
            lexical_costs = {name: {k: statistics.median(c[k] for c in per_draw)
                                    for k in per_draw[0]}
                             for name, per_draw in all_lexical_costs.items()}
            for name, c in lexical_costs.items():
                log(f"{split:20s} N={n}: {name}: {1e3 * c['seconds_per_question']:.1f} "
                    f"ms/question, reads and selection {100 * c['read_cost']:+.0f}%")
            for condition, values in got.items():
                extra = dict(costs if condition == "written memory"
                             else lexical_costs.get(condition, {}))
                if condition == TRAINED:  # the whole trained bank: the written bank's slots
                    extra["slots_read"] = costs["slots_read"]
                if condition in tokens:
                    extra["prompt_tokens"] = statistics.median(tokens[condition])
                if condition.startswith(LEXICAL_PROMPT):
                    extra.update(lexical_k=lexical[0][0], lexical_min_score_ratio=lexical[0][1],
                                 lexical_max_df=lexical[0][2],
                                 continuation=continuation if condition != LEXICAL_PROMPT
                                 else 0.0)
                record(split, condition, n, asked_facts, values, extra)
    return rows


def _median_or_none(values):
    return None if any(v is None for v in values) else statistics.median(values)


def _conditions(rows: list[dict]) -> list[str]:
    """The conditions in the tables' and the plot's order."""
    lexical = sorted({r["condition"] for r in rows if r["condition"].startswith(LEXICAL)})
    prompt = sorted({r["condition"] for r in rows if r["condition"].startswith(LEXICAL_PROMPT)})
    trained = [c for c in (TRAINED, TRAINED_LEXICAL) if any(r["condition"] == c for r in rows)]
    return ["LM alone", "facts in context", "BM25 top-3", *(prompt or [LEXICAL_PROMPT]),
            "written memory", *lexical, *trained]


def markdown(rows: list[dict]) -> str:
    """The results as tables: accuracy by split, condition and N (all
    answers), by answer length for the memory, and the memory's costs."""
    ns = sorted({r["n_facts"] for r in rows})
    conditions = _conditions(rows)
    lines = []
    for split in [s for s in SPLITS if any(r["split"] == s for r in rows)]:
        lines += [f"**{split}**", "", "| condition | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---" * (len(ns) + 1) + "|"]
        for condition in conditions:
            cells = []
            for n in ns:
                hit = [r for r in rows if (r["split"], r["condition"], r["n_facts"], r["answers"])
                       == (split, condition, n, "all")]
                cells.append(f"{100 * hit[-1]['accuracy']:.1f}%" if hit else "-")
            lines.append(f"| {condition} | " + " | ".join(cells) + " |")
        lexical_readers = [c for c in conditions if c.startswith(LEXICAL)]
        readers = [("memory", "written memory")] + [
            ("lexical", c) for c in lexical_readers if "continuation" not in c][:1] + [
            ("lexical, continuation", c) for c in lexical_readers if "continuation" in c][:1]
        for short, condition in readers:
            for bucket in LENGTH_BUCKETS:
                cells = []
                for n in ns:
                    hit = [r for r in rows if (r["split"], r["condition"], r["n_facts"],
                                               r["answers"]) == (split, condition, n, bucket)]
                    cells.append(f"{100 * hit[-1]['accuracy']:.1f}% ({hit[-1]['questions']})"
                                 if hit else "-")
                lines.append(f"| {short}, answers of {bucket} | " + " | ".join(cells) + " |")
        for condition in conditions:
            cells = []
            for n in ns:
                hit = [r for r in rows if (r["split"], r["condition"], r["n_facts"], r["answers"])
                       == (split, condition, n, "all") and r.get("prompt_tokens") is not None]
                slots = hit[-1].get("slots_read") if hit else None
                read = (f" + {slots:.0f} slots" if slots is not None
                        else " + index" if hit and hit[-1].get("index_probes") else "")
                cells.append(f"{hit[-1]['prompt_tokens']:.0f}{read}" if hit else "-")
            lines.append(f"| tokens processed: {condition} | " + " | ".join(cells) + " |")
        costs = {r["n_facts"]: r for r in rows if r["split"] == split
                 and r["condition"] == "written memory" and r["answers"] == "all"}
        lines.append("| memory: bank bytes per fact | " + " | ".join(
            f"{costs[n]['bank_bytes_per_fact']:.0f}" if n in costs else "-" for n in ns) + " |")
        lines.append("| memory: store, facts/s | " + " | ".join(
            f"{costs[n]['store_facts_per_s']:.0f}" if n in costs else "-" for n in ns) + " |")
        lines.append("| memory: cost per question, paired | " + " | ".join(
            f"{100 * costs[n]['read_cost']:+.0f}%" if n in costs else "-" for n in ns) + " |")
        indexed = [c for c in conditions if c.startswith(LEXICAL) or c == TRAINED_LEXICAL]
        for condition in indexed:
            lexical = {r["n_facts"]: r for r in rows if r["split"] == split
                       and r["condition"] == condition and r["answers"] == "all"}
            lines.append(f"| {condition}: cost per question, paired | " + " | ".join(
                f"{100 * lexical[n]['read_cost']:+.0f}%" if n in lexical else "-"
                for n in ns) + " |")
            if "continuation" in condition:  # the same index, built by the condition before
                continue
            lines.append(f"| {condition}: index build, s | " + " | ".join(
                f"{lexical[n]['lexical_index_build_s']:.2f}"
                if n in lexical and "lexical_index_build_s" in lexical[n] else "-"
                for n in ns) + " |")
        trained = {r["n_facts"]: r for r in rows if r["split"] == split
                   and r["condition"] == TRAINED_LEXICAL and r["answers"] == "all"}
        if trained:
            lines.append("| trained memory: training, statement loss first -> last | " +
                         " | ".join(f"{trained[n]['trained_seconds']:.0f} s, "
                                    f"{trained[n]['trained_first_loss']:.4f} -> "
                                    f"{trained[n]['trained_final_loss']:.4f}"
                                    if n in trained else "-" for n in ns) + " |")
        lines.append("| memory: read | " + " | ".join(
            (f"index, {costs[n]['index_probes']} probes" if costs[n].get("index_probes")
             else "exact") if n in costs else "-" for n in ns) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against N, one panel per split, a line per condition."""
    import matplotlib  # optional dependency (the [recall] extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after the backend is chosen)
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.6), squeeze=False,
                             sharey=True)
    conditions = _conditions(rows)
    several = sum(c.startswith(LEXICAL) for c in conditions) > 1  # then each its full name
    for ax, split in zip(axes[0], splits):
        for condition in conditions:
            pts = sorted((r["n_facts"], r["accuracy"]) for r in rows if r["split"] == split
                         and r["condition"] == condition and r["answers"] == "all")
            if pts:
                label = ("memory through its lexical index"
                         if condition.startswith(LEXICAL) and not several
                         else "memory, whole bank" if condition == "written memory"
                         else condition)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "-o", markersize=3,
                        label=label)
        ax.set_xscale("log")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("facts stored (N)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match, %")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(jsonl: str, commit: str, path: str) -> None:
    """plot() again from the eval rows one run (its commit) appended to jsonl."""
    with open(jsonl) as f:
        rows = [r for r in map(json.loads, f) if r.get("commit") == commit
                and r.get("phrasings") == "eval"]
    if not rows:
        raise ValueError(f"no eval rows of commit {commit!r} in {jsonl}")
    plot(rows, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF causal LM directory (default: open LM)")
    ap.add_argument("--memory", default=None, help="written memory directory (default: shipped)")
    ap.add_argument("--facts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--splits", nargs="+", choices=list(SPLITS), default=None)
    ap.add_argument("--phrasings", choices=open_facts.PHRASING_SPLITS, default="eval",
                    help="held-out phrasings (eval: the benchmark), the dev split (held out as "
                         "well, for tuning the memory's training, with train-split subjects "
                         "and objects) or trained ones (a diagnosis)")
    ap.add_argument("--dev-names", action="store_true",
                    help="with --phrasings dev: the realistic names from real names no training "
                         "draws (open_facts.DEV_REAL_FIRST_NAMES, as many as eval has), not the "
                         "train split's, which the memory's pre-training draws")
    ap.add_argument("--index-from", type=int, default=INDEX_FROM, metavar="N",
                    help="banks of N facts or more are read through an index (build_index)")
    ap.add_argument("--index-probes", type=int, default=INDEX_PROBES,
                    help="clusters each query reads through the index")
    ap.add_argument("--other-splits-up-to", type=int, default=10_000, metavar="N",
                    help="above N facts, only the held-out split runs (a 100,000-fact cell "
                         "takes minutes per split)")
    ap.add_argument("--read-scale", type=float, default=None,
                    help="the memory reads at cosine x this (default: its saved scale)")
    ap.add_argument("--store-threshold", type=float, default=None,
                    help="store() keeps the slots its gate gives at least this (default: the "
                         "memory's saved threshold)")
    ap.add_argument("--lexical-k", type=int, nargs="+", default=[LEXICAL_K],
                    help="the most stored facts a question reads in the lexical-index "
                         "condition (several: a condition for each, with --lexical-ratio)")
    ap.add_argument("--lexical-ratio", type=float, nargs="+", default=[LEXICAL_MIN_SCORE_RATIO],
                    help="... those scoring at least this x the best (0: always k); one, or "
                         "one per --lexical-k")
    ap.add_argument("--lexical-max-df", type=float, nargs="+", default=[LEXICAL_MAX_DF],
                    help="... scored on the question's words that at most this share of the "
                         "stored texts hold (1: all words); one, or one per --lexical-k")
    ap.add_argument("--continuation", type=float, default=CONTINUATION, metavar="W",
                    help="each lexical condition (and the selection in the prompt) again, "
                         "decoded with memkernels.hf.StoredTextContinuation at weight W: a copy "
                         "that continues a stored text keeps to it (0: not run)")
    ap.add_argument("--trained-steps", type=int, default=0, metavar="S",
                    help="the trained memory too: each written bank's slots trained S steps on "
                         "its statements (batch 16, lr benchmark.TRAINED_LR; 0: not run; the "
                         "closed-list benchmark's is 300), read over the whole bank and through "
                         "the first lexical setting")
    ap.add_argument("--trained-up-to", type=int, default=TRAINED_UP_TO, metavar="N",
                    help="the trained memory at N <= this only (its slots are parameters: "
                         "Adam keeps two more copies of the bank)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", metavar="COMMIT", default=None,
                    help="no run: draw OUT/open_recall.png again from the eval rows that the "
                         "run at COMMIT appended to OUT/open-recall-cpu.jsonl")
    args = ap.parse_args(argv)
    if args.replot:
        if not args.out:
            ap.error("--replot needs --out (the folder of open-recall-cpu.jsonl)")
        replot(os.path.join(args.out, "open-recall-cpu.jsonl"), args.replot,
               os.path.join(args.out, "open_recall.png"))
        return
    torch.manual_seed(args.seed)
    if args.dev_names and args.phrasings != "dev":
        ap.error("--dev-names goes with --phrasings dev")
    if not 0.0 <= args.continuation <= 1.0:
        ap.error(f"--continuation takes a weight in [0, 1], got {args.continuation}")
    if args.index_probes < 1:
        ap.error(f"--index-probes must be >= 1, got {args.index_probes}")
    if args.trained_steps < 0:
        ap.error(f"--trained-steps must be >= 0, got {args.trained_steps}")
    if args.store_threshold is not None and not 0.0 < args.store_threshold < 1.0:
        ap.error(f"--store-threshold must be in (0, 1), got {args.store_threshold}")
    if any(k < 1 for k in args.lexical_k):
        ap.error(f"--lexical-k must be >= 1, got {args.lexical_k}")
    if not all(0.0 <= r <= 1.0 for r in args.lexical_ratio):
        ap.error(f"--lexical-ratio must be in [0, 1], got {args.lexical_ratio}")
    if len(args.lexical_ratio) not in (1, len(args.lexical_k)):
        ap.error(f"--lexical-ratio: one value or one per --lexical-k ({len(args.lexical_k)}), "
                 f"got {len(args.lexical_ratio)}")
    if not all(0.0 < m <= 1.0 for m in args.lexical_max_df):
        ap.error(f"--lexical-max-df must be in (0, 1], got {args.lexical_max_df}")
    if len(args.lexical_max_df) not in (1, len(args.lexical_k)):
        ap.error(f"--lexical-max-df: one value or one per --lexical-k ({len(args.lexical_k)}), "
                 f"got {len(args.lexical_max_df)}")
    ratios = args.lexical_ratio * (len(args.lexical_k) if len(args.lexical_ratio) == 1 else 1)
    max_dfs = args.lexical_max_df * (len(args.lexical_k) if len(args.lexical_max_df) == 1 else 1)
    lexical = list(zip(args.lexical_k, ratios, max_dfs))
    settings = [lexical_condition(*setting) for setting in lexical]
    if len(set(settings)) != len(settings):
        ap.error(f"--lexical-k / --lexical-ratio / --lexical-max-df: each setting at most once, "
                 f"got {settings}")
    # the commit the run starts from (a commit made while it runs is not its code)
    machine = machine_info(torch.device("cpu"))
    rows = run(args.facts, args.model, args.memory, args.seed, args.questions, args.splits,
               args.phrasings, args.index_from, args.index_probes, args.other_splits_up_to,
               args.read_scale, args.store_threshold, lexical, args.dev_names,
               args.continuation, args.trained_steps, args.trained_up_to)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        info = {**machine, "model": args.model or "shipped open LM",
                "memory": args.memory or "shipped open memory", "read_scale": args.read_scale,
                "store_threshold": args.store_threshold, "dev_names": args.dev_names,
                "continuation": args.continuation,
                # the lexical selection's settings that no flag sets
                "lexical_pair_max_df": LEXICAL_PAIR_MAX_DF,
                "lexical_prefer_whole_runs": LEXICAL_PREFER_WHOLE_RUNS}
        append_jsonl(os.path.join(args.out, "open-recall-cpu.jsonl"), rows, info)
        name = ("open_recall.md" if args.phrasings == "eval"
                else f"open_recall_{args.phrasings}_phrasings.md")
        with open(os.path.join(args.out, name), "w") as f:
            f.write(f"# Open-vocabulary recall\n\n`python -m memkernels.apps.recall.open_recall "
                    f"{shlex.join(argv if argv is not None else sys.argv[1:])}` on {info['cpu']}; "
                    f"exact match, {args.questions} questions per cell at most (per answer "
                    f"length: the count in brackets).\n\n{markdown(rows)}")
        if args.phrasings == "eval":
            plot(rows, os.path.join(args.out, "open_recall.png"))


if __name__ == "__main__":
    main()
