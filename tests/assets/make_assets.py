"""Writes the small data files the tests read. Run from anywhere: python tests/assets/make_assets.py

The same 60 labelled rows are written as jsonl, parquet, csv and one text file per label, so the
tests can check that every format gives the same rows. The triplet files (layout: triplets) are
drawn from the quickstart corpus (curricula/quickstart/*.jsonl, 48 topics in confusable twin pairs):
anchor and positive share a topic, the first negative comes from the twin topic (a hard negative),
further ones from any other topic; every 4th row's first negative is another row's positive, so
duplicate texts across rows are exercised."""

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

    write_jsonl(
        HERE / "two_class.jsonl",
        [{"text": sentence(rng, lab, i), "label": lab} for i in range(200) for lab in ("yes", "no")],
    )
    many = [{"text": sentence(rng, f"k{c}", i), "label": f"k{c}"} for c in range(100) for i in range(12)]
    rng.shuffle(many)
    write_jsonl(HERE / "many_class.jsonl", many)
    write_jsonl(
        HERE / "pairs.jsonl",
        [{"anchor": sentence(rng, f"p{i}", 0), "positive": sentence(rng, f"p{i}", 1)} for i in range(40)],
    )
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
    write_triplets()


def _topics(path: Path) -> dict[int, list[str]]:
    by_topic: dict[int, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_topic.setdefault(int(row["label"].split("-")[1]), []).append(row["text"])
    return by_topic


def _triplet_rows(by_topic: dict[int, list[str]], per_topic: int, negatives: int, rng: random.Random) -> list[dict]:
    topics = sorted(by_topic)
    rows = []
    for i in range(per_topic):
        for t in topics:
            texts = by_topic[t]
            anchor, positive = texts[2 * i], texts[2 * i + 1]
            others = [by_topic[t ^ 1][rng.randrange(len(by_topic[t ^ 1]))]]
            while len(others) < negatives:
                other = rng.choice([u for u in topics if u != t])
                others.append(by_topic[other][rng.randrange(len(by_topic[other]))])
            rows.append([anchor, positive, others])
    rng.shuffle(rows)
    positives_of = {}
    for index, (_, positive, _) in enumerate(rows):
        positives_of.setdefault(positive, index)
    for index, row in enumerate(rows):
        if index % 4 == 3:  # the first negative becomes exactly another row's positive (of another topic)
            donor = next(
                r
                for r in rows[index + 1 :] + rows[:index]
                if r[0] not in (row[0], row[1]) and by_topic_of(by_topic, r[1]) != by_topic_of(by_topic, row[1])
            )
            row[2][0] = donor[1]
    names = ["negative"] if negatives == 1 else [f"negative_{j + 1}" for j in range(negatives)]
    return [{"anchor": a, "positive": p, **dict(zip(names, n))} for a, p, n in rows]


def by_topic_of(by_topic: dict[int, list[str]], text: str) -> int:
    return next(t for t, texts in by_topic.items() if text in texts)


def write_triplets() -> None:
    quickstart = HERE.parent.parent / "curricula" / "quickstart"
    rng = random.Random(12)
    train, heldout = _topics(quickstart / "train.jsonl"), _topics(quickstart / "heldout.jsonl")
    for name, negatives in (("triplets", 1), ("triplets3", 3)):
        rows = _triplet_rows(train, 5, negatives, rng)
        write_jsonl(HERE / f"{name}.jsonl", rows)
        pd.DataFrame(rows).to_parquet(HERE / f"{name}.parquet", index=False)
        pd.DataFrame(rows).to_csv(HERE / f"{name}.csv", index=False)
    write_jsonl(HERE / "triplets_heldout.jsonl", _triplet_rows(heldout, 4, 1, rng))
    # The built-in quickstart-triplets curriculum ships inside the package, so it carries its own copy.
    for name in ("triplets.jsonl", "triplets_heldout.jsonl"):
        (quickstart / name).write_bytes((HERE / name).read_bytes())


if __name__ == "__main__":
    main()
