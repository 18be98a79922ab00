"""The best model so far: `train.keep_best: METRIC` keeps the held-out winner under OUTPUT/best/.

Each phase keeps only its latest checkpoint, and the latest is not always the best (a late phase
can overfit, or collapse). After every eval the runner offers the model here; when the metric
beats the kept value, OUTPUT/best/ is replaced atomically (the same COMPLETE + swap as
checkpoints, so a crash leaves the old best or the new, never half of one):

    best/
      model/            a complete model folder (loads in tripletctl, transformers, sentence-transformers)
      best.json         {"metric", "value", "phase", "phase_index", "step", "global_step", "metrics"}
      curriculum.yaml   the curriculum as run (so `tripletctl eval OUTPUT/best` uses its max_length)
      COMPLETE

Weights holding NaN or inf never replace it, whatever the metric says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json
from tripletctl.model.card import Provenance
from tripletctl.model.encoder import is_finite, save_model
from tripletctl.outputs.checkpoint_find import usable_dir
from tripletctl.outputs.checkpoint_save import write_complete_dir

BEST_DIR = "best"
BEST_FILE = "best.json"


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def read_best(output_dir: str | Path) -> dict | None:
    """best.json of the kept best model, or None when there is none (or it cannot be read)."""
    found = usable_dir(best_dir(output_dir))
    if found is None:
        return None
    try:
        record = read_json(found / BEST_FILE)
    except (OSError, ValueError, FileRefused):
        return None
    return record if isinstance(record, dict) else None


def improves(value: Any, kept: dict | None) -> bool:
    """Every eval metric (recall@k, MAP@R, R-precision, triplet accuracy) is higher-is-better;
    a non-finite value never wins, and a tie keeps the earlier (cheaper) model."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    previous = (kept or {}).get("value")
    return not isinstance(previous, (int, float)) or value > previous


def offer(
    output_dir: str | Path, metric: str, event: dict, *, model: Any, tokenizer: Any, curriculum: dict
) -> dict | None:
    """Keep `model` as OUTPUT/best when `event[metric]` beats the kept value; return the new
    best.json record, or None when nothing changed (not better, or non-finite weights)."""
    value = event.get(metric)
    if not improves(value, read_best(output_dir)) or not is_finite(model):
        return None
    scores = {k: v for k, v in event.items() if k != "event"}
    record = {
        "metric": metric,
        "value": value,
        "phase": event.get("phase"),
        "phase_index": event.get("phase_index"),
        "step": event.get("step"),
        "global_step": event.get("global_step"),
        "model": f"{BEST_DIR}/model",
        "metrics": scores,
    }
    provenance = Provenance(
        curriculum=curriculum,
        metrics=scores,
        position={k: event.get(k) for k in ("phase_index", "step", "global_step")} | {"phase_name": event.get("phase")},
    )

    def fill(tmp: Path) -> None:
        save_model(model, tokenizer, tmp / "model", provenance)
        (tmp / BEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / "curriculum.yaml").write_text(yaml.safe_dump(curriculum, sort_keys=False), encoding="utf-8")

    write_complete_dir(best_dir(output_dir), fill)
    return record
