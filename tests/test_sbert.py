"""Saved model folders against the real libraries: sentence-transformers gives tripletctl's own
embeddings, plain transformers loads every weight, and folders of the previous format still load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sentence_transformers  # the test extra: the real library, never skipped
import torch
from helpers import save_previous_format
from transformers import AutoModel

from tripletctl.config.blocks import ModelConfig
from tripletctl.model.card import Provenance
from tripletctl.model.encoder import build_model, encode, load_model, save_model
from tripletctl.model.sbert import activation_path, head_layers

TEXTS = [
    "the quick brown fox",
    "a",
    "jumps over the lazy dog and keeps running far beyond the length limit of sixteen tokens for sure",
    "hello world",
    "tokens tokens tokens",
]
MAX_LENGTH = 16


def trained_like(tiny_bert_dir: Path, pooling: str, head: tuple[int, ...], normalize: bool, seed: int = 3):
    """A tiny model whose head biases are not zero (a fresh nn.Linear's are not either, but be sure)."""
    model, tok = build_model(
        ModelConfig(name=str(tiny_bert_dir), init="config", pooling=pooling, head=head, normalize=normalize), seed
    )
    with torch.no_grad():
        for p in model.head.parameters() if model.head is not None else ():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval(), tok


def provenance(distance: str = "euclidean", max_length: int = MAX_LENGTH) -> Provenance:
    return Provenance(curriculum={"data": {"max_length": max_length}, "phases": [{"name": "p", "distance": distance}]})


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("head", [(), (32,), (48, 16)])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_encode_equals_tripletctl(tiny_bert_dir, tmp_path, pooling, head, normalize):
    model, tok = trained_like(tiny_bert_dir, pooling, head, normalize)
    save_model(model, tok, tmp_path, provenance())
    ours = encode(model, tok, TEXTS, batch_size=2, max_length=MAX_LENGTH).numpy()

    st = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)
    theirs = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)

    assert st.max_seq_length == MAX_LENGTH
    assert theirs.shape == ours.shape == (len(TEXTS), model.embedding_dim)
    assert abs(theirs - ours).max() <= 1e-5
    if not normalize:  # the comparison must not pass just because both are unit vectors
        assert abs(float(torch.as_tensor(ours).norm(dim=1).mean()) - 1.0) > 1e-3


def test_without_the_st_files_the_embeddings_would_be_wrong(tiny_bert_dir, tmp_path):
    """The bug this layout fixes: a bare encoder folder loads in sentence-transformers as mean
    pooling without head or norm, silently. The test above would catch a return to it."""
    model, tok = trained_like(tiny_bert_dir, "cls", (32,), True)
    save_model(model, tok, tmp_path, provenance())
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        (tmp_path / name).unlink()
    st = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)
    ours = encode(model, tok, TEXTS, max_length=MAX_LENGTH)
    assert st.encode(TEXTS).shape[1] != ours.shape[1]


@pytest.mark.parametrize("distance", ["euclidean", "squared-euclidean"])
def test_similarity_and_pooling_configs(tiny_bert_dir, tmp_path, distance):
    model, tok = trained_like(tiny_bert_dir, "cls", (32, 8), True)
    save_model(model, tok, tmp_path, provenance(distance))
    st = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)
    assert st.similarity_fn_name == "euclidean"
    modules = [type(m).__name__ for m in st]
    assert modules == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    dense = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("2_Dense", "3_Dense")]
    assert [d["activation_function"] for d in dense] == [
        "torch.nn.modules.activation.GELU",
        "torch.nn.modules.linear.Identity",
    ]
    assert [(d["in_features"], d["out_features"]) for d in dense] == [(64, 32), (32, 8)]


def test_activation_must_be_default_constructible():
    assert activation_path(torch.nn.GELU()) == "torch.nn.modules.activation.GELU"
    with pytest.raises(ValueError, match="tanh"):
        activation_path(torch.nn.GELU(approximate="tanh"))
    head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    assert [a for _, a in head_layers(head)] == ["torch.nn.modules.activation.Tanh", "torch.nn.modules.linear.Identity"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("head", [(), (16,)])
def test_automodel_loads_with_a_clean_report(tiny_bert_dir, tmp_path, head):
    from transformers.utils import logging as transformers_logging

    model, tok = trained_like(tiny_bert_dir, "mean", head, True)
    save_model(model, tok, tmp_path, provenance())
    capture = _Capture()
    library_logger = logging.getLogger("transformers")
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_info()  # everything, so a report cannot hide below the level
    library_logger.addHandler(capture)
    try:
        plain, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        library_logger.removeHandler(capture)
        transformers_logging.set_verbosity(previous)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    report = "\n".join(capture.messages)
    assert "LOAD REPORT" not in report and "MISSING" not in report and "newly initialized" not in report
    assert capture.messages, "the capture saw nothing at info level: it would not see a report either"
    ids = tok(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    torch.testing.assert_close(plain.eval()(**ids).last_hidden_state, model.encoder(**ids).last_hidden_state)


def test_capture_sees_a_missing_weight_report(tiny_bert_dir, tmp_path):
    """The clean-report test can fail: a folder saved without the pooler is reported."""
    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir), add_pooling_layer=False).save_pretrained(tmp_path)
    capture = _Capture()
    logging.getLogger("transformers").addHandler(capture)
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        _, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(capture)
        transformers_logging.set_verbosity(previous)
    assert info["missing_keys"] and "MISSING" in "\n".join(capture.messages)


@pytest.mark.parametrize("head", [(), (32, 16)])
def test_previous_format_still_loads(tiny_bert_dir, tmp_path, head):
    model, tok = trained_like(tiny_bert_dir, "cls", head, False)
    save_previous_format(model, tok, tmp_path)
    assert not (tmp_path / "modules.json").exists()
    loaded, tok2 = load_model(tmp_path)
    torch.testing.assert_close(
        encode(loaded, tok2, TEXTS, max_length=MAX_LENGTH),
        encode(model, tok, TEXTS, max_length=MAX_LENGTH),
        atol=1e-6,
        rtol=0,
    )
