"""stream.py: BatchStream end to end (class balance, layouts, bad rows, padding, workers, exact resume, ranks, close)."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
from helpers import NEGATIVES, text_source, triplet_file_rows

from tripletctl.config.blocks import DataConfig
from tripletctl.core.errors import DataError, TripletctlError
from tripletctl.data.sources import check_source
from tripletctl.data.stream import BatchStream, pad_ragged


def cfg(assets_dir, name, **kw) -> DataConfig:
    source = name if isinstance(name, dict) else str(assets_dir / name)
    kw.setdefault("tokenizer_workers", 0)
    kw.setdefault("shuffle_buffer", 64)
    kw.setdefault("max_length", 16)
    return DataConfig(source=source, **kw)


def take(data, tok, batch_size, n, seed=0, state=None, **kw):
    stream = BatchStream(data, str(tok), batch_size, seed, state=state, **kw)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


# ------------------------------------------------------------------------------ batch composition


def test_two_classes_give_exact_halves(assets_dir, tiny_bert_dir):
    for batch in take(cfg(assets_dir, "two_class.jsonl"), tiny_bert_dir, 16, 30):
        assert sorted(Counter(batch.labels.tolist()).values()) == [8, 8]
        assert {t.split()[0] for t in batch.texts} == {"yes", "no"}


def test_many_classes_one_slot_each(assets_dir, tiny_bert_dir):
    for batch in take(cfg(assets_dir, "many_class.jsonl", shuffle_buffer=200), tiny_bert_dir, 32, 20):
        counts = Counter(batch.labels.tolist())
        assert len(counts) == 32 // 4 and set(counts.values()) == {4}
        # labels are the class: same text prefix <-> same id
        by_label = {}
        for text, label in zip(batch.texts, batch.labels.tolist()):
            by_label.setdefault(label, set()).add(text.split()[0])
        assert all(len(v) == 1 for v in by_label.values())


def test_evictions_counted_and_buffers_bounded(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, "many_class.jsonl", shuffle_buffer=300, max_buffered_rows=30)
    batches = take(data, tiny_bert_dir, 16, 10)
    assert batches[-1].classes_evicted > 0 and batches[-1].rows_evicted >= batches[-1].classes_evicted
    assert batches[0].classes_evicted <= batches[-1].classes_evicted
    for b in batches:
        buffered = sum(len(texts) for _, texts in b.state["snapshot"]["classes"]["classes"])
        assert buffered <= 30 + 2 * 16 + 4
        counts = Counter(b.labels.tolist())  # a tight bound may reuse classes: still >= 4 rows each
        assert len(counts) >= 2 and min(counts.values()) >= 4 and sum(counts.values()) == 16


def test_pairs_layout(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, "pairs.jsonl", layout="pairs")
    batches = take(data, tiny_bert_dir, 10, 12)  # 40 pairs, 5 per batch: crosses epochs
    for b in batches:
        counts = Counter(b.labels.tolist())
        assert len(counts) == 5 and set(counts.values()) == {2}
        for i in range(0, 10, 2):
            assert b.labels[i] == b.labels[i + 1]
            assert b.texts[i].split()[0] == b.texts[i + 1].split()[0]
    assert batches[-1].epoch >= 1


@pytest.mark.parametrize("name", ["triplets", "triplets3"])
@pytest.mark.parametrize("ext", ["jsonl", "parquet", "csv"])
def test_triplets_layout(assets_dir, tiny_bert_dir, name, ext):
    """Each group is one file row: anchor and positive share a label no other text has; each given
    negative has a label of its own, so mining never pairs it with anyone (even a duplicate text)."""
    negatives = NEGATIVES[name]
    group = 2 + len(negatives)
    data = cfg(
        assets_dir,
        f"{name}.{ext}",
        layout="triplets",
        negative_columns=negatives,
        samples_per_class=2,
        shuffle_buffer=1,
    )  # file order: the first 240 groups are the file's 240 rows, once each
    check_source(data)
    file_rows = set(triplet_file_rows(assets_dir / f"{name}.{ext}"))
    assert len(file_rows) == 240
    seen = []
    for b in take(data, tiny_bert_dir, 8 * group, 32):  # 256 groups: crosses the epoch boundary
        labels = b.labels.tolist()
        counts = Counter(labels)
        assert len(b.texts) == len(labels) == 8 * group
        for i in range(0, len(labels), group):
            row = tuple(b.texts[i : i + group])
            assert row in file_rows
            seen.append(row)
            assert labels[i] == labels[i + 1] and counts[labels[i]] == 2  # the group's class: a and p only
            assert all(counts[labels[i + 2 + j]] == 1 for j in range(len(negatives)))  # never anyone's positive
    assert len(set(seen[:240])) == 240 and set(seen) == file_rows and b.epoch == 1
    assert any(row[2] == other[1] for row in file_rows for other in file_rows)  # duplicates are exercised


def test_triplets_duplicate_text_is_a_negative_not_a_positive(tmp_path, tiny_bert_dir):
    rows = [
        {"anchor": "a0", "positive": "p0", "negative": "p1"},  # p1 is row 1's positive
        {"anchor": "a1", "positive": "p1", "negative": "p0"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(
        source=str(path), layout="triplets", samples_per_class=2, tokenizer_workers=0, shuffle_buffer=1, max_length=8
    )
    b = take(data, tiny_bert_dir, 6, 1)[0]
    by_text = {}
    for text, label in zip(b.texts, b.labels.tolist()):
        by_text.setdefault(text, []).append(label)
    assert by_text["p0"][0] != by_text["p0"][1] and by_text["p1"][0] != by_text["p1"][1]
    assert by_text["a0"][0] in by_text["p0"] and by_text["a1"][0] in by_text["p1"]
    assert len(set(b.labels.tolist())) == 4


def test_triplet_resume_continues_exactly(assets_dir, tiny_bert_dir):
    data = cfg(
        assets_dir,
        "triplets3.parquet",
        layout="triplets",
        negative_columns=NEGATIVES["triplets3"],
        samples_per_class=2,
        shuffle_buffer=16,
    )
    straight = take(data, tiny_bert_dir, 20, 30, seed=5)
    resumed = take(data, tiny_bert_dir, 20, 10, seed=5, state=roundtrip_json(straight[19].state))
    for a, b in zip(straight[20:], resumed):
        same(a, b)
    other = cfg(
        assets_dir,
        "triplets3.parquet",
        layout="triplets",
        negative_columns=("negative_1",),
        samples_per_class=2,
        shuffle_buffer=16,
    )
    with pytest.raises(DataError, match="source"):
        BatchStream(other, str(tiny_bert_dir), 6, seed=5, state=straight[0].state)


# ------------------------------------------------------------------------------ rows and formats


def test_bad_rows_are_skipped_and_counted(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, "bad_rows.jsonl", samples_per_class=2)
    batches = take(data, tiny_bert_dir, 6, 8)
    assert batches[-1].rows_skipped >= 25 and batches[-1].rows_seen >= 40
    assert batches[-1].rows_skipped % 25 == 0  # whole epochs: 25 bad rows each


def test_text_format_stream_is_labelled_by_file(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, text_source(assets_dir), samples_per_class=2)
    for b in take(data, tiny_bert_dir, 8, 10):
        by_label = {}
        for text, label in zip(b.texts, b.labels.tolist()):
            by_label.setdefault(label, set()).add(text.split()[0])
        assert len(by_label) == 4 and all(len(v) == 1 for v in by_label.values())


# ------------------------------------------------------------------------------ tokenisation


def test_padding_to_longest_row_and_truncation(assets_dir, tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    for b in take(cfg(assets_dir, "train.jsonl", max_length=256), tiny_bert_dir, 12, 3):
        lengths = [len(tok(t)["input_ids"]) for t in b.texts]
        assert b.input_ids.shape == (12, max(lengths)) and b.input_ids.dtype == torch.int64
        assert b.attention_mask.sum(1).tolist() == lengths
    b = take(cfg(assets_dir, "train.jsonl", max_length=5), tiny_bert_dir, 12, 1)[0]
    assert b.input_ids.shape[1] == 5


def test_batches_travel_unpadded_and_pad_like_the_tokenizer(assets_dir, tiny_bert_dir):
    """Rows go back to back with their lengths (no padding on the host); padded where used, they
    equal what the tokenizer's own padding gives."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    for b in take(cfg(assets_dir, "train.jsonl", max_length=9), tiny_bert_dir, 12, 2):
        want = tok(b.texts, padding="longest", truncation=True, max_length=9, return_tensors="pt")
        assert b.token_ids.dim() == 1 and b.token_ids.numel() == int(b.lengths.sum()) == int(
            want["attention_mask"].sum()
        )
        ids, mask = pad_ragged(b.token_ids, b.lengths, b.pad_id)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    ids, mask = pad_ragged(torch.tensor([7, 8, 9, 5]), torch.tensor([3, 0, 1]), pad_id=-1)
    assert ids.tolist() == [[7, 8, 9], [-1, -1, -1], [5, -1, -1]] and mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]


@pytest.mark.slow
def test_worker_processes_tokenise_like_the_main_process(assets_dir, tiny_bert_dir):
    in_process = take(cfg(assets_dir, "train.jsonl"), tiny_bert_dir, 12, 4)
    workers = take(cfg(assets_dir, "train.jsonl", tokenizer_workers=2, prefetch_batches=3), tiny_bert_dir, 12, 4)
    for a, b in zip(in_process, workers):
        assert a.texts == b.texts
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.labels, b.labels) and a.state == b.state


# ------------------------------------------------------------------------------ resume


def roundtrip_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def roundtrip_torch(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def same(a, b):
    assert a.texts == b.texts
    assert torch.equal(a.labels, b.labels) and torch.equal(a.input_ids, b.input_ids)
    assert (a.rows_seen, a.rows_skipped, a.classes_evicted, a.epoch) == (
        b.rows_seen,
        b.rows_skipped,
        b.classes_evicted,
        b.epoch,
    )


@pytest.mark.parametrize(
    "name, batch, k, m, extra, roundtrip",
    [
        ("two_class.jsonl", 16, 20, 15, {}, roundtrip_json),  # crosses the epoch at ~25
        ("many_class.jsonl", 16, 5, 5, {"max_buffered_rows": 40}, roundtrip_json),  # with evictions
        ("pairs.jsonl", 6, 5, 10, {"layout": "pairs"}, roundtrip_torch),
        ("bad_rows.jsonl", 4, 3, 12, {"samples_per_class": 2}, roundtrip_json),
    ],
)
def test_resume_continues_exactly(assets_dir, tiny_bert_dir, name, batch, k, m, extra, roundtrip):
    data = cfg(assets_dir, name, **extra)
    straight = take(data, tiny_bert_dir, batch, k + m, seed=3)
    assert any(b.state["replay"] > 0 for b in straight)  # states that re-assemble after a snapshot
    resumed = take(data, tiny_bert_dir, batch, m, seed=3, state=roundtrip(straight[k - 1].state))
    for a, b in zip(straight[k:], resumed):
        same(a, b)
    if name in ("two_class.jsonl", "pairs.jsonl"):
        assert straight[k - 1].epoch < straight[-1].epoch  # the epoch boundary lies after the resume


def test_resume_checks_the_state_belongs_to_the_run(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, "two_class.jsonl")
    state = take(data, tiny_bert_dir, 8, 1)[0].state
    with pytest.raises(DataError, match="seed"):
        BatchStream(data, str(tiny_bert_dir), 8, seed=1, state=state)
    with pytest.raises(DataError, match="source"):
        BatchStream(cfg(assets_dir, "many_class.jsonl"), str(tiny_bert_dir), 8, seed=0, state=state)


def test_seeds_differ(assets_dir, tiny_bert_dir):
    a = take(cfg(assets_dir, "many_class.jsonl"), tiny_bert_dir, 16, 2, seed=0)
    b = take(cfg(assets_dir, "many_class.jsonl"), tiny_bert_dir, 16, 2, seed=1)
    assert a[0].texts != b[0].texts


# ------------------------------------------------------------------------------ distributed


def test_ranks_read_disjoint_rows(assets_dir, tiny_bert_dir):
    data = cfg(assets_dir, "many_class.jsonl", shuffle_buffer=16)
    seen = []
    for rank in (0, 1):
        batches = take(data, tiny_bert_dir, 32, 4, rank=rank, world_size=2)
        assert all(b.input_ids.shape[0] == 16 and set(Counter(b.labels.tolist()).values()) == {4} for b in batches)
        assert all(b.epoch == 0 for b in batches)
        seen.append({t for b in batches for t in b.texts})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("labels", ["one class", "unique ids"])
def test_a_corpus_that_can_never_fill_two_classes_is_an_error_not_a_hang(tmp_path, tiny_bert_dir, labels):
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as handle:
        for i in range(300):
            label = "only" if labels == "one class" else f"id-{i}"
            handle.write(json.dumps({"text": f"row {i} alpha beta", "label": label}) + "\n")
    data = DataConfig(
        source=str(path),
        tokenizer_workers=0,
        shuffle_buffer=16,
        max_length=16,
        samples_per_class=4,
        max_buffered_rows=64,
    )
    stream = BatchStream(data, str(tiny_bert_dir), 16, seed=0)
    try:
        with pytest.raises(DataError, match="cannot form class-balanced batches"):
            next(stream)
    finally:
        stream.close()


def test_close_returns_while_a_batch_is_still_being_assembled(tmp_path, tiny_bert_dir):
    import threading
    import time

    path = tmp_path / "corpus.jsonl"
    with path.open("w") as handle:  # 20,000 classes of one row each: no batch for a long while
        for i in range(20_000):
            handle.write(json.dumps({"text": f"row {i}", "label": f"c{i}"}) + "\n")
    data = DataConfig(
        source=str(path),
        tokenizer_workers=0,
        shuffle_buffer=16,
        max_length=16,
        samples_per_class=4,
        max_buffered_rows=100_000,
    )
    stream = BatchStream(data, str(tiny_bert_dir), 16, seed=0)

    def wait_for_a_batch() -> None:
        try:
            next(stream, None)
        except Exception:  # close() from the other thread ends this wait one way or another
            pass

    reader = threading.Thread(target=wait_for_a_batch, daemon=True)
    reader.start()
    time.sleep(0.5)
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "close() hung while the reader thread was assembling a batch"


def test_all_unique_labels_are_refused_not_filled_with_copies(tmp_path, tiny_bert_dir):
    # max_buffered_rows far above the corpus: nothing is evicted, so without the distinct-rows rule each
    # class would fill up with copies of its one row after samples_per_class passes
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as handle:
        for i in range(120):
            handle.write(json.dumps({"text": f"row {i} alpha beta", "label": f"id-{i}"}) + "\n")
    data = DataConfig(source=str(path), tokenizer_workers=0, shuffle_buffer=16, max_length=16, samples_per_class=4)
    stream = BatchStream(data, str(tiny_bert_dir), 16, seed=0)
    try:
        with pytest.raises(DataError, match="distinct rows.*not a unique id"):
            next(stream)
    finally:
        stream.close()


def test_a_positive_is_never_a_copy_of_its_anchor(tmp_path, tiny_bert_dir):
    # every class has 3 distinct rows and samples_per_class is 2: rows repeat across passes, but within
    # a batch each class's rows must be distinct (a brute-force check over every batch)
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as handle:
        for c in range(10):
            for r in range(3):
                handle.write(json.dumps({"text": f"class {c} row {r}", "label": c}) + "\n")
    data = DataConfig(source=str(path), tokenizer_workers=0, shuffle_buffer=8, max_length=16, samples_per_class=2)
    batches = take(data, tiny_bert_dir, 8, 40)
    for batch in batches:
        by_label: dict[int, list[str]] = {}
        for text, label in zip(batch.texts, batch.labels.tolist()):
            by_label.setdefault(label, []).append(text)
        assert all(len(texts) >= 2 and len(set(texts)) == len(texts) for texts in by_label.values()), by_label


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_tokenizer_that_cannot_load_is_one_line_naming_it(assets_dir, tmp_path, workers):
    missing = tmp_path / "no-tokenizer-here"
    stream = BatchStream(cfg(assets_dir, "two_class.jsonl", tokenizer_workers=workers), str(missing), 8, seed=0)
    try:
        with pytest.raises(TripletctlError) as caught:
            next(stream)
    finally:
        stream.close()
    message = str(caught.value)
    assert "\n" not in message and f"cannot load the tokenizer '{missing}'" in message
    assert caught.value.exit_code == 2


# ------------------------------------------------------------------------------ what an epoch is


def _groups(batches) -> list[str]:
    """The pairs (by anchor text) of grouped batches, in the order they were emitted."""
    return [batch.texts[i] for batch in batches for i in range(0, len(batch.texts), 2)]


@pytest.mark.parametrize("buffer", [1, 8, 39, 40, 64, 2000])  # smaller than, as large as, larger than the 40 rows
@pytest.mark.parametrize("resume_after", [None, 3, 8])
def test_an_epoch_emits_every_row_once_whatever_the_shuffle_buffer(assets_dir, tiny_bert_dir, buffer, resume_after):
    """40 pairs, 5 a batch: batches 0-7 are the first pass, 8-15 the second. Each pass holds every
    row exactly once (a buffer larger than the corpus used to repeat rows), batches say their pass
    and rows_seen counts the rows passed on (40 at the end of a pass), also across a resume."""
    data = cfg(assets_dir, "pairs.jsonl", layout="pairs", shuffle_buffer=buffer)
    if resume_after is None:
        batches = take(data, tiny_bert_dir, 10, 16)
    else:
        first = take(data, tiny_bert_dir, 10, resume_after)
        state = json.loads(json.dumps(first[-1].state))
        batches = first + take(data, tiny_bert_dir, 10, 16 - resume_after, state=state)
    rows = [json.loads(line)["anchor"] for line in (assets_dir / "pairs.jsonl").read_text().splitlines()]
    emitted = _groups(batches)
    assert Counter(emitted[:40]) == Counter(rows) and Counter(emitted[40:]) == Counter(rows)
    if buffer > 1:
        assert emitted[:40] != emitted[40:]  # shuffled again in the second pass
    assert [b.epoch for b in batches] == [0] * 8 + [1] * 8
    assert [b.rows_seen for b in batches] == [5 * (i + 1) for i in range(16)]


@pytest.mark.parametrize("buffer", [1, 64, 2000])
def test_labelled_batches_see_every_row_once_per_pass_up_to_the_class_buffers(tmp_path, tiny_bert_dir, buffer):
    """384 rows of 12 classes, batch 64 (6 batches a pass): after k passes' worth of batches every row
    was emitted k times, give or take the rows a class buffer carries across a pass's end (a row read
    again while its first copy still waits in its class is dropped, so a positive is never a copy of
    its anchor: the lag can reach 2 after 4 passes); the
    default 2000-row buffer (larger than the corpus) gave 286 distinct rows in the first 384 (a row 3x)."""
    path = tmp_path / "rows.jsonl"
    rows = [f"c{c} row {r}" for c in range(12) for r in range(32)]
    path.write_text("".join(json.dumps({"text": text, "label": text.split()[0]}) + "\n" for text in rows))
    data = DataConfig(source=str(path), tokenizer_workers=0, max_length=16, shuffle_buffer=buffer)
    batches = take(data, tiny_bert_dir, 64, 24)
    emitted = [text for batch in batches for text in batch.texts]
    for passes in (1, 2, 4):
        counts = Counter(emitted[: 384 * passes])
        assert set(counts) <= set(rows) and len(counts) >= 384 - 64 if passes == 1 else len(counts) == 384
        slack = 1 if passes < 4 else 2
        assert all(abs(counts[text] - passes) <= slack for text in rows), Counter(counts.values())
    assert [b.epoch for b in batches[:4]] == [0] * 4 and batches[-1].epoch in (3, 4)


# ------------------------------------------------------------------------------ neighbour batches


def _fake_embeddings(labels: torch.Tensor, index: int) -> torch.Tensor:
    """What a model would give: a direction per class (seeded by its id) plus a little noise per batch."""
    rows = [torch.randn(8, generator=torch.Generator().manual_seed(int(c) % 2**31)) for c in labels.tolist()]
    noise = torch.randn(len(rows), 8, generator=torch.Generator().manual_seed(index))
    return torch.stack(rows) + 0.1 * noise


def _neighbour_run(data, tok, n, centroids, state=None, saved=None):
    """`n` neighbour batches with a trainer stand-in that feeds `centroids` every batch it consumes;
    `saved` gets the centroids' state after each batch (as a checkpoint would hold it)."""
    from tripletctl.data.neighbours import NeighbourBatches

    stream = BatchStream(
        data, str(tok), 16, 3, state=state, neighbours=NeighbourBatches(centroids.board, 0.5, 2, refresh=3)
    )
    centroids.start(stream.next_index, new_phase=state is None)
    batches = []
    try:
        for _ in range(n):
            batches.append(next(stream))
            b = batches[-1]
            centroids.after_batch(b.index, _fake_embeddings(b.labels, b.index), b.labels)
            if saved is not None:
                saved.append(roundtrip_torch(centroids.state_dict()))
    finally:
        stream.close()
    return batches


@pytest.mark.parametrize("roundtrip", [roundtrip_json, roundtrip_torch])
def test_neighbour_batches_resume_exactly(assets_dir, tiny_bert_dir, roundtrip):
    """The stream resumed from a batch's state, with the centroids saved at that batch, makes the same
    batches: re-assembled batches take their logged classes, later ones the restored snapshots."""
    from tripletctl.train.class_centroids import ClassCentroids

    data, k, m, saved = cfg(assets_dir, "many_class.jsonl", max_buffered_rows=200), 12, 10, []
    straight = _neighbour_run(data, tiny_bert_dir, k + m, ClassCentroids(refresh=3), saved=saved)
    assert [b.index for b in straight] == list(range(k + m))
    state = straight[k - 1].state
    assert state["replay"] > 0 and any(state["choices"][: state["replay"]])  # re-assembles neighbour batches
    resumed = _neighbour_run(
        data, tiny_bert_dir, m, ClassCentroids.from_state_dict(saved[k - 1]), state=roundtrip(state)
    )
    for a, b in zip(straight[k:], resumed):
        same(a, b)
    for b in straight:  # class balanced: 4 classes of 4 rows
        assert sorted(Counter(b.labels.tolist()).values()) == [4, 4, 4, 4]


def test_neighbour_batches_hold_closer_classes_than_random_ones(assets_dir, tiny_bert_dir):
    from tripletctl.train.class_centroids import ClassCentroids

    def mean_pair_cosine(batches, centroids):
        """Of the batch's last two classes: a neighbour batch's group (its first two are its random share)."""
        snap, cosines = centroids.snapshot(), []
        for b in batches[12:]:  # once most classes have a centroid
            classes = list(dict.fromkeys(b.labels.tolist()))[2:]  # a batch's classes in the order chosen
            if all(c in snap.row_of for c in classes):
                cosines.append(float(snap.vectors[snap.row_of[classes[0]]] @ snap.vectors[snap.row_of[classes[1]]]))
        assert len(cosines) > 10
        return sum(cosines) / len(cosines)

    data = cfg(assets_dir, "many_class.jsonl", max_buffered_rows=400)
    centroids = ClassCentroids(refresh=3)
    neighbour = _neighbour_run(data, tiny_bert_dir, 40, centroids)
    random_batches = take(data, tiny_bert_dir, 16, 40, seed=3)
    near, far = mean_pair_cosine(neighbour, centroids), mean_pair_cosine(random_batches, centroids)
    assert near > far + 0.3, (near, far)
