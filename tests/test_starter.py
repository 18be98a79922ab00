"""train/starter.py, `tripletctl init`: from the repo's small files and a tiny BERT in a local folder,
`init` then `train` (the real CLI, no edit in between) runs and beats the untrained model on its own
held-out rows; what init writes, holds out and refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, TINY_BERT
from transformers import AutoConfig, AutoModel, AutoTokenizer

from tripletctl.config.validate import load_curriculum

pytestmark = pytest.mark.slow  # end to end: `tripletctl init` (and train) on real files


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tripletctl", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def weights_folder(out: Path) -> Path:
    """A tiny BERT built from a config and saved with its (random) weights: a local pretrained model."""
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(TINY_BERT)).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_BERT).save_pretrained(out)
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_init_then_train_on_two_classes_beats_the_untrained_model(tmp_path, assets_dir):
    model = weights_folder(tmp_path / "tiny")
    done = cli("init", "--data", str(assets_dir / "two_class.jsonl"), "--model", "./tiny", "--budget", "2000",
               "--cpu", "-o", "two.yaml", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "with 2 classes whole-class hold-out is impossible" in done.stdout
    train, held = jsonl(tmp_path / "two-data" / "train.jsonl"), jsonl(tmp_path / "two-data" / "heldout.jsonl")
    assert Counter(r["label"] for r in held) == {"yes": 40, "no": 40}  # rows of every class
    assert not {r["text"] for r in held} & {r["text"] for r in train} and len(train) + len(held) == 400
    plan = load_curriculum(tmp_path / "two.yaml")
    assert plan.model.name == str(model) and plan.model.init == "pretrained" and plan.model.head == ()
    assert [(p.mining, p.batch_size) for p in plan.phases] == [
        ("semi-hard", 12),
        ("semi-hard", 48),
        ("semi-hard", 160),
    ]
    run = cli("train", "two.yaml", cwd=tmp_path)  # no edit
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "runs" / "two" / "run.json").read_text())
    assert record["eval_final"]["map@r"] > record["eval_untrained"]["map@r"] + 0.05
    assert record["eval_final"]["recall@1"] > record["eval_untrained"]["recall@1"]
    # issue 36, item 3: every held-out eval is one line of the plain log, the untrained one announced first
    lines = run.stdout.splitlines()
    before = lines.index("evaluating the untrained model on 80 held-out texts ...")
    assert lines[before + 1].startswith("held-out untrained: recall@1 ") and lines[before + 1].endswith("(80 texts)")
    assert [line.split(":")[0] for line in lines if line.startswith("held-out phase")] == [
        f"held-out phase {i} {p.name} step {n}/{p.steps}"
        for i, (p, n) in enumerate(zip(plan.phases, [e["steps_done"] for e in record["phases"]]))
    ]


def _topics(folder: Path, rows_each: int) -> None:
    rows, seen = [], Counter()
    for row in jsonl(REPO / "curricula" / "quickstart" / "train.jsonl"):  # 48 topics: 40 rows of each
        if seen[row["label"]] < rows_each:
            seen[row["label"]] += 1
            rows.append(row)
    (folder / "topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_init_then_train_on_many_classes_holds_out_whole_classes(tmp_path):
    _topics(tmp_path, 10)  # 480 texts: a budget of 2,000 is 4.2 passes, past OVER_TRAIN_PASSES
    done = cli("init", "--data", "topics.jsonl", "--model", str(TINY_BERT), "--budget", "2000", "--cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 whole classes of 48 held out (never seen in training)" in done.stdout
    train = jsonl(tmp_path / "curriculum-data" / "train.jsonl")
    held = jsonl(tmp_path / "curriculum-data" / "heldout.jsonl")
    assert not {r["label"] for r in train} & {r["label"] for r in held} and len({r["label"] for r in held}) == 10
    plan = load_curriculum(tmp_path / "curriculum.yaml")
    assert plan.model.init == "config" and plan.train.lr == 1e-3  # no weights in the folder: from scratch
    assert [(p.mining, p.loss) for p in plan.phases] == [("semi-hard", "margin"), ("batch-all", "infonce")]
    assert plan.phases[1].batch_size <= 38 * plan.data.samples_per_class  # batches of distinct classes
    assert plan.train.keep_best == "map@r"  # with an eval block, the run's best held-out model is kept
    run = cli("train", "curriculum.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "runs" / "curriculum" / "run.json").read_text())
    assert record["eval_final"]["map@r"] > record["eval_untrained"]["map@r"] + 0.03
    best = json.loads((tmp_path / "runs" / "curriculum" / "best" / "best.json").read_text())
    assert best["metric"] == "map@r" and best["value"] >= record["eval_final"]["map@r"]  # the final eval is offered too
    assert "best model: runs/curriculum/best/model (map@r " in run.stdout


def test_a_budget_of_few_passes_holds_nothing_out(tmp_path):
    """At most OVER_TRAIN_PASSES passes, a block's rows cost training more than a best-model choice gives
    (config/sizing.py `holds_out`): every row trains, and the curriculum has no eval block."""
    _topics(tmp_path, 40)  # 1,920 texts
    done = cli("init", "--data", "topics.jsonl", "--model", str(TINY_BERT), "--budget", "7680", "--cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "held out: nothing: the budget is 4.0 passes over the 1,920 texts, at most 4" in done.stdout
    assert not (tmp_path / "curriculum-data").exists()  # no file: training reads the source itself
    plan = load_curriculum(tmp_path / "curriculum.yaml")
    assert plan.eval is None and plan.train.keep_best is None
    text = (tmp_path / "curriculum.yaml").read_text()
    assert yaml.safe_load(text)["data"]["source"] == "./topics.jsonl" and "eval_plateau" not in text
    assert "# keep_best: map@r" in text  # there to turn on with an eval block
    for flags, block in [
        (["--budget", "7681"], True),
        (["--hold-out"], True),
        (["--budget", "9000", "--no-hold-out"], False),
    ]:
        out = f"c{len(flags)}{block}.yaml"
        more = cli(
            "init", "--data", "topics.jsonl", "--model", str(TINY_BERT), "--cpu", "-o", out, *flags, cwd=tmp_path
        )
        assert more.returncode == 0, more.stderr
        assert ("whole classes of 48 held out" in more.stdout) is block, flags
        assert (load_curriculum(tmp_path / out).eval is not None) is block, flags
    both = cli("init", "--data", "topics.jsonl", "--model", str(TINY_BERT), "--hold-out", "--heldout", "topics.jsonl",
               "-o", "both.yaml", cwd=tmp_path)  # fmt: skip
    assert both.returncode == 2 and "--hold-out keeps part of --data out and --heldout reads another" in both.stderr
    assert not (tmp_path / "both.yaml").exists()


def test_the_curriculum_is_commented_and_validates(tmp_path, assets_dir):
    done = cli("init", "--data", str(assets_dir / "train.csv"), "--model", str(TINY_BERT), "--budget", "500",
               "--cpu", "-o", "sub/c.yaml", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "sub" / "c.yaml").read_text()
    assert text.startswith("# Written by `tripletctl init --data ")
    assert "  head: []                        # no new random layers" in text
    assert "# Phases: 6 classes (at most 8): every batch holds every class" in text
    assert yaml.safe_load(text)["data"]["source"] == "./c-data/train.jsonl"  # beside the curriculum
    checked = cli("validate", "sub/c.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "sub/c.yaml: 3 phases" in checked.stdout and "data: all " in checked.stdout
    assert done.stdout.splitlines()[-2:] == [
        "next: tripletctl validate sub/c.yaml   # the plan",
        "      tripletctl train sub/c.yaml",
    ]


def test_init_guesses_the_columns_and_says_so(tmp_path):
    rows = [{"name": f"f{i}", "docstring": f"{mod} function number {i} does things", "module": mod}
            for i in range(60) for mod in ("os", "re", "json")]  # fmt: skip
    (tmp_path / "doc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = cli("init", "--data", "doc.jsonl", "--model", str(TINY_BERT), "--cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "data: text column 'docstring' (guessed; --text-column to choose another)" in done.stdout
    assert "data: label column 'module' (guessed; --label-column to choose another)" in done.stdout
    plan = load_curriculum(tmp_path / "curriculum.yaml")
    assert (plan.data.text_column, plan.data.label_column) == ("docstring", "module")


def test_init_with_a_held_out_source_writes_no_data_files(tmp_path, assets_dir):
    done = cli("init", "--data", str(assets_dir / "two_class.jsonl"), "--heldout", str(assets_dir / "two_class.jsonl"),
               "--model", str(TINY_BERT), "--cpu", "--budget", "800", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "curriculum-data").exists()
    plan = load_curriculum(tmp_path / "curriculum.yaml")
    assert plan.data.source == plan.eval.source == str(assets_dir / "two_class.jsonl")


def test_a_partial_sample_says_the_held_out_rows_also_train(tmp_path, assets_dir):
    done = cli("init", "--data", str(assets_dir / "many_class.jsonl"), "--model", str(TINY_BERT), "--cpu",
               "--sample-rows", "600", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the source is larger than the sample, so training streams all of it" in done.stdout
    assert (tmp_path / "curriculum-data" / "heldout.jsonl").exists()
    assert not (tmp_path / "curriculum-data" / "train.jsonl").exists()


@pytest.mark.parametrize("case", ["exists", "one class", "no such column"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, assets_dir, case):
    args = ["init", "--data", str(assets_dir / "two_class.jsonl"), "--model", str(TINY_BERT), "--cpu"]
    if case == "exists":
        (tmp_path / "curriculum.yaml").write_text("mine\n")
    elif case == "one class":
        (tmp_path / "one.jsonl").write_text(
            "".join(json.dumps({"text": f"t {i}", "label": "a"}) + "\n" for i in range(9))
        )
        args[2] = "one.jsonl"
    else:
        args += ["--label-column", "category"]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    expected = {
        "exists": "curriculum.yaml already exists",
        "one class": "at least 2 classes",
        "no such column": "column 'category' not found",
    }[case]
    assert expected in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"exists": ["curriculum.yaml"], "one class": ["one.jsonl"], "no such column": []}[case]
    )
    if case == "exists":
        assert (tmp_path / "curriculum.yaml").read_text() == "mine\n"


def test_a_plan_with_mined_negatives_is_written_as_the_key():
    from tripletctl.config.sizing import size_run
    from tripletctl.config.starter import render

    plan = size_run([12] * 900, budget=100_000, device="cpu")  # 900 classes: 20 x the 42 of a batch
    phases = yaml.safe_load(render([], {}, plan.phases, "why"))["phases"]
    assert phases[1]["mined_negatives"] == {"per_class": 2} and phases[1]["batch_size"] == 252
    assert "mined_negatives" not in phases[0]
