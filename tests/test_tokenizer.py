"""tokenizer.py: one loader for the model and the tokenizer workers; the workers' import stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tripletctl.core.errors import ModelError
from tripletctl.data.tokenizer import load_tokenizer


def test_the_tiny_tokenizer_loads_fast(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    assert tokenizer.is_fast and tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_a_missing_tokenizer_is_one_line_naming_it(tmp_path):
    with pytest.raises(ModelError) as caught:
        load_tokenizer(str(tmp_path / "absent"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot load the tokenizer '{tmp_path / 'absent'}': ")


def test_a_worker_process_imports_no_modelling_code():
    """A tokenizer worker imports stream.py (spawn): with model.py it would also load transformers'
    modelling code, ~120 MB and seconds of start-up per worker."""
    code = (
        "import sys, tripletctl.data.stream\n"
        "heavy = [m for m in ('tripletctl.model.encoder', 'tripletctl.train.loop', 'transformers.modeling_utils') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
