"""bench/corpora.py's Debian corpora, built from package records given here instead of apt's lists."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import corpora  # noqa: E402


def _records() -> list[dict[str, str]]:
    games = [
        {"Section": "contrib/games" if i % 2 else "games", "Description": f"a game for everyone, number {i}"}
        for i in range(450)
    ]
    science = [{"Section": "science", "Description": f"a tool for science, {i}"} for i in range(120)]
    few = [{"Section": "shells", "Description": f"a shell called sh{i}"} for i in range(99)]
    short = [{"Section": "tex", "Description": "tiny"} for _ in range(200)]
    return [*games, *science, *few, *short]


def test_sections_drop_the_archive_prefix_keep_classes_of_100_and_sample_400(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "_packages", _records)
    rows = corpora.debsections(tmp_path)
    assert sorted(rows) == ["games", "science"]  # shells has 99 rows, tex's descriptions are too short
    assert len(rows["games"]) == 400 and len(set(rows["games"])) == 400
    assert len(rows["science"]) == 120
    assert rows["games"][:5] != [f"a game for everyone, number {i}" for i in range(5)]  # a sample, not the head
    assert corpora.debsections(tmp_path) == rows  # seeded: the same corpus every time


def test_debtags_label_by_the_sorted_tag_set(monkeypatch, tmp_path):
    records = [
        {
            "Tag": "role::program, devel::lang:python" if i % 2 else "devel::lang:python, role::program",
            "Description": f"a python program, number {i}",
        }
        for i in range(6)
    ] + [{"Tag": "special::invalid-tag", "Description": f"ignored {i}"} for i in range(6)]
    monkeypatch.setattr(corpora, "_packages", lambda: records)
    assert corpora.debtags(tmp_path) == {
        "devel::lang:python, role::program": [f"a python program, number {i}" for i in range(6)]
    }
