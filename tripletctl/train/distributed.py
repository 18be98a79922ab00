"""torchrun support: process group, differentiable all-gather of embeddings, DDP, rank-0 I/O.

The curriculum's `batch_size` is the *global* batch. Each rank embeds `batch_size // world_size`
rows of its own shard, the embeddings are all-gathered *with gradients* so that mining sees the
whole global batch, and every rank computes the same loss L on it.

Gradient scale (checked numerically in tests/test_distributed.py): the backward of
`torch.distributed.nn.functional.all_gather` *sums* the incoming gradients of every rank
(reduce-scatter with SUM on NCCL, all-to-all + sum on gloo). Every rank back-propagates the same L,
so the gradient reaching rank r's local embeddings is world_size * dL/de_r. DDP then *averages*
parameter gradients over ranks: (1/W) * sum_r W * dL/de_r * de_r/dtheta = dL/dtheta, exactly the
single-process gradient on the global batch. No rescaling is needed, and none must be added.

Everything here is a no-op (identity) in a single process, so the runner calls it unconditionally.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tripletctl.core.errors import TripletctlError

# Long enough for rank 0 to write a checkpoint or run an evaluation while the others wait.
_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. `world_size == 1` means a plain single process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, metrics and the console output."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise TripletctlError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device: str, local_rank: int, world_size: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise TripletctlError(f"train.device must be auto, cpu or cuda, not {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TripletctlError("train.device is cuda but no CUDA device is available")
    count = torch.cuda.device_count()
    if world_size > 1 and local_rank >= count:
        raise TripletctlError(
            f"LOCAL_RANK={local_rank} but this node has only {count} CUDA device(s): "
            f"use torchrun --nproc_per_node={count} (at most one process per GPU)"
        )
    return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), or return a single-process context when WORLD_SIZE is absent or 1.

    NCCL on CUDA (each process pinned to GPU `local_rank`), gloo on CPU. Safe to call twice:
    an already initialised group (e.g. set up by a test) is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    torch_device = _pick_device(device, local_rank, world_size)
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=torch_device)
    if not dist.is_available():
        raise TripletctlError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not 0 <= rank < world_size:
        raise TripletctlError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise TripletctlError(
                f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: "
                "launch with torchrun (python -m torch.distributed.run)"
            )
        if torch_device.type == "cuda":
            dist.init_process_group("nccl", timeout=_TIMEOUT, device_id=torch_device)
        else:
            dist.init_process_group("gloo", timeout=_TIMEOUT)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def local_batch_size(batch_size: int, samples_per_class: int, ctx: DistContext) -> int:
    """Rows this rank contributes to a global batch of `batch_size`: each rank builds whole
    classes of `samples_per_class` rows, so the global batch must split into them evenly."""
    unit = ctx.world_size * samples_per_class
    if batch_size % unit:
        lower, upper = batch_size // unit * unit, (batch_size // unit + 1) * unit
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise TripletctlError(
            f"batch_size {batch_size} is the global batch and must be divisible by world size "
            f"x samples_per_class = {ctx.world_size} x {samples_per_class} = {unit} "
            f"(whole classes on every rank); use {suggestion}"
        )
    return batch_size // ctx.world_size


def _gather_sizes(n: int, ctx: DistContext, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def gather_with_grad(local: Tensor, ctx: DistContext) -> Tensor:
    """All-gather `local` (rows first) from every rank, concatenated in rank order, keeping the
    autograd graph: the backward sums every rank's gradient for our rows (see module docstring).

    Ranks may hold different numbers of rows (padded to the largest, then trimmed), at the
    cost of one tiny extra all-gather of the sizes. Identity in a single process.
    """
    if not ctx.enabled:
        return local
    sizes = _gather_sizes(local.shape[0], ctx, local.device)
    largest = max(sizes)
    gathered = _all_gather_autograd(_pad_rows(local, largest).contiguous())
    if all(n == largest for n in sizes):
        return gathered
    return torch.cat([gathered[r * largest : r * largest + n] for r, n in enumerate(sizes)])


def _all_gather_autograd(t: Tensor) -> Tensor:
    """(W*n, ...) from every rank's (n, ...), differentiable; the backward is a SUM reduce-scatter.

    torch >= 2.13 deprecates `torch.distributed.nn.functional.all_gather` in favour of the
    functional collective `all_gather_single` (one all-gather forward, one reduce-scatter backward,
    on gloo as on NCCL); older torch only has the former (backward: reduce-scatter on NCCL,
    all-to-all + sum on gloo). Both sum, which tests/test_distributed.py checks.
    """
    try:
        from torch.distributed._functional_collectives import all_gather_single
    except ImportError:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t))
    gathered = all_gather_single(t, 0, dist.group.WORLD)
    wait = getattr(gathered, "wait", None)  # AsyncCollectiveTensor: materialise before slicing
    return wait() if wait is not None else gathered


@torch.no_grad()
def gather_labels(local: Tensor, ctx: DistContext) -> Tensor:
    """All-gather labels (no gradient), in the same rank order as `gather_with_grad`.

    Labels must be globally consistent ids: the same class on two ranks must carry the same id
    and different classes different ids, or mining pairs strangers as positives.
    """
    if not ctx.enabled:
        return local
    device = ctx.device if ctx.device.type == "cuda" else local.device
    moved = local.to(device)
    sizes = _gather_sizes(moved.shape[0], ctx, device)
    padded = _pad_rows(moved, max(sizes))
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(local.device)


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel when enabled (the model must already be on ctx.device); the model
    itself otherwise. DDP broadcasts rank 0's parameters at construction, so every rank starts
    from identical weights even if their initialisation differed.

    find_unused_parameters=False: every parameter must receive a gradient each step (a BERT
    pooler that the pooling does not use must not be in the model), or DDP raises on the next
    step. Buffers are not re-broadcast at every forward: the encoder has no running statistics
    and gradient caching runs several forwards per step.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        find_unused_parameters=False,
        static_graph=False,
        forward_sync_buffers=False,
    )


def no_sync_for(model: torch.nn.Module) -> Callable[[], AbstractContextManager] | None:
    """`model.no_sync` for DDP (skip the gradient all-reduce on all but the last backward of a
    gradient-cached step), None for a plain model."""
    return getattr(model, "no_sync", None)


def _reduce(value: float, ctx: DistContext, op: dist.ReduceOp) -> float:
    if not ctx.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sums(values: list[float | bool | int], ctx: DistContext) -> list[float]:
    """Sum several numbers over ranks in one collective (the runner's per-step counters and flags:
    a flag summed over ranks is > 0 when any rank raised it)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    packed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def all_reduce_max(value: float, ctx: DistContext) -> float:
    """Max over ranks, e.g. step time (the slowest rank sets the pace)."""
    return _reduce(value, ctx, dist.ReduceOp.MAX)


def gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` in a single process). For the
    per-rank data-stream states that rank 0 must save so that every rank can resume its shard."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank, e.g. a decision (stop, resume path) taken on rank 0."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_world_size(saved: int | None, ctx: DistContext) -> None:
    """Refuse to resume a checkpoint written with another number of processes: the global batch
    is split into per-rank shards and per-rank stream positions, which do not map onto another
    world size. `None` (not recorded) is read as a single-process checkpoint."""
    saved = 1 if saved is None else int(saved)
    if saved == ctx.world_size:
        return

    def launch(n: int) -> str:
        return "a single process (no torchrun)" if n == 1 else f"{n} processes (torchrun, e.g. --nproc_per_node={n})"

    raise TripletctlError(
        f"cannot resume: the checkpoint was written by {launch(saved)}, but this run has "
        f"world size {ctx.world_size}. Each rank resumes its own shard of the data stream, so "
        f"resume with world size {saved}, or start a new run (another train.output_dir) to "
        f"train with world size {ctx.world_size}."
    )


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. for rank 0 to finish writing a checkpoint)."""
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (torchrun warns about leaked NCCL communicators otherwise). Unreachable
    DDP wrappers are collected first: a reducer that outlives the group destroys it later, and a gloo
    group destroyed that way can hang in its destructor, joining its worker threads (seen once in
    tests/test_distributed.py's worker on rank 1, torch 2.13: the run never exited)."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
