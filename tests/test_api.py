"""tripletctl/api.py, the Python API: the example in docs/python.md runs as written, `import tripletctl`
stays light, and the functions behave as their commands do."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ASSETS, REPO, st_folder

import tripletctl
from tripletctl import api
from tripletctl.core.errors import ConfigError, TripletctlError


def _example() -> str:
    text = (REPO / "docs" / "python.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path):
    (tmp_path / "curricula").symlink_to(REPO / "curricula")  # its paths are the repository's
    done = subprocess.run([sys.executable, "-c", _example()], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exit_line = re.search(r"^exit (\d+) map@r ([\d.]+) -> ([\d.]+)$", done.stdout, flags=re.M)
    assert exit_line and exit_line.group(1) == "0" and float(exit_line.group(3)) > float(exit_line.group(2))
    assert "vectors (2, 64)" in done.stdout
    recall = re.search(r"^recall@1 ([\d.]+) map@r ([\d.]+)$", done.stdout, flags=re.M)
    assert recall and float(recall.group(2)) == pytest.approx(float(exit_line.group(3)), abs=1e-6)  # the same eval
    assert "10 whole classes of 48 held out" in done.stdout and (tmp_path / "topics-data" / "heldout.jsonl").exists()


def test_import_tripletctl_does_not_import_torch():
    code = "import sys, tripletctl; tripletctl.__version__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    assert callable(tripletctl.train) and tripletctl.load is api.load and tripletctl.init is api.init
    with pytest.raises(AttributeError):
        tripletctl.no_such_function  # noqa: B018


def test_train_raises_the_problems_instead_of_exiting(tmp_path):
    with pytest.raises(ConfigError) as raised:
        tripletctl.train("quickstart", ["train.lr=fast", "data.label_column=category"])
    assert len(raised.value.problems) == 2 and raised.value.exit_code == 2
    with pytest.raises(TripletctlError, match="no built-in curriculum of that name"):
        tripletctl.train("no-such-curriculum")


@pytest.mark.slow
def test_load_encodes_as_sentence_transformers_and_evaluate_matches_the_command(tmp_path, tiny_bert_dir):
    import json

    from sentence_transformers import SentenceTransformer

    folder = st_folder(tiny_bert_dir, tmp_path / "st")
    model = tripletctl.load(folder)
    texts = ["yes row 1 alpha", "no row 2 bravo charlie"]
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert model.encode(texts).shape == (2, 64) and abs(model.encode(texts) - theirs).max() < 1e-5
    data = str(ASSETS / "two_class.jsonl")
    ours = tripletctl.evaluate(model, data=data, max_rows=100)
    command = subprocess.run(
        [sys.executable, "-m", "tripletctl", "eval", str(folder), "--data", data, "--max-rows", "100", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert command.returncode == 0, command.stderr
    printed = json.loads(command.stdout)
    assert {k: ours[k] for k in ("recall@1", "map@r", "rows")} == {k: printed[k] for k in ("recall@1", "map@r", "rows")}
    assert tripletctl.evaluate(folder, data=data, max_rows=100)["map@r"] == ours["map@r"]
    with pytest.raises(TypeError, match="unknown source option"):
        tripletctl.evaluate(folder, data=data, label_colum="label")
    with pytest.raises(TripletctlError, match="holds no held-out data"):
        tripletctl.evaluate(model)
