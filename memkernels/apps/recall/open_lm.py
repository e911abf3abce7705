"""A base LM that reads: trained here on open-vocabulary facts whose answers
must be copied from the context (the frozen host of the open-vocabulary memory).

    python -m memkernels.apps.recall.open_lm [--out DIR] [--steps N]
    python -m memkernels.apps.recall.open_lm --family gpt2 --vocab 2048 --out DIR

The corpus (open_facts, train splits of subjects, objects and phrasings; the
relations of both splits, as a pretrained LLM knows the language of any
relation): documents of 2-10 statements followed by questions whose answers
are copied from them, and lists of made-up words read twice (copying is the
first thing a small LM has to learn). Nothing in it can be answered from the
LM's weights: every object is fresh. The result: model, tokenizer and
training.json with the held-out perplexity and the in-context accuracy on
eval-split facts asked with held-out phrasings (`in_context_accuracy`).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from memkernels.apps.recall import base_lm, open_facts
from memkernels.apps.recall.facts import qa_prompt

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "open_lm")
CORPUS_SEED = 2_000_003


def facts_document(rng: random.Random) -> str:
    """Statements of 1-10 fresh facts (1-3 per subject), then questions about
    most of them, each answer copied from a statement."""
    facts = open_facts.make_open_facts(rng.randint(1, 10), seed=rng.randrange(1 << 30),
                                       split="train", relation_split=rng.choice(("train", "eval")),
                                       facts_per_subject=rng.randint(1, 3))
    rng.shuffle(facts)
    text = " ".join(f.statement(rng, "train") for f in facts)
    asked = rng.sample(facts, rng.randint((len(facts) + 1) // 2, len(facts)))
    return text + " " + " ".join(f"{qa_prompt(f.question(rng, 'train'))} {f.object}."
                                 for f in asked)


def copy_document(rng: random.Random) -> str:
    words = [open_facts.draw_in_split(rng.choice(("word", "name", "number", "code")), rng, "train")
             for _ in range(rng.randint(3, 10))]
    return f"List: {', '.join(words)}. Again: {', '.join(words)}."


def corpus(n_docs: int, seed: int = CORPUS_SEED, copies: float = 0.25) -> list[str]:
    rng = random.Random(seed)
    return [copy_document(rng) if rng.random() < copies else facts_document(rng)
            for _ in range(n_docs)]


@torch.no_grad()
def in_context_accuracy(model, tokenizer, n_facts: int = 10, questions: int = 100,
                        seed: int = 0, phrasings: str = "eval") -> float:
    """Exact match of greedy answers to questions about eval-split facts whose
    statements are in the prompt, n_facts of them per prompt; statements and
    questions in the `phrasings` split (held out by default)."""
    rng = random.Random(seed)
    right = []
    while len(right) < questions:
        facts = open_facts.make_open_facts(n_facts, seed=rng.randrange(1 << 30))
        context = " ".join(f.statement(rng, phrasings) for f in facts)
        for f in rng.sample(facts, min(len(facts), questions - len(right))):
            ids = torch.tensor([tokenizer(f"{context} {qa_prompt(f.question(rng, phrasings))}")
                                ["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            right.append(tokenizer.decode(out[0, ids.shape[1]:]).split(".")[0].strip() == f.object)
    return statistics.mean(right)


def train(out_dir: str, steps: int = 6000, batch: int = 12, lr: float = 1e-3, seed: int = 0,
          family: str = "llama", vocab_size: int = 1024, log=print) -> dict:
    """Trains the open LM of `family` (base_lm.FAMILIES) with a byte-level BPE
    tokenizer of vocab_size into out_dir; returns training.json's contents."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = corpus(60_000)
    held_out = corpus(400, seed=CORPUS_SEED + 1, copies=0.0)
    t0 = time.time()
    tokenizer = base_lm.train_tokenizer(texts[:15_000], vocab_size=vocab_size)
    model = base_lm.build_model(len(tokenizer), family)
    base_lm.fit(model, tokenizer, texts, steps=steps, seq_len=base_lm.SEQ_LEN, batch=batch, lr=lr,
                rng=rng, desc="open LM")
    model.generation_config.eos_token_id = None
    info = dict(params=sum(p.numel() for p in model.parameters()), vocab=len(tokenizer),
                steps=steps, batch=batch, seq_len=base_lm.SEQ_LEN, train_docs=len(texts),
                train_seconds=time.time() - t0,
                held_out_perplexity=base_lm.perplexity(model, tokenizer, held_out),
                in_context_accuracy_n10=in_context_accuracy(model, tokenizer, 10),
                in_context_accuracy_n10_train_phrasings=in_context_accuracy(
                    model, tokenizer, 10, phrasings="train"),
                family=family,
                config=base_lm.GPT2_CONFIG if family == "gpt2" else base_lm.MODEL_CONFIG)
    base_lm.save(out_dir, model, tokenizer, info)
    log(f"open LM: {info['params'] / 1e6:.2f} M parameters, held-out perplexity "
        f"{info['held_out_perplexity']:.3f}, in-context accuracy at N=10 "
        f"{100 * info['in_context_accuracy_n10']:.0f}%, {info['train_seconds']:.0f} s -> {out_dir}")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="where the model goes (default for --family llama: the shipped "
                         "assets/open_lm, replaced)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--family", choices=base_lm.FAMILIES, default="llama",
                    help="the model family (gpt2: the second family the memory is shown on)")
    ap.add_argument("--vocab", type=int, default=1024, help="the BPE tokenizer's vocabulary")
    args = ap.parse_args(argv)
    if args.out is None and args.family != "llama":
        ap.error("--family gpt2 needs --out (the default is the shipped Llama LM's directory)")
    if args.steps < 1 or args.batch < 1 or args.vocab < 300:
        ap.error("--steps and --batch must be >= 1 and --vocab >= 300 (the 256 bytes and "
                 "merges)")
    train(args.out or ASSET_DIR, steps=args.steps, batch=args.batch, family=args.family,
          vocab_size=args.vocab)


if __name__ == "__main__":
    main()
