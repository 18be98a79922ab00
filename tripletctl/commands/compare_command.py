"""`tripletctl compare A B`: both models loaded as `eval` loads them (commands/loading.py), each
scored on the same rows with its own max_length (evaluation/compare.py `per_query_of_model`), the
paired bootstrap of B - A per metric (`compare_per_query`), a table with a verdict per metric or only
JSON on stdout with --json. One model is in memory at a time; a missing B fails before A loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tripletctl.commands.loading import load_checkpoint_and_rows, resolve_device
from tripletctl.config.blocks import SourceConfig, describe_source
from tripletctl.core.errors import DataError
from tripletctl.core.jsonio import strict_json
from tripletctl.evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES
from tripletctl.evaluation.compare import compare_per_query, per_query_of_model
from tripletctl.model.encoder import model_folder
from tripletctl.outputs.checkpoint_find import resolve_checkpoint

MIN_RESAMPLES = 1000  # fewer resamples leave the 2.5% tails to a couple dozen values


def _check_options(batch_size: int, resamples: int, seed: int) -> None:
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if resamples < MIN_RESAMPLES:
        raise DataError(f"--resamples must be at least {MIN_RESAMPLES}, got {resamples}")
    if seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed}")


def _check_model_exists(model: Path | str) -> None:
    """A missing or unusable B fails in one line before A is loaded (loading can take a while)."""
    if model_folder(model) is None:
        resolve_checkpoint(Path(model))


def comparison_table(result: dict[str, Any]):
    percent = round(100 * result["confidence"])
    table = Table()
    for column in ("metric", "A", "B", "B - A", f"{percent}% interval"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    table.add_column("verdict")
    for name, entry in result["metrics"].items():
        table.add_row(
            name,
            f"{entry['a']:.4f}",
            f"{entry['b']:.4f}",
            f"{entry['diff']:+.4f}",
            f"[{entry['low']:+.4f}, {entry['high']:+.4f}]",
            entry["verdict"],
        )
    return table


def run_compare_command(
    a: Path | str,
    b: Path | str,
    source: SourceConfig,
    *,
    max_rows: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    as_json: bool = False,
    console=None,
) -> dict[str, Any]:
    """`tripletctl compare`: a table with a verdict per metric, or only JSON on stdout with --json."""
    console = console or Console()
    _check_options(batch_size, resamples, seed)  # before loading anything
    device = resolve_device(device)
    _check_model_exists(b)
    scored, models, rows = [], {}, None
    for side, model in (("a", a), ("b", b)):
        loaded = load_checkpoint_and_rows(model, source, max_rows, device, rows=rows)
        rows = loaded.rows
        what = f"model {side.upper()} ({loaded.checkpoint_dir})"
        scored.append(
            per_query_of_model(
                loaded.model,
                loaded.tokenizer,
                rows,
                batch_size=batch_size,
                max_length=loaded.max_length,
                device=loaded.device,
                what=what,
            )
        )
        models[side] = {"model": str(model), "checkpoint": str(loaded.checkpoint_dir), "max_length": loaded.max_length}
        del loaded  # one model in memory at a time
    metrics = compare_per_query(*scored, resamples=resamples, seed=seed)
    first = scored[0]
    result = {
        **models,
        "data": describe_source(source.source),
        "rows": first.rows,
        "classes": first.classes,
        "queries": int(first.query_rows.size),
        "excluded_queries": first.excluded_queries,
        "skipped_rows": int(getattr(rows, "skipped", 0)),
        "resamples": resamples,
        "seed": seed,
        "confidence": DEFAULT_CONFIDENCE,
        "metrics": metrics,
    }
    if as_json:
        print(strict_json(result, indent=2))  # plain print: rich would wrap or colour what scripts parse
    else:
        _print_comparison(result, console)
    return result


def _print_comparison(result: dict[str, Any], console: Console) -> None:
    """Which checkpoints A and B are, the data, the table, and what the interval means."""
    for side in ("a", "b"):
        console.print(f"{side.upper()}: {result[side]['checkpoint']}", highlight=False, soft_wrap=True)
    console.print(f"retrieval on {result['data']}", highlight=False, soft_wrap=True)
    console.print(comparison_table(result))
    console.print(
        f"{result['rows']} rows, {result['classes']} classes, {result['queries']} queries "
        f"({result['excluded_queries']} with a unique label excluded), {result['skipped_rows']} rows skipped. "
        f"Paired bootstrap: the queries resampled with replacement {result['resamples']} times, the same resamples "
        f"for A and B (seed {result['seed']}); percentile interval of B - A; where it holds 0: no detectable difference",
        highlight=False,
        soft_wrap=True,
    )
