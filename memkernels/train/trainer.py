"""Train a memory with the host LLM frozen.

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

import dataclasses
import glob
import json
import math
import os
import shutil
import uuid
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
import safetensors.torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from memkernels.hf import attach, write_layer_hidden
from memkernels.memory.append import address_contrastive
from memkernels.memory.bank import MemoryBank
from memkernels.memory.base import MemoryModel
from memkernels.memory.files import atomic_write, fsync_directory, remove_stale


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
    # append rule: weight of memory.append.address_contrastive on batches with
    # asks (each question's first-reader query against every written target of
    # the batch); without it the joint training pulls the pre-trained address
    # away (docs/design.md, "Training the append rule")
    address_loss: float = 0.0
    address_temperature: float = 0.05

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', "
                             f"got {self.schedule!r}")
        for name, low in (("steps", 0), ("warmup", 0), ("grad_accum", 1), ("checkpoint_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"TrainConfig.{name} must be a positive number, got {value!r}")

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
        # a trained bank: its slots' heads that the rule lets training move are the
        # parameter, the rest (memory.fixed_bank_heads: the copy rule's content)
        # a buffer, so no optimizer (weight decay included) ever touches them
        self.bank_slots = None
        self.register_buffer("_bank_order", None, persistent=False)  # None: heads in order
        if bank is not None:
            mem = bank.mem.detach()
            fixed = sorted(set(memory.fixed_bank_heads))
            if any(not 0 <= h < mem.shape[1] for h in fixed):
                raise ValueError(f"{type(memory).__name__}.fixed_bank_heads must be heads of "
                                 f"its bank, in [0, {mem.shape[1]}), got {fixed}")
            learned = [h for h in range(mem.shape[1]) if h not in fixed]
            self.bank_slots = nn.Parameter(mem[:, learned].clone())
            self.register_buffer("bank_fixed", mem[:, fixed].clone(), persistent=False)
            if fixed and fixed != list(range(len(learned), mem.shape[1])):
                # a buffer: it moves with the module, no copy to the device per step
                self._bank_order = torch.tensor(learned + fixed).argsort()
        object.__setattr__(self, "llm", llm)  # not registered
        self.handle = attach(llm, memory)
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
            bank = (MemoryBank(memory, self.bank_mem()) if self.bank_slots is not None
                    else self._trainable_bank(memory))
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

    def bank_mem(self) -> Tensor:
        """The trained bank's content [1, H, S, Dh]: the trained heads and the
        fixed ones, in the bank's head order."""
        if not self.bank_fixed.shape[1]:
            return self.bank_slots
        mem = torch.cat([self.bank_slots, self.bank_fixed], 1)
        return mem if self._bank_order is None else mem[:, self._bank_order]

    def load_bank(self, mem: Tensor) -> None:
        """Sets the trained bank's content (a checkpoint's) in place."""
        learned = self.bank_slots.shape[1]
        order = torch.arange(mem.shape[1]) if self._bank_order is None else \
            self._bank_order.argsort()
        with torch.no_grad():
            mem = mem[:, order.to(mem.device)]
            self.bank_slots.copy_(mem[:, :learned])
            self.bank_fixed.copy_(mem[:, learned:])

    @staticmethod
    def _trainable_bank(memory: MemoryModel) -> MemoryBank:
        """The bank a batch without writes reads: the memory's own trained bank."""
        if not hasattr(memory, "trainable_bank"):
            raise ValueError(f"a batch without writes reads a trained bank, and a "
                             f"{type(memory).__name__} has none: write in every batch, or give "
                             f"Trainer(bank=...) a bank whose slots to train")
        return memory.trainable_bank()

    def _address_loss(self, batch: Batch, write_hidden: Tensor,
                      write_context: Optional[Tensor]) -> Tensor:
        """memory.append.address_contrastive of each ask's first-reader query
        against the addresses of every text's target token in the batch."""
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
            raise ValueError("bank: a one-row bank of this memory (memkernels.store(...) or "
                             "memory.new_bank())")
        self._bank_entries = None if bank is None else bank.entries
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
            # a trained bank's fixed heads are the same on every rank: no broadcast
            self.model = nn.parallel.DistributedDataParallel(
                self.step_module, find_unused_parameters=True,
                broadcast_buffers=self.step_module.bank_slots is None)
        self.optimizer = torch.optim.AdamW(
            [dict(params=ps, lr_scale=scale) for scale, ps in groups.items()],
            lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0

    @property
    def memory(self) -> MemoryModel:
        return self.step_module.memory

    @property
    def bank(self) -> Optional[MemoryBank]:
        """The trained bank (a copy), when the Trainer was given one; it keeps
        the given bank's stored texts (`entries`: training moves what the
        slots hold, not which text each slot is of)."""
        if self.step_module.bank_slots is None:
            return None
        bank = MemoryBank(self.memory, self.step_module.bank_mem().detach().clone())
        if self._bank_entries is not None:
            bank.entries = self._bank_entries
        return bank

    def _named_trained(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what this run optimises (checkpoint names)."""
        slots = self.step_module.bank_slots
        return list(self.memory.named_parameters()) if slots is None else [("bank", slots)]

    def train(self, until: Optional[int] = None) -> dict:
        """Runs steps up to `until` (default: config.steps); returns the history."""
        c = self.config
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
        """Saves memory/ (save_pretrained), bank.safetensors when a bank is
        trained, and trainer.safetensors (AdamW moments and step counts per
        parameter name, the step), atomically as a group: all parts go into a
        fresh folder NAME-step<N>-<id> beside `directory`, which then becomes
        what the symbolic link `directory` points to (one rename). A kill at any
        point leaves `directory` naming a complete checkpoint, old or new;
        folders and temporary files of killed saves are removed by the next
        save. Rank 0 writes."""
        if self.rank != 0:
            return
        path = os.path.abspath(directory)
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent, f".{name}.tmp-")
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            self.memory.save_pretrained(os.path.join(tmp, "memory"))
            if self.step_module.bank_slots is not None:
                self.bank.save(os.path.join(tmp, "bank.safetensors"))
            names = {p: n for n, p in self._named_trained()}
            tensors = {}
            for p, state in self.optimizer.state.items():
                for key, value in state.items():
                    tensors[f"{key}/{names[p]}"] = torch.as_tensor(value).detach().cpu().contiguous()
            meta = {"step": str(self.step), "config": json.dumps(dataclasses.asdict(self.config))}
            atomic_write(os.path.join(tmp, "trainer.safetensors"),
                         lambda t: safetensors.torch.save_file(tensors, t, metadata=meta))
            final = os.path.join(parent, f"{name}-step{self.step}-{uuid.uuid4().hex[:8]}")
            os.rename(tmp, final)  # complete: a folder of this name is never partial
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_directory(parent)
        if os.path.isdir(path) and not os.path.islink(path):  # a checkpoint folder of before
            os.rename(path, os.path.join(parent, f"{name}-step0-legacy-{uuid.uuid4().hex[:8]}"))
        link = os.path.join(parent, f".{name}.tmp-{os.getpid()}-link")
        os.symlink(os.path.basename(final), link)
        os.replace(link, path)  # the commit: one atomic rename
        fsync_directory(parent)
        for old in _checkpoint_folders(parent, name):  # the previous ones
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: str) -> None:
        """Loads what save_checkpoint wrote (also a plain folder of the same
        parts); with no `directory`, the newest complete checkpoint beside it."""
        path = os.path.abspath(directory)
        if not os.path.exists(path):
            found = _checkpoint_folders(*os.path.split(path))
            if not found:
                raise FileNotFoundError(f"no checkpoint at {directory!r}")
            path = found[-1]
        loaded = MemoryModel.from_pretrained(os.path.join(path, "memory"),
                                             map_location=self.memory.init_bank.device)
        self.memory.load_state_dict(loaded.state_dict())  # parameters and buffers, in place
        if self.step_module.bank_slots is not None:
            saved = MemoryBank.load(os.path.join(path, "bank.safetensors"), self.memory)
            self.step_module.load_bank(saved.mem.to(self.step_module.bank_slots.device))
        params = dict(self._named_trained())
        with safe_open(os.path.join(path, "trainer.safetensors"), framework="pt") as f:
            self.step = int(f.metadata()["step"])
            for key in f.keys():
                slot, name = key.split("/", 1)
                p = params[name]
                value = f.get_tensor(key)
                if value.dim() and value.shape != p.shape:
                    raise ValueError(f"checkpoint {path!r}: optimizer state {key!r} is "
                                     f"{tuple(value.shape)}, the parameter "
                                     f"{tuple(p.shape)}: saved by another configuration")
                self.optimizer.state[p][slot] = value.to(p.device) if value.dim() else value


def _checkpoint_folders(parent: str, name: str) -> list[str]:
    """The complete checkpoint folders NAME-step<N>-<id> in `parent`, oldest step first."""
    def step(folder: str) -> int:
        return int(os.path.basename(folder)[len(name) + 5:].split("-", 1)[0])
    found = [f for f in glob.glob(os.path.join(parent, glob.escape(name) + "-step*-*"))
             if os.path.isdir(f) and os.path.basename(f)[len(name) + 5:].split("-", 1)[0].isdigit()]
    return sorted(found, key=lambda f: (step(f), os.path.getmtime(f)))
