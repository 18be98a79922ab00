"""core/folders.py: a model folder with custom code (auto_map, .py files) or a symlink out of it is
refused by every reader, in one line and exit 2, and nothing in it runs (the .py files write a marker
when imported); config and tokenizer files are bounded. Reference: docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART_HELDOUT, TINY_BERT, write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import ModelConfig
from tripletctl.core.files import FileRefused
from tripletctl.core.folders import FolderRefused, check_model_folder, refuse_code, refuse_escapes
from tripletctl.model.encoder import build_model, save_model

EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tripletctl model folder (what `export` writes), built offline from the tiny BERT's config."""
    folder = tmp_path_factory.mktemp("model") / "model0"
    model, tokenizer = build_model(ModelConfig(name=str(TINY_BERT), init="config", head=(16,)), seed=0)
    save_model(model, tokenizer, folder)
    return folder


def evil_copy(model_folder: Path, where: Path, file: str = "config.json") -> tuple[Path, Path]:
    """The model folder with `auto_map` in `file` and the two modules it names, each writing the marker
    when imported; returns the folder and the marker."""
    folder, marker = where / "evil1", where / "MARKER"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / file).read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    if file == "config.json":
        config["model_type"] = "evilbert"
    (folder / file).write_text(json.dumps(config))
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (folder / module).write_text(EVIL_CODE.format(marker=str(marker)))
    return folder, marker


def test_auto_map_and_python_files_are_refused_naming_the_file_and_key(model_folder, tmp_path):
    folder, _ = evil_copy(model_folder, tmp_path)
    with pytest.raises(FolderRefused, match=r"config.json: key 'auto_map'"):
        refuse_code(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FolderRefused, match=r"(modeling|configuration)_evil.py: a model folder holding Python"):
        refuse_code(folder)
    refuse_code(model_folder)  # a clean folder passes


def test_tokenizer_config_auto_map_is_refused(model_folder, tmp_path):
    folder, _ = evil_copy(model_folder, tmp_path, file="tokenizer_config.json")
    for module in folder.glob("*.py"):
        module.unlink()
    with pytest.raises(FolderRefused, match=r"tokenizer_config.json: key 'auto_map'"):
        check_model_folder(folder)


def test_symlinks_out_of_the_folder_are_refused_inside_ones_are_not(model_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(model_folder, folder)
    (folder / "SAME.json").symlink_to(folder / "config.json")
    refuse_escapes(folder)
    (folder / "NOTES.txt").symlink_to("/etc/passwd")
    with pytest.raises(FolderRefused, match=r"NOTES.txt is a symlink to /etc/passwd, outside"):
        check_model_folder(folder)


def test_a_hub_snapshot_may_link_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    check_model_folder(snapshot)


def test_an_oversized_tokenizer_file_is_refused_before_transformers_reads_it(model_folder, tmp_path):
    folder = tmp_path / "big"
    shutil.copytree(model_folder, folder)
    with open(folder / "tokenizer.json", "r+b") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    with pytest.raises(FileRefused, match=r"tokenizer.json is larger than 64 MiB"):
        check_model_folder(folder)


def _one_line(result) -> str:
    output = result.output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_every_reader_refuses_a_folder_with_code_and_runs_none_of_it(model_folder, tmp_path):
    folder, marker = evil_copy(model_folder, tmp_path)
    base = write_curriculum(tmp_path / "train")
    commands = [
        ("eval", folder, "--data", QUICKSTART_HELDOUT),
        ("inspect-collapse", folder, "--data", QUICKSTART_HELDOUT),
        ("compare", folder, model_folder, "--data", QUICKSTART_HELDOUT),
        ("compare", model_folder, folder, "--data", QUICKSTART_HELDOUT),
        ("export", folder, tmp_path / "out"),
    ]
    for init in ("pretrained", "config"):
        commands.append(("train", base, f"model.name={folder}", f"model.init={init}"))
    for command in commands:
        result = CliRunner().invoke(app, [str(part) for part in command], input="y\ny\n")
        assert result.exit_code == 2, (command, result.output)
        assert "auto_map" in _one_line(result) or ".py" in _one_line(result), result.output
        assert not marker.exists(), f"{command[0]} ran the folder's code"
    assert not (tmp_path / "out").exists() and not (tmp_path / "train" / "run" / "phase-0-semi-hard").exists()

    from tripletctl.api import load

    with pytest.raises(FolderRefused):
        load(folder)
    assert not marker.exists()


@pytest.mark.slow
def test_a_terminal_answer_of_yes_runs_nothing(model_folder, tmp_path):
    """The real CLI with `yes y` on stdin: transformers is never asked, so it never prompts or reads."""
    folder, marker = evil_copy(model_folder, tmp_path)
    for module in folder.glob("*.py"):  # only auto_map left: the key alone is refused
        module.rename(module.with_suffix(".txt"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "tripletctl", "eval", str(folder), "--data", str(QUICKSTART_HELDOUT)],
        input="y\n" * 1000,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "" or "custom code" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "key 'auto_map'" in lines[0], done.stderr
    assert "[y/N]" not in done.stdout + done.stderr and not marker.exists()


def test_train_never_writes_auto_map_into_a_checkpoint(model_folder, tmp_path):
    """Even a model object whose config says auto_map (built in Python) saves without it."""
    model, tokenizer = build_model(ModelConfig(name=str(TINY_BERT), init="config", head=()), seed=0)
    model.encoder.config.auto_map = {"AutoModel": "modeling_evil.EvilModel"}
    save_model(model, tokenizer, tmp_path / "saved")
    check_model_folder(tmp_path / "saved")
    assert "auto_map" not in yaml.safe_load((tmp_path / "saved" / "config.json").read_text())


def test_eval_refuses_weights_or_a_dense_module_linked_from_outside(model_folder, tmp_path):
    for linked in ("model.safetensors", "2_Dense"):
        folder = tmp_path / linked / "model"
        shutil.copytree(model_folder, folder)
        outside = tmp_path / linked / "elsewhere"
        outside.parent.mkdir(exist_ok=True)
        shutil.move(folder / linked, outside)
        (folder / linked).symlink_to(outside)
        result = CliRunner().invoke(app, ["eval", str(folder), "--data", str(QUICKSTART_HELDOUT)])
        assert result.exit_code == 2, result.output
        assert f"{linked} is a symlink to {outside}, outside the model folder" in _one_line(result)


class _PlantMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_code_pickle_as_the_base_models_weights_is_one_line(model_folder, tmp_path):
    """`train model.init=pretrained` from a folder whose pytorch_model.bin is a code pickle."""
    import torch

    folder, marker = tmp_path / "base", tmp_path / "PWNED"
    shutil.copytree(model_folder, folder)
    (folder / "model.safetensors").unlink()
    torch.save(_PlantMarker(marker), folder / "pytorch_model.bin")
    path = write_curriculum(tmp_path / "train")
    result = CliRunner().invoke(app, ["train", str(path), f"model.name={folder}", "model.init=pretrained"])
    assert result.exit_code == 2, result.output
    assert "hold objects that could run code" in _one_line(result) and not marker.exists()


def test_a_checkpoint_whose_model_holds_code_is_refused_by_eval(tmp_path):
    """The checkpoint of a run (as `train` copied .py files and auto_map into model/ before): `eval RUN`."""
    import torch

    from tripletctl.outputs.checkpoint_save import save_checkpoint

    model, tokenizer = build_model(ModelConfig(name=str(TINY_BERT), init="config", head=(16,)), seed=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    checkpoint = run / "phase-0-only" / "checkpoint"
    save_checkpoint(
        checkpoint,
        model=model,
        tokenizer=tokenizer,
        optimizer=torch.optim.AdamW(model.parameters()),
        state={"phase_index": 0, "phase_name": "only", "step": 1, "global_step": 1},
        stream_state={"row": 0},
        curriculum={"model": {"name": "tiny", "init": "config"}, "phases": []},
    )
    _, marker = evil_copy(checkpoint / "model", tmp_path / "x")  # the evil files, planted into model/ below
    evil = tmp_path / "x" / "evil1"
    for name in ("config.json", "configuration_evil.py", "modeling_evil.py"):
        shutil.copy(evil / name, checkpoint / "model" / name)
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(QUICKSTART_HELDOUT)], input="y\n")
    assert result.exit_code == 2 and ("auto_map" in _one_line(result) or ".py" in _one_line(result))
    assert not marker.exists()
