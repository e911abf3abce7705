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
- "several per subject": 3 facts per subject (a person with a home town, a
  spouse and a birthday...): the memory must tell the relations apart;
and within each, answers of 1 / 2-3 / 4+ tokens (in the model's tokenizer).
Statements and questions use held-out phrasings, the question's never the
statement's. Conditions: the LM alone (first N only), the facts in its prompt
(N <= 10), the BM25 top-3 statements in its prompt, the written memory
(store() then questions). Exact match of the greedy answer up to its first
period. For the memory, per N: store throughput (facts/s), bank bytes per
fact, and the median cost of a question (batch 1, paired with the same
question with reads off). With --out, rows are appended to
DIR/open-recall-cpu.jsonl.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Optional

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.apps.recall import benchmark, open_facts
from memkernels.apps.recall.facts import qa_prompt
from memkernels.memory import MemoryModel

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
OPEN_LM = os.path.join(ASSETS, "open_lm")
OPEN_MEMORY = os.path.join(ASSETS, "open_memory")
MAX_NEW_TOKENS = 12  # the longest answers are 8-9 tokens and a period
SPLITS = {"held-out": dict(relation_split="train"),
          "held-out relations": dict(relation_split="eval"),
          "several per subject": dict(relation_split="train", facts_per_subject=3)}


def load_open(model_dir: Optional[str], memory_dir: Optional[str]):
    """(model, tokenizer, memory): the shipped open LM and memory by default."""
    from memkernels.apps.recall import base_lm
    model, tokenizer = base_lm.load(model_dir or OPEN_LM)
    return model, tokenizer, MemoryModel.from_pretrained(memory_dir or OPEN_MEMORY)


def answers(model, tokenizer, statements, questions, memory=None, in_context=False,
            retrieve: int = 0, bank=None) -> list[str]:
    """Greedy answers: the LM alone, with all statements in the prompt
    (in_context), with the BM25 top-`retrieve` statements in the prompt, or
    reading `memory`'s `bank` (store() of the statements when not given)."""
    prompts = [qa_prompt(q) for q in questions]
    if in_context:
        prompts = [" ".join(statements) + " " + p for p in prompts]
    if retrieve:
        index = benchmark.BM25Retriever(statements)
        prompts = [" ".join(index.top(q, retrieve)) + " " + p for q, p in zip(questions, prompts)]
    if memory is None:
        return benchmark.answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    if bank is None:
        bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256,
                                progress=False)
    with memkernels.attach(model, memory, bank):
        return benchmark.answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)


def length_bucket(tokenizer, answer: str) -> str:
    n = len(tokenizer(f" {answer}")["input_ids"])
    return "1 token" if n == 1 else "2-3 tokens" if n <= 3 else "4+ tokens"


def memory_costs(model, tokenizer, memory, statements, questions, latency_questions: int = 16):
    """(bank, dict of store facts/s, bank bytes per fact, median seconds per
    question and the paired cost of the reads)."""
    start = time.perf_counter()
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256, progress=False)
    seconds = time.perf_counter() - start
    mem = bank.mem
    costs = dict(store_facts_per_s=len(statements) / seconds,
                 bank_bytes_per_fact=mem.numel() * mem.element_size() / len(statements),
                 slots=bank.num_slots)
    with memkernels.attach(model, memory, bank) as handle:
        prompts = [qa_prompt(q) for q in questions[:latency_questions]]
        median, cost = benchmark.per_query_latency(model, tokenizer, prompts,
                                                   reps=latency_questions, handle=handle)
    costs.update(seconds_per_question=median, read_cost=cost)
    return bank, costs


def run(n_facts: list[int], model_dir: Optional[str] = None, memory_dir: Optional[str] = None,
        seed: int = 0, questions: int = 300, splits: Optional[list[str]] = None,
        log=print) -> list[dict]:
    model, tokenizer, memory = load_open(model_dir, memory_dir)
    rng = random.Random(seed)
    rows = []

    def record(split, condition, n, facts, got, extra=None):
        right = [g == f.object for g, f in zip(got, facts)]
        groups = {"all": right}
        for r, f in zip(right, facts):
            groups.setdefault(length_bucket(tokenizer, f.object), []).append(r)
        for group, values in groups.items():
            row = dict(split=split, condition=condition, n_facts=n, answers=group,
                       questions=len(values), accuracy=statistics.mean(values),
                       **((extra or {}) if group == "all" else {}))
            rows.append(row)
            log(f"{split:20s} {condition:16s} N={n:6d} {group:10s} ({len(values):3d} q): "
                f"{100 * row['accuracy']:5.1f}%")

    for n in n_facts:
        for split in splits or list(SPLITS):
            facts = open_facts.make_open_facts(n, seed=seed + n, **SPLITS[split])
            statements = [f.statement(rng, "eval") for f in facts]
            asked = rng.sample(range(len(facts)), min(questions, len(facts)))
            qs, fs = [facts[i].question(rng, "eval") for i in asked], [facts[i] for i in asked]
            bank, costs = memory_costs(model, tokenizer, memory, statements, qs)
            log(f"{split:20s} N={n}: store {costs['store_facts_per_s']:.0f} facts/s, "
                f"{costs['bank_bytes_per_fact']:.0f} bank bytes/fact, "
                f"{1e3 * costs['seconds_per_question']:.1f} ms/question, reads "
                f"{100 * costs['read_cost']:+.0f}%")
            record(split, "written memory", n, fs,
                   answers(model, tokenizer, statements, qs, memory=memory, bank=bank), costs)
            if n == n_facts[0]:
                record(split, "LM alone", n, fs, answers(model, tokenizer, statements, qs))
            if n <= 10:
                record(split, "facts in context", n, fs,
                       answers(model, tokenizer, statements, qs, in_context=True))
            record(split, "BM25 top-3", n, fs,
                   answers(model, tokenizer, statements, qs, retrieve=3))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF causal LM directory (default: open LM)")
    ap.add_argument("--memory", default=None, help="written memory directory (default: shipped)")
    ap.add_argument("--facts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--splits", nargs="+", choices=list(SPLITS), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = run(args.facts, args.model, args.memory, args.seed, args.questions, args.splits)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        info = {**machine_info(torch.device("cpu")), "model": args.model or "shipped open LM",
                "memory": args.memory or "shipped open memory"}
        append_jsonl(os.path.join(args.out, "open-recall-cpu.jsonl"), rows, info)


if __name__ == "__main__":
    main()
