"""`tripletctl export`: the model folder of a checkpoint, alone, ready for `hf upload`.

A checkpoint also holds the optimizer, RNG and stream state (several times the model's size, and
nothing a user of the model needs). Export takes a checkpoint, a phase directory, a run directory
(its latest phase) or, with `--best`, the run's kept best model; checks that the model loads; and
writes only the model folder to OUT_DIR, atomically: a temporary sibling renamed into place, so
an interrupted or failed export leaves OUT_DIR as it was. A folder saved in tripletctl's previous
format is re-saved in the current one on the way (sentence-transformers files, model card). An
OUT_DIR inside or around the run (or checkpoint) it reads from is refused, even with --force.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tripletctl.config.yaml_io import read_yaml_file, safe_yaml_load
from tripletctl.core.errors import CheckpointError, TripletctlError, one_line
from tripletctl.core.faults import fault_point
from tripletctl.core.files import FileRefused
from tripletctl.core.folders import FolderRefused, check_model_folder, refuse_escapes
from tripletctl.core.jsonio import read_json
from tripletctl.model.card import Provenance
from tripletctl.model.encoder import META_FILE, MODEL_FORMAT_VERSION, load_model, read_meta, save_model
from tripletctl.model.sbert import check_modules
from tripletctl.outputs.best import BEST_DIR, BEST_FILE, best_dir
from tripletctl.outputs.checkpoint_find import PHASE_DIR_RE, resolve_checkpoint, usable_dir
from tripletctl.outputs.checkpoint_save import POSITION_KEYS


class ExportError(TripletctlError):
    """An export destination that cannot be written (not empty, overlaps the source, not writable)."""


@dataclass(frozen=True)
class Exported:
    source: Path  # the model folder that was read
    out_dir: Path
    files: int
    bytes: int
    upgraded: bool  # re-saved from the previous format


def find_model_dir(source: str | Path, best: bool = False) -> Path:
    """The model folder behind a checkpoint / phase / run directory (or the run's best model)."""
    source = Path(source)
    if best:
        kept = source if (source / BEST_FILE).exists() else best_dir(source)
        found = usable_dir(kept)
        if found is None:
            raise CheckpointError(
                f"{source} has no complete best model ({kept} is missing or incomplete; train.keep_best turns it on)"
            )
        return found / "model"
    if (source / META_FILE).is_file():  # a model folder itself
        return source
    if (source / BEST_FILE).exists():  # OUTPUT/best given without --best
        found = usable_dir(source)
        if found is None:
            raise CheckpointError(f"{source} is not a complete best-model directory")
        return found / "model"
    return resolve_checkpoint(source) / "model"


def export_model(source: str | Path, out_dir: str | Path, *, best: bool = False, force: bool = False) -> Exported:
    """Copy the model folder of `source` to `out_dir` (see the module docstring)."""
    model_dir = find_model_dir(source, best)
    out = Path(out_dir)
    _check_destination(Path(source), model_dir, out, force)
    _check_contents(model_dir)
    upgrade = _check_model(model_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if upgrade:
            model, tokenizer = load_model(model_dir)
            save_model(model, tokenizer, tmp, _provenance_near(model_dir))
        else:
            shutil.copytree(model_dir, tmp, copy_function=_copier(model_dir))
        _swap(tmp, out, force)
    except shutil.Error as e:  # copytree's list of (source, destination, reason): one reason is enough
        shutil.rmtree(tmp, ignore_errors=True)
        reasons = [str(entry[2]) for entry in e.args[0] if isinstance(entry, tuple) and len(entry) == 3]
        code = re.search(r"\[Errno (\d+)\]", reasons[0] if reasons else "")
        why = os.strerror(int(code.group(1))) if code else one_line(reasons[0] if reasons else e, 200)
        raise ExportError(f"cannot write {out}: {why}") from None
    except OSError as e:  # disk full, read-only directory, ...: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write {out}: {os.strerror(e.errno) if e.errno else one_line(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [f for f in out.rglob("*") if f.is_file()]
    return Exported(model_dir, out, len(files), sum(f.stat().st_size for f in files), upgrade)


def source_run(model_dir: Path) -> Path:
    """The outermost directory that export reads from and that must survive it: the run holding
    the model folder (OUTPUT for OUTPUT/phase-K-NAME/checkpoint/model or OUTPUT/best/model), else its
    checkpoint or best directory, else the model folder itself. Symlinks resolved."""
    folder = model_dir.resolve()
    holder = folder.parent  # checkpoint/, checkpoint.prev/, best/, best.prev/ (or anything else)
    if folder.name != "model" or not (holder / "COMPLETE").is_file():
        return folder
    if PHASE_DIR_RE.match(holder.parent.name):
        return holder.parent.parent
    if holder.name.split(".")[0] == BEST_DIR:
        return holder.parent
    return holder


def _check_destination(given: Path, model_dir: Path, out: Path, force: bool) -> None:
    """OUT_DIR may neither lie inside nor contain what it is exported from (even with --force: the
    swap would delete the source, or copy a folder into itself), nor be a file or, without --force,
    a non-empty directory."""
    target = out.resolve()
    for source in dict.fromkeys((source_run(model_dir), given.resolve(), model_dir.resolve())):
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            where = "is" if target == source else "contains" if source.is_relative_to(target) else "is inside"
            raise ExportError(
                f"OUT_DIR {out} overlaps the source: it {where} {source}, which export reads from "
                f"(the model folder {model_dir}); refused even with --force, choose an OUT_DIR outside it"
            )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty: pass --force to replace its contents")


def _check_contents(model_dir: Path) -> None:
    """Nothing the export reads may lead out of what it reads from, nor hold code: the model folder
    (a symlink to /etc/passwd would be copied as its content), and the checkpoint around it, whose
    curriculum and state make the model card."""
    check_model_folder(model_dir)
    if (model_dir.parent / "COMPLETE").is_file():
        refuse_escapes(model_dir.parent, "the checkpoint")


def _copier(model_dir: Path):
    """shutil.copy2 for files whose real path lies inside `model_dir` (checked again as each is
    copied: a symlink swapped in after the check is refused, never followed out)."""
    top = model_dir.resolve()

    def copy(source: str, destination: str) -> str:
        real = Path(source).resolve()
        if top not in real.parents:
            raise FolderRefused(f"{source} is a symlink to {real}, outside the model folder {model_dir}: refused")
        return shutil.copy2(real, destination)

    return copy


def _check_model(model_dir: Path) -> bool:
    """Load the folder once (a damaged file fails here, before anything is written); return True
    when it is in the previous format and must be re-saved."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is missing: the checkpoint has no model folder")
    try:
        meta = read_meta(model_dir)
        upgrade = int(meta.get("format_version", 1)) < MODEL_FORMAT_VERSION
        if not upgrade:
            check_modules(model_dir)
        load_model(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load is "damaged", reported in one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"the model in {model_dir} is damaged or incomplete: {reason}") from None
    return upgrade


def _provenance_near(model_dir: Path) -> Provenance:
    """The curriculum, position and metrics a checkpoint (or best/) keeps beside its model folder."""
    parent = model_dir.parent
    curriculum = position = metrics = None
    try:
        curriculum = safe_yaml_load(read_yaml_file(parent / "curriculum.yaml")) or None
    except (OSError, ValueError, yaml.YAMLError, FileRefused):
        pass
    for name in ("state.json", BEST_FILE):
        try:
            record = read_json(parent / name)
        except (OSError, ValueError, FileRefused):
            continue
        if not isinstance(record, dict):
            continue
        position = {k: record[k] for k in POSITION_KEYS if k in record}
        history = record.get("eval_history") or []
        if history and history[-1].get("global_step") == record.get("global_step"):
            metrics = history[-1]
        metrics = record.get("metrics", metrics)
    return Provenance(
        curriculum=curriculum if isinstance(curriculum, dict) else None, position=position, metrics=metrics
    )


def _swap(tmp: Path, out: Path, force: bool) -> None:
    """tmp -> out. Without --force, one rename that fails when OUT_DIR has meanwhile become a
    non-empty directory (rename(2) replaces only an empty one), so of two exports to one OUT_DIR at
    once exactly one succeeds. With --force a replaced OUT_DIR is renamed aside first and removed only
    once out is in place."""
    fault_point("export-swap")
    if not force:
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(
                f"{out} was filled while this export was writing (another export or process?): nothing "
                "replaced; pass --force to replace its contents"
            ) from None
        return
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except OSError:
        if aside is not None:
            os.replace(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
