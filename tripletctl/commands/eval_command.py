"""`tripletctl eval`: a model's retrieval metrics on held-out rows (evaluation/retrieval.py
`evaluate_model`), as a rich table with what was read and where texts were cut, or only JSON on
stdout with --json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tripletctl.commands.loading import load_checkpoint_and_rows
from tripletctl.config.blocks import SourceConfig, describe_source
from tripletctl.core.errors import DataError
from tripletctl.core.jsonio import strict_json
from tripletctl.evaluation.retrieval import evaluate_model


def metrics_table(metrics: dict[str, Any], title: str):
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def run_eval_command(
    checkpoint: Path,
    source: SourceConfig,
    *,
    max_rows: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    as_json: bool = False,
    console=None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """`tripletctl eval`: metrics as a rich table, or only JSON on stdout with --json. `max_length`
    (--max-length) replaces the model's own length; either way the output says which was used."""
    console = console or Console()
    if batch_size < 1:  # before loading anything
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    loaded = load_checkpoint_and_rows(checkpoint, source, max_rows, device)
    if max_length is not None:
        loaded.max_length, loaded.length_from = max_length, "--max-length"
    data = describe_source(source.source)
    metrics = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        loaded.rows,
        batch_size=batch_size,
        max_length=loaded.max_length,
        device=loaded.device,
        what=f"the model in {loaded.checkpoint_dir}",
    )
    if as_json:
        payload = {
            "checkpoint": str(loaded.checkpoint_dir),
            "data": data,
            "max_length": loaded.max_length,
            **metrics,
        }
        # plain print, not console.print: rich would wrap or colour what scripts parse
        print(strict_json(payload, indent=2))
    else:
        console.print(metrics_table(metrics, f"retrieval on {data}"))
        console.print(
            f"{metrics['rows']} rows, {metrics['classes']} classes, {metrics['queries']} queries "
            f"({metrics['excluded_queries']} with a unique label excluded), "
            f"{metrics['skipped_rows']} rows skipped; checkpoint {loaded.checkpoint_dir}",
            highlight=False,
        )
        console.print(
            f"texts cut at {loaded.max_length} tokens ({loaded.length_from}; a run's own held-out evals cut at "
            f"its data.max_length, 128 unless set): pass --max-length N to compare at another length",
            highlight=False,
        )
        if "given_triplets" in metrics:
            console.print(
                f"given_negative_accuracy: d(a,p) < d(a,n) on the data's own {metrics['given_triplets']} "
                f"(anchor, positive, negative) triplets",
                highlight=False,
            )
    return metrics
