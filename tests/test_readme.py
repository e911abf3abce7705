"""The README's integration example runs as written."""
import pathlib
import re

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_integration_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    match = re.search(r"<!-- readme-example: integration -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its integration example"
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)  # noqa: S102
    assert scope["out"].shape[1] == scope["ids"].shape[1] + 8
    assert scope["both"].batch_size == 2 and scope["merged"].num_slots == 512
    assert (tmp_path / "ada.bank.safetensors").exists()
    # what it prints is what its comments say
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "True" and printed[1].startswith("MemoryBank(rows=1, heads=4, slots=256")


def test_readme_open_vocabulary_example_runs(capsys):
    """The shipped open LM and copy memory: new facts stored, asked with other
    phrasings; the printed answers are the ones the README shows."""
    text = README.read_text()
    match = re.search(r"<!-- readme-example: open -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its open-vocabulary example"
    exec(compile(match.group(1), "README.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    shown = re.findall(r"# -> (\[.*\])", match.group(1))
    assert printed == shown, (printed, shown)  # the LM alone, the whole bank, the index
