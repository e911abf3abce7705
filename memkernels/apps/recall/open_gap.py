"""How far the shipped base LM and written memory are from open-vocabulary
recall: the same store() and questions on facts whose subjects and objects
are fresh (open_facts, held-out splits, held-out phrasings), beside the
closed-list facts the memory was trained on.

    python -m memkernels.apps.recall.open_gap [--facts 100] [--out DIR]

Prints exact-match recall per condition; with --out, appends the rows to
DIR/open-gap-cpu.jsonl. This is the baseline the open-vocabulary memory
has to move (the recall benchmark's headline is closed-list facts only).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.apps.recall import base_lm, benchmark, open_facts
from memkernels.apps.recall.facts import make_facts, qa_prompt
from memkernels.memory import MemoryModel


def recall(model, tokenizer, statements, questions, answers, memory=None,
           in_context: bool = False) -> float:
    prompts = [qa_prompt(q) for q in questions]
    if in_context:
        prompts = [" ".join(statements) + " " + p for p in prompts]
    if memory is None:
        got = benchmark.answer(model, tokenizer, prompts, max_new_tokens=12)
    else:
        bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=len(statements),
                                progress=False)
        with memkernels.attach(model, memory, bank):
            got = benchmark.answer(model, tokenizer, prompts, max_new_tokens=12)
    return statistics.mean(g == a for g, a in zip(got, answers))


def run(n: int, seed: int = 0, log=print) -> list[dict]:
    model, tokenizer = base_lm.load()
    memory = MemoryModel.from_pretrained(benchmark.WRITTEN_MEMORY)
    rng = random.Random(seed)
    worlds = {}
    closed, _ = make_facts(n, seed=seed)
    worlds["closed lists (the benchmark's)"] = ([f.statement(rng) for f in closed],
                                                [f.question(rng) for f in closed],
                                                [f.object for f in closed])
    opened = open_facts.make_open_facts(n, seed=seed)
    worlds["open vocabulary, held-out splits"] = ([f.statement(rng, "eval") for f in opened],
                                                  [f.question(rng, "eval") for f in opened],
                                                  [f.object for f in opened])
    rows = []
    for world, (statements, questions, answers) in worlds.items():
        for condition in ("base LM alone", "facts in context (N=10)", "written memory"):
            s, q, a = statements, questions, answers
            if condition.startswith("facts in context"):
                s, q, a = s[:10], q[:10], a[:10]
            acc = recall(model, tokenizer, s, q, a,
                         memory=memory if condition == "written memory" else None,
                         in_context=condition.startswith("facts in context"))
            rows.append(dict(world=world, condition=condition, n_facts=len(a), accuracy=acc))
            log(f"{world:34s} {condition:24s} N={len(a):4d}: {100 * acc:5.1f}%")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rows = run(args.facts, args.seed)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        append_jsonl(os.path.join(args.out, "open-gap-cpu.jsonl"), rows,
                     machine_info(torch.device("cpu")))


if __name__ == "__main__":
    main()
