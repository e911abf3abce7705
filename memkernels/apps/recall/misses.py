"""Where the memory's misses are, on the dev phrasings: for each question the
lexical read gets wrong, was the fact's statement selected, is the answer
another selected fact's object, and does the read answer right when the
fact's own statement is the only one selected (an oracle selection).

    python -m memkernels.apps.recall.misses --splits 'realistic names' 'several per subject' \\
        --facts 1000 --questions 150 --out misses.json

It tells a selection problem (the index picks the wrong texts) from a read
problem (the right text, read wrong), and a read problem's answers by shape: a
tail of the answer (the copy started inside the object), nothing, or other;
and counts the right answers per statement core (sentence shape). Dev
phrasings and train-split values only, as the dev runs of open_recall (with
--dev-names, the realistic names from a list of their own that no training
draws): a diagnosis guides tuning, and the eval phrasings and values never
tune anything.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import shlex
import sys
from typing import Optional

import torch

import memkernels
from memkernels.apps.recall import benchmark, open_facts
from memkernels.apps.recall.facts import qa_prompt
from memkernels.apps.recall.open_recall import (DEV_VALUE_OFFSET, MAX_NEW_TOKENS, SPLITS,
                                                load_open)
from memkernels.hf.continuation import StoredTextContinuation
from memkernels.memory.lexical import (LEXICAL_K, LEXICAL_MAX_DF, LEXICAL_MIN_SCORE_RATIO,
                                       LEXICAL_PAIR_MAX_DF, LEXICAL_PREFER_WHOLE_RUNS)

# a miss's kinds: where the fact's statement was, and what was answered
NOT_SELECTED = "not selected"
OTHER_OBJECT = "another selected fact's object"
GARBLED = "selected, answered wrong"
# how a selected fact's answer came out wrong: the copy began inside the object
# (its first token or more missed, the rest right), nothing was answered (the
# gate stayed closed), or anything else
LATE_START = "a tail of the answer (the copy started late)"
NOTHING = "nothing answered"
OTHER_GARBLE = "other"


def garble_kind(got: str, answer: str) -> str:
    """Which way a wrong answer of a selected fact went wrong (LATE_START,
    NOTHING or OTHER_GARBLE), from the two strings alone."""
    got = got.strip()
    if not got:
        return NOTHING
    return LATE_START if len(got) < len(answer) and answer.endswith(got) else OTHER_GARBLE


def diagnose(model, tokenizer, memory, split: str, n_facts: int, questions: int, seed: int = 0,
             examples: int = 20, name_pool: Optional[tuple[int, int]] = None,
             name_split: Optional[str] = None, continuation: float = 0.0,
             pair_max_df: float = LEXICAL_PAIR_MAX_DF,
             prefer_whole_runs: bool = LEXICAL_PREFER_WHOLE_RUNS) -> dict:
    """The miss breakdown of one split (see the module's docstring);
    continuation: the weight of memkernels.hf.StoredTextContinuation over
    the bank each question reads (0: none); pair_max_df, prefer_whole_runs:
    the lexical selection's (MemoryBank.lexical_choice)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if n_facts < 1 or questions < 1:
        raise ValueError(f"n_facts and questions must be >= 1, got {n_facts} and {questions}")
    rng = random.Random(seed)
    facts = open_facts.make_open_facts(n_facts, seed=seed + n_facts + DEV_VALUE_OFFSET,
                                       split="train", name_pool=name_pool,
                                       name_split=name_split, **SPLITS[split])
    statements = [f.statement(rng, "dev") for f in facts]
    asked = rng.sample(range(len(facts)), min(questions, len(facts)))
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=256, progress=False)
    counts: collections.Counter = collections.Counter()
    oracle_right = collections.Counter()
    garbled: collections.Counter = collections.Counter()
    by_core: dict = collections.defaultdict(lambda: {"asked": 0, "right": 0})
    shown = []
    with memkernels.attach(model, memory, None) as handle:
        def read(chosen, prompt):
            read_bank = bank.select_entries(chosen) if len(chosen) else bank
            processors = (lambda: [StoredTextContinuation(read_bank, continuation)]) \
                if continuation else None
            with handle.using(read_bank):
                return benchmark.answer(model, tokenizer, [prompt],
                                        max_new_tokens=MAX_NEW_TOKENS,
                                        make_logits_processors=processors)[0]

        for i in asked:
            question = facts[i].question(rng, "dev")
            prompt = qa_prompt(question)
            chosen = bank.lexical_choice(tokenizer(prompt)["input_ids"], LEXICAL_K,
                                         LEXICAL_MIN_SCORE_RATIO, LEXICAL_MAX_DF, pair_max_df,
                                         prefer_whole_runs).tolist()
            got = read(chosen, prompt)
            core = by_core[open_facts.statement_core(statements[i], "dev") or "?"]
            core["asked"] += 1
            if got == facts[i].object:
                counts["right"] += 1
                core["right"] += 1
                continue
            kind = (NOT_SELECTED if i not in chosen else
                    OTHER_OBJECT if got in {facts[j].object for j in chosen if j != i} else GARBLED)
            oracle = read([i], prompt)
            counts[kind] += 1
            oracle_right[kind] += oracle == facts[i].object
            if kind == GARBLED:
                garbled[garble_kind(got, facts[i].object)] += 1
            if len(shown) < examples:
                shown.append(dict(kind=kind, statement=statements[i], question=question,
                                  answer=facts[i].object, got=got, got_alone=oracle,
                                  selected=[statements[j] for j in chosen]))
    return dict(split=split, n_facts=n_facts, questions=len(asked), phrasings="dev",
                name_pool=name_pool, continuation=continuation,
                lexical_pair_max_df=pair_max_df, lexical_prefer_whole_runs=prefer_whole_runs,
                name_split=name_split if SPLITS[split].get("realistic_names") else None,
                counts=dict(counts), right_when_alone=dict(oracle_right),
                answered_wrong=dict(garbled), by_statement_core=dict(by_core), examples=shown)


def summary(result: dict) -> str:
    counts, alone = result["counts"], result["right_when_alone"]
    misses = ", ".join(f"{kind} {n} (right alone {alone.get(kind, 0)})"
                       for kind, n in counts.items() if kind != "right")
    garbled = ", ".join(f"{kind} {n}" for kind, n in result.get("answered_wrong", {}).items())
    cores = ", ".join(f"{core!r} {c['right']}/{c['asked']}"
                      for core, c in result.get("by_statement_core", {}).items())
    return (f"{result['split']} N={result['n_facts']}: {counts.get('right', 0)} of "
            f"{result['questions']} right; misses: {misses or 'none'}"
            + (f"; answered wrong: {garbled}" if garbled else "")
            + (f"; right by statement core: {cores}" if cores else ""))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base LM directory (default: the shipped one)")
    ap.add_argument("--memory", default=None, help="memory directory (default: the shipped one)")
    ap.add_argument("--splits", nargs="+", default=["realistic names", "several per subject"],
                    choices=sorted(SPLITS))
    ap.add_argument("--facts", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-name-pool", action="store_true",
                    help="realistic names from as many train names as the eval split has "
                         "(open_facts.eval_name_pool): nested names as often as in eval")
    ap.add_argument("--dev-names", action="store_true",
                    help="realistic names from real names no training draws "
                         "(open_facts.DEV_REAL_FIRST_NAMES, as many as eval has): new words to "
                         "the memory, as eval's are")
    ap.add_argument("--continuation", type=float, default=0.0, metavar="W",
                    help="decode with memkernels.hf.StoredTextContinuation of weight W over the "
                         "bank each question reads: a copy that continues a stored text keeps "
                         "to it (0: off)")
    ap.add_argument("--pair-max-df", type=float, default=LEXICAL_PAIR_MAX_DF, metavar="F",
                    help="the lexical selection counts a pair of words while both are in at "
                         f"most this share of the texts (default {LEXICAL_PAIR_MAX_DF:g}; "
                         f"{LEXICAL_MAX_DF:g} with --no-whole-runs: the earlier selection)")
    ap.add_argument("--no-whole-runs", action="store_true",
                    help="the lexical selection keeps its near ties whether or not the "
                         "question's names stand whole in them (the earlier selection)")
    ap.add_argument("--out", default=None, help="write the breakdowns (and examples) as JSON")
    args = ap.parse_args(argv)
    if not 0.0 <= args.continuation <= 1.0:
        ap.error(f"--continuation takes a weight in [0, 1], got {args.continuation}")
    if not 0.0 < args.pair_max_df <= 1.0:
        ap.error(f"--pair-max-df takes a share in (0, 1], got {args.pair_max_df}")
    if args.facts < 1 or args.questions < 1:
        ap.error("--facts and --questions must be >= 1")
    if args.dev_names and args.small_name_pool:
        ap.error("--dev-names and --small-name-pool are two name pools: give one")
    torch.manual_seed(args.seed)
    model, tokenizer, memory = load_open(args.model, args.memory)
    results = []
    for split in args.splits:
        results.append(diagnose(model, tokenizer, memory, split, args.facts, args.questions,
                                args.seed, name_pool=open_facts.eval_name_pool()
                                if args.small_name_pool else None,
                                name_split="dev" if args.dev_names else None,
                                continuation=args.continuation,
                                pair_max_df=args.pair_max_df,
                                prefer_whole_runs=not args.no_whole_runs))
        print(summary(results[-1]))
    if args.out:
        with open(args.out, "w") as f:
            words = argv if argv is not None else sys.argv[1:]
            json.dump(dict(command=" ".join(["python -m memkernels.apps.recall.misses"] +
                                            [shlex.quote(w) for w in words]),
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
