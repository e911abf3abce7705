"""A base LLM that exists here: a small Llama-style LM and its BPE tokenizer,
trained by this module on a synthetic corpus of templated sentences.

    python -m memkernels.apps.recall.base_lm [--out DIR] [--steps N]

The corpus: documents of 2-6 statements about made-up people, followed by
questions about them with their answers (so the LM learns the Q/A format and
to answer from its context). Its names come from a seed stream the recall
benchmark never uses, so none of the benchmark's facts are in it. The LM
alone cannot know a new person's city: asked without context, it is near
chance. Training takes a few minutes on 2 cores; the result is cached (and
the repository ships one, `memkernels/apps/recall/assets/base_lm`).
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from memkernels.apps.recall.facts import RELATIONS, Fact, make_name, qa_text

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "base_lm")
CORPUS_SEED = 1_000_003  # the benchmark draws its facts from other seeds
EOS = "<|endoftext|>"
SEQ_LEN = 256  # the training window: prompts longer than this are out of distribution

MODEL_CONFIG = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=10000.0)


def corpus_document(rng: random.Random) -> str:
    """2-10 statements, then questions about most of them: answering from the
    context (finding the name, copying its object) is most of what is learned."""
    facts = []
    for _ in range(rng.randint(2, 10)):
        rel = rng.choice(sorted(RELATIONS))
        facts.append(Fact(make_name(rng), rel, rng.choice(RELATIONS[rel]["objects"])))
    text = " ".join(f.statement(rng) for f in facts)
    asked = rng.sample(facts, rng.randint((len(facts) + 1) // 2, len(facts)))
    return text + " " + " ".join(qa_text(f, rng) for f in asked)


def roll_call_document(rng: random.Random) -> str:
    """A list of names read twice: copying what came before is the first thing a
    small LM has to learn to answer from its context, and this teaches it in a
    few hundred steps (the fact documents alone did not in 2400)."""
    names = [make_name(rng) for _ in range(rng.randint(3, 12))]
    return f"Guests: {', '.join(names)}. Again: {', '.join(names)}."


def famous_people(n: int = 400, seed: int = CORPUS_SEED - 1) -> list[list[Fact]]:
    """A fixed world: n people (train-split names) with one object per relation,
    the same in every document. Answering about them needs the subject carried
    to the answer position, which facts about strangers never ask for."""
    rng = random.Random(seed)
    people = []
    for _ in range(n):
        name = make_name(rng)
        people.append([Fact(name, rel, rng.choice(RELATIONS[rel]["objects"]))
                       for rel in sorted(RELATIONS)])
    return people


def famous_document(rng: random.Random, people: list[list[Fact]]) -> str:
    """Statements and questions about famous people, with no context to copy from."""
    parts = []
    for _ in range(rng.randint(2, 6)):
        fact = rng.choice(rng.choice(people))
        parts.append(qa_text(fact, rng) if rng.random() < 0.5 else fact.statement(rng))
    return " ".join(parts)


def corpus(n_docs: int, seed: int = CORPUS_SEED, roll_calls: float = 0.3,
           famous: float = 0.3) -> list[str]:
    """Documents: facts about strangers then questions on them (most), roll calls,
    and facts about the famous people."""
    rng = random.Random(seed)
    people = famous_people()
    docs = []
    for _ in range(n_docs):
        u = rng.random()
        docs.append(roll_call_document(rng) if u < roll_calls else
                    famous_document(rng, people) if u < roll_calls + famous else
                    corpus_document(rng))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE (any made-up name encodes), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # optional dependency ([hf])
    from transformers import PreTrainedTokenizerFast  # optional dependency ([hf])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


# the second family (GPT-2: learned positions, LayerNorm, GELU MLP, fused
# attention projection), as wide and deep as MODEL_CONFIG; GPT-2's own
# defaults otherwise, dropout 0.1 included (the Llama config has none)
GPT2_CONFIG = dict(n_embd=192, n_inner=512, n_layer=4, n_head=4, n_positions=2048,
                   tie_word_embeddings=True)
FAMILIES = ("llama", "gpt2")


def build_model(vocab_size: int, family: str = "llama"):
    """A fresh causal LM of `family` (FAMILIES) at this module's size."""
    import transformers  # optional dependency ([hf])
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, **GPT2_CONFIG))
    if family != "llama":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, **MODEL_CONFIG))


WINDOWS = ("packed", "document")


def packed_batches(tokenizer, texts: list[str], seq_len: int, batch: int, rng: random.Random,
                   windows: str = "packed"):
    """Endless batches of seq_len tokens cut from the documents joined by EOS.
    windows='packed': each window starts anywhere, so it often opens inside a
    document, past the statements its questions ask about (half of the open
    corpus's answers at 256 tokens: the LM learns to invent an answer it
    cannot see). windows='document': each window starts at a document's first
    token (then runs on into the next documents), so every answer it holds
    can be read from what precedes it, as in a prompt."""
    if windows not in WINDOWS:
        raise ValueError(f"windows must be one of {WINDOWS}, got {windows!r}")
    ids, doc_starts = [], []
    for t in texts:
        doc_starts.append(len(ids))
        ids.extend(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])
    data = torch.tensor(ids)
    last = len(data) - seq_len - 1
    if last <= 0:
        raise ValueError(f"the texts hold {len(data)} tokens: too few for windows of "
                         f"seq_len={seq_len}")
    while True:
        starts = window_starts(doc_starts, len(data), seq_len, windows, rng, batch)
        yield torch.stack([data[s:s + seq_len] for s in starts])


def window_starts(doc_starts: list[int], total: int, seq_len: int, windows: str,
                  rng: random.Random, n: int) -> list[int]:
    """n starts of seq_len-token windows over `total` tokens whose documents
    start at doc_starts (packed_batches' draw)."""
    last = total - seq_len - 1
    if windows == "packed":
        return [rng.randrange(0, last) for _ in range(n)]
    fits = doc_starts[:bisect.bisect_left(doc_starts, last)]  # doc_starts ascend
    return [rng.choice(fits) for _ in range(n)]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256,
               windows: str = "packed") -> float:
    """exp of the mean next-token loss over 8 batches of 8 windows (packed_batches)."""
    model.eval()
    batches = packed_batches(tokenizer, texts, seq_len, 8, random.Random(0), windows)
    losses = [model(x, labels=x).loss.item() for x, _ in zip(batches, range(8))]
    return math.exp(sum(losses) / len(losses))


def fit(model, tokenizer, texts: list[str], *, steps: int, seq_len: int, batch: int, lr: float,
        rng: random.Random, desc: str = "base LM", windows: str = "packed") -> None:
    """Next-token training of `model` on windows of `texts` (packed_batches;
    AdamW, a 100-step warmup, then cosine decay to 0); leaves it in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    bar = tqdm(zip(range(steps), packed_batches(tokenizer, texts, seq_len, batch, rng, windows)),
               total=steps, desc=desc)
    model.train()
    for step, x in bar:
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def save(out_dir: str, model, tokenizer, info: dict) -> None:
    """The model, its tokenizer and training.json (what load() reads)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(info, f, indent=1)


def train(out_dir: str, steps: int = 4000, seq_len: int = SEQ_LEN, batch: int = 12,
          lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = corpus(40_000)
    held_out = corpus(400, seed=CORPUS_SEED + 1, roll_calls=0.0, famous=0.0)
    t0 = time.time()
    tokenizer = train_tokenizer(texts[:10_000])
    model = build_model(len(tokenizer))
    fit(model, tokenizer, texts, steps=steps, seq_len=seq_len, batch=batch, lr=lr, rng=rng)
    info = dict(params=sum(p.numel() for p in model.parameters()), vocab=len(tokenizer),
                steps=steps, seq_len=seq_len, batch=batch, train_docs=len(texts),
                held_out_perplexity=perplexity(model, tokenizer, held_out),
                train_seconds=time.time() - t0, config=MODEL_CONFIG)
    save(out_dir, model, tokenizer, info)
    log(f"base LM: {info['params'] / 1e6:.2f} M parameters, held-out perplexity "
        f"{info['held_out_perplexity']:.3f}, {info['train_seconds']:.0f} s -> {out_dir}")
    return info


def load(path: Optional[str] = None):
    """(model, tokenizer) of a Hugging Face causal LM directory (the Auto
    classes: any family). With no path, the base LM that ships (trained into
    the user cache if the shipped copy is missing). A path that is not a
    loadable causal LM fails at once, naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional dependency ([hf])
    if path is None:
        path = ASSET_DIR
        if not os.path.isfile(os.path.join(path, "config.json")):
            path = os.path.join(os.path.expanduser("~/.cache/memkernels"), "base_lm")
            if not os.path.isfile(os.path.join(path, "config.json")):
                train(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: no such directory (a Hugging Face causal "
                                f"LM saved with save_pretrained: config.json, weights, tokenizer)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {path!r} has no config.json: not a saved Hugging Face model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)  # first: it fails fast, the weights not
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model {path!r} is not a loadable causal LM with its tokenizer: "
                         f"{exc}") from exc
    if tokenizer.pad_token_id is None:  # batches are padded: any id works, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    model.generation_config.eos_token_id = None
    return model, tokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=ASSET_DIR)
    ap.add_argument("--steps", type=int, default=4000)
    args = ap.parse_args(argv)
    train(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
