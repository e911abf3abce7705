"""The fact-recall benchmark: can a frozen LM answer questions about facts it
never saw in training, and at what cost per query?

    python -m memkernels.apps.recall.benchmark --out benchmarks/results/recall

Conditions (the same frozen base LM in all of them):
- base: the question alone (the LM cannot know: near chance);
- in_context: every fact's statement in the prompt, then the question (the
  upper bound; its cost grows with N, and it stops where the prompt no
  longer fits the LM's context);
- retrieval: BM25 (rank_bm25) picks the top-k statements for the question,
  they go in the prompt;
- trained_memory: the written memory's weights with a bank trained on the
  facts' statements: stored once by store(), then its slots optimised on
  the statements (every template) by gradient descent, the memory and the
  LM frozen (train_bank; memkernels.apps.recall.train --mode trained);
- written_memory: a memory trained on episodes of other facts
  (memkernels.apps.recall.train --world closed); the benchmark's facts, never seen, are
  written by store() alone, then read.
A memory's bank of INDEX_MIN_SLOTS slots or more is read through an index
(MemoryBank.build_index: each question reads its INDEX_PROBES nearest
clusters of slots).

For each N (and with as many distractor facts: similar names, other objects)
it reports exact-match accuracy, per-query latency (batch 1, median; for a
memory also its cost paired with the same question's time with reads off) and
tokens processed per query: recall.md and recall.png (this run), the rows appended
to recall-cpu.jsonl (every run on this machine kind).
The written memory ships (trained there when --written-dir is missing);
trained banks are trained on first use and cached under --cache.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from typing import Callable, Optional

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.memory import MemoryBank, MemoryModel
from memkernels.apps.recall import base_lm, tasks
from memkernels.apps.recall.facts import Fact, make_facts, qa_prompt
from memkernels.train import Trainer, TrainConfig, append_joint_config, pretrain_address

CONDITIONS = ("base", "in_context", "retrieval", "trained_memory", "written_memory")
WRITTEN_MEMORY = os.path.join(os.path.dirname(__file__), "assets", "written_memory")
# the written memory: the append rule (memkernels.memory.append) with a store
# gate, its address pre-trained first (memkernels.train.pretrain_address), then
# the joint training on episodes (tasks.append_episodes)
WRITTEN_PRETRAIN_STEPS = 6000
WRITTEN_STEPS = 1500
# the trained memory: steps (batch 16 statements) and rate of a bank's slots
# (entries in [-1, 1]: tanh of what the write put there)
TRAINED_STEPS = 300
TRAINED_LR = 1e-3
# banks from this many slots are read through an index (MemoryBank.build_index):
# each question reads the slots of its INDEX_PROBES nearest clusters, of ~sqrt(S)
INDEX_MIN_SLOTS = 2048
INDEX_PROBES = 8


# --- answering ---------------------------------------------------------------------

def answer(model, tokenizer, prompts: list[str], batch_size: int = 32,
           max_new_tokens: int = 5,
           make_logits_processors: Optional[Callable[[], list]] = None) -> list[str]:
    """Greedy answers (text up to the first period), batched with left padding;
    make_logits_processors: makes the processors of one generate call (e.g. a
    memkernels.hf.StoredTextContinuation of the bank read)."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        enc = [tokenizer(p)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with torch.inference_mode():
            extra = {}
            if make_logits_processors is not None:
                from transformers import LogitsProcessorList  # optional: the [hf] extra
                extra["logits_processor"] = LogitsProcessorList(make_logits_processors())
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra)
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row).split(".")[0].strip())
    return answers


def per_query_latency(model, tokenizer, prompts: list[str], reps: int = 24,
                      handle=None) -> tuple[float, Optional[float]]:
    """(median seconds to answer one question: batch 1, prompt + 5 new tokens;
    with a memory's `handle`, the median ratio of each question's time to the
    same question's time with the memory's reads off, timed right before it,
    minus 1: the memory's cost, paired so that the machine's drift cancels)."""
    def seconds(p):
        start = time.perf_counter()
        answer(model, tokenizer, [p], batch_size=1)
        return time.perf_counter() - start
    times, ratios = [], []
    for p in prompts[:reps]:
        if handle is not None:
            with handle.reads_disabled():
                base = seconds(p)
        times.append(seconds(p))
        if handle is not None:
            ratios.append(times[-1] / base - 1)
    return statistics.median(times), statistics.median(ratios) if ratios else None


class BM25Retriever:
    def __init__(self, statements: list[str]):
        from rank_bm25 import BM25Okapi  # optional dependency (the [recall] extra)
        self.statements = statements
        self.index = BM25Okapi([self._words(s) for s in statements])

    @staticmethod
    def _words(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def top(self, query: str, k: int) -> list[str]:
        scores = self.index.get_scores(self._words(query))
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        return [self.statements[i] for i in best]


# --- memories ------------------------------------------------------------------------

def train_written_memory(model, tokenizer, directory: str, *, steps: int, batch: int = 16,
                         slots: int = 1024, pretrain_steps: int = WRITTEN_PRETRAIN_STEPS,
                         seed: int = 0, log=print) -> MemoryModel:
    """Trains (or loads from `directory`) the written memory for `model`: an
    append-rule memory with a store gate and a context (tasks.written_memory),
    its address pre-trained for pretrain_steps, then batch/2 episodes a step
    (tasks.append_episodes)."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return MemoryModel.from_pretrained(directory)
    start = time.time()
    memory = tasks.written_memory(model, slots=slots, seed=seed)
    pretrain = pretrain_address(memory, model, tokenizer, *tasks.address_pairs(tokenizer)[:3],
                                steps=pretrain_steps, seed=seed)
    trainer = Trainer(model, memory, tasks.append_episodes(tokenizer, batch // 2, 1 + seed, steps),
                      append_joint_config(steps=steps, lr=3e-3, seed=seed))
    history = trainer.train()["history"]
    trainer.close()
    memory.save_pretrained(directory)
    tail = history[-20:]
    info = dict(mode="written", write_rule=memory.config.write_rule, steps=steps, seed=seed,
                seconds=time.time() - start, pretrain_steps=len(pretrain),
                pretrain_final_loss=sum(pretrain[-50:]) / max(len(pretrain[-50:]), 1),
                final_loss=sum(h["loss"] for h in tail) / len(tail),
                final_token_accuracy=sum(h["accuracy"] for h in tail) / len(tail))
    with open(os.path.join(directory, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"trained the written memory: {info}")
    return memory


def train_bank(model, tokenizer, memory: MemoryModel, directory: str, *, steps: int,
               n_facts: int, distractors: bool = False, fact_seed: int = 0, seed: int = 0,
               batch: int = 16, lr: float = TRAINED_LR, log=print) -> MemoryBank:
    """The trained memory's bank: the n_facts facts of draw fact_seed (with
    distractors, theirs too) stored by `memory`, one statement each, then the
    bank's slots optimised for `steps` on the facts' statements in every
    template (tasks.trained_batches without auxiliary facts), the memory and
    the LM frozen (Trainer(bank=...)). Cached as directory/bank.safetensors,
    retrained when it was made with other memory weights."""
    path = os.path.join(directory, "bank.safetensors")
    if os.path.isfile(path):
        try:
            return MemoryBank.load(path, memory)
        except ValueError as exc:  # another memory's bank (fingerprint)
            log(f"retraining {path}: {exc}")
    start = time.time()
    bank = tasks.stored_facts(memory, model, tokenizer, n_facts, fact_seed, distractors)
    make_batch = tasks.trained_batches(tokenizer, batch, seed=1 + seed, n_facts=n_facts,
                                       distractors=distractors, eval_seed=fact_seed, aux_facts=0)
    trainer = Trainer(model, memory, make_batch,
                      TrainConfig(steps=steps, lr=lr, seed=seed, warmup=min(50, steps)), bank=bank)
    history = trainer.train()["history"]
    trainer.close()
    bank = trainer.bank
    os.makedirs(directory, exist_ok=True)
    bank.save(path)
    info = dict(mode="trained", write_rule=memory.config.write_rule, steps=steps, lr=lr,
                n_facts=n_facts, distractors=distractors, fact_seed=fact_seed, seed=seed,
                slots=bank.num_slots, seconds=time.time() - start,
                first_loss=history[0]["loss"] if history else None,
                final_loss=(sum(h["loss"] for h in history[-20:]) / len(history[-20:])
                            if history else None))
    with open(os.path.join(directory, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"trained a bank ({n_facts} facts): {info}")
    return bank


# --- one condition at one N ----------------------------------------------------------------

def evaluate(condition: str, model, tokenizer, facts: list[Fact], distractor_facts: list[Fact],
             *, memory: Optional[MemoryModel] = None, bank: Optional[MemoryBank] = None,
             max_questions: int = 300,
             max_context: int = base_lm.SEQ_LEN, top_k: int = 3,
             seed: int = 0) -> Optional[dict]:
    rng = random.Random(seed)
    stored = facts + distractor_facts
    statements = [f.statement(rng) for f in stored]
    rng.shuffle(statements)
    asked = rng.sample(facts, min(max_questions, len(facts)))
    questions = [f.question(rng) for f in asked]
    store_seconds, store_tokens = 0.0, 0
    handle = None
    if condition == "base":
        prompts = [qa_prompt(q) for q in questions]
    elif condition == "in_context":
        context = " ".join(statements)
        if len(tokenizer(context)["input_ids"]) + 24 > max_context:
            return None  # does not fit the LM's context
        prompts = [f"{context} {qa_prompt(q)}" for q in questions]
    elif condition == "retrieval":
        retriever = BM25Retriever(statements)
        prompts = [f"{' '.join(retriever.top(q, top_k))} {qa_prompt(q)}" for q in questions]
    elif condition in ("trained_memory", "written_memory"):
        prompts = [qa_prompt(q) for q in questions]
        if condition == "trained_memory":
            if bank is None:
                raise ValueError("trained_memory: pass its trained bank (train_bank)")
        else:
            store_tokens = sum(len(tokenizer(s)["input_ids"]) for s in statements)
            start = time.perf_counter()
            bank = memkernels.store(memory, model, tokenizer, statements, chunk_size=len(statements),
                                    progress=False)
            store_seconds = time.perf_counter() - start
        if bank.num_slots >= INDEX_MIN_SLOTS:
            bank.build_index(probes=INDEX_PROBES)
        handle = memkernels.attach(model, memory, bank)
    else:
        raise ValueError(f"unknown condition {condition!r}")
    try:
        got = answer(model, tokenizer, prompts)
        latency, overhead = per_query_latency(model, tokenizer, prompts, handle=handle)
    finally:
        if handle is not None:
            handle.detach()
    correct = sum(g == f.object for g, f in zip(got, asked))
    prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts)
    index = handle is not None and handle.bank.read_index() is not None
    return dict(condition=condition, n_facts=len(facts), distractors=len(distractor_facts),
                questions=len(asked), accuracy=correct / len(asked),
                slots=handle.bank.num_slots if handle is not None else 0,
                index_probes=INDEX_PROBES if index else 0,
                latency_ms=1e3 * latency, overhead_vs_base=overhead,
                tokens_per_query=prompt_tokens + 5,
                store_seconds=store_seconds, store_tokens=store_tokens,
                examples=[dict(q=q, want=f.object, got=g)
                          for q, f, g in list(zip(questions, asked, got))[:3]])


# --- the sweep and its report ----------------------------------------------------------------

def run(out_dir: str, cache: str, sizes: list[int], trained_sizes: list[int],
        written_steps: int, trained_steps: int, conditions=CONDITIONS, log=print,
        written_dir: str = WRITTEN_MEMORY, fact_seed: int = 0) -> list[dict]:
    model, tokenizer = base_lm.load()
    written = None
    if "written_memory" in conditions or "trained_memory" in conditions:
        written = train_written_memory(model, tokenizer, written_dir, steps=written_steps, log=log)
    rows = []
    for distract in (False, True):
        for n in sizes:
            facts, others = make_facts(n, seed=fact_seed, distractors=distract)
            for condition in conditions:
                bank = None
                if condition == "trained_memory":
                    if n not in trained_sizes:
                        continue
                    name = (f"bank-n{n}{'-distract' if distract else ''}"
                            f"{f'-facts{fact_seed}' if fact_seed else ''}-steps{trained_steps}")
                    bank = train_bank(model, tokenizer, written, os.path.join(cache, name),
                                      steps=trained_steps, n_facts=n, distractors=distract,
                                      fact_seed=fact_seed, log=log)
                row = evaluate(condition, model, tokenizer, facts, others, memory=written,
                               bank=bank)
                if row is None:
                    log(f"{condition:15s} N={n:5d} distractors={distract}: does not fit")
                    continue
                rows.append(row)
                log(f"{condition:15s} N={n:5d} distractors={distract}: "
                    f"accuracy {row['accuracy']:.3f}, {row['latency_ms']:.1f} ms/query"
                    + (f" ({100 * row['overhead_vs_base']:+.0f}% over reads off)"
                       if row["overhead_vs_base"] is not None else "")
                    + f", {row['tokens_per_query']:.0f} tokens/query")
    os.makedirs(out_dir, exist_ok=True)
    append_jsonl(os.path.join(out_dir, "recall-cpu.jsonl"), rows, machine_info(torch.device("cpu")))
    write_report(rows, out_dir)
    return rows


def write_report(rows: list[dict], out_dir: str) -> None:
    lines = ["| condition | N facts | distractors | accuracy | ms / query | memory's cost, paired "
             "| tokens / query | memory slots |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        slots = (f"{r['slots']}" + (f" (index, {r['index_probes']} probes)"
                                    if r.get("index_probes") else "")) if r.get("slots") else "-"
        paired = (f"{100 * r['overhead_vs_base']:+.0f}%" if r.get("overhead_vs_base") is not None
                  else "-")
        lines.append(f"| {r['condition']} | {r['n_facts']} | {r['distractors']} | "
                     f"{100 * r['accuracy']:.1f}% | {r['latency_ms']:.1f} | {paired} | "
                     f"{r['tokens_per_query']:.0f} | {slots} |")
    with open(os.path.join(out_dir, "recall.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib  # optional dependency (the [recall] extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after the backend is chosen)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for condition in CONDITIONS:
        for distract, style in ((False, "-o"), (True, "--x")):
            pts = sorted((r["n_facts"], r["accuracy"], r["latency_ms"]) for r in rows
                         if r["condition"] == condition and bool(r["distractors"]) == distract)
            if not pts:
                continue
            label = condition + (" + distractors" if distract else "")
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    for ax, ylabel in zip(axes, ("exact-match accuracy", "ms per query (batch 1)")):
        ax.set_xscale("log")
        ax.set_xlabel("facts N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "recall.png"), dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/recall")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/memkernels/recall"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--trained-sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--written-steps", type=int, default=WRITTEN_STEPS)
    ap.add_argument("--trained-steps", type=int, default=TRAINED_STEPS)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--fact-seed", type=int, default=0,
                    help="which draw of facts (names, objects) is stored and asked; a trained "
                         "memory is trained on the draw (cached per seed)")
    ap.add_argument("--written-dir", default=WRITTEN_MEMORY,
                    help="the written memory (trained there when missing; default: the one "
                         "that ships)")
    args = ap.parse_args(argv)
    run(args.out, args.cache, args.sizes, args.trained_sizes, args.written_steps,
        args.trained_steps, args.conditions, written_dir=args.written_dir,
        fact_seed=args.fact_seed)


if __name__ == "__main__":
    main()
