"""tripletctl.train.mining against an independent brute force over all triplets.

The brute force (`reference_triplets` in tests/helpers.py, shared with the loss and guard tests)
loops over (a, p, n) in plain Python, computing each distance from the embeddings with torch ops,
and builds the mined set straight from the definitions; values and gradients must agree with the
O(B²) library to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LABELS, MaxNumel, reference_triplets

from tripletctl.config.choices import MINING_MODES as MODES
from tripletctl.model.distances import SQRT_EPS, pairwise_distances
from tripletctl.train.mining import MiningStats, mine, mine_indices

TOL = 1e-5


# ----------------------------------------------------------------------------- helpers


def _emb(b, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)


def _random_negatives(e, labels, mode, margin, distance, fallback, seed, memory=None):
    if mode != "random":
        return None
    g = torch.Generator().manual_seed(seed)
    mem = {} if memory is None else {"memory_embeddings": memory[0], "memory_labels": memory[1]}
    a, p, n = mine_indices(e, labels, mode, margin, distance, fallback, generator=g, **mem)
    return {(int(i), int(j)): int(k) for i, j, k in zip(a, p, n)}


def _compare(e, labels, mode, margin, distance, fallback, seed=0, group_grads=None, memory=None, groups=None):
    """Loss, gradients and stats of `mine` against the brute force (over batch ∪ memory candidates)."""
    leaf = e.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(seed) if mode == "random" else None
    mem = {} if memory is None else {"memory_embeddings": memory[0], "memory_labels": memory[1]}
    loss, stats = mine(leaf, labels, mode, margin, distance, fallback, generator=g, **mem)
    negs = _random_negatives(e, labels, mode, margin, distance, fallback, seed, memory)
    leaf_bf = e.clone().requires_grad_(True)
    loss_bf, st_bf = reference_triplets(leaf_bf, labels, mode, margin, distance, fallback, negs, memory, groups)

    assert loss.dim() == 0 and loss.grad_fn is not None
    assert loss.item() == pytest.approx(loss_bf.item(), abs=TOL)
    assert stats.loss == pytest.approx(loss.item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, leaf)
    (grad_bf,) = torch.autograd.grad(loss_bf, leaf_bf, allow_unused=True)
    grad_bf = torch.zeros_like(e) if grad_bf is None else grad_bf
    assert torch.isfinite(grad).all()
    if group_grads is not None:  # ties between identical rows: compare per duplicate group
        grad, grad_bf = group_grads @ grad, group_grads @ grad_bf
    torch.testing.assert_close(grad, grad_bf, atol=TOL, rtol=0)
    for key, value in st_bf.items():
        assert getattr(stats, key) == pytest.approx(value, abs=TOL), key
    return loss, stats


# ----------------------------------------------------------------------------- brute-force agreement


@pytest.mark.parametrize("negatives", [("negative",), ("negative_1", "negative_2", "negative_3")])
def test_triplet_batches_match_the_brute_force_with_given_negatives(assets_dir, tiny_bert_dir, tmp_path, negatives):
    """A real `layout: triplets` batch (labels as stream.py makes them) against the brute force told only
    the roles: rows i, i+1 of each group are anchor and positive, the rest given negatives. Equal texts
    get equal embeddings, so a negative equal to another group's positive sits at distance 0 from it."""
    import json

    from tripletctl.config.blocks import DataConfig
    from tripletctl.data.stream import BatchStream

    name = "triplets.jsonl" if len(negatives) == 1 else "triplets3.jsonl"
    rows = [json.loads(line) for line in (assets_dir / name).read_text().splitlines()[:8]]
    for k, row in enumerate(rows):
        if k % 2 == 0:  # the first negative is the next group's positive (duplicate text)
            row[negatives[0]] = rows[k + 1]["positive"]
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataConfig(
        source=str(path),
        layout="triplets",
        negative_columns=negatives,
        samples_per_class=2,
        tokenizer_workers=0,
        shuffle_buffer=1,
        max_length=8,
    )
    group = 2 + len(negatives)
    stream = BatchStream(data, str(tiny_bert_dir), 4 * group, seed=0)
    try:
        batches = [next(stream) for _ in range(2)]
    finally:
        stream.close()
    duplicated = 0
    for batch in batches:
        texts = batch.texts
        groups = [i // group if i % group < 2 else None for i in range(len(texts))]
        vectors = {text: _emb(1, seed=1000 + k)[0] for k, text in enumerate(dict.fromkeys(texts))}
        e = torch.stack([vectors[t] for t in texts])
        same_text = torch.tensor([[float(a == b) for b in texts] for a in dict.fromkeys(texts)], dtype=e.dtype)
        duplicated += len(texts) - len(set(texts))
        for mode in MODES:
            for fallback in ["hardest", "easiest"] if mode == "semi-hard" else ["hardest"]:
                _, stats = _compare(
                    e, batch.labels, mode, 0.2, "euclidean", fallback, group_grads=same_text, groups=groups
                )
                assert stats.skipped_anchors == 4 * len(negatives)  # the given negatives are never anchors
    assert duplicated == 4  # two per batch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distance", ["euclidean", "squared-euclidean"])
@pytest.mark.parametrize("structure", sorted(LABELS))
def test_matches_brute_force(mode, distance, structure):
    labels = LABELS[structure]()
    e = _emb(len(labels), seed=len(labels))
    fallbacks = ["hardest", "easiest"] if mode == "semi-hard" else ["hardest"]
    for fallback in fallbacks:
        _compare(e, labels, mode, 0.2, distance, fallback)


MEMORIES = {  # (memory labels, batch structure) pairs: classes shared with the batch, new ones, none
    "shared-classes": (lambda: torch.tensor([i % 4 for i in range(10)]), "four-classes"),
    "new-and-shared": (lambda: torch.tensor([0, 0, 9, 9, 9, 8, 1, 7]), "uneven"),
    "completes-singletons": (lambda: torch.tensor([5, 6, 6, 3, 2]), "singletons"),
    "only-new-classes": (lambda: torch.tensor([20, 20, 21, 22, 22, 22]), "one-class"),
    "one-row": (lambda: torch.tensor([1]), "two-classes"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distance", ["euclidean", "squared-euclidean"])
@pytest.mark.parametrize("case", sorted(MEMORIES))
def test_memory_matches_brute_force(mode, distance, case):
    """Mining with a memory = the brute force over (batch ∪ memory) candidates, anchors batch rows only."""
    memory_labels, structure = MEMORIES[case]
    labels, mem_labels = LABELS[structure](), memory_labels()
    e = _emb(len(labels), seed=len(labels))
    mem = _emb(len(mem_labels), seed=50 + len(mem_labels))
    fallbacks = ["hardest", "easiest"] if mode == "semi-hard" else ["hardest"]
    for fallback in fallbacks:
        _, stats = _compare(e, labels, mode, 0.2, distance, fallback, seed=3, memory=(mem, mem_labels))
        assert stats.memory_rows == len(mem_labels)


@pytest.mark.parametrize("fallback", ["hardest", "easiest"])
@pytest.mark.parametrize("margin", [0.05, 0.5, 1.5])
def test_semi_hard_with_memory_fallbacks_and_margins(fallback, margin):
    """Both semi-hard branches and batch-all's prefix sums with most candidates in the memory."""
    labels = torch.tensor([0] * 3 + [1] * 3 + [2] * 2)
    mem_labels = torch.tensor([i % 5 for i in range(24)])
    for seed in range(2):
        e, mem = _emb(len(labels), seed=200 + seed), _emb(24, seed=300 + seed)
        _compare(e, labels, "semi-hard", margin, "euclidean", fallback, memory=(mem, mem_labels))
        _compare(e, labels, "batch-all", margin, "squared-euclidean", fallback, memory=(mem, mem_labels))


@pytest.mark.parametrize("mode", MODES)
def test_no_gradient_reaches_memory_rows(mode):
    labels, mem_labels = LABELS["four-classes"](), torch.tensor([i % 6 for i in range(12)])
    e = _emb(len(labels), seed=1).requires_grad_(True)
    mem = _emb(12, seed=2).requires_grad_(True)  # even a memory that asks for gradients gets none
    loss, stats = mine(
        e,
        labels,
        mode,
        0.5,
        generator=torch.Generator().manual_seed(0),
        memory_embeddings=mem,
        memory_labels=mem_labels,
    )
    assert stats.num_triplets > 0 and loss.item() > 0
    grad_e, grad_mem = torch.autograd.grad(loss, (e, mem), allow_unused=True)
    assert grad_mem is None
    assert torch.isfinite(grad_e).all() and grad_e.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_empty_or_absent_memory_is_exactly_in_batch_mining(mode):
    """Memory off (None) or empty (M = 0): bit-identical loss, gradients and stats to plain mining."""
    labels = LABELS["uneven"]()
    e = _emb(len(labels), seed=5, dtype=torch.float32)
    results = []
    for mem in ({}, {"memory_embeddings": e[:0], "memory_labels": labels[:0]}):
        leaf = e.clone().requires_grad_(True)
        loss, stats = mine(leaf, labels, mode, 0.2, generator=torch.Generator().manual_seed(0), **mem)
        results.append((loss, torch.autograd.grad(loss, leaf)[0], stats))
    (l0, g0, s0), (l1, g1, s1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and s0 == s1 and s1.memory_rows == 0


def test_memory_batch_hard_stat_stays_in_batch():
    """The logged batch-hard loss ignores the memory, while the mined loss uses it."""
    labels = torch.tensor([0, 0, 1, 1])
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=torch.float64)
    e = F.normalize(e, dim=1)
    _, alone = mine(e, labels, "batch-hard", 0.2)
    mem = F.normalize(torch.tensor([[0.95, 0.05]], dtype=torch.float64), dim=1)  # a class-1 row among class 0
    loss, with_memory = mine(e, labels, "batch-hard", 0.2, memory_embeddings=mem, memory_labels=torch.tensor([1]))
    assert with_memory.batch_hard_loss == pytest.approx(alone.batch_hard_loss, abs=1e-12)
    assert loss.item() > alone.loss + 0.1  # the memory row is a much harder negative for class 0


def test_memory_bad_arguments():
    e, labels = _emb(4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError):
        mine(e, labels, "batch-hard", 0.2, memory_embeddings=_emb(3))
    with pytest.raises(ValueError):
        mine(e, labels, "batch-hard", 0.2, memory_embeddings=_emb(3, d=4), memory_labels=torch.zeros(3))
    with pytest.raises(ValueError):
        mine(e, labels, "batch-hard", 0.2, memory_embeddings=_emb(3), memory_labels=torch.zeros(2))


@pytest.mark.parametrize("fallback", ["hardest", "easiest"])
@pytest.mark.parametrize("margin", [0.05, 0.5, 1.5])
def test_semi_hard_fallbacks_and_margins(fallback, margin):
    """Several seeds and margins so both branches (a farther negative exists / fallback) occur."""
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 4 + [3] * 4)
    for seed in range(2):
        e = _emb(len(labels), seed=100 + seed)
        _compare(e, labels, "semi-hard", margin, "euclidean", fallback)
        _compare(e, labels, "batch-all", margin, "squared-euclidean", fallback)


def test_fallback_branch_is_exercised():
    """Tight clusters of other classes closer than the positives: the fallback matters."""
    labels = torch.tensor([0, 0, 1, 1, 1])
    e = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.6, 0.8], [0.8, 0.6], [1.0, 0.0]], dtype=torch.float64)
    hardest, _ = mine(e, labels, "semi-hard", 0.2, fallback="hardest")
    easiest, _ = mine(e, labels, "semi-hard", 0.2, fallback="easiest")
    assert hardest.item() != pytest.approx(easiest.item())
    for fb in ("hardest", "easiest"):
        _compare(e, labels, "semi-hard", 0.2, "euclidean", fb)


@pytest.mark.parametrize("mode", MODES)
def test_duplicate_embeddings_have_finite_grads(mode):
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    e = _emb(len(labels), seed=7)
    e[1] = e[0]  # duplicate inside a class
    e[4] = e[0]  # duplicate across classes (negative at distance 0)
    e[8] = e[7]
    e[11] = e[10]
    groups = {}
    for i in range(len(labels)):
        key = tuple(e[i].tolist())
        groups.setdefault(key, []).append(i)
    m = torch.zeros(len(groups), len(labels), dtype=e.dtype)
    for row, idx in enumerate(groups.values()):
        m[row, idx] = 1.0
    for distance in ("euclidean", "squared-euclidean"):
        for fallback in ("hardest", "easiest"):
            _compare(e, labels, mode, 0.2, distance, fallback, group_grads=m)


@pytest.mark.parametrize("mode", MODES)
def test_nothing_valid_is_a_connected_zero(mode):
    e = _emb(6, seed=3).requires_grad_(True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6)):
        loss, stats = mine(e, labels, mode, 0.2, generator=torch.Generator().manual_seed(0))
        assert loss.item() == 0.0 and loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, e)
        assert torch.equal(grad, torch.zeros_like(e))
        assert stats.skipped_anchors == 6 and stats.num_triplets == 0
        assert stats.active_fraction == 0.0 and stats.mean_ap == 0.0 and stats.mean_an == 0.0


# ----------------------------------------------------------------------------- random mode


def test_random_negatives_have_other_labels_and_are_seeded():
    labels = torch.tensor([i % 5 for i in range(40)])
    e = _emb(40, seed=1)

    def draw(seed):
        return mine_indices(e, labels, "random", generator=torch.Generator().manual_seed(seed))

    a, p, n = draw(0)
    assert len(a) == 40 * 7  # every ordered anchor-positive pair, one negative each
    assert (labels[a] == labels[p]).all() and (a != p).all()
    assert (labels[n] != labels[a]).all()
    assert all(torch.equal(x, y) for x, y in zip(draw(0), draw(0)))
    assert not torch.equal(draw(0)[2], draw(1)[2])
    # mine() with the same seed draws the same negatives as mine_indices()
    _compare(e, labels, "random", 0.2, "euclidean", "hardest", seed=5)
    l0, _ = mine(e, labels, "random", 0.2, generator=torch.Generator().manual_seed(0))
    l1, _ = mine(e, labels, "random", 0.2, generator=torch.Generator().manual_seed(1))
    assert l0.item() != l1.item()


def test_random_negatives_are_uniform():
    """Each anchor's negatives are drawn about equally often (no bias to the first/last)."""
    labels = torch.tensor([0] * 30 + [1] * 6)
    e = _emb(36, seed=2)
    counts = torch.zeros(36)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, _, n = mine_indices(e, labels, "random", generator=g)
        counts += torch.bincount(n[labels[a] == 0], minlength=36).float()
    per_negative = counts[30:]  # 20 draws × 30 anchors × 29 positives / 6 negatives = 2900 each
    assert per_negative.sum() == 20 * 30 * 29
    assert ((per_negative - 2900).abs() < 250).all(), per_negative


def test_mine_indices_match_definitions():
    labels = LABELS["uneven"]()
    e = _emb(len(labels), seed=4)
    d = pairwise_distances(e)
    a, p, n = mine_indices(e, labels, "batch-hard")
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        same = labels == labels[i]
        assert d[i, j] == d[i][same & (torch.arange(len(labels)) != i)].max()
        assert d[i, k] == d[i][~same].min()
    for fallback in ("hardest", "easiest"):
        a, p, n = mine_indices(e, labels, "semi-hard", fallback=fallback)
        for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
            negs = d[i][labels != labels[i]]
            farther = negs[negs > d[i, j]]
            if len(farther):
                assert d[i, k] == farther.min()
            else:
                assert d[i, k] == (negs.min() if fallback == "hardest" else negs.max())
    with pytest.raises(ValueError):
        mine_indices(e, labels, "batch-all")


# ----------------------------------------------------------------------------- collapse, dtypes, errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_collapsed_embeddings_give_the_margin(mode, dtype):
    labels = torch.tensor([i % 4 for i in range(32)])
    e = F.normalize(torch.ones(32, 16, dtype=dtype), dim=1).requires_grad_(True)
    loss, stats = mine(e, labels, mode, 0.3, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    assert stats.batch_hard_loss == pytest.approx(0.3, abs=1e-6)
    assert stats.embedding_spread == pytest.approx(0.0, abs=1e-6)
    assert stats.active_fraction == 1.0
    assert torch.isfinite(torch.autograd.grad(loss, e)[0]).all()


def test_spread_of_spread_embeddings():
    e = _emb(2000, d=64, seed=0)
    _, stats = mine(e, torch.arange(2000) % 10, "batch-hard", 0.2)
    assert stats.embedding_spread == pytest.approx(1.0, abs=0.02)
    assert isinstance(stats, MiningStats)
    with pytest.raises(AttributeError):
        stats.loss = 1.0  # frozen


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_embeddings(mode):
    labels = LABELS["four-classes"]()
    e64 = _emb(len(labels), seed=9)
    e = e64.to(torch.bfloat16).requires_grad_(True)
    loss, stats = mine(e, labels, mode, 0.2, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, e)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    ref, _ = mine(e.detach().double(), labels, mode, 0.2, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-4)


def test_pairwise_distances():
    e = _emb(10, seed=11)
    d = pairwise_distances(e)
    ref = torch.cdist(e, e)
    off = ~torch.eye(10, dtype=torch.bool)
    torch.testing.assert_close(d[off], ref[off])
    torch.testing.assert_close(pairwise_distances(e, "squared-euclidean")[off], ref[off] ** 2)
    assert (d.diagonal() == math.sqrt(SQRT_EPS)).all()


def test_bad_arguments():
    e, labels = _emb(4), torch.tensor([0, 0, 1, 1])
    for kwargs in (
        {"mode": "hardest"},
        {"mode": "batch-all", "distance": "cosine"},
        {"mode": "semi-hard", "fallback": "middle"},
    ):
        with pytest.raises(ValueError):
            mine(e, labels, margin=0.2, **kwargs)
    with pytest.raises(ValueError):
        mine(e, labels[:3], "batch-all", 0.2)
    with pytest.raises(ValueError):
        mine(e[:0], labels[:0], "batch-all", 0.2)


@pytest.mark.parametrize("mode", MODES)
def test_single_sample_batch(mode):
    e = _emb(1).requires_grad_(True)
    loss, stats = mine(e, torch.tensor([3]), mode, 0.2)
    assert loss.item() == 0.0 and stats.skipped_anchors == 1
    loss.backward()


# ----------------------------------------------------------------------------- memory shape


@pytest.mark.parametrize(
    "labels",
    [torch.arange(2000) // 1000, torch.arange(2000) // 4],
    ids=["2000-two-classes", "500-classes-of-4"],
)
def test_memory_is_quadratic(labels):
    b = len(labels)
    e = F.normalize(torch.randn(b, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    for mode in MODES:
        leaf = e.clone().requires_grad_(True)
        probe = MaxNumel()
        with probe:
            loss, _ = mine(leaf, labels, mode, 0.2, generator=torch.Generator().manual_seed(0))
            loss.backward()
        assert torch.isfinite(leaf.grad).all()
        assert probe.max_numel >= b * b  # the probe saw the B×B tensors...
        assert probe.max_numel < b**3 / 8, (mode, probe.op, probe.max_numel)  # ...and nothing cubic


@pytest.mark.parametrize("memory_classes", [2, 1000], ids=["two-classes", "classes-of-4"])
def test_memory_is_batch_times_candidates(memory_classes):
    """With M memory rows the largest tensor is O(B·(B+M)): no B×M×M or B×B×M tensor."""
    b, m = 256, 4096
    labels = torch.arange(b) % (2 if memory_classes == 2 else b // 4)
    mem_labels = torch.arange(m) % memory_classes
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(b, 16, generator=g), dim=1)
    mem = F.normalize(torch.randn(m, 16, generator=g), dim=1)
    for mode in MODES:
        leaf = e.clone().requires_grad_(True)
        probe = MaxNumel()
        with probe:
            loss, _ = mine(
                leaf,
                labels,
                mode,
                0.2,
                generator=torch.Generator().manual_seed(0),
                memory_embeddings=mem,
                memory_labels=mem_labels,
            )
            loss.backward()
        assert torch.isfinite(leaf.grad).all()
        assert probe.max_numel >= b * (b + m)
        assert probe.max_numel <= 2 * b * (b + m) + b, (mode, probe.op, probe.max_numel)
