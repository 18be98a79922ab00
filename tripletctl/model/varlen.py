"""Unpadded (variable-length) encoding for BERT encoders: the real tokens of a chunk packed back to back.

Token-budget chunks already keep padding at 1.01-1.09x the real tokens, but each chunk is one more
round of ~100 kernel launches, and on a GPU that caps how small a chunk can usefully be. Packed, a
chunk is one (T, H) matrix of real tokens: the embeddings, every projection, the MLP and the layer
norms (BERT's `BertSelfOutput`, `BertIntermediate`, `BertOutput` work on the last dimension, so they
run unchanged on it) compute real tokens only, whatever the chunk's widths. Attention alone needs the
sequence boundaries (`cu_seqlens`, as flash-attention's varlen kernels take them):

- on CUDA, PyTorch's nested jagged tensors through `scaled_dot_product_attention` (its flash /
  memory-efficient kernels run on the packed rows; no flash-attn package needed);
- elsewhere (CPU) attention pads each row to the chunk's longest inside attention only and masks the
  padding, exactly what the padded encoder computes.

The weights are the transformers model's own (`BertModel`), so saving, loading, sentence-transformers
and `AutoModel` are unchanged: in eval mode the packed forward gives the padded forward's hidden
states of the real tokens (tests/test_varlen.py). Dropout draws from the same generators, so gradient
caching's RNG replay holds. Architectures other than BERT's are not supported: `unsupported` says why,
and the caller keeps the padded path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unsupported(encoder: nn.Module) -> str | None:
    """Why `encoder` cannot be run packed, or None when it can (a plain transformers BertModel)."""
    config = getattr(encoder, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert" or type(encoder).__name__ != "BertModel":
        return f"{type(encoder).__name__} is not a transformers BertModel"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder or cross-attention BERT"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} (only absolute)"
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not layers or not all(hasattr(layer.attention.self, "query") for layer in layers):
        return "an unexpected BertModel layout"
    return None


def pack(attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """(flat mask, lengths, cu_seqlens, longest row) of a right-padded (B, L) mask."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0))
    return mask, lengths, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def encode_packed(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run a BertModel on the real tokens of a right-padded batch.

    Returns (hidden (T, H) of the real tokens, row by row; lengths (B,); cu_seqlens (B+1,)).
    """
    mask, lengths, cu_seqlens, longest = pack(attention_mask)
    ids = input_ids[mask]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    positions = torch.arange(ids.shape[0], device=ids.device) - starts
    emb = encoder.embeddings
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids)) + emb.position_embeddings(positions)
    x = emb.dropout(emb.LayerNorm(x))
    for layer in encoder.encoder.layer:
        attention = _attention(layer.attention.self, x, mask, cu_seqlens, longest)
        x = layer.attention.output(attention, x)
        x = layer.output(layer.intermediate(x), x)
    return x, lengths, cu_seqlens


def _attention(self_attention: nn.Module, x: Tensor, mask: Tensor, cu_seqlens: Tensor, longest: int) -> Tensor:
    tokens, heads = x.shape[0], self_attention.num_attention_heads
    head_size = self_attention.attention_head_size
    projections = (self_attention.query, self_attention.key, self_attention.value)
    q, k, v = (proj(x).view(tokens, heads, head_size) for proj in projections)
    p = self_attention.dropout.p if self_attention.training else 0.0
    if x.is_cuda:
        nested = [
            torch.nested.nested_tensor_from_jagged(t, offsets=cu_seqlens, max_seqlen=longest).transpose(1, 2)
            for t in (q, k, v)
        ]
        out = F.scaled_dot_product_attention(*nested, dropout_p=p)
        return out.transpose(1, 2).values().reshape(tokens, heads * head_size)
    rows, width = mask.shape
    padded = []
    for t in (q, k, v):  # (B, heads, L, d): padding only inside attention
        full = t.new_zeros(rows, width, heads, head_size)
        full[mask] = t
        padded.append(full.transpose(1, 2))
    keys = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(*padded, attn_mask=keys, dropout_p=p)
    return out.transpose(1, 2)[mask].reshape(tokens, heads * head_size)


def pool_packed(hidden: Tensor, lengths: Tensor, cu_seqlens: Tensor, pooling: str) -> Tensor:
    """Mean over each row's tokens, or its first ([CLS]) token: (B, H)."""
    if pooling == "cls":
        return hidden[cu_seqlens[:-1]]
    rows = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device), lengths)
    sums = hidden.new_zeros(lengths.shape[0], hidden.shape[1]).index_add_(0, rows, hidden)
    return sums / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)
