"""One block checked (tripletctl/config/block_checks.py), through `load_curriculum` and
`source_from_options`: bad values name the block and key, required blocks, text sources and their
format, paths resolved against the curriculum's directory, layouts and their columns."""

from __future__ import annotations

import pytest
import yaml
from helpers import MINIMAL, edit, only, problems_of, write

from tripletctl.config.block_checks import source_from_options
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError


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


def test_eval_block_requires_a_source(tmp_path):
    path = write(tmp_path, edit(eval={"every": 10}))
    assert problems_of(path) == [f"{path}: missing required key 'eval.source'"]


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


def test_source_from_options(tmp_path):
    from tripletctl.cli_options import SOURCE_OPTIONS
    from tripletctl.config.blocks import SourceConfig

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
