"""The GPU path: bf16 mining, chunked gradient caching under autocast, the chunk probe, kept graphs,
memory flat in the batch, fused AdamW, torch.compile and exact resume, on a CUDA device.

Every test here is marked `cuda` and skips without a CUDA device (tests/conftest.py).
`bench/gpu_check.py` runs them on a GPU; its `--smoke` runs them on the CPU with
TRIPLETCTL_CUDA_TESTS_ON_CPU=1 (the few that only mean something on CUDA still skip there), so this
file is exercised by the CPU suite too and cannot rot between GPU runs.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import TINY_BERT, final_weights, write_curriculum
from torch import Tensor
from transformers import AutoConfig, AutoModel, BertConfig

from tripletctl.model.chunking import Chunking, embed_and_backward, plan_chunks, resolve_chunking
from tripletctl.model.compiled import CompiledOrEager
from tripletctl.model.encoder import TripletEncoder
from tripletctl.train import mining

pytestmark = pytest.mark.cuda

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
needs_real_cuda = pytest.mark.skipif(not ON_CUDA, reason="measures CUDA memory or kernels: only on a GPU")
MODES = mining.MODES
PER_CLASS = 4


@pytest.fixture(autouse=True)
def quiet_cpu():
    """On the CPU fallback: one thread (a shared 2-core machine)."""
    threads = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dropout: bool = True, config: BertConfig | None = None, head: tuple[int, ...] = (32,)) -> TripletEncoder:
    config = config or AutoConfig.from_pretrained(TINY_BERT)
    if not dropout:
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    return TripletEncoder(encoder, pooling="mean", head=head, normalize=True).to(DEVICE).train()


def make_batch(rows: int, width: int, vocab: int = 981, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded random ids with ragged lengths, labels in classes of PER_CLASS, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, width), generator=g)
    lengths = torch.randint(max(2, width // 4), width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    labels = torch.arange(rows) % max(1, rows // PER_CLASS)
    return (ids * mask).to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def loss_for(mode: str):
    return partial(mining.mine, mode=mode, margin=0.2, generator=torch.Generator(DEVICE).manual_seed(7))


def grads(model: torch.nn.Module) -> dict[str, Tensor]:
    out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """||got - want|| / ||want|| over the whole model's gradient."""
    assert got.keys() == want.keys() and want
    diff = torch.cat([(got[n] - w).flatten() for n, w in want.items()]).norm()
    return float(diff / torch.cat([w.flatten() for w in want.values()]).norm())


def bf16() -> torch.dtype:
    return torch.bfloat16


# ------------------------------------------------------------------------------- mining in bf16 training


@pytest.mark.parametrize("mode", [m for m in MODES if m != "random"])
def test_device_mining_matches_fp64_even_inside_autocast(mode):
    """Mining on the device (fp32, also when called inside a bf16 autocast region) gives the loss and
    statistics of the same mining in fp64 on the CPU: the distances are never rounded to bf16."""
    g = torch.Generator().manual_seed(3)
    rows = 512
    embeddings = torch.nn.functional.normalize(torch.randn(rows, 64, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(rows) % (rows // PER_CLASS)
    want, want_stats = mining.mine(embeddings, labels, mode=mode, margin=0.2)
    on_device = embeddings.float().to(DEVICE)
    got, stats = mining.mine(on_device, labels.to(DEVICE), mode=mode, margin=0.2)
    with torch.autocast(device_type=DEVICE.type, dtype=bf16()):
        in_autocast, _ = mining.mine(on_device, labels.to(DEVICE), mode=mode, margin=0.2)
    assert got.dtype == torch.float32 and in_autocast.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert float(in_autocast) == pytest.approx(float(got), rel=1e-6, abs=1e-7)
    assert stats.active_fraction == pytest.approx(want_stats.active_fraction, abs=2 / rows)
    assert stats.batch_hard_loss == pytest.approx(want_stats.batch_hard_loss, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("mode", ["semi-hard", "batch-hard"])
def test_a_bf16_autocast_step_follows_the_fp32_step(mode):
    """The whole step (encoder in bf16 autocast, pooling and mining in fp32) gives the fp32 step's
    loss to bf16 precision and a gradient pointing the same way."""
    model = make_model(dropout=False)
    ids, mask, labels = make_batch(128, 24)
    loss32, _, emb32 = embed_and_backward(model, ids, mask, labels, loss_for(mode), Chunking(rows=32))
    want = grads(model)
    loss16, _, emb16 = embed_and_backward(
        model, ids, mask, labels, loss_for(mode), Chunking(rows=32), autocast_dtype=bf16()
    )
    got = grads(model)
    assert emb16.dtype == torch.float32
    assert float((emb16 - emb32).norm(dim=1).max()) < 0.05
    assert float(loss16) == pytest.approx(float(loss32), abs=0.02)
    flat_got = torch.cat([g.flatten() for g in got.values()])
    flat_want = torch.cat([g.flatten() for g in want.values()])
    assert float(torch.nn.functional.cosine_similarity(flat_got, flat_want, dim=0)) > 0.9


# ------------------------------------------------------------------------------- chunked gradient caching


@pytest.mark.parametrize("mode", MODES)
def test_chunked_gradient_caching_under_autocast_matches_the_unchunked_step(mode):
    """Dropout off, bf16 autocast: gradient caching over chunks of 8 rows (two passes) gives the
    gradient of one unchunked pass over the whole batch, to bf16 rounding."""
    model = make_model(dropout=False)
    ids, mask, labels = make_batch(48, 16)
    embed_and_backward(model, ids, mask, labels, loss_for(mode), Chunking(rows=48), autocast_dtype=bf16())
    want = grads(model)
    embed_and_backward(model, ids, mask, labels, loss_for(mode), Chunking(rows=8), autocast_dtype=bf16())
    got = grads(model)
    assert relative_error(got, want) < 0.03


@pytest.mark.parametrize("mode", ["semi-hard", "batch-hard"])
def test_the_re_forward_replays_the_device_rng_for_dropout(mode):
    """Dropout on: the gradient-cached step (pass 1 without graph, re-forward with the RNG replayed)
    equals the same chunks forwarded once with their graphs kept, on the device's generator."""
    model = make_model(dropout=True)
    ids, mask, labels = make_batch(48, 16)
    plan = plan_chunks(mask.sum(1), Chunking(tokens=200))
    assert len(plan.chunks) > 1 and not plan.keep_graph
    torch.manual_seed(11)
    kept_loss, _, _ = embed_and_backward(
        model, ids, mask, labels, loss_for(mode), dataclasses.replace(plan, keep_graph=True), autocast_dtype=bf16()
    )
    kept = grads(model)
    torch.manual_seed(11)
    cached_loss, _, _ = embed_and_backward(model, ids, mask, labels, loss_for(mode), plan, autocast_dtype=bf16())
    cached = grads(model)
    assert float(cached_loss) == pytest.approx(float(kept_loss), rel=1e-3, abs=1e-4)
    assert relative_error(cached, kept) < 0.02


def test_kept_graphs_forward_each_chunk_once_and_cached_ones_twice():
    """When the chunks fit the budget the step keeps their graphs: one forward per chunk, no
    re-forward; `auto` keeps them for a batch that fits the device."""
    model = make_model(dropout=False)
    calls: list[int] = []
    model.encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0] if args else 0))
    ids, mask, labels = make_batch(64, 16)
    kept = plan_chunks(mask.sum(1), Chunking(tokens=4096, overhead_tokens=32))
    cached = plan_chunks(mask.sum(1), Chunking(tokens=160, overhead_tokens=32))
    assert kept.keep_graph and not cached.keep_graph
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), kept, autocast_dtype=bf16())
    assert len(calls) == len(kept.chunks)
    calls.clear()
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), cached, autocast_dtype=bf16())
    assert len(calls) == 2 * len(cached.chunks)
    auto = resolve_chunking("auto", None, 64, model, DEVICE, 16, autocast_dtype=bf16())
    assert plan_chunks(mask.sum(1), auto).keep_graph


# ------------------------------------------------------------------------------- the probe and memory


MID_BERT = dict(
    vocab_size=981,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=128,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def step_peak_bytes(model: TripletEncoder, rows: int, width: int, chunking: Chunking) -> int:
    """Peak CUDA memory of one step above what was allocated before it (gradient buffers included)."""
    ids, mask, labels = make_batch(rows, width)
    mask = torch.ones_like(mask)  # full rows: every chunk costs what the budget says
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), chunking, autocast_dtype=bf16())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak


@needs_real_cuda
def test_the_chunk_probe_predicts_what_a_step_takes_and_leaves_rng_and_grads_alone():
    model = make_model(config=BertConfig(**MID_BERT))
    before = torch.cuda.get_rng_state()
    chunking = resolve_chunking("auto", None, 100_000, model, DEVICE, 64, autocast_dtype=bf16())
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    assert chunking.tokens % 64 == 0 and chunking.tokens >= 64
    free, _ = torch.cuda.mem_get_info()
    assert chunking.tokens * 1 <= free  # at least a byte per token: the budget is not absurd
    # bytes per token measured by a real 64-row step against the probe's own estimate
    from tripletctl.model.chunking import _probe_bytes_per_row

    per_row = _probe_bytes_per_row(model, DEVICE, 64, bf16())
    peak = step_peak_bytes(model, 64, 64, Chunking(rows=64))
    assert 0.5 * 64 * per_row <= peak <= 2.0 * 64 * per_row + 64 * 2**20, (peak, per_row)


@needs_real_cuda
def test_step_memory_is_flat_in_the_batch_with_a_fixed_chunk():
    """Gradient caching with chunks of 32 rows: the peak at batch 1024 is at most 1.25x the peak at
    batch 128 (activations are one chunk's; only the O(B*D + B^2) mining part grows)."""
    model = make_model(config=BertConfig(**MID_BERT))
    small = step_peak_bytes(model, 128, 64, Chunking(rows=32))
    large = step_peak_bytes(model, 1024, 64, Chunking(rows=32))
    naive = step_peak_bytes(model, 1024, 64, Chunking(rows=1024))
    assert large <= 1.25 * small, (small, large)
    assert naive >= 4 * small, (small, naive)  # the check can tell: one pass over 1024 rows grows


# ------------------------------------------------------------------------------- speed switches


@needs_real_cuda
def test_fused_adamw_takes_the_step_of_the_plain_one():
    """`fused=True` (one kernel for all parameters) updates the weights as the for-each AdamW does."""
    weights = []
    for fused in (False, True):
        model = make_model(dropout=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
        ids, mask, labels = make_batch(64, 16)
        for _ in range(3):
            embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), Chunking(rows=16))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, want in weights[0].items():
        torch.testing.assert_close(weights[1][name], want, rtol=1e-4, atol=1e-6, msg=name)


@needs_real_cuda
def test_a_compiled_encoder_gives_the_eager_gradient_with_gradient_caching():
    """torch.compile (inductor) under bf16 autocast with chunks of 16 rows of changing widths (two
    passes, dropout off): the gradient of the eager step, to bf16 rounding."""
    model = make_model(dropout=False)
    ids, mask, labels = make_batch(64, 24)
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), Chunking(rows=16), autocast_dtype=bf16())
    want = grads(model)
    model.encoder = CompiledOrEager(model.encoder)  # train.compile's wrapper, inductor
    for _ in range(2):  # the second call runs the compiled (possibly dynamic-shape) graphs again
        embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), Chunking(rows=16), autocast_dtype=bf16())
        got = grads(model)
    assert model.encoder.failure is None, model.encoder.failure
    got = {n.replace("encoder.module.", "encoder."): g for n, g in got.items()}
    assert relative_error(got, want) < 0.03


@needs_real_cuda
def test_a_compiled_encoder_replays_dropout_in_the_re_forward():
    """Dropout on, compiled: pass 1 (the no-grad graph) and the re-forward (the training graph) draw
    the same masks from the replayed RNG, so gradient caching equals the same chunks with graphs kept."""
    model = make_model(dropout=True)
    model.encoder = CompiledOrEager(model.encoder)
    ids, mask, labels = make_batch(48, 16)
    plan = plan_chunks(mask.sum(1), Chunking(tokens=200))
    kept_plan = dataclasses.replace(plan, keep_graph=True)
    for warm in (kept_plan, plan):  # compile every graph first
        embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), warm, autocast_dtype=bf16())
        grads(model)
    torch.manual_seed(11)
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), kept_plan, autocast_dtype=bf16())
    kept = grads(model)
    torch.manual_seed(11)
    embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), plan, autocast_dtype=bf16())
    cached = grads(model)
    assert model.encoder.failure is None, model.encoder.failure
    assert relative_error(cached, kept) < 0.02


# ------------------------------------------------------------------------------- resume on the device


def test_resume_on_the_device_gives_the_uninterrupted_run(tmp_path):
    """A three-phase run on the device, paused mid-phase (`--max-steps`) and resumed, ends with the
    weights of the run never interrupted, and logs every step once with the same losses."""

    from tripletctl.config.validate import load_curriculum
    from tripletctl.train.run import train

    # several chunks, gradient-cached; eager (the e2e run of bench/gpu_check.py resumes a compiled run)
    device = {"device": DEVICE.type, "chunk_size": "auto", "chunk_tokens": 160, "compile": False}
    straight = write_curriculum(tmp_path / "straight", checkpoint_every=3, **device)
    assert train(load_curriculum(straight)) == 0
    broken = write_curriculum(tmp_path / "broken", checkpoint_every=3, **device)
    assert train(load_curriculum(broken), max_steps=4) == 0
    assert train(load_curriculum(broken), resume=True) == 0
    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    assert a.keys() == b.keys()
    exact = DEVICE.type == "cpu"  # CUDA kernels may sum in another order between two processes
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0 if exact else 1e-3, atol=1e-6 if exact else 1e-4, msg=name)

    def losses(run: Path) -> dict[int, float]:
        records = [
            json.loads(line)
            for phase in sorted(run.glob("phase-*"))
            for line in (phase / "metrics.jsonl").read_text().splitlines()
        ]
        steps = [r for r in records if "event" not in r]
        assert len({r["global_step"] for r in steps}) == len(steps), "a step logged twice"
        return {r["global_step"]: r["loss"] for r in steps}

    want, got = losses(tmp_path / "straight" / "run"), losses(tmp_path / "broken" / "run")
    assert got.keys() == want.keys()
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-3, abs=1e-5), step


def test_unpadded_encoding_on_cuda_matches_the_padded_encoder_and_replays_dropout():
    """model.unpadded on CUDA (nested jagged tensors through SDPA): the padded encoder's embeddings
    (eval, fp32 and bf16), and gradient caching over packed chunks equals the same chunks kept."""
    ids, mask, labels = make_batch(64, 24)
    padded = make_model(dropout=False).eval()
    packed = make_model(dropout=False).eval()
    packed.unpadded = True
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, mask), padded(ids, mask), atol=1e-4, rtol=1e-3)
        with torch.autocast("cuda", dtype=bf16()):
            got, want = packed(ids, mask), padded(ids, mask)
        assert float((got - want).norm(dim=1).max()) < 0.05
    model = make_model(dropout=True)
    model.unpadded = True
    plan = plan_chunks(mask.sum(1), Chunking(tokens=400))
    assert len(plan.chunks) > 1 and not plan.keep_graph
    results = []
    for chosen in (dataclasses.replace(plan, keep_graph=True), plan):
        torch.manual_seed(3)
        embed_and_backward(model, ids, mask, labels, loss_for("batch-hard"), chosen, autocast_dtype=bf16())
        results.append(grads(model))
    assert relative_error(results[1], results[0]) < 0.02
