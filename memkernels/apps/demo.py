"""The main job: a frozen LM, a memory, new facts stored, questions answered.

    python -m memkernels.apps.demo [--facts 100]

1. Loads the small Llama-style LM that ships with the repository (trained
   here to read facts: `python -m memkernels.apps.recall.open_lm` rebuilds
   it) and the copy-rule memory trained for it (memkernels.memory.copy).
2. Makes facts that no training drew from (held-out subjects, objects and
   phrasings: made-up names, words, numbers, dates and codes of 1-9 tokens),
   stores them in a fresh bank with store() alone (no gradient step), and
   asks about them with other phrasings than the statements'.
3. Prints exact-match recall with and without the memory (read over the whole
   bank, and through its lexical index: MemoryBank.lexical_select), saves and
   reloads the bank, and the per-token decode overhead.
4. Checks the fused kernels against the reference on the way.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

import memkernels
from memkernels import MemoryBank, reference
from memkernels.ops import backend
from memkernels.apps.recall import benchmark, open_facts, open_recall
from memkernels.apps.recall.facts import qa_prompt


def _decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int = 24, reps: int = 5) -> float:
    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - start
    return 1e3 * statistics.median((run(1 + new_tokens) - run(1)) / new_tokens for _ in range(reps))


def _kernel_check() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 32), torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    err = (memkernels.memory_read(q, k, v) - reference.memory_read(q, k, v)).abs().max().item()
    print(f"kernels: backend {backend.resolve(None, q.device)!r}, read max |err| vs reference "
          f"{err:.1e}")


def _other_splits(model, tokenizer, memory, n_facts: int, questions: int) -> str:
    """Recall through the lexical index on the benchmark's other splits (a bank
    of n_facts each; open_recall.SPLITS), as one line."""
    parts = []
    for i, (split, kwargs) in enumerate(open_recall.SPLITS.items()):
        if split == "held-out":
            continue
        try:
            facts = open_facts.make_open_facts(n_facts, seed=2027 + i, **kwargs)
        except ValueError:  # the held-out real names run out before ~10,000 people
            parts.append(f"{split} - (too many facts for its names)")
            continue
        rng = random.Random(i)
        bank = memkernels.store(memory, model, tokenizer,
                                [f.statement(rng, "eval") for f in facts], progress=False)
        asked = [facts[j] for j in open_recall.asked_facts_of(split, len(facts))][:questions]
        got, _ = open_recall.lexical_answers(model, tokenizer, memory, bank,
                                             [f.question(rng, "eval") for f in asked],
                                             latency_questions=1)
        parts.append(f"{split} {100 * statistics.mean(a == f.object for a, f in zip(got, asked)):.0f}%")
    return (f"{n_facts} facts each, through the lexical index ({questions} questions): "
            + ", ".join(parts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--questions", type=int, default=100)
    args = ap.parse_args(argv)
    _kernel_check()
    model, tokenizer, memory = open_recall.load_open(None, None)
    print(f"base LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, frozen; "
          f"memory: {sum(p.numel() for p in memory.parameters()) / 1e6:.2f} M parameters, write "
          f"rule {memory.config.write_rule!r} (stored tokens mixed into the LM's output)")

    # held-out subjects, objects and phrasings: nothing here was in any training
    facts = open_facts.make_open_facts(args.facts, seed=2026)
    rng = random.Random(0)
    statements = [f.statement(rng, "eval") for f in facts]
    asked = facts[:args.questions]
    questions = [f.question(rng, "eval") for f in asked]
    prompts = [qa_prompt(q) for q in questions]
    start = time.perf_counter()
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=len(statements))
    print(f"stored {len(statements)} new facts in {time.perf_counter() - start:.2f} s "
          f"({bank.num_slots} slots), e.g. {statements[0]!r}")

    base_answers = benchmark.answer(model, tokenizer, prompts, max_new_tokens=12)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "user.bank.safetensors")
        bank.save(path)
        bank = MemoryBank.load(path, memory)  # a user's memory outlives the process
    with memkernels.attach(model, memory, bank):
        mem_answers = benchmark.answer(model, tokenizer, prompts, max_new_tokens=12)
    base_acc = statistics.mean(a == f.object for a, f in zip(base_answers, asked))
    mem_acc = statistics.mean(a == f.object for a, f in zip(mem_answers, asked))
    # the same bank read through its lexical index (the way to read it): each
    # question reads only the stored facts that share the most words with it
    # (bank.lexical_select)
    lexical, _ = open_recall.lexical_answers(model, tokenizer, memory, bank, questions,
                                             latency_questions=1)
    lex_acc = statistics.mean(a == f.object for a, f in zip(lexical, asked))
    for f, p, a, whole in list(zip(asked, prompts, lexical, mem_answers))[:3]:
        print(f"  {p} -> {a!r} (true: {f.object!r}; read over the whole bank: {whole!r})")
    print(f"recall on {len(asked)} questions about new facts: base LM alone "
          f"{100 * base_acc:.0f}%, with the memory {100 * mem_acc:.0f}%, with the memory read "
          f"through its lexical index {100 * lex_acc:.0f}%")

    print("the other splits, " + _other_splits(model, tokenizer, memory, args.facts,
                                                min(args.questions, 50)))

    prompt = torch.tensor([tokenizer(prompts[0])["input_ids"]])
    plain = _decode_ms_per_token(model, prompt)
    costs = []
    for kv_dtype, name in ((None, "float32"), (torch.bfloat16, "bf16"), (torch.int8, "int8")):
        with memkernels.attach(model, memory, bank, kv_dtype=kv_dtype):
            attached = _decode_ms_per_token(model, prompt)
        costs.append(f"{attached:.2f} ({100 * (attached / plain - 1):+.0f}%) with {name}")
    print(f"decode: {plain:.2f} ms/token without memory; with it, by the dtype of its cached "
          f"keys/values: {', '.join(costs)} (a {bank.num_slots}-slot bank on a "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M-parameter LM)")
    print("more: python -m memkernels.apps.recall.open_recall (all splits and conditions), "
          "python -m memkernels.apps.bench.llm_overhead, python -m memkernels.apps.bench")


if __name__ == "__main__":
    main()
