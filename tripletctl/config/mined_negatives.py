"""The phase key `mined_negatives`: negatives mined from a pool of the corpus when the phase starts.

In-batch mining is only as hard as the batch. With this key each class of a batch brings `per_class`
rows of *other* classes that the model, as it stands when the phase starts, places closest to the
class (positive-aware: a candidate above `max_ratio` × the class's own mean pairwise similarity is a
likely false negative and is skipped, as NV-Retriever's TopK-PercPos; `skip_top` drops the closest
survivors too). The rows are embedded fresh at every step with the rest of the batch, never a stale
memory. train/mined_negatives.py builds the table; docs/mining.md says when it helps.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from tripletctl.config import schema


@dataclass(frozen=True)
class MinedNegativesConfig:
    per_class: int  # mined rows each class of a batch brings; they count in batch_size
    pool_rows: int = 20000  # rows read and embedded when the phase starts (the pass's cost)
    max_ratio: float = 0.95  # positive-aware: skip candidates above this × the class's pairwise similarity
    skip_top: int = 0  # also skip this many of the closest surviving candidates


_EXPECTED = (
    "null or a mapping {per_class: K, pool_rows: N, max_ratio: R, skip_top: S} (K and N positive integers, "
    "R a number in (0, 1], S a non-negative integer)"
)


def check_mined_negatives(value: Any, raw: str | None) -> MinedNegativesConfig | None:
    """The key's check for config/schema.py: None (off) or a complete config, set whole."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise schema.Invalid(_EXPECTED)
    names = [f.name for f in dataclasses.fields(MinedNegativesConfig)]
    unknown = [k for k in value if k not in names]
    if unknown:
        matches = difflib.get_close_matches(str(unknown[0]), names, n=1, cutoff=0.6)
        suggestion = f"; did you mean '{matches[0]}'?" if matches else ""
        raise schema.Invalid(_EXPECTED, f" (unknown key '{unknown[0]}'{suggestion})")
    if "per_class" not in value:
        raise schema.Invalid(_EXPECTED, " (per_class is missing)")
    try:
        return MinedNegativesConfig(
            per_class=schema.integer(1)(value["per_class"], None),
            pool_rows=schema.integer(2)(value.get("pool_rows", 20000), None),
            max_ratio=schema.fraction(value.get("max_ratio", 0.95), None),
            skip_top=schema.integer(0)(value.get("skip_top", 0), None),
        )
    except schema.Invalid:
        raise schema.Invalid(_EXPECTED) from None


def group_rows(samples_per_class: int, mined: MinedNegativesConfig | None) -> int:
    """Texts one class occupies in a labelled batch: its own rows plus the negatives it brings."""
    return samples_per_class + (mined.per_class if mined else 0)


def stream_rows(batch_size: int, samples_per_class: int, mined: MinedNegativesConfig | None) -> int:
    """Of a phase's batch_size texts, those the batcher draws from the corpus (the rest are mined)."""
    return batch_size // group_rows(samples_per_class, mined) * samples_per_class
