"""bench/corpora.py's Debian corpora, built from package records given here (or a small fake
`apt-cache dumpavail`) instead of apt's lists: the labels, the dedup, the held-out split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

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


def record(package: str, description: str, source: str | None = None, section: str = "libs") -> str:
    lines = [f"Package: {package}", *([f"Source: {source}"] if source else []), f"Section: {section}"]
    first, _, rest = description.partition("\n")
    lines.append(f"Description: {first}")
    lines += [f" {line}" if line else " ." for line in rest.splitlines()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def dumpavail(monkeypatch):
    """Replace `apt-cache dumpavail` (corpora's own `subprocess` name only) by the records given."""

    def install(records: list[str]) -> None:
        dump = "\n".join(records)

        def run(command, **kwargs):
            assert command == ["apt-cache", "dumpavail"]
            return SimpleNamespace(stdout=dump)

        monkeypatch.setattr(corpora, "subprocess", SimpleNamespace(run=run))

    return install


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_packages_joins_continuation_lines_and_drops_paragraph_dots(dumpavail):
    dumpavail([record("foo", "foo tool for bars\nIt reads bars.\n\nAnd writes them.", source="foo-src (1.0-1)")])
    (fields,) = corpora._packages()
    assert fields["Source"] == "foo-src (1.0-1)"
    assert corpora._description(fields) == "foo tool for bars It reads bars. And writes them."


def test_debsource_labels_by_source_without_version_and_dedups(dumpavail):
    dumpavail(
        [
            record("libfoo1", "foo library, runtime files for everyone", source="foo (1.2-3)"),
            record("libfoo-dev", "foo library, development files here", source="foo (1.2-3)"),
            record("libfoo-dev", "foo library, development files here", source="foo (1.2-3)"),  # another arch
            record("foo-tools", "foo library, the command-line tools", source="foo"),  # no version
            record("bar", "bar: a program that is its own source"),  # no Source: its own
            record("bar-data", "bar: the data files of the program bar", source="bar"),
            record("lonely", "a source with one description only, dropped"),
            record("shared-a", "the same description under two sources", source="twin"),
            record("twin-b", "twin's other package, a description alone", source="twin"),
            record("shared-b", "the same description under two sources", source="other"),
            record("other-b", "other's own package, with its description", source="other"),
            record("short", "tiny", source="foo"),  # under 20 characters
        ]
    )
    rows = corpora.debsource(Path("."))
    assert {label: sorted(texts) for label, texts in rows.items()} == {
        "foo": [
            "foo library, development files here",
            "foo library, runtime files for everyone",
            "foo library, the command-line tools",
        ],
        "bar": ["bar: a program that is its own source", "bar: the data files of the program bar"],
    }  # twin and other each keep one description once the shared one is dropped: under 2, dropped


def test_debsource_caps_a_class_at_twenty_rows(dumpavail):
    dumpavail([record(f"big{i}", f"big source package number {i:03d}", source="big") for i in range(50)])
    (texts,) = corpora.debsource(Path(".")).values()
    assert len(texts) == corpora.SOURCE_MAX_ROWS == len(set(texts))


def test_debsource_holds_out_whole_classes(tmp_path, dumpavail):
    dumpavail(
        [
            record(f"pkg{s}-{i}", f"package {i} built from source number {s}", source=f"src{s}")
            for s in range(30)
            for i in range(3)
        ]
    )
    train, held_out, counts = corpora.prepare("debsource", tmp_path)
    train_rows, held_rows = read(train), read(held_out)
    train_labels, held_labels = {r["label"] for r in train_rows}, {r["label"] for r in held_rows}
    assert train_labels and held_labels and not train_labels & held_labels
    assert train_labels | held_labels == {f"src{s}" for s in range(30)}
    assert held_labels == {label for label in train_labels | held_labels if corpora._held_out(label)}
    assert counts == {
        "train_rows": len(train_rows),
        "train_classes": len(train_labels),
        "heldout_rows": len(held_rows),
        "heldout_classes": len(held_labels),
    }


def test_debtwo_holds_out_rows_of_both_classes(tmp_path, dumpavail):
    records = [
        record(f"{section}{i}", f"{section} tool number {i} for the system", section=section)
        for section in ("admin", "utils", "games")
        for i in range(corpora.TWO_CLASS["debtwo"][1] + 20)
    ]
    records.append(record("both-a", "a tool found in both sections", section="admin"))
    records.append(record("both-u", "a tool found in both sections", section="utils"))
    dumpavail(records)
    train, held_out, counts = corpora.prepare("debtwo", tmp_path)
    assert "debtwo" in corpora.ROW_SPLIT
    train_rows, held_rows = read(train), read(held_out)
    for side in (train_rows, held_rows):
        assert {r["label"] for r in side} == {"admin", "utils"}
    train_texts, held_texts = {r["text"] for r in train_rows}, {r["text"] for r in held_rows}
    assert not train_texts & held_texts
    assert held_texts == {t for t in train_texts | held_texts if corpora._held_out(t)}
    assert len(train_rows) + len(held_rows) == 2 * corpora.TWO_CLASS["debtwo"][1]
    assert "a tool found in both sections" not in train_texts | held_texts
    assert counts["train_classes"] == counts["heldout_classes"] == 2
