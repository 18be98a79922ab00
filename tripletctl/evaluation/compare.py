"""Two models on the same held-out rows: for each retrieval metric the difference B - A with a paired
bootstrap interval over the queries (`tripletctl compare` is commands/compare_command.py).

Both models embed exactly the same rows; per-query values come from `retrieval.per_query_metrics`
(the search `eval` runs) and the interval from `bootstrap.paired_bootstrap`. A benchmark script
calls `per_query_of_model` and `compare_per_query` (or `paired_bootstrap` on saved per-query arrays)
without the command around them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tripletctl.core.errors import DataError
from tripletctl.evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, paired_bootstrap
from tripletctl.evaluation.retrieval import DEFAULT_MAX_LENGTH, PerQueryMetrics, check_finite, per_query_metrics
from tripletctl.model.encoder import encode

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
