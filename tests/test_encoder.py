"""TripletEncoder on the tiny BERT the repo ships (random weights from config.json, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from tripletctl.config.blocks import ModelConfig
from tripletctl.model.compiled import CompiledOrEager, compile_wanted
from tripletctl.model.encoder import (
    build_model,
    encode,
    load_model,
    save_model,
    unwrap,
)

TEXTS = ["the quick brown fox", "a", "jumps over the lazy dog and keeps running", "hello world"]


def tiny(tiny_bert_dir: Path, seed: int = 0, **kw):
    cfg = ModelConfig(name=str(tiny_bert_dir), init="config", **kw)
    return build_model(cfg, seed)


def batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_shape_and_unit_norm(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir)
    assert tok.is_fast
    out = model.eval()(*batch(tok, TEXTS))
    assert out.shape == (len(TEXTS), 64) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(TEXTS)))


def test_no_normalize_is_not_unit_norm(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir, normalize=False)
    norms = model.eval()(*batch(tok, TEXTS)).norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_embedding(tiny_bert_dir, pooling):
    model, tok = tiny(tiny_bert_dir, pooling=pooling)
    model.eval()
    alone = model(*batch(tok, ["a"]))
    padded = model(*batch(tok, ["a", TEXTS[2]]))  # "a" padded to the long row's length
    assert batch(tok, ["a", TEXTS[2]])[1][0].sum() < batch(tok, ["a", TEXTS[2]])[1][1].sum()
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_cls_pooling_uses_first_token(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir, pooling="cls", normalize=False)
    model.eval()
    ids, mask = batch(tok, TEXTS)
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask), hidden[:, 0])
    mean_model, _ = tiny(tiny_bert_dir, pooling="mean", normalize=False)
    assert not torch.allclose(mean_model.eval()(ids, mask), hidden[:, 0])


def test_head_sizes(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir, head=(32, 16))
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16)]
    assert isinstance(model.head[1], torch.nn.GELU) and len(model.head) == 3  # no final activation
    assert model.embedding_dim == 16
    out = model.eval()(*batch(tok, TEXTS))
    assert out.shape == (len(TEXTS), 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(TEXTS)))


def test_pooler_is_kept_frozen_and_every_trained_parameter_gets_a_gradient(tiny_bert_dir):
    """DDP (find_unused_parameters=False) fails on a parameter that requires a gradient and gets
    none: BERT's pooler is kept (so saved folders load cleanly) but frozen."""
    model, tok = tiny(tiny_bert_dir, head=(16,))
    pooler = [p for name, p in model.named_parameters() if name.startswith("encoder.pooler")]
    assert pooler and not any(p.requires_grad for p in pooler)
    model.train()(*batch(tok, TEXTS)).pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in pooler)


def test_same_seed_same_weights(tiny_bert_dir):
    a, _ = tiny(tiny_bert_dir, seed=7, head=(8,))
    b, _ = tiny(tiny_bert_dir, seed=7, head=(8,))
    c, _ = tiny(tiny_bert_dir, seed=8, head=(8,))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_leaves_global_rng_alone(tiny_bert_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny(tiny_bert_dir, seed=5)
    torch.testing.assert_close(torch.rand(3), expected)


def test_float32_output_under_bf16_autocast(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir, head=(16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(*batch(tok, TEXTS))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(TEXTS)))


def test_save_load_identical(tiny_bert_dir, tmp_path):
    model, tok = tiny(tiny_bert_dir, head=(32, 16), pooling="cls")
    save_model(model, tok, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "tripletctl_model.json").read_text())
    assert meta["pooling"] == "cls" and meta["head"] == [32, 16] and meta["embedding_dim"] == 16
    assert meta["normalize"] is True
    assert meta["format_version"] == 2 and meta["head_modules"] == ["2_Dense", "3_Dense"]
    assert (tmp_path / "m" / "2_Dense" / "model.safetensors").is_file()
    assert not (tmp_path / "m" / "head.safetensors").exists()  # one copy of the head: the Dense modules
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, tok2 = load_model(tmp_path / "m")
    assert not loaded.training
    torch.testing.assert_close(loaded(*batch(tok2, TEXTS)), model.eval()(*batch(tok, TEXTS)), atol=1e-6, rtol=0)
    assert tok2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


def test_encoder_dir_loads_in_plain_transformers(tiny_bert_dir, tmp_path):
    model, tok = tiny(tiny_bert_dir)
    save_model(model, tok, tmp_path)
    plain = AutoModel.from_pretrained(tmp_path).eval()
    ids, mask = batch(tok, TEXTS)
    torch.testing.assert_close(
        plain(input_ids=ids, attention_mask=mask).last_hidden_state,
        model.encoder.eval()(input_ids=ids, attention_mask=mask).last_hidden_state,
    )


@pytest.mark.slow
def test_encode_returns_input_order(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir)
    model.train()
    out = encode(model, tok, TEXTS, batch_size=2, max_length=64, progress=True)
    assert model.training  # mode restored for callers in the middle of training
    assert out.shape == (len(TEXTS), 64) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(out[i], model.eval()(*batch(tok, [text]))[0], atol=1e-5, rtol=1e-5)
    assert encode(model, tok, [], device="cpu").shape == (0, 64)


def test_encode_packs_rows_by_length(tiny_bert_dir):
    """Encoding sorts rows by length and packs them like training: a long text does not pad the
    short ones, and the output still equals each text embedded alone, in input order."""
    model, tok = tiny(tiny_bert_dir)
    texts = ["short"] * 6 + [" ".join(["word"] * 12)] + ["a bit longer text"] * 3
    shapes = []
    model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    out = encode(model, tok, texts, batch_size=4, max_length=64)
    real = sum(len(ids) for ids in tok(texts, truncation=True, max_length=64)["input_ids"])
    assert sum(rows * width for rows, width in shapes) <= 1.15 * real
    assert all(rows * width <= 4 * 64 for rows, width in shapes)
    for i, text in enumerate(texts):
        torch.testing.assert_close(out[i], model.eval()(*batch(tok, [text]))[0], atol=1e-5, rtol=1e-5)


def test_attn_implementation_is_passed_to_transformers(tiny_bert_dir):
    """eager and SDPA compute the same embeddings; a named implementation that cannot load (the
    flash-attn package is not installed in CI) is a one-line error, not a silent padded fallback."""
    from tripletctl.core.errors import TripletctlError

    eager, tok = tiny(tiny_bert_dir, attn_implementation="eager")
    sdpa, _ = tiny(tiny_bert_dir)
    assert eager.encoder.config._attn_implementation == "eager"
    assert sdpa.encoder.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager.eval()(*batch(tok, TEXTS)), sdpa.eval()(*batch(tok, TEXTS)), atol=1e-5, rtol=1e-5)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(TripletctlError, match="model.attn_implementation 'flash_attention_2' cannot be used"):
            tiny(tiny_bert_dir, attn_implementation="flash_attention_2")


def test_missing_or_damaged_models_are_model_errors(tiny_bert_dir, tmp_path):
    from tripletctl.config.blocks import ModelConfig
    from tripletctl.core.errors import ModelError
    from tripletctl.model.encoder import build_model, load_model, save_model

    with pytest.raises(ModelError, match="cannot load model"):
        build_model(ModelConfig(name=str(tmp_path / "nope"), init="config"), 0)
    model, tok = build_model(ModelConfig(name=str(tiny_bert_dir), init="config", head=(8,)), 0)
    save_model(model, tok, tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_model(tmp_path / "saved")


@pytest.mark.slow
def test_a_compiled_encoder_that_fails_to_compile_runs_eagerly_after_one_warning(tiny_bert_dir, tmp_path):
    """train.compile's fallback: the first compiled call fails (here: a backend that raises), the same
    call runs eagerly and every later one too, with one warning; weights, keys and saving are the
    eager module's."""

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no working compiler here")

    model, tok = tiny(tiny_bert_dir, head=(16,))
    eager = model.eval()(*batch(tok, TEXTS))
    encoder = model.encoder
    warnings: list[str] = []
    model.encoder = CompiledOrEager(encoder, warn=warnings.append, backend=broken_backend)
    assert [n for n, _ in model.encoder.named_parameters()] == [f"module.{n}" for n, _ in encoder.named_parameters()]
    assert model.encoder.config is encoder.config and unwrap(model.encoder) is encoder
    for _ in range(2):
        torch.testing.assert_close(model(*batch(tok, TEXTS)), eager, atol=0, rtol=0)
    assert len(warnings) == 1 and "runs eagerly" in warnings[0] and "no working compiler" in warnings[0]
    assert "no working compiler" in model.encoder.failure
    save_model(model, tok, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded(*batch(tok, TEXTS)), eager, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_compiled_encoder_that_compiles_runs_compiled(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir)
    eager = model.eval()(*batch(tok, TEXTS))
    warnings: list[str] = []
    model.encoder = CompiledOrEager(model.encoder, warn=warnings.append, backend="eager")  # dynamo, no codegen
    torch.testing.assert_close(model(*batch(tok, TEXTS)), eager, atol=1e-6, rtol=0)
    assert not warnings and model.encoder.failure is None


@pytest.mark.slow
def test_an_error_of_the_model_itself_is_not_hidden_by_the_fallback(tiny_bert_dir):
    model, tok = tiny(tiny_bert_dir)
    model.encoder = CompiledOrEager(model.encoder, backend="eager")
    ids, mask = batch(tok, TEXTS)
    with pytest.raises(IndexError):
        model(ids + 10_000, mask)  # ids beyond the vocabulary fail eagerly too


def test_compile_auto_means_on_cuda():
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted(True, torch.device("cpu")) and not compile_wanted(False, torch.device("cuda"))
