"""`tripletctl eval` (commands/eval_command.py): the metrics as JSON or a table, what was read and
where texts were cut, accuracy on the data's own negatives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ASSETS, cli_on_cpu, st_folder


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


@pytest.mark.slow
def test_eval_on_triplet_data_reports_given_negative_accuracy(saved_run):

    from tripletctl.model.encoder import encode

    runs, model, tokenizer = saved_run
    data = ASSETS / "triplets3.jsonl"
    result = cli_on_cpu(
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
def test_eval_of_a_model_folder_says_the_length_it_cut_at(tmp_path, tiny_bert_dir):
    """Issue 36, item 9: `eval MODEL_FOLDER` cut texts at the folder's length without saying so."""

    folder = st_folder(tiny_bert_dir, tmp_path / "st")  # its tokenizer says 16 tokens
    data = ASSETS / "two_class.jsonl"
    table = cli_on_cpu("eval", folder, "--data", data, "--max-rows", 60)
    assert table.exit_code == 0, table.output
    assert "texts cut at 16 tokens (the tokenizer's model_max_length (at most 512); a run's own held-out" in (
        " ".join(table.output.split())
    )
    default = json.loads(cli_on_cpu("eval", folder, "--data", data, "--max-rows", 60, "--json").stdout)
    longer = json.loads(
        cli_on_cpu("eval", folder, "--data", data, "--max-rows", 60, "--max-length", 64, "--json").stdout
    )
    assert default["max_length"] == 16 and longer["max_length"] == 64 and longer["map@r"] != default["map@r"]
