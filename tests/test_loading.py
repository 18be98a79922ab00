"""What `eval`, `compare` and `inspect-collapse` read (commands/loading.py): the run's saved eval
block without --data, the options given changing it, the run's column names on another file, and
every bad source option as one line, exit 2."""

from __future__ import annotations

import json

import pytest
from helpers import ASSETS, TINY_BERT, cli_on_cpu


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["labelled", "pairs", "triplets"])
def test_eval_and_inspect_use_the_runs_saved_eval_block(saved_run, layout):

    runs, _, _ = saved_run
    result = cli_on_cpu("eval", runs[layout], "--json")
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
    typed = cli_on_cpu("eval", runs["none"], "--data", data, "--layout", layout, "--max-rows", saved["rows"], "--json")
    assert typed.exit_code == 0, typed.output
    assert {k: v for k, v in json.loads(typed.stdout).items() if k != "checkpoint"} == {
        k: v for k, v in saved.items() if k != "checkpoint"
    }
    # options given without --data change the saved block
    fewer = cli_on_cpu("eval", runs[layout], "--max-rows", 30, "--json")
    assert fewer.exit_code == 0 and json.loads(fewer.stdout)["rows"] == 30
    inspect = cli_on_cpu("inspect-collapse", runs[layout], "--json")
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
        result = cli_on_cpu(command, *args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (args, result.output)


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
    result = cli_on_cpu("eval", tmp_path / "run", "--data", tmp_path / "mine.jsonl", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 15 and json.loads(result.stdout)["classes"] == 3


def test_a_split_of_one_local_file_is_refused(saved_run):
    """Issue 36, item 9: `--split test` on one local file was accepted and read the whole file."""

    runs, _, _ = saved_run
    result = cli_on_cpu("eval", runs["none"], "--data", ASSETS / "train.jsonl", "--split", "test")
    assert result.exit_code == 2
    assert (
        "split 'test' asked of the local data source" in result.output and "local files have one split" in result.output
    )
