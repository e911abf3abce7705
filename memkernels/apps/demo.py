"""The main job: a frozen LM, a memory, new facts stored, questions answered.

    python -m memkernels.apps.demo [--facts 100]

1. Loads the small Llama-style LM that ships with the repository (trained
   here on templated sentences; `python -m memkernels.apps.recall.base_lm`
   rebuilds it) and the written-memory weights trained for it
   (`python -m memkernels.apps.recall.benchmark` retrains them when missing).
2. Makes facts about people it has never seen, stores them in a fresh bank
   with store() alone (no gradient step), and asks about them with other
   phrasings than the statements.
3. Prints exact-match recall with and without the memory, the same memory's
   recall of open-vocabulary facts (words no training saw: the open problem),
   saves and reloads the bank, and the per-token decode overhead.
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
from memkernels.apps.recall import base_lm, benchmark, open_facts, open_recall
from memkernels.apps.recall.facts import make_facts, qa_prompt


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--questions", type=int, default=100)
    args = ap.parse_args(argv)
    _kernel_check()
    model, tokenizer = base_lm.load()
    memory = benchmark.train_written_memory(model, tokenizer, benchmark.WRITTEN_MEMORY,
                                             steps=benchmark.WRITTEN_STEPS)
    print(f"base LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, frozen; "
          f"memory: {sum(p.numel() for p in memory.parameters()) / 1e6:.2f} M parameters, "
          f"{memory.config.num_heads} heads x {memory.config.head_dim}, write rule "
          f"{memory.config.write_rule!r}, reads at layers {memory.config.resolved_read_layers}")

    facts, _ = make_facts(args.facts, seed=2026)  # names never seen in any training
    rng = random.Random(0)
    statements = [f.statement(rng) for f in facts]
    asked = facts[:args.questions]
    prompts = [qa_prompt(f.question(rng)) for f in asked]
    start = time.perf_counter()
    bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=len(statements))
    print(f"stored {len(statements)} new facts in {time.perf_counter() - start:.2f} s "
          f"({bank.num_slots} slots), e.g. {statements[0]!r}")

    base_answers = benchmark.answer(model, tokenizer, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "user.bank.safetensors")
        bank.save(path)
        bank = MemoryBank.load(path, memory)  # a user's memory outlives the process
    with memkernels.attach(model, memory, bank):
        mem_answers = benchmark.answer(model, tokenizer, prompts)
    for f, p, a in list(zip(asked, prompts, mem_answers))[:3]:
        print(f"  {p} -> {a!r} (true: {f.object!r})")
    base_acc = statistics.mean(a == f.object for a, f in zip(base_answers, asked))
    mem_acc = statistics.mean(a == f.object for a, f in zip(mem_answers, asked))
    print(f"recall on {len(asked)} questions: base LM alone {100 * base_acc:.0f}%, "
          f"with the memory {100 * mem_acc:.0f}%")
    # the same memory on facts whose objects are words no training saw (open_facts)
    fresh = open_facts.make_open_facts(args.questions, seed=2026)
    got = open_recall.answers(model, tokenizer, [f.statement(rng, "eval") for f in fresh],
                              [f.question(rng, "eval") for f in fresh], memory=memory)
    print(f"  {qa_prompt(fresh[0].question(rng, 'eval'))} -> {got[0]!r} "
          f"(true: {fresh[0].object!r})")
    print(f"recall of {len(fresh)} open-vocabulary facts (new words, held-out phrasings): with "
          f"the memory {100 * statistics.mean(g == f.object for g, f in zip(got, fresh)):.0f}% "
          f"(this memory picks among the answers its training saw: the open-vocabulary memory is "
          f"work in progress)")

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
    print("more: python -m memkernels.apps.recall.benchmark (all conditions), "
          "python -m memkernels.apps.bench.llm_overhead, python -m memkernels.apps.bench")


if __name__ == "__main__":
    main()
