"""The recall benchmark's code path end to end, on a tiny random LM: every
condition runs, answers are scored against the facts, the report is written.
(The real figures come from `python -m memkernels.apps.recall.benchmark`.)"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import memkernels

pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")
pytest.importorskip("rank_bm25", reason="needs rank_bm25 for the retrieval baseline")

from memkernels.memory import MemoryBank  # noqa: E402
from memkernels.apps.recall import base_lm, benchmark, tasks  # noqa: E402
from memkernels.apps.recall.facts import Fact, make_facts  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    import transformers
    tok = base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model, tok


def test_bm25_finds_the_statement_about_the_subject():
    statements = ["Zuba lives in Lima.", "Kiko works as a baker.", "Zubako owns a cat."]
    retriever = benchmark.BM25Retriever(statements)
    assert retriever.top("Where does Kiko live?", 1) == ["Kiko works as a baker."]


def test_answer_is_the_generated_text_up_to_the_period(lm):
    _, tok = lm
    said = tok(" Lima. Q: and")["input_ids"]

    class SaysLima:  # generate() appends the same continuation to every prompt
        def generate(self, ids, **kwargs):
            return torch.cat([ids, torch.tensor([said] * ids.shape[0])], dim=1)

    assert benchmark.answer(SaysLima(), tok, ["Q: Where? A:", "Q: Who? A:"]) == ["Lima", "Lima"]


def test_evaluate_scores_exact_matches(lm, monkeypatch):
    model, tok = lm
    # an LM that always answers "Lima" gets the Lima fact right and no other
    monkeypatch.setattr(benchmark, "answer", lambda m, t, prompts, **k: ["Lima"] * len(prompts))
    facts = [Fact("Zuba", "city", "Lima"), Fact("Kiko", "city", "Oslo")]
    row = benchmark.evaluate("base", model, tok, facts, [], max_questions=2)
    assert row["accuracy"] == 0.5 and row["questions"] == 2


@pytest.mark.parametrize("condition, write_rule",
                         [(c, "blend") for c in benchmark.CONDITIONS if c != "trained_memory"]
                         + [("written_memory", "append"), ("trained_memory", "append")])
def test_every_condition_runs(lm, condition, write_rule, monkeypatch):
    model, tok = lm
    if write_rule == "append":  # its banks read through an index, as large ones are
        monkeypatch.setattr(benchmark, "INDEX_MIN_SLOTS", 1)
    facts, others = make_facts(6, seed=0, distractors=True)
    # an append-rule bank of 16 slots: evaluate makes one that holds the ~140 tokens
    memory = tasks.default_memory(model, slots=8 if write_rule == "blend" else 16,
                                  write_rule=write_rule)
    bank = None
    if condition == "trained_memory":  # its bank: the facts stored (train_bank's start)
        with pytest.raises(ValueError, match="trained bank"):
            benchmark.evaluate(condition, model, tok, facts, others, memory=memory)
        bank = memkernels.store(memory, model, tok, [f"{f.subject} lives in {f.object}." for f in facts])
    row = benchmark.evaluate(condition, model, tok, facts, others, memory=memory, bank=bank,
                             max_questions=4, max_context=4096)
    assert row["condition"] == condition and row["questions"] == 4
    assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_ms"] > 0
    assert row["tokens_per_query"] > 5
    assert (row["store_tokens"] > 0) == (condition == "written_memory")
    assert row["index_probes"] == (benchmark.INDEX_PROBES if write_rule == "append" else 0)
    memory_condition = condition.endswith("_memory")
    assert (row["overhead_vs_base"] is not None) == memory_condition  # paired with reads off


def test_in_context_reports_when_the_prompt_does_not_fit(lm):
    model, tok = lm
    facts, _ = make_facts(30, seed=0)
    assert benchmark.evaluate("in_context", model, tok, facts, [], max_context=64) is None


def test_report_writes_markdown_and_png(tmp_path):
    rows = [dict(condition=c, n_facts=n, distractors=d, accuracy=0.5, latency_ms=3.0,
                 tokens_per_query=20.0) for c in benchmark.CONDITIONS for n in (10, 100)
            for d in (0, n)]
    benchmark.write_report(rows, str(tmp_path))
    md = (tmp_path / "recall.md").read_text()
    assert md.count("\n") == len(rows) + 2 and "written_memory" in md
    assert (tmp_path / "recall.png").stat().st_size > 10_000
    json.dumps(rows)


def test_probe_finds_the_subject_at_the_answer_position_of_the_shipped_lm():
    """The shipped base LM carries who a question is about to its answer
    position (what a memory keys on): two question templates about the same
    held-out name are each other's nearest neighbour far above chance at the
    last layers, and not at the embeddings (the answer token is the same)."""
    from memkernels.apps.recall import probe
    rows = probe.run(n_names=40, fit_names=200, statements=400, log=lambda *_: None)
    assert len(rows) == base_lm.MODEL_CONFIG["num_hidden_layers"] + 1
    assert rows[0]["question_question"] <= 0.1
    assert max(r["question_question"] for r in rows[-2:]) >= 0.7
    # which object a statement ends with: plain at the embeddings, mostly
    # overwritten by the write layer (why the recall memory writes values
    # from the embeddings)
    assert rows[0]["object"] >= 0.9
    assert rows[3]["object"] <= 0.5 * rows[0]["object"]
    for r in rows:
        assert 0.0 <= r["question_statement"] <= 1.0
        assert all(1 <= s <= 40 for s in r["slots_hit"])


def test_address_ceiling_nonlinear_beats_linear_on_the_shipped_lm():
    """Which written statement a question is about: on the shipped LM a
    linear map (what the memory's bilinear read can do) finds it far less
    often than contrastively trained MLPs on the same states; at the
    embeddings (the answer position's token is the same "A:") it is chance.
    With the decayed context of the embeddings beside the state (the tokens
    of the name itself), the MLPs find it almost always."""
    from memkernels.apps.recall import probe
    model, tokenizer = base_lm.load()
    rows = probe.address_ceiling(model, tokenizer, sizes=(50,), fit_facts=2000, draws=1,
                                 mlp_steps=400, context_decay=0.7, log=lambda *_: None)
    (row,) = rows
    assert len(row["linear_per_layer"]) == model.config.num_hidden_layers + 1
    assert row["linear_per_layer"][0] <= 0.1  # chance is 0.02
    assert row["mlp_layer"] == max(range(len(row["linear_per_layer"])),
                                   key=row["linear_per_layer"].__getitem__)
    assert row["mlp"] >= max(row["linear_per_layer"]) + 0.2
    assert row["mlp_context"] >= max(row["mlp"] + 0.05, 0.9)


def test_written_curriculum_grows_the_facts_per_episode(lm):
    _, tok = lm
    make = tasks.written_batches(tok, 6, seed=3, facts_per_row=(4, 16), curriculum_steps=100)

    def facts_per_row(step):
        return (make(step, 0).write_mask.sum(-1) > 0).sum(-1)  # statements written per row

    assert facts_per_row(0).tolist() == [1] * 6  # one fact each at the start
    assert facts_per_row(50).max() <= 4  # 16 ** 0.5
    late = torch.cat([facts_per_row(s) for s in range(100, 110)])
    assert late.min() >= 4 and late.max() <= 16 and late.max() > 4
    assert torch.equal(make(37, 1).write_ids, make(37, 1).write_ids)  # a pure function


def test_append_episodes_ask_one_question_a_row_alone(lm):
    _, tok = lm
    batch = tasks.append_episodes(tok, 5, seed=2, steps=10)(20, 0)
    assert batch.asks[:, 0].tolist() == list(range(5))  # one ask per row
    for row in batch.input_ids:
        text = tok.decode(row)
        assert text.startswith("Q: ") and text.count("Q: ") == 1  # asked alone


def test_train_written_memory_pretrains_trains_saves_and_reloads(lm, tmp_path, monkeypatch):
    model, tok = lm
    pairs = tasks.address_pairs
    monkeypatch.setattr(tasks, "address_pairs", lambda t: pairs(t, n=64))
    memory = benchmark.train_written_memory(model, tok, str(tmp_path / "w"), steps=2,
                                            pretrain_steps=3, batch=4, slots=64)
    info = json.load(open(tmp_path / "w" / "training.json"))
    assert info["write_rule"] == "append" and info["pretrain_steps"] == 3 and info["steps"] == 2
    assert memory.config.append.store_threshold == tasks.STORE_THRESHOLD and memory.keep is not None
    assert memory.config.append.context_decay == tasks.CONTEXT_DECAY
    again = benchmark.train_written_memory(model, tok, str(tmp_path / "w"), steps=2)
    assert type(again) is type(memory)
    for (name, a), b in zip(memory.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_address_pairs_target_the_token_before_the_object(lm):
    _, tok = lm
    questions, statements, targets, groups = tasks.address_pairs(tok, n=20)
    facts = make_facts(20, seed=11, split="train")[0]  # what address_pairs draws
    for q, s, t, f in zip(questions, statements, targets, facts):
        ids = tok(s)["input_ids"]
        assert q.startswith("Q: ") and q.endswith(" A:") and f.subject in q and f.subject in s
        assert tok.decode(ids[t + 1:]).strip().startswith(f.object)  # the object comes next
        assert not tok.decode(ids[t:]).strip().startswith(f.object)
    assert groups == [(0, f.subject) for f in facts]  # one fact per subject: no siblings


def test_a_trained_bank_is_stored_then_optimised_on_its_fact_draw_and_cached(lm, tmp_path,
                                                                              monkeypatch):
    """train_bank: the draw's facts stored by the memory, then the bank's
    slots trained on their statements (no auxiliary facts, never questions),
    the memory's weights untouched; cached, and retrained for other weights."""
    model, tok = lm
    seen = {}
    real = tasks.trained_batches

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(tasks, "trained_batches", spy)
    torch.manual_seed(0)
    memory = tasks.written_memory(model, slots=256)  # more than 4 statements fill
    with torch.no_grad():
        for reader in memory.readers:
            reader.gate.fill_(1.0)  # reads reach the logits: the bank gets gradients
    weights = {k: v.clone() for k, v in memory.state_dict().items()}
    stored = tasks.stored_facts(memory, model, tok, 4, 3)
    bank = benchmark.train_bank(model, tok, memory, str(tmp_path / "b"), steps=3, n_facts=4,
                                fact_seed=3, lr=1e-2, log=lambda *_: None)
    assert seen["eval_seed"] == 3 and seen["n_facts"] == 4 and seen["aux_facts"] == 0
    assert bank.mem.shape == stored.mem.shape and not torch.equal(bank.mem, stored.mem)
    empty = ~memory.slot_mask(stored.mem)[0]
    assert bool(empty.any()) and bool(bank.mem[:, :, empty].eq(0).all())  # and stay empty
    for k, v in memory.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(p.requires_grad for p in memory.parameters())  # restored after the run
    info = json.load(open(tmp_path / "b" / "training.json"))
    assert info["mode"] == "trained" and info["steps"] == 3 and info["n_facts"] == 4
    again = benchmark.train_bank(model, tok, memory, str(tmp_path / "b"), steps=3, n_facts=4,
                                 fact_seed=3, log=lambda *_: None)
    assert torch.equal(again.mem, bank.mem)  # from the cache
    with torch.no_grad():
        memory.slot_key.mul_(2)  # other weights: the cached bank is not theirs
    retrained = benchmark.train_bank(model, tok, memory, str(tmp_path / "b"), steps=0, n_facts=4,
                                     fact_seed=3, log=lambda *_: None)
    assert torch.equal(retrained.mem, stored.mem)  # 0 steps: the stored bank itself
    MemoryBank.load(tmp_path / "b" / "bank.safetensors", memory)  # saved for these weights


def test_train_command_trains_a_bank_for_the_shipped_written_memory(tmp_path):
    """`python -m memkernels.apps.recall.train --mode trained` (append rule, the default):
    the shipped written memory stores the facts, the bank's slots train, the
    bank is saved for that memory."""
    from memkernels.memory import MemoryModel
    from memkernels.apps.recall.train import main
    main(["--mode", "trained", "--facts", "8", "--steps", "2", "--batch", "4",
          "--out", str(tmp_path)])
    memory = MemoryModel.from_pretrained(benchmark.WRITTEN_MEMORY)
    bank = MemoryBank.load(tmp_path / "bank.safetensors", memory)
    stored = tasks.stored_facts(memory, *base_lm.load(), 8)
    assert bank.mem.shape == stored.mem.shape and not torch.equal(bank.mem, stored.mem)


def test_train_command_fails_at_once_on_a_missing_or_unusable_model(tmp_path, capsys):
    """A usage error naming --model and the path, before anything trains."""
    from memkernels.apps.recall.train import main
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama"}')
    for name, message in (("a/typo", "no such directory"), ("empty", "no config.json"),
                          ("broken", "not a loadable causal LM")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tmp_path / name), "--out", str(tmp_path / "o")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "--model" in err and str(tmp_path / name) in err
    assert not (tmp_path / "o").exists()


def test_train_command_takes_the_shipped_recipe_for_what_is_left_out():
    """--model DIR --out OUT alone trains the open memory that ships (its
    training.json); --world closed, the closed-list recipe; a flag given wins."""
    import argparse
    import json
    from memkernels.apps.recall import train
    shipped = json.load(open(os.path.join(train.RECIPES["open"]["model"], os.pardir,
                                          "open_memory", "training.json")))
    args = argparse.Namespace(mode="written", world="open", write_rule=None, model=None,
                              steps=None, pretrain_steps=None, vary_phrasings=None,
                              lookahead=None, context_decay=None, read_scale_after=None,
                              realistic_names=None, several_per_subject=None,
                              store_threshold_after=None, joint_realistic_names=None,
                              composed_phrasings=None, nested_names=None)
    train._fill_recipe(args)
    for key in ("write_rule", "steps", "pretrain_steps", "vary_phrasings", "lookahead",
                "context_decay", "read_scale_after", "realistic_names", "several_per_subject",
                "store_threshold_after", "joint_realistic_names", "composed_phrasings"):
        assert getattr(args, key) == shipped[key], key
    closed = argparse.Namespace(**{**vars(args), **{k: None for k in train.RECIPES["closed"]},
                                   "world": "closed", "write_rule": None, "steps": 7})
    train._fill_recipe(closed)
    assert closed.write_rule == "append" and closed.steps == 7 and closed.model is None
    assert closed.lookahead is False and closed.vary_phrasings == 0.0
    append = argparse.Namespace(**{**vars(args), **{k: None for k in train.RECIPES["open"]},
                                   "write_rule": "append"})
    train._fill_recipe(append)  # the copy-only flags stay neutral for the append rule
    assert append.lookahead is False and append.context_decay == tasks.CONTEXT_DECAY
    assert append.realistic_names == train.RECIPES["open"]["realistic_names"]
    assert append.read_scale_after is None
    blend = argparse.Namespace(**{**vars(args), **{k: None for k in train.RECIPES["open"]},
                                  "world": None, "write_rule": "blend"})
    train._fill_recipe(blend)  # closed-world episodes: the closed recipe, recorded as such
    assert blend.world == "closed" and blend.steps == 1500 and blend.model is None
    # --resume: the flags left out come from the run's own train_args.json, not the recipe
    started = argparse.Namespace(**{**vars(closed)})
    resumed = argparse.Namespace(**{**vars(args), **{k: None for k in train.RECIPES["open"]},
                                    "world": None, "write_rule": None, "steps": 9})
    train._fill_recipe(resumed, train._run_args(started))
    assert resumed.world == "closed" and resumed.write_rule == "append"
    assert resumed.steps == 9 and resumed.pretrain_steps == 6000 and resumed.lookahead is False


@pytest.mark.parametrize("family, write_rule", [("gpt2", "append"), ("gpt2", "copy"),
                                                ("llama", "copy")])
def test_train_command_trains_a_memory_for_a_model_directory(tmp_path, monkeypatch, family,
                                                             write_rule):
    """A GPT-2 (another family, its own config class, loaded through the Auto
    classes, not as a Llama of default size) and a Llama directory: the
    written memory trained end to end on open episodes and reloaded with
    MemoryModel.from_pretrained."""
    import transformers
    from memkernels.apps.recall.train import main
    from memkernels.memory import MemoryModel
    pairs = tasks.address_pairs
    monkeypatch.setattr(tasks, "address_pairs", lambda t, **kw: pairs(t, n=32, **kw))
    tok = base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)
    model = (transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=256))
        if family == "gpt2" else transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)))
    model.save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    main(["--model", str(tmp_path / family), "--mode", "written", "--world", "open",
          "--write-rule", write_rule, "--steps", "2", "--pretrain-steps", "2", "--batch", "4",
          "--pretrain-batch", "8", "--vary-phrasings", "0.2", "--read-scale-after", "30",
          "--realistic-names", "0.25", "--several-per-subject", "0.25", "--hard-negatives",
          "--joint-realistic-names", "0.5", "--composed-phrasings", "0.5",
          "--nested-names", "0.25", "--store-threshold-after", "0.05",
          *(["--lookahead", "--context-decay", "0.8"] if family == "llama"
            else ["--no-lookahead"] if write_rule == "copy" else []),
          "--slots", "64", "--out", str(tmp_path / "o")])
    memory = MemoryModel.from_pretrained(tmp_path / "o" / "memory")
    assert memory.config.hidden_size == 32 and memory.config.num_layers == 3
    assert memory.config.write_rule == write_rule
    assert memory.config.append.read_scale == 30.0 and memory.readers[0].scale == 30.0
    import json
    made = json.loads((tmp_path / "o" / "memory" / "training.json").read_text())
    assert made["vary_phrasings"] == 0.2 and made["pretrain_batch"] == 8
    assert made["joint_realistic_names"] == 0.5 and made["composed_phrasings"] == 0.5
    assert made["pretrain_steps"] == 2 and "--vary-phrasings 0.2" in made["command"]
    assert made["realistic_names"] == 0.25 and made["several_per_subject"] == 0.25
    assert made["store_threshold_after"] == 0.05 and made["hard_negatives"] is True
    assert memory.config.append.store_threshold == 0.05
    assert memory.config.append.lookahead is made["lookahead"] is (family == "llama")
    decay = 0.8 if family == "llama" else 0.9 if write_rule == "copy" else tasks.CONTEXT_DECAY
    assert memory.config.append.context_decay == made["context_decay"] == decay


def test_train_command_with_only_model_and_out_trains_the_shipped_recipe(tmp_path, monkeypatch):
    """`train --model DIR --out OUT` (a tiny GPT-2; only the run's length cut):
    the copy memory with every recipe value, written where the README says."""
    import json
    import transformers
    from memkernels.apps.recall import train
    from memkernels.memory import MemoryModel
    pairs = tasks.address_pairs
    monkeypatch.setattr(tasks, "address_pairs", lambda t, **kw: pairs(t, n=32, **kw))
    tok = base_lm.train_tokenizer(base_lm.corpus(300), vocab_size=300)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    train.main(["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"), "--steps", "2",
                "--pretrain-steps", "2", "--batch", "4", "--pretrain-batch", "8",
                "--slots", "64"])
    memory = MemoryModel.from_pretrained(tmp_path / "o" / "memory")
    made = json.loads((tmp_path / "o" / "memory" / "training.json").read_text())
    recipe = train.RECIPES["open"]
    assert memory.config.write_rule == made["write_rule"] == "copy" and made["world"] == "open"
    for key in ("vary_phrasings", "lookahead", "context_decay", "read_scale_after",
                "realistic_names", "several_per_subject", "store_threshold_after"):
        assert made[key] == recipe[key], key
    assert memory.config.append.lookahead is True and memory.config.append.context_decay == 0.9
    assert memory.config.append.read_scale == 40.0


def test_train_command_rejects_flags_that_do_not_apply(tmp_path, monkeypatch):
    from memkernels.apps.recall.train import main

    def must_not_load(*_):
        raise AssertionError("a refused flag set must stop before the model loads")
    monkeypatch.setattr(base_lm, "load", must_not_load)
    for bad in (["--world", "closed", "--vary-phrasings", "0.2"],
                ["--world", "open", "--vary-phrasings", "1.5"],
                ["--write-rule", "blend", "--read-scale-after", "40"],
                ["--read-scale-after", "0"], ["--world", "closed", "--realistic-names", "0.2"],
                ["--realistic-names", "0.9"], ["--mode", "trained", "--lookahead"],
                ["--write-rule", "blend", "--vary-phrasings", "0.2"],
                ["--mode", "trained", "--vary-phrasings", "0.2"],
                ["--world", "open", "--write-rule", "blend"],
                ["--resume", "--vary-phrasings", "0.2"],
                ["--world", "open", "--realistic-names", "0.7", "--several-per-subject", "0.7"],
                ["--world", "open", "--several-per-subject", "-0.1"],
                ["--write-rule", "blend", "--store-threshold-after", "0.1"],
                ["--write-rule", "copy", "--store-threshold-after", "1.0"],
                ["--world", "open", "--write-rule", "blend", "--realistic-names", "0.2"],
                ["--world", "open", "--write-rule", "copy", "--resume", "--realistic-names", "0.2"],
                ["--world", "open", "--write-rule", "copy", "--several-per-subject", "0",
                 "--hard-negatives"],
                ["--world", "closed", "--hard-negatives"],
                ["--world", "closed", "--joint-realistic-names", "0.2"],
                ["--world", "open", "--joint-realistic-names", "1.5"],
                ["--world", "closed", "--composed-phrasings", "0.2"],
                ["--world", "open", "--composed-phrasings", "-0.5"],
                ["--world", "open", "--resume", "--composed-phrasings", "0.2"],
                ["--world", "closed", "--nested-names", "0.2"],
                ["--world", "open", "--resume", "--nested-names", "0.2"],
                ["--world", "open", "--realistic-names", "0.5", "--nested-names", "0.6"],
                ["--world", "open", "--nested-names", "-0.1"],
                ["--mode", "trained", "--joint-realistic-names", "0.2"],
                ["--world", "open", "--resume", "--joint-realistic-names", "0.2"],
                ["--world", "open", "--write-rule", "append", "--lookahead"],
                ["--world", "open", "--write-rule", "append", "--context-decay", "0.9"],
                ["--world", "open", "--write-rule", "copy", "--context-decay", "1.0"]):
        with pytest.raises(SystemExit):
            main(bad + ["--out", str(tmp_path / "o")])


def test_the_demo_runs_and_prints_what_it_measured(capsys):
    """`python -m memkernels.apps.demo`, the README's main job, on a few facts."""
    from memkernels.apps import demo
    demo.main(["--facts", "8", "--questions", "8"])
    out = capsys.readouterr().out
    for line in ("kernels: backend", "write rule 'copy'", "(true: ", "read over the whole bank: ",
                 "recall on 8 questions about new facts", "decode:"):
        assert line in out, out
    other = next(line for line in out.splitlines() if line.startswith("the other splits"))
    for split in ("held-out relations", "realistic names", "several per subject",
                  "similar names"):
        assert re.search(rf"{split} \d+%", other), other
