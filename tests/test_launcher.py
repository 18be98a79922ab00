"""core/launcher.py: hints repeat the launcher (torchrun and its process counts) under torchrun."""

from __future__ import annotations

import pytest

from tripletctl.core.launcher import command_line, rank_prefix, under_torchrun
from tripletctl.train.report import train_command

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE")


@pytest.fixture
def alone(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_alone_the_command_is_tripletctl(alone):
    assert not under_torchrun() and rank_prefix() == ""
    assert (
        train_command(["cur.yaml", "train.lr=1e-4"], resume=True) == "tripletctl train cur.yaml train.lr=1e-4 --resume"
    )


def test_under_torchrun_the_launcher_is_repeated(alone):
    for name, value in (("TORCHELASTIC_RUN_ID", "none"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4")):
        alone.setenv(name, value)
    alone.setenv("LOCAL_WORLD_SIZE", "4")
    assert under_torchrun() and rank_prefix() == "rank 1: "
    assert train_command(["my cur.yaml"], resume=True) == (
        "torchrun --nproc-per-node=4 -m tripletctl train 'my cur.yaml' --resume"
    )
    alone.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two
    assert command_line(["train", "c.yaml"]).startswith(
        "torchrun --nnodes=2 --rdzv-endpoint=HOST:PORT --nproc-per-node=2"
    )
