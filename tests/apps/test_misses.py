"""The miss breakdown (memkernels.apps.recall.misses) on a tiny LM and an
untrained copy memory: every question is counted once, as right or as one
kind of miss, each miss re-read with its statement alone; the CLI writes the
breakdown with its command. Its real figures come from the shipped pair."""
import json

import pytest

from memkernels.memory.lexical import LEXICAL_PAIR_MAX_DF

from tests.apps.test_open_facts import save_tiny_open_lm


def test_garble_kind_tells_a_late_copy_from_nothing_and_the_rest():
    from memkernels.apps.recall.misses import LATE_START, NOTHING, OTHER_GARBLE, garble_kind
    assert garble_kind("uth", "Mikikuth") == LATE_START
    assert garble_kind("Dedok", "Kulepul Dedok") == LATE_START
    assert garble_kind(" ", "Badun") == garble_kind("", "Badun") == NOTHING
    assert garble_kind("Bi Kezakakezak", "Bi Kezak") == OTHER_GARBLE  # too long
    assert garble_kind("Mikikuth", "Mikikuth") == OTHER_GARBLE  # not a proper tail
    assert garble_kind("ezix", "Lol Ruzix") == OTHER_GARBLE


def test_misses_count_every_question_once(tmp_path):
    from memkernels.apps.recall import misses, open_recall, tasks
    from memkernels.apps.recall import open_facts as of
    model = save_tiny_open_lm(tmp_path / "lm")
    tasks.copy_memory(model, slots=64).save_pretrained(tmp_path / "memory")
    lm, tokenizer, memory = open_recall.load_open(str(tmp_path / "lm"), str(tmp_path / "memory"))
    result = misses.diagnose(lm, tokenizer, memory, "several per subject", n_facts=9,
                             questions=5, examples=2)
    counts = result["counts"]
    assert sum(counts.values()) == result["questions"] == 5
    assert set(counts) <= {"right", misses.NOT_SELECTED, misses.OTHER_OBJECT, misses.GARBLED}
    alone = result["right_when_alone"]
    assert all(0 <= alone[kind] <= counts[kind] for kind in alone)
    assert sum(result["answered_wrong"].values()) == counts.get(misses.GARBLED, 0)
    cores = result["by_statement_core"]
    assert set(cores) <= set(of.STATEMENT_CORES["dev"])
    assert sum(c["asked"] for c in cores.values()) == 5
    assert sum(c["right"] for c in cores.values()) == counts.get("right", 0)
    assert len(result["examples"]) == min(2, 5 - counts.get("right", 0))
    for e in result["examples"]:
        assert e["answer"] in e["statement"] and e["got"] != e["answer"]
        assert (e["kind"] == misses.NOT_SELECTED) == (e["statement"] not in e["selected"])
    assert "several per subject N=9" in misses.summary(result)
    with pytest.raises(ValueError, match="split"):
        misses.diagnose(lm, tokenizer, memory, "no such split", 9, 5)

    out = tmp_path / "misses.json"
    misses.main(["--model", str(tmp_path / "lm"), "--memory", str(tmp_path / "memory"),
                 "--splits", "held-out", "--facts", "6", "--questions", "3", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["command"].startswith("python -m memkernels.apps.recall.misses --model")
    assert [r["split"] for r in written["results"]] == ["held-out"]
    misses.main(["--model", str(tmp_path / "lm"), "--memory", str(tmp_path / "memory"),
                 "--splits", "realistic names", "--facts", "6", "--questions", "3",
                 "--small-name-pool", "--out", str(out)])
    small = json.loads(out.read_text())
    assert "--small-name-pool" in small["command"]
    assert small["results"][0]["name_pool"] == list(of.eval_name_pool())
    misses.main(["--model", str(tmp_path / "lm"), "--memory", str(tmp_path / "memory"),
                 "--splits", "realistic names", "--facts", "6", "--questions", "3",
                 "--dev-names", "--out", str(out)])
    dev = json.loads(out.read_text())["results"][0]
    assert dev["name_split"] == "dev" and dev["name_pool"] is None
    dev_last = of._real_names("dev")[1]  # an untrained memory misses: its examples name them
    assert dev["examples"] and all(any(f" {last}" in e["statement"] for last in dev_last)
                                   for e in dev["examples"])
    misses.main(["--model", str(tmp_path / "lm"), "--memory", str(tmp_path / "memory"),
                 "--splits", "held-out", "--facts", "6", "--questions", "3",
                 "--continuation", "0.6", "--out", str(out)])
    continued = json.loads(out.read_text())["results"][0]
    assert continued["continuation"] == 0.6 and written["results"][0]["continuation"] == 0.0
    assert sum(continued["counts"].values()) == 3
    assert continued["lexical_pair_max_df"] == LEXICAL_PAIR_MAX_DF
    assert continued["lexical_prefer_whole_runs"] is True
    misses.main(["--model", str(tmp_path / "lm"), "--memory", str(tmp_path / "memory"),
                 "--splits", "held-out", "--facts", "6", "--questions", "3",
                 "--pair-max-df", "0.1", "--no-whole-runs", "--out", str(out)])
    earlier = json.loads(out.read_text())["results"][0]
    assert earlier["lexical_pair_max_df"] == 0.1 and earlier["lexical_prefer_whole_runs"] is False
    for share in ("0", "1.5"):
        with pytest.raises(SystemExit):
            misses.main(["--pair-max-df", share])
    for weight in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            misses.main(["--continuation", weight])
    with pytest.raises(SystemExit):
        misses.main(["--dev-names", "--small-name-pool"])
    with pytest.raises(SystemExit):
        misses.main(["--facts", "0"])
