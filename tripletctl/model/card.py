"""The model card: a Hugging Face README.md in every model folder, saying how the model was made.

A model folder travels alone (`tripletctl export`, `hf upload`), away from run.json and the
curriculum, so it must carry its own story: the base model, the curriculum as run, the data, the
held-out numbers of this very checkpoint, the embedding size and distance, and how to load it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from tripletctl.config.model_folder import hub_id_of
from tripletctl.config.until import EVAL_METRICS

DEFAULT_MAX_SEQ_LENGTH = 128  # tripletctl's own default (data.max_length, eval's encoding length)
CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Provenance:
    """What a saved model folder says about how it was made (card, max length, similarity)."""

    curriculum: dict | None = None  # curriculum_to_dict() of the run (the curriculum as run)
    position: dict | None = None  # phase_index, phase_name, step, global_step of the save
    metrics: dict | None = None  # the held-out eval event measured on these exact weights

    @property
    def max_seq_length(self) -> int:
        data = (self.curriculum or {}).get("data") or {}
        return int(data.get("max_length") or DEFAULT_MAX_SEQ_LENGTH)

    @property
    def distance(self) -> str:
        """The last phase's distance: the geometry the finished model was shaped for."""
        phases = (self.curriculum or {}).get("phases") or []
        train = (self.curriculum or {}).get("train") or {}
        last = phases[-1] if phases and isinstance(phases[-1], dict) else {}
        return last.get("distance") or train.get("distance") or "euclidean"


def is_hub_id(name: Any) -> bool:
    """`org/name` or `name` that is not a path here: the hub rejects a README whose base_model or
    datasets metadata is not a repository id, so local paths stay out of the front matter."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def render_card(meta: dict, provenance: Provenance | None = None) -> str:
    """README.md text: YAML front matter, then what the model is, how it was trained, its numbers."""
    p = provenance or Provenance()
    curriculum = p.curriculum or {}
    model = curriculum.get("model") or {}
    data = curriculum.get("data") or {}
    base = model.get("name")
    pretrained = model.get("init", "pretrained") == "pretrained"
    front: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}
    hub_id = base_hub_id(model)
    if pretrained and hub_id:
        front["base_model"] = hub_id
    front["tags"] = ["sentence-transformers", "sentence-similarity", "feature-extraction", "triplet-loss", "tripletctl"]
    if is_hub_id(data.get("source")):
        front["datasets"] = [data["source"]]
    dim, distance = meta["embedding_dim"], p.distance
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {_title(base)} triplet embeddings",
        "",
        f"A text embedding model trained with tripletctl: triplet loss with online mining inside "
        f"each batch. It maps a text to a **{dim}-dimensional** vector; compare vectors with "
        f"**{distance} distance** (smaller is closer)"
        + (
            ". Vectors are L2-normalised, so cosine similarity ranks neighbours identically."
            if meta["normalize"]
            else "."
        ),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {_base_text(model)} |",
        f"| pooling | {meta['pooling']} |",
        f"| head | {_head_text(meta)} |",
        f"| normalised | {'yes' if meta['normalize'] else 'no'} |",
        f"| embedding size | {dim} |",
        f"| distance | {distance} (sentence-transformers similarity: euclidean) |",
        f"| max sequence length | {p.max_seq_length} tokens |",
        "",
    ]
    lines += _training_section(curriculum, p.position)
    lines += _metrics_section(curriculum, p.metrics)
    lines += _usage_section(meta, p.max_seq_length)
    return "\n".join(lines) + "\n"


def _title(base: Any) -> str:
    return os.path.basename(str(base).rstrip("/")) if base else "tripletctl"


def base_hub_id(model: dict) -> str | None:
    """The base model's hub id: `model.base_model`, else `model.name` when it is one, else the id of
    the hub cache folder it was loaded from; None for any other local folder (never a local path)."""
    given, name = model.get("base_model"), model.get("name")
    if isinstance(given, str) and given:
        return given
    if is_hub_id(name):
        return name
    return hub_id_of(name) if isinstance(name, str) and name else None


def _base_text(model: dict) -> str:
    name = model.get("name")
    if not name:
        return "unknown (saved outside a training run)"
    hub_id = base_hub_id(model)
    shown = f"`{hub_id}`" if hub_id else f"`{_title(name)}` (a local folder)"  # never the local path itself
    if hub_id and hub_id != name:
        shown += f" (from the local folder `{_title(name)}`)"
    if model.get("init") == "config":
        return f"{shown} architecture, weights trained from scratch (random init from its config)"
    return shown


def _head_text(meta: dict) -> str:
    sizes = [meta["hidden_size"], *meta["head"]]
    if len(sizes) == 1:
        return "none"
    return " → ".join(str(s) for s in sizes) + " (Linear layers, GELU between them, the last linear)"


def _describe_source(source: Any) -> str:
    if isinstance(source, dict):
        return ", ".join(f"`{label}`: `{glob}`" for label, glob in source.items())
    return f"`{source}`"


def _training_section(curriculum: dict, position: dict | None) -> list[str]:
    if not curriculum:
        return []
    data = curriculum.get("data") or {}
    phases = curriculum.get("phases") or []
    lines = [
        "## Training",
        "",
        f"Data: {_describe_source(data.get('source'))} (split `{data.get('split', 'train')}`, "
        f"{data.get('layout', 'labelled')} layout, {data.get('samples_per_class', '?')} texts per class "
        f"in every batch, texts cut at {data.get('max_length', DEFAULT_MAX_SEQ_LENGTH)} tokens).",
        "",
        "Curriculum as run:",
        "",
        "| # | phase | mining | batch | margin | steps | distance | lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, phase in enumerate(phases):
        lines.append(
            f"| {i} | {phase.get('name')} | {phase.get('mining')} | {phase.get('batch_size')} | "
            f"{phase.get('margin')} | {phase.get('steps')} | {phase.get('distance')} | {phase.get('lr')} |"
        )
    lines.append("")
    if position and "phase_index" in position and phases:
        index = int(position["phase_index"])
        name = position.get("phase_name") or (phases[index].get("name") if index < len(phases) else "?")
        planned = phases[index].get("steps") if index < len(phases) else "?"
        lines += [
            f"These weights: phase {index} ({name}), step {position.get('step')} of {planned} "
            f"(global step {position.get('global_step')}).",
            "",
        ]
    return lines


def _metrics_section(curriculum: dict, metrics: dict | None) -> list[str]:
    scores = [(k, metrics[k]) for k in EVAL_METRICS if metrics and isinstance(metrics.get(k), (int, float))]
    if not scores:
        return []
    evaluation = curriculum.get("eval") or {}
    where = f" on {_describe_source(evaluation['source'])}" if evaluation.get("source") else ""
    rows = f"{metrics['rows']} rows, " if "rows" in metrics else ""
    lines = [
        "## Held-out metrics",
        "",
        f"Retrieval among held-out texts{where} ({rows}measured on these weights at global step "
        f"{metrics.get('global_step', '?')}; a text's neighbours of the same label count as hits):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in scores]
    return lines + [""]


def _usage_section(meta: dict, max_length: int) -> list[str]:
    pooled = "hidden[:, 0]" if meta["pooling"] == "cls" else "(hidden * mask).sum(1) / mask.sum(1)"
    if meta["head"]:
        last = (
            "# the pooled encoder output; the head (the K_Dense folders) and normalisation are applied "
            "by sentence-transformers"
        )
    elif meta["normalize"]:
        last = "embeddings = torch.nn.functional.normalize(embeddings, dim=-1)"
    else:
        last = "# no head, no normalisation: these are the embeddings"
    return [
        "## Usage",
        "",
        "With [sentence-transformers](https://www.sbert.net) (pooling, head and normalisation included):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")  # or the hub id after `hf upload`',
        'embeddings = model.encode(["first text", "second text"])',
        f"print(embeddings.shape)  # (2, {meta['embedding_dim']})",
        "print(model.similarity(embeddings, embeddings))",
        "```",
        "",
        "With plain transformers (the encoder and the pooling):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'tokenizer, encoder = AutoTokenizer.from_pretrained("path/to/this/folder"), AutoModel.from_pretrained("path/to/this/folder")',
        f'batch = tokenizer(["first text", "second text"], padding=True, truncation=True, max_length={max_length}, return_tensors="pt")',
        'hidden, mask = encoder(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()',
        f"embeddings = {pooled}",
        last,
        "```",
    ]
