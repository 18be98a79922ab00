"""The name of every choice a curriculum offers, declared once.

Torch-backed modules (mining, the model, the trackers, the data readers) implement these choices
and import the names from here, so that loading a curriculum (`tripletctl validate`) never imports
torch or a training module. A test checks that each implementation covers exactly its names.
Metric names belong to config/until.py, layouts (what a row is) to config/layouts.py.
"""

from __future__ import annotations

MINING_MODES = ("random", "semi-hard", "hard-negative", "batch-hard", "batch-all")  # train/mining.py
LOSSES = ("margin", "soft-margin", "infonce")  # train/losses.py
INFONCE_MINING = "batch-all"  # infonce uses every positive and negative: the only mode that says so
BATCH_CLASSES = ("random", "neighbours")  # data/batching.py, data/neighbours.py
GUARDED_MODES = ("semi-hard", "hard-negative", "batch-hard", "batch-all")  # train/guard.py: the hard modes
LR_SCALINGS = ("none", "sqrt", "linear")  # config/lr_scaling.py
DISTANCES = ("euclidean", "squared-euclidean")  # model/distances.py
COLLAPSE_FALLBACK_MODE = "semi-hard"  # what on_collapse: fallback switches a collapsing phase to
FALLBACKS = ("hardest", "easiest")  # semi-hard's choice where no negative is farther than the positive
POOLINGS = ("mean", "cls")  # model/encoder.py
INIT_MODES = ("pretrained", "config")
OPTIMIZERS = ("adamw",)
DECAYS = ("none", "linear", "cosine")  # train/lr.py
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ON_COLLAPSE = ("warn", "stop", "fallback")  # train/watchdog.py, train/loop.py
ON_NONFINITE = ("stop", "skip")
FORMATS = ("json", "parquet", "csv", "text")  # data/sources.py
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train/trackers.py
PHASE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
PHASE_NAME_MAX = 64  # it becomes a directory name, and every message quotes it
