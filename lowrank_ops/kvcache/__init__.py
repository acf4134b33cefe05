"""GEAR KV-cache compression: quantized blocks + per-vector outliers + per-block low-rank
residual + fp16 tail (:mod:`~lowrank_ops.kvcache.format`), the compressor
(:func:`compress`, :meth:`GEARKV.append`) and decode attention over it (:func:`attention`).

    >>> from lowrank_ops.kvcache import GEARConfig, compress, attention
    >>> kv = compress(keys, values, GEARConfig(bits=2, rank=4))   # (batch, kv_heads, seq, head_dim)
    >>> kv.append(new_keys, new_values)                            # in place
    >>> out = attention(q, kv, key_mask=mask)                      # (batch, q_heads, q_len, head_dim)
    >>> save_kv(kv, "prompt.safetensors"); [kv] = load_kv("prompt.safetensors", device="cuda")
"""
from lowrank_ops.kvcache.compress import compress
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.format import GEARKV, dense_nbytes
from lowrank_ops.kvcache.ops import attention, attention_reference
from lowrank_ops.kvcache.store import UncompressedState, load_kv, save_kv

__all__ = ["GEARConfig", "GEARKV", "UncompressedState", "attention", "attention_reference", "compress", "dense_nbytes",
           "load_kv", "save_kv"]
