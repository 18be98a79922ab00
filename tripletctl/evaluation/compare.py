"""`tripletctl compare A B`: two models on the same held-out rows, and for each retrieval metric
the difference B - A with a paired bootstrap interval over the queries.

A and B are whatever `tripletctl eval` accepts (a run, a phase or checkpoint directory, a model
folder, a hub name), loaded by the same `load_checkpoint_and_rows`, each with its own max_length.
The rows are read once and both models embed exactly those rows; per-query values come from
`retrieval.per_query_metrics` (the search `eval` runs) and the interval from
`bootstrap.paired_bootstrap`. A benchmark script calls `per_query_of_model` and `compare_per_query`
(or `paired_bootstrap` on saved per-query arrays) without the command around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tripletctl.config.blocks import SourceConfig, describe_source
from tripletctl.core.errors import DataError
from tripletctl.core.jsonio import strict_json
from tripletctl.evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, paired_bootstrap
from tripletctl.evaluation.retrieval import (
    DEFAULT_MAX_LENGTH,
    PerQueryMetrics,
    check_finite,
    load_checkpoint_and_rows,
    per_query_metrics,
    resolve_device,
)

MIN_RESAMPLES = 1000  # fewer resamples leave the 2.5% tails to a couple dozen values
VERDICTS = {None: "no detectable difference", "a": "A is better", "b": "B is better"}


def per_query_of_model(
    model,
    tokenizer,
    rows,
    *,
    batch_size: int = 256,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "cpu",
    what: str = "the model",
) -> PerQueryMetrics:
    """Embed labelled rows (data.LabelledRows) with the model and return each query's metrics
    (leave-one-out retrieval among the rows, as `evaluate_model` scores them)."""
    from tripletctl.model.encoder import encode

    if len(rows.texts) < 2:
        raise DataError(f"need at least 2 rows to compare models on, got {len(rows.texts)}")
    embeddings = encode(model, tokenizer, rows.texts, batch_size=batch_size, max_length=max_length, device=device)
    check_finite(embeddings, what)
    if torch.device(device).type == "cuda":  # the chunked search is matmul + topk: much faster there
        embeddings = embeddings.to(device)
    return per_query_metrics(embeddings, torch.as_tensor(rows.labels))


def compare_per_query(
    a: PerQueryMetrics,
    b: PerQueryMetrics,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """`paired_bootstrap` of two models' per-query metrics, refusing queries that are not the same
    rows; each metric also gets its verdict in words."""
    if a.rows != b.rows or not np.array_equal(a.query_rows, b.query_rows):
        raise DataError(
            f"the two models were scored on different rows ({a.rows} rows, {a.query_rows.size} queries against "
            f"{b.rows} rows, {b.query_rows.size} queries): a paired comparison needs the same rows"
        )
    result = paired_bootstrap(a.values, b.values, resamples=resamples, seed=seed, confidence=confidence)
    for entry in result.values():
        entry["verdict"] = VERDICTS[entry["better"]]
    return result


def _check_model_exists(model: Path | str) -> None:
    """A missing or unusable B fails in one line before A is loaded (loading can take a while)."""
    from tripletctl.model.encoder import model_folder
    from tripletctl.outputs.checkpoint_find import resolve_checkpoint

    if model_folder(model) is None:
        resolve_checkpoint(Path(model))


def comparison_table(result: dict[str, Any]):
    from rich.table import Table

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
    from rich.console import Console

    console = console or Console()
    if batch_size < 1:  # before loading anything
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if resamples < MIN_RESAMPLES:
        raise DataError(f"--resamples must be at least {MIN_RESAMPLES}, got {resamples}")
    if seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {seed}")
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
        for side in ("a", "b"):
            console.print(f"{side.upper()}: {models[side]['checkpoint']}", highlight=False, soft_wrap=True)
        console.print(f"retrieval on {result['data']}", highlight=False, soft_wrap=True)
        console.print(comparison_table(result))
        console.print(
            f"{result['rows']} rows, {result['classes']} classes, {result['queries']} queries "
            f"({result['excluded_queries']} with a unique label excluded), {result['skipped_rows']} rows skipped. "
            f"Paired bootstrap: the queries resampled with replacement {resamples} times, the same resamples "
            f"for A and B (seed {seed}); percentile interval of B - A; where it holds 0: no detectable difference",
            highlight=False,
            soft_wrap=True,
        )
    return result
