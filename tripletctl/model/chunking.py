"""Chunked gradient caching over length-sorted, token-budget chunks: full-batch mining at the
memory cost of one chunk, computing (almost) only real tokens.

Triplet mining needs every embedding of the batch at once (hardest positive / negative over 500 to
2000 rows), but keeping the encoder's activations for 2000 sequences does not fit a GPU. So a step
runs in two passes (gradient caching, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup"):

1. embed the batch chunk by chunk without an autograd graph;
2. mine and compute the loss over the whole batch, with the embeddings as a leaf, and take
   d(loss)/d(embeddings): a (B, D) matrix, tiny next to the activations;
3. re-run each chunk with the graph on and back-propagate that chunk's rows of the gradient.

Because the loss only sees the embeddings, which rows share a chunk is free to choose: rows are
sorted by length and packed into chunks (`plan_chunks`), each padded only to its own longest row, and
the embeddings are put back in batch order before mining. Real text is long-tailed, so one chunk
padded to the batch's longest row computes 2.5-4.5x the real tokens; packed chunks compute ~1.05x.

The parameter gradients equal those of one full-batch pass (the loss is a function of the embeddings
only, and the chain rule splits over rows), provided the re-run reproduces pass 1 exactly: each
chunk's RNG state is replayed so dropout draws the same masks. Cost: one extra forward (~1/3 of a
step), paid only when the whole batch's activations do not fit the budget; otherwise the chunks run
once with their graphs kept. Peak memory: one chunk's activations plus O(B·D + B²) for the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

CPU_AUTO_TOKENS = 4096
"""`chunk_size: auto` on CPU: a token budget of 4096 padded tokens. Host memory is rarely the limit,
but a fixed budget keeps peak memory flat in the batch size (1.0-1.1x from batch 250 to 2000, see
docs/performance.md), and 4096 tokens keep the matmuls large enough to be efficient."""

AUTO_MEMORY_FRACTION = 0.7
"""Share of free GPU memory `auto` plans to fill: the rest covers the allocator's fragmentation, the
O(B²) mining matrices and activations that grow with padding beyond the probed `seq_len`."""

CHUNK_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 4096}
"""What one more chunk costs, in tokens of work, by device type: `plan_chunks` trades it against
padding. On CPU a chunk's fixed cost (operator dispatch) is worth a few tokens, so chunks follow the
length distribution closely; a GPU launches ~100 kernels per forward whatever the chunk's size, which
costs as much as a few thousand tokens of a small encoder, so chunks stay larger there."""


@dataclass(frozen=True)
class Chunking:
    """How to cut a batch: at most `rows` rows per chunk, or at most `tokens` padded tokens
    (rows × the chunk's longest row) per chunk. Exactly one of the two is set."""

    rows: int | None = None
    tokens: int | None = None
    overhead_tokens: int = CHUNK_OVERHEAD_TOKENS["cpu"]
    keep_graphs: bool = True  # False: always gradient caching, even when the batch fits (train.keep_graphs)

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.tokens is None):
            raise ValueError(f"set exactly one of rows and tokens, got rows={self.rows}, tokens={self.tokens}")
        value = self.rows if self.rows is not None else self.tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"chunk {'rows' if self.rows is not None else 'tokens'} must be >= 1, got {value!r}")

    def describe(self) -> dict[str, int | None]:
        """For metrics.jsonl: `chunk_size` (rows) or `chunk_tokens` (budget)."""
        return {"chunk_size": self.rows, "chunk_tokens": self.tokens}


@dataclass(frozen=True)
class ChunkPlan:
    """Which rows of the batch each forward chunk holds, longest rows first, and how wide it is."""

    chunks: tuple[tuple[int, ...], ...]  # batch row indices per chunk
    widths: tuple[int, ...]  # each chunk's padded length (its longest row)
    keep_graph: bool  # all chunks' activations fit: one pass, no re-forward
    real_tokens: int
    padded_tokens: int  # per forward pass

    @property
    def order(self) -> list[int]:
        return [row for chunk in self.chunks for row in chunk]


def plan_chunks(lengths: Sequence[int] | Tensor, chunking: Chunking | int) -> ChunkPlan:
    """Sort rows by length (longest first, ties in batch order) and cut them into chunks.

    Rows: `chunking.rows` rows per chunk; the graph is kept when one chunk holds the batch (as an
    unchunked step). Tokens: the partition of the sorted rows into contiguous chunks of at most
    `chunking.tokens` padded tokens that minimises padded tokens + `overhead_tokens` per chunk (a
    row longer than the budget gets a chunk of its own); the graph is kept when all chunks together
    fit the budget, because then the activations of the whole batch fit the memory the budget
    stands for and the re-forward of gradient caching would only cost time.
    """
    if isinstance(chunking, int):
        chunking = Chunking(rows=chunking)
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ordered = [lengths[i] for i in order]
    if chunking.rows is not None:
        sizes = [min(chunking.rows, len(order) - s) for s in range(0, len(order), chunking.rows)]
    else:
        sizes = _pack(ordered, chunking.tokens, chunking.overhead_tokens)
    chunks, widths, start = [], [], 0
    for size in sizes:
        chunks.append(tuple(order[start : start + size]))
        widths.append(ordered[start] if size else 0)
        start += size
    padded = sum(len(c) * w for c, w in zip(chunks, widths))
    keep = len(chunks) <= 1 if chunking.rows is not None else padded <= chunking.tokens
    keep = keep and chunking.keep_graphs
    return ChunkPlan(tuple(chunks), tuple(widths), keep, sum(lengths), padded)


def _pack(ordered: list[int], budget: int, overhead: int) -> list[int]:
    """Rows per chunk for lengths sorted longest first (see `plan_chunks`).

    Cuts only matter where the length changes, so the search runs over groups of equal length
    (at most max_length of them): cost(groups s..e) = chunks × overhead + rows × longest, where a
    segment over the budget becomes ceil(rows / (budget // longest)) chunks. Each chosen segment is
    then cut from its longest row down, every chunk taking as many rows as the budget allows at its
    own first (longest) row, so the real cost is at most the estimate.
    """
    if not ordered:
        return []
    groups: list[list[int]] = []  # [length, count]
    for n in ordered:
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    starts = [0]
    for _, count in groups:
        starts.append(starts[-1] + count)
    best = [0.0] + [float("inf")] * len(groups)
    cut = [0] * (len(groups) + 1)
    for end in range(1, len(groups) + 1):
        for s in range(end - 1, -1, -1):
            rows, longest = starts[end] - starts[s], max(groups[s][0], 1)
            if rows * longest >= best[end]:
                break  # earlier starts only add rows and length
            per_chunk = max(1, budget // longest)
            cost = best[s] + -(-rows // per_chunk) * overhead + rows * longest
            if cost < best[end]:
                best[end], cut[end] = cost, s
    segments, end = [], len(groups)
    while end > 0:
        segments.append((starts[cut[end]], starts[end]))
        end = cut[end]
    sizes = []
    for first, last in reversed(segments):
        row = first
        while row < last:
            take = min(last - row, max(1, budget // max(ordered[row], 1)))
            sizes.append(take)
            row += take
    return sizes


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The generators dropout draws from: the CPU one and, on CUDA, the current device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def right_padded(attention_mask: Tensor) -> bool:
    """Every row's real tokens come first. Only then can a chunk be cut to its longest row without
    moving a token: left padding puts tokens at positions that depend on the width. (Packed encoding,
    varlen.py, needs the same: a row's positions are then 0..n-1, as packed rows get them.)"""
    return attention_mask.shape[1] < 2 or bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())


def _chunk_inputs(
    input_ids: Tensor, attention_mask: Tensor, rows: Tensor, width: int, trim: bool
) -> tuple[Tensor, Tensor]:
    """The chunk's rows, cut to its own longest row when the batch is right-padded."""
    ids, mask = input_ids.index_select(0, rows), attention_mask.index_select(0, rows)
    if trim and width < ids.shape[1]:
        return ids[:, :width], mask[:, :width]
    return ids, mask


def embed_and_backward(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, Any]],
    chunk_size: int | Chunking | ChunkPlan,
    autocast_dtype: torch.dtype | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> tuple[Tensor, Any, Tensor]:
    """Embed the batch, compute `loss_fn` over all of it and accumulate parameter gradients.

    `model(input_ids, attention_mask)` must return (B, D) embeddings. `chunk_size` is a row count, a
    `Chunking` (planned here from the attention mask) or a `ChunkPlan` made by the caller from
    lengths it already has. The loss is computed in fp32 outside autocast (mining compares
    distances that bf16 would round together), over embeddings in batch order whatever the chunk
    order. With `gather` (distributed), `loss_fn` sees `gather(local_embeddings)` and `labels` must
    be the global labels; its backward decides how gradients are shared between ranks. `no_sync`
    (DDP's `model.no_sync`) wraps every forward (graph kept) or backward (gradient caching) but the
    last, so DDP all-reduces once per step.

    Gradients are *accumulated* into `.grad` (the caller zeroes them). The RNG is left as the
    unchunked step would leave it: after the forward and the loss, as if the re-forward never ran.

    Returns (loss detached, stats from `loss_fn`, local embeddings detached, fp32).
    """
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk_size = Chunking(rows=chunk_size)
    plan = chunk_size if isinstance(chunk_size, ChunkPlan) else plan_chunks(attention_mask.sum(dim=1), chunk_size)
    step = _ChunkedStep(model, input_ids, attention_mask, labels, loss_fn, plan, autocast_dtype, gather, no_sync)
    if plan.keep_graph:
        return step.with_graphs_kept()
    return step.with_gradient_caching()


class _ChunkedStep:
    """One `embed_and_backward` call: the chunks of the batch, and the two ways to run them."""

    def __init__(self, model, input_ids, attention_mask, labels, loss_fn, plan, autocast_dtype, gather, no_sync):
        self.model, self.input_ids, self.attention_mask, self.labels = model, input_ids, attention_mask, labels
        self.loss_fn, self.plan, self.autocast_dtype, self.gather, self.no_sync = (
            loss_fn,
            plan,
            autocast_dtype,
            gather,
            no_sync,
        )
        self.device = input_ids.device
        self.trim = right_padded(attention_mask)
        self.rows = [torch.tensor(rows, dtype=torch.long, device=self.device) for rows in plan.chunks]
        order = torch.cat(self.rows) if self.rows else torch.empty(0, dtype=torch.long, device=self.device)
        self.restore = torch.argsort(order)  # sorted position of each batch row

    def forward(self, i: int) -> Tensor:
        autocast = (
            contextlib.nullcontext()
            if self.autocast_dtype is None
            else torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
        )
        with autocast:
            inputs = _chunk_inputs(self.input_ids, self.attention_mask, self.rows[i], self.plan.widths[i], self.trim)
            return self.model(*inputs)

    def unless_last(self, i: int) -> AbstractContextManager:
        """DDP's no_sync for every chunk but the last, so gradients are all-reduced once per step."""
        last = len(self.rows) - 1
        return self.no_sync() if (self.no_sync is not None and i != last) else contextlib.nullcontext()

    def full_batch_loss(self, embeddings: Tensor) -> tuple[Tensor, Any]:
        return self.loss_fn(self.gather(embeddings) if self.gather is not None else embeddings, self.labels)

    def with_graphs_kept(self) -> tuple[Tensor, Any, Tensor]:
        """Everything fits: one pass with the graphs kept, no second forward."""
        outputs = []
        for i in range(len(self.rows)):
            with self.unless_last(i):
                outputs.append(self.forward(i))
        embeddings = torch.cat(outputs).float()[self.restore]
        loss, stats = self.full_batch_loss(embeddings)
        if loss.requires_grad:
            loss.backward()
        else:  # nothing to learn from this batch; still run backward so DDP ranks stay in step
            embeddings.backward(torch.zeros_like(embeddings))
        return loss.detach(), stats, embeddings.detach()

    def with_gradient_caching(self) -> tuple[Tensor, Any, Tensor]:
        """Gao et al.'s gradient cache: embed without graphs, take d(loss)/d(embeddings) over the whole
        batch, then replay each chunk (same dropout, from its saved RNG state) and back-propagate it."""
        rng_states, outputs = [], []
        with torch.no_grad():  # pass 1: embeddings without a graph, remembering each chunk's RNG state
            for i in range(len(self.rows)):
                rng_states.append(_rng_state(self.device))
                outputs.append(self.forward(i))
        embeddings = torch.cat(outputs).float()[self.restore].requires_grad_()
        del outputs
        # mine over the full (possibly gathered) batch; keep only d(loss)/d(local embeddings)
        loss, stats = self.full_batch_loss(embeddings)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, embeddings, allow_unused=True, materialize_grads=True)
        else:
            grad = torch.zeros_like(embeddings)
        after_step_rng = _rng_state(self.device)
        for i, rows in enumerate(self.rows):  # pass 2: replay each chunk with its graph, push its rows' gradient
            _set_rng_state(rng_states[i], self.device)
            with self.unless_last(i):
                chunk_embeddings = self.forward(i)
                chunk_embeddings.backward(grad.index_select(0, rows).to(chunk_embeddings.dtype))
        _set_rng_state(after_step_rng, self.device)
        return loss.detach(), stats, embeddings.detach()


def _normalise_chunk_size(chunk_size: int | str) -> int | str:
    if isinstance(chunk_size, str) and chunk_size != "auto":
        chunk_size = int(chunk_size) if chunk_size.isdigit() else chunk_size
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or 'auto', got {chunk_size}")
        return chunk_size
    if chunk_size != "auto":
        raise ValueError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}")
    return chunk_size


def resolve_chunking(
    chunk_size: int | str,
    chunk_tokens: int | str | None,
    batch_size: int,
    model: torch.nn.Module,
    device: torch.device | str,
    seq_len: int,
    autocast_dtype: torch.dtype | None = None,
    keep_graphs: bool = True,
) -> Chunking:
    """The curriculum's `chunk_size` / `chunk_tokens` as a `Chunking`.

    `chunk_tokens: N` is a budget of N padded tokens per chunk; `chunk_size: N` (without
    `chunk_tokens`) keeps N rows per chunk; `auto` in either picks a token budget: on CUDA the
    probed bytes per token fill `AUTO_MEMORY_FRACTION` of free memory (rounded down to a multiple
    of 64), on CPU `CPU_AUTO_TOKENS`. `keep_graphs=False` (train.keep_graphs) makes every step
    gradient-cached, even one whose chunks fit the budget: what keeping the graphs saves, measured.
    """
    device = torch.device(device)
    overhead = CHUNK_OVERHEAD_TOKENS.get(device.type, CHUNK_OVERHEAD_TOKENS["cpu"])
    settings = {"overhead_tokens": overhead, "keep_graphs": keep_graphs}
    if chunk_tokens is None:
        chunk_size = _normalise_chunk_size(chunk_size)
        if isinstance(chunk_size, int):
            return Chunking(rows=min(chunk_size, batch_size), **settings)
        chunk_tokens = "auto"
    if isinstance(chunk_tokens, str) and chunk_tokens.isdigit():
        chunk_tokens = int(chunk_tokens)
    if isinstance(chunk_tokens, int) and not isinstance(chunk_tokens, bool) and chunk_tokens >= 1:
        return Chunking(tokens=chunk_tokens, **settings)
    if chunk_tokens != "auto":
        raise ValueError(f"chunk_tokens must be a positive integer or 'auto', got {chunk_tokens!r}")
    if device.type != "cuda":
        return Chunking(tokens=CPU_AUTO_TOKENS, **settings)
    per_token = _probe_bytes_per_row(model, device, seq_len, autocast_dtype) / seq_len
    tokens = int(_usable_bytes(model, device) / per_token) // 64 * 64
    return Chunking(tokens=max(seq_len, tokens), **settings)


def _probe_bytes_per_row(
    model: torch.nn.Module, device: torch.device, seq_len: int, autocast_dtype: torch.dtype | None
) -> float:
    """Activation bytes one row of `seq_len` tokens costs in a forward+backward, measured.

    Activation memory depends on model, seq_len, dtype, attention kernel and compilation in ways no
    formula tracks, so this runs 8 and 16 rows and takes the difference of `max_memory_allocated`
    per extra row (the difference cancels fixed costs such as the gradient buffers). The probe leaves
    the RNG and existing `.grad` untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]

    def peak_bytes(rows: int) -> int:
        for p in params:
            p.grad = None  # both probes allocate gradient buffers, so the difference cancels them
        ids = torch.ones(rows, seq_len, dtype=torch.long, device=device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(ids, torch.ones_like(ids))
        out.float().sum().backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    with torch.random.fork_rng(devices=[device], device_type="cuda"):
        small, large = peak_bytes(8), peak_bytes(16)
    for p, g in zip(params, saved_grads):
        p.grad = g
    return (large - small) / 8 if large > small else large / 16  # a flat curve: be safe


def _usable_bytes(model: torch.nn.Module, device: torch.device) -> float:
    """`AUTO_MEMORY_FRACTION` of free memory (`mem_get_info` plus what the caching allocator holds
    unused) minus the AdamW state the optimiser has not allocated yet."""
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # AdamW's exp_avg + exp_avg_sq (fp32) appear at the first optimiser step; subtracting them again
    # when they already exist only makes the chunk a little smaller.
    optimizer_state = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return max(AUTO_MEMORY_FRACTION * free - optimizer_state, 0.0)
