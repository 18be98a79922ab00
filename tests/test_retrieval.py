"""Retrieval metrics against brute force, chunked search, and the `eval` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ASSETS, TINY_BERT, st_folder

from tripletctl.core.errors import DataError, NonFiniteError
from tripletctl.evaluation import retrieval as evaluation
from tripletctl.evaluation.retrieval import retrieval_metrics, sample_triplets, triplet_accuracy


def brute_force(emb: np.ndarray, labels: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Straight from the definitions: a full N x N distance matrix and Python loops."""
    n = len(labels)
    d = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    out = {f"recall@{k}": 0.0 for k in ks}
    out["map@r"] = 0.0
    out["r_precision"] = 0.0
    q = 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        r = sum(labels[j] == labels[i] for j in others)
        if r == 0:
            continue
        q += 1
        # ties broken against the model: other-label items first among equal distances
        ranked = sorted(others, key=lambda j: (d[i, j], labels[j] == labels[i], j))
        rel = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            out[f"recall@{k}"] += any(rel[:k])
        out["r_precision"] += sum(rel[:r]) / r
        ap = 0.0
        for pos in range(1, r + 1):
            if rel[pos - 1]:
                ap += sum(rel[:pos]) / pos
        out["map@r"] += ap / r
    return {k: v / q for k, v in out.items()} | {"queries": q}


def random_set(n: int, d: int, classes: int, seed: int, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, d))
    emb = centres[labels] + noise * rng.normal(size=(n, d))
    return emb.astype(np.float32), labels


@pytest.mark.parametrize("n,d,classes,seed", [(40, 4, 3, 0), (60, 8, 2, 1), (75, 3, 12, 2), (30, 5, 25, 3)])
def test_metrics_match_brute_force(n, d, classes, seed):
    emb, labels = random_set(n, d, classes, seed)
    got = retrieval_metrics(emb, labels, chunk_size=16)
    want = brute_force(emb.astype(np.float64), labels)
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["queries"] == want["queries"]
    assert got["excluded_queries"] == n - want["queries"]


def test_hand_computed_tiny_case():
    # 1-D points: A at 0, 1, 10; B at 2.5, 11 (no distance ties).
    emb = np.array([[0.0], [1.0], [10.0], [2.5], [11.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1, 2))
    # query (R): ranked relevance -> AP@R, R-precision, r@1, r@2
    # 0 (R=2): 1 A, 2.5 B, 10 A, 11 B   -> (1/1)/2 = .5, 1/2, 1, 1
    # 1 (R=2): 0 A, 2.5 B, 10 A, 11 B   -> .5, .5, 1, 1
    # 2 (R=2): 11 B, 2.5 B, 1 A, 0 A    -> 0, 0, 0, 0
    # 3 (R=1): 1 A, 0 A, 10 A, 11 B     -> 0, 0, 0, 0
    # 4 (R=1): 10 A, 2.5 B, 1 A, 0 A    -> 0, 0, 0, 1
    assert m["recall@1"] == pytest.approx(2 / 5)
    assert m["recall@2"] == pytest.approx(3 / 5)
    assert m["map@r"] == pytest.approx((0.5 + 0.5) / 5)
    assert m["r_precision"] == pytest.approx((0.5 + 0.5) / 5)


def test_perfect_and_unique_labels():
    emb = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1], [9.0, -9.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])  # label 2 appears once: excluded, counted
    m = retrieval_metrics(emb, labels)
    assert m["recall@1"] == m["map@r"] == m["r_precision"] == 1.0
    assert m["excluded_queries"] == 1 and m["queries"] == 4 and m["classes"] == 3
    assert m["triplet_accuracy"] == 1.0
    with pytest.raises(DataError, match="no label appears twice"):
        retrieval_metrics(emb[:3:2], labels[:3:2])


def test_collapsed_embeddings_score_zero_triplet_accuracy():
    emb = np.ones((20, 4), dtype=np.float32)
    labels = np.arange(20) % 4
    m = retrieval_metrics(emb, labels)
    assert m["triplet_accuracy"] == 0.0  # ties fail: d(a,p) < d(a,n) is strict


def test_chunk_sizes_agree_and_never_build_n_by_n(monkeypatch):
    emb, labels = random_set(53, 6, 4, 7)
    shapes: list[tuple[int, int]] = []
    real = evaluation._distance_block

    def spy(q, k, ksq):
        out = real(q, k, ksq)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(evaluation, "_distance_block", spy)
    results = [retrieval_metrics(emb, labels, chunk_size=c) for c in (1, 7, 53, 1000)]
    for other in results[1:]:
        assert other == pytest.approx(results[0])
    shapes.clear()
    retrieval_metrics(emb, labels, chunk_size=7)
    assert shapes and all(rows <= 7 and cols == 53 for rows, cols in shapes)


def test_two_classes_need_top_r_not_top_10():
    # R ~ N/2 = 59: MAP@R must look far past the 10 nearest
    emb, labels = random_set(120, 3, 2, 11, noise=2.0)
    got = retrieval_metrics(emb, labels, chunk_size=32)
    want = brute_force(emb.astype(np.float64), labels)
    assert got["map@r"] == pytest.approx(want["map@r"], abs=1e-9)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-9)


def test_sampled_triplets_are_valid_uniform_and_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 7)
    a, p, n = sample_triplets(labels, 20000, seed=3)
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert not (labels[a] == 2).any()  # no positive exists for the singleton
    a2, p2, n2 = sample_triplets(labels, 20000, seed=3)
    assert (a == a2).all() and (p == p2).all() and (n == n2).all()
    # negatives of class-3 anchors are uniform over the 9 other rows
    counts = np.bincount(n[labels[a] == 3], minlength=len(labels))[:9]
    assert counts.min() > 0.8 * counts.mean()


def test_triplet_accuracy_matches_exhaustive_fraction():
    emb, labels = random_set(24, 2, 3, 5, noise=1.5)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    # anchors are drawn uniformly (then partners uniformly), so the expectation is a mean per anchor
    per_anchor = []
    for a in range(24):
        pos = [p for p in range(24) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(24) if labels[n] != labels[a]]
        per_anchor.append(np.mean([d[a, p] < d[a, n] for p in pos for n in neg]))
    acc, used = triplet_accuracy(emb, labels, num=40000, seed=0)
    assert used == 40000
    assert acc == pytest.approx(float(np.mean(per_anchor)), abs=0.01)


def test_accepts_torch_input():
    emb, labels = random_set(30, 4, 3, 9)
    assert retrieval_metrics(torch.tensor(emb), torch.tensor(labels)) == pytest.approx(retrieval_metrics(emb, labels))


# ------------------------------------------------------------------------------------ command


def test_eval_cli_json_and_table(tmp_path, tiny_bert_dir):
    """`tripletctl eval` on a run directory made by checkpoint.save_checkpoint (latest phase wins)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModel
    from typer.testing import CliRunner

    from tripletctl.cli import app
    from tripletctl.data.tokenizer import load_tokenizer
    from tripletctl.model.encoder import TripletEncoder
    from tripletctl.outputs.checkpoint_save import save_checkpoint

    torch.manual_seed(0)
    model = TripletEncoder(AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir)), head=(16,))
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    run = tmp_path / "run"
    save_checkpoint(
        run / "phase-0-semi-hard" / "checkpoint",
        model=model,
        tokenizer=tokenizer,
        optimizer=None,
        state={"phase_index": 0},
        stream_state=None,
        curriculum={"data": {"max_length": 32}},
    )
    heldout = Path(tiny_bert_dir).parent / "heldout.jsonl"
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(heldout.read_text().splitlines()[:80]) + "\n")

    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # nothing but JSON on stdout
    assert payload["rows"] == 80 and payload["checkpoint"].endswith("checkpoint")
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision", "triplet_accuracy"):
        assert 0.0 <= payload[key] <= 1.0, key

    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--max-rows", "40"])
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output and "40 rows" in result.output

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nothing"), "--data", str(data)])
    assert result.exit_code == 2 and "does not exist" in result.output


# ------------------------------------------------------------------------------------ layouts and saved eval blocks


def test_given_triplet_accuracy_matches_a_loop():
    emb, _ = random_set(30, 5, 3, 11)
    rng = np.random.default_rng(0)
    triplets = [tuple(int(x) for x in rng.choice(30, 3, replace=False)) for _ in range(200)]
    triplets.append((0, 1, 1))  # a tie fails (strict), like a collapsed model
    expected = np.mean([np.linalg.norm(emb[a] - emb[p]) < np.linalg.norm(emb[a] - emb[n]) for a, p, n in triplets])
    acc, used = evaluation.given_triplet_accuracy(torch.tensor(emb), triplets)
    assert used == 201 and acc == pytest.approx(float(expected), abs=1e-12)
    assert np.isnan(evaluation.given_triplet_accuracy(torch.tensor(emb), [])[0])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory per eval block (None: no block), holding one untrained tiny-BERT checkpoint."""
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


def _cli(*args):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu"])


@pytest.mark.slow
def test_eval_on_triplet_data_reports_given_negative_accuracy(saved_run):

    from tripletctl.model.encoder import encode

    runs, model, tokenizer = saved_run
    data = ASSETS / "triplets3.jsonl"
    result = _cli(
        "eval",
        runs["none"],
        "--data",
        data,
        "--layout",
        "triplets",
        "--negative-column",
        "negative_1",
        "--negative-column",
        "negative_2",
        "--negative-column",
        "negative_3",
        "--max-rows",
        100,
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rows = [json.loads(line) for line in data.read_text().splitlines()][:20]  # 100 texts = 20 rows of 5
    assert payload["rows"] == 100 and payload["given_triplets"] == 60
    assert payload["queries"] == 40 and payload["excluded_queries"] == 60  # negatives are distractors only
    texts = [t for r in rows for t in (r["anchor"], r["positive"], r["negative_1"], r["negative_2"], r["negative_3"])]
    emb = encode(model, tokenizer, texts, max_length=32, device="cpu").numpy()
    wins = [
        np.linalg.norm(emb[5 * i] - emb[5 * i + 1]) < np.linalg.norm(emb[5 * i] - emb[5 * i + j])
        for i in range(20)
        for j in (2, 3, 4)
    ]
    assert payload["given_negative_accuracy"] == pytest.approx(float(np.mean(wins)), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["labelled", "pairs", "triplets"])
def test_eval_and_inspect_use_the_runs_saved_eval_block(saved_run, layout):

    runs, _, _ = saved_run
    result = _cli("eval", runs[layout], "--json")
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["rows"] == {"labelled": 120, "pairs": 60, "triplets": 150}[layout]  # the block's max_rows
    assert ("given_negative_accuracy" in saved) == (layout == "triplets")
    # the same numbers as the same source typed on the command line
    data = {
        "labelled": TINY_BERT.parent / "heldout.jsonl",
        "pairs": ASSETS / "pairs.jsonl",
        "triplets": ASSETS / "triplets_heldout.jsonl",
    }[layout]
    typed = _cli("eval", runs["none"], "--data", data, "--layout", layout, "--max-rows", saved["rows"], "--json")
    assert typed.exit_code == 0, typed.output
    assert {k: v for k, v in json.loads(typed.stdout).items() if k != "checkpoint"} == {
        k: v for k, v in saved.items() if k != "checkpoint"
    }
    # options given without --data change the saved block
    fewer = _cli("eval", runs[layout], "--max-rows", 30, "--json")
    assert fewer.exit_code == 0 and json.loads(fewer.stdout)["rows"] == 30
    inspect = _cli("inspect-collapse", runs[layout], "--json")
    assert inspect.exit_code in (0, 1, 3), inspect.output
    assert json.loads(inspect.stdout)["rows"] == saved["rows"]


@pytest.mark.parametrize("command", ["eval", "inspect-collapse"])
def test_no_saved_eval_block_and_bad_source_options_are_one_line_exit_2(saved_run, command):

    runs, _, _ = saved_run
    cases = [
        ([runs["none"]], "has no eval block: pass --data SOURCE"),
        ([runs["none"], "--layout", "pairs"], "has no eval block"),
        (
            [runs["none"], "--data", ASSETS / "triplets.jsonl", "--layout", "pairs"],
            "would drop the negative column 'negative'",
        ),
        ([runs["triplets"], "--layout", "pairs"], "layout triplets would fit"),  # changes the saved block
        (
            [runs["none"], "--data", ASSETS / "triplets3.parquet", "--layout", "triplets"],
            "layout triplets with negative columns negative_1, negative_2, negative_3 would fit",
        ),
        ([runs["none"], "--data", ASSETS / "pairs.jsonl"], "layout pairs would fit"),
        (
            [runs["none"], "--data", ASSETS / "train.jsonl", "--layout", "tripplets"],
            "--layout must be one of labelled, pairs, triplets, got 'tripplets' (did you mean 'triplets'?)",
        ),
        (
            [runs["none"], "--data", ASSETS / "train.jsonl", "--load-dataset", "split=test"],
            "--load-dataset must be free of 'split'",
        ),
        (
            [runs["none"], "--data", ASSETS / "train.jsonl", "--load-dataset", "name"],
            "--load-dataset expects KEY=VALUE",
        ),
    ]
    for args, expected in cases:
        result = _cli(command, *args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (args, result.output)


def test_a_one_point_model_never_scores_well():
    # every embedding identical: all distances tie, and ties are broken against the model
    labels = np.arange(40) % 5
    for point in (np.ones(8), np.random.default_rng(0).normal(size=8)):
        emb = np.tile(point.astype(np.float32), (40, 1))
        m = retrieval_metrics(emb, labels)
        assert m["recall@1"] == m["recall@5"] == m["recall@10"] == 0.0
        assert m["map@r"] == m["r_precision"] == m["triplet_accuracy"] == 0.0
        want = brute_force(emb.astype(np.float64), labels)
        assert {k: m[k] for k in want if k != "queries"} == pytest.approx(
            {k: v for k, v in want.items() if k != "queries"}
        )


def test_partial_ties_are_broken_pessimistically_like_the_reference():
    # two points only: half the rows at each, labels mixed, so every query has same- and other-label ties
    rng = np.random.default_rng(3)
    emb = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32), 30, axis=0)
    labels = rng.integers(0, 3, size=60)
    got = retrieval_metrics(emb, labels, chunk_size=7)
    want = brute_force(emb.astype(np.float64), labels)
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused(bad):
    emb, labels = random_set(30, 4, 3, 1)
    emb[7, 2] = bad
    with pytest.raises(NonFiniteError, match="non-finite embeddings .* for 1 of 30 rows"):
        retrieval_metrics(emb, labels)


# ------------------------------------------------------------------------------------ issue 36: cross-checks and eval


@pytest.mark.parametrize(
    "n,d,classes,seed", [(40, 4, 3, 0), (60, 8, 2, 1), (75, 3, 12, 2), (30, 5, 25, 3), (500, 16, 40, 4)]
)
def test_metrics_match_pytorch_metric_learning(n, d, classes, seed):
    """recall@1, MAP@R and R-precision against pytorch-metric-learning's AccuracyCalculator (the `test`
    extra): leave-one-out over one set, euclidean, queries with a unique label left out by both."""
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    emb, labels = random_set(n, d, classes, seed)
    calculator = accuracy.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
        device=torch.device("cpu"),
    )
    theirs = calculator.get_accuracy(torch.tensor(emb), torch.tensor(labels))
    ours = retrieval_metrics(emb, labels, chunk_size=16)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


@pytest.mark.slow
def test_eval_of_a_model_folder_says_the_length_it_cut_at(tmp_path, tiny_bert_dir):
    """Issue 36, item 9: `eval MODEL_FOLDER` cut texts at the folder's length without saying so."""

    folder = st_folder(tiny_bert_dir, tmp_path / "st")  # its tokenizer says 16 tokens
    data = ASSETS / "two_class.jsonl"
    table = _cli("eval", folder, "--data", data, "--max-rows", 60)
    assert table.exit_code == 0, table.output
    assert "texts cut at 16 tokens (the tokenizer's model_max_length (at most 512); a run's own held-out" in (
        " ".join(table.output.split())
    )
    default = json.loads(_cli("eval", folder, "--data", data, "--max-rows", 60, "--json").stdout)
    longer = json.loads(_cli("eval", folder, "--data", data, "--max-rows", 60, "--max-length", 64, "--json").stdout)
    assert default["max_length"] == 16 and longer["max_length"] == 64 and longer["map@r"] != default["map@r"]


def test_eval_with_data_reads_it_with_the_runs_column_names(tmp_path, saved_run):
    """Issue 36, item 4: `eval RUN --data f.jsonl` without --label-column failed on `label`."""
    from tripletctl.outputs.checkpoint_save import save_checkpoint

    _, model, tokenizer = saved_run
    rows = [{"body": f"{c} text {i}", "topic": c} for c in ("a", "b", "c") for i in range(5)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curriculum = {"data": {"source": "unused", "text_column": "body", "label_column": "topic", "max_length": 32}}
    save_checkpoint(
        tmp_path / "run" / "phase-0-p" / "checkpoint",
        model=model,
        tokenizer=tokenizer,
        optimizer=None,
        state={"phase_index": 0},
        stream_state=None,
        curriculum=curriculum,
    )
    result = _cli("eval", tmp_path / "run", "--data", tmp_path / "mine.jsonl", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 15 and json.loads(result.stdout)["classes"] == 3


def test_a_split_of_one_local_file_is_refused(saved_run):
    """Issue 36, item 9: `--split test` on one local file was accepted and read the whole file."""

    runs, _, _ = saved_run
    result = _cli("eval", runs["none"], "--data", ASSETS / "train.jsonl", "--split", "test")
    assert result.exit_code == 2
    assert (
        "split 'test' asked of the local data source" in result.output and "local files have one split" in result.output
    )
