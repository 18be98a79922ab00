"""Curriculum validation (tripletctl/config/validate.py): every error names file, phase and key, every
problem is reported at once, paths resolve, sources and layouts are checked, and the `validate`
command prints the plan or exits 2. Pure Python: no model, no data, no network."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from helpers import FACENET, MINIMAL, QUICKSTART, REPO, edit, only, phases_with, problems_of, write
from rich.console import Console
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import (
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from tripletctl.config.plan import plan_table
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError


def test_minimal_curriculum_fills_defaults_and_resolves_phases_from_train(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL))
    assert c.model == ModelConfig(name="bert-base-uncased")
    assert c.data == DataConfig(source="org/corpus")
    assert c.train == TrainConfig()
    assert c.eval is None
    assert [p.name for p in c.phases] == ["warmup", "easy", "hard"]
    for phase in c.phases:
        assert phase.margin == 0.2
        assert (phase.lr, phase.warmup_steps, phase.distance, phase.fallback, phase.chunk_size, phase.on_collapse) == (
            2e-5,
            100,
            "euclidean",
            "hardest",
            "auto",
            "warn",
        )


def test_phase_overrides_win_over_train_block(tmp_path):
    text = edit(
        train={"lr": 1e-4, "distance": "squared-euclidean", "chunk_size": 64, "on_collapse": "stop"},
        phases=phases_with(lr=5e-6, fallback="easiest", chunk_size="auto", warmup_steps=3, margin=0.5),
    )
    c = load_curriculum(write(tmp_path, text))
    assert (c.phases[0].lr, c.phases[0].distance, c.phases[0].chunk_size, c.phases[0].on_collapse) == (
        1e-4,
        "squared-euclidean",
        64,
        "stop",
    )
    hard = c.phases[2]
    assert (hard.lr, hard.fallback, hard.chunk_size, hard.warmup_steps, hard.margin) == (
        5e-6,
        "easiest",
        "auto",
        3,
        0.5,
    )
    assert hard.distance == "squared-euclidean"


def test_chunk_size_and_chunk_tokens_together_are_refused(tmp_path):
    path = write(tmp_path, edit(train={"chunk_size": 64, "chunk_tokens": 4096}))
    assert problems_of(path) == [
        f"{path}: train: set chunk_size (rows per chunk) or chunk_tokens (a token budget), "
        f"not both, got chunk_size 64 and chunk_tokens 4096"
    ]
    path = write(tmp_path, edit(phases=phases_with(chunk_size=64, chunk_tokens="auto")))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): set chunk_size (rows per chunk) or chunk_tokens "
        f"(a token budget), not both, got chunk_size 64 and chunk_tokens 'auto'"
    ]
    path = write(tmp_path, edit(phases=phases_with(chunk_tokens=0)))
    assert problems_of(path) == [f"{path}: phases[2] (hard): chunk_tokens must be a positive integer or 'auto', got 0"]


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (4096, "got 4096"),
        ({"start_step": 3}, "size is missing"),
        ({"size": 0}, "got {'size': 0}"),
        ({"size": 64, "start_step": -1}, "start_step"),
        ({"size": 64, "sise": 3}, "unknown key 'sise'; did you mean 'size'?"),
    ],
)
def test_bad_memory_values_name_file_phase_and_key(tmp_path, value, hint):
    path = write(tmp_path, edit(phases=phases_with(memory=value)))
    with pytest.raises(ConfigError) as info:
        load_curriculum(path)
    message = str(info.value)
    assert f"{path}: phases[2] (hard): memory must be null or a mapping {{size: M, start_step: S}}" in message
    assert hint in message


def test_missing_file_is_a_config_error(tmp_path):
    [problem] = problems_of(tmp_path / "nope.yaml")
    assert problem.startswith(f"{tmp_path / 'nope.yaml'}: cannot read the curriculum")


def test_messages_use_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, edit(train={"lr": "fast"}))
    assert problems_of("curriculum.yaml") == ["curriculum.yaml: train.lr must be a positive number, got 'fast'"]


def test_unknown_phase_key_with_did_you_mean(tmp_path):
    phases = yaml.safe_load(MINIMAL)["phases"]
    phases[0]["minning"] = phases[0].pop("mining")
    path = write(tmp_path, edit(phases=phases))
    problems = problems_of(path)
    assert f"{path}: phases[0] (warmup): unknown key 'minning' (did you mean 'mining'?)" in problems
    assert f"{path}: phases[0] (warmup): missing required key 'mining'" in problems


def test_unknown_mining_mode_lists_valid_ones(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(mining="semihard")))
    problem = only(problems_of(path), "mining")
    assert problem.startswith(
        f"{path}: phases[2] (hard): mining must be one of random, semi-hard, hard-negative, "
        "batch-hard, batch-all, got 'semihard'"
    )
    assert problem.endswith("(did you mean 'semi-hard'?)")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("steps", 0, "steps must be a positive integer, got 0"),
        ("steps", -5, "steps must be a positive integer, got -5"),
        ("steps", True, "steps must be a positive integer, got true"),
        ("steps", 2.5, "steps must be a positive integer, got 2.5"),
        ("margin", 0, "margin must be a positive number, got 0"),
        ("margin", -0.1, "margin must be a positive number, got -0.1"),
        ("batch_size", 0, "batch_size must be a positive integer, got 0"),
        ("batch_size", "64", "batch_size must be a positive integer, got '64'"),
        ("chunk_size", 0, "chunk_size must be a positive integer or 'auto', got 0"),
        ("chunk_size", "max", "chunk_size must be a positive integer or 'auto', got 'max'"),
        ("distance", "cosine", "distance must be one of euclidean, squared-euclidean, got 'cosine'"),
        ("fallback", "median", "fallback must be one of hardest, easiest, got 'median'"),
        ("on_collapse", "abort", "on_collapse must be one of warn, stop, fallback, got 'abort'"),
        ("lr", "fast", "lr must be a positive number, got 'fast'"),
        ("warmup_steps", -1, "warmup_steps must be a non-negative integer, got -1"),
        (
            "name",
            "a/b",
            "name must be a name of at most 64 letters, digits, '.', '_', '+' or '-' (it becomes a directory name), got 'a/b'",
        ),
    ],
)
def test_bad_phase_values_name_file_phase_and_key(tmp_path, key, value, expected):
    path = write(tmp_path, edit(phases=phases_with(**{key: value})))
    label = "phases[2] (hard)" if key != "name" else "phases[2]"  # an invalid name is not repeated
    assert problems_of(path) == [f"{path}: {label}: {expected}"]


def test_batch_size_must_split_into_whole_classes(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(batch_size=1002)))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): batch_size must be a multiple of data.samples_per_class (4), got 1002"
    ]


def test_batch_size_needs_at_least_two_classes(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(batch_size=4)))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: phases[2] (hard): batch_size must hold at least 2 classes")
    assert "at least 8, got 4" in problem


def test_invalid_samples_per_class_does_not_cascade_into_batch_errors(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "samples_per_class": 1}))
    assert problems_of(path) == [f"{path}: data.samples_per_class must be an integer >= 2, got 1"]


@pytest.mark.parametrize(
    "phases, expected",
    [
        ([], "phases must be a non-empty list of phases, got []"),
        ("warmup", "phases must be a non-empty list of phases, got 'warmup'"),
    ],
)
def test_empty_phase_list(tmp_path, phases, expected):
    path = write(tmp_path, edit(phases=phases))
    assert problems_of(path) == [f"{path}: {expected}"]


def test_missing_phase_list(tmp_path):
    path = write(tmp_path, edit(phases=None))
    assert problems_of(path) == [f"{path}: missing required key 'phases' (a non-empty list of phases)"]


def test_phase_that_is_not_a_mapping(tmp_path):
    phases = yaml.safe_load(MINIMAL)["phases"] + ["oops"]
    [problem] = problems_of(write(tmp_path, edit(phases=phases)))
    assert "phases[3]: must be a mapping with name, mining, batch_size and steps, got 'oops'" in problem


def test_missing_phase_keys(tmp_path):
    path = write(tmp_path, edit(phases=[{"name": "only-a-name"}]))
    problems = problems_of(path)
    for key in ("mining", "batch_size", "steps"):
        assert f"{path}: phases[0] (only-a-name): missing required key '{key}'" in problems


def test_duplicate_phase_names(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(name="easy")))
    assert problems_of(path) == [f"{path}: phases[2] (easy): duplicate phase name 'easy' (also phases[1])"]


def test_unknown_top_level_and_block_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "evl: {}\ntrain:\n  lrr: 1.0\n  sead: 3\n  gizmo: 1\n")
    problems = problems_of(path)
    assert f"{path}: unknown key 'evl' (did you mean 'eval'?)" in problems
    assert f"{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)" in problems
    assert f"{path}: unknown key 'train.sead' (did you mean 'train.seed'?)" in problems
    assert f"{path}: unknown key 'train.gizmo'" in problems


def test_missing_required_blocks(tmp_path):
    path = write(tmp_path, edit(model=None, data=None))
    problems = problems_of(path)
    assert f"{path}: missing required key 'model.name'" in problems
    assert f"{path}: missing required key 'data.source'" in problems


@pytest.mark.parametrize(
    "block, key, value, expected",
    [
        ("train", "lr", "fast", "train.lr must be a positive number, got 'fast'"),
        ("train", "lr", True, "train.lr must be a positive number, got true"),
        ("train", "seed", True, "train.seed must be an integer from 0 to 4294967295, got true"),
        ("train", "compile", "yes please", "train.compile must be true, false or 'auto', got 'yes please'"),
        ("train", "keep_graphs", "auto", "train.keep_graphs must be true or false, got 'auto'"),
        (
            "train",
            "precision",
            "fp16",
            "train.precision must be one of auto, fp32, bf16, got 'fp16' (did you mean 'bf16'?)",
        ),
        (
            "train",
            "decay",
            "cosin",
            "train.decay must be one of none, linear, cosine, got 'cosin' (did you mean 'cosine'?)",
        ),
        ("train", "device", "mps", "train.device must be one of auto, cpu, cuda, got 'mps'"),
        ("train", "optimizer", "sgd", "train.optimizer must be one of adamw, got 'sgd'"),
        ("train", "grad_clip", -1, "train.grad_clip must be a non-negative number, got -1"),
        ("train", "output_dir", "", "train.output_dir must be a non-empty string, got ''"),
        ("model", "pooling", "max", "model.pooling must be one of mean, cls, got 'max'"),
        ("model", "init", "random", "model.init must be one of pretrained, config, got 'random'"),
        (
            "model",
            "head",
            [256, 0],
            "model.head must be a list of positive integers (layer sizes), e.g. [256, 128], got [256, 0]",
        ),
        ("model", "normalize", 1, "model.normalize must be true or false, got 1"),
        (
            "data",
            "layout",
            "labeled",
            "data.layout must be one of labelled, pairs, triplets, got 'labeled' (did you mean 'labelled'?)",
        ),
        (
            "data",
            "format",
            "jsonl",
            "data.format must be one of json, parquet, csv, text or null, got 'jsonl' (did you mean 'json'?)",
        ),
        ("data", "tokenizer_workers", -1, "data.tokenizer_workers must be a non-negative integer, got -1"),
        (
            "data",
            "load_dataset",
            ["name"],
            "data.load_dataset must be a mapping of keyword arguments for datasets.load_dataset, got ['name']",
        ),
        (
            "data",
            "load_dataset",
            {"split": "x"},
            "data.load_dataset must be free of 'split', which is set by data.split, got {'split': 'x'}",
        ),
    ],
)
def test_bad_block_values(tmp_path, block, key, value, expected):
    tree = yaml.safe_load(MINIMAL)
    tree.setdefault(block, {})[key] = value
    path = write(tmp_path, yaml.safe_dump(tree))
    assert problems_of(path) == [f"{path}: {expected}"]


def test_pairs_layout_requires_two_samples_per_class(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "layout": "pairs"}))
    [problem] = problems_of(path)
    assert problem == (
        f"{path}: data.samples_per_class must be 2 when data.layout is pairs (each pair is its own class), got 4"
    )
    load_curriculum(write(tmp_path, edit(data={"source": "x", "layout": "pairs", "samples_per_class": 2})))


def test_text_format_needs_a_label_mapping_and_vice_versa(tmp_path):
    path = write(
        tmp_path,
        edit(data={"source": "./pos/*.txt", "format": "text"}, eval={"source": {"a": "./a/*.txt"}, "format": "json"}),
    )
    problems = problems_of(path)
    only(problems, "data.source must be a {label: glob} mapping when data.format is text")
    only(problems, "eval.source is a {label: glob} mapping, which needs eval.format: text, got 'json'")


def test_a_label_mapping_implies_the_text_format(tmp_path):
    # docs/data.md: "format: text  # optional: a mapping implies it"
    c = load_curriculum(
        write(tmp_path, edit(data={"source": {"a": "./a/*.txt", "b": "./b.txt"}}, eval={"source": {"a": "./a/*.txt"}}))
    )
    assert c.data.format == "text" and c.eval is not None and c.eval.format == "text"
    assert c.data.source == {"a": str(tmp_path / "a" / "*.txt"), "b": str(tmp_path / "b.txt")}


@pytest.mark.parametrize("name", ["x" * 300, "a\x00b", "two\nlines", "tab\there", "a b", "..", "\u00fc", "a/b"])
def test_phase_names_are_short_and_safe_for_a_directory(tmp_path, name):
    path = tmp_path / "curriculum.yaml"
    path.write_text(edit(phases=phases_with(name=name)))  # safe_dump escapes NUL and newline
    assert yaml.safe_load(path.read_text())["phases"][2]["name"] == name
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: phases[2]: name must be a name of at most 64 letters")
    assert "\n" not in problem and "\x00" not in problem and len(problem) < 400


def test_max_buffered_rows_must_fit_the_largest_batch(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "max_buffered_rows": 32}))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: data.max_buffered_rows must be at least the largest phase batch_size (64)")


def test_eval_block_requires_a_source(tmp_path):
    path = write(tmp_path, edit(eval={"every": 10}))
    assert problems_of(path) == [f"{path}: missing required key 'eval.source'"]


def test_all_problems_are_reported_together(tmp_path):
    phases = phases_with(batch_size=1002, mining="semihard", steps=0)
    phases[0]["minning"] = phases[0].pop("mining")
    path = write(tmp_path, edit(train={"lr": "fast"}, model={"name": "m", "pooling": "max"}, phases=phases))
    problems = problems_of(path, ["phases.9.steps=1", "trian.lr=1"])
    assert len(problems) == 9, problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    for fragment in [
        "train.lr must be",
        "model.pooling",
        "phases[0] (warmup): unknown key 'minning'",
        "phases[0] (warmup): missing required key 'mining'",
        "phases[2] (hard): mining",
        "phases[2] (hard): steps",
        "phases[2] (hard): batch_size must be a multiple",
        "override 'phases.9.steps=1'",
        "override 'trian.lr=1'",
    ]:
        only(problems, fragment)


def test_relative_paths_in_the_file_resolve_against_its_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(
        folder,
        edit(
            model={"name": "./models/bert", "tokenizer": "../tok"},
            data={"source": "./corpus/*.parquet"},
            eval={"source": {"a": "./a/*.txt", "b": "/abs/b/*.txt"}, "format": "text"},
            train={"output_dir": "./runs/x"},
        ),
    )
    monkeypatch.chdir(tmp_path / "..")
    c = load_curriculum(path)
    assert c.model.name == str(folder / "models" / "bert")
    assert c.model.tokenizer == str(tmp_path / "tok")
    assert c.data.source == str(folder / "corpus" / "*.parquet")
    assert c.eval.source == {"a": str(folder / "a" / "*.txt"), "b": "/abs/b/*.txt"}
    assert c.train.output_dir == "./runs/x"  # stays relative to the current directory


def test_hub_names_are_left_untouched(tmp_path):
    c = load_curriculum(
        write(tmp_path, edit(model={"name": "bert-base-uncased", "tokenizer": "org/tok"}, data={"source": "org/name"}))
    )
    assert (c.model.name, c.model.tokenizer, c.data.source) == ("bert-base-uncased", "org/tok", "org/name")


def test_loading_a_curriculum_never_imports_torch():
    """`validate` reads and prints a curriculum: it must not pay for torch (or transformers) start-up."""
    code = (
        "import sys, tripletctl.config.validate, tripletctl.config.plan; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_validate_command_prints_the_plan():
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "semi-hard" in result.output and "batch-hard" in result.output


def test_validate_command_accepts_overrides():
    result = CliRunner().invoke(app, ["validate", str(FACENET), "phases.1.steps=500", "train.lr=3e-5"])
    assert result.exit_code == 0, result.output


def test_validate_command_exits_2_with_every_error(tmp_path):
    path = write(tmp_path, edit(train={"lr": "fast"}, phases=phases_with(batch_size=1002)))
    result = CliRunner().invoke(app, ["validate", str(path), "phases.7.steps=1"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # undo terminal wrapping
    assert "train.lr must be a positive number, got 'fast'" in output
    assert "phases[2] (hard): batch_size must be a multiple" in output
    assert "override 'phases.7.steps=1'" in output


def test_python_dash_m_validate_quickstart(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tripletctl", "validate", str(QUICKSTART)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "batch-hard" in done.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the curriculum is empty: expected model, data, train and phases"),
        (
            "- model\n",
            "expected a mapping with model, data, train, phases (and optional eval) at the top, got ['model']",
        ),
    ],
)
def test_empty_or_non_mapping_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("trian.seed9994=1", "train.seed"),
        ("trian.seed=1", "train.seed"),
        ("phase.1.steps=3", "phases.1.steps"),
        ("phasse.1.until.window=3", "phases.1.until.window"),
        ("trainn=3", "train"),
        ("xyzzy.q=1", None),
    ],
)
def test_an_unknown_block_suggests_only_keys_that_exist(tmp_path, override, suggestion):
    """Issue 23 #12: `trian.seed9994` suggested `train.seed9994`, which is not a key either."""
    [problem] = problems_of(write(tmp_path, MINIMAL), [override])
    hint = re.search(r"did you mean '([^']+)'", problem)
    assert (hint.group(1) if hint else None) == suggestion, problem
    if suggestion is not None:  # the suggested key is one the loader knows
        try:
            load_curriculum(write(tmp_path, MINIMAL), [suggestion + override[override.index("=") :]])
        except ConfigError as error:
            assert not any("unknown key" in p for p in error.problems), error.problems


def test_source_from_options(tmp_path):
    from tripletctl.cli import SOURCE_OPTIONS
    from tripletctl.config.blocks import SourceConfig
    from tripletctl.config.validate import source_from_options

    given = {
        "source": "sentence-transformers/all-nli",
        "layout": "triplets",
        "split": "test",
        "negative_columns": ["negative"],
        "load_dataset": ["name=triplet", "revision=main", "streaming_x=3"],
    }
    source = source_from_options(given, SOURCE_OPTIONS)
    assert source == SourceConfig(
        source="sentence-transformers/all-nli",
        layout="triplets",
        split="test",
        negative_columns=("negative",),
        load_dataset={"name": "triplet", "revision": "main", "streaming_x": 3},
    )
    base = SourceConfig(source="a.jsonl", layout="pairs", load_dataset={"name": "pair"})
    changed = source_from_options({"split": "dev", "load_dataset": ["revision=v1"]}, SOURCE_OPTIONS, base=base)
    assert changed == SourceConfig(
        source="a.jsonl", layout="pairs", split="dev", load_dataset={"name": "pair", "revision": "v1"}
    )
    with pytest.raises(ConfigError) as caught:
        source_from_options(
            {"source": "x.jsonl", "layout": "pair", "format": "text", "anchor_column": "a", "positive_column": "a"},
            SOURCE_OPTIONS,
        )
    problems = caught.value.problems
    assert all(p.startswith("command line: ") and "\n" not in p for p in problems)
    assert any(
        "--layout must be one of labelled, pairs, triplets, got 'pair' (did you mean 'pairs'?)" in p for p in problems
    )
    assert any("--data must be a {label: glob} mapping when --format is text" in p for p in problems)
    with pytest.raises(ConfigError) as caught:
        source_from_options(
            {"source": "x.jsonl", "layout": "pairs", "anchor_column": "a", "positive_column": "a"}, SOURCE_OPTIONS
        )
    assert caught.value.problems == [
        "command line: the pairs columns must be distinct, but 'a' is named twice "
        "among --anchor-column, --positive-column"
    ]


def test_triplets_layout_batch_sizes_count_texts_of_whole_groups(tmp_path):
    data = {
        "source": "org/triplets",
        "layout": "triplets",
        "samples_per_class": 2,
        "negative_columns": ["negative_1", "negative_2", "negative_3"],
    }
    phases = [
        {"name": "a", "mining": "semi-hard", "batch_size": 10, "steps": 1},
        {"name": "b", "mining": "batch-all", "batch_size": 12, "steps": 1},
        {"name": "c", "mining": "batch-hard", "batch_size": 5, "steps": 1},
    ]
    path = write(tmp_path, edit(data=data, phases=phases))
    assert problems_of(path) == [
        f"{path}: phases[1] (b): batch_size must be a multiple of the rows of one triplet group "
        "(anchor, positive and 3 negatives) (5), got 12",
        f"{path}: phases[2] (c): batch_size must hold at least 2 classes of the rows of one triplet group "
        "(anchor, positive and 3 negatives) (5) rows, i.e. be at least 10, got 5",
    ]
    c = load_curriculum(path, ["phases.1.batch_size=15", "phases.2.batch_size=20"])
    assert c.data.rows_per_group == 5 and c.data.columns[2:] == ("negative_1", "negative_2", "negative_3")
    console = Console(record=True, width=160)
    console.print(plan_table(c))
    text = console.export_text()
    assert "anchor, positive and 3 negatives, 5 texts" in " ".join(text.split())
    header = next(line for line in text.splitlines() if "groups" in line).split()
    rows = [line.split() for line in text.splitlines() if line.split()[:2] in (["0", "a"], ["2", "c"])]
    assert [row[header.index("groups")] for row in rows] == ["2", "4"]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (
            {"layout": "triplets"},
            "data.samples_per_class must be 2 when data.layout is triplets "
            "(each row's anchor and positive are its class), got 4",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": []},
            "data.negative_columns must be a non-empty list of distinct column names",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": ["n", "n"]},
            "data.negative_columns must be a non-empty list of distinct column names",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": ["anchor"]},
            "the triplets columns must be distinct, but 'anchor' is named twice among data.anchor_column, "
            "data.positive_column, data.negative_columns",
        ),
        (
            {"layout": "triplets", "format": "text", "source": {"a": "x.txt"}},
            "data.layout must be labelled when data.format is text, got 'triplets'",
        ),
    ],
)
def test_triplets_layout_problems(tmp_path, data, fragment):
    path = write(tmp_path, edit(data={"source": "org/triplets", **data}))
    only(problems_of(path), fragment)


def test_keep_best_takes_an_eval_metric_and_needs_an_eval_block(tmp_path):
    path = write(tmp_path, MINIMAL + "eval:\n  source: org/heldout\n")
    assert load_curriculum(path).train.keep_best is None  # off by default
    assert load_curriculum(path, ["train.keep_best=map@r"]).train.keep_best == "map@r"
    with pytest.raises(ConfigError) as error:
        load_curriculum(path, ["train.keep_best=recall@2"])
    assert error.value.problems == [
        f"{path}: override 'train.keep_best=recall@2': train.keep_best must be one of recall@1, recall@5, "
        "recall@10, map@r, r_precision, triplet_accuracy or null, got 'recall@2' (did you mean 'recall@5'?)"
    ]
    with pytest.raises(ConfigError) as error:
        load_curriculum(write(tmp_path, MINIMAL, "no_eval.yaml"), ["train.keep_best=recall@1"])
    assert "train.keep_best (recall@1) needs an eval block" in error.value.problems[0]


def test_keep_best_names_are_the_scores_evaluation_reports():
    import torch

    from tripletctl.config.until import EVAL_METRICS
    from tripletctl.evaluation.retrieval import retrieval_metrics

    metrics = retrieval_metrics(torch.randn(12, 4), torch.arange(12) % 3)
    scores = {k for k, v in metrics.items() if isinstance(v, float)}
    assert set(EVAL_METRICS) == scores


def test_a_tilde_is_expanded_in_every_path_key_the_same_way(tmp_path, monkeypatch):
    """train.output_dir (relative to the current directory) too: it used to make a literal ./~/runs/x,
    while data.source expanded it; validate --json shows the resolved paths."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "t.jsonl").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    overrides = ["train.output_dir=~/runs/x", "model.name=~/models/m", "data.source=~/data/t.jsonl"]
    plan = load_curriculum(QUICKSTART, overrides)
    assert plan.train.output_dir == str(home / "runs" / "x")
    assert plan.model.name == str(home / "models" / "m") and plan.data.source == str(home / "data" / "t.jsonl")
    shown = CliRunner().invoke(app, ["validate", str(QUICKSTART), *overrides[:2], "--json"])
    assert f'"output_dir": "{home / "runs" / "x"}"' in shown.output, shown.output


def test_a_path_component_over_255_bytes_is_a_problem():
    problem = only(problems_of(QUICKSTART, ["train.output_dir=runs/" + "x" * 300]), "train.output_dir")
    assert "at most 255 bytes (one has 300)" in problem
