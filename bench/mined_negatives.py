"""What `mined_negatives` costs, against the training step it rides on (issue 32, item 5).

Per step the lever adds `MinedTable.extend`: each class of the batch looks up its mined rows and their
token ids are appended (train/mined_negatives.py); the mined rows take the place of corpus rows in
batch_size, so the step embeds no more texts than without the lever. When the phase starts, a pass
embeds the pool without gradient and mines it (`mine_pool`: classes × pool scores, a chunk of classes
at a time): shown as its share of a phase of --phase-steps steps. The step is bench/neighbours.py's:
a MiniLM-size BERT (6 layers, 384 wide, random weights) embedding, mining (batch-hard) and
back-propagating a batch of --batch rows of --length tokens, then AdamW; the pool's forward pass is
timed on the same model and scaled to --pool rows. All in one process: the ratios are of one machine
at one moment.

    nice -n 10 python bench/mined_negatives.py               # batch 510 (85 classes x (4 + 2)) on CPU
    python bench/mined_negatives.py --device cuda --pool 200000 --classes 50000
"""

from __future__ import annotations

import argparse

import torch
from neighbours import _timed, step_cost

from tripletctl.config.mined_negatives import MinedNegativesConfig, stream_rows
from tripletctl.data.stream import Batch, label_id
from tripletctl.train.mined_negatives import MinedTable, mine_pool


def extend_cost(args: argparse.Namespace, config: MinedNegativesConfig) -> float:
    """Seconds of one `extend` of a batch of --batch texts over a table of --classes classes."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([label_id(f"class {c}") for c in range(args.classes)])
    rows = args.classes * config.per_class
    lengths = torch.full((rows,), args.length)
    table = MinedTable(
        class_ids=ids,
        negatives=torch.arange(rows).view(args.classes, config.per_class),
        reserve=torch.arange(256),
        row_tokens=torch.randint(1000, 30000, (rows * args.length,), generator=g),
        row_lengths=lengths,
        row_labels=ids.repeat_interleave(config.per_class).roll(1),
    )
    drawn = stream_rows(args.batch, 4, config)
    labels = ids[torch.randperm(args.classes, generator=g)[: drawn // 4]].repeat_interleave(4)
    batch = Batch(
        token_ids=torch.randint(1000, 30000, (drawn * args.length,), generator=g),
        lengths=torch.full((drawn,), args.length),
        labels=labels,
        state={},
        rows_seen=0,
        rows_skipped=0,
        classes_evicted=0,
        index=0,
    )
    return _timed(lambda: table.extend(batch, 4, seed=0), args.repeats)


def pass_cost(args: argparse.Namespace, config: MinedNegativesConfig, device: torch.device) -> dict[str, float]:
    """Seconds of the phase-start pass over --pool rows: the forward pass (timed on 256 rows, scaled)
    and the mining over its embeddings."""
    from transformers import BertConfig, BertModel

    from tripletctl.model.encoder import TripletEncoder

    bert = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = TripletEncoder(BertModel(bert), pooling="mean").to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (256, args.length), generator=g).to(device)

    def forward():
        with torch.no_grad():
            model(ids, torch.ones_like(ids))

    embeddings = torch.randn(args.pool, 384, generator=g)
    labels = torch.randint(0, args.classes, (args.pool,), generator=g)
    return {
        "forward": _timed(forward, 2) * args.pool / 256,
        "mining": _timed(lambda: mine_pool(embeddings, labels, config, torch.Generator().manual_seed(0)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=510, help="batch_size: a multiple of 4 + --per-class")
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--length", type=int, default=24, help="tokens a row")
    parser.add_argument("--classes", type=int, default=5_000, help="classes of the pool")
    parser.add_argument("--pool", type=int, default=20_000, help="pool_rows")
    parser.add_argument("--phase-steps", type=int, default=1_000, help="steps of the phase the pass opens")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of extend")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = MinedNegativesConfig(per_class=args.per_class, pool_rows=args.pool)
    extend = extend_cost(args, config)
    start = pass_cost(args, config, device)
    step = step_cost(
        argparse.Namespace(**{**vars(args), "batch": args.batch // 4 * 4}), device
    )  # its labels: 4 a class
    phase = args.phase_steps * step
    print(f"batch {args.batch} x {args.length} tokens, {args.per_class} mined a class, {device}")
    print(f"{'training step':>16}: {1000 * step:9.1f} ms")
    print(f"{'extend':>16}: {1000 * extend:9.2f} ms  ({100 * extend / step:.2f}% of a step)")
    print(
        f"pool of {args.pool:,} rows, {args.classes:,} classes, a phase of {args.phase_steps:,} steps ({phase:,.0f} s):"
    )
    for name, seconds in start.items():
        print(f"{name:>16}: {seconds:9.1f} s   ({100 * seconds / phase:.2f}% of the phase)")
    total = sum(start.values())
    print(f"{'pass, total':>16}: {total:9.1f} s   ({100 * total / phase:.2f}% of the phase)")


if __name__ == "__main__":
    main()
