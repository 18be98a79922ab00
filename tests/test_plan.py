"""The plan `validate` prints (display.plan_table): phases, totals, conditions, chunking, keep_best.
The curricula come from tests/helpers.py; the tables are read as a terminal shows them."""

from __future__ import annotations

from helpers import FACENET, MINIMAL, edit, phases_with, write
from rich.console import Console

from tripletctl.config.plan import plan_table
from tripletctl.config.validate import load_curriculum


def test_plan_table_names_the_chunking(tmp_path):
    console = Console(record=True, width=80)
    console.print(
        plan_table(load_curriculum(write(tmp_path, edit(phases=phases_with(chunk_tokens=4096))))), crop=False
    )  # as `validate` prints it
    text = console.export_text()
    assert (
        "chunks: 0: length-sorted, auto token budget, 1: length-sorted, auto token budget, 2: length-sorted, 4,096"
        in " ".join(text.split())
    )


def test_plan_table_shows_phases_and_totals():
    console = Console(record=True, width=160)
    console.print(plan_table(load_curriculum(FACENET)))
    text = console.export_text()
    for fragment in [
        "semi-hard",
        "batch-all",
        "infonce τ=0.05",
        "1,000,000",
        "5,000,000",
        "2e-05",
        "4e-05",  # the InfoNCE phase's lr, scaled by sqrt(2000 / 500)
        "squared-euclidean",
        "bert-base-uncased",
        "sentence-transformers/all-nli",
        "runs/facenet",
        "6,000,000 samples",
    ]:
        assert fragment in text, fragment


def test_plan_table_shows_the_conditions(tmp_path):
    phases = phases_with(
        until={"active_fraction_below": 0.05, "plateau": {"metric": "loss", "patience": 3, "min_delta": 0.02}}
    )
    console = Console(record=True, width=200)
    console.print(plan_table(load_curriculum(write(tmp_path, edit(phases=phases)))))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "≤10" in text and "≤640" in text and "total: at most 30 steps" in text
    assert (
        "until: phase 2 (hard) ends early when active_fraction < 0.05 or loss plateau (3 steps, min_delta 2%) "
        "(checked from step 1, EMA over 20 steps)"
    ) in text


def test_plan_shows_keep_best(tmp_path):
    path = write(tmp_path, MINIMAL + "eval:\n  source: org/heldout\n")
    console = Console(width=200, record=True)
    console.print(plan_table(load_curriculum(path, ["train.keep_best=recall@1"])))
    assert "keep best: highest held-out recall@1 -> runs/tripletctl/best" in console.export_text()


def test_plan_shows_neighbour_classes_only_when_a_phase_uses_them(tmp_path):

    def shown(text: str) -> str:
        console = Console(record=True, width=200)
        console.print(plan_table(load_curriculum(write(tmp_path, text))))
        return console.export_text()

    assert "classes" not in shown(edit())
    text = shown(edit(phases=phases_with(batch_classes="neighbours", neighbour_share=0.25, neighbour_group=3)))
    assert "classes" in text and "0.25 in groups of 3" in text and "random" in text
