"""Negatives mined from a pool of the corpus when a phase starts (the phase key `mined_negatives`).

In-batch mining is only as hard as the batch: a random batch of a few dozen out of thousands of
classes rarely holds a class's true confusers. When a phase with `mined_negatives` starts, the model
as it stands embeds a bounded pool (the source's first `pool_rows` rows, no gradient, in chunks), and
each class of the pool gets the `per_class` rows of other classes closest to it: closest by the mean
cosine to the class's rows, positive-aware (a candidate above `max_ratio` × the class's own mean
pairwise cosine is a likely false negative and is skipped, NV-Retriever's TopK-PercPos), after
`skip_top` more. At every step each class of the batch brings its rows, which are tokenised once here
and embedded fresh with the batch (never a stale embedding), under their own labels: mining treats
them as any other row, a negative for every class but their own.

Memory: the pass holds pool × dim floats and one chunk of classes × pool scores; the table keeps
the token ids of the rows it uses (classes × per_class at most), never classes² or a text. The table
is part of the checkpoint (`mined.pt`, tensors only), so `--resume` extends every batch the same way.
Under torchrun rank 0 mines and every rank extends its batches from rank 0's table (the one a
checkpoint holds), so a resume is exact; the other ranks wait for the pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor

from tripletctl.config.mined_negatives import MinedNegativesConfig
from tripletctl.core.errors import DataError
from tripletctl.data.sources import first_labelled_rows
from tripletctl.data.stream import Batch, label_id
from tripletctl.model.encoder import encode
from tripletctl.train.distributed import DistContext, broadcast_object

CLASS_CHUNK = 1024  # classes scored against the pool at once: chunk × pool floats
RESERVE_ROWS = 256  # random pool rows for classes the pool lacks (a batch always has its mined share)


def mine_pool(
    embeddings: Tensor, labels: Tensor, config: MinedNegativesConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, int]:
    """For each class of the pool: (class ids (C,), indices (C, per_class) of its mined rows, the
    number of slots filled at random because too few candidates passed the positive-aware rule).

    A candidate's score for class c is the mean cosine of c's rows to it (the unit rows' mean · it);
    the class's positive similarity is its mean pairwise cosine (1 for a class of one row)."""
    x = F.normalize(embeddings.float(), dim=1)
    classes, inverse = torch.unique(labels, return_inverse=True)
    n_classes, n = len(classes), len(labels)
    if n_classes < 2:
        raise DataError(f"mined_negatives: the pool of {n} rows holds one class; raise pool_rows")
    sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=n_classes).float()
    pairwise = ((sums * sums).sum(1) - counts) / (counts * (counts - 1)).clamp(min=1)
    limit = config.max_ratio * torch.where(counts > 1, pairwise, torch.ones_like(pairwise))
    means = sums / counts[:, None]
    take = min(config.skip_top + config.per_class, n)
    chosen = torch.empty(n_classes, config.per_class, dtype=torch.int64)
    filled_at_random = 0
    for start in range(0, n_classes, CLASS_CHUNK):
        rows = torch.arange(start, min(start + CLASS_CHUNK, n_classes))
        scores = means[rows] @ x.T
        scores[inverse.unsqueeze(0) == rows.unsqueeze(1)] = -torch.inf  # its own rows
        scores[scores > limit[rows].unsqueeze(1)] = -torch.inf  # likely false negatives
        values, index = scores.topk(take, dim=1)
        values, index = values[:, config.skip_top :], index[:, config.skip_top :]
        for r in range(len(rows)):
            picked = index[r][torch.isfinite(values[r])].tolist()
            while len(picked) < config.per_class:  # too few candidates: rows of other classes at random
                candidate = int(torch.randint(n, (1,), generator=generator))
                if int(inverse[candidate]) != int(rows[r]):
                    picked.append(candidate)
                    filled_at_random += 1
            chosen[int(rows[r])] = torch.tensor(picked[: config.per_class])
    return classes, chosen, filled_at_random


@dataclass
class MinedTable:
    """What a phase's batches are extended with: each class's mined rows, as token ids."""

    class_ids: Tensor  # (C,) int64: label ids (data/stream.py's label_id) of the pool's classes
    negatives: Tensor  # (C, per_class) int64: rows of the table (below) each class brings
    reserve: Tensor  # (M,) int64: rows of the table drawn for a class the pool lacks
    row_tokens: Tensor  # the table's rows' token ids back to back
    row_lengths: Tensor  # (R,) int64
    row_labels: Tensor  # (R,) int64 label ids

    def __post_init__(self) -> None:
        self.row_of_class = {int(c): k for k, c in enumerate(self.class_ids.tolist())}
        self.row_starts = (torch.cumsum(self.row_lengths, 0) - self.row_lengths).tolist()

    @property
    def per_class(self) -> int:
        return self.negatives.shape[1]

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: Any) -> MinedTable:
        """From mined.pt; anything missing, mistyped or out of range is a ValueError (the checkpoint
        loader names the file)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(state, dict) or (missing := [n for n in names if n not in state]):
            raise ValueError(f"missing {', '.join(missing) if isinstance(state, dict) else 'its tensors'}")
        if bad := [n for n in names if not isinstance(state[n], Tensor) or state[n].dtype != torch.int64]:
            raise ValueError(f"{bad[0]} is not an int64 tensor")
        table = cls(**{n: state[n] for n in names})
        rows = len(table.row_lengths)
        if (
            table.negatives.ndim != 2
            or len(table.negatives) != len(table.class_ids)
            or len(table.row_labels) != rows
            or not len(table.reserve)
            or int(table.row_lengths.sum()) != len(table.row_tokens)
            or any(len(t) and not 0 <= int(t.min()) <= int(t.max()) < rows for t in (table.negatives, table.reserve))
        ):
            raise ValueError("its tensors do not fit together")
        return table

    def extend(self, batch: Batch, samples_per_class: int, seed: int) -> Batch:
        """The batch with its mined rows after its own: per_class for each of its classes (a class the
        pool lacks draws from the reserve, seeded by the batch's index), len(batch) / samples_per_class
        classes' worth in all, so the phase's batch_size holds exactly."""
        labels = batch.labels.tolist()
        wanted = len(labels) // samples_per_class * self.per_class
        draw = random.Random(seed * 1_000_003 + batch.index)
        picks: list[int] = []
        for label in itertools.cycle(dict.fromkeys(labels)):
            if len(picks) >= wanted:
                break
            row = self.row_of_class.get(label)
            if row is not None:
                picks += self.negatives[row].tolist()
            else:
                picks += [int(self.reserve[draw.randrange(len(self.reserve))]) for _ in range(self.per_class)]
        picks = picks[:wanted]
        tokens = [self.row_tokens[self.row_starts[r] : self.row_starts[r] + int(self.row_lengths[r])] for r in picks]
        return dataclasses.replace(
            batch,
            token_ids=torch.cat([batch.token_ids, *tokens]),
            lengths=torch.cat([batch.lengths, self.row_lengths[picks]]),
            labels=torch.cat([batch.labels, self.row_labels[picks]]),
        )


def build_table(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    config: MinedNegativesConfig,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> tuple[MinedTable, dict[str, Any]]:
    """Read and embed the pool with the model as it stands, mine each class's rows; also what the
    pass cost (its seconds, rows and classes, the slots filled at random), for the phase's log.
    `progress`: a transient bar while the pool is embedded (a large pool takes minutes)."""
    started = time.perf_counter()
    rows = first_labelled_rows(data, config.pool_rows)
    texts, labels = [r[0] for r in rows], torch.tensor([label_id(r[1]) for r in rows], dtype=torch.int64)
    embeddings = encode(
        model, tokenizer, texts, batch_size=256, max_length=data.max_length, device=device, progress=progress
    )
    generator = torch.Generator().manual_seed(seed)
    class_ids, chosen, filled_at_random = mine_pool(embeddings, labels, config, generator)
    reserve = torch.randperm(len(rows), generator=generator)[:RESERVE_ROWS]
    used, remap = torch.unique(torch.cat([chosen.flatten(), reserve]), return_inverse=True)
    ids = tokenizer(
        [texts[i] for i in used.tolist()],
        truncation=True,
        max_length=data.max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    table = MinedTable(
        class_ids=class_ids,
        negatives=remap[: chosen.numel()].view_as(chosen),
        reserve=remap[chosen.numel() :],
        row_tokens=torch.tensor([t for row in ids for t in row], dtype=torch.int64),
        row_lengths=torch.tensor([len(row) for row in ids], dtype=torch.int64),
        row_labels=labels[used],
    )
    cost = {
        "pool_rows": len(rows),
        "pool_classes": len(class_ids),
        "filled_at_random": filled_at_random,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return table, cost


def agreed_table(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    config: MinedNegativesConfig,
    seed: int,
    ctx: DistContext,
    console: Console | None = None,
    phase_index: int = 0,
) -> tuple[MinedTable, dict[str, Any]]:
    """build_table on rank 0, its table and cost on every rank (tensors of token ids: small).
    `console` (rank 0's): the pass is seconds to minutes of work, so it is named before it starts,
    embeds behind a bar on a terminal, and its cost is printed after."""
    if console is not None:
        console.print(
            f"phase {phase_index}: mining {config.per_class} negatives a class from the first "
            f"{config.pool_rows:,} rows of the source"
        )
    progress = console is not None and console.is_terminal
    built = build_table(model, tokenizer, data, config, seed, ctx.device, progress) if ctx.is_main else None
    if console is not None and built is not None:
        cost = built[1]
        console.print(
            f"phase {phase_index}: mined {config.per_class} negatives for each of {cost['pool_classes']:,} "
            f"classes from {cost['pool_rows']:,} pool rows in {cost['seconds']:.1f} s"
            + (f" ({cost['filled_at_random']:,} slots at random)" if cost["filled_at_random"] else "")
        )
    if not ctx.enabled:
        return built
    state, cost = broadcast_object((built[0].state_dict(), built[1]) if built is not None else None, ctx)
    return MinedTable.from_state_dict(state), cost
