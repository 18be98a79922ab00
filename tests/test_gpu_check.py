"""bench/gpu_check.py --smoke: the GPU check's whole script at tiny sizes on the CPU, so it cannot rot
between GPU runs. One subprocess (~1-2 minutes on a 2-core machine): every section prints PASS rows
and none FAILs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults


def test_gpu_check_smoke_prints_one_table_of_pass_rows(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    table = proc.stdout
    assert proc.returncode == 0, table[-6000:] + proc.stderr[-3000:]
    lines = table.splitlines()
    assert lines[0].startswith("tripletctl GPU check --smoke") and lines[-1].endswith("overall: PASS"), table
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]
    assert not [r for r in rows if r["verdict"] == "FAIL"], table
    for section in ("env", "cuda", "e2e", "perf", "st"):
        assert any(r["verdict"] == "PASS" and r["section"] == section for r in rows), (section, table)
    # the checks that matter most are there by name
    checks = " ".join(r["check"] for r in rows if r["verdict"] == "PASS")
    for words in ("kill -9", "--resume", "re-run after resume", "tripletctl eval", "inspect-collapse", "MFU"):
        assert words in checks, (words, table)
    assert (tmp_path / "out" / "gpu_check.txt").read_text().strip() == table.strip()
