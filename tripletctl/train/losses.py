"""The loss of a phase (`loss:`), as pure tensor functions.

Two losses score the triplets a mining mode chose (train/mining.py hands them the anchor-positive
and anchor-negative distances): `margin`, FaceNet's relu(d(a,p) - d(a,n) + margin), and
`soft-margin`, softplus(d(a,p) - d(a,n)) (Hermans et al. 2017), which has no margin to tune and
never stops pushing. `infonce` scores the whole batch at once: every same-label row is a positive,
every other-label row a negative, over cosine similarities / temperature (docs/mining.md has the
formula). Each is O(B·N) memory for N candidates (the batch and any memory rows).

`mine` finds a loss by its name in `TRIPLET_LOSSES` or `BATCH_LOSSES` and names none itself;
config/loss_rules.py says which mining modes, guard and memory each goes with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tripletctl.model.distances import working_dtype
from tripletctl.train import guard as fn_guard


def margin_terms(d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
    """FaceNet's triplet loss, relu(d(a,p) - d(a,n) + margin), per triplet."""
    return torch.relu(d_ap - d_an + margin)


def soft_margin_terms(d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
    """Hermans et al.'s soft margin, softplus(d(a,p) - d(a,n)), per triplet; `margin` is not used."""
    return F.softplus(d_ap - d_an)


# The losses of mined triplets: per-triplet terms from (d_ap, d_an, margin).
TRIPLET_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "margin": margin_terms,
    "soft-margin": soft_margin_terms,
}


def _above_zero(terms: Tensor, d_ap: Tensor, d_an: Tensor, valid: Tensor) -> Tensor:
    return terms > 0  # terms are 0 where not valid


def _misordered(terms: Tensor, d_ap: Tensor, d_an: Tensor, valid: Tensor) -> Tensor:
    return (d_ap > d_an) & valid


# Triplets still at work (`active_fraction`) under each triplet loss: margin, loss > 0; soft-margin
# (never 0), the wrongly ordered ones, d(a,p) > d(a,n), where the loss is above log 2.
_ACTIVE = {"margin": _above_zero, "soft-margin": _misordered}


def active(loss: str, terms: Tensor, d_ap: Tensor, d_an: Tensor, valid: Tensor) -> Tensor:
    """The triplets of `terms` still at work under `loss` (bool, the shape of `terms`)."""
    return _ACTIVE[loss](terms, d_ap, d_an, valid)


def cosine_similarities(embeddings: Tensor, memory: Tensor | None = None) -> Tensor:
    """(B, N) cosine similarities of the batch to the batch then the memory rows (detached), in
    float32 for bf16/fp16 embeddings, autocast off: one matmul."""
    e = F.normalize(working_dtype(embeddings), dim=1)
    with torch.autocast(device_type=e.device.type, enabled=False):
        candidates = e if memory is None else torch.cat([e, F.normalize(memory.detach().to(e.dtype), dim=1)])
        return e @ candidates.T


@dataclass(frozen=True)
class BatchLoss:
    """What a batch loss returns: its value and what its statistics are made of."""

    loss: Tensor
    pairs: Tensor  # (B, P) bool: the anchor-positive pairs the loss averages over
    hardest: Tensor  # (B, P) candidate index of each pair's most similar negative in its denominator
    misranked: Tensor  # pairs with a negative in the denominator more similar than the positive
    skipped: Tensor  # negatives the guard dropped, summed over the pairs


def infonce(
    sim: Tensor,
    pos_idx: Tensor,
    valid: Tensor,
    neg_mask: Tensor,
    temperature: float,
    guard: float | None = None,
    hardness: float = 0.0,
) -> BatchLoss:
    """Supervised InfoNCE over the candidates: for anchor i and each positive p,
    ℓ_ip = -log(exp(s_ip/τ) / (exp(s_ip/τ) + Σ_n exp(s_in/τ))) over its negatives n; the loss is the
    mean over anchors of the mean over their positives (other positives are not in the denominator).

    With `hardness` α > 0 each negative's logit gains α·s_in without gradient (Lan et al. 2025, LLaVE,
    eq. 5; sentence-transformers' `hardness_alpha`): a negative weighs exp(α·s_in) more, so the
    closer ones pull harder while the positive's logit is unchanged. The logit stays increasing in
    s_in, so the sorted prefix below still holds each pair's kept negatives.

    `sim` (B, N) cosine similarities, `pos_idx`/`valid` (B, P) the anchor-positive layout, `neg_mask`
    (B, N). With `guard` ρ, negatives with s_in > ρ·s_ip leave that pair's denominator; a pair left
    without negatives leaves the mean. Negatives are sorted by similarity once, so each pair's
    denominator is one `logcumsumexp` prefix: O(B·N), exact and stable for any temperature."""
    if not hardness >= 0:
        raise ValueError(f"hardness must be a non-negative number, got {hardness}")
    zero = sim.new_zeros(())
    n_neg = neg_mask.sum(dim=1)
    filler = sim.detach().max() + 1.0  # non-negatives sort after every negative and are never summed
    sorted_sims, order = sim.where(neg_mask, filler).sort(dim=1)
    s_ap = sim.gather(1, pos_idx)
    if guard is None:
        kept = n_neg[:, None].expand_as(s_ap)
    else:
        kept = fn_guard.kept_in_sorted_similarities(sorted_sims, s_ap, guard, n_neg)
    last = (kept - 1).clamp(min=0)
    pairs = valid & (kept > 0)
    negative_logits = sorted_sims / temperature
    if hardness:
        negative_logits = negative_logits + hardness * sorted_sims.detach()
    log_negatives = torch.logcumsumexp(negative_logits, dim=1).gather(1, last)
    logit_ap = s_ap / temperature
    terms = (torch.logaddexp(logit_ap, log_negatives) - logit_ap).where(pairs, zero)
    per_anchor = terms.sum(dim=1) / pairs.sum(dim=1).clamp(min=1)
    anchors = pairs.any(dim=1)
    loss = per_anchor.where(anchors, zero).sum() / anchors.sum().clamp(min=1)
    with torch.no_grad():
        misranked = ((sorted_sims.gather(1, last) > s_ap) & pairs).sum()
        skipped = (n_neg[:, None] - kept).where(valid, torch.zeros_like(kept)).sum()
    return BatchLoss(loss, pairs, order.gather(1, last), misranked, skipped)


def infonce_of_batch(
    embeddings: Tensor,
    memory: Tensor | None,
    pos_idx: Tensor,
    valid: Tensor,
    neg_mask: Tensor,
    temperature: float,
    guard: float | None,
    hardness: float = 0.0,
) -> BatchLoss:
    """`infonce` as `mine` calls a batch loss: from the batch's embeddings and the memory's rows."""
    sim = cosine_similarities(embeddings, memory)
    return infonce(sim, pos_idx, valid, neg_mask, temperature, guard, hardness)


# The losses of a whole batch, which mine nothing: (embeddings, memory, pos_idx, valid, neg_mask,
# temperature, guard, hardness) -> BatchLoss, the layout being train/mining.py's.
BATCH_LOSSES: dict[str, Callable[..., BatchLoss]] = {"infonce": infonce_of_batch}

# Every name of config/choices.py LOSSES, in order: the triplet losses, then the batch losses.
LOSS_FUNCTIONS: dict[str, Callable] = {**TRIPLET_LOSSES, **BATCH_LOSSES}
