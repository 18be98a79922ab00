"""core/errors.py `environment_fault` and the CLI's one boundary (cli.main): the machine's faults (out
of memory on the host or the device, too many open files, a file name too long, a full disk, stdout
included) are one line and exit 2 with what to change, through the real CLI in a subprocess; any
other exception keeps its traceback. Reference: docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICKSTART_HELDOUT, REPO, TINY_BERT, one_phase, write_curriculum

from tripletctl.config.blocks import ModelConfig
from tripletctl.core.errors import OutputError, TripletctlError, environment_fault


def test_environment_faults_are_one_line_with_what_to_change():
    cases = {
        MemoryError(): "out of memory on the host",
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"): "out of memory",
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"): "out of memory",
        OSError(errno.EMFILE, "Too many open files"): "ulimit -n",
        OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300): "at most 255 bytes",
        OSError(errno.ENOSPC, "No space left on device", "/full/f.json"): "cannot write /full/f.json",
        ImportError("_core.so: failed to map segment from shared object"): "raise `ulimit -v`",
    }
    for error, words in cases.items():
        fault = environment_fault(error)
        assert isinstance(fault, TripletctlError) and fault.exit_code == 2 and words in str(fault), (error, fault)
        assert "\n" not in str(fault)
    assert "batch" in str(environment_fault(MemoryError()))
    assert isinstance(environment_fault(OSError(errno.ENOSPC, "x", "f")), OutputError)


def test_a_wrapped_fault_is_found_and_a_bug_is_left_alone():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/full/x")
        except OSError as inner:
            raise RuntimeError("the library's own words") from inner
    except RuntimeError as outer:
        assert "cannot write /full/x" in str(environment_fault(outer))
    assert environment_fault(KeyError("bug")) is None
    assert environment_fault(ValueError("bug")) is None
    assert environment_fault(OSError(errno.ENOENT, "No such file", "x")) is None


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from tripletctl.model.encoder import build_model, save_model

    folder = tmp_path_factory.mktemp("model") / "model0"
    model, tokenizer = build_model(ModelConfig(name=str(TINY_BERT), init="config", head=()), seed=0)
    save_model(model, tokenizer, folder)
    return folder


def cli(*args, env: dict | None = None, stdout=subprocess.PIPE, limits=None, cwd=None) -> tuple[int, str]:
    """The real CLI in a subprocess: (exit code, stderr)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "tripletctl", *map(str, args)],
        env=environment,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        preexec_fn=limits,
        cwd=cwd,
    )
    return done.returncode, done.stderr


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("json_flag", [True, False])
def test_eval_to_a_full_disk_stdout_is_one_line(model_folder, json_flag):
    """`eval --json > full/disk/eval.json`: /dev/full refuses every write with ENOSPC."""
    args = ["eval", model_folder, "--data", QUICKSTART_HELDOUT, "--max-rows", "200"] + (["--json"] if json_flag else [])
    with open("/dev/full", "w") as full:
        line = one_line(*cli(*args, stdout=full))
    assert "cannot write standard output: No space left on device" in line


@pytest.mark.slow
def test_too_many_open_files_says_to_raise_ulimit(tmp_path):
    """`ulimit -n 12`: the tokenizer worker's pipes cannot be made."""
    path = one_phase(write_curriculum(tmp_path, steps=(2, 1, 1), tokenizer_workers=1))

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))

    line = one_line(*cli("train", path, limits=limits))
    assert "too many open files (the limit is 12" in line and "ulimit -n" in line


@pytest.mark.slow
@pytest.mark.parametrize("fault, words", [("MemoryError", "out of memory on the host"), ("DeviceOOM", "out of memory")])
def test_out_of_memory_in_a_training_step_is_one_line_with_what_to_change(tmp_path, fault, words):
    path = one_phase(write_curriculum(tmp_path, steps=(3, 1, 1)))
    line = one_line(*cli("train", path, env={"TRIPLETCTL_FAULT": f"step:1:{fault}"}))
    assert words in line and "batch_size" in line and "train.chunk_size" in line
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "failed" in json.dumps(record) and "injected by TRIPLETCTL_FAULT" in record["error"]


@pytest.mark.slow
def test_a_path_component_too_long_is_one_line(model_folder, tmp_path):
    long = "x" * 300
    line = one_line(*cli("eval", tmp_path / long, "--data", QUICKSTART_HELDOUT))
    assert "a file name is too long" in line and "255 bytes" in line
    path = write_curriculum(tmp_path)
    line = one_line(*cli("train", path, f"train.output_dir={tmp_path / long}"))
    assert "train.output_dir" in line and "at most 255 bytes" in line
