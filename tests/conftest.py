"""Shared test set-up: no network, small CPU budgets, the tiny BERT the repo ships."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"
QUICKSTART = REPO / "curricula" / "quickstart.yaml"


@pytest.fixture
def tiny_bert_dir() -> Path:
    """Config + vocabulary of a 2-layer BERT: build it with `init: config`, no weights needed."""
    return TINY_BERT


@pytest.fixture
def assets_dir() -> Path:
    return ASSETS
