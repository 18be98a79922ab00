"""MetricsLog: the one owner of a phase's metrics.jsonl (append, truncate on resume, read)."""

from __future__ import annotations

import json
import math

import pytest

from tripletctl.core.errors import CheckpointError
from tripletctl.outputs.metrics_log import METRICS_FILE, MetricsLog


def _steps(*global_steps: int) -> list[dict]:
    return [{"global_step": g, "loss": 0.5 / g} for g in global_steps]


def test_appended_records_read_back_in_order_as_strict_json(tmp_path):
    log = MetricsLog(tmp_path)
    log.open()
    log.append(*_steps(1, 2))
    log.append({"event": "eval", "global_step": 2, "recall@1": math.nan})
    log.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        *_steps(1, 2),
        {"event": "eval", "global_step": 2, "recall@1": None},
    ]
    assert MetricsLog(tmp_path).records() == [json.loads(line) for line in lines]


def test_an_unopened_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path)  # another rank under torchrun: never opened
    log.append(*_steps(1))
    log.close()
    assert not (tmp_path / METRICS_FILE).exists()
    assert log.records() == []


def test_reopening_on_resume_drops_what_came_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    log.open()
    log.append(*_steps(1, 2, 3, 4))
    log.close()
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"global_step": 5, "lo')  # a line cut by the crash
    log.open(keep_up_to=2)
    log.append(*_steps(3))
    log.close()
    assert [r["global_step"] for r in MetricsLog(tmp_path).records()] == [1, 2, 3]


def test_torn_blank_and_foreign_lines_are_skipped(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"global_step": 1}\n\n[1, 2]\nnot json\n{"global_step": 2}\n{"glob')
    assert MetricsLog(tmp_path).records() == [{"global_step": 1}, {"global_step": 2}]


def test_bytes_that_are_not_text(tmp_path):
    (tmp_path / METRICS_FILE).write_bytes(b'{"global_step": 1}\n\xff\xfe\x00garbage\n')
    assert MetricsLog(tmp_path).records() == [{"global_step": 1}]  # the runner's own file: replaced, skipped
    with pytest.raises(CheckpointError, match="cannot be read as JSON lines"):
        MetricsLog(tmp_path).records(strict_text=True)  # a damaged file given to `plot`: one clear line
