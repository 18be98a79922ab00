"""The false-negative guard (`false_negative_guard: ρ`): positive-aware mining as in NV-Retriever
(Moreira et al. 2024, "TopK-PercPos"): a candidate negative n of the pair (a, p) is skipped when
sim(a, n) > ρ·sim(a, p). On real data the hardest "negatives" are often unlabelled positives
(a paraphrase filed under another label); the harder the mode, the more often it picks one.

The similarity is the cosine. The triplet modes work on distances, so the rule becomes a distance
limit: on unit vectors sim = 1 - d²/2 (euclidean) or 1 - d/2 (squared-euclidean), and
sim(a,n) > ρ·sim(a,p) ⇔ d(a,n) < limit(d(a,p)). Skipped negatives are therefore always the closest
ones, a prefix of a row's sorted negatives: every guarded mode stays O(B·N). docs/mining.md says
which mode uses which positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tripletctl.model.distances import SQRT_EPS


def distance_limit(d_ap: Tensor, rho: float, distance: str) -> Tensor:
    """Per pair: negatives closer than this are skipped (sim(a,n) > ρ·sim(a,p) with sim = 1 - d²/2).

    1 - dn²/2 > ρ(1 - dp²/2) ⇔ dn² < 2(1 - ρ) + ρ·dp², never negative for ρ in (0, 1]."""
    if not 0 < rho <= 1:
        raise ValueError(f"false_negative_guard must be in (0, 1], got {rho}")
    d_ap = d_ap.detach()
    if distance == "squared-euclidean":
        return 2 * (1 - rho) + rho * d_ap
    return (2 * (1 - rho) + rho * d_ap * d_ap).clamp(min=SQRT_EPS).sqrt()


def skipped_in_sorted(sorted_values: Tensor, limit: Tensor, n_neg: Tensor) -> Tensor:
    """How many of each row's ascending negatives lie strictly below `limit` (B, K): the skipped
    prefix, so its count is also the column of the first negative kept (n_neg: none is left)."""
    count = torch.searchsorted(sorted_values.detach(), limit.detach().contiguous(), right=False)
    return torch.minimum(count, n_neg[:, None])


def kept_in_sorted_similarities(sorted_sims: Tensor, s_ap: Tensor, rho: float, n_neg: Tensor) -> Tensor:
    """InfoNCE: how many of each row's negatives, sorted by ascending similarity, are kept for the
    pair (a, p) (B, P): those with sim(a,n) ≤ ρ·sim(a,p), a prefix of the row."""
    if not 0 < rho <= 1:
        raise ValueError(f"false_negative_guard must be in (0, 1], got {rho}")
    count = torch.searchsorted(sorted_sims.detach(), (rho * s_ap.detach()).contiguous(), right=True)
    return torch.minimum(count, n_neg[:, None])
