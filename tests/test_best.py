"""OUTPUT/best: replaced only by a strictly better finite value with finite weights, atomically."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_BERT

from tripletctl.config.blocks import ModelConfig
from tripletctl.core.errors import OutputError
from tripletctl.model.encoder import build_model, encode, load_model
from tripletctl.outputs import best

CURRICULUM = {"data": {"max_length": 20}, "phases": [{"name": "p", "distance": "euclidean", "steps": 9}]}


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(name=str(TINY_BERT), init="config", head=(8,)), seed=0)


def event(value: float, step: int) -> dict:
    return {
        "event": "eval",
        "global_step": step,
        "phase": "p",
        "phase_index": 0,
        "step": step,
        "recall@1": value,
        "map@r": value / 2,
        "rows": 10,
    }


def offer(output, value, step, model, tok):
    return best.offer(output, "recall@1", event(value, step), model=model, tokenizer=tok, curriculum=CURRICULUM)


@pytest.mark.parametrize(
    "value, kept, expected",
    [
        (0.5, None, True),
        (0.5, {"value": 0.4}, True),
        (0.4, {"value": 0.4}, False),
        (0.3, {"value": 0.4}, False),
        (float("nan"), None, False),
        (float("inf"), None, False),
        (None, None, False),
        (True, None, False),
    ],
)
def test_improves(value, kept, expected):
    assert best.improves(value, kept) is expected


def test_keeps_the_best_and_only_the_best(tiny_model, tmp_path):
    model, tok = tiny_model
    assert best.read_best(tmp_path) is None
    first = offer(tmp_path, 0.5, 3, model, tok)
    assert first is not None and first["value"] == 0.5 and first["global_step"] == 3
    kept_weights = (tmp_path / "best" / "model" / "model.safetensors").read_bytes()
    assert offer(tmp_path, 0.4, 6, model, tok) is None
    assert offer(tmp_path, 0.5, 6, model, tok) is None  # a tie keeps the earlier model
    assert best.read_best(tmp_path)["global_step"] == 3
    assert (tmp_path / "best" / "model" / "model.safetensors").read_bytes() == kept_weights
    third = offer(tmp_path, 0.75, 9, model, tok)
    assert third["global_step"] == 9 and best.read_best(tmp_path) == third
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no .prev or temporaries left
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "COMPLETE",
        "best.json",
        "curriculum.yaml",
        "model",
    ]
    card = (tmp_path / "best" / "model" / "README.md").read_text()
    assert "| recall@1 | 0.7500 |" in card and "global step 9" in card
    loaded, tok2 = load_model(tmp_path / "best" / "model")
    torch.testing.assert_close(encode(loaded, tok2, ["a b", "c"]), encode(model, tok, ["a b", "c"]))


def test_non_finite_weights_never_replace_it(tiny_model, tmp_path):
    model, tok = tiny_model
    offer(tmp_path, 0.5, 3, model, tok)
    kept = (tmp_path / "best" / "best.json").read_text()
    head_bias = model.head[0].bias
    saved = head_bias.detach().clone()
    try:
        with torch.no_grad():
            head_bias[0] = math.nan
        assert offer(tmp_path, 0.9, 6, model, tok) is None
    finally:
        with torch.no_grad():
            head_bias.copy_(saved)
    assert (tmp_path / "best" / "best.json").read_text() == kept
    assert offer(tmp_path, float("nan"), 7, model, tok) is None


def test_a_failed_write_leaves_the_old_best(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    offer(tmp_path, 0.5, 3, model, tok)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(best, "save_model", disk_full)
    with pytest.raises(OutputError, match="No space left"):  # one line naming the path, exit 2
        offer(tmp_path, 0.9, 6, model, tok)
    assert best.read_best(tmp_path)["value"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["global_step"] == 3
