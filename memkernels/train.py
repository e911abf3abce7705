"""Train a memory with the host LLM frozen.

    python -m memkernels.train --mode written --steps 1500 --out runs/written
    torchrun --nproc_per_node 2 -m memkernels.train ...     # DDP, unchanged

Model-agnostic: `Trainer` takes any HF causal LM, a MemoryModel and an
iterator of `Batch`es. Only the memory's parameters are optimised (AdamW,
gradient clipping, optional bf16 autocast, gradient accumulation); the LLM is
attached to, frozen, and left bitwise unchanged. Checkpoints are safetensors
(memory weights, AdamW moments, step) and resume exactly: batches are a pure
function of (seed, rank, step).

Two ways knowledge enters the memory (Batch.write_ids decides per batch):
- trained memory: no write; the model reads the trainable initial bank (the
  blend rule), or with Trainer(bank=...) the slots of that bank, the memory
  itself frozen (any rule: an append bank store() made from the corpus, then
  optimised on it), so the corpus is learned into the bank itself;
- written memory: each row's texts are written into a fresh bank first
  (differentiable), then the row's questions are answered from it, so the
  write and read projections and gates learn what to store.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import memkernels
from memkernels.integration import write_layer_hidden
from memkernels.memory import MemoryBank, MemoryModel, _atomic_write


@dataclasses.dataclass
class Batch:
    """input_ids/attention_mask [B, T]; labels [B, T] (-100 = no loss);
    write_ids/write_mask [B, n, Tw]: row b's n texts to write first (None =
    read the trained bank). For TrainConfig.address_loss: address_targets
    [B, n], the token of text j that a question about it should find (-1:
    none); asks [Q, 3], rows (b, t, j): position t of row b asks about text j."""
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    write_ids: Optional[Tensor] = None
    write_mask: Optional[Tensor] = None
    address_targets: Optional[Tensor] = None
    asks: Optional[Tensor] = None


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 50
    schedule: str = "cosine"  # after the warmup: "cosine" decay to 0, or "constant"
    grad_accum: int = 1
    clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 250
    out_dir: Optional[str] = None
    progress: bool = True
    # parameter-name prefix -> lr multiplier (the first prefix that matches);
    # e.g. pre-trained parameters that should move slowly
    lr_scales: dict = dataclasses.field(default_factory=dict)
    # append rule: weight of append_memory.address_contrastive on batches with
    # asks (each question's first-reader query against every written target of
    # the batch); without it the joint training pulls the pre-trained address
    # away (benchmarks/NOTES.md, session 8: N=100 32% without, ~80% with)
    address_loss: float = 0.0
    address_temperature: float = 0.05

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', "
                             f"got {self.schedule!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of a step: a linear warmup, then the schedule."""
        warm = min(1.0, (step + 1) / max(self.warmup, 1))
        if self.schedule == "constant":
            return self.lr * warm
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / max(self.steps, 1), 1.0)))


class _MemoryStep(nn.Module):
    """The unit DDP wraps: it owns only the memory, and the bank's slots when
    a bank is trained (the LLM is not a submodule, so DDP never sees or syncs
    its frozen parameters)."""

    def __init__(self, llm: nn.Module, memory: MemoryModel, address_loss: float = 0.0,
                 address_temperature: float = 0.05, bank: Optional[MemoryBank] = None):
        super().__init__()
        self.memory = memory
        self.bank_slots = None if bank is None else nn.Parameter(bank.mem.detach().clone())
        object.__setattr__(self, "llm", llm)  # not registered
        self.handle = memkernels.attach(llm, memory)
        self.address_loss, self.address_temperature = address_loss, address_temperature
        self._read_input: list[Tensor] = []
        if address_loss:
            # the first reading layer's output before the memory adds to it (runs first)
            layer = self.handle.layers[memory.config.resolved_read_layers[0]]
            self._capture = layer.register_forward_hook(
                lambda m, a, out: self._read_input.append(out[0] if isinstance(out, tuple) else out),
                prepend=True)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.memory
        hidden = None
        if batch.write_ids is None:
            bank = (memory.trainable_bank() if self.bank_slots is None
                    else MemoryBank(memory, self.bank_slots))
        else:
            B, n, Tw = batch.write_ids.shape
            hidden, value_hidden, context = write_layer_hidden(
                self.llm, memory, batch.write_ids.reshape(B * n, Tw),
                batch.write_mask.reshape(B * n, Tw))
            mask = batch.write_mask.reshape(B, n * Tw)
            start = memory.fresh_mem(B, memory.slots_to_store(int(mask.sum(1).max())))
            per_row = lambda h: None if h is None else h.reshape(B, n * Tw, -1)  # noqa: E731
            bank = MemoryBank(memory, memory.write(start, per_row(hidden), mask.bool(),
                                                   per_row(value_hidden), per_row(context)))
        self.handle.bank = bank
        self._read_input.clear()
        logits = self.llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits, labels = logits[:, :-1].float(), batch.labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           labels.reshape(-1), ignore_index=-100)
        if self.address_loss and batch.asks is not None and hidden is not None:
            loss = loss + self.address_loss * self._address_loss(batch, hidden, context)
        scored = labels != -100
        correct = ((logits.argmax(-1) == labels) & scored).sum()
        return loss, correct, scored.sum()

    def _address_loss(self, batch: Batch, write_hidden: Tensor,
                      write_context: Optional[Tensor]) -> Tensor:
        """append_memory.address_contrastive of each ask's first-reader query
        against the addresses of every text's target token in the batch."""
        from memkernels.append_memory import address_contrastive  # noqa: PLC0415
        memory, (B, n, Tw) = self.memory, batch.write_ids.shape
        has = batch.address_targets >= 0
        cand_b, cand_j = has.nonzero(as_tuple=True)
        index = torch.full((B, n), -1, dtype=torch.long, device=has.device)
        index[cand_b, cand_j] = torch.arange(len(cand_b), device=has.device)
        def targets(h):  # [B * n, Tw, C] -> the target tokens' rows [K, 1, C]
            return h.reshape(B, n, Tw, -1)[cand_b, cand_j, batch.address_targets[cand_b, cand_j]][:, None]
        keys = memory.raw_address_keys(
            targets(write_hidden), None if write_context is None else targets(write_context))[:, 0]
        b, t, j = batch.asks.unbind(1)
        read_context = self.handle.context
        queries = memory.readers[0].raw_queries(
            self._read_input[0][b, t][:, None],
            None if not memory.config.context_decay else read_context[b, t][:, None])[:, 0]
        return address_contrastive(queries, keys, index[b, j], self.address_temperature)


def trainer_rank() -> int:
    return _distributed()[0]


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Optimises `memory` attached to the frozen `llm` on batches from
    make_batch(step, rank) (a pure function, so a resumed run sees the same
    data). With `bank`, optimises that bank's slots instead (on batches
    without writes), the memory frozen for the run; `trainer.bank` is the
    result."""

    def __init__(self, llm: nn.Module, memory: MemoryModel,
                 make_batch: Callable[[int, int], Batch], config: TrainConfig,
                 bank: Optional[MemoryBank] = None):
        self.config, self.make_batch = config, make_batch
        self.rank, self.world = _distributed()
        torch.manual_seed(config.seed)
        if bank is not None and (bank.memory is not memory or bank.batch_size != 1):
            raise ValueError("bank: a one-row bank of this memory (memory.store(...) or "
                             "memory.new_bank())")
        self.step_module = _MemoryStep(llm, memory, config.address_loss,
                                       config.address_temperature, bank)
        # the parameters this run optimises: the memory's, or the bank's slots alone
        self._memory_requires_grad = {p: p.requires_grad for p in memory.parameters()}
        if bank is not None:
            for p in memory.parameters():
                p.requires_grad_(False)
        groups: dict[float, list] = {}
        for name, p in self._named_trained():
            scale = next((v for k, v in config.lr_scales.items() if name.startswith(k)), 1.0)
            if scale == 0:  # frozen for the run: no gradient computed, no optimizer state
                p.requires_grad_(False)
            if p.requires_grad:
                groups.setdefault(float(scale), []).append(p)
        self.model = self.step_module
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.step_module,
                                                             find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(
            [dict(params=ps, lr_scale=scale) for scale, ps in groups.items()],
            lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0

    @property
    def memory(self) -> MemoryModel:
        return self.step_module.memory

    @property
    def bank(self) -> Optional[MemoryBank]:
        """The trained bank (a copy), when the Trainer was given one."""
        slots = self.step_module.bank_slots
        return None if slots is None else MemoryBank(self.memory, slots.detach().clone())

    def _named_trained(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what this run optimises (checkpoint names)."""
        slots = self.step_module.bank_slots
        return list(self.memory.named_parameters()) if slots is None else [("bank", slots)]

    def train(self, until: Optional[int] = None) -> dict:
        """Runs steps up to `until` (default: config.steps); returns the history."""
        c = self.config
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(range(self.step, min(until or c.steps, c.steps)), initial=self.step,
                   total=c.steps, desc="train memory",
                   disable=not c.progress or self.rank != 0)
        history = []
        for step in bar:
            for group in self.optimizer.param_groups:
                group["lr"] = c.lr_at(step) * group["lr_scale"]
            loss_sum, correct, scored = 0.0, 0, 0
            for micro in range(c.grad_accum):
                batch = self.make_batch(step * c.grad_accum + micro, self.rank)
                with torch.autocast("cpu" if self.memory.init_bank.device.type == "cpu" else "cuda",
                                    dtype=torch.bfloat16, enabled=c.bf16):
                    loss, ok, n = self.model(batch)
                (loss / c.grad_accum).backward()
                loss_sum += loss.item() / c.grad_accum
                correct, scored = correct + int(ok), scored + int(n)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in self._named_trained()],
                                                       c.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            acc = correct / max(scored, 1)
            history.append(dict(step=self.step, loss=loss_sum, accuracy=acc,
                                grad_norm=float(grad_norm)))
            bar.set_postfix(loss=f"{loss_sum:.3f}", acc=f"{acc:.2f}")
            if c.out_dir and (self.step % c.checkpoint_every == 0 or self.step == c.steps):
                self.save_checkpoint(os.path.join(c.out_dir, "checkpoint"))
        return dict(history=history)

    def close(self) -> None:
        """Detaches the memory: the LLM is as it was, and so are the memory's
        requires_grad flags (parameters frozen for the run: an lr scale of 0,
        or all of them while a bank trains)."""
        self.step_module.handle.detach()
        for p, flag in self._memory_requires_grad.items():
            p.requires_grad_(flag)
        if hasattr(self.step_module, "_capture"):
            self.step_module._capture.remove()

    # --- checkpoints -------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """memory/ (save_pretrained), bank.safetensors when a bank is trained,
        and trainer.safetensors (AdamW moments and step counts per parameter
        name, the step). Rank 0 writes."""
        if self.rank != 0:
            return
        from safetensors.torch import save_file  # noqa: PLC0415
        self.memory.save_pretrained(os.path.join(directory, "memory"))
        if self.step_module.bank_slots is not None:
            self.bank.save(os.path.join(directory, "bank.safetensors"))
        names = {p: n for n, p in self._named_trained()}
        tensors = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"{key}/{names[p]}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta = {"step": str(self.step), "config": json.dumps(dataclasses.asdict(self.config))}
        _atomic_write(os.path.join(directory, "trainer.safetensors"),
                      lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load_checkpoint(self, directory: str) -> None:
        from safetensors import safe_open  # noqa: PLC0415
        loaded = MemoryModel.from_pretrained(os.path.join(directory, "memory"),
                                             map_location=self.memory.init_bank.device)
        self.memory.load_state_dict(loaded.state_dict())  # parameters and buffers, in place
        if self.step_module.bank_slots is not None:
            saved = MemoryBank.load(os.path.join(directory, "bank.safetensors"), self.memory)
            with torch.no_grad():
                self.step_module.bank_slots.copy_(saved.mem)
        params = dict(self._named_trained())
        with safe_open(os.path.join(directory, "trainer.safetensors"), framework="pt") as f:
            self.step = int(f.metadata()["step"])
            for key in f.keys():
                slot, name = key.split("/", 1)
                p = params[name]
                value = f.get_tensor(key)
                self.optimizer.state[p][slot] = value.to(p.device) if value.dim() else value


# after pretrain_address, what it fitted stays as it is in the joint training:
# the address, the first reader's query and the norms in front of them. At
# lr / 10 with a contrastive address loss the joint training still pulled the
# address away from the standalone questions it was fitted on (the read found
# the asked statement among 1000 36% of the time, against 57% before it) and
# recall fell with it (benchmarks/NOTES.md, session 9)
PRETRAINED_LR_SCALES = {"address.": 0.0, "slot_key": 0.0, "readers.0.query.": 0.0,
                        "readers.0.norm.": 0.0, "write_norm.": 0.0, "keep.": 0.0}


def append_joint_config(**overrides) -> TrainConfig:
    """The joint training of an append-rule memory after pretrain_address:
    the pre-trained parameters frozen (PRETRAINED_LR_SCALES), AdamW's usual
    weight decay, a constant rate after the warmup (the curriculum reaches
    the most facts per episode late; benchmarks/NOTES.md, session 8)."""
    return TrainConfig(**{**dict(weight_decay=0.01, lr_scales=PRETRAINED_LR_SCALES,
                                 schedule="constant"), **overrides})


def pretrain_address(memory, llm: nn.Module, tokenizer, queries: list[str], statements: list[str],
                     targets: list[int], *, steps: int, batch: int = 256, lr: float = 1e-3,
                     seed: int = 0, progress: bool = True) -> list[float]:
    """Pre-trains an append-rule memory's address (the address MLP, slot_key
    and the first reader's query MLP) with the LLM frozen: query text i must
    find token targets[i] of statement i, when its statement and those of the
    other batch - 1 pairs are written (every token a candidate, its own
    statement's other tokens too), scored as the read scores
    (append_memory.address_nll). First fits the MLPs' input statistics on the
    same states. Without it the joint training does not find the address in
    a few thousand steps (benchmarks/NOTES.md, sessions 5-7). Returns the
    losses."""
    from memkernels.append_memory import AppendMemory, address_nll  # noqa: PLC0415
    from memkernels.integration import text_end_states  # noqa: PLC0415
    if not isinstance(memory, AppendMemory):
        raise TypeError("pretrain_address needs an append-rule memory "
                        "(MemoryConfig(write_rule='append'))")
    decay = memory.config.context_decay
    if not len(queries) == len(statements) == len(targets) or len(queries) < 2:
        raise ValueError(f"queries, statements and targets must be as long, at least 2, got "
                         f"{len(queries)}, {len(statements)}, {len(targets)}")
    batch = min(batch, len(queries))
    device = memory.init_bank.device
    layers = [i + 1 for i in memory.config.resolved_read_layers]  # hidden_states index
    ends = text_end_states(llm, tokenizer, queries, context_decay=decay)
    q_states, q_context = ends if decay else (ends, None)
    q_states = q_states[:, layers].to(device)  # [N, readers, C]
    q_context = q_context.to(device) if decay else None  # [N, C]
    tokens, token_contexts = [], []
    for i in range(0, len(statements), 100):
        ids = [tokenizer(t)["input_ids"] for t in statements[i:i + 100]]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            hidden, _, context = write_layer_hidden(llm, memory, input_ids, mask)
        tokens += [hidden[r, :len(x)] for r, x in enumerate(ids)]
        if decay:
            token_contexts += [context[r, :len(x)] for r, x in enumerate(ids)]
    for t, (tok_states, target) in enumerate(zip(tokens, targets)):
        if not 0 <= target < len(tok_states):
            raise ValueError(f"targets[{t}] = {target} is not a token of statement {t} "
                             f"({len(tok_states)} tokens)")
    # reader 0 is pre-trained on the question ends alone: its statistics from
    # there; the others read every position untrained: theirs from every token
    # of the questions (fitted on the ends alone, N=100 came out 72-81%)
    every = text_end_states(llm, tokenizer, queries[:1000], every_token=True, context_decay=decay)
    every, every_context = every if decay else (every, None)
    memory.fit_statistics(torch.cat(tokens), [q_states[:, 0]] + [every[:, i].to(device)
                                                                 for i in layers[1:]],
                          torch.cat(token_contexts) if decay else None,
                          [q_context] + [every_context.to(device)] * (len(layers) - 1)
                          if decay else None)
    reader = memory.readers[0]
    gate = list(memory.keep.parameters()) if memory.keep is not None else []
    params = [*memory.address.parameters(), memory.slot_key, *reader.query.parameters(), *gate]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm  # noqa: PLC0415
    bar = tqdm(range(steps), desc="pre-train address", disable=not progress)
    losses = []
    for _ in bar:
        rows = torch.randperm(len(queries), generator=gen)[:batch].tolist()
        candidates = torch.cat([tokens[r] for r in rows])[None]  # [1, K, C]
        contexts = torch.cat([token_contexts[r] for r in rows])[None] if decay else None
        starts = torch.tensor([0] + [len(tokens[r]) for r in rows[:-1]]).cumsum(0)
        target = (starts + torch.tensor([targets[r] for r in rows])).to(device)
        # [batch, P, Dh]: copy 0 of each pair
        q = reader.queries(q_states[rows, :1], q_context[rows, None] if decay else None)[:, 0, 0]
        loss = address_nll(q, memory.address_keys(candidates, contexts)[0], target, reader.scale)
        if gate:
            is_target = candidates.new_zeros(candidates.shape[1]).index_fill_(0, target, 1.0)
            loss = loss + F.binary_cross_entropy_with_logits(memory.keep_logits(candidates)[0],
                                                             is_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def main(argv=None) -> None:
    from memkernels.recall import base_lm, tasks  # noqa: PLC0415
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=("written", "trained"), default="written")
    ap.add_argument("--facts", type=int, default=1000, help="trained mode: facts in the corpus")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16,
                    help="rows a step (written mode, append rule: batch / 2 episodes)")
    ap.add_argument("--lr", type=float, default=None,
                    help="default 3e-3; a trained append bank: recall.benchmark.TRAINED_LR")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--write-rule", choices=("blend", "append"), default="append",
                    help="how a write enters the bank (MemoryConfig.write_rule); trained mode: "
                         "append trains the slots of a bank that --memory stored the facts in, "
                         "blend a blend-rule memory's bank from scratch")
    ap.add_argument("--memory", default=None,
                    help="trained mode, append rule: the written memory whose bank is trained "
                         "(default: the one that ships, memkernels/recall/assets/written_memory)")
    ap.add_argument("--pretrain-steps", type=int, default=6000,
                    help="append rule: steps of pretrain_address before the joint training")
    ap.add_argument("--model", default=base_lm.ASSET_DIR, help="an HF causal LM directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = ap.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    model, tokenizer = base_lm.load(args.model)
    append = args.mode == "written" and args.write_rule == "append"
    trained_bank = args.mode == "trained" and args.write_rule == "append"
    bank = None
    if trained_bank:  # the written memory's bank of the facts, its slots trained
        from memkernels.recall import benchmark  # noqa: PLC0415
        memory = MemoryModel.from_pretrained(args.memory or benchmark.WRITTEN_MEMORY)
        bank = tasks.stored_facts(memory, model, tokenizer, args.facts)
        make_batch = tasks.trained_batches(tokenizer, args.batch, args.seed, args.facts,
                                           aux_facts=0)
    else:
        memory = (tasks.written_memory(model, slots=args.slots, seed=args.seed) if append
                  else tasks.default_memory(model, slots=args.slots, seed=args.seed))
        make_batch = (tasks.append_episodes(tokenizer, args.batch // 2, args.seed, args.steps)
                      if append else tasks.written_batches(tokenizer, args.batch, args.seed)
                      if args.mode == "written"
                      else tasks.trained_batches(tokenizer, args.batch, args.seed, args.facts))
    if append and not args.resume:
        pretrain_address(memory, model, tokenizer, *tasks.address_pairs(tokenizer),
                         steps=args.pretrain_steps, seed=args.seed, progress=trainer_rank() == 0)
    if args.lr is None:
        from memkernels.recall.benchmark import TRAINED_LR  # noqa: PLC0415
        args.lr = TRAINED_LR if trained_bank else 3e-3
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
    if trainer.rank == 0:
        last = result["history"][-20:]
        print(json.dumps({"mode": args.mode, "steps": trainer.step,
                          "loss": sum(h["loss"] for h in last) / max(len(last), 1),
                          "accuracy": sum(h["accuracy"] for h in last) / max(len(last), 1)}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
