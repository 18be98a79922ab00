"""`tripletctl inspect-collapse`: the collapse report of a model on held-out rows
(evaluation/collapse.py `collapse_report` and `judge`), its table, verdict and reasons, an optional
picture, and the verdict's exit code (0 healthy, 1 at risk, 3 collapsed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tripletctl.commands.loading import load_checkpoint_and_rows
from tripletctl.config.blocks import SourceConfig, describe_source
from tripletctl.config.choices import DISTANCES
from tripletctl.core.errors import DataError
from tripletctl.evaluation.collapse import (
    AT_RISK,
    AT_RISK_COSINE,
    AT_RISK_ERANK_FRACTION,
    AT_RISK_NEAR_MARGIN,
    COLLAPSED,
    COLLAPSED_COSINE,
    HEALTHY,
    WEAK_SEPARATION,
    CollapseReport,
    collapse_report,
)
from tripletctl.evaluation.retrieval import check_finite
from tripletctl.model.encoder import encode


def report_table(report: CollapseReport):
    table = Table(title=f"collapse statistics ({report.rows} rows, {report.classes} classes, dim {report.dim})")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_column("healthy", style="dim")
    ap, an = report.ap_quantiles, report.an_quantiles
    rows = [
        ("mean pairwise cosine", f"{report.mean_cosine:.4f}", f"< {AT_RISK_COSINE} (collapsed > {COLLAPSED_COSINE})"),
        ("std pairwise cosine", f"{report.std_cosine:.4f}", "well above 0"),
        ("embedding spread", f"{report.embedding_spread:.4f}", "~1 on the unit sphere, 0 collapsed"),
        ("per-dim std mean / min", f"{report.dim_std_mean:.4f} / {report.dim_std_min:.4f}", "min well above 0"),
        ("effective rank", f"{report.effective_rank:.2f}", f">= {AT_RISK_ERANK_FRACTION} x min(dim, classes-1)"),
        ("alignment", f"{report.alignment:.4f}", "small (0 = positives identical)"),
        ("uniformity", f"{report.uniformity:.4f}", "negative; 0 = collapsed"),
        (
            "d(a,p) median [p05, p95]",
            f"{ap.get('p50', float('nan')):.4f} [{ap.get('p05', float('nan')):.3f}, {ap.get('p95', float('nan')):.3f}]",
            "",
        ),
        (
            "d(a,n) median [p05, p95]",
            f"{an.get('p50', float('nan')):.4f} [{an.get('p05', float('nan')):.3f}, {an.get('p95', float('nan')):.3f}]",
            "",
        ),
        (
            "separation (median an - ap)",
            f"{report.separation:.4f}",
            f">= margin/4 = {WEAK_SEPARATION * report.margin:.3f}",
        ),
        ("batch-hard loss (whole sample)", f"{report.batch_hard_loss:.4f}", f"margin = {report.margin}"),
        ("batch-hard losses at margin", f"{report.near_margin_fraction:.1%}", f"< {AT_RISK_NEAR_MARGIN:.0%}"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def run_inspect_command(
    checkpoint: Path,
    source: SourceConfig,
    *,
    max_rows: int | None = None,
    margin: float | None = None,
    plot: Path | None = None,
    device: str = "auto",
    as_json: bool = False,
    console=None,
) -> int:
    """`tripletctl inspect-collapse`: report, verdict, reasons, optional PNG; returns 0 / 1 / 3."""
    console = console or Console()
    loaded = load_checkpoint_and_rows(checkpoint, source, max_rows, device)
    data = describe_source(source.source)
    if len(loaded.rows.texts) < 2:
        raise DataError(f"need at least 2 rows to inspect, got {len(loaded.rows.texts)} from {data}")
    embeddings = encode(
        loaded.model, loaded.tokenizer, loaded.rows.texts, max_length=loaded.max_length, device=loaded.device
    )
    check_finite(embeddings, f"the model in {loaded.checkpoint_dir}")
    distance = loaded.distance if loaded.distance in DISTANCES else "euclidean"
    if margin is None:  # judge against the margin the model was trained with
        margin = loaded.margin if loaded.margin else 0.2
    report = collapse_report(embeddings, torch.as_tensor(loaded.rows.labels), margin=margin, distance=distance)
    written = None
    if plot is not None:
        from tripletctl.evaluation.plots import plot_collapse  # matplotlib loads only when a picture is asked for

        written = plot_collapse(report, plot)
    if as_json:
        payload = {"checkpoint": str(loaded.checkpoint_dir), "data": data, **report.to_dict()}
        if written is not None:
            payload["plot"] = str(written)
        print(json.dumps(payload, indent=2))
        return report.exit_code
    console.print(report_table(report))
    colour = {HEALTHY: "green", AT_RISK: "yellow", COLLAPSED: "bold red"}[report.verdict]
    console.print(f"verdict: [{colour}]{report.verdict}[/] (exit code {report.exit_code})")
    for reason in report.reasons:
        console.print(f"  - {reason}", highlight=False)
    if written is not None:
        console.print(f"wrote {written}", highlight=False)
    return report.exit_code
