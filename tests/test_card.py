"""The model card: Hugging Face front matter, the facts of the run, and usage code that really runs."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tripletctl.config.blocks import ModelConfig
from tripletctl.model.card import Provenance, is_hub_id, render_card
from tripletctl.model.encoder import build_model, encode, save_model

META = {"pooling": "mean", "head": [256], "normalize": True, "embedding_dim": 256, "hidden_size": 768}
HUB_CURRICULUM = {
    "model": {"name": "bert-base-uncased", "init": "pretrained"},
    "data": {
        "source": "sentence-transformers/all-nli",
        "split": "train",
        "layout": "pairs",
        "samples_per_class": 2,
        "max_length": 64,
    },
    "phases": [
        {
            "name": "semi-hard",
            "mining": "semi-hard",
            "batch_size": 500,
            "margin": 0.2,
            "steps": 2000,
            "distance": "squared-euclidean",
            "lr": 2e-5,
        },
        {
            "name": "batch-hard",
            "mining": "batch-hard",
            "batch_size": 2000,
            "margin": 0.3,
            "steps": 1000,
            "distance": "squared-euclidean",
            "lr": 1e-5,
        },
    ],
    "eval": {"source": "sentence-transformers/all-nli", "split": "test"},
}
METRICS = {
    "event": "eval",
    "global_step": 3000,
    "recall@1": 0.8125,
    "recall@5": 0.9,
    "recall@10": 0.95,
    "map@r": 0.5,
    "r_precision": 0.55,
    "triplet_accuracy": 0.97,
    "rows": 2000,
}


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_front_matter_and_facts():
    card = render_card(
        META,
        Provenance(
            HUB_CURRICULUM, {"phase_index": 1, "phase_name": "batch-hard", "step": 1000, "global_step": 3000}, METRICS
        ),
    )
    front = front_matter(card)
    assert front["library_name"] == "sentence-transformers"
    assert front["pipeline_tag"] == "sentence-similarity"
    assert front["base_model"] == "bert-base-uncased"
    assert front["datasets"] == ["sentence-transformers/all-nli"]
    assert {"sentence-transformers", "sentence-similarity", "tripletctl"} <= set(front["tags"])
    assert "| 0 | semi-hard | semi-hard | 500 | 0.2 | 2000 | squared-euclidean | 2e-05 |" in card
    assert "| 1 | batch-hard | batch-hard | 2000 | 0.3 | 1000 | squared-euclidean | 1e-05 |" in card
    assert "phase 1 (batch-hard), step 1000 of 1000 (global step 3000)" in card
    assert "`sentence-transformers/all-nli`" in card and "pairs layout" in card
    assert "| recall@1 | 0.8125 |" in card and "| triplet_accuracy | 0.9700 |" in card
    assert "**256-dimensional**" in card and "**squared-euclidean distance**" in card
    assert "| embedding size | 256 |" in card and "768 → 256" in card
    assert "max_length=64" in card
    assert len(code_blocks(card)) == 2


def test_local_paths_stay_out_of_the_front_matter(tmp_path):
    curriculum = {
        "model": {"name": str(tmp_path), "init": "config"},
        "data": {"source": str(tmp_path / "x.jsonl")},
        "phases": [],
    }
    card = render_card(META, Provenance(curriculum))
    front = front_matter(card)
    assert "base_model" not in front and "datasets" not in front
    assert "trained from scratch" in card
    assert "Held-out metrics" not in card  # no eval measured on these weights: no numbers claimed
    assert is_hub_id("org/name") and is_hub_id("bert-base-uncased")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./local") and not is_hub_id(None)


def test_a_card_without_provenance_still_renders():
    card = render_card(META)
    assert front_matter(card)["library_name"] == "sentence-transformers"
    assert "unknown" in card and "max_length=128" in card


@pytest.mark.slow
@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False)])
def test_usage_examples_run_and_give_the_model_s_embeddings(tiny_bert_dir, tmp_path, pooling, normalize):
    """Each snippet, run as written with the folder's path, reproduces tripletctl's embeddings."""
    import sentence_transformers

    model, tok = build_model(
        ModelConfig(name=str(tiny_bert_dir), init="config", pooling=pooling, normalize=normalize), seed=0
    )
    save_model(model, tok, tmp_path, Provenance({"data": {"max_length": 24}, "phases": []}))
    card = (tmp_path / "README.md").read_text()
    ours = encode(model, tok, ["first text", "second text"], max_length=24)
    st_code, hf_code = (block.replace("path/to/this/folder", str(tmp_path)) for block in code_blocks(card))
    assert len(st_code.strip().splitlines()) <= 6 and len(hf_code.strip().splitlines()) <= 8

    namespace: dict = {"print": lambda *a: None}
    exec(st_code, namespace)
    assert isinstance(namespace["model"], sentence_transformers.SentenceTransformer)
    assert abs(torch.as_tensor(namespace["embeddings"]) - ours).max() <= 1e-5

    namespace = {}
    with torch.no_grad():
        exec(hf_code, namespace)
    assert abs(namespace["embeddings"] - ours).max() <= 1e-5


def test_a_local_base_model_is_named_by_its_hub_id_never_by_its_path(tmp_path):
    """Issue 36, item 8: the card named the base model by its local path and had no base_model."""
    folder = tmp_path / "private" / "minilm-copy"
    cached = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc"
    for path in (folder, cached):
        path.mkdir(parents=True)
    given = {"model": {"name": str(folder), "base_model": "sentence-transformers/all-MiniLM-L6-v2"}, "phases": []}
    for curriculum in (given, {"model": {"name": str(cached)}, "phases": []}):
        card = render_card(META, Provenance(curriculum))
        assert front_matter(card)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert "| base model | `sentence-transformers/all-MiniLM-L6-v2` (from the local folder `" in card
        assert str(tmp_path) not in card
    unnamed = render_card(META, Provenance({"model": {"name": str(folder)}, "phases": []}))
    assert "base_model" not in front_matter(unnamed) and str(tmp_path) not in unnamed
    assert "| base model | `minilm-copy` (a local folder) |" in unnamed


def test_base_model_is_a_curriculum_key(tmp_path):
    from tripletctl.config.validate import load_curriculum

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "./m", "base_model": "org/name"},
                "data": {"source": "x.jsonl"},
                "phases": [{"name": "a", "mining": "semi-hard", "batch_size": 8, "steps": 1}],
            }
        )
    )
    assert load_curriculum(path).model.base_model == "org/name"
