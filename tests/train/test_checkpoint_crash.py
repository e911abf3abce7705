"""A process killed (SIGKILL) inside a checkpoint save or a bank save: the
checkpoint stays whole (resuming from it ends where an uninterrupted run
ends), the bank file stays the previous one, and the next save removes what
the killed one left behind. Also: saved files take the umask's permissions,
and TrainConfig refuses settings that would train nothing or divide by zero."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

import memkernels  # noqa: E402
from memkernels.train import TrainConfig, Trainer  # noqa: E402

from test_trainer import tiny_lm  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(memkernels.__file__)))

SETUP = """
import os, signal, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from test_trainer import tiny_lm
from memkernels.apps.recall import base_lm, tasks
from memkernels.train import Trainer, TrainConfig

def make_trainer(out, steps=6):
    tok = base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)
    model = tiny_lm(len(tok))
    memory = tasks.default_memory(model, slots=16)
    return Trainer(model, memory, tasks.written_batches(tok, 2, seed=0, facts_per_row=(2, 3)),
                   TrainConfig(steps=steps, lr=1e-2, out_dir=out, checkpoint_every=3,
                               progress=False))
"""

# killed at the second checkpoint (step 6), after memory/ is written and
# before trainer.safetensors: the moment that resumed with new weights at the
# old step before checkpoints were saved as a group
KILL_IN_CHECKPOINT = SETUP + """
import safetensors.torch
real = safetensors.torch.save_file
def save_file(tensors, path, metadata=None):
    if metadata and metadata.get("step") == "6":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)
safetensors.torch.save_file = save_file
make_trainer({out!r}, steps=9).train()
"""


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_kill_inside_a_checkpoint_save_resumes_as_an_uninterrupted_run(tmp_path):
    out = str(tmp_path / "killed")
    proc = run(KILL_IN_CHECKPOINT.format(tests=TESTS, root=ROOT, out=out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [f for f in os.listdir(out) if f.startswith(".checkpoint.tmp-")]
    assert leftovers  # the killed save's folder is there ...
    scope: dict = {}
    exec(SETUP.format(tests=TESTS, root=ROOT), scope)  # noqa: S102
    resumed = scope["make_trainer"](out, steps=9)
    resumed.load_checkpoint(os.path.join(out, "checkpoint"))
    assert resumed.step == 3  # the last complete checkpoint, all of it
    resumed.train()
    assert not [f for f in os.listdir(out) if f.startswith(".checkpoint.tmp-")]  # ... not now
    assert len([f for f in os.listdir(out) if f.startswith("checkpoint-step")]) == 1
    straight = scope["make_trainer"](str(tmp_path / "straight"), steps=9)
    straight.train()
    for (name, p), q in zip(straight.memory.named_parameters(), resumed.memory.parameters()):
        assert torch.equal(p, q), name


KILL_IN_BANK_SAVE = SETUP + """
from memkernels import MemoryBank
from memkernels.apps.recall import tasks
import safetensors.torch
model = tiny_lm(300)
memory = tasks.default_memory(model, slots=16)
bank = memory.new_bank()
bank.save({path!r})
real = safetensors.torch.save_file
def save_file(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)  # the temporary file is complete: die before the rename
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
MemoryBank(memory, bank.mem * 2).save({path!r})
"""


def test_a_kill_inside_a_bank_save_keeps_the_previous_bank(tmp_path):
    path = str(tmp_path / "user.bank.safetensors")
    proc = run(KILL_IN_BANK_SAVE.format(tests=TESTS, root=ROOT, path=path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # left by the kill
    scope: dict = {}
    exec(SETUP.format(tests=TESTS, root=ROOT), scope)  # noqa: S102
    from memkernels import MemoryBank
    from memkernels.apps.recall import tasks
    memory = tasks.default_memory(tiny_lm(300), slots=16)
    bank = MemoryBank.load(path, memory)
    assert torch.equal(bank.mem, memory.new_bank().mem)  # the first save, whole
    bank.save(path)  # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["user.bank.safetensors"]


def test_saved_files_take_the_umask(tmp_path):
    from memkernels.apps.recall import tasks
    memory = tasks.default_memory(tiny_lm(300), slots=16)
    old = os.umask(0o027)
    try:
        memory.new_bank().save(tmp_path / "b.safetensors")
        memory.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for path in (tmp_path / "b.safetensors", tmp_path / "m" / "memory.safetensors",
                 tmp_path / "m" / "config.json"):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o640), path


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_accum=0), "grad_accum must be an int >= 1"),
    (dict(checkpoint_every=0), "checkpoint_every must be an int >= 1"),
    (dict(steps=-1), "steps must be an int >= 0"),
    (dict(lr=0.0), "lr must be a positive number"),
])
def test_train_config_refuses_settings_that_train_nothing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_a_trainer_without_writes_needs_a_bank_for_an_append_memory():
    from memkernels.apps.recall import tasks
    model = tiny_lm(300)
    memory = tasks.default_memory(model, slots=64, write_rule="append")
    batch = tasks.lm_batch([([1, 2, 3], [-100, 2, 3])], 0)
    trainer = Trainer(model, memory, lambda step, rank: batch,
                      TrainConfig(steps=1, progress=False))
    try:
        with pytest.raises(ValueError, match="Trainer\\(bank=...\\)"):
            trainer.train()
    finally:
        trainer.close()
