"""Open-vocabulary recall: a frozen LM and a written memory on facts whose
subjects, objects, relations and phrasings come from held-out splits of the
open generators (open_facts), beside the closed-list facts of the recall
benchmark.

    python -m memkernels.apps.recall.open_recall [--model DIR] [--memory DIR]
        [--facts 100 1000] [--out DIR]

Defaults: the shipped base LM and written memory (trained on closed lists:
the gap the open-vocabulary memory has to close). Conditions: the LM alone,
the facts in its prompt (N=10), the BM25 top-3 statements in its prompt, the
written memory (store() then questions).
Splits, reported apart: relations seen in the memory's training or held out,
and answers of 1 / 2-3 / 4+ tokens (in the model's tokenizer). Statements and
questions use held-out phrasings. Exact match of the greedy answer up to its
first period. With --out, rows are appended to DIR/open-recall-cpu.jsonl.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
from typing import Optional

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.apps.recall import base_lm, benchmark, open_facts
from memkernels.apps.recall.facts import make_facts, qa_prompt
from memkernels.memory import MemoryModel

INDEX_MIN_SLOTS = benchmark.INDEX_MIN_SLOTS


def answers(model, tokenizer, statements, questions, memory=None, in_context=False,
            retrieve: int = 0) -> list[str]:
    """Greedy answers: the LM alone, with all statements in the prompt
    (in_context), with the BM25 top-`retrieve` statements in the prompt, or
    reading `memory` after store() of the statements."""
    prompts = [qa_prompt(q) for q in questions]
    if in_context:
        prompts = [" ".join(statements) + " " + p for p in prompts]
    if retrieve:
        index = benchmark.BM25Retriever(statements)
        prompts = [" ".join(index.top(q, retrieve)) + " " + p for q, p in zip(questions, prompts)]
    if memory is None:
        return benchmark.answer(model, tokenizer, prompts, max_new_tokens=16)
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256, progress=False)
    if bank.num_slots >= INDEX_MIN_SLOTS:
        bank.build_index(probes=benchmark.INDEX_PROBES)
    with memkernels.attach(model, memory, bank):
        return benchmark.answer(model, tokenizer, prompts, max_new_tokens=16)


def length_bucket(tokenizer, answer: str) -> str:
    n = len(tokenizer(f" {answer}")["input_ids"])
    return "1 token" if n == 1 else "2-3 tokens" if n <= 3 else "4+ tokens"


def run(n_facts: list[int], model_dir: Optional[str] = None, memory_dir: Optional[str] = None,
        seed: int = 0, questions: int = 300, log=print) -> list[dict]:
    model, tokenizer = base_lm.load(model_dir)
    memory = MemoryModel.from_pretrained(memory_dir or benchmark.WRITTEN_MEMORY)
    rng = random.Random(seed)
    rows = []

    def record(world, condition, split, facts, got):
        right = [g == f.object for g, f in zip(got, facts)]
        groups = {"all": right}
        if world != "closed":
            for r, f in zip(right, facts):
                groups.setdefault(length_bucket(tokenizer, f.object), []).append(r)
        for group, values in groups.items():
            row = dict(world=world, condition=condition, relations=split, n_facts=n,
                       answers=group, questions=len(values), accuracy=statistics.mean(values))
            rows.append(row)
            log(f"{world:6s} {condition:18s} relations {split:5s} N={n:5d} {group:10s} "
                f"({len(values):3d} q): {100 * row['accuracy']:5.1f}%")

    for n in n_facts:
        closed, _ = make_facts(n, seed=seed)
        worlds = {("closed", "seen"): (closed, [f.statement(rng) for f in closed],
                                       lambda f: f.question(rng))}
        for split in ("train", "eval"):
            facts = open_facts.make_open_facts(n, seed=seed + 1, relation_split=split)
            worlds[("open", "seen" if split == "train" else "held")] = (
                facts, [f.statement(rng, "eval") for f in facts], lambda f: f.question(rng, "eval"))
        for (world, split), (facts, statements, ask) in worlds.items():
            asked = rng.sample(range(len(facts)), min(questions, len(facts)))
            qs, fs = [ask(facts[i]) for i in asked], [facts[i] for i in asked]
            record(world, "written memory", split, fs,
                   answers(model, tokenizer, statements, qs, memory=memory))
            if n == n_facts[0]:
                record(world, "LM alone", split, fs, answers(model, tokenizer, statements, qs))
            if n <= 10:
                record(world, "facts in context", split, fs,
                       answers(model, tokenizer, statements, qs, in_context=True))
            record(world, "BM25 top-3", split, fs,
                   answers(model, tokenizer, statements, qs, retrieve=3))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF causal LM directory (default: shipped)")
    ap.add_argument("--memory", default=None, help="written memory directory (default: shipped)")
    ap.add_argument("--facts", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = run(args.facts, args.model, args.memory, args.seed, args.questions)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        info = {**machine_info(torch.device("cpu")), "model": args.model or "shipped base LM",
                "memory": args.memory or "shipped written memory"}
        append_jsonl(os.path.join(args.out, "open-recall-cpu.jsonl"), rows, info)


if __name__ == "__main__":
    main()
