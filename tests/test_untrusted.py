"""Untrusted input end to end, through the real CLI: crafted pickles in every file a checkpoint holds
run nothing, damaged files and bad arguments are one line and exit 2, a diverging run stops with
exit 4 and keeps its last good checkpoint, a NaN or one-point model never scores well.
Reference: docs/reliability.md (one row per case)."""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICKSTART_HELDOUT, one_phase, write_curriculum
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.yaml_io import MAX_YAML_BYTES
from tripletctl.core.files import MAX_LINE_BYTES

PHASE = "phase-0-semi-hard"


class PlantMarker:
    """A pickle that, if anything ever unpickles it with code execution, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-step one-phase run, checkpointed after each step (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("trained")
    path = one_phase(write_curriculum(root, steps=(3, 1, 1), checkpoint_every=1))
    assert cli("train", path, "--max-steps", "2").exit_code == 0
    return root


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run; returns the directory holding curriculum.yaml and run/."""
    target = tmp_path / "copy"
    shutil.copytree(trained_run, target)
    spec = yaml.safe_load((target / "curriculum.yaml").read_text())
    spec["train"]["output_dir"] = str(target / "run")
    (target / "curriculum.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


def checkpoint_of(root: Path) -> Path:
    return root / "run" / PHASE / "checkpoint"


def head_files(model_dir: Path) -> list[Path]:
    """The head's weights: one sentence-transformers Dense module per layer, in order."""
    files = sorted(model_dir.glob("*_Dense/model.safetensors"))
    assert files, f"no Dense modules in {model_dir}"
    return files


# ------------------------------------------------------------------------------- crafted pickles


@pytest.mark.parametrize(
    "plant",
    [
        "rng.pt",
        "optimizer.pt",
        "stream.pt",
        "memory.pt",
        "centroids.pt",
        "mined.pt",
        "stream_file absolute",
        "stream_file ..",
        "model pickle",
    ],
)
def test_crafted_pickles_in_a_checkpoint_execute_nothing(run_copy, tmp_path, plant):
    marker = tmp_path / "PWNED"
    checkpoint = checkpoint_of(run_copy)
    state_path = checkpoint / "state.json"
    state = json.loads(state_path.read_text())
    evil = PlantMarker(marker)
    if plant in ("rng.pt", "optimizer.pt", "stream.pt", "memory.pt", "centroids.pt", "mined.pt"):
        torch.save(evil, checkpoint / plant)
        if plant == "stream.pt":
            state["stream_file"] = "stream.pt"
    elif plant == "stream_file absolute":
        torch.save(evil, tmp_path / "evil.pt")
        state["stream_file"] = str(tmp_path / "evil.pt")
    elif plant == "stream_file ..":
        torch.save(evil, checkpoint.parent / "evil.pt")
        state["stream_file"] = "../evil.pt"
    else:  # weights as a pickle instead of safetensors: transformers would torch.load it
        (checkpoint / "model" / "model.safetensors").unlink()
        torch.save(evil, checkpoint / "model" / "pytorch_model.bin")
    state_path.write_text(json.dumps(state))

    resumed = cli("train", run_copy / "curriculum.yaml", "--resume")
    assert resumed.exit_code == 2, resumed.output
    message = one_error_line(resumed)
    assert not marker.exists(), "a pickle in the checkpoint ran code"
    if plant.startswith("stream_file"):
        assert "stream_file must name a file inside the checkpoint" in message
    if plant.endswith(".pt"):
        assert f"{plant} holds objects that could run code" in message
    if plant == "model pickle":
        evaluated = cli("eval", run_copy / "run", "--data", QUICKSTART_HELDOUT)
        assert evaluated.exit_code == 2 and not marker.exists(), evaluated.output


def test_a_symlink_out_of_the_checkpoint_is_refused(run_copy, tmp_path):
    checkpoint = checkpoint_of(run_copy)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(checkpoint / "model" / "model.safetensors", outside)
    (checkpoint / "model" / "model.safetensors").symlink_to(outside)
    for args in (
        ("train", run_copy / "curriculum.yaml", "--resume"),
        ("eval", run_copy / "run", "--data", QUICKSTART_HELDOUT),
    ):
        result = cli(*args)
        assert result.exit_code == 2 and "outside the checkpoint" in one_error_line(result)


def test_a_checkpoint_curriculum_linked_from_outside_is_never_read(run_copy, tmp_path):
    """`eval RUN` without --data takes the eval block from the checkpoint's curriculum.yaml: one that
    leads outside the checkpoint is refused before it is read (here: a curriculum without an eval block,
    which used to be read and answered with "has no eval block")."""
    checkpoint = checkpoint_of(run_copy)
    outside = tmp_path / "outside.yaml"
    spec = yaml.safe_load((checkpoint / "curriculum.yaml").read_text())
    spec.pop("eval", None)
    outside.write_text(yaml.safe_dump(spec))
    (checkpoint / "curriculum.yaml").unlink()
    (checkpoint / "curriculum.yaml").symlink_to(outside)
    for command in ("eval", "inspect-collapse"):
        result = cli(command, run_copy / "run")
        assert result.exit_code == 2 and "curriculum.yaml is a symlink to" in one_error_line(result), result.output


def test_an_old_unsafe_stream_pickle_is_refused_in_one_line(run_copy):
    checkpoint = checkpoint_of(run_copy)
    import fractions

    # what an older tripletctl could write: a pickle of a class weights_only cannot rebuild
    torch.save({"buffer": fractions.Fraction(1, 3)}, checkpoint / "stream.pt")
    state = json.loads((checkpoint / "state.json").read_text())
    state["stream_file"] = "stream.pt"
    (checkpoint / "state.json").write_text(json.dumps(state))
    result = cli("train", run_copy / "curriculum.yaml", "--resume")
    assert result.exit_code == 2
    assert "could run code when loaded" in one_error_line(result)


# ------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("file", ["memory.pt", "rng.pt", "optimizer.pt", "mined.pt"])
@pytest.mark.parametrize(
    "garbage",
    [
        random.Random(0).randbytes(256),
        b"\x00not a zip\x00" * 20,
        pickle.dumps({"queue": [1.0, 2.0]}),
        b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"xx",  # BINBYTES8: reading it is a MemoryError
    ],
    ids=["random bytes", "zeros", "a plain pickle", "a length of 2^62"],
)
def test_a_garbage_torch_file_is_damaged_not_code(run_copy, file, garbage):
    """Issue 23 #11: bytes that are no pickle at all were reported as "could run code"."""
    (checkpoint_of(run_copy) / file).write_bytes(garbage)
    result = cli("train", run_copy / "curriculum.yaml", "--resume")
    assert result.exit_code == 2, result.output
    message = one_error_line(result)
    assert f"{file} is damaged" in message and "could run code" not in message, message


def test_a_mined_table_that_does_not_fit_together_is_damaged(run_copy):
    """A loadable mined.pt (tensors only) whose tensors are missing or disagree: one line, exit 2."""
    torch.save(
        {"class_ids": torch.tensor([1, 2]), "negatives": torch.tensor([[5]])}, checkpoint_of(run_copy) / "mined.pt"
    )
    result = cli("train", run_copy / "curriculum.yaml", "--resume")
    assert result.exit_code == 2, result.output
    assert "mined.pt: missing reserve, row_tokens" in one_error_line(result)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        "truncated model",
        "truncated head",
        "garbage rng",
        "mistyped rng",
        "garbage optimizer",
        "mistyped optimizer",
        "garbage state",
        "list state",
        "string step",
        "shape mismatch",
    ],
)
def test_damaged_checkpoint_files_are_one_line_and_exit_2(run_copy, damage):
    checkpoint = checkpoint_of(run_copy)
    model_dir = checkpoint / "model"
    if damage == "truncated model":
        _truncate(model_dir / "model.safetensors")
    elif damage == "truncated head":
        _truncate(head_files(model_dir)[-1])
    elif damage == "garbage rng":
        (checkpoint / "rng.pt").write_bytes(random.Random(1).randbytes(256))  # seeded: the same bytes every run
    elif damage == "mistyped rng":
        torch.save([1, 2, 3], checkpoint / "rng.pt")
    elif damage == "garbage optimizer":
        (checkpoint / "optimizer.pt").write_bytes(b"\x00not a zip\x00" * 20)
    elif damage == "mistyped optimizer":
        torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}, checkpoint / "optimizer.pt")
    elif damage == "garbage state":
        (checkpoint / "state.json").write_bytes(b"{\xff\xfe")
    elif damage == "list state":
        (checkpoint / "state.json").write_text("[1, 2]")
    elif damage == "string step":
        state = json.loads((checkpoint / "state.json").read_text())
        state["step"] = "2"
        (checkpoint / "state.json").write_text(json.dumps(state))
    else:  # the weights no longer fit the architecture config.json describes
        config = json.loads((model_dir / "config.json").read_text())
        config["intermediate_size"] *= 2
        (model_dir / "config.json").write_text(json.dumps(config))
    result = cli("train", run_copy / "curriculum.yaml", "--resume")
    assert result.exit_code == 2, result.output
    one_error_line(result)
    if damage in ("truncated model", "truncated head", "shape mismatch"):
        for command in ("eval", "inspect-collapse"):
            other = cli(command, run_copy / "run", "--data", QUICKSTART_HELDOUT)
            assert other.exit_code == 2, other.output
            assert "cannot load the model" in one_error_line(other)


# ------------------------------------------------------------------------------- divergence


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(checkpoint / "model" / "model.safetensors"))
    for i, file in enumerate(head_files(checkpoint / "model")):
        weights.update({f"head{i}.{k}": v for k, v in load_file(str(file)).items()})
    return weights


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_diverging_run_stops_with_exit_4_and_keeps_the_last_good_checkpoint(tmp_path, mode):
    # lr = 1e6: the first step blows the weights up (still finite), the second loss is NaN; with
    # divergence detection off, only the NaN is caught (see the test below for the default)
    overrides = [
        "train.divergence_factor=null",
        "train.lr=1e6",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        f"train.on_nonfinite={mode}",
        "train.max_nonfinite_skips=3",
    ]
    path = one_phase(write_curriculum(tmp_path / "nan", steps=(6, 1, 1), checkpoint_every=1))
    reference = one_phase(write_curriculum(tmp_path / "ref", steps=(6, 1, 1), checkpoint_every=1))
    assert cli("train", reference, *overrides, "--max-steps", "1").exit_code == 0

    result = cli("train", path, *overrides)
    assert result.exit_code == 4, result.output
    text = " ".join(result.output.split())
    assert "non-finite loss or gradient at step 2 of phase 0 (semi-hard)" in text
    run = tmp_path / "nan" / "run"
    checkpoint = run / PHASE / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 1
    good, expected = _weights(checkpoint), _weights(checkpoint_of(tmp_path / "ref"))
    assert all(torch.isfinite(w).all() for w in good.values())
    assert good.keys() == expected.keys() and all(torch.equal(good[k], expected[k]) for k in good)

    index = _strict((run / "run.json").read_text())
    assert index["phases"][0]["status"] == "stopped (non-finite)"
    summary = _strict((run / PHASE / "summary.json").read_text())
    records = [_strict(line) for line in (run / PHASE / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "nonfinite"]
    assert [e["action"] for e in events] == (["stop"] if mode == "stop" else ["skip", "skip", "stop"])
    assert summary["nonfinite_steps"] == len(events) and summary["steps_done"] == 1
    assert all(e["loss"] is None for e in events)


@pytest.mark.slow
def test_a_finite_divergence_is_never_checkpointed_and_resume_with_a_sane_lr_continues(tmp_path):
    """Issue 23 #10: at lr=1e6 the step before the NaN was checkpointed with weights ~1e8, so the advice
    (lower the lr, --resume) failed with exit 4 every time. Now the exploded step is never saved."""
    path = one_phase(write_curriculum(tmp_path, steps=(6, 1, 1), checkpoint_every=1))
    assert cli("train", path, "--max-steps", "2").exit_code == 0
    checkpoint = tmp_path / "run" / PHASE / "checkpoint"
    before = _weights(checkpoint)

    diverged = cli("train", path, "train.lr=1e6", "train.warmup_steps=0", "train.grad_clip=0", "--resume")
    assert diverged.exit_code == 4, diverged.output
    text = " ".join(diverged.output.split())
    assert "diverging weights after step 3 of phase 0 (semi-hard) (weight norm" in text, text
    assert "train.divergence_factor (100)" in text and "the last good checkpoint is kept" in text
    assert "Traceback" not in text and text.count("--resume") == 1
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    kept = _weights(checkpoint)
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in kept)
    assert _strict((tmp_path / "run" / "run.json").read_text())["phases"][0]["status"] == "stopped (diverged)"
    records = [_strict(line) for line in (tmp_path / "run" / PHASE / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "divergence"] == [3]

    resumed = cli("train", path, "--resume")  # the curriculum's own lr (1e-3)
    assert resumed.exit_code == 0, resumed.output
    final = _weights(checkpoint)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in final.values())


def _nan_checkpoint(run_copy: Path) -> None:
    head = head_files(checkpoint_of(run_copy) / "model")[-1]
    weights = load_file(str(head))
    weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    save_file(weights, str(head))


@pytest.mark.slow
def test_eval_and_inspect_refuse_a_nan_model(run_copy, tmp_path):
    _nan_checkpoint(run_copy)
    for command in ("eval", "inspect-collapse"):
        result = cli(command, run_copy / "run", "--data", QUICKSTART_HELDOUT, "--max-rows", "200")
        assert result.exit_code == 2, result.output
        message = one_error_line(result)
        assert "non-finite embeddings" in message and "LinAlgError" not in message


@pytest.mark.slow
def test_a_one_point_model_scores_zero(run_copy):
    head = head_files(checkpoint_of(run_copy) / "model")[-1]
    weights = load_file(str(head))
    last_weight = max(k for k in weights if k.endswith("weight"))
    weights[last_weight] = torch.zeros_like(weights[last_weight])
    weights[last_weight.replace("weight", "bias")] = torch.full_like(
        weights[last_weight.replace("weight", "bias")], 0.5
    )
    save_file(weights, str(head))
    result = cli("eval", run_copy / "run", "--data", QUICKSTART_HELDOUT, "--max-rows", "200", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{\n") :])  # after transformers' progress bars
    assert metrics["recall@1"] == metrics["recall@10"] == metrics["triplet_accuracy"] == 0.0


# ------------------------------------------------------------------------------- bad arguments


def test_missing_local_model_and_unreachable_hub_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub call fails at once instead of timing out
    for name, init in ((str(tmp_path / "no-such-model"), "config"), ("tripletctl-test/no-such-model", "pretrained")):
        path = write_curriculum(tmp_path / init)
        spec = yaml.safe_load(path.read_text())
        spec["model"].update(name=name, init=init)
        path.write_text(yaml.safe_dump(spec))
        result = cli("train", path)
        assert result.exit_code == 2, result.output
        assert f"cannot load model '{name}'" in one_error_line(result)


def test_eval_batch_size_zero(run_copy):
    result = cli("eval", run_copy / "run", "--data", QUICKSTART_HELDOUT, "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size must be at least 1" in one_error_line(result)


@pytest.mark.parametrize("damage", ["list run.json", "binary metrics"])
def test_plot_of_a_damaged_run_is_one_line(run_copy, damage):
    run = run_copy / "run"
    if damage == "list run.json":
        (run / "run.json").write_text("[1, 2, 3]")
    else:
        (run / PHASE / "metrics.jsonl").write_bytes(os.urandom(512) + b"\xff\xfe")
    result = cli("plot", run)
    assert result.exit_code == 2, result.output
    one_error_line(result)


@pytest.mark.slow
def test_inspect_collapse_plot_says_the_file_it_wrote(run_copy, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for target, written in ((folder, folder / "collapse.png"), (tmp_path / "figure", tmp_path / "figure.png")):
        result = cli(
            "inspect-collapse", run_copy / "run", "--data", QUICKSTART_HELDOUT, "--max-rows", "200", "--plot", target
        )
        assert result.exit_code in (0, 1, 3), result.output
        assert written.is_file() and f"wrote{written}" in "".join(result.output.split())  # rich wraps paths


# ------------------------------------------------------------------------ devices, FIFOs, oversized files


def _capped_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a process capped at 4 GB of address space: a reader that reads a device whole
    dies of MemoryError there instead of taking the machine; one that blocks times out."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tripletctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("validate", "/dev/zero"),
        ("validate", "/dev/urandom"),
        ("validate", "fifo"),
        ("train", "/dev/zero"),
        ("train", "fifo"),
    ],
)
def test_a_device_or_fifo_curriculum_is_refused_by_its_type(tmp_path, command, name):
    if name == "fifo":
        name = str(tmp_path / "curriculum.yaml")
        os.mkfifo(name)
    proc = _capped_cli(command, name)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    kind = "a character device" if name.startswith("/dev/") else "a FIFO (named pipe)"
    assert f"{name} is {kind}, not a regular file: refused" in errors[0], errors[0]


def test_an_oversized_curriculum_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as handle:  # sparse: 16 MiB of nothing after one real key
        handle.write(b"train: {}\n")
        handle.truncate(MAX_YAML_BYTES + 1)
    result = cli("validate", path)
    assert result.exit_code == 2 and f"{path} is larger than 16 MiB: refused" in one_error_line(result)


@pytest.fixture
def deadline():
    """Fail (instead of hanging for ever) when a read blocks, e.g. on a FIFO."""

    def expire(*_):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["state.json", "curriculum.yaml", "rng.pt"])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(run_copy, deadline, name):
    planted = checkpoint_of(run_copy) / name
    planted.unlink()
    os.mkfifo(planted)
    result = cli("train", run_copy / "curriculum.yaml", "--resume")
    line = one_error_line(result)
    assert result.exit_code == 2 and f"{planted} is a FIFO (named pipe), not a regular file: refused" in line, line


@pytest.mark.parametrize("damage", ["fifo run.json", "endless metrics line"])
def test_plot_reads_run_files_bounded(run_copy, deadline, damage):
    run = run_copy / "run"
    if damage == "fifo run.json":
        (run / "run.json").unlink()
        os.mkfifo(run / "run.json")
        expected = f"{run / 'run.json'} is a FIFO"
    else:
        with (run / PHASE / "metrics.jsonl").open("ab") as handle:
            handle.write(b"x" * (MAX_LINE_BYTES + 1))
        expected = f"{run / PHASE / 'metrics.jsonl'}: line"
    result = cli("plot", run)
    assert result.exit_code == 2 and expected in one_error_line(result), result.output
