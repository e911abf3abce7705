"""The trainer and the recall tasks, on a tiny LM with a tokenizer trained here."""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

import memkernels  # noqa: E402
from memkernels.apps.recall import base_lm, facts, tasks  # noqa: E402
from memkernels.train import PRETRAINED_LR_SCALES, Trainer, TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)


def tiny_lm(vocab: int):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- facts ---------------------------------------------------------------------------

def test_benchmark_names_never_come_from_the_training_stream():
    eval_facts, distractors = facts.make_facts(300, seed=3, distractors=True)
    assert all(facts.name_split(f.subject) == "eval" for f in eval_facts + distractors)
    assert len({f.subject for f in eval_facts + distractors}) == 600
    rng = random.Random(0)
    assert all(facts.name_split(tasks.random_fact(rng).subject) == "train" for _ in range(500))
    corpus_names = {w for d in base_lm.corpus(200) for w in d.split() if w.istitle()}
    assert not {f.subject for f in eval_facts} & corpus_names


def test_questions_use_other_templates_than_statements():
    rng = random.Random(0)
    for rel, spec in facts.RELATIONS.items():
        assert not set(spec["statements"]) & set(spec["questions"])
        f = facts.Fact("Zuba", rel, spec["objects"][0])
        assert f.object not in f.question(rng)  # the answer is not in the question


def test_distractors_have_similar_names_and_other_objects():
    real, others = facts.make_facts(50, seed=1, distractors=True)
    for r, d in zip(real, others):
        assert d.relation == r.relation and d.object != r.object and d.subject != r.subject
        assert sum(a != b for a, b in zip(r.subject.lower(), d.subject.lower())) <= 2 or \
            len(r.subject) != len(d.subject)


# --- batches ---------------------------------------------------------------------------

def test_batches_are_pure_functions_of_step_and_rank(tokenizer):
    make = tasks.written_batches(tokenizer, 3, seed=5)
    a, b, c = make(7, 0), make(7, 0), make(7, 1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.write_ids, b.write_ids)
    assert not torch.equal(a.write_ids[:, :1], c.write_ids[:, :1]) or \
        not torch.equal(a.input_ids[:, :4], c.input_ids[:, :4])


def test_labels_score_only_the_answer(tokenizer):
    fact = facts.Fact("Zubako", "city", "Quito")
    ids, labels = tasks.qa_tokens(tokenizer, fact, random.Random(0))
    scored = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(scored) == " Quito."
    ids, labels = tasks.statement_tokens(tokenizer, fact, random.Random(0))
    assert tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100]).startswith(" Quito")


# --- the trainer ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, write_rule", [("written", "blend"), ("written", "append"),
                                              ("trained", "blend")])
def test_training_lowers_the_loss_and_never_touches_the_llm(tokenizer, mode, write_rule):
    model = tiny_lm(len(tokenizer))
    before = snapshot(model)
    memory = tasks.default_memory(model, slots=32 if write_rule == "blend" else 256,
                                  write_rule=write_rule)
    make = (tasks.written_batches(tokenizer, 4, seed=0, facts_per_row=(2, 4)) if mode == "written"
            else tasks.trained_batches(tokenizer, 8, seed=0, n_facts=4, aux_facts=4))
    fixed = make(0, 0)  # one batch, over and over: the loss must go down
    trainer = Trainer(model, memory, lambda step, rank: fixed,
                      TrainConfig(steps=60, lr=1e-2, warmup=1, progress=False))
    history = trainer.train()["history"]
    trainer.close()
    # a random tiny LM's logits are nearly flat (small lm_head after a norm), so
    # the loss cannot fall far; most answers it scores must become right
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert history[0]["accuracy"] < 0.2 and history[-1]["accuracy"] > 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_grad_accumulation_and_bf16_autocast_run(tokenizer):
    model = tiny_lm(len(tokenizer))
    memory = tasks.default_memory(model, slots=16)
    trainer = Trainer(model, memory, tasks.written_batches(tokenizer, 2, seed=0,
                                                           facts_per_row=(2, 3)),
                      TrainConfig(steps=2, grad_accum=2, bf16=True, progress=False))
    history = trainer.train()["history"]
    trainer.close()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert memory.init_bank.dtype == torch.float32  # autocast never changes the parameters


@pytest.mark.parametrize("write_rule", ["blend", "append"])
def test_resume_from_a_checkpoint_is_exact(tokenizer, tmp_path, write_rule):
    make = tasks.written_batches(tokenizer, 2, seed=0, facts_per_row=(2, 3))

    def trainer(steps, out):
        model = tiny_lm(len(tokenizer))
        memory = tasks.default_memory(model, slots=16 if write_rule == "blend" else 128,
                                      write_rule=write_rule)
        scales = PRETRAINED_LR_SCALES if write_rule == "append" else {}
        return Trainer(model, memory, make, TrainConfig(steps=steps, lr=1e-2, out_dir=str(out),
                                                        checkpoint_every=3, progress=False,
                                                        lr_scales=scales))
    straight = trainer(6, tmp_path / "a")
    straight.train()
    resumed = trainer(6, tmp_path / "b")
    trainer(6, tmp_path / "b").train(until=3)  # writes b/checkpoint at step 3
    resumed.load_checkpoint(str(tmp_path / "b" / "checkpoint"))
    assert resumed.step == 3
    resumed.train()
    for (n, p), q in zip(straight.memory.named_parameters(), resumed.memory.parameters()):
        assert torch.equal(p, q), n


def bank_trainer(tokenizer, steps, out=None, fixed=False):
    """A trained append bank: the facts stored by a memory whose reads reach
    the logits (open gates), then the bank's slots trained alone."""
    model = tiny_lm(len(tokenizer))
    torch.manual_seed(1)
    memory = tasks.written_memory(model, slots=256)
    with torch.no_grad():
        for reader in memory.readers:
            reader.gate.fill_(1.0)
    bank = tasks.stored_facts(memory, model, tokenizer, 4)
    make = tasks.trained_batches(tokenizer, 8, seed=0, n_facts=4, aux_facts=0)
    if fixed:
        batch = make(0, 0)
        make = lambda step, rank: batch  # noqa: E731
    config = TrainConfig(steps=steps, lr=3e-2, warmup=1, progress=False, checkpoint_every=3,
                         out_dir=None if out is None else str(out))
    return model, memory, bank, Trainer(model, memory, make, config, bank=bank)


def test_a_bank_trains_alone_and_the_memory_and_llm_stay_as_they_were(tokenizer):
    model, memory, stored, trainer = bank_trainer(tokenizer, 40, fixed=True)
    llm_before, memory_before = snapshot(model), snapshot(memory)
    history = trainer.train()["history"]
    assert all(p.grad is None for p in memory.parameters())  # frozen for the run: no gradients
    trainer.close()
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert not torch.equal(trainer.bank.mem, stored.mem)
    assert all(torch.equal(p, memory_before[n]) for n, p in memory.named_parameters())
    assert all(torch.equal(p, llm_before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in memory.parameters())  # given back after the run
    with pytest.raises(ValueError, match="one-row bank of this memory"):
        Trainer(model, memory, lambda s, r: None, TrainConfig(), bank=memory.new_bank(2))


def test_a_trained_bank_resumes_from_its_checkpoint_exactly(tokenizer, tmp_path):
    straight = bank_trainer(tokenizer, 6)[3]
    straight.train()
    bank_trainer(tokenizer, 6, tmp_path)[3].train(until=3)  # checkpoint at step 3
    resumed = bank_trainer(tokenizer, 6, tmp_path)[3]
    resumed.load_checkpoint(str(tmp_path / "checkpoint"))
    assert resumed.step == 3
    resumed.train()
    assert torch.equal(straight.bank.mem, resumed.bank.mem)


def test_a_copy_bank_trains_its_addresses_and_keeps_its_stored_words(tokenizer, tmp_path):
    """The copy rule's content heads are the stored tokens' output embeddings:
    a trained bank moves its addresses only (weight decay included), keeps
    which slots are written and which text each holds (its entries, for the
    lexical index), and a checkpoint resumes it exactly."""
    from memkernels.train.trainer import Batch
    model = tiny_lm(len(tokenizer))
    memory = tasks.copy_memory(model, slots=128, seed=1)
    with torch.no_grad():
        memory.readers[0].gate_bias.fill_(2.0)  # reads reach the logits: gradients to train on
    texts = ["the captain of Felezath is Numer.", "Zadosox has the motto Reposox.",
             "the port of Fotenel is Besasath."]
    stored = memkernels.store(memory, model, tokenizer, texts)
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch = Batch(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def trainer(steps, out=None):
        config = TrainConfig(steps=steps, lr=3e-2, warmup=1, weight_decay=0.1, progress=False,
                             checkpoint_every=3, out_dir=None if out is None else str(out))
        return Trainer(model, memory, lambda step, rank: batch, config, bank=stored)

    straight = trainer(12)
    history = straight.train()["history"]
    straight.close()
    trained, P = straight.bank, memory.pairs
    assert memory.fixed_bank_heads == tuple(range(P, 2 * P))
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(trained.mem[:, P:], stored.mem[:, P:])  # the stored words, bit for bit
    assert not torch.equal(trained.mem[:, :P], stored.mem[:, :P])
    assert torch.equal(trained.slot_mask(), stored.slot_mask())
    assert torch.equal(trained.entries.tokens, stored.entries.tokens)
    assert torch.equal(trained.entries.slot_entry, stored.entries.slot_entry)
    assert trained.lexical_choice(tokenizer("Felezath captain?")["input_ids"]).tolist() == [0]
    first = trainer(12, tmp_path)
    first.train(until=6)  # checkpoints at steps 3 and 6
    first.close()
    resumed = trainer(12, tmp_path)
    resumed.load_checkpoint(str(tmp_path / "checkpoint"))
    assert resumed.step == 6
    resumed.train()
    resumed.close()
    assert torch.equal(resumed.bank.mem, trained.mem)


def test_a_trained_banks_fixed_heads_may_be_any_of_its_heads(tokenizer, monkeypatch):
    """Fixed heads before learned ones: the bank is put back in its head order,
    and a checkpoint's bank loads into both parts; a head the bank lacks is
    named."""
    from memkernels.train.trainer import _MemoryStep
    model = tiny_lm(len(tokenizer))
    memory = tasks.default_memory(model, slots=32, write_rule="append")
    bank = memkernels.store(memory, model, tokenizer, ["the port of Fotenel is Besasath."])
    H = bank.mem.shape[1]
    monkeypatch.setattr(type(memory), "fixed_bank_heads", property(lambda self: (0,)))
    step = _MemoryStep(model, memory, bank=bank)
    try:
        assert step.bank_slots.shape[1] == H - 1 and step.bank_fixed.shape[1] == 1
        assert torch.equal(step.bank_mem(), bank.mem)
        other = torch.randn_like(bank.mem)
        step.load_bank(other)
        assert torch.equal(step.bank_mem(), other)
        assert torch.equal(step.bank_fixed, other[:, :1])
    finally:
        step.handle.detach()
    monkeypatch.setattr(type(memory), "fixed_bank_heads", property(lambda self: (H,)))
    with pytest.raises(ValueError, match="fixed_bank_heads must be heads of its bank"):
        _MemoryStep(model, memory, bank=bank)


def test_address_loss_adds_the_contrastive_term_and_trains_the_address(tokenizer):
    model = tiny_lm(len(tokenizer))
    memory = tasks.default_memory(model, slots=128, write_rule="append")
    batch = tasks.written_batches(tokenizer, 3, seed=0, facts_per_row=(2, 4))(5, 0)
    assert batch.asks.shape[1] == 3 and len(batch.asks) >= 3
    for b, t, j in batch.asks.tolist():  # each ask predicts its answer, about a written text
        assert batch.labels[b, t] == -100 and batch.labels[b, t + 1] != -100
        assert batch.address_targets[b, j] >= 0
    losses = {}
    for weight in (0.0, 5.0):
        trainer = Trainer(model, memory, lambda step, rank: batch,
                          TrainConfig(steps=1, address_loss=weight, progress=False))
        loss, _, _ = trainer.step_module(batch)
        losses[weight] = loss
        if weight:
            memory.zero_grad()
            loss.backward()
            assert memory.address[1].weight.grad.abs().sum() > 0
            assert memory.readers[0].query[1].weight.grad.abs().sum() > 0
        trainer.close()
    extra = (losses[5.0] - losses[0.0]).item() / 5.0  # the contrastive term itself
    assert 0 < extra < 2 * math.log(int((batch.address_targets >= 0).sum()))
    assert all(len(layer._forward_hooks) == 0 for layer in model.model.layers)  # all removed


def test_learning_rate_schedules():
    assert TrainConfig(steps=100, lr=1.0, warmup=10).lr_at(0) == pytest.approx(0.1)
    for schedule, at_90 in (("cosine", 0.5 * (1 + math.cos(math.pi * 0.9))), ("constant", 1.0)):
        config = TrainConfig(steps=100, lr=1.0, warmup=10, schedule=schedule)
        assert config.lr_at(90) == pytest.approx(at_90)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_lr_scales_set_each_named_parameters_rate_and_zero_freezes_it(tokenizer):
    model = tiny_lm(len(tokenizer))
    memory = tasks.default_memory(model, slots=128, write_rule="append", store_threshold=0.3)
    before = {n: p.detach().clone() for n, p in memory.named_parameters()}
    scales = {**PRETRAINED_LR_SCALES, "slot_value": 0.1}
    trainer = Trainer(model, memory,
                      tasks.written_batches(tokenizer, 2, seed=0, facts_per_row=(2, 3)),
                      TrainConfig(steps=2, lr=1e-2, warmup=1, weight_decay=0.01, lr_scales=scales,
                                  schedule="constant",
                                  progress=False))
    trainer.train()
    training = {n: p.requires_grad for n, p in memory.named_parameters()}  # during the run
    trainer.close()
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in memory.named_parameters():
        scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
        if scale == 0.0:  # frozen: no gradient, no optimizer state, not even weight decay
            assert id(p) not in lrs and not training[name], name
            assert torch.equal(p, before[name]), name
            assert p.requires_grad, name  # given back at close()
        else:
            assert lrs[id(p)] == pytest.approx(1e-2 * scale) and training[name], name
    # what pretrain_address fits is frozen, the rest of the reader trains
    frozen = [n for n, _ in memory.named_parameters() if n.startswith(tuple(PRETRAINED_LR_SCALES))]
    assert any(n.startswith("keep.") for n in frozen) and "readers.0.norm.weight" in frozen
    assert not any(n.startswith(("readers.1.", "token_value", "readers.0.out")) for n in frozen)
    assert not torch.equal(memory.readers[1].query[1].weight, before["readers.1.query.1.weight"])


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path[:0] = [{tests!r}, {package_root!r}]  # the memkernels this pytest imported
    from test_trainer import tiny_lm
    from memkernels.apps.recall import base_lm, tasks
    from memkernels.train import Trainer, TrainConfig
    dist.init_process_group("gloo")
    tok = base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)
    model = tiny_lm(len(tok))
    torch.manual_seed(dist.get_rank())  # different memories per rank: DDP must sync them
    memory = tasks.default_memory(model, slots=16, seed=dist.get_rank())
    trainer = Trainer(model, memory, tasks.written_batches(tok, 2, seed=0, facts_per_row=(2, 3)),
                      TrainConfig(steps=3, progress=False))
    trainer.train()
    flat = torch.cat([p.detach().reshape(-1) for p in memory.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.ok"), "w").close()
    dist.destroy_process_group()
""")


def test_trainer_runs_under_torchrun_with_ddp_on_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    package_root = os.path.dirname(os.path.dirname(memkernels.__file__))
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path),
                                        package_root=package_root))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    def launch(port):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node=2", "--master_addr=127.0.0.1",
                               f"--master_port={port}", str(script)],
                              capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = launch(port)
    # a gloo worker aborted once in CI ("terminate called without an active
    # exception", SIGABRT in torch's own threads, not this code); that abort,
    # and only it, gets one more launch on a fresh port, which must pass
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        result = launch(port)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # both ranks finished, their memories equal after the synced steps
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def test_the_store_gate_keeps_every_answer_token_of_a_statement():
    """Pairs of one multi-token fact share a statement: each marks all of
    that statement's targets as tokens to keep, not only its own."""
    from memkernels.train.append_recipe import store_targets
    rows = store_targets(["a b c", "a b c", "a b c", "x y"], [3, 4, 5, 1])
    assert [r.tolist() for r in rows] == [[3, 4, 5]] * 3 + [[1]]
