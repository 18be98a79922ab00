"""What the embedding all-gather costs per step, next to the mining loss it feeds.

Every rank holds B / world_size embeddings of width D. A step all-gathers them (forward) and
reduce-scatters their gradient (backward); mining then runs on the whole (B, D) batch on every rank.
This times both on the same batch and prints their ratio and the bytes each rank receives.

    python bench/gather.py                       # 2 gloo processes on CPU, B=2000, D=768 and 128
    python bench/gather.py --nproc 8 --backend nccl   # one process per GPU

Launches its own processes (torch.multiprocessing, a free TCP port); no torchrun needed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tripletctl.train import distributed as D
from tripletctl.train.mining import mine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of `fn()` over `iters` runs, ranks started together by a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(args.threads)
    ctx = D.init_distributed("cuda" if args.backend == "nccl" else "cpu")
    device = ctx.device
    local_rows = args.batch // ctx.world_size
    g = torch.Generator().manual_seed(rank)
    for dim in args.dims:
        local = torch.nn.functional.normalize(torch.randn(local_rows, dim, generator=g), dim=-1).to(device)
        # Whole classes of 4, ids globally distinct (rank-offset), like batching.py's class-balanced batches.
        labels = (torch.arange(local_rows) // 4 + rank * local_rows).to(device)
        global_labels = D.gather_labels(labels, ctx)
        upstream = torch.randn(args.batch, dim, generator=g).to(device)  # stands in for dL/dE

        def gather_step(local: torch.Tensor = local, upstream: torch.Tensor = upstream) -> None:
            leaf = local.clone().requires_grad_()
            D.gather_with_grad(leaf, ctx).backward(upstream)

        full = D.gather_with_grad(local, ctx).detach()

        def mining_step(mode: str, full: torch.Tensor = full, global_labels: torch.Tensor = global_labels) -> None:
            leaf = full.clone().requires_grad_()
            loss, _ = mine(leaf, global_labels, mode, 0.2)
            loss.backward()

        gather_s = _time(gather_step, device, args.warmup, args.iters)
        mining_s = {mode: _time(partial(mining_step, mode), device, args.warmup, args.iters) for mode in args.modes}
        gather_s = D.all_reduce_max(gather_s, ctx)  # the slowest rank sets the pace
        mining_s = {m: D.all_reduce_max(s, ctx) for m, s in mining_s.items()}
        if ctx.is_main:
            element = local.element_size()
            # all_gather: each rank receives the other ranks' rows; the backward moves as much again.
            received = 2 * (ctx.world_size - 1) * local_rows * dim * element
            label_bytes = (ctx.world_size - 1) * local_rows * 8
            ratios = "  ".join(
                f"{m} {s * 1e3:7.1f} ms (gather/mining {gather_s / s:5.1%})" for m, s in mining_s.items()
            )
            print(
                f"{args.backend:5s} world={ctx.world_size} B={args.batch} D={dim:4d}  "
                f"gather fwd+bwd {gather_s * 1e3:7.2f} ms  "
                f"received/rank/step {received / 2**20:6.2f} MiB (+{label_bytes / 2**10:.1f} KiB labels)  "
                f"{ratios}",
                flush=True,
            )
    D.barrier(ctx)
    D.cleanup(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks); one per GPU with nccl")
    parser.add_argument(
        "--backend", choices=("gloo", "nccl"), default=None, help="default: nccl when CUDA is available, gloo otherwise"
    )
    parser.add_argument("--batch", type=int, default=2000, help="global batch B")
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 128])
    parser.add_argument("--modes", nargs="+", default=["batch-hard", "semi-hard"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    args = parser.parse_args()
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.batch % args.nproc:
        parser.error("--batch must be divisible by --nproc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
