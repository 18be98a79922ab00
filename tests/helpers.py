"""What several test files share, in one place: test files import from here, never from one another.

Paths of the repository and its tiny BERT; small curricula and the runs they make; the real CLI in a
subprocess; small data files; the brute-force references that the mining, loss and guard tests check
the O(B²) code against (plain Python loops over the definitions, sharing nothing with it but them).
conftest.py keeps pytest's hooks and fixtures only.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from tripletctl.config.blocks import ModelConfig
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError
from tripletctl.model.distances import SQRT_EPS
from tripletctl.model.encoder import build_model
from tripletctl.train.mining import mine

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"
QUICKSTART = REPO / "curricula" / "quickstart.yaml"
QUICKSTART_DATA = REPO / "curricula" / "quickstart" / "train.jsonl"
QUICKSTART_HELDOUT = REPO / "curricula" / "quickstart" / "heldout.jsonl"

FACENET = REPO / "curricula" / "facenet.yaml"


# --------------------------------------------------------------------------------------- curricula


def write_curriculum(
    tmp_path: Path,
    source: Path = QUICKSTART_DATA,
    steps: tuple[int, ...] = (4, 3, 3),
    checkpoint_every: int = 2,
    with_eval: bool = False,
    tokenizer_workers: int = 0,
    **train_extra,
) -> Path:
    """A three-phase curriculum (semi-hard -> hard-negative -> batch-hard, growing batches)."""
    modes = ("semi-hard", "hard-negative", "batch-hard")
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "pooling": "mean", "head": [32]},
        "data": {
            "source": str(source),
            "shuffle_buffer": 256,
            "max_length": 24,
            "samples_per_class": 4,
            "tokenizer_workers": tokenizer_workers,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 2,
            "seed": 7,
            "output_dir": str(tmp_path / "run"),
            "checkpoint_every": checkpoint_every,
            "device": "cpu",
            "chunk_size": 16,
            **train_extra,
        },
        "phases": [
            {"name": mode, "mining": mode, "batch_size": 16 * (2**i), "margin": 0.2, "steps": n}
            for i, (mode, n) in enumerate(zip(modes, steps))
        ],
    }
    if with_eval:
        spec["eval"] = {"source": str(QUICKSTART_HELDOUT), "max_rows": 200}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_phase(path: Path) -> Path:
    """Keep only the curriculum's first phase (16 rows a batch): the cheapest real run."""
    spec = yaml.safe_load(path.read_text())
    spec["phases"] = spec["phases"][:1]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = run_dir / "phase-2-batch-hard" / "checkpoint" / "model"
    weights = load_file(str(model_dir / "model.safetensors"))
    for dense in sorted(model_dir.glob("*_Dense")):  # the head lives in its sentence-transformers Dense modules
        weights.update({f"{dense.name}.{k}": v for k, v in load_file(str(dense / "model.safetensors")).items()})
    assert any(k.endswith("_Dense.linear.weight") for k in weights)
    return weights


MINIMAL = """\
model:
  name: bert-base-uncased
data:
  source: org/corpus
phases:
  - name: warmup
    mining: semi-hard
    batch_size: 16
    steps: 10
  - name: easy
    mining: hard-negative
    batch_size: 32
    steps: 10
  - name: hard
    mining: batch-hard
    batch_size: 64
    steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "curriculum.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(**changes) -> str:
    """MINIMAL with some blocks replaced (dicts) or removed (None)."""
    tree = yaml.safe_load(MINIMAL)
    for key, value in changes.items():
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
    return yaml.safe_dump(tree, sort_keys=False)


def phases_with(**changes) -> list[dict]:
    """MINIMAL's phases with keys of phase 2 ('hard') changed."""
    phases = yaml.safe_load(MINIMAL)["phases"]
    phases[2].update(changes)
    return phases


def problems_of(path: Path | str, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_curriculum(path, overrides)
    return caught.value.problems


def only(problems: list[str], fragment: str) -> str:
    matching = [p for p in problems if fragment in p]
    assert len(matching) == 1, (fragment, problems)
    return matching[0]


# -------------------------------------------------------------------- the real CLI in a subprocess


def start(path: Path, *args: str, env: dict | None = None, group: bool = False) -> subprocess.Popen:
    """`group`: in a process group of its own, which a test signals as a terminal does (`os.killpg`)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tripletctl", "train", str(path), *args],
        cwd=path.parent,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=group,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"train did not end within {timeout}s: {proc.communicate()[0][-3000:]}") from None


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def steps_logged(run: Path, phase: str = "phase-0-semi-hard") -> int:
    metrics = run / phase / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_tidy(run: Path, prev_allowed: bool = False) -> None:
    """No temporary or half-deleted file or directory anywhere in the run directory (a complete
    `checkpoint.prev` is the valid checkpoint after a stop between the two renames of a save)."""
    leftovers = [
        p
        for p in run.rglob("*")
        if ".tmp-" in p.name or ".trash-" in p.name or (p.name == "checkpoint.prev" and not prev_allowed)
    ]
    assert not leftovers, leftovers


# -------------------------------------------------------------------- data files and model folders


NEGATIVES = {"triplets": ("negative",), "triplets3": ("negative_1", "negative_2", "negative_3")}


def text_source(assets_dir) -> dict[str, str]:
    return {f"c{c}": str(assets_dir / "text" / f"c{c}.txt") for c in range(6)}


def triplet_file_rows(path) -> list[tuple[str, ...]]:
    """The file's rows read independently of tripletctl (json / pandas)."""
    import pandas as pd

    name = path.name.split(".")[0]
    if path.suffix == ".jsonl":
        frame = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    else:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return [tuple(r) for r in frame[["anchor", "positive", *NEGATIVES[name]]].itertuples(index=False)]


def save_previous_format(model, tokenizer, directory: Path) -> None:
    """tripletctl's format 1, as it was written before this layout: encoder without pooler,
    head in head.safetensors, no sentence-transformers files."""
    directory.mkdir(parents=True, exist_ok=True)
    encoder_state = {k: v for k, v in model.encoder.state_dict().items() if not k.startswith("pooler.")}
    model.encoder.save_pretrained(directory, state_dict=encoder_state, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if model.head is not None:
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(directory / "head.safetensors"))
    meta = {
        "format_version": 1,
        "pooling": model.pooling,
        "head": list(model.head_sizes),
        "normalize": model.normalize,
        "embedding_dim": model.embedding_dim,
        "hidden_size": model.encoder.config.hidden_size,
    }
    (directory / "tripletctl_model.json").write_text(json.dumps(meta, indent=2) + "\n")


ST_MAX_LENGTH = 16  # the tokens of the sentence-transformers folders `st_folder` writes


def st_folder(tiny_bert_dir: Path, out: Path, pooling: str = "mean", dense=(), normalize: bool = True) -> Path:
    """A folder written by sentence-transformers itself around a random 2-layer BERT."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_models
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    base = out.parent / f"{out.name}-base"
    AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir)).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(base)
    transformer = st_models.Transformer(str(base), max_seq_length=ST_MAX_LENGTH)
    width = transformer.get_embedding_dimension()
    modules = [transformer, st_models.Pooling(width, pooling_mode=pooling)]
    for size, activation in dense:
        modules.append(st_models.Dense(width, size, activation_function=activation))
        width = size
    if normalize:
        modules.append(st_models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


class ListRows:
    """The rows of a list, epoch after epoch: what stream.py's reader gives batching.py."""

    def __init__(self, rows: list[list], position: int = 0):
        self.rows, self.position = rows, position

    @property
    def epoch(self) -> int:
        """The pass of the last row read (as stream.py's reader counts: a pass starts with its first row)."""
        return max(self.position - 1, 0) // len(self.rows)

    def next_row(self) -> list:
        row = list(self.rows[self.position % len(self.rows)])
        self.position += 1
        return row


def labelled(classes: int, per_class: int, seed: int = 0, first: int = 0) -> list[list]:
    """[text, label] rows of classes first.. whose text names its class, in a seeded random order."""
    rows = [[f"c{c} r{r}", c] for c in range(first, first + classes) for r in range(per_class)]
    random.Random(seed).shuffle(rows)
    return rows


# ----------------------------------------------------------------------- brute-force mining and losses

TOL = 1e-6
TRIPLET_MODES = ("semi-hard", "hard-negative", "batch-hard", "batch-all")  # the modes the guard applies to

LABELS = {  # batch structures every mode must handle
    "four-classes": lambda: torch.tensor([i % 4 for i in range(16)]),
    "uneven": lambda: torch.tensor([0] * 7 + [1] * 5 + [2] * 3 + [3] * 2 + [4] * 3),
    "singletons": lambda: torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 7]),
    "two-classes": lambda: torch.tensor([0] * 9 + [1] * 11),
    "all-distinct": lambda: torch.arange(12),
    "one-class": lambda: torch.zeros(12, dtype=torch.long),
}


def text_like_embeddings(b, d=6, seed=0, spread=1.0):
    """Unit rows sharing a common direction: positive cosines, as on trained text embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    x[:, 0] += 1.0 / spread
    return F.normalize(x, dim=1)


def distance_of(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    sq = ((x - y) ** 2).sum()
    return sq if distance == "squared-euclidean" else torch.sqrt(torch.clamp(sq, min=SQRT_EPS))


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x, y) / (x.norm() * y.norm())


def _candidates(e, labels, memory):
    if memory is None:
        return e, [int(v) for v in labels]
    return torch.cat([e, memory[0]]), [int(v) for v in torch.cat([labels, memory[1]])]


def _roles(labels, b, groups):
    """Positives and negatives of each anchor: by label over all candidates, or by `groups` (triplet
    data: one group id per anchor/positive row, None for a given negative, nobody's anchor or positive)."""
    n = len(labels)
    if groups is None:
        pos = {a: [p for p in range(n) if p != a and labels[p] == labels[a]] for a in range(b)}
        neg = {a: [q for q in range(n) if labels[q] != labels[a]] for a in range(b)}
        return pos, neg
    pos = {a: [p for p in range(b) if p != a and groups[a] is not None and groups[p] == groups[a]] for a in range(b)}
    neg = {a: [q for q in range(b) if q != a and (groups[q] is None or groups[q] != groups[a])] for a in range(b)}
    return pos, neg


def reference_triplets(
    e,
    labels,
    mode,
    margin,
    distance="euclidean",
    fallback="hardest",
    negatives=None,
    memory=None,
    groups=None,
    loss="margin",
    guard=None,
):
    """(loss, stats) of `mine` with a triplet loss, from plain loops over the definitions.

    `negatives` ({(a, p): n}) supplies the draws of `random`, which cannot be reproduced independently;
    everything else is decided here. `memory` ((M, D) embeddings, (M,) labels): more candidates,
    numbered B..B+M-1; anchors stay the batch rows, and the batch-hard stat stays in-batch. `groups`:
    see `_roles`. `loss`: margin or soft-margin; `guard` ρ skips n with cos(a,n) > ρ·cos(a,p)."""
    b = len(labels)
    in_batch = None
    if memory is not None:
        in_batch = reference_triplets(e.detach(), labels, "batch-hard", margin, distance)[1]["batch_hard_loss"]
    cand, lab = _candidates(e, labels, memory)
    d = {(a, j): distance_of(cand[a], cand[j], distance) for a in range(b) for j in range(len(lab))}
    f = {k: v.item() for k, v in d.items()}
    pos, neg = _roles(lab, b, groups)
    anchors = [a for a in range(b) if pos[a] and neg[a]]
    zero = (e * 0).sum()

    def kept(a, p):
        if guard is None:
            return neg[a]
        return [n for n in neg[a] if not cosine(cand[a], cand[n]).item() > guard * cosine(cand[a], cand[p]).item()]

    def term(a, p, n):
        x = d[a, p] - d[a, n]
        return torch.relu(x + margin) if loss == "margin" else F.softplus(x)

    # the plain (margin, unguarded) batch-hard loss: every mode's yardstick
    hardest = [(a, max(pos[a], key=lambda q: f[a, q]), min(neg[a], key=lambda q: f[a, q])) for a in anchors]
    yardstick = sum((torch.relu(d[a, p] - d[a, n] + margin) for a, p, n in hardest), zero) / max(len(hardest), 1)

    triplets, skipped = [], 0
    for a in anchors:
        positives = [max(pos[a], key=lambda q: f[a, q])] if mode == "batch-hard" else pos[a]
        for p in positives:
            negs = kept(a, p)
            skipped += len(neg[a]) - len(negs)
            if not negs:
                continue
            if mode == "batch-all":
                triplets += [(a, p, n) for n in negs]
            elif mode == "random":
                triplets.append((a, p, negatives[(a, p)]))
            elif mode == "semi-hard" and not [n for n in negs if f[a, n] > f[a, p]]:
                pick = min if fallback == "hardest" else max
                triplets.append((a, p, pick(negs, key=lambda q: f[a, q])))
            else:
                pool = [n for n in negs if f[a, n] > f[a, p]] if mode == "semi-hard" else negs
                triplets.append((a, p, min(pool, key=lambda q: f[a, q])))
    terms = [term(*t) for t in triplets]
    if mode == "batch-all":
        active = [x for x in terms if x.item() > 0]
        value = sum(active, zero) / max(len(active), 1)
    else:
        value = sum(terms, zero) / max(len(terms), 1)
    misordered = [f[a, p] > f[a, n] for a, p, n in triplets]
    is_active = [x.item() > 0 for x in terms] if loss == "margin" else misordered
    nt = len(triplets)
    stats = {
        "batch_hard_loss": yardstick.item() if in_batch is None else in_batch,
        "active_fraction": sum(is_active) / nt if nt else 0.0,
        "mean_ap": sum(f[a, p] for a, p, _ in triplets) / nt if nt else 0.0,
        "mean_an": sum(f[a, n] for a, _, n in triplets) / nt if nt else 0.0,
        "num_triplets": nt,
        "skipped_anchors": b - len(anchors),
        "memory_rows": len(lab) - b,
        "guard_skipped": skipped if guard is not None else 0,
    }
    return value, stats


def reference_infonce(e, labels, temperature, guard=None, distance="euclidean", memory=None, hardness=0.0):
    """Per anchor, per positive: -log(exp(s_ap/τ) / (exp(s_ap/τ) + Σ_n w_an·exp(s_an/τ))), mean over
    the positives, then over the anchors; the guard drops n with s_an > ρ·s_ap from that denominator.
    The hardness weight w_an = exp(α·s_an) is a constant: computed from a detached copy."""
    b = len(labels)
    cand, lab = _candidates(e, labels, memory)
    zero = (e * 0).sum()
    per_anchor, pairs, misranked, sum_ap, sum_an, skipped = [], 0, 0, 0.0, 0.0, 0
    for a in range(b):
        pos = [j for j in range(len(lab)) if j != a and lab[j] == lab[a]]
        neg = [j for j in range(len(lab)) if lab[j] != lab[a]]
        if not pos or not neg:
            continue
        terms = []
        for p in pos:
            s_ap = cosine(cand[a], cand[p])
            negs = [n for n in neg if guard is None or not cosine(cand[a], cand[n]).item() > guard * s_ap.item()]
            skipped += len(neg) - len(negs)
            if not negs:
                continue
            s_an = [cosine(cand[a], cand[n]) for n in negs]
            numerator = torch.exp(s_ap / temperature)
            weights = [math.exp(hardness * s.item()) for s in s_an]
            denominator = numerator + sum(w * torch.exp(s / temperature) for w, s in zip(weights, s_an))
            terms.append(-torch.log(numerator / denominator))
            hardest = max(range(len(negs)), key=lambda i: s_an[i].item())
            pairs += 1
            misranked += s_an[hardest].item() > s_ap.item()
            sum_ap += distance_of(cand[a], cand[p], distance).item()
            sum_an += distance_of(cand[a], cand[negs[hardest]], distance).item()
        if terms:
            per_anchor.append(sum(terms, zero) / len(terms))
    value = sum(per_anchor, zero) / max(len(per_anchor), 1)
    stats = {
        "active_fraction": misranked / pairs if pairs else 0.0,
        "mean_ap": sum_ap / pairs if pairs else 0.0,
        "mean_an": sum_an / pairs if pairs else 0.0,
        "num_triplets": pairs,
        "guard_skipped": skipped if guard is not None else 0,
    }
    return value, stats


def check_against_reference(e, labels, mode, loss, memory=None, **kwargs):
    """`mine` against the reference: loss, gradients (torch.autograd on both) and stats."""
    leaf, leaf_ref = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    mem = {} if memory is None else {"memory_embeddings": memory[0], "memory_labels": memory[1]}
    value, stats = mine(leaf, labels, mode, 0.2, loss=loss, **kwargs, **mem)
    if loss == "infonce":
        options = {k: v for k, v in kwargs.items() if k in ("temperature", "guard", "distance", "hardness")}
        ref, ref_stats = reference_infonce(leaf_ref, labels, options.pop("temperature", 0.05), memory=memory, **options)
    else:
        ref, ref_stats = reference_triplets(leaf_ref, labels, mode, 0.2, loss=loss, memory=memory, **kwargs)
    assert value.item() == pytest.approx(ref.item(), abs=TOL, rel=TOL)
    (grad,) = torch.autograd.grad(value, leaf)
    (grad_ref,) = torch.autograd.grad(ref, leaf_ref, allow_unused=True)
    torch.testing.assert_close(grad, torch.zeros_like(e) if grad_ref is None else grad_ref, atol=TOL, rtol=TOL)
    for key, expected in ref_stats.items():
        assert getattr(stats, key) == pytest.approx(expected, abs=TOL), key
    plain = mine(e, labels, "batch-hard", 0.2, distance=kwargs.get("distance", "euclidean"), **mem)[1]
    assert stats.batch_hard_loss == pytest.approx(plain.batch_hard_loss, abs=1e-12)  # the yardstick stays
    return value, stats


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), func
        return out


# ------------------------------------------------------------------------------------ checkpoints

CHECKPOINT_STATE = {
    "phase_index": 0,
    "phase": "semi-hard",
    "step": 3,
    "global_step": 3,
    "counters": {"rows_seen": 96},
    "world_size": 1,
}


def tiny_model(tiny_bert_dir: Path, seed: int = 0, head: tuple[int, ...] = (16,)):
    """The 2-layer BERT with a head, built from its config (no weights): (model, tokenizer)."""
    return build_model(ModelConfig(name=str(tiny_bert_dir), init="config", head=head), seed)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def fake_checkpoint(directory: Path, complete: bool = True) -> Path:
    """Enough of a checkpoint for path resolution (which only trusts COMPLETE)."""
    directory.mkdir(parents=True)
    (directory / "state.json").write_text("{}")
    if complete:
        (directory / "COMPLETE").write_text("ok\n")
    return directory


def cli_on_cpu(*args):
    """The real CLI in this process (typer's runner), on the CPU: `eval`, `compare`, `inspect-collapse`."""
    from typer.testing import CliRunner

    from tripletctl.cli import app

    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu"])


# ------------------------------------------------------------------------------------ collapse


def tiny_encoder(tiny_bert_dir: Path, seed: int = 0):
    """The quickstart's tiny BERT with random weights (`init: config`) and a 32-wide head."""
    from transformers import AutoConfig, AutoModel

    from tripletctl.data.tokenizer import load_tokenizer
    from tripletctl.model.encoder import TripletEncoder

    torch.manual_seed(seed)
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir))
    return TripletEncoder(encoder, pooling="mean", head=(32,), normalize=True), load_tokenizer(str(tiny_bert_dir))


def make_collapsed(model) -> None:
    """Last head layer: zero weights, constant bias -> every input maps to one point."""
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(0.3)
