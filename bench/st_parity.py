"""tripletctl's semi-hard loss against sentence-transformers' BatchSemiHardTripletLoss on the same batch.

    pip install -e '.[bench]'
    python bench/st_parity.py

bench/quality.py compares the two libraries' training; this checks that the loss is not where they
differ. sentence-transformers' semi-hard loss (ported from TensorFlow) uses plain euclidean distance,
margin 5 and, where no negative is farther than the positive, the farthest negative. On the unit
sphere every distance is at most 2, so any margin >= 2 keeps every triplet active and the loss is
linear: tripletctl's `mine(..., "semi-hard", margin=2, distance="euclidean", fallback="easiest")`
should then be the same loss minus 3, with the same gradient. Prints both, and the largest gradient
difference, on batches shaped like the benchmark's (64 rows of 24 classes, 2-4 rows each).
"""

from __future__ import annotations

import torch
from sentence_transformers.sentence_transformer.losses import BatchSemiHardTripletLoss
from sentence_transformers.sentence_transformer.losses.batch_hard_triplet import (
    BatchHardTripletLossDistanceFunction,
)

from tripletctl.train.mining import mine

ST_MARGIN, TC_MARGIN = 5.0, 2.0


def sentence_transformers_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = BatchSemiHardTripletLoss.__new__(BatchSemiHardTripletLoss)  # the loss alone, without a model
    torch.nn.Module.__init__(loss)
    loss.margin, loss.distance_metric = ST_MARGIN, BatchHardTripletLossDistanceFunction.eucledian_distance
    return loss.batch_semi_hard_triplet_loss(labels, embeddings)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    print(f"{'draw':>4} {'spread':>6} {'st loss - 3':>12} {'tc loss':>10} {'max |grad diff|':>16} {'max |grad|':>11}")
    worst, shift = 0.0, ST_MARGIN - TC_MARGIN
    for draw in range(3):
        labels = torch.tensor([c for c in range(24) for _ in range(2)] + [c for c in range(8) for _ in range(2)])
        labels = labels[torch.randperm(len(labels), generator=generator)]
        centres = torch.randn(24, 384, generator=generator)
        noise = torch.randn(len(labels), 384, generator=generator)
        for spread in (0.3, 1.0):  # tight and loose classes
            base = torch.nn.functional.normalize(noise * spread + centres[labels], dim=1)
            st_in, tc_in = base.clone().requires_grad_(), base.clone().requires_grad_()
            st_loss = sentence_transformers_loss(st_in, labels)
            st_loss.backward()
            tc_loss, _ = mine(tc_in, labels, "semi-hard", TC_MARGIN, distance="euclidean", fallback="easiest")
            tc_loss.backward()
            diff = float((st_in.grad - tc_in.grad).abs().max())
            worst = max(worst, diff)
            print(
                f"{draw:>4} {spread:>6} {st_loss.item() - shift:>12.6f} {tc_loss.item():>10.6f} "
                f"{diff:>16.2e} {float(st_in.grad.abs().max()):>11.2e}"
            )
    print(f"largest gradient difference: {worst:.2e}")


if __name__ == "__main__":
    main()
