"""Has the embedding collapsed? Statistics and a verdict (`tripletctl inspect-collapse` is
commands/collapse_command.py).

Collapse is the classic triplet-loss failure: every input maps to (nearly) one point, all
distances go to 0 and the loss sits at the margin alpha, so no gradient says which way to move.
`collapse_report` measures it on a sample of embeddings (pure function); train/watchdog.py spots it
live from the per-step numbers the loop already logs. See docs/collapse.md for every metric, the
healthy ranges and the verdict rules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tripletctl.config.choices import DISTANCES
from tripletctl.core.errors import NonFiniteError
from tripletctl.core.jsonio import finite_or_null
from tripletctl.evaluation.retrieval import check_finite
from tripletctl.model.distances import pairwise_distances

HEALTHY, AT_RISK, COLLAPSED = "healthy", "at risk", "collapsed"


EXIT_CODES = {HEALTHY: 0, AT_RISK: 1, COLLAPSED: 3}


# Verdict thresholds (documented in docs/collapse.md; tuned on a collapsed head, an untrained tiny
# BERT and separated synthetic clusters).
COLLAPSED_COSINE = 0.99  # mean pairwise cosine above this: all directions ~ the same


AT_RISK_COSINE = 0.9


COLLAPSED_ERANK = 1.5  # effective rank below this (when >= 3 classes need >= 2 dimensions)


AT_RISK_ERANK_FRACTION = 0.25  # effective rank below this fraction of min(D, classes - 1)


NEAR_MARGIN_TOLERANCE = 0.01  # a batch-hard loss within 1% of the margin is "stuck at alpha"


COLLAPSED_NEAR_MARGIN = 0.9  # ... for this fraction of anchors, together with a tiny spread


AT_RISK_NEAR_MARGIN = 0.5


TINY_RELATIVE_SPREAD = 0.1  # spread / RMS norm (on the unit sphere: mean cosine ~ 0.99)


WEAK_SEPARATION = 0.25  # median d(a,n) - median d(a,p) below this fraction of the margin


HIST_BINS = 50


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True, eq=False)
class CollapseReport:
    """Collapse statistics of one sample of embeddings. Arrays are for plotting, not for JSON."""

    rows: int
    dim: int
    classes: int
    margin: float
    distance: str
    mean_cosine: float  # mean off-diagonal pairwise cosine similarity
    std_cosine: float
    embedding_spread: float  # sqrt(mean ||e - mean(e)||^2), as mining.MiningStats
    mean_norm: float  # RMS norm of the embeddings (1 on the unit sphere)
    dim_std_mean: float  # per-dimension standard deviation: mean over dimensions
    dim_std_min: float  # ... and the deadest dimension
    effective_rank: float  # Roy & Vetterli 2007, of the centred matrix
    alignment: float  # Wang & Isola 2020: mean ||f(x)-f(y)||^2 over positive pairs
    uniformity: float  # log mean exp(-2 ||f(x)-f(y)||^2) over all pairs
    ap_quantiles: dict[str, float]  # d(a,p) over positive pairs ("p05", "p25", "p50", ...)
    an_quantiles: dict[str, float]  # d(a,n) over negative pairs
    separation: float  # median d(a,n) - median d(a,p)
    batch_hard_loss: float  # whole sample treated as one batch
    near_margin_fraction: float  # batch-hard losses within 1% of the margin
    batch_hard_anchors: int
    verdict: str
    reasons: tuple[str, ...]
    hist_edges: list[float] = field(default_factory=list)  # shared bins for d(a,p) and d(a,n)
    ap_hist: list[int] = field(default_factory=list)
    an_hist: list[int] = field(default_factory=list)
    d_ap: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    d_an: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    singular_values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: numbers, histograms and the spectrum; raw distance arrays left out."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name in ("d_ap", "d_an", "singular_values"):
                continue
            out[name] = finite_or_null(getattr(self, name))
        out["singular_values"] = [finite_or_null(float(s)) for s in self.singular_values]
        out["exit_code"] = self.exit_code
        return out


def effective_rank(singular_values: torch.Tensor, scale: float) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli 2007): 1 for a line, D for isotropic data.

    Singular values below 1e-5 * `scale` (the Frobenius norm of the uncentred embeddings) are float
    noise, not directions: an exactly collapsed sample has none left and effective rank 0, instead of
    the high rank that normalising pure rounding noise would give.
    """
    s = singular_values.double()
    s = s[s > 1e-5 * max(scale, 1e-30)]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()).item())


def _singular_values(centred: torch.Tensor) -> torch.Tensor:
    """svdvals, or, when its iteration does not converge (finite but extreme values), the square roots
    of the Gram matrix's eigenvalues (the same numbers, less precise for the small ones)."""
    try:
        return torch.linalg.svdvals(centred)
    except torch.linalg.LinAlgError:
        pass
    try:
        return torch.linalg.eigvalsh(centred.T @ centred).clamp_min(0.0).sqrt().flip(0)
    except torch.linalg.LinAlgError as error:
        raise NonFiniteError(
            f"the embeddings' singular values cannot be computed ({error}): their values are too extreme to judge"
        ) from None


def _sample(embeddings: Any, labels: Any, max_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (N, D) embeddings and int64 labels on the CPU, checked, at most `max_rows` (seeded)."""
    emb = torch.as_tensor(embeddings).detach().to(torch.float64).cpu()
    lab = torch.as_tensor(labels).detach().to(torch.int64).cpu().reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != lab.shape[0] or emb.shape[0] < 2:
        raise ValueError(f"need (N>=2, D) embeddings and N labels, got {tuple(emb.shape)} and {tuple(lab.shape)}")
    check_finite(emb)
    if emb.shape[0] > max_rows:
        keep = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        emb, lab = emb[keep], lab[keep]
    return emb, lab


def _direction_stats(emb: torch.Tensor, off: torch.Tensor) -> dict[str, Any]:
    """How the embeddings point and spread: cosines, spread, norms, per-dimension spread, spectrum."""
    unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.T)[off]
    centred = emb - emb.mean(dim=0, keepdim=True)
    dim_std = emb.std(dim=0, unbiased=False)
    singular = _singular_values(centred)
    return {
        "mean_cosine": float(cos.mean()),
        "std_cosine": float(cos.std()) if cos.numel() > 1 else 0.0,
        "embedding_spread": float(centred.pow(2).sum(dim=1).mean().sqrt()),
        "mean_norm": float(emb.pow(2).sum(dim=1).mean().sqrt()),
        "dim_std_mean": float(dim_std.mean()),
        "dim_std_min": float(dim_std.min()),
        "effective_rank": effective_rank(singular, float(emb.norm())),
        "singular": singular,
    }


def _batch_hard_stats(dist: torch.Tensor, same: torch.Tensor, diff: torch.Tensor, margin: float) -> dict[str, Any]:
    """Batch-hard on the whole sample: hardest positive against hardest negative per anchor, and the
    fraction of anchors whose loss sits at the margin (the collapse signature)."""
    valid = same.any(dim=1) & diff.any(dim=1)
    hardest_pos = dist.masked_fill(~same, -math.inf).amax(dim=1)
    hardest_neg = dist.masked_fill(~diff, math.inf).amin(dim=1)
    losses = (hardest_pos - hardest_neg + margin).clamp_min(0.0)[valid]
    anchors = int(losses.numel())
    near = ((losses - margin).abs() <= NEAR_MARGIN_TOLERANCE * margin).double().mean()
    return {
        "batch_hard_loss": float(losses.mean()) if anchors else float("nan"),
        "near_margin_fraction": float(near) if anchors else float("nan"),
        "batch_hard_anchors": anchors,
    }


def collapse_report(
    embeddings: Any,
    labels: Any,
    margin: float = 0.2,
    distance: str = "euclidean",
    max_rows: int = 4096,
    seed: int = 0,
) -> CollapseReport:
    """Measure collapse on (N, D) embeddings with labels and give a verdict with reasons.

    Pairwise statistics are O(N^2), so a sample above `max_rows` is subsampled (seeded) first.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    emb, lab = _sample(embeddings, labels, max_rows, seed)
    n, dim = emb.shape
    classes = int(torch.unique(lab).numel())
    off = ~torch.eye(n, dtype=torch.bool)
    same = (lab[:, None] == lab[None, :]) & off
    diff = lab[:, None] != lab[None, :]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    directions = _direction_stats(emb, off)
    singular = directions.pop("singular")
    sqd = pairwise_distances(emb, "squared-euclidean").fill_diagonal_(0.0)
    dist = sqd if distance == "squared-euclidean" else sqd.sqrt()  # the distances the loss sees
    pairs = _pair_stats(dist, same & upper, diff & upper, margin)
    hardest = _batch_hard_stats(dist, same, diff, margin)
    verdict, reasons = judge(
        mean_cosine=directions["mean_cosine"],
        effective_rank=directions["effective_rank"],
        dim=dim,
        classes=classes,
        near_margin_fraction=hardest["near_margin_fraction"],
        relative_spread=directions["embedding_spread"] / max(directions["mean_norm"], 1e-12),
        separation=pairs["separation"],
        margin=margin,
    )
    return CollapseReport(
        rows=n,
        dim=dim,
        classes=classes,
        margin=float(margin),
        distance=distance,
        **directions,
        **_alignment_uniformity(sqd, same & upper, upper),
        **pairs,
        **hardest,
        verdict=verdict,
        reasons=tuple(reasons),
        singular_values=singular.float().numpy(),
    )


def _alignment_uniformity(sqd: torch.Tensor, positives: torch.Tensor, pairs: torch.Tensor) -> dict[str, float]:
    """Wang & Isola 2020 (alpha = 2, t = 2), from squared distances: positives close, all spread."""
    alignment = float(sqd[positives].mean()) if bool(positives.any()) else float("nan")
    all_pairs = sqd[pairs]
    return {
        "alignment": alignment,
        "uniformity": float(torch.logsumexp(-2.0 * all_pairs, dim=0) - math.log(all_pairs.numel())),
    }


def _pair_stats(dist: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float) -> dict[str, Any]:
    """The anchor-positive and anchor-negative distances (each pair once): quantiles, the separation
    of their medians, histograms, and the distances themselves (for the picture)."""
    d_ap, d_an = dist[positives], dist[negatives]
    ap_q, an_q = _quantiles(d_ap), _quantiles(d_an)
    edges, ap_hist, an_hist = _histograms(d_ap, d_an, margin)
    return {
        "ap_quantiles": ap_q,
        "an_quantiles": an_q,
        "separation": an_q.get("p50", float("nan")) - ap_q.get("p50", float("nan")),
        "hist_edges": edges,
        "ap_hist": ap_hist,
        "an_hist": an_hist,
        "d_ap": d_ap.float().numpy(),
        "d_an": d_an.float().numpy(),
    }


QUANTILE_SAMPLE = 1 << 24


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    if values.numel() > QUANTILE_SAMPLE:  # torch.quantile's input limit: a seeded uniform sample,
        # not the first rows (the file's order, often grouped by label, would bias the quantiles)
        pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]
        values = values[pick]
    q = torch.quantile(values, torch.tensor(QUANTILES, dtype=values.dtype))
    return {f"p{round(level * 100):02d}": float(v) for level, v in zip(QUANTILES, q)}


def _histograms(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float) -> tuple[list[float], list[int], list[int]]:
    """Shared bins so the two distributions can be overlaid (and read from JSON).

    The range reaches at least the margin, so a collapsed sample (all distances 0) still shows
    as a visible spike at 0 next to where the margin says negatives should be.
    """
    both = torch.cat([d_ap, d_an])
    if both.numel() == 0:
        return [], [], []
    hi = max(float(both.max()), float(margin), 1e-6)
    edges = torch.linspace(0.0, hi, HIST_BINS + 1, dtype=torch.float64)
    ap = torch.histc(d_ap, bins=HIST_BINS, min=0.0, max=hi) if d_ap.numel() else torch.zeros(HIST_BINS)
    an = torch.histc(d_an, bins=HIST_BINS, min=0.0, max=hi) if d_an.numel() else torch.zeros(HIST_BINS)
    return [float(e) for e in edges], [int(c) for c in ap], [int(c) for c in an]


def judge(
    *,
    mean_cosine: float,
    effective_rank: float,
    dim: int,
    classes: int,
    near_margin_fraction: float,
    relative_spread: float,
    separation: float,
    margin: float,
) -> tuple[str, list[str]]:
    """The verdict rules (docs/collapse.md): the worst triggered level wins; every trigger is a reason."""
    collapsed: list[str] = []
    at_risk: list[str] = []
    if mean_cosine > COLLAPSED_COSINE:
        collapsed.append(
            f"mean pairwise cosine {mean_cosine:.4f} > {COLLAPSED_COSINE}: every embedding points the same way"
        )
    elif mean_cosine > AT_RISK_COSINE:
        at_risk.append(
            f"mean pairwise cosine {mean_cosine:.4f} > {AT_RISK_COSINE}: embeddings crowd into a narrow cone"
        )
    needed = max(1, min(dim, classes - 1))  # dimensions the classes need to be told apart
    if classes >= 3 and effective_rank < COLLAPSED_ERANK:
        collapsed.append(
            f"effective rank {effective_rank:.2f} < {COLLAPSED_ERANK} with {classes} classes: at most a line left"
        )
    elif needed >= 2 and effective_rank < AT_RISK_ERANK_FRACTION * needed:
        at_risk.append(
            f"effective rank {effective_rank:.2f} < {AT_RISK_ERANK_FRACTION} x min(dim, classes-1) = "
            f"{AT_RISK_ERANK_FRACTION * needed:.1f}: few directions in use"
        )
    if math.isfinite(near_margin_fraction):
        if near_margin_fraction >= COLLAPSED_NEAR_MARGIN and relative_spread < TINY_RELATIVE_SPREAD:
            collapsed.append(
                f"{near_margin_fraction:.0%} of batch-hard losses within 1% of the margin and spread "
                f"{relative_spread:.3f} (relative) < {TINY_RELATIVE_SPREAD}: the loss is stuck at alpha"
            )
        elif near_margin_fraction >= AT_RISK_NEAR_MARGIN:
            at_risk.append(f"{near_margin_fraction:.0%} of batch-hard losses within 1% of the margin")
    if math.isfinite(separation) and separation < WEAK_SEPARATION * margin:
        at_risk.append(
            f"weak class separation: median d(a,n) - median d(a,p) = {separation:.4f} < margin/4 = "
            f"{WEAK_SEPARATION * margin:.4f}"
        )
    if collapsed:
        return COLLAPSED, collapsed + at_risk
    if at_risk:
        return AT_RISK, at_risk
    return HEALTHY, [
        f"mean cosine {mean_cosine:.3f}, effective rank {effective_rank:.1f} of {dim} dims, "
        f"separation {separation:.3f} >= margin/4: no collapse signal"
    ]
