"""The curriculum's dataclasses (tripletctl/config/blocks.py): defaults, frozen values, the dict form
that round-trips through YAML, and every key documented in docs/curricula.md."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from helpers import FACENET, MINIMAL, QUICKSTART, REPO, edit, phases_with, write
from rich.console import Console

from tripletctl.config.blocks import (
    Curriculum,
    DataConfig,
    EvalConfig,
    MemoryConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
    curriculum_to_dict,
)
from tripletctl.config.plan import plan_table
from tripletctl.config.until import Plateau, UntilConfig
from tripletctl.config.validate import load_curriculum


def test_dataclasses_are_frozen_and_curriculum_owns_its_dicts(tmp_path):
    kwargs = {"name": "pair", "data_files": ["a.parquet"]}
    c = load_curriculum(write(tmp_path, edit(data={"source": "org/corpus", "load_dataset": kwargs})))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0  # type: ignore[misc]
    assert c.data.load_dataset == kwargs
    assert isinstance(c.phases, tuple) and isinstance(c.model.head, tuple)
    other = load_curriculum(tmp_path / "curriculum.yaml")
    c.data.load_dataset["data_files"].append("b.parquet")
    assert other.data.load_dataset == kwargs  # no shared state between loads


@pytest.mark.parametrize("source", ["quickstart", "facenet", "overridden"])
def test_round_trip_through_yaml(tmp_path, source):
    if source == "quickstart":
        original = load_curriculum(QUICKSTART)
    elif source == "facenet":
        original = load_curriculum(FACENET)
    else:
        original = load_curriculum(
            FACENET,
            [
                "model.head=[]",
                "eval.source={a: ./a/*.txt}",
                "eval.format=text",
                "eval.layout=labelled",
                "data.load_dataset.revision=main",
                "phases.1.lr=1e-6",
            ],
        )
    dumped = yaml.safe_dump(curriculum_to_dict(original), sort_keys=False)
    elsewhere = tmp_path / "deeper" / "as-run.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(dumped)
    again = load_curriculum(elsewhere)
    assert again == original
    assert isinstance(again, Curriculum) and again.path == str(elsewhere)


def test_every_key_is_documented_in_its_section_of_curricula_md():
    """A key is declared once, on its dataclass field; the house rule is that it is documented too."""
    text = (REPO / "docs" / "curricula.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    blocks = [
        ("`model`", ModelConfig),
        ("`data`", DataConfig),
        ("`train`", TrainConfig),
        ("`phases`", PhaseConfig),
        ("Ending a phase early: `until`", UntilConfig),
        ("Ending a phase early: `until`", Plateau),
        ("`eval` (optional)", EvalConfig),
    ]
    for title, cls in blocks:
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in sections[title]]
        assert not missing, (title, missing)


def test_curriculum_to_dict_is_plain(tmp_path):
    result = curriculum_to_dict(load_curriculum(QUICKSTART))
    assert set(result) == {"model", "data", "train", "phases", "eval"}
    assert result["model"]["head"] == [64] and isinstance(result["phases"], list)
    assert "path" not in result
    yaml.safe_dump(result)  # no tuples or other non-YAML types


def test_data_and_eval_blocks_are_one_source_config(tmp_path):
    from tripletctl.config.blocks import SourceConfig

    text = MINIMAL + (
        "eval:\n  source: org/heldout\n  layout: triplets\n  negative_columns: [negative_1, negative_2]\n"
        "  load_dataset: {name: triplet}\n"
    )
    c = load_curriculum(write(tmp_path, text))
    assert isinstance(c.data, SourceConfig) and isinstance(c.eval, SourceConfig)
    source_keys = [f.name for f in dataclasses.fields(SourceConfig)]
    assert [f.name for f in dataclasses.fields(DataConfig)][: len(source_keys)] == source_keys
    assert [f.name for f in dataclasses.fields(EvalConfig)][: len(source_keys)] == source_keys
    assert c.eval.columns == ("anchor", "positive", "negative_1", "negative_2")
    assert c.eval.load_dataset == {"name": "triplet"}
    assert load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)), "again.yaml")) == c


def test_memory_is_off_by_default_inherited_from_train_and_overridable(tmp_path):
    assert load_curriculum(write(tmp_path, MINIMAL)).phases[0].memory is None
    text = edit(train={"memory": {"size": 4096}}, phases=phases_with(memory={"size": 512, "start_step": 100}))
    c = load_curriculum(write(tmp_path, text))
    assert c.train.memory == MemoryConfig(size=4096, start_step=0)
    assert c.phases[0].memory == MemoryConfig(size=4096, start_step=0)  # from the train block
    assert c.phases[2].memory == MemoryConfig(size=512, start_step=100)
    off = load_curriculum(write(tmp_path, text), ["phases.0.memory=null", "phases.1.memory={size: 8}"])
    assert off.phases[0].memory is None and off.phases[1].memory == MemoryConfig(size=8)
    assert load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)))) == c  # round trip
    console = Console(record=True, width=160)
    console.print(plan_table(c))
    assert "512 from step 100" in console.export_text()


def test_chunk_tokens_is_a_budget_that_phases_inherit_or_replace(tmp_path):
    text = edit(train={"chunk_tokens": 8192}, phases=phases_with(chunk_size=64))
    c = load_curriculum(write(tmp_path, text))
    assert (c.train.chunk_size, c.train.chunk_tokens) == ("auto", 8192)
    assert (c.phases[0].chunk_size, c.phases[0].chunk_tokens) == ("auto", 8192)  # inherited budget
    assert (c.phases[2].chunk_size, c.phases[2].chunk_tokens) == (64, None)  # the phase's rows win
    text = edit(train={"chunk_size": 32}, phases=phases_with(chunk_tokens="auto"))
    c = load_curriculum(write(tmp_path, text))
    assert (c.phases[0].chunk_size, c.phases[0].chunk_tokens) == (32, None)
    assert (c.phases[2].chunk_size, c.phases[2].chunk_tokens) == ("auto", "auto")  # the phase's budget wins
    again = load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)), "again.yaml"))
    assert again.phases == c.phases and again.train == c.train
    assert TrainConfig().chunk_tokens is None
