"""Loading a tokenizer: one rule for the model (model/encoder.py) and the tokenizer worker processes (workers.py).

A module of its own because every worker process imports it at start-up: importing model/encoder.py there
would add the modelling code of transformers (~120 MB of memory per worker and seconds of start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tripletctl.core.errors import ModelError, one_line
from tripletctl.core.folders import check_model_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Fast (Rust) tokenizers only: batching, offsets and worker throughput depend on them."""
    from transformers import AutoTokenizer

    check_model_folder(name_or_path)  # no custom code, no symlink out, bounded files (a hub name: skipped)
    try:  # trust_remote_code=False: never the terminal prompt, never code from the folder
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as e:  # OSError (missing / unreachable), ValueError, JSON errors...
        raise ModelError(f"cannot load the tokenizer {name_or_path!r}: {one_line(e)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"tokenizer {name_or_path!r} has no fast (tokenizers) implementation")
    return tokenizer
