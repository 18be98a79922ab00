"""Writes the small data files tests/test_data.py reads. Run from anywhere: python tests/assets/make_assets.py

The same 60 labelled rows are written as jsonl, parquet, csv and one text file per label, so the
tests can check that every format gives the same rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def sentence(rng: random.Random, label: str, i: int) -> str:
    return f"{label} row {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    rows = [{"text": sentence(rng, f"c{c}", i), "label": f"c{c}"} for i in range(10) for c in range(6)]
    write_jsonl(HERE / "train.jsonl", rows)
    pd.DataFrame(rows).to_parquet(HERE / "train.parquet", index=False)
    pd.DataFrame(rows).to_csv(HERE / "train.csv", index=False)
    (HERE / "text").mkdir(exist_ok=True)
    for c in range(6):
        lines = [r["text"] for r in rows if r["label"] == f"c{c}"]
        (HERE / "text" / f"c{c}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    write_jsonl(HERE / "two_class.jsonl",
                [{"text": sentence(rng, lab, i), "label": lab} for i in range(200) for lab in ("yes", "no")])
    many = [{"text": sentence(rng, f"k{c}", i), "label": f"k{c}"} for c in range(100) for i in range(12)]
    rng.shuffle(many)
    write_jsonl(HERE / "many_class.jsonl", many)
    write_jsonl(HERE / "pairs.jsonl", [{"anchor": sentence(rng, f"p{i}", 0), "positive": sentence(rng, f"p{i}", 1)}
                                       for i in range(40)])
    bad = []
    for i in range(40):
        kind = i % 8
        row = {"text": sentence(rng, f"b{i % 3}", i), "label": f"b{i % 3}"}
        if kind == 1:
            del row["text"]
        elif kind == 2:
            row["text"] = ""
        elif kind == 3:
            row["text"] = "   \t "
        elif kind == 4:
            del row["label"]
        elif kind == 5:
            row["label"] = None
        bad.append(row)  # kinds 0, 6, 7 are good: 15 good rows, 25 bad
    write_jsonl(HERE / "bad_rows.jsonl", bad)
    write_jsonl(HERE / "all_bad.jsonl", [{"text": "", "label": "x"}, {"text": None, "label": "y"}] * 5)
    write_jsonl(HERE / "wrong_columns.jsonl", [{"body": "some text", "topic": "t1"}] * 5)


if __name__ == "__main__":
    main()
