"""Train a memory for a frozen Hugging Face causal LM.

    python -m memkernels.apps.recall.train --model DIR --out OUT    # the open memory's recipe
    python -m memkernels.apps.recall.train --world closed --out OUT # the closed-list memory
    python -m memkernels.apps.recall.train --mode trained --facts 1000 --steps 300 --out OUT
    torchrun --nproc_per_node 2 -m memkernels.apps.recall.train ...     # DDP, unchanged

written (the default): a memory trained on episodes (write facts, answer
questions about them), saved to OUT/memory (MemoryModel.from_pretrained(OUT/memory))
with training.json beside it. --world open (the default) draws the episodes
from the open-vocabulary generators in the model's own tokenizer, and every
flag left out takes the recipe of the memory that ships (RECIPES["open"]: the
copy rule; ~10 minutes on 2 cores for a small LM); --world closed, the old
closed-list recipe. trained: a bank whose slots learn the benchmark's facts,
OUT/bank.safetensors. OUT/checkpoint resumes a run (--resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch.distributed as dist

from memkernels.apps.recall import base_lm, benchmark, open_lm, tasks
from memkernels.memory import MemoryModel
from memkernels.train import (Trainer, TrainConfig, append_joint_config, pretrain_address,
                              trainer_rank)


# What a flag left out takes, by --world, for a written memory (a trained bank
# takes "closed"). "open" is the recipe of the memory that ships
# (assets/open_memory/training.json; why each value: docs/performance.md).
RECIPES = {
    "open": dict(model=open_lm.ASSET_DIR, write_rule="copy", steps=300, pretrain_steps=4000,
                 vary_phrasings=0.2, lookahead=True, context_decay=0.9, read_scale_after=40.0,
                 realistic_names=0.75, several_per_subject=0.25, store_threshold_after=0.01,
                 joint_realistic_names=0.0, composed_phrasings=0.5, nested_names=0.0),
    "closed": dict(model=None, write_rule="append", steps=1500, pretrain_steps=6000,
                   vary_phrasings=0.0, lookahead=False, context_decay=tasks.CONTEXT_DECAY,
                   read_scale_after=None, realistic_names=0.0, several_per_subject=0.0,
                   store_threshold_after=None, joint_realistic_names=0.0,
                   composed_phrasings=0.0, nested_names=0.0),
}
# flags that shape only a copy memory, or only the open world's pre-training
_COPY_ONLY = ("lookahead", "context_decay", "read_scale_after", "store_threshold_after")
_OPEN_PRETRAINING = ("vary_phrasings", "realistic_names", "several_per_subject",
                     "joint_realistic_names", "composed_phrasings", "nested_names")
# in OUT: the values a run started with, which --resume takes for the flags left out
RUN_ARGS = "train_args.json"


def _recipe_name(args) -> str:
    """The open recipe is a written append or copy memory's; a trained bank and
    the blend rule (closed-world episodes) take the closed one."""
    if args.mode == "trained" or args.write_rule not in (None, "append", "copy"):
        return "closed"
    return args.world or "open"


def _fill_recipe(args, saved: Optional[dict] = None) -> None:
    """Gives every recipe flag the user left out (None) its value: from
    `saved` (the run being resumed) when given, else from the recipe, where
    that flag applies to the rule and world asked for."""
    for name, value in (saved or {}).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    recipe_name = _recipe_name(args)
    args.world = args.world or recipe_name
    recipe = RECIPES[recipe_name]
    if args.write_rule is None:
        args.write_rule = recipe["write_rule"]
    written_append = args.mode == "written" and args.write_rule in ("append", "copy")
    for name, value in recipe.items():
        if getattr(args, name) is not None:
            continue
        applies = ((name not in _COPY_ONLY or (args.mode == "written"
                                               and args.write_rule == "copy"))
                   and (name not in _OPEN_PRETRAINING or written_append))
        setattr(args, name, value if applies else RECIPES["closed"][name])


def _run_args(args) -> dict:
    """What RUN_ARGS keeps: every value the recipe fills, and the rule and world."""
    return {k: getattr(args, k) for k in ("mode", "world", "write_rule", *RECIPES["open"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("written", "trained"), default="written")
    ap.add_argument("--world", choices=("closed", "open"), default=None,
                    help="written append or copy memory: the episodes' facts, and the recipe "
                         "of every flag left out (RECIPES): open-vocabulary facts (open_facts, "
                         "train splits; the memory that ships; the default), or the "
                         "benchmark's closed lists (the blend rule and trained banks: always)")
    ap.add_argument("--facts", type=int, default=1000, help="trained mode: facts in the corpus")
    ap.add_argument("--steps", type=int, default=None, help="recipe: 300 open, 1500 closed")
    ap.add_argument("--batch", type=int, default=16,
                    help="rows a step (written mode, append rule: batch / 2 episodes)")
    ap.add_argument("--lr", type=float, default=None,
                    help="default 3e-3; a trained append bank: benchmark.TRAINED_LR")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--write-rule", choices=("blend", "append", "copy"), default=None,
                    help="how a write enters the bank (MemoryConfig.write_rule); trained mode: "
                         "append trains the slots of a bank that --memory stored the facts in, "
                         "blend a blend-rule memory's bank from scratch; copy (written mode): "
                         "the read mixes stored tokens into the LM's output (new words); "
                         "recipe: copy open, append closed")
    ap.add_argument("--memory", default=None,
                    help="trained mode, append rule: the written memory whose bank is trained "
                         "(default: the one that ships, memkernels/recall/assets/written_memory)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="append rule: steps of pretrain_address before the joint training "
                         "(recipe: 4000 open, 6000 closed)")
    ap.add_argument("--pretrain-batch", type=int, default=256,
                    help="append rule: question-statement pairs a pretrain_address step (the "
                         "other pairs' tokens are each one's negatives)")
    ap.add_argument("--read-scale-after", type=float, default=None, metavar="X",
                    help="append/copy rule: the saved memory reads at cosine x X (training "
                         "reads at AppendOptions.read_scale, 20): a sharper read of large banks "
                         "(recipe: 40 open)")
    ap.add_argument("--vary-phrasings", type=float, default=None, metavar="P",
                    help="--world open: the address pre-training's statements and questions "
                         "drop and gain words, each with probability P / 2 (open_facts.vary; "
                         "recipe: 0.2 open)")
    ap.add_argument("--composed-phrasings", type=float, default=None, metavar="P",
                    help="--world open: the fraction of the address pre-training's facts "
                         "stated and asked in the train cores recombined (open_facts.COMPOSED: "
                         "sentence shapes the host never read; recipe: 0.5 open)")
    ap.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                    help="written copy memory: a slot's address also reads the next token's "
                         "state (AppendOptions.lookahead), so it knows an object follows where "
                         "the LM did not expect one (recipe: on, open)")
    ap.add_argument("--context-decay", type=float, default=None, metavar="D",
                    help="written copy memory: the address and query also read the mean of the "
                         "embeddings so far, token t-k weighted D^k (AppendOptions.context_decay; "
                         "recipe: 0.9 open, %s otherwise)" % tasks.CONTEXT_DECAY)
    ap.add_argument("--store-threshold-after", type=float, default=None, metavar="T",
                    help="a written append or copy memory: save it with this store threshold "
                         "(AppendOptions.store_threshold; trained at %s; recipe: 0.01 open)"
                         % tasks.STORE_THRESHOLD)
    ap.add_argument("--realistic-names", type=float, default=None, metavar="P",
                    help="--world open: the fraction of the address pre-training's facts about "
                         "a person with a real first and family name (train-split names; "
                         "recipe: 0.75 open)")
    ap.add_argument("--joint-realistic-names", type=float, default=None, metavar="P",
                    help="--world open: the fraction of the joint training episodes' facts "
                         "about a person with a real first and family name (train-split "
                         "names; recipe: 0 open: the joint training moves only the output "
                         "gate, and at 0.25 no dev answer changed)")
    ap.add_argument("--several-per-subject", type=float, default=None, metavar="P",
                    help="--world open: the fraction of the address pre-training's facts given "
                         "3 at a time about one subject (recipe: 0.25 open)")
    ap.add_argument("--nested-names", type=float, default=None, metavar="P",
                    help="--world open: the fraction of the address pre-training's facts drawn "
                         "in pairs about a real name and that name with a first name in front "
                         "(\"Gina Barros\", \"Beatrice Gina Barros\"), same relation, each "
                         "pair in one batch (recipe: 0 open)")
    ap.add_argument("--hard-negatives", action="store_true",
                    help="with --several-per-subject: a pre-training pair drawn into a batch "
                         "brings its subject's other statements (the hard negatives a question "
                         "must be told apart from; pretrain_address(groups=...))")
    ap.add_argument("--model", default=None,
                    help="a Hugging Face causal LM directory, loaded with the Auto classes "
                         "(recipe: the open LM that ships, assets/open_lm; closed: the "
                         "closed-list base LM)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = ap.parse_args(argv)
    saved = None
    if args.resume and os.path.isfile(os.path.join(args.out, RUN_ARGS)):
        with open(os.path.join(args.out, RUN_ARGS)) as f:
            saved = json.load(f)
    _check_flags(ap, args, saved)
    _fill_recipe(args, saved)
    _check_filled(ap, args)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        model, tokenizer = base_lm.load(args.model)
    except (FileNotFoundError, ValueError) as exc:
        ap.error(str(exc))
    _train(args, argv, model, tokenizer)


def _check_flags(ap, args, saved: Optional[dict] = None) -> None:
    """Refuses the flags the user gave (not None) that do not apply to the
    mode, rule and world asked for (or resumed), before anything loads."""
    rule = args.write_rule or (saved or {}).get("write_rule") or RECIPES[_recipe_name(args)][
        "write_rule"]
    world = args.world or (saved or {}).get("world") or _recipe_name(args)
    written_append = args.mode == "written" and rule in ("append", "copy")
    if args.world == "open" and not written_append:
        ap.error("--world open trains a written append or copy memory (the blend rule and "
                 "trained banks use the closed world's facts)")
    if rule == "copy" and args.mode != "written":
        ap.error("--write-rule copy trains a written memory: use --mode written")
    # the open world's pre-training and episode flags: a fresh written append or copy run
    # (--resume skips the pre-training and keeps the run's own values)
    open_fresh = world == "open" and written_append and not args.resume
    if args.vary_phrasings and not open_fresh:
        ap.error("--vary-phrasings varies the address pre-training's phrasings of a written "
                 "append or copy memory on --world open (not with --resume, which skips it)")
    if args.composed_phrasings is not None and not (
            open_fresh and 0.0 <= args.composed_phrasings <= 1.0):
        ap.error("--composed-phrasings takes a fraction in [0, 1], for the address "
                 "pre-training of a written append or copy memory on --world open (not with "
                 "--resume, which skips it)")
    if args.store_threshold_after is not None and not (
            written_append and 0.0 < args.store_threshold_after < 1.0):
        ap.error("--store-threshold-after takes a threshold in (0, 1), for a written append or "
                 "copy memory")
    if (args.realistic_names or args.several_per_subject or args.nested_names) and not open_fresh:
        ap.error("--realistic-names, --several-per-subject and --nested-names shape the "
                 "address pre-training "
                 "of a written append or copy memory on --world open (not with --resume, "
                 "which skips it)")
    if args.joint_realistic_names is not None and not (
            open_fresh and 0.0 <= args.joint_realistic_names <= 1.0):
        ap.error("--joint-realistic-names takes a fraction in [0, 1], for the joint training "
                 "of a written append or copy memory on --world open (not with --resume, "
                 "which keeps the run's own)")
    copy = args.mode == "written" and rule == "copy"
    if args.lookahead and not copy:
        ap.error("--lookahead shapes a written copy memory: use --mode written --write-rule copy")
    if args.context_decay is not None and not copy:
        ap.error("--context-decay shapes a written copy memory: use --mode written "
                 "--write-rule copy")
    if args.context_decay is not None and not 0.0 <= args.context_decay < 1.0:
        ap.error(f"--context-decay takes a decay in [0, 1), got {args.context_decay}")
    if not 0.0 <= (args.vary_phrasings or 0.0) <= 1.0:
        ap.error(f"--vary-phrasings is a probability in [0, 1], got {args.vary_phrasings}")
    if args.read_scale_after is not None and not (written_append and args.read_scale_after > 0):
        ap.error("--read-scale-after takes a positive scale, for a written append or copy memory")


def _check_filled(ap, args) -> None:
    """What only the flags' values together, the recipe's included, decide."""
    if args.hard_negatives and not args.several_per_subject:
        ap.error("--hard-negatives groups the facts --several-per-subject gives about one "
                 "subject: give it a fraction > 0")
    mix = (args.realistic_names, args.several_per_subject, args.nested_names)
    if not (min(mix) >= 0.0 and sum(mix) <= 1.0):
        ap.error(f"--realistic-names, --several-per-subject and --nested-names (with the "
                 f"recipe's values for those left out) are fractions summing to at most 1, "
                 f"got {mix[0]}, {mix[1]} and {mix[2]}")


def _train(args, argv, model, tokenizer) -> None:
    if trainer_rank() == 0:  # what --resume takes for the flags it is not given
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, RUN_ARGS), "w") as f:
            json.dump(_run_args(args), f, indent=1)
    # the copy rule trains as the append rule does (its address is the append rule's)
    append = args.mode == "written" and args.write_rule in ("append", "copy")
    trained_bank = args.mode == "trained" and args.write_rule == "append"
    bank = None
    if trained_bank:  # the written memory's bank of the facts, its slots trained
        memory = MemoryModel.from_pretrained(args.memory or benchmark.WRITTEN_MEMORY)
        bank = tasks.stored_facts(memory, model, tokenizer, args.facts)
        make_batch = tasks.trained_batches(tokenizer, args.batch, args.seed, args.facts,
                                           aux_facts=0)
    else:
        memory = (tasks.copy_memory(model, slots=args.slots, seed=args.seed,
                                    lookahead=args.lookahead, context_decay=args.context_decay)
                  if args.write_rule == "copy" and args.mode == "written"
                  else tasks.written_memory(model, slots=args.slots, seed=args.seed) if append
                  else tasks.default_memory(model, slots=args.slots, seed=args.seed))
        make_batch = (tasks.append_episodes(tokenizer, args.batch // 2, args.seed, args.steps,
                                            world=args.world,
                                            realistic_names=args.joint_realistic_names)
                      if append else tasks.written_batches(tokenizer, args.batch, args.seed)
                      if args.mode == "written"
                      else tasks.trained_batches(tokenizer, args.batch, args.seed, args.facts))
    pretrain_losses = []
    started = time.time()
    if append and not args.resume:
        pairs = tasks.address_pairs(tokenizer, world=args.world, varied=args.vary_phrasings,
                                    realistic_names=args.realistic_names,
                                    several_per_subject=args.several_per_subject,
                                    composed=args.composed_phrasings,
                                    nested_names=args.nested_names)
        pretrain_losses = pretrain_address(
            memory, model, tokenizer, pairs.questions, pairs.statements, pairs.targets,
            steps=args.pretrain_steps, batch=args.pretrain_batch, seed=args.seed,
            groups=(pairs.groups if args.hard_negatives else
                    pairs.nested_groups() if args.nested_names else None),
            progress=trainer_rank() == 0)
    if args.lr is None:
        args.lr = benchmark.TRAINED_LR if trained_bank else 3e-3
    settings = dict(steps=args.steps, lr=args.lr, grad_accum=args.grad_accum, bf16=args.bf16,
                    seed=args.seed, out_dir=args.out)
    trainer = Trainer(model, memory, make_batch,
                      append_joint_config(**settings) if append else TrainConfig(**settings),
                      bank=bank)
    if args.resume:
        trainer.load_checkpoint(os.path.join(args.out, "checkpoint"))
    result = trainer.train()
    trainer.close()
    if trainer.rank == 0 and trained_bank:
        trainer.bank.save(os.path.join(args.out, "bank.safetensors"))
    elif trainer.rank == 0:  # the trained memory: MemoryModel.from_pretrained(OUT/memory)
        if args.read_scale_after is not None:
            memory.set_read_scale(args.read_scale_after)
        if args.store_threshold_after is not None:
            memory.set_store_threshold(args.store_threshold_after)
        memory.save_pretrained(os.path.join(args.out, "memory"))
    if trainer.rank == 0:
        last = result["history"][-20:]
        summary = {"mode": args.mode, "steps": trainer.step,
                   "loss": sum(h["loss"] for h in last) / max(len(last), 1),
                   "accuracy": sum(h["accuracy"] for h in last) / max(len(last), 1)}
        print(json.dumps(summary))
        if not trained_bank:  # what made this memory, beside it
            tail = pretrain_losses[-20:]
            info = {**summary, "command": "python -m memkernels.apps.recall.train " + " ".join(
                        argv if argv is not None else sys.argv[1:]),
                    "write_rule": args.write_rule, "world": args.world,
                    "model": args.model or "the closed-list base LM", "lr": args.lr,
                    "batch": args.batch, "slots": args.slots, "seed": args.seed,
                    "grad_accum": args.grad_accum, "bf16": args.bf16,
                    "vary_phrasings": args.vary_phrasings,
                    "realistic_names": args.realistic_names,
                    "several_per_subject": args.several_per_subject,
                    "joint_realistic_names": args.joint_realistic_names,
                    "composed_phrasings": args.composed_phrasings,
                    "nested_names": args.nested_names,
                    "hard_negatives": args.hard_negatives,
                    "lookahead": args.lookahead,
                    "context_decay": args.context_decay,
                    "read_scale_after": args.read_scale_after,
                    "store_threshold_after": args.store_threshold_after,
                    "pretrain_steps": len(pretrain_losses),
                    "pretrain_batch": args.pretrain_batch,
                    "pretrain_loss": sum(tail) / len(tail) if tail else None,
                    "seconds": time.time() - started}
            with open(os.path.join(args.out, "memory", "training.json"), "w") as f:
                json.dump(info, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
