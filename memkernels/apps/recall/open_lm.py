"""A base LM that reads: trained here on open-vocabulary facts whose answers
must be copied from the context (the frozen host of the open-vocabulary memory).

    python -m memkernels.apps.recall.open_lm [--out DIR] [--steps N]    # the shipped recipe
    python -m memkernels.apps.recall.open_lm --family gpt2 --vocab 2048 --out DIR  # the second family
    python -m memkernels.apps.recall.open_lm --evaluate DIR [--phrasings dev] [--report F]

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
import bisect
import json
import os
import random
import re
import shlex
import statistics
import sys
import time
from typing import Optional

import torch

from memkernels.apps.recall import base_lm, open_facts
from memkernels.apps.recall.facts import qa_prompt

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "open_lm")
# the command line's defaults: the recipe of the LM in ASSET_DIR (document
# windows, half the documents varied: docs/performance.md, session 19; 9,000
# steps: session 28)
SHIPPED_RECIPE = dict(steps=9000, batch=8, seq_len=384, windows="document", varied_phrasings=0.3)
CORPUS_SEED = 2_000_003


def facts_document(rng: random.Random, max_facts: int = 10, varied: float = 0.0,
                   composed: bool = False) -> str:
    """Statements of 1-max_facts fresh facts (1-3 per subject), then questions
    about most of them, each answer copied from a statement; with varied > 0,
    half the documents in phrasings varied by open_facts.vary(p=varied)
    (train words only); composed: phrasings drawn from open_facts.COMPOSED
    (the train cores recombined from their parts)."""
    facts = open_facts.make_open_facts(rng.randint(1, max_facts), seed=rng.randrange(1 << 30),
                                       split="train", relation_split=rng.choice(("train", "eval")),
                                       facts_per_subject=rng.randint(1, 3))
    rng.shuffle(facts)
    p = varied if varied > 0 and rng.random() < 0.5 else 0.0  # no draw at 0: the shipped corpus
    text = " ".join(f.statement(rng, "train", p, composed) for f in facts)
    asked = rng.sample(facts, rng.randint((len(facts) + 1) // 2, len(facts)))
    return text + " " + " ".join(f"{qa_prompt(f.question(rng, 'train', p, composed))} {f.object}."
                                 for f in asked)


def copy_document(rng: random.Random) -> str:
    words = [open_facts.draw_in_split(rng.choice(("word", "name", "number", "code")), rng, "train")
             for _ in range(rng.randint(3, 10))]
    return f"List: {', '.join(words)}. Again: {', '.join(words)}."


def corpus(n_docs: int, seed: int = CORPUS_SEED, copies: float = 0.25, max_facts: int = 10,
           varied: float = 0.0, composed: bool = False) -> list[str]:
    rng = random.Random(seed)
    return [copy_document(rng) if rng.random() < copies
            else facts_document(rng, max_facts, varied, composed) for _ in range(n_docs)]


# Prompt lengths (tokens) the in-context report groups by: the shipped LM
# trained on 256-token windows, so the last two lie past it.
LENGTH_BINS = (0, 192, 256, 320)
ERROR_KINDS = ("right", "another fact's object", "cut short", "other")


def answer_kind(answer: str, fact, facts) -> str:
    """How a greedy answer relates to the asked fact (ERROR_KINDS): exact;
    the object of another fact in the prompt (it read the wrong statement); a
    strict prefix of the right object (the copy stopped early); anything
    else (the copy went wrong)."""
    if answer == fact.object:
        return "right"
    if any(answer == g.object for g in facts if g is not fact):
        return "another fact's object"
    if answer and fact.object.startswith(answer):
        return "cut short"
    return "other"


@torch.no_grad()
def in_context_report(model, tokenizer, n_facts: int = 10, questions: int = 100,
                      seed: int = 0, phrasings: str = "eval") -> dict:
    """Greedy answers to questions about eval-split facts whose statements are
    in the prompt, n_facts of them per prompt; statements and questions in
    the `phrasings` split (held out by default). Returns the exact-match
    accuracy, the share of each answer kind (answer_kind) and the accuracy
    per prompt length (LENGTH_BINS): where reading from the prompt fails."""
    rng = random.Random(seed)
    kinds, lengths = [], []
    while len(kinds) < questions:
        facts = open_facts.make_open_facts(n_facts, seed=rng.randrange(1 << 30))
        context = " ".join(f.statement(rng, phrasings) for f in facts)
        for f in rng.sample(facts, min(len(facts), questions - len(kinds))):
            ids = torch.tensor([tokenizer(f"{context} {qa_prompt(f.question(rng, phrasings))}")
                                ["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:]).split(".")[0].strip()
            kinds.append(answer_kind(answer, f, facts))
            lengths.append(ids.shape[1])
    by_length = {}
    for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:] + (None,)):
        inside = [k for k, n in zip(kinds, lengths) if n >= lo and (hi is None or n < hi)]
        if inside:
            by_length[f"{lo}-{hi - 1}" if hi else f">={lo}"] = dict(
                questions=len(inside), accuracy=inside.count("right") / len(inside))
    return dict(n_facts=n_facts, questions=len(kinds), phrasings=phrasings, seed=seed,
                accuracy=kinds.count("right") / len(kinds),
                answer_kinds={k: kinds.count(k) / len(kinds) for k in ERROR_KINDS},
                median_prompt_tokens=statistics.median(lengths), by_prompt_tokens=by_length)


def held_out_documents() -> list[str]:
    """The 400 fact documents the LM's perplexity is measured on (another seed
    of the corpus, whatever the training corpus's options)."""
    return corpus(400, seed=CORPUS_SEED + 1, copies=0.0)


def answers_without_statement(tokenizer, texts: list[str], seq_len: int, windows: str,
                              n_windows: int = 20_000, seed: int = 0) -> float:
    """The share of the answers (" A: <object>.") inside training windows
    (base_lm.window_starts) whose statement starts before the window: answers
    an LM trained on those windows cannot copy, only invent."""
    total, doc_starts, answers = 0, [], []  # answers: (answer token, statement token)
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True)
        ends = [end for _, end in enc["offset_mapping"]]  # a char's token: the first ending after it
        for m in re.finditer(r" A: ([^.]+)\.", text):
            stated = text.find(m.group(1))
            if 0 <= stated < m.start(1):
                answers.append((total + bisect.bisect_right(ends, m.start(1)),
                                total + bisect.bisect_right(ends, stated)))
        doc_starts.append(total)
        total += len(enc["input_ids"]) + 1  # the EOS packed_batches adds
    answers.sort()
    at = [a for a, _ in answers]
    seen = lost = 0
    for start in base_lm.window_starts(doc_starts, total, seq_len, windows, random.Random(seed),
                                       n_windows):
        inside = answers[bisect.bisect_left(at, start):bisect.bisect_left(at, start + seq_len)]
        seen += len(inside)
        lost += sum(stated < start for _, stated in inside)
    return lost / max(seen, 1)


def in_context_accuracy(model, tokenizer, n_facts: int = 10, questions: int = 100,
                        seed: int = 0, phrasings: str = "eval") -> float:
    """in_context_report's exact-match accuracy."""
    return in_context_report(model, tokenizer, n_facts, questions, seed, phrasings)["accuracy"]


def train(out_dir: str, steps: int = SHIPPED_RECIPE["steps"],
          batch: int = SHIPPED_RECIPE["batch"], lr: float = 1e-3,
          seed: int = 0, family: str = "llama", vocab_size: int = 1024,
          seq_len: int = SHIPPED_RECIPE["seq_len"], max_facts: int = 10,
          varied: float = SHIPPED_RECIPE["varied_phrasings"],
          windows: str = SHIPPED_RECIPE["windows"], composed: bool = False,
          command: Optional[str] = None, log=print) -> dict:
    """Trains the open LM of `family` (base_lm.FAMILIES) with a byte-level BPE
    tokenizer of vocab_size into out_dir, on training windows of `windows`
    (base_lm.packed_batches); returns training.json's contents (with the
    command that made it, when given). The defaults are the shipped LM's
    recipe (SHIPPED_RECIPE), as the command line's are."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = corpus(60_000, max_facts=max_facts, varied=varied, composed=composed)
    held_out = held_out_documents()
    t0 = time.time()
    tokenizer = base_lm.train_tokenizer(texts[:15_000], vocab_size=vocab_size)
    model = base_lm.build_model(len(tokenizer), family)
    base_lm.fit(model, tokenizer, texts, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                rng=rng, desc="open LM", windows=windows)
    model.generation_config.eos_token_id = None
    info = dict(params=sum(p.numel() for p in model.parameters()), vocab=len(tokenizer),
                steps=steps, batch=batch, seq_len=seq_len, train_docs=len(texts),
                max_document_facts=max_facts, varied_phrasings=varied, windows=windows,
                composed_phrasings=composed,
                train_seconds=time.time() - t0,
                held_out_perplexity=base_lm.perplexity(model, tokenizer, held_out),
                in_context_accuracy_n10=in_context_accuracy(model, tokenizer, 10),
                in_context_accuracy_n10_train_phrasings=in_context_accuracy(
                    model, tokenizer, 10, phrasings="train"),
                family=family, **({"command": command} if command else {}),
                config=base_lm.GPT2_CONFIG if family == "gpt2" else base_lm.MODEL_CONFIG)
    base_lm.save(out_dir, model, tokenizer, info)
    log(f"open LM: {info['params'] / 1e6:.2f} M parameters, held-out perplexity "
        f"{info['held_out_perplexity']:.3f}, in-context accuracy at N=10 "
        f"{100 * info['in_context_accuracy_n10']:.0f}%, {info['train_seconds']:.0f} s -> {out_dir}")
    return info


def evaluate(model_dir: str, phrasings: str = "dev", n_facts: int = 10, questions: int = 150,
             report_path: Optional[str] = None, log=print) -> dict:
    """in_context_report of the LM in model_dir, printed and written as JSON."""
    model, tokenizer = base_lm.load(model_dir)
    report = dict(model=model_dir, **in_context_report(model, tokenizer, n_facts, questions,
                                                       phrasings=phrasings))
    # perplexity on the same held-out documents with either kind of window: a
    # packed window opens inside a document, where its answers cannot be read
    report["held_out_perplexity"] = {
        w: base_lm.perplexity(model, tokenizer, held_out_documents(), windows=w)
        for w in base_lm.WINDOWS}
    # what the LM's training windows hid: answers whose statement lay before them
    trained = {}
    if os.path.isfile(os.path.join(model_dir, "training.json")):
        with open(os.path.join(model_dir, "training.json")) as f:
            trained = json.load(f)
    seq_len, documents = trained.get("seq_len", base_lm.SEQ_LEN), corpus(3000)
    report["answers_without_statement"] = dict(seq_len=seq_len, **{
        w: answers_without_statement(tokenizer, documents, seq_len, w) for w in base_lm.WINDOWS})
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in report["answer_kinds"].items())
    lengths = ", ".join(f"{k} tokens {100 * v['accuracy']:.0f}% of {v['questions']}"
                        for k, v in report["by_prompt_tokens"].items())
    perplexities = ", ".join(f"{w} windows {v:.2f}"
                             for w, v in report["held_out_perplexity"].items())
    log(f"{model_dir}: N={n_facts} facts in the prompt, {phrasings} phrasings: "
        f"{100 * report['accuracy']:.1f}% exact ({kinds}); by prompt length: {lengths}; "
        f"held-out perplexity: {perplexities}; answers whose statement lies before a "
        f"{seq_len}-token training window: packed "
        f"{100 * report['answers_without_statement']['packed']:.1f}%, document "
        f"{100 * report['answers_without_statement']['document']:.1f}%")
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="where the model goes (default for --family llama: the shipped "
                         "assets/open_lm, replaced)")
    ap.add_argument("--steps", type=int, default=SHIPPED_RECIPE["steps"])
    ap.add_argument("--batch", type=int, default=SHIPPED_RECIPE["batch"])
    ap.add_argument("--family", choices=base_lm.FAMILIES, default="llama",
                    help="the model family (gpt2: the second family the memory is shown on)")
    ap.add_argument("--vocab", type=int, default=1024, help="the BPE tokenizer's vocabulary")
    ap.add_argument("--seq-len", type=int, default=SHIPPED_RECIPE["seq_len"],
                    help="the training window in tokens")
    ap.add_argument("--max-document-facts", type=int, default=10,
                    help="a fact document states 1 to this many facts")
    ap.add_argument("--varied-phrasings", type=float,
                    default=SHIPPED_RECIPE["varied_phrasings"], metavar="P",
                    help="half the fact documents in phrasings varied by open_facts.vary(p=P)")
    ap.add_argument("--composed-phrasings", action="store_true",
                    help="draw the corpus's phrasings from the train cores recombined from "
                         "their parts (open_facts.COMPOSED), not only the hand-written ones")
    ap.add_argument("--windows", choices=base_lm.WINDOWS, default=SHIPPED_RECIPE["windows"],
                    help="where a training window starts: anywhere (packed) or at a "
                         "document's start (document: no answer without its statement)")
    check = ap.add_argument_group("reading a prompt (--evaluate: no training)")
    check.add_argument("--evaluate", metavar="DIR", default=None,
                       help="report how the LM in DIR reads facts in its prompt "
                            "(in_context_report) instead of training one")
    check.add_argument("--phrasings", choices=open_facts.PHRASING_SPLITS, default="dev",
                       help="the phrasings' split (dev: for choices; eval: the reported one)")
    check.add_argument("--facts", type=int, default=10, help="facts in each prompt")
    check.add_argument("--questions", type=int, default=150)
    check.add_argument("--report", metavar="FILE", default=None, help="write the report (JSON)")
    args = ap.parse_args(argv)
    if args.evaluate is not None:
        if args.facts < 1 or args.questions < 1:
            ap.error("--facts and --questions must be >= 1")
        evaluate(args.evaluate, args.phrasings, args.facts, args.questions, args.report)
        return
    if args.out is None and args.family != "llama":
        ap.error("--family gpt2 needs --out (the default is the shipped Llama LM's directory)")
    if args.steps < 1 or args.batch < 1 or args.vocab < 300:
        ap.error("--steps and --batch must be >= 1 and --vocab >= 300 (the 256 bytes and "
                 "merges)")
    if args.seq_len < 16 or args.max_document_facts < 1 or not 0 <= args.varied_phrasings <= 1:
        ap.error("--seq-len must be >= 16, --max-document-facts >= 1 and --varied-phrasings "
                 "in [0, 1]")
    train(args.out or ASSET_DIR, steps=args.steps, batch=args.batch, family=args.family,
          vocab_size=args.vocab, seq_len=args.seq_len, max_facts=args.max_document_facts,
          varied=args.varied_phrasings, windows=args.windows, composed=args.composed_phrasings,
          command="python -m memkernels.apps.recall.open_lm " + shlex.join(
              sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
