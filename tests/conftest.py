"""pytest's set-up: no network, the `cuda` marker's skip, and the fixtures. What test files share
otherwise (paths, curricula, runs, references) is tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
from helpers import ASSETS, TINY_BERT

CUDA_TESTS_ON_CPU = "TRIPLETCTL_CUDA_TESTS_ON_CPU"
"""Set to 1: run the `cuda` tests on the CPU (what can run there), as `bench/gpu_check.py --smoke` does,
so they cannot rot between GPU runs."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests skip without a CUDA device, unless CUDA_TESTS_ON_CPU is set."""
    marked = [item for item in items if "cuda" in item.keywords]
    if not marked or os.environ.get(CUDA_TESTS_ON_CPU) == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (bench/gpu_check.py runs these on a GPU)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def tiny_bert_dir() -> Path:
    """Config + vocabulary of a 2-layer BERT: build it with `init: config`, no weights needed."""
    return TINY_BERT


@pytest.fixture
def assets_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory per eval block (None: no block), holding one untrained tiny-BERT checkpoint
    (test_eval_command.py, test_loading.py)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from tripletctl.data.tokenizer import load_tokenizer
    from tripletctl.model.encoder import TripletEncoder
    from tripletctl.outputs.checkpoint_save import save_checkpoint

    torch.manual_seed(0)
    model = TripletEncoder(AutoModel.from_config(AutoConfig.from_pretrained(TINY_BERT)), head=(16,))
    tokenizer = load_tokenizer(str(TINY_BERT))
    blocks = {
        "labelled": {"source": str(TINY_BERT.parent / "heldout.jsonl"), "max_rows": 120},
        "pairs": {"source": str(ASSETS / "pairs.jsonl"), "layout": "pairs", "max_rows": 60},
        "triplets": {"source": str(ASSETS / "triplets_heldout.jsonl"), "layout": "triplets", "max_rows": 150},
        "none": None,
    }
    root = tmp_path_factory.mktemp("saved")
    runs = {}
    for name, block in blocks.items():
        curriculum = {"data": {"source": "unused", "max_length": 32}}
        if block is not None:
            curriculum["eval"] = block
        save_checkpoint(
            root / name / "phase-0-p" / "checkpoint",
            model=model,
            tokenizer=tokenizer,
            optimizer=None,
            state={"phase_index": 0},
            stream_state=None,
            curriculum=curriculum,
        )
        runs[name] = root / name
    return runs, model, tokenizer
