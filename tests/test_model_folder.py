"""config/model_folder.py: a model folder's facts read from its JSON files, as the real
sentence-transformers library writes them, and the warning for a new head on a pretrained sentence
model (issue 36, item 2)."""

from __future__ import annotations

import torch
import yaml
from helpers import st_folder
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import ModelConfig
from tripletctl.config.model_folder import folder_facts, head_warning, hub_id_of


def test_facts_of_a_sentence_transformers_folder(tiny_bert_dir, tmp_path):
    folder = st_folder(tiny_bert_dir, tmp_path / "st", pooling="cls", dense=((24, torch.nn.Tanh()),))
    facts = folder_facts(folder)
    assert facts.sentence_transformers and facts.has_weights
    assert facts.pooling == "cls" and facts.dense == (24,) and facts.hidden_size == 64
    assert facts.max_seq_length == 16 and facts.hub_id is None


def test_facts_of_a_config_only_folder(tiny_bert_dir):
    facts = folder_facts(tiny_bert_dir)
    assert not facts.has_weights and not facts.sentence_transformers and facts.pooling is None
    assert folder_facts("org/not-a-folder") is None


def test_the_hub_cache_names_its_model(tmp_path):
    snapshot = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_of(snapshot) == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id_of(tmp_path) is None


def test_a_new_head_on_a_pretrained_sentence_model_is_a_warning(tiny_bert_dir, tmp_path):
    plain = st_folder(tiny_bert_dir, tmp_path / "plain")
    with_dense = st_folder(tiny_bert_dir, tmp_path / "dense", dense=((24, torch.nn.Tanh()),))
    warning = head_warning(ModelConfig(name=str(plain), head=(256,)))
    assert warning.startswith(
        f"model.head [256] adds randomly initialised layers on top of the pretrained sentence model {plain}"
    )
    assert "set model.head: [] " in warning
    assert head_warning(ModelConfig(name=str(plain))) is None  # no head
    assert head_warning(ModelConfig(name=str(with_dense), head=(24,))) is None  # its own Dense layers continue
    assert head_warning(ModelConfig(name=str(tiny_bert_dir), head=(256,))) is None  # a plain encoder
    assert head_warning(ModelConfig(name=str(plain), init="config", head=(256,))) is None  # random anyway
    assert head_warning(ModelConfig(name="sentence-transformers/all-MiniLM-L6-v2", head=(256,))) is not None


def test_validate_prints_the_warning(tiny_bert_dir, tmp_path, assets_dir):
    folder = st_folder(tiny_bert_dir, tmp_path / "st")
    spec = {
        "model": {"name": str(folder), "head": [32]},
        "data": {"source": str(assets_dir / "train.jsonl")},
        "phases": [{"name": "a", "mining": "semi-hard", "batch_size": 16, "steps": 2}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "c.yaml")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "warning: model.head [32] adds randomly initialised layers" in result.output
    quiet = CliRunner().invoke(app, ["validate", str(tmp_path / "c.yaml"), "model.head=[]"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output
