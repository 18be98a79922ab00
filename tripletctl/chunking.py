"""Chunked gradient caching: full-batch mining at the memory cost of one chunk.

Triplet mining needs every embedding of the batch at once (hardest positive / negative over 500 to
2000 rows), but keeping the encoder's activations for 2000 sequences does not fit a GPU. So a step
runs in two passes (gradient caching, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup"):

1. embed the batch chunk by chunk without an autograd graph;
2. mine and compute the loss over the whole batch, with the embeddings as a leaf, and take
   d(loss)/d(embeddings): a (B, D) matrix, tiny next to the activations;
3. re-run each chunk with the graph on and back-propagate that chunk's rows of the gradient.

The parameter gradients equal those of one full-batch pass (the loss is a function of the embeddings
only, and the chain rule splits over rows), provided the re-run reproduces pass 1 exactly: each
chunk's RNG state is replayed so dropout draws the same masks. Cost: one extra forward (~1/3 of a
step). Peak memory: one chunk's activations plus O(B·D + B²) for the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import Tensor

CPU_AUTO_CHUNK = 256
"""`chunk_size: auto` on CPU: host memory is rarely the limit there and 256 rows keep the
matmuls large enough to be efficient, so no probing (it would cost a real forward+backward)."""

AUTO_MEMORY_FRACTION = 0.7
"""Share of free GPU memory `auto` plans to fill: the rest covers the allocator's fragmentation, the
O(B²) mining matrices and activations that grow with padding beyond the probed `seq_len`."""


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The generators dropout draws from: the CPU one and, on CUDA, the current device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def embed_and_backward(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, Any]],
    chunk_size: int,
    autocast_dtype: torch.dtype | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
) -> tuple[Tensor, Any, Tensor]:
    """Embed the batch, compute `loss_fn` over all of it and accumulate parameter gradients.

    `model(input_ids, attention_mask)` must return (B, D) embeddings. The loss is computed in fp32
    outside autocast (mining compares distances that bf16 would round together). With `gather`
    (distributed), `loss_fn` sees `gather(local_embeddings)` and `labels` must be the global
    labels; its backward decides how gradients are shared between ranks. `no_sync` (DDP's
    `model.no_sync`) wraps every backward but the last, so DDP all-reduces once per step.

    Gradients are *accumulated* into `.grad` (the caller zeroes them). The RNG is left as the
    unchunked step would leave it: after the forward and the loss, as if the re-forward never ran.

    Returns (loss detached, stats from `loss_fn`, local embeddings detached, fp32).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = input_ids.device
    batch_size = input_ids.shape[0]

    def autocast() -> ContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def full_batch_loss(embeddings: Tensor) -> tuple[Tensor, Any]:
        return loss_fn(gather(embeddings) if gather is not None else embeddings, labels)

    if chunk_size >= batch_size:
        # One chunk: a plain step, no second forward needed.
        with autocast():
            embeddings = model(input_ids, attention_mask)
        embeddings = embeddings.float()
        loss, stats = full_batch_loss(embeddings)
        if loss.requires_grad:
            loss.backward()
        else:  # nothing to learn from this batch; still run backward so DDP ranks stay in step
            embeddings.backward(torch.zeros_like(embeddings))
        return loss.detach(), stats, embeddings.detach()

    # Pass 1: embeddings without a graph, remembering the RNG state each chunk started from.
    starts = range(0, batch_size, chunk_size)
    rng_states = []
    chunks = []
    with torch.no_grad(), autocast():
        for start in starts:
            rng_states.append(_rng_state(device))
            chunks.append(model(input_ids[start : start + chunk_size], attention_mask[start : start + chunk_size]))
    embeddings = torch.cat(chunks).float().requires_grad_()
    del chunks

    # Mine over the full (possibly gathered) batch; keep only d(loss)/d(local embeddings).
    loss, stats = full_batch_loss(embeddings)
    if loss.requires_grad:
        (grad,) = torch.autograd.grad(loss, embeddings, allow_unused=True, materialize_grads=True)
    else:
        grad = torch.zeros_like(embeddings)
    after_step_rng = _rng_state(device)

    # Pass 2: replay each chunk with the graph on and push its slice of the gradient through it.
    for i, start in enumerate(starts):
        _set_rng_state(rng_states[i], device)
        last = i == len(starts) - 1
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            with autocast():
                chunk_embeddings = model(
                    input_ids[start : start + chunk_size], attention_mask[start : start + chunk_size]
                )
            chunk_embeddings.backward(grad[start : start + chunk_size].to(chunk_embeddings.dtype))
    _set_rng_state(after_step_rng, device)
    return loss.detach(), stats, embeddings.detach()


def resolve_chunk_size(
    chunk_size: int | str,
    batch_size: int,
    model: torch.nn.Module,
    device: torch.device | str,
    seq_len: int,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Rows per forward chunk: an int as given (capped at the batch), or `"auto"`.

    `auto` on CUDA measures what one row costs, because activation memory depends on model, seq_len,
    dtype, attention kernel and compilation in ways no formula tracks: it runs a forward+backward of
    8 and 16 rows, takes the difference of `max_memory_allocated` per extra row (the difference
    cancels fixed costs such as the gradient buffers), then fills `AUTO_MEMORY_FRACTION` of the
    free memory (`mem_get_info` plus what the caching allocator holds unused) minus the AdamW state
    the optimiser has not allocated yet, rounded down to a multiple of 8. The probe leaves the RNG
    and existing `.grad` untouched. On CPU: `min(batch_size, CPU_AUTO_CHUNK)`.
    """
    if isinstance(chunk_size, str) and chunk_size != "auto":
        chunk_size = int(chunk_size) if chunk_size.isdigit() else chunk_size
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or 'auto', got {chunk_size}")
        return min(chunk_size, batch_size)
    if chunk_size != "auto":
        raise ValueError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return min(batch_size, CPU_AUTO_CHUNK)

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
    bytes_per_row = (large - small) / 8 if large > small else large / 16  # a flat curve: be safe
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # AdamW's exp_avg + exp_avg_sq (fp32) appear at the first optimiser step; subtracting them again
    # when they already exist only makes the chunk a little smaller.
    optimizer_state = 2 * sum(p.numel() * 4 for p in params)
    usable = AUTO_MEMORY_FRACTION * free - optimizer_state
    rows = int(usable / bytes_per_row) // 8 * 8
    return max(1, min(batch_size, rows))  # below 8 rows: still run, slowly, rather than refuse
