"""Loading checkpoints (checkpoint_load.py): a checkpoint is untrusted, so a mismatched model, a file
that points outside it or a YAML bomb is one clear error; a crash mid-swap still loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import CHECKPOINT_STATE, assert_same_params, tiny_model

from tripletctl.core.errors import CheckpointError
from tripletctl.outputs.checkpoint_load import load_checkpoint
from tripletctl.outputs.checkpoint_save import save_checkpoint


def test_mismatched_model_is_a_clear_error(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir, head=(16,))
    save_checkpoint(
        tmp_path / "checkpoint",
        model=model,
        tokenizer=tok,
        optimizer=None,
        state=CHECKPOINT_STATE,
        stream_state=None,
        curriculum={},
    )
    other, _ = tiny_model(tiny_bert_dir, head=(8,))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "checkpoint", model=other)


def test_only_prev_after_crash_between_renames(tiny_bert_dir, tmp_path):
    """Simulated: `checkpoint` → `checkpoint.prev` happened, tmp → `checkpoint` did not."""
    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "phase-0-x" / "checkpoint"
    save_checkpoint(
        target, model=model, tokenizer=tok, optimizer=None, state={"global_step": 1}, stream_state=None, curriculum={}
    )
    os.replace(target, target.with_name("checkpoint.prev"))
    fresh, _ = tiny_model(tiny_bert_dir, seed=1)
    loaded = load_checkpoint(tmp_path, model=fresh)
    assert loaded.path.name == "checkpoint.prev" and loaded.state == {"global_step": 1}
    assert_same_params(fresh, model)


def test_stream_file_must_stay_inside_the_checkpoint(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "checkpoint"
    save_checkpoint(
        target,
        model=model,
        tokenizer=tok,
        optimizer=None,
        state=CHECKPOINT_STATE,
        stream_state={"position": (1, 2)},
        curriculum={},
    )
    record = json.loads((target / "state.json").read_text())
    assert record["stream_file"] == "stream.pt"
    torch.save({"position": (1, 2)}, tmp_path / "outside.pt")
    for name in (str(tmp_path / "outside.pt"), "../outside.pt", "sub/stream.pt", "", 7):
        (target / "state.json").write_text(json.dumps({**record, "stream_file": name}))
        with pytest.raises(
            CheckpointError, match="stream_file must (name a file inside the checkpoint|be a file name)"
        ):
            load_checkpoint(target)


def test_an_alias_bomb_in_the_checkpoint_curriculum_is_refused(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "checkpoint"
    save_checkpoint(
        target, model=model, tokenizer=tok, optimizer=None, state=CHECKPOINT_STATE, stream_state=None, curriculum={}
    )
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (target / "curriculum.yaml").write_text("\n".join(lines) + "\nphases: *a8\n")
    with pytest.raises(CheckpointError, match="curriculum.yaml is damaged: .*expands"):
        load_checkpoint(target)
