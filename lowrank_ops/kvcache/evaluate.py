"""How well a :class:`GEARConfig` keeps a real model's keys, values and attention.

:func:`capture` runs a BERT-style encoder (the demo's all-MiniLM-L6-v2) once over a ragged batch
of paragraphs and keeps every layer's query, key and value projections; :func:`errors` compresses
each layer's keys and values with a configuration and measures the relative error of K̂, V̂ and
of the attention output against the fp16 cache, plus the bits stored per entry. Used by the demo
(its GEAR table) and by ``tests/test_kvcache_quality.py`` (what it asserts).

The cache is built on ``pack`` consecutive heads concatenated (MiniLM's 32-dim heads × 4 = the
head_dim 128 of LLM caches, whose per-entry overheads — scales, outliers, factors — it then has:
at head_dim 32 a rank-4 factor alone would cost 2 bits per entry). Attention outputs are computed
per real head, in float64, with the padding masked; errors are ‖x̂ − x‖ / ‖x‖ over real tokens,
averaged over the layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from lowrank_ops.kvcache.compress import compress
from lowrank_ops.kvcache.config import GEARConfig

PARAGRAPH_SENTENCES = (40, 10, 6, 3)  # a ragged batch: ≈ 50 to 256 tokens
MAX_TOKENS = 256


@dataclass
class Captured:
    """One pass's attention inputs: ``mask`` (batch, S) bool (True = real token) and per layer
    (q, k, v), each (batch, S, heads · head_dim) float32."""

    mask: Tensor
    layers: list[tuple[Tensor, Tensor, Tensor]]
    heads: int
    head_dim: int
    pack: int


@dataclass(frozen=True)
class KVError:
    """Mean relative errors over the layers, and the bits per K or V entry stored: all-in
    (tail buffer and prefix included) and per compressed block (the steady state of a long cache)."""

    keys: float
    values: float
    output: float
    bits_per_entry: float
    block_bits: float


def paragraphs(sentences: Sequence[str]) -> list[str]:
    """Consecutive sentences joined into paragraphs of :data:`PARAGRAPH_SENTENCES` sentences."""
    needed = sum(PARAGRAPH_SENTENCES)
    if len(sentences) < needed:
        raise ValueError(f"sentences: expected at least {needed}, got {len(sentences)}")
    out, start = [], 0
    for n in PARAGRAPH_SENTENCES:
        out.append(" ".join(sentences[start: start + n]))
        start += n
    return out


def capture(model: Any, texts: Sequence[str], pack: int = 4) -> Captured:
    """Q, K, V of every layer of a sentence-transformers BERT-style ``model`` on ``texts``
    (right-padded, at most :data:`MAX_TOKENS` tokens), by forward hooks on each layer's
    ``attention.self.{query, key, value}``."""
    auto = model[0].auto_model
    heads = auto.config.num_attention_heads
    head_dim = auto.config.hidden_size // heads
    if heads % pack:
        raise ValueError(f"pack: expected a divisor of the model's {heads} heads, got {pack}")
    enc = model.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    enc = {name: t.to(auto.device) for name, t in enc.items()}
    out: dict = {}
    hooks = [
        getattr(layer.attention.self, name).register_forward_hook(
            lambda mod, args, o, key=(i, name): out.__setitem__(key, o.detach().float().cpu()))
        for i, layer in enumerate(auto.encoder.layer) for name in ("query", "key", "value")
    ]
    try:
        with torch.no_grad():
            auto(**enc)
    finally:
        for hook in hooks:
            hook.remove()
    layers = [tuple(out[(i, n)] for n in ("query", "key", "value")) for i in range(len(auto.encoder.layer))]
    return Captured(enc["attention_mask"].bool().cpu(), layers, heads, head_dim, pack)


def to_cache_heads(x: Tensor, captured: Captured) -> Tensor:
    """(b, S, heads · head_dim) → (b, heads / pack, S, head_dim · pack) fp16."""
    b, s, _ = x.shape
    width = captured.head_dim * captured.pack
    return x.half().reshape(b, s, captured.heads // captured.pack, width).transpose(1, 2).contiguous()


def from_cache_heads(x: Tensor) -> Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def model_attention(q: Tensor, k: Tensor, v: Tensor, captured: Captured) -> Tensor:
    """Per real head, float64, padded keys masked: the outputs of the real query rows."""
    b, s, _ = q.shape
    heads, head_dim, mask = captured.heads, captured.head_dim, captured.mask
    q, k, v = (t.double().reshape(b, s, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(~mask[:, None, None, :], -torch.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)[mask]


def relative_error(approx: Tensor, exact: Tensor) -> float:
    return ((approx.double() - exact.double()).norm() / exact.double().norm()).item()


def errors(captured: Captured, config: GEARConfig, layer_configs: Optional[Mapping[int, GEARConfig]] = None) -> KVError:
    """Compress every layer's keys and values with ``config`` (layer i with ``layer_configs[i]``
    where given, as :class:`~lowrank_ops.kvcache.hf.GEARCache` does) and measure (see the module docstring)."""
    mask = captured.mask
    totals = torch.zeros(5, dtype=torch.float64)
    layer_configs = layer_configs or {}
    for i, (q, k, v) in enumerate(captured.layers):
        kv = compress(to_cache_heads(k, captured), to_cache_heads(v, captured), layer_configs.get(i, config))
        k_hat, v_hat = (from_cache_heads(t) for t in kv.decompress(torch.float32))
        exact = model_attention(q, k.half(), v.half(), captured)
        tail = kv.tail_keys.nbytes + kv.tail_values.nbytes + kv.prefix_keys.nbytes + kv.prefix_values.nbytes
        entries = 2 * kv.batch * kv.kv_heads * kv.compressed_len * kv.head_dim
        totals += torch.tensor([
            relative_error(k_hat[mask], k[mask]), relative_error(v_hat[mask], v[mask]),
            relative_error(model_attention(q, k_hat, v_hat, captured), exact), kv.bits_per_entry,
            8 * (kv.nbytes - tail) / entries if entries else math.nan,
        ])
    return KVError(*(totals / len(captured.layers)).tolist())
