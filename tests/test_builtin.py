"""The curricula that ship in the package: listed, copied with their assets, run by name, and run
from a wheel installed into a fresh virtual environment in an empty directory (what a
`pip install tripletctl` user has)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import FACENET, QUICKSTART, REPO
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.builtin import CURRICULA_DIR, describe, names
from tripletctl.config.validate import load_curriculum

QUICK = ["phases.0.steps=2", "phases.1.steps=1", "phases.2.steps=1", "eval.max_rows=100"]


def test_the_list_has_one_line_per_builtin_and_the_repo_links_to_them():
    assert names() == ["facenet", "facenet-triplets", "quickstart", "quickstart-triplets"]
    result = CliRunner().invoke(app, ["curricula"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == names()
    assert all(describe(name) in line for name, line in zip(names(), lines))
    assert "few minutes with no network" in describe("quickstart")
    assert (REPO / "curricula").resolve() == CURRICULA_DIR  # the README's curricula/ paths still work


def test_copy_writes_an_editable_curriculum_with_its_assets(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["curricula", "copy", "quickstart", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "mine" / "quickstart.yaml"
    assert copied.read_text() == (CURRICULA_DIR / "quickstart.yaml").read_text()
    for asset in ("train.jsonl", "heldout.jsonl", "tiny-bert/vocab.txt", "tiny-bert/config.json"):
        assert (tmp_path / "mine" / "quickstart" / asset).read_bytes() == (
            CURRICULA_DIR / "quickstart" / asset
        ).read_bytes()
    resolved = json.loads(runner.invoke(app, ["validate", str(copied), "--json"]).output)
    assert resolved["model"]["name"] == str(tmp_path / "mine" / "quickstart" / "tiny-bert")  # the copy's assets
    assert resolved["data"]["source"] == str(tmp_path / "mine" / "quickstart" / "train.jsonl")
    again = runner.invoke(app, ["curricula", "copy", "quickstart", str(tmp_path / "mine")])
    assert again.exit_code == 2 and "already exist" in again.output
    unknown = runner.invoke(app, ["curricula", "copy", "quikstart", str(tmp_path)])
    assert (
        unknown.exit_code == 2
        and "built-in: facenet, facenet-triplets, quickstart, quickstart-triplets" in unknown.output
    )


def test_a_name_that_is_neither_a_file_nor_a_builtin_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "quikstart"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: quikstart: no such file, and no built-in curriculum of that name "
        "(built-in: facenet, facenet-triplets, quickstart, quickstart-triplets)"
    )


@pytest.mark.slow
def test_train_quickstart_from_a_wheel_in_a_fresh_venv(tmp_path):
    """Build the wheel, install it (no deps, no index) into a new venv that sees this venv's
    packages (torch, transformers, ...) but not this checkout, and train by name in an empty dir."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(wheels.glob("tripletctl-*.whl"))

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # this venv's site-packages as a plain path entry: its .pth files (the editable install of this
    # checkout among them) are not processed, so `tripletctl` can only come from the wheel
    (fresh_site / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH: a checkout on it (PYTHONPATH=$PWD) holds the tripletctl.egg-info the wheel's
    # build just wrote, and pip would take the package as installed already and install nothing
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stderr

    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import tripletctl; print(tripletctl.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    result = subprocess.run(
        [str(venv / "bin" / "tripletctl"), "train", "quickstart", *QUICK],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"built-in curriculum quickstart: {fresh_site}" in result.stdout
    index = json.loads((work / "runs" / "quickstart" / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done", "done", "done"]
    assert index["eval_untrained"]["rows"] == 100 and index["eval_final"]["recall@1"] > 0
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing else written to the empty dir


def test_quickstart_validates_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_curriculum(QUICKSTART)
    assert c.model.name == str(REPO / "curricula" / "quickstart" / "tiny-bert")
    assert c.data.source == str(REPO / "curricula" / "quickstart" / "train.jsonl")
    assert c.eval is not None and c.eval.source == str(REPO / "curricula" / "quickstart" / "heldout.jsonl")
    assert c.train.output_dir == "runs/quickstart"  # relative to where training runs
    assert [p.mining for p in c.phases] == ["semi-hard", "hard-negative", "batch-hard"]
    assert isinstance(c.train.lr, float) and c.train.lr == 1e-3


def test_facenet_validates_offline_with_the_shipped_plan():
    c = load_curriculum(FACENET)
    assert c.model.name == "bert-base-uncased"
    assert [(p.mining, p.loss, p.batch_size, p.margin) for p in c.phases] == [
        ("semi-hard", "margin", 500, 0.5),
        ("batch-all", "infonce", 2000, 0.2),
    ]
    assert c.train.lr_scaling == "sqrt" and c.train.lr_reference_batch == 500
    assert c.train.lr == 2e-5 and c.train.precision == "auto" and c.train.chunk_size == "auto"
    assert c.train.warmup_steps > 0
    assert c.eval is not None and c.eval.split == "test"
    assert not os.path.exists(c.data.source)  # a hub name, left untouched


def test_facenet_triplets_validates_offline():
    c = load_curriculum(REPO / "curricula" / "facenet-triplets.yaml")
    assert c.data.layout == c.eval.layout == "triplets"
    assert c.data.load_dataset == c.eval.load_dataset == {"name": "triplet"}
    assert [p.batch_size // c.data.rows_per_group for p in c.phases] == [166, 333, 666]
    result = CliRunner().invoke(app, ["validate", str(REPO / "curricula" / "facenet-triplets.yaml")])
    assert result.exit_code == 0, result.output
