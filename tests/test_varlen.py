"""model.unpadded: BERT run on the real tokens packed back to back gives the padded encoder's results."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from helpers import final_weights, write_curriculum
from transformers import AutoConfig, AutoModel, RobertaConfig

from tripletctl.model import varlen
from tripletctl.model.chunking import Chunking, embed_and_backward, plan_chunks, right_padded
from tripletctl.model.encoder import TripletEncoder
from tripletctl.train import mining


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder(tiny_bert_dir, dropout: bool = True):
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    if not dropout:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="sdpa")


def ragged(rows: int = 12, width: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 981, (rows, width), generator=g) * mask
    return ids, mask, torch.arange(rows) % (rows // 4)


def test_packed_hidden_states_are_the_padded_encoders_real_tokens(tiny_bert_dir):
    bert = encoder(tiny_bert_dir).eval()
    ids, mask, _ = ragged()
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    got, lengths, cu = varlen.encode_packed(bert, ids, mask)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert lengths.tolist() == mask.sum(1).tolist() and cu[-1] == mask.sum()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_unpadded_embeddings_and_gradients_equal_the_padded_ones(tiny_bert_dir, pooling):
    ids, mask, labels = ragged()
    results = []
    for unpadded in (False, True):
        model = TripletEncoder(encoder(tiny_bert_dir, dropout=False), pooling=pooling, head=(16,), unpadded=unpadded)
        assert model.unpadded is unpadded
        emb = model(ids, mask)
        loss, _ = mining.mine(emb, labels, mode="batch-hard", margin=0.2)
        loss.backward()
        results.append((emb.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (emb_pad, grad_pad), (emb_var, grad_var) = results
    torch.testing.assert_close(emb_var, emb_pad, atol=2e-5, rtol=1e-4)
    assert grad_var.keys() == grad_pad.keys()
    for name in grad_pad:
        torch.testing.assert_close(grad_var[name], grad_pad[name], atol=1e-5, rtol=1e-3, msg=name)


def test_gradient_caching_replays_dropout_with_unpadded_chunks(tiny_bert_dir):
    """Dropout on: the re-forward of packed chunks draws the masks of pass 1 (same chunks, graphs kept)."""
    model = TripletEncoder(encoder(tiny_bert_dir), pooling="mean", head=(16,), unpadded=True).train()
    ids, mask, labels = ragged(rows=24)
    plan = plan_chunks(mask.sum(1), Chunking(tokens=120))
    assert len(plan.chunks) > 1 and not plan.keep_graph
    loss_fn = partial(mining.mine, mode="semi-hard", margin=0.2)
    grads = []
    for chosen in (dataclasses.replace(plan, keep_graph=True), plan):
        torch.manual_seed(5)
        embed_and_backward(model, ids, mask, labels, loss_fn, chosen)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


def test_other_architectures_and_left_padding_fall_back_to_the_padded_encoder(tiny_bert_dir):
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    roberta = AutoModel.from_config(config)
    model = TripletEncoder(roberta, unpadded=True)
    assert not model.unpadded and "not a transformers BertModel" in model.unpadded_unsupported
    bert = TripletEncoder(encoder(tiny_bert_dir, dropout=False), unpadded=True).eval()
    padded = TripletEncoder(bert.encoder, unpadded=False).eval()
    ids, mask, _ = ragged()
    left_mask, left_ids = mask.flip(1), ids.flip(1)  # left padding: positions differ, so the padded path
    assert not right_padded(left_mask)
    torch.testing.assert_close(bert(left_ids, left_mask), padded(left_ids, left_mask), atol=0, rtol=0)


@pytest.mark.slow
def test_a_curriculum_with_model_unpadded_trains_and_resumes_exactly(tmp_path):
    import yaml

    from tripletctl.config.validate import load_curriculum
    from tripletctl.train.run import train

    def unpadded_curriculum(where):
        path = write_curriculum(where, steps=(3, 2, 2), checkpoint_every=2, chunk_size="auto", chunk_tokens=160)
        spec = yaml.safe_load(path.read_text())
        spec["model"]["unpadded"] = True
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    straight = unpadded_curriculum(tmp_path / "straight")
    assert load_curriculum(straight).model.unpadded is True
    assert train(load_curriculum(straight)) == 0
    broken = unpadded_curriculum(tmp_path / "broken")
    assert train(load_curriculum(broken), max_steps=4) == 0
    assert train(load_curriculum(broken), resume=True) == 0
    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
