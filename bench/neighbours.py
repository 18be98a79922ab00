"""What `batch_classes: neighbours` costs per step, against the training step it rides on (issue 32).

Per step the lever adds (a) the centroid update: the global batch's embeddings, normalised, summed per
class with a one-hot matmul (train/class_centroids.py), (b) every R steps a snapshot (normalise and
copy classes × dim; shown per step, divided by R), and (c) the class choice in the batcher thread:
hash the ready classes, then one (ready × dim) product per group (data/neighbours.py). The step is a
MiniLM-size BERT (6 layers, 384 wide, random weights: weights do not change the speed) embedding,
mining (batch-hard) and back-propagating a batch of --batch rows of --length tokens, then AdamW. All
in one process, so the ratio is of the same machine at the same moment.

    nice -n 10 python bench/neighbours.py                     # batch 512 on CPU, 10,000 classes
    python bench/neighbours.py --device cuda --classes 100000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def lever_costs(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from tripletctl.data.neighbours import choose_classes
    from tripletctl.data.stream import label_id
    from tripletctl.train.class_centroids import ClassCentroids

    dim, slots = 384, args.batch // 4
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([label_id(f"class {c}") for c in range(args.classes)])  # as the stream hashes labels
    centroids = ClassCentroids(refresh=args.refresh, device=device)
    for start in range(0, args.classes, 4096):  # every class seen once
        labels = ids[start : start + 4096]
        centroids.add(torch.randn(len(labels), dim, generator=g).to(device), labels.to(device))
    embeddings = torch.randn(args.batch, dim, generator=g).to(device)
    batch_labels = ids[torch.randint(0, args.classes, (slots,), generator=g)].repeat_interleave(4).to(device)
    snapshot = centroids.snapshot()
    ready = [f"class {c}" for c in np.random.default_rng(0).choice(args.classes, 4 * slots, replace=False)]

    def choose():
        choose_classes([label_id(label) for label in ready], snapshot, slots, 0.5, 4)

    return {
        "centroid update": _timed(lambda: centroids.add(embeddings, batch_labels), args.repeats),
        "snapshot / R": _timed(centroids.snapshot, args.repeats) / args.refresh,
        "class choice": _timed(choose, args.repeats),
    }


def step_cost(args: argparse.Namespace, device: torch.device) -> float:
    from transformers import BertConfig, BertModel

    from tripletctl.model.encoder import TripletEncoder
    from tripletctl.train import mining

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = TripletEncoder(BertModel(config), pooling="mean").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.length), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.arange(args.batch // 4).repeat_interleave(4).to(device)

    def step():
        loss, _ = mining.mine(model(ids, mask), labels, mode="batch-hard", margin=0.2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--length", type=int, default=24, help="tokens a row")
    parser.add_argument("--classes", type=int, default=10_000, help="classes with a centroid")
    parser.add_argument("--refresh", type=int, default=20, help="data.neighbour_refresh")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each lever part")
    args = parser.parse_args()
    device = torch.device(args.device)
    lever = lever_costs(args, device)
    step = step_cost(args, device)
    print(f"batch {args.batch} x {args.length} tokens, {args.classes:,} classes, R={args.refresh}, {device}")
    print(f"{'training step':>16}: {1000 * step:9.1f} ms")
    for name, seconds in lever.items():
        print(f"{name:>16}: {1000 * seconds:9.2f} ms  ({100 * seconds / step:.2f}% of a step)")
    total = sum(lever.values())
    print(f"{'lever, total':>16}: {1000 * total:9.2f} ms  ({100 * total / step:.2f}% of a step)")


if __name__ == "__main__":
    main()
