"""tripletctl from Python: the functions the commands call, for notebooks and scripts (docs/python.md).

    import tripletctl
    tripletctl.init("corpus.jsonl", "./my-sentence-model", out="corpus.yaml")   # `tripletctl init`
    result = tripletctl.train("corpus.yaml", ["train.seed=1"])                  # `tripletctl train`
    model = tripletctl.load(result.output_dir)                                  # the latest phase's model
    vectors = model.encode(["a text", "another text"])                          # numpy, (2, dim)
    tripletctl.evaluate(result.output_dir)                                      # `tripletctl eval`

Bad input raises a `tripletctl.core.errors.TripletctlError` (a `ConfigError` lists every problem in
`.problems`), never a half-written file. `import tripletctl` stays light: the package's `__getattr__`
imports this module (and torch) only when one of these names is first used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tripletctl.config.blocks import Curriculum, SourceConfig
from tripletctl.core.errors import TripletctlError
from tripletctl.outputs.run_file import read_run

if TYPE_CHECKING:  # light to import: `tripletctl validate` uses load_checked
    import numpy as np
    from rich.console import Console

    from tripletctl.train.starter import InitResult

__all__ = ["Encoder", "TrainResult", "evaluate", "init", "load", "train"]
SOURCE_FIELDS = tuple(f for f in SourceConfig.__dataclass_fields__)


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainResult:
    exit_code: int  # as `tripletctl train` exits: 0 done (or paused by max_steps), 3 collapse, 4 non-finite...
    output_dir: Path
    eval_untrained: dict | None  # the held-out metrics before the first step (run.json)
    eval_final: dict | None  # and after the last phase, when every phase is done
    best: dict | None = None  # train.keep_best: the kept model's record


def curriculum_file(curriculum: str | os.PathLike) -> Path:
    """A curriculum argument: a file, else the built-in curriculum of that name (`tripletctl curricula`)."""
    from tripletctl.config.builtin import names, resolve

    path, builtin = resolve(curriculum)
    text = str(curriculum)
    if not builtin and not path.exists() and "/" not in text and not text.endswith((".yaml", ".yml")):
        raise TripletctlError(
            f"{curriculum}: no such file, and no built-in curriculum of that name (built-in: {', '.join(names())})"
        )
    return path


def load_checked(curriculum: str | os.PathLike, overrides: Sequence[str] = ()) -> Curriculum:
    """`load_curriculum` with the local data read too (columns, usable rows, batch sizes the classes
    fill): what `validate` and `train` check before any model is built."""
    from tripletctl.config.validate import load_curriculum
    from tripletctl.data.header import FactsReader

    return load_curriculum(curriculum_file(curriculum), list(overrides), read_data=FactsReader())


def train(
    curriculum: str | os.PathLike | Curriculum,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    max_steps: int | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Run a curriculum (a file, a built-in name, or a loaded `Curriculum`) with `key=value` overrides,
    as `tripletctl train` does, printing to `console` (default: stdout)."""
    from rich.console import Console

    from tripletctl.train.run import train as run_training

    plan = curriculum if isinstance(curriculum, Curriculum) else load_checked(curriculum, overrides)
    command = [str(plan.path), *overrides]
    code = run_training(plan, resume=resume, console=console or Console(), max_steps=max_steps, command=command)
    record = read_run(plan.train.output_dir) or {}
    return TrainResult(
        code, Path(plan.train.output_dir), record.get("eval_untrained"), record.get("eval_final"), record.get("best")
    )


# ----------------------------------------------------------------------------- load and evaluate


@dataclass
class Encoder:
    """A trained (or any sentence-transformers) model with its tokenizer, ready to embed texts."""

    model: Any  # tripletctl.model.encoder.TripletEncoder
    tokenizer: Any
    max_length: int  # tokens per text: what the model was trained with (the folder's max_seq_length)
    device: str
    folder: Path

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, unit length when the model normalises, in input order."""
        from tripletctl.model.encoder import encode

        return encode(self.model, self.tokenizer, list(texts), batch_size, self.max_length, self.device).numpy()


def load(path: str | os.PathLike, *, best: bool = False, device: str = "auto") -> Encoder:
    """A model: a run directory (its latest phase; `best=True`: train.keep_best's model), a phase or
    checkpoint directory, a model folder (tripletctl's export, any sentence-transformers folder) or a
    hub name."""
    from tripletctl.commands.loading import resolve_device
    from tripletctl.evaluation.retrieval import DEFAULT_MAX_LENGTH
    from tripletctl.model.encoder import load_any_model, model_folder
    from tripletctl.outputs.export import find_model_dir

    folder = None if best else model_folder(path)
    folder = folder or find_model_dir(path, best)
    device = resolve_device(device)
    model, tokenizer, length = load_any_model(folder, device)
    length = length or min(int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)), 512)  # as ST does
    return Encoder(model, tokenizer, length, device, folder)


def _given(data: str | None, source: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(source) - set(SOURCE_FIELDS))
    if unknown:
        raise TypeError(f"unknown source option(s) {', '.join(unknown)}; expected some of {', '.join(SOURCE_FIELDS)}")
    given = {name: source.get(name) for name in SOURCE_FIELDS}
    given["source"] = data
    if isinstance(given.get("load_dataset"), dict):  # the command line's KEY=VALUE form
        given["load_dataset"] = [f"{key}={value}" for key, value in given["load_dataset"].items()]
    return given


def evaluate(
    model: str | os.PathLike | Encoder,
    data: str | None = None,
    *,
    max_rows: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    **source: Any,
) -> dict[str, Any]:
    """Held-out retrieval metrics (recall@k, MAP@R, R-precision, triplet accuracy), as `tripletctl eval`:
    `model` a path or name (`load` accepts the same) or an `Encoder`; `data` a source (default: the
    run's eval block); `source` the other source keys (split, layout, text_column, label_column, ...)."""
    from tripletctl.commands.loading import held_out_source, load_checkpoint_and_rows
    from tripletctl.data.sources import read_rows
    from tripletctl.evaluation.retrieval import evaluate_model

    names = {name: name for name in SOURCE_FIELDS}
    if isinstance(model, Encoder):
        if data is None:
            raise TripletctlError("evaluate(Encoder, data=...): a loaded model holds no held-out data")
        from tripletctl.config.block_checks import source_from_options

        config = source_from_options(_given(data, source), names)
        rows = read_rows(config, limit=max_rows or 10000)
        return evaluate_model(model.model, model.tokenizer, rows, batch_size, model.max_length, model.device)
    config, limit = held_out_source(model, _given(data, source), names, max_rows, default_max_rows=10000)
    loaded = load_checkpoint_and_rows(model, config, limit, device)
    return evaluate_model(
        loaded.model, loaded.tokenizer, loaded.rows, batch_size, loaded.max_length, loaded.device, f"{model}"
    )


# ----------------------------------------------------------------------------- init


def init(
    data: str,
    model: str,
    *,
    out: str | os.PathLike = "curriculum.yaml",
    budget: int | None = None,
    device: str | None = None,
    heldout: str | None = None,
    hold_out: bool | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
    force: bool = False,
    command: str | None = None,
    **source: Any,
) -> InitResult:
    """`tripletctl init`: read a sample of `data`, look at `model`, and write a curriculum sized to
    both (docs/init.md), plus its train and held-out files beside it; `tripletctl train OUT` is the
    next step, with no edit. `device` "cpu" or "cuda" (default: CUDA when available); `budget` in
    samples (texts embedded in training batches); `heldout` a held-out source to use instead of
    holding out part of `data`; `hold_out` True / False to hold part of `data` out or not (default:
    only past 4 passes, docs/init.md); `source` the other source keys (text_column, label_column...)."""
    from tripletctl.config.block_checks import source_from_options
    from tripletctl.train.starter import write_starter

    names = {name: name for name in SOURCE_FIELDS}
    config = source_from_options(_given(data, source), names)
    given = {name for name, value in source.items() if value not in (None, [], ())}
    held = source_from_options(_given(heldout, {**source, "split": None}), names) if heldout else None
    return write_starter(
        config,
        given,
        model,
        out=Path(out),
        budget=budget,
        device=device,
        heldout=held,
        hold_out_block=hold_out,
        sample_rows=sample_rows,
        seed=seed,
        force=force,
        command=command or f"tripletctl.init({data!r}, {model!r})",
    )
