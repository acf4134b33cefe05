"""Decode attention over a GEAR-compressed cache: ``softmax(q K̂ᵀ · scale) V̂``.

:func:`attention` checks its inputs and calls ``lowrank_ops::gear_decode_attention``, a
``torch.library`` custom op (with a fake impl, so ``torch.compile`` traces it) that takes the
raw tensors of :class:`~lowrank_ops.kvcache.format.GEARKV` (in :data:`TENSOR_FIELDS` order)
plus the static settings. Backends per call (:func:`lowrank_ops.core.backend.select_backend`):

* ``cuda``: ``gear_decode(q, kv, key_mask, scale)`` of :mod:`lowrank_ops.kvcache.cuda_decode`
  (csrc/gear_decode.cu: packed codes straight into tensor-core fragments), when the extension is
  built and the call is one it serves (fp16/bf16, 2/4 bits, head_dim 64/128, rank 0/4/8, ≤ 8
  outliers per vector); automatic dispatch takes it for small eager calls with fp16 factors or
  none (:func:`lowrank_ops.kvcache.cuda_decode.preferred`), Triton otherwise;
* ``triton``: ``gear_decode_attention(q, kv, key_mask, scale)`` of
  :mod:`lowrank_ops.kernels.kvcache_attention`, imported lazily (unsupported, with the reason,
  when that module or function is absent or Triton cannot launch on the device);
* ``reference``: :func:`attention_reference` (decompress in fp32 + plain softmax attention).

Semantics: q (batch, q_heads, q_len, head_dim), q_heads a multiple of kv_heads (query head i
reads kv head i // (q_heads / kv_heads), as ``repeat_kv``), every query attends to all
``seq_len`` cached tokens, optional ``key_mask`` bool (batch, seq_len), True = attend. With
``causal=True`` the q_len queries are the cache's newest q_len tokens (append them first) and
query i attends to positions ≤ seq_len − q_len + i only (a chunk of several new tokens:
assisted decoding, chunked prefill). ``sinks`` (q_heads,), optional: attention sinks (gpt-oss),
one more logit per query head in each row's softmax that carries no value. A query row whose
keys are all masked returns zeros. The
output is (batch, q_heads, q_len, head_dim) in q's dtype. Under ``causal`` the CUDA kernel
serves one query token per sequence (where causality is moot); Triton serves any chunk.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_device, check_tensor
from lowrank_ops.kvcache import cuda_decode
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.format import TENSOR_FIELDS, GEARKV

KERNEL_MODULE = "lowrank_ops.kernels.kvcache_attention"
KERNEL_FUNCTION = "gear_decode_attention"


# --------------------------------------------------------------------------- reference
def causal_allowed(q_len: int, seq_len: int, device: torch.device) -> Tensor:
    """(q_len, seq_len) bool: query i, the cache's token seq_len − q_len + i, sees positions up to its own."""
    newest = torch.arange(seq_len - q_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= newest[:, None]


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor] = None,
                      sinks: Optional[Tensor] = None, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Plain softmax attention in ``compute_dtype``, output in q's dtype: q (b, q_heads, q_len, D)
    over k, v (b, kv_heads, T, D), the query heads of a kv head as rows of one product (never a
    repeated k, v). ``mask`` broadcasts to (b, q_heads, q_len, T): bool (True = attend; a row with
    nothing allowed is 0) or additive. ``sinks`` (q_heads,): one more logit per query head in each
    row's softmax, with no value (gpt-oss)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    rows = q.to(compute_dtype).reshape(batch, kv_heads, -1, head_dim)  # (head, token) rows of a kv head
    scores = ((rows @ k.to(compute_dtype).transpose(-1, -2)) * scale).reshape(batch, q_heads, q_len, -1)
    allowed = mask if mask is not None and mask.dtype == torch.bool else None
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -torch.inf)
    elif mask is not None:
        scores = scores + mask.to(compute_dtype)
    if sinks is not None:
        sink = sinks.to(compute_dtype).reshape(1, q_heads, 1, 1).expand(batch, -1, q_len, -1)
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    elif allowed is not None:
        probs = torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), 0.0)
    else:
        probs = scores.softmax(-1)
    out = probs.reshape(batch, kv_heads, -1, k.shape[2]) @ v.to(compute_dtype)
    return out.reshape(q.shape).to(q.dtype)


def attention_reference(q: Tensor, kv: GEARKV, key_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                        compute_dtype: torch.dtype = torch.float32, causal: bool = False,
                        sinks: Optional[Tensor] = None) -> Tensor:
    """Decompress K̂, V̂ in ``compute_dtype`` (the torch reconstruction) and run
    :func:`softmax_attention` under the key mask and, with ``causal``, :func:`causal_allowed`."""
    k, v = kv.decompress_reference(compute_dtype)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if causal:
        order = causal_allowed(q.shape[2], kv.seq_len, q.device)
        mask = order if mask is None else mask & order
    scale = 1.0 / math.sqrt(kv.head_dim) if scale is None else scale
    return softmax_attention(q, k, v, scale, mask, sinks, compute_dtype)


# --------------------------------------------------------------------------- backend support
def _triton_support(q: Tensor, rank: int) -> Support:
    if not backend.triton_runs_on(q.device):
        return backend.triton_support(q.device)
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except ImportError as exc:
        return Support(False, f"{KERNEL_MODULE} cannot be imported ({exc})")
    if not hasattr(module, KERNEL_FUNCTION):
        return Support(False, f"{KERNEL_MODULE} has no {KERNEL_FUNCTION}()")
    if rank > module.KV_MAX_RANK:
        return Support(False, f"the Triton decode kernel keeps rank <= {module.KV_MAX_RANK} factor tiles on chip, got rank {rank}")
    return Support(True)


def _attention_backend(q: Tensor, kv: GEARKV, causal: bool = False, sinks: bool = False) -> str:
    support = {
        "cuda": cuda_decode.supports(q, kv, causal, sinks),
        "triton": _triton_support(q, kv.config.rank),
        "reference": Support(True),
    }
    return backend.select_backend("gear_decode_attention", support, q.device)


# --------------------------------------------------------------------------- custom op
def _rebuild(tensors: list[Tensor], bits: int, group_size: int, rank: int, outlier_ratio: float,
             buffer_tokens: int, factor_bits: int, prefix_tokens: int, tail_len: int) -> GEARKV:
    """The GEARKV the custom op was given (its compression-only settings left at their defaults)."""
    config = GEARConfig(bits=bits, group_size=group_size, rank=rank, outlier_ratio=outlier_ratio,
                        buffer_tokens=buffer_tokens, factor_bits=factor_bits, prefix_tokens=prefix_tokens)
    return GEARKV(config=config, **dict(zip(TENSOR_FIELDS, tensors)), tail_len=tail_len)


@torch.library.custom_op("lowrank_ops::gear_decode_attention", mutates_args=())
def _gear_attention_op(
    q: Tensor, tensors: list[Tensor], key_mask: Optional[Tensor], scale: float, causal: bool, sinks: Optional[Tensor],
    bits: int, group_size: int, rank: int, outlier_ratio: float, buffer_tokens: int, factor_bits: int,
    prefix_tokens: int, tail_len: int,
) -> Tensor:
    kv = _rebuild(tensors, bits, group_size, rank, outlier_ratio, buffer_tokens, factor_bits, prefix_tokens, tail_len)
    return _attention_impl(q, kv, key_mask, scale, causal, sinks)


def _attention_impl(q: Tensor, kv: GEARKV, key_mask: Optional[Tensor], scale: float, causal: bool,
                    sinks: Optional[Tensor]) -> Tensor:
    causal = causal and q.shape[2] > 1  # one query token: the newest, which sees every cached token
    chosen = _attention_backend(q, kv, causal, sinks is not None)
    if chosen == "cuda":
        return cuda_decode.launch(q, kv, key_mask, scale)  # dispatch has just checked supports()
    if chosen == "triton":
        kernel = getattr(importlib.import_module(KERNEL_MODULE), KERNEL_FUNCTION)
        return kernel(q, kv, key_mask, scale, causal=causal, sinks=sinks)
    return attention_reference(q, kv, key_mask, scale, causal=causal, sinks=sinks)


@_gear_attention_op.register_fake
def _(q, tensors, key_mask, scale, causal, sinks, bits, group_size, rank, outlier_ratio, buffer_tokens, factor_bits,
      prefix_tokens, tail_len):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- public entry point
def attention(q: Tensor, kv: GEARKV, *, key_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              causal: bool = False, sinks: Optional[Tensor] = None) -> Tensor:
    """Decode attention of ``q`` over the compressed cache ``kv`` (see the module docstring)."""
    if not isinstance(kv, GEARKV):
        raise TypeError(f"kv: expected a GEARKV, got {type(kv).__name__}")
    check_tensor("q", q, ndim=4)
    b, qh, q_len, d = q.shape
    expected = f"(batch={kv.batch}, q_heads multiple of kv_heads={kv.kv_heads}, q_len>=1, head_dim={kv.head_dim})"
    if b != kv.batch or qh % kv.kv_heads or qh == 0 or q_len < 1 or d != kv.head_dim:
        raise ValueError(f"q: expected shape {expected}, got {tuple(q.shape)}")
    check_device("q", q, kv.device, "kv")
    if kv.seq_len < 1:
        raise ValueError("kv: expected a cache holding at least one token, got seq_len 0")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_mask.shape) != (b, kv.seq_len):
            raise ValueError(f"key_mask: expected shape (batch, seq_len) = {(b, kv.seq_len)}, got {tuple(key_mask.shape)}")
        check_device("key_mask", key_mask, q.device, "q")
        key_mask = key_mask.contiguous()
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite positive float or None, got {scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal and q_len > kv.seq_len:
        raise ValueError(f"q: causal queries are the cache's newest tokens, expected q_len <= seq_len={kv.seq_len}, "
                         f"got q_len {q_len}")
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1, dtypes=(torch.float16, torch.bfloat16, torch.float32))
        if sinks.shape[0] != qh:
            raise ValueError(f"sinks: expected one logit per query head, shape ({qh},), got {tuple(sinks.shape)}")
        check_device("sinks", sinks, q.device, "q")
        sinks = sinks.detach().float().contiguous()
    if backend.eager_inference():
        # eager: straight to the implementation. The custom op's dispatch and its rebuild (and
        # re-validation) of the GEARKV cost more host time than the kernels take on a GPU at
        # short context, and a decode step calls this once per layer.
        return _attention_impl(q.contiguous(), kv, key_mask, float(scale), causal, sinks)
    cfg = kv.config
    tensors = [t.contiguous() for t in kv.tensors().values()]
    return _gear_attention_op(q.contiguous(), tensors, key_mask, float(scale), causal, sinks, cfg.bits, cfg.group_size,
                              cfg.rank, float(cfg.outlier_ratio), cfg.buffer_tokens, cfg.factor_bits, cfg.prefix_tokens,
                              kv.tail_len)
