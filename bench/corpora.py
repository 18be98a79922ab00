"""Real labelled text available offline on Debian machines, for bench/quality.py.

- `fortunes`: the fortune cookies of Debian's `fortunes` and `fortunes-min` packages (fetched with
  `apt-get download`, unpacked with `dpkg-deb -x`, nothing installed), labelled by their file:
  humour, science, politics, kids... A few dozen broad classes of short, noisy texts.
- `debtags`: Debian's package descriptions (`apt-cache dumpavail`: the machine's own package lists),
  labelled by the package's exact debtags set (e.g. `devel::lang:python, role::shared-lib`): hundreds
  of fine, overlapping classes where neighbours share words and differ in meaning.
- `debsections`: the same descriptions labelled by their archive section (`libs`, `python`, `games`,
  `science`...): a few dozen classes of hundreds of rows each, the shape of a large labelled corpus.
- `debsource`: the same descriptions labelled by their *source* package (`Source:`, without its
  version; a package without one is its own source): thousands of small classes (2 to 20 rows) whose
  members are a library, its `-dev`, `-doc` and tool packages, which share words and differ in role.
- `debtwo`: two sections only, `admin` and `utils` (600 descriptions each): the reference's two-class
  case, for bench/two_class.py. Close in topic on purpose (system tools against general tools).
  `debtwo-net`: `net` and `web` (400 each), a second two-class corpus to confirm a choice made on the first.

Held-out classes are disjoint from the training classes (every third class by a seeded hash), so
the benchmark measures what a model learned about the texts, not the training labels; a corpus of
`ROW_SPLIT` has too few classes for that and holds out every third *row* of each class instead. Each corpus
is two JSON-lines files of {"text", "label"} rows, written once into a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

MAX_CHARS = 300  # long enough for a fortune or a description's first sentences, short for a CPU


def _held_out(label: str) -> bool:
    return int(hashlib.sha256(label.encode()).hexdigest(), 16) % 3 == 0


def _balanced(rows_by_label: dict[str, list[str]], min_rows: int, max_rows: int) -> dict[str, list[str]]:
    kept = {}
    for label, texts in sorted(rows_by_label.items()):
        unique = list(dict.fromkeys(t for t in texts if t))
        if len(unique) >= min_rows:
            kept[label] = unique[:max_rows]
    return kept


def fortunes(work: Path) -> dict[str, list[str]]:
    """One class per fortune file with at least 50 fortunes; at most 150 fortunes each."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        subprocess.run(["apt-get", "download", "fortunes", "fortunes-min"], cwd=tmp, check=True, capture_output=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        rows: dict[str, list[str]] = defaultdict(list)
        for path in sorted((Path(tmp) / "root/usr/share/games/fortunes").iterdir()):
            if path.suffix or not path.is_file() or path.name in ("ascii-art", "art"):
                continue  # .dat/.u8 indexes; ascii-art is pictures, not text
            for fortune in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace")):
                text = " ".join(fortune.split())
                if 20 <= len(text) <= MAX_CHARS:
                    rows[path.name].append(text)
    return _balanced(rows, min_rows=50, max_rows=150)


def _packages() -> list[dict[str, str]]:
    """Every record of `apt-cache dumpavail` as {field: value}, continuation lines joined."""
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    records = []
    for record in dump.split("\n\n"):
        fields, last = {}, None
        for line in record.splitlines():
            if line.startswith((" ", "\t")) and last:
                fields[last] += " " + line.strip().removeprefix(".")
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        records.append(fields)
    return records


def _description(fields: dict[str, str]) -> str:
    return " ".join((fields.get("Description", "") or fields.get("Description-en", "")).split())[:MAX_CHARS]


def debtags(work: Path) -> dict[str, list[str]]:
    """One class per exact debtags set shared by 4 to 40 packages with distinct descriptions."""
    rows: dict[str, list[str]] = defaultdict(list)
    for fields in _packages():
        tags = fields.get("Tag", "")
        if not tags or "special::" in tags or "not-yet-tagged" in tags:
            continue
        label = ", ".join(sorted(t.strip() for t in tags.split(",")))
        text = _description(fields)
        if len(text) >= 20:
            rows[label].append(text)
    return _balanced({k: v for k, v in rows.items() if len(set(v)) <= 40}, min_rows=4, max_rows=40)


def _section_rows() -> dict[str, list[str]]:
    """Descriptions by archive section (the `contrib/` and `non-free/` prefixes dropped), each
    section in a seeded order, not the alphabetical head (libghc-a*, python3-a*...)."""
    rows: dict[str, list[str]] = defaultdict(list)
    for fields in _packages():
        section = fields.get("Section", "").rpartition("/")[2]
        text = _description(fields)
        if section and len(text) >= 20:
            rows[section].append(text)
    for section, texts in rows.items():
        random.Random(section).shuffle(texts)
    return rows


def debsections(work: Path) -> dict[str, list[str]]:
    """One class per archive section (`libs`, `python`, `games`, `science`...) with at least 100
    distinct descriptions; at most 400 each. A few dozen classes of hundreds of rows: unlike fortunes
    and debtags, a budget of tens of thousands of samples is a few passes over it, not dozens."""
    return _balanced(_section_rows(), min_rows=100, max_rows=400)


SOURCE_MAX_ROWS = 20  # a few sources build hundreds of binaries (kernels, texlive): no class dominates


def _source(fields: dict[str, str]) -> str:
    """The source package's name: `Source: foo (1.2-3)` names `foo`; no `Source:` means the package's own."""
    return (fields.get("Source") or fields.get("Package", "")).partition(" (")[0].strip()


def debsource(work: Path) -> dict[str, list[str]]:
    """One class per source package with at least 2 distinct descriptions, at most 20 each (in a
    seeded order). A description found under two sources is dropped: it would be its own false
    negative."""
    rows: dict[str, list[str]] = defaultdict(list)
    for fields in _packages():
        source, text = _source(fields), _description(fields)
        if source and len(text) >= 20:
            rows[source].append(text)
    owners: dict[str, set[str]] = defaultdict(set)
    for source, texts in rows.items():
        for text in texts:
            owners[text].add(source)
    for source, texts in rows.items():
        texts[:] = sorted({t for t in texts if len(owners[t]) == 1})
        random.Random(source).shuffle(texts)
    return _balanced(rows, min_rows=2, max_rows=SOURCE_MAX_ROWS)


TWO_CLASS = {"debtwo": (("admin", "utils"), 600), "debtwo-net": (("net", "web"), 400)}  # sections, rows each


def _two_sections(name: str) -> dict[str, list[str]]:
    """Two archive sections, a fixed number of distinct descriptions each (a seeded sample); a text
    found in both is dropped (a row with two labels would be its own false negative)."""
    sections, rows_each = TWO_CLASS[name]
    rows = _section_rows()
    both = set(rows[sections[0]]) & set(rows[sections[1]])
    two = {section: [t for t in rows[section] if t not in both] for section in sections}
    return _balanced(two, min_rows=rows_each, max_rows=rows_each)


def debtwo(work: Path) -> dict[str, list[str]]:
    """Sections `admin` and `utils`, 600 descriptions each: close in topic (system tools, general tools)."""
    return _two_sections("debtwo")


def debtwo_net(work: Path) -> dict[str, list[str]]:
    """Sections `net` and `web`, 400 descriptions each: the second two-class corpus, for confirmation."""
    return _two_sections("debtwo-net")


CORPORA: dict[str, Callable[[Path], dict[str, list[str]]]] = {
    "fortunes": fortunes,
    "debtags": debtags,
    "debsections": debsections,
    "debsource": debsource,
    "debtwo": debtwo,
    "debtwo-net": debtwo_net,
}
ROW_SPLIT = set(TWO_CLASS)  # too few classes to hold whole classes out: rows are held out instead


def prepare(name: str, cache: Path) -> tuple[Path, Path, dict[str, int]]:
    """(train.jsonl, heldout.jsonl, counts) for a corpus, built into `cache/name/` on first use."""
    folder = cache / name
    train, held_out, counts_file = folder / "train.jsonl", folder / "heldout.jsonl", folder / "counts.json"
    if not counts_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = CORPORA[name](folder)
        counts = {"train_rows": 0, "train_classes": 0, "heldout_rows": 0, "heldout_classes": 0}
        with train.open("w") as train_out, held_out.open("w") as held_out_out:
            for label, texts in rows.items():
                for side in ("train", "heldout"):
                    if name in ROW_SPLIT:
                        kept = [t for t in texts if _held_out(t) == (side == "heldout")]
                    else:
                        kept = texts if _held_out(label) == (side == "heldout") else []
                    out = held_out_out if side == "heldout" else train_out
                    for text in kept:
                        out.write(json.dumps({"text": text, "label": label}) + "\n")
                    counts[f"{side}_rows"] += len(kept)
                    counts[f"{side}_classes"] += bool(kept)
        counts_file.write_text(json.dumps(counts))
    return train, held_out, json.loads(counts_file.read_text())
