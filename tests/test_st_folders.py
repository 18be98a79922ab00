"""Any sentence-transformers folder, read from its modules (Pooling, Dense, Normalize), not guessed:
the real library writes the folders and gives the reference embeddings; eval, inspect-collapse and
training start from them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ST_MAX_LENGTH, st_folder
from sentence_transformers import SentenceTransformer
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import ModelConfig
from tripletctl.core.errors import ModelError
from tripletctl.model.encoder import build_model, encode, load_sentence_transformers

TEXTS = ["the quick brown fox", "a", "hello world", "tokens tokens tokens and more tokens", "jumps over"]
MAX_LENGTH = ST_MAX_LENGTH


@pytest.mark.slow
@pytest.mark.parametrize(
    "pooling,dense,normalize",
    [
        ("mean", (), True),
        ("cls", ((24, torch.nn.Tanh()),), True),
        ("mean", ((24, torch.nn.ReLU()), (8, torch.nn.Identity())), False),
    ],
)
def test_embeddings_equal_sentence_transformers(tiny_bert_dir, tmp_path, pooling, dense, normalize):
    folder = st_folder(tiny_bert_dir, tmp_path / "st", pooling, dense, normalize)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model, tokenizer, pipeline = load_sentence_transformers(folder)
    ours = encode(model, tokenizer, TEXTS, batch_size=2, max_length=MAX_LENGTH)
    assert pipeline.pooling == pooling and len(pipeline.dense) == len(dense)
    if normalize:
        assert torch.allclose(ours, theirs, atol=1e-5)
    else:  # cosine similarity and no Normalize: tripletctl compares unit vectors, which rank alike
        assert not torch.allclose(theirs.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-3)
        assert torch.allclose(ours, torch.nn.functional.normalize(theirs, dim=1), atol=1e-5)


def test_old_style_pooling_flags_are_read(tiny_bert_dir, tmp_path):
    folder = st_folder(tiny_bert_dir, tmp_path / "st", "cls")
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert load_sentence_transformers(folder)[2].pooling == "cls"


def test_unsupported_modules_are_refused_not_guessed(tiny_bert_dir, tmp_path):
    folder = st_folder(tiny_bert_dir, tmp_path / "st", "max")
    with pytest.raises(ModelError, match=r"1_Pooling.*pooling 'max' is not supported"):
        load_sentence_transformers(folder)
    folder = st_folder(tiny_bert_dir, tmp_path / "st2", "mean", ((8, torch.nn.Tanh()),))
    config = folder / "2_Dense" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "activation_function": "os.system"}))
    with pytest.raises(ModelError, match=r"activation 'os.system' is not supported"):
        load_sentence_transformers(folder)


@pytest.mark.slow
def test_eval_and_inspect_collapse_take_a_model_folder(tiny_bert_dir, tmp_path, assets_dir):
    folder = st_folder(tiny_bert_dir, tmp_path / "st")
    data = str(assets_dir / "many_class.jsonl")
    result = CliRunner().invoke(app, ["eval", str(folder), "--data", data, "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["checkpoint"] == str(folder) and 0 <= metrics["recall@1"] <= 1 and metrics["rows"] > 10
    result = CliRunner().invoke(app, ["inspect-collapse", str(folder), "--data", data, "--json"])
    assert result.exit_code in (0, 1, 3), result.output
    assert "verdict" in json.loads(result.output)

    result = CliRunner().invoke(app, ["eval", str(folder)])  # a model holds no held-out data
    assert result.exit_code == 2 and "is a model folder" in result.output and "--data" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "empty"), "--data", data])
    assert result.exit_code == 2 and "model folder" in result.output and "Traceback" not in result.output


def test_training_starts_from_the_folders_modules(tiny_bert_dir, tmp_path):
    folder = st_folder(tiny_bert_dir, tmp_path / "st", "cls", ((24, torch.nn.Tanh()),))
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model, tokenizer = build_model(ModelConfig(name=str(folder), pooling="cls"), seed=0)
    assert model.head_sizes == (24,)
    assert torch.allclose(encode(model, tokenizer, TEXTS, batch_size=5, max_length=MAX_LENGTH), theirs, atol=1e-5)

    with pytest.raises(ModelError, match=r"model.pooling is mean but .*1_Pooling pools cls: set model.pooling: cls"):
        build_model(ModelConfig(name=str(folder)), seed=0)
    with pytest.raises(ModelError, match=r"model.head is \[8\] but .* has Dense layers \[24\]"):
        build_model(ModelConfig(name=str(folder), pooling="cls", head=(8,)), seed=0)


def test_a_hub_name_that_cannot_be_fetched_is_one_line(assets_dir):
    """A name of the form org/name is looked up on the hub (offline here: HF_HUB_OFFLINE=1, set by
    conftest), so the user sees why, not a traceback or a 'not a checkpoint'."""
    data = str(assets_dir / "many_class.jsonl")
    result = CliRunner().invoke(app, ["eval", "no-such-org/no-such-model", "--data", data])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no-such-org/no-such-model is not a local folder and cannot be fetched" in lines[0]
