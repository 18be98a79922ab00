"""Saving checkpoints (checkpoint_save.py): the exact round trip, what is refused before anything is
written, and survival of a save killed half-way or a deletion that dies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHECKPOINT_STATE, REPO, assert_same_params, fake_checkpoint, tiny_model

from tripletctl.outputs.checkpoint_find import checkpoint_dir, resolve_checkpoint
from tripletctl.outputs.checkpoint_load import load_checkpoint
from tripletctl.outputs.checkpoint_save import clean_leftovers, save_checkpoint
from tripletctl.outputs.rng import restore_rng

CURRICULUM = {"model": {"name": "tiny", "head": (16,)}, "phases": [{"name": "semi-hard", "steps": 5}]}


def trained(tiny_bert_dir: Path):
    """A model and an AdamW that has taken one step, so the optimizer has per-param state."""
    model, tok = tiny_model(tiny_bert_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enc = tok(["abc", "de f"], padding=True, return_tensors="pt")
    model(enc["input_ids"], enc["attention_mask"]).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, tok, opt


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_restores_everything(tiny_bert_dir, tmp_path):
    model, tok, opt = trained(tiny_bert_dir)
    target = checkpoint_dir(tmp_path, 0, "semi-hard")
    assert target == tmp_path / "phase-0-semi-hard" / "checkpoint"
    stream = {"offset": 12, "buffer": [1, 2, 3]}
    path = save_checkpoint(
        target,
        model=model,
        tokenizer=tok,
        optimizer=opt,
        state=CHECKPOINT_STATE,
        stream_state=stream,
        curriculum=CURRICULUM,
    )
    expected = (random.random(), np.random.rand(), torch.rand(2))  # draws right after the save

    assert path == target
    assert {p.name for p in target.iterdir()} == {
        "model",
        "optimizer.pt",
        "state.json",
        "rng.pt",
        "curriculum.yaml",
        "COMPLETE",
    }
    on_disk = json.loads((target / "state.json").read_text())
    assert {k: on_disk[k] for k in CHECKPOINT_STATE} == CHECKPOINT_STATE and on_disk["stream"] == stream
    assert on_disk["step"] == 3  # top-level keys: tools and tests read state.json directly

    fresh, _, fresh_opt = trained(tiny_bert_dir)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    loaded = load_checkpoint(tmp_path / "phase-0-semi-hard", model=fresh, optimizer=fresh_opt)
    assert loaded.path == target and loaded.model_dir == target / "model"
    assert loaded.state == CHECKPOINT_STATE and loaded.stream_state == stream
    assert loaded.curriculum == {"model": {"name": "tiny", "head": [16]}, "phases": [{"name": "semi-hard", "steps": 5}]}
    assert_same_params(fresh, model)
    saved_opt, restored_opt = opt.state_dict(), fresh_opt.state_dict()
    assert saved_opt["param_groups"] == restored_opt["param_groups"]
    for idx, st in saved_opt["state"].items():
        for key, value in st.items():
            assert torch.equal(value, restored_opt["state"][idx][key]), (idx, key)

    restore_rng(loaded.rng)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_non_json_stream_state_goes_to_stream_pt(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir)
    stream = {"position": (3, 4), 7: torch.arange(3)}  # tuple and int key do not survive JSON
    save_checkpoint(
        tmp_path / "checkpoint",
        model=model,
        tokenizer=tok,
        optimizer=None,
        state=CHECKPOINT_STATE,
        stream_state=stream,
        curriculum={},
    )
    assert (tmp_path / "checkpoint" / "stream.pt").is_file()
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded.stream_state["position"] == (3, 4)
    assert torch.equal(loaded.stream_state[7], torch.arange(3))


def test_reserved_state_keys_are_refused(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(
            tmp_path / "checkpoint",
            model=model,
            tokenizer=tok,
            optimizer=None,
            state={"stream": 1},
            stream_state=None,
            curriculum={},
        )
    with pytest.raises(TypeError):  # not JSON: fails before anything replaces the old checkpoint
        save_checkpoint(
            tmp_path / "checkpoint",
            model=model,
            tokenizer=tok,
            optimizer=None,
            state={"x": object()},
            stream_state=None,
            curriculum={},
        )
    assert list(tmp_path.iterdir()) == []


def test_resave_replaces_and_cleans(tiny_bert_dir, tmp_path):
    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "checkpoint"
    stale = fake_checkpoint(tmp_path / "checkpoint.tmp-999999", complete=False)
    for step in (1, 2):
        save_checkpoint(
            target,
            model=model,
            tokenizer=tok,
            optimizer=None,
            state={"global_step": step},
            stream_state=None,
            curriculum={},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert not stale.exists()
    assert load_checkpoint(target).state == {"global_step": 2}


# ----------------------------------------------------------------------------- killed mid-save

KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
import tripletctl.outputs.checkpoint_save as ck
from tripletctl.model.encoder import build_model

target, tiny_bert, stage = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = SimpleNamespace(name=tiny_bert, init="config", tokenizer=None, pooling="mean", head=(16,),
                      normalize=True)
model, tok = build_model(cfg, 0)
opt = torch.optim.AdamW(model.parameters())

def save(step):
    ck.save_checkpoint(target, model=model, tokenizer=tok, optimizer=opt,
                       state={"global_step": step}, stream_state={"step": step}, curriculum={})

save(1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)

def pause():
    print("PAUSED", flush=True)
    time.sleep(120)

if stage == "write":  # the model is in the tmp dir, the rest is not
    real_save_model = ck.save_model
    def slow_save_model(*a, **k):
        real_save_model(*a, **k)
        pause()
    ck.save_model = slow_save_model
else:  # "swap": checkpoint -> checkpoint.prev done, tmp -> checkpoint not yet
    real_replace = os.replace
    def slow_replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".prev"):
            pause()
    ck.os.replace = slow_replace
save(2)
print("SECOND SAVE FINISHED", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["write", "swap"])
def test_sigkill_during_save_keeps_previous_checkpoint(tiny_bert_dir, tmp_path, stage):
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    target = tmp_path / "run" / "phase-0-semi-hard" / "checkpoint"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen(
        [sys.executable, str(script), str(target), str(tiny_bert_dir), stage],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as proc:
        watchdog = threading.Timer(120, proc.kill)  # never hang the suite
        watchdog.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.strip() == "PAUSED":
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            proc.wait()
        finally:
            watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]

    leftovers = sorted(p.name for p in target.parent.iterdir())
    tmp_name = f"checkpoint.tmp-{proc.pid}"
    if stage == "write":
        assert leftovers == ["checkpoint", tmp_name]
        assert not (target.parent / tmp_name / "COMPLETE").exists()
        expected_path = target
    else:
        assert leftovers == ["checkpoint.prev", tmp_name]
        expected_path = target.with_name("checkpoint.prev")

    first, tok = tiny_model(tiny_bert_dir, seed=0)  # what the first save held: the seed-0 weights
    restored, _ = tiny_model(tiny_bert_dir, seed=3)
    for path in (tmp_path / "run", target.parent, target):
        assert resolve_checkpoint(path) == expected_path
    loaded = load_checkpoint(tmp_path / "run", model=restored)
    assert loaded.path == expected_path
    assert loaded.state == {"global_step": 1} and loaded.stream_state == {"step": 1}
    assert_same_params(restored, first)

    # the next save recovers the layout: one complete checkpoint, nothing stale
    save_checkpoint(
        target, model=first, tokenizer=tok, optimizer=None, state={"global_step": 2}, stream_state=None, curriculum={}
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint"]
    assert load_checkpoint(target).state == {"global_step": 2}


# ----------------------------------------------------------------------------- deletion and leftovers


def test_a_directory_is_renamed_before_it_is_deleted(tiny_bert_dir, tmp_path, monkeypatch):
    """A removal that dies half-way (here: rmtree raising after deleting COMPLETE's siblings) leaves
    a trash directory, never a half-deleted `checkpoint.prev` that still holds COMPLETE."""
    import tripletctl.outputs.checkpoint_save as ck

    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "phase-0-x" / "checkpoint"

    def save(step: int) -> None:
        save_checkpoint(
            target,
            model=model,
            tokenizer=tok,
            optimizer=None,
            state={"global_step": step},
            stream_state=None,
            curriculum={},
        )

    save(1)
    seen = []
    real_rmtree = ck.shutil.rmtree

    def dies_half_way(path, ignore_errors=False):
        if not seen and Path(path).exists():
            seen.append(Path(path).name)
            for child in Path(path).iterdir():
                if child.is_file() and child.name != "COMPLETE":
                    child.unlink()
            raise KeyboardInterrupt  # as if killed right here
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ck.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    assert seen and all(".trash-" in name for name in seen)
    names = sorted(p.name for p in target.parent.iterdir())
    assert "checkpoint.prev" not in names and "checkpoint" in names
    assert load_checkpoint(target.parent).state == {"global_step": 2}
    save(3)  # the next save clears the trash
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint"]


def test_clean_leftovers_removes_what_killed_saves_left(tiny_bert_dir, tmp_path):

    model, tok = tiny_model(tiny_bert_dir)
    target = tmp_path / "phase-0-x" / "checkpoint"
    save_checkpoint(
        target, model=model, tokenizer=tok, optimizer=None, state={"global_step": 4}, stream_state=None, curriculum={}
    )
    half = fake_checkpoint(target.with_name("checkpoint.prev"))  # what the old removal could leave: COMPLETE, no model
    fake_checkpoint(target.with_name("checkpoint.tmp-999999"), complete=False)
    fake_checkpoint(target.with_name("checkpoint.trash-999999-1"))
    assert resolve_checkpoint(target.parent) == target  # never the half-deleted one
    clean_leftovers(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint"] and not half.exists()
    # but a complete checkpoint.prev beside an incomplete checkpoint is the one to keep
    os.replace(target, target.with_name("checkpoint.prev"))
    fake_checkpoint(target, complete=False)
    clean_leftovers(target)
    assert resolve_checkpoint(target.parent) == target.with_name("checkpoint.prev")


def test_a_stream_state_that_needs_code_to_load_is_not_written(tiny_bert_dir, tmp_path):
    import fractions

    model, tok = tiny_model(tiny_bert_dir)
    with pytest.raises(TypeError, match="cannot load without running code"):
        save_checkpoint(
            tmp_path / "checkpoint",
            model=model,
            tokenizer=tok,
            optimizer=None,
            state=CHECKPOINT_STATE,
            stream_state={"x": fractions.Fraction(1, 3)},
            curriculum={},
        )
    assert not (tmp_path / "checkpoint").exists()
