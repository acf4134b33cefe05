"""GEAR KV cache for Hugging Face transformers (an optional extra: ``import lowrank_ops`` never
imports this module; ``lowrank_ops.GEARCache`` loads it on first access).

Usage (Llama / Mistral / Qwen2-style decoder models; hybrids such as Gemma 3 keep their
sliding-window layers uncompressed)::

    from lowrank_ops.kvcache import GEARConfig
    from lowrank_ops.kvcache.hf import GEARCache       # registers the "gear" attention

    model.set_attn_implementation("gear")
    cache = GEARCache(GEARConfig(bits=2, rank=4), model_config=model.config)
    out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=64)
    # (``past_key_values=cache`` works as well; transformers 5.x renames it ``cache``)
    cache.memory_report()   # bytes held vs an fp16 cache
    # prefix caching: a prompt prefilled once (model(prompt_ids, cache=cache)), saved, reused per request
    cache.save("prompt.safetensors")
    cache = GEARCache.load("prompt.safetensors", model_config=model.config, device="cuda")
    # assisted decoding (assistant_model=..., prompt_lookup_num_tokens=...) works too: the draft
    # check reads the compressed cache causally and crop() takes rejected tokens back

How a decode step reads the compressed cache
--------------------------------------------
* Every full-attention decoder layer has a :class:`GEARLayer` holding one
  :class:`~lowrank_ops.kvcache.GEARKV`. Sliding-window and chunked layers of a hybrid model
  (given ``model_config``) keep transformers' ``DynamicSlidingWindowLayer``: at most their window,
  uncompressed, attended by SDPA; ``memory_report()`` counts them (``uncompressed_nbytes``).
  ``layer_configs`` gives full-attention layers their own settings or keeps them uncompressed.
* Attention sinks (gpt-oss's ``s_aux``: one more softmax logit per query head, without a value)
  go into the compressed-cache attention (``sinks=``) on decode steps and into an fp32 softmax
  attention on uncompressed K/V otherwise (SDPA has none). Attention math that neither computes
  (Gemma 2's logit soft-capping) is refused by name (:data:`UNSUPPORTED_ATTENTION_KWARGS`), not
  ignored.
* **Prefill** (a layer's first ``update``): the keys/values are compressed (full blocks of B
  tokens quantized + outliers + low-rank; the rest in the uncompressed tail) and ``update``
  returns the exact K/V it was given, so the prompt's attention is plain SDPA.
* **Decode** (every later ``update``): the new tokens are appended to the GEARKV (a tail that
  fills is compressed into a block), and ``update`` returns only those new tokens, never a
  dequantized cache. To reach the attention function, the layer puts itself into the
  attention-kwargs dict: Llama/Mistral/Qwen2 attention calls
  ``cache.update(k, v, layer_idx, kwargs=kwargs)`` with the very dict it then unpacks into
  ``attention_interface(module, q, k, v, mask, **kwargs)``, so :func:`gear_attention_forward`
  receives the layer as the keyword :data:`LAYER_KWARG` and calls
  :func:`lowrank_ops.kvcache.attention` on the compressed state (Triton kernel on CUDA).
* Without that keyword (prefill; a normal cache; or a model that was given no GEARCache) the
  "gear" attention is transformers' SDPA, so ``set_attn_implementation("gear")`` is safe on
  its own. A decode ``update`` that gets no kwargs dict (a model whose attention does not pass
  one) raises instead of returning a wrong cache; with ``model_config`` the cache also checks
  that the model's attention implementation is "gear", and any layer whose previous decode
  step was not consumed by the "gear" attention raises on its next update.
* Masks: "gear" is registered with transformers' mask interface as ``sdpa_mask``; on decode
  (one query token) the mask's last row is the key mask of left-padded batches.
* Several query tokens after the prefill (assisted decoding's draft check, prompt lookup,
  chunked prefill) read the compressed cache too, with ``causal=True`` (query i sees the cache up
  to its own token), when the step's mask is a key mask ∧ causal (what transformers builds for
  left padding) and its query rows (q_heads / kv_heads × new tokens) fit four programs of the
  Triton kernel (:data:`CHUNK_MAX_ROWS`: transformers' default draft of 20 tokens is 84 rows at
  GQA 4), each reading the compressed cache once.
  Longer chunks (a second prompt) and other masks decompress the layer (``GEARKV.decompress``:
  one Triton pass per kind on a GPU) and run SDPA.
* Rollback (``crop``, which assisted decoding calls to drop rejected draft tokens): tokens still
  in the tail are just forgotten; for tokens already compressed into a block, the layer keeps
  the raw keys/values of its last update from the start of the block that holds its newest
  :data:`ROLLBACK_TOKENS`, drops the blocks from there and appends the tokens that stay again
  (a block is only ever compressed from the tokens it holds, so the result is the cache that
  appending only those tokens would have built). Tokens of the uncompressed prefix
  (``GEARConfig.prefix_tokens``) are never taken back.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import (Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer,
                                      get_layer_types_and_kwargs)
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lowrank_ops.kvcache import ops as kv_ops
from lowrank_ops.kvcache.compress import append_tokens, compress
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.format import GEARKV, dense_nbytes
from lowrank_ops.kvcache.store import Layer, UncompressedState, check_device_arg, load_kv, save_kv

GEAR_ATTENTION = "gear"  # the attn_implementation name registered with transformers
LAYER_KWARG = "gear_layer"  # attention kwarg through which a decode step hands its GEARLayer over
# Query rows (q_heads / kv_heads × new tokens) of a multi-token step read through the compressed
# cache: four Triton programs' rows (kernels/kvcache_attention.py, _MAX_BLOCK_M = 64 each), so the
# compressed cache (~28 % of fp16 bytes) is read at most four times, about the fp16 cache's bytes
# once; decompressing writes an fp16 copy and SDPA reads it (twice those bytes and more). Longer
# chunks decompress once and run SDPA. Not yet timed on a GPU (bench/kernel_profile.py times
# 64, 256 and 512 rows both ways).
CHUNK_MAX_ROWS = 256
# The newest tokens of a layer's last update that crop() can take back even once compressed
# (assisted decoding drops at most its draft, prompt lookup 10 tokens by default).
ROLLBACK_TOKENS = 128
# Attention kwargs that change the attention's math, which neither the GEAR kernels nor SDPA
# compute: refused by name instead of ignored
UNSUPPORTED_ATTENTION_KWARGS = {"softcap": "attention-logit soft-capping (Gemma 2)"}
# Scores held at once by the attention with sinks over uncompressed K/V (fp32: 256 MB): a long
# prompt's queries go in chunks, so its memory stays bounded where the scores of all of them
# (q_len x context per head) would not
SINK_SCORE_ENTRIES = 1 << 26
# Layer types a GEARCache keeps uncompressed in transformers' own DynamicSlidingWindowLayer (as
# DynamicCache does): they hold at most their window, so compressing them would save little, and
# a compressed block, never re-quantized, would outlive the window.
WINDOW_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def register() -> None:
    """Register :func:`gear_attention_forward` and its mask (``sdpa_mask``) under "gear" (idempotent;
    done when this module is imported)."""
    AttentionInterface.register(GEAR_ATTENTION, gear_attention_forward)
    AttentionMaskInterface.register(GEAR_ATTENTION, sdpa_mask)


# ----------------------------------------------------------------------------- one layer
class GEARLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`GEARKV` built at prefill and appended to on decode."""

    is_sliding = False
    is_compileable = False
    is_croppable = True  # the newest ROLLBACK_TOKENS of the last update, see crop()

    def __init__(self, config: GEARConfig, model_config: Optional[PreTrainedConfig] = None):
        super().__init__()
        self.config = config
        self.model_config = model_config
        self.kv: Optional[GEARKV] = None
        self.awaiting_attention = False  # a decode update whose attention has not run yet
        self.rollback: Optional[Rollback] = None  # the last update's, when it compressed a block

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Prefill: compress and return the exact K/V. Decode: append, hand this layer to the
        "gear" attention through the attention kwargs, return only the new K/V."""
        self._check_attention_implementation()
        if self.kv is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.kv = compress(key_states, value_states, self.config)
            self.rollback = Rollback.of_update(self.kv, key_states.shape[2], key_states, value_states)
            return key_states, value_states
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):
            raise ValueError(
                "GEARCache: this model's attention does not pass its attention kwargs to cache.update "
                "(expected cache.update(k, v, layer_idx, kwargs=kwargs) as in Llama/Mistral/Qwen2), so the "
                "'gear' attention cannot reach the compressed cache")
        if self.awaiting_attention:
            raise ValueError(
                "GEARCache: the previous decode step of this layer was not attended by the 'gear' attention "
                "implementation; call model.set_attn_implementation('gear') (lowrank_ops.kvcache.hf registers it)")
        raw = append_tokens(self.kv, key_states, value_states)  # when blocks were compressed: for crop()
        self.rollback = None if raw is None else Rollback.of_update(self.kv, key_states.shape[2], *raw)
        attn_kwargs[LAYER_KWARG] = self
        self.awaiting_attention = True
        return key_states, value_states

    def _check_attention_implementation(self) -> None:
        impl = getattr(self.model_config, "_attn_implementation", GEAR_ATTENTION)
        if impl != GEAR_ATTENTION:
            raise ValueError(
                f"GEARCache: the model's attention implementation is {impl!r}, expected {GEAR_ATTENTION!r}: "
                "call model.set_attn_implementation('gear') before generating")

    def get_seq_length(self) -> int:
        return 0 if self.kv is None else self.kv.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = None
        self.is_initialized = False
        self.awaiting_attention = False
        self.rollback = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer``): any
        of the tail, or up to :data:`ROLLBACK_TOKENS` of the last update (see the module docstring)."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove: expected a count <= 0 of tokens to drop, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or self.kv is None:
            return
        undo = self.rollback
        if n > self.kv.tail_len and (undo is None or n > undo.undoable):
            raise ValueError(
                f"tokens_to_remove: GEARCache can drop the tail's {self.kv.tail_len} tokens or up to "
                f"{0 if undo is None else undo.undoable} newest tokens of the last update, got {n}")
        self.rollback = None if undo is None else undo.trimmed(n)
        if n <= self.kv.tail_len:
            self.kv.tail_len -= n
        else:
            self.kv.keep_blocks(undo.blocks).append(self.rollback.keys, self.rollback.values)

    def _index_batch(self, index: Tensor) -> None:
        if self.kv is not None:
            index = index.to(self.kv.device)
            self.kv = dataclasses.replace(
                self.kv, **{name: t.index_select(0, index) for name, t in self.kv.tensors().items()})
            self.rollback = None if self.rollback is None else dataclasses.replace(
                self.rollback, keys=self.rollback.keys.index_select(0, index),
                values=self.rollback.values.index_select(0, index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every stored tensor is batch-major, so this is an exact index_select."""
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.kv is not None:
            self._index_batch(torch.arange(self.kv.batch, device=self.kv.device)[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._index_batch(torch.arange(self.kv.batch, device=self.kv.device).repeat_interleave(repeats))


@dataclasses.dataclass
class Rollback:
    """What crop() needs to take back the newest tokens of a layer's last update once they are
    compressed: the blocks before ``blocks`` stay; ``keys``/``values`` are the raw tokens from there
    to the end (batch, kv_heads, n, head_dim); ``undoable`` of the newest may go."""

    blocks: int
    keys: Tensor
    values: Tensor
    undoable: int

    @staticmethod
    def of_update(kv: GEARKV, added: int, raw_keys: Tensor, raw_values: Tensor) -> Optional["Rollback"]:
        """After ``kv`` took ``added`` tokens: None when they all went to the tail (crop trims it)
        or none can be taken back; else the raw tokens from the block holding the newest
        ROLLBACK_TOKENS, out of ``raw_keys``/``raw_values``: the cache's newest raw tokens, at least
        from that block on. Prefix tokens are never taken back."""
        after_prefix = kv.seq_len - kv.prefix_len  # positions of blocks and tail
        undoable = min(added, ROLLBACK_TOKENS, after_prefix)
        if added <= kv.tail_len or undoable == 0:
            return None
        first = (after_prefix - undoable) // kv.config.buffer_tokens  # the first block that may change
        skip = raw_keys.shape[2] - (after_prefix - first * kv.config.buffer_tokens)
        return Rollback(first, raw_keys[:, :, skip:].clone(), raw_values[:, :, skip:].clone(), undoable)

    def trimmed(self, n: int) -> Optional["Rollback"]:
        """This record once the newest ``n`` tokens are gone (None when it held fewer undoable)."""
        if n > self.undoable:
            return None
        end = self.keys.shape[2] - n
        return Rollback(self.blocks, self.keys[:, :, :end], self.values[:, :, :end], self.undoable - n)


# ----------------------------------------------------------------------------- the cache
class GEARCache(Cache):
    """A transformers ``Cache`` of GEAR-compressed layers; decode attention reads the compressed
    blocks (see the module docstring). Needs ``model.set_attn_implementation("gear")``.

    ``config``: the :class:`GEARConfig` (default ``GEARConfig()``: 2-bit, groups of 32, rank 4, 2 %
    outliers, 64-token blocks, the first token uncompressed). ``model_config``: the model's config
    (recommended): one layer per decoder layer, a :class:`GEARLayer` for each full-attention layer and
    transformers' ``DynamicSlidingWindowLayer`` (uncompressed, at most its window) for each
    sliding-window or chunked layer of a hybrid model (:data:`WINDOW_LAYER_TYPES`), and a check that the
    attention implementation is "gear" at every update. Without it, every layer is a GEARLayer, made
    lazily (a sliding-window layer is then refused once its cache outgrows the window).
    ``layer_configs`` (needs ``model_config``): per-layer settings for full-attention layers,
    ``{layer index: GEARConfig or None}`` (negative indices count from the last layer); None keeps
    that layer uncompressed (transformers' ``DynamicLayer``, attended by SDPA), e.g.
    ``{0: GEARConfig(bits=4), -1: None}``; the other layers take ``config``.
    """

    def __init__(self, config: Optional[GEARConfig] = None, model_config: Optional[PreTrainedConfig] = None,
                 layer_configs: Optional[Mapping[int, Optional[GEARConfig]]] = None):
        config = GEARConfig() if config is None else config
        if not isinstance(config, GEARConfig):
            raise TypeError(f"config: expected a lowrank_ops.kvcache.GEARConfig, got {type(config).__name__}")
        self.config = config
        if model_config is None:
            if layer_configs is not None:
                raise ValueError("layer_configs: per-layer settings need model_config (the model's layers)")
            super().__init__(layer_class_to_replicate=functools.partial(GEARLayer, config))
            return
        text_config = _text_config(model_config)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        other = sorted(set(layer_types) - {"full_attention", *WINDOW_LAYER_TYPES})
        if other:
            raise ValueError(f"model_config: GEARCache supports full-attention layers (compressed) and "
                             f"{', '.join(WINDOW_LAYER_TYPES)} layers (kept uncompressed), found layer types {other}")
        if "full_attention" not in layer_types:
            raise ValueError(f"model_config: no full-attention layer to compress, only {sorted(set(layer_types))} "
                             "(each holds at most its window): use transformers' DynamicCache")
        configs = _per_layer_configs(layer_configs, layer_types, config)
        super().__init__(layers=[
            DynamicSlidingWindowLayer(**kwargs) if kind in WINDOW_LAYER_TYPES
            else DynamicLayer() if cfg is None else GEARLayer(cfg, text_config)
            for kind, kwargs, cfg in zip(layer_types, layer_kwargs, configs)])

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the cache to ``path`` (a safetensors file, :func:`lowrank_ops.kvcache.save_kv`): every
        layer's compressed blocks and tail with its settings, and the uncompressed layers (a hybrid
        model's windows, layers configured None), bit for bit. Prefix caching: prefill a long
        prompt once, save, and :meth:`load` it for every later request. The raw tokens kept for
        ``crop()`` are not saved (a loaded cache can crop its tail only)."""
        if any(getattr(layer, "awaiting_attention", False) for layer in self.layers):
            raise ValueError("GEARCache: a layer is between its decode update and its attention; save after the forward")
        return save_kv([_layer_state(layer) for layer in self.layers], path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model_config: Optional[PreTrainedConfig] = None,
             device: Union[None, str, torch.device, Sequence[Union[str, torch.device]]] = None) -> "GEARCache":
        """The cache :meth:`save` wrote at ``path``, on ``device`` (default: CPU; or one device per
        layer, for a model split over several GPUs), ready to continue generation, with each
        layer's settings as saved. ``model_config`` (recommended; required for a hybrid model's
        window layers): the layers are checked against the model's (their count, kinds, windows,
        kv heads and head dim) and the cache checks the attention implementation as a new one does."""
        per_layer_devices = isinstance(device, Sequence) and not isinstance(device, str)
        states = load_kv(path, None if per_layer_devices else device)
        if per_layer_devices:
            if len(device) != len(states):
                raise ValueError(f"device: expected one device per layer ({len(states)}), got {len(device)}")
            for i, d in enumerate(device):
                check_device_arg(f"device[{i}]", d)
            states = [None if state is None else state.to(d) for state, d in zip(states, device)]
        # the settings the file records per full-attention layer: its GEARConfig, or None (uncompressed)
        saved = {i: state.config if isinstance(state, GEARKV) else None for i, state in enumerate(states)
                 if isinstance(state, GEARKV) or (isinstance(state, UncompressedState) and state.window is None)}
        configs = [cfg for cfg in saved.values() if cfg is not None]
        if not configs:
            raise ValueError(f"path: expected a GEARCache's layers, found no compressed one in {str(path)!r}")
        if model_config is None:
            if any(isinstance(state, UncompressedState) and state.window is not None for state in states):
                raise ValueError("model_config: the file holds sliding-window layers; pass the model's config to load it")
            cache = cls(configs[0])
            cache.layers = [DynamicLayer() if cfg is None else GEARLayer(cfg)
                            for cfg in (saved.get(i, cache.config) for i in range(len(states)))]
        else:
            text_config = _text_config(model_config)
            layer_types = get_layer_types_and_kwargs(text_config)[0]
            if len(states) != len(layer_types):
                raise ValueError(f"model_config: the model has {len(layer_types)} cache layers, the file {len(states)}")
            cache = cls(configs[0], model_config,
                        {i: cfg for i, cfg in saved.items() if layer_types[i] == "full_attention"})
            _check_layers_fit(states, cache.layers, text_config)
        for state, layer in zip(states, cache.layers):
            if state is not None:
                _restore_layer(layer, state)
        return cache

    # ------------------------------------------------------------------ bytes
    def layer_caches(self) -> list[GEARKV]:
        """The GEARKV of every GEAR layer filled so far."""
        return [layer.kv for layer in self.layers if getattr(layer, "kv", None) is not None]

    def uncompressed_states(self) -> list[Tensor]:
        """The keys and values of every filled layer kept uncompressed (window layers of a hybrid
        model, layers ``layer_configs`` leaves uncompressed)."""
        return [t for layer in self.layers if isinstance(layer, DynamicLayer) and layer.is_initialized
                for t in (layer.keys, layer.values)]

    @property
    def nbytes(self) -> int:
        """Bytes of every key and value the cache holds: the GEAR layers' (codes, scales, zeros,
        outliers, factors, tail buffers) and the uncompressed layers' tensors."""
        return sum(kv.nbytes for kv in self.layer_caches()) + sum(t.nbytes for t in self.uncompressed_states())

    @property
    def rollback_nbytes(self) -> int:
        """Bytes of the raw tokens the layers keep for crop() (:class:`Rollback`; held from an update
        that compressed a block until the next update)."""
        records = [layer.rollback for layer in self.layers if getattr(layer, "rollback", None) is not None]
        return sum(r.keys.nbytes + r.values.nbytes for r in records)

    def memory_report(self) -> dict[str, Any]:
        """Bytes held vs an uncompressed cache: ``{layers, batch, seq_len, nbytes, uncompressed_nbytes,
        rollback_nbytes, fp16_nbytes, dense_nbytes, ratio_vs_fp16, bits_per_entry,
        bytes_per_token}``. ``layers``: the filled GEAR layers; ``nbytes``: every layer's (the
        compressed format's, and the uncompressed layers' ``uncompressed_nbytes``);
        ``rollback_nbytes``: the raw tokens kept for crop() on top of it (:attr:`rollback_nbytes`);
        ``fp16_nbytes``: the same K/V in fp16 (window layers: their window); ``dense_nbytes``: in
        the model's dtype (what ``DynamicCache`` holds); ``bytes_per_token``: all layers, one sequence."""
        kvs = self.layer_caches()
        kept = self.uncompressed_states()
        fp16 = (sum(dense_nbytes(kv.batch, kv.kv_heads, kv.seq_len, kv.head_dim) for kv in kvs)
                + sum(2 * t.numel() for t in kept))
        dense = (sum(dense_nbytes(kv.batch, kv.kv_heads, kv.seq_len, kv.head_dim, kv.dtype) for kv in kvs)
                 + sum(t.nbytes for t in kept))
        nbytes = self.nbytes
        entries = sum(2 * kv.batch * kv.kv_heads * kv.seq_len * kv.head_dim for kv in kvs) + sum(t.numel() for t in kept)
        tokens = kvs[0].batch * kvs[0].seq_len if kvs else 0
        return {
            "layers": len(kvs),
            "batch": kvs[0].batch if kvs else 0,
            "seq_len": kvs[0].seq_len if kvs else 0,
            "nbytes": nbytes,
            "uncompressed_nbytes": sum(t.nbytes for t in kept),
            "rollback_nbytes": self.rollback_nbytes,
            "fp16_nbytes": fp16,
            "dense_nbytes": dense,
            "ratio_vs_fp16": nbytes / fp16 if fp16 else None,
            "bits_per_entry": 8 * nbytes / entries if entries else None,
            "bytes_per_token": nbytes / tokens if tokens else None,
        }


def _text_config(model_config: object) -> PreTrainedConfig:
    """The decoder's config of ``model_config`` (a transformers config)."""
    if not isinstance(model_config, PreTrainedConfig):
        raise TypeError(f"model_config: expected a transformers PreTrainedConfig, got {type(model_config).__name__}")
    return model_config.get_text_config(decoder=True)


def _per_layer_configs(layer_configs: Optional[Mapping[int, Optional[GEARConfig]]], layer_types: list[str],
                       default: GEARConfig) -> list[Optional[GEARConfig]]:
    """Each layer's GEARConfig (None: kept uncompressed) from ``layer_configs`` over ``default``."""
    n = len(layer_types)
    configs: list[Optional[GEARConfig]] = [default] * n
    if layer_configs is None:
        return configs
    if not isinstance(layer_configs, Mapping):
        raise TypeError(f"layer_configs: expected a mapping of layer index -> GEARConfig or None, got "
                        f"{type(layer_configs).__name__}")
    seen: set[int] = set()
    for index, cfg in layer_configs.items():
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise ValueError(f"layer_configs: expected layer indices in [-{n}, {n}), got {index!r}")
        if cfg is not None and not isinstance(cfg, GEARConfig):
            raise TypeError(f"layer_configs[{index}]: expected a GEARConfig or None, got {type(cfg).__name__}")
        i = index % n
        if i in seen:
            raise ValueError(f"layer_configs: layer {i} is given twice (as {index} and as {i - n if index >= 0 else i})")
        if layer_types[i] != "full_attention":
            raise ValueError(f"layer_configs: layer {i} is a {layer_types[i]} layer (kept uncompressed), "
                             "expected a full-attention one")
        seen.add(i)
        configs[i] = cfg
    if all(cfg is None for cfg, kind in zip(configs, layer_types) if kind == "full_attention"):
        raise ValueError("layer_configs: leaves no layer compressed; use transformers' DynamicCache")
    return configs


def _layer_state(layer: CacheLayerMixin) -> Layer:
    """What :meth:`GEARCache.save` writes for one layer."""
    if isinstance(layer, GEARLayer):
        return layer.kv
    if not layer.is_initialized:
        return None
    if isinstance(layer, DynamicSlidingWindowLayer):
        return UncompressedState(layer.keys, layer.values, layer.sliding_window, layer.cumulative_length)
    return UncompressedState(layer.keys, layer.values, None, layer.keys.shape[2])


def _restore_layer(layer: CacheLayerMixin, state: Layer) -> None:
    """Put a loaded layer state into a fresh cache layer of its kind."""
    if isinstance(state, GEARKV):
        layer.lazy_initialization(state.tail_keys, state.tail_values)
        layer.kv = state
        return
    layer.lazy_initialization(state.keys, state.values)
    layer.keys, layer.values = state.keys, state.values
    if state.window is not None:
        layer.cumulative_length = state.seen


def _check_layers_fit(states: list[Layer], layers: list[CacheLayerMixin], text_config: PreTrainedConfig) -> None:
    """The loaded states against the cache layers ``model_config`` gives, before any is filled."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    for i, (state, layer) in enumerate(zip(states, layers)):
        if state is None:
            continue
        model_window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        file_window = state.window if isinstance(state, UncompressedState) else None
        if model_window != file_window:
            raise ValueError(f"model_config: layer {i} is a {_layer_kind(model_window)} layer, the file's a "
                             f"{_layer_kind(file_window)} one")
        keys = state.keys if isinstance(state, UncompressedState) else state.tail_keys
        if (keys.shape[1], keys.shape[3]) != (heads, head_dim):
            raise ValueError(f"model_config: layer {i} has {heads} kv heads of dim {head_dim}, the file's "
                             f"{keys.shape[1]} of dim {keys.shape[3]}")


def _layer_kind(window: Optional[int]) -> str:
    return "full-attention" if window is None else f"sliding-window ({window} tokens)"


# ----------------------------------------------------------------------------- attention
def _allowed(attention_mask: Tensor) -> Tensor:
    """A transformers 4-D mask (boolean, or additive with large negatives) as bool, True = attend."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def decode_key_mask(attention_mask: Optional[Tensor], seq_len: int) -> Optional[Tensor]:
    """The (batch, seq_len) bool key mask (True = attend) of the step's newest query token, from
    the 4-D mask transformers built for it, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != seq_len:
        raise ValueError(
            f"attention_mask: expected a 4-D mask over the {seq_len} cached tokens, got shape {tuple(attention_mask.shape)}")
    return _allowed(attention_mask[:, 0, -1, :])


def is_causal_over(attention_mask: Optional[Tensor], key_mask: Optional[Tensor], q_len: int, seq_len: int) -> bool:
    """Whether a step's 4-D mask is ``key_mask`` ∧ causal for its q_len newest tokens (what
    ``attention(..., causal=True)`` computes); False for any other mask (a draft tree, say)."""
    if attention_mask is None:
        return True
    expected = key_mask[:, None, None, :] & kv_ops.causal_allowed(q_len, seq_len, key_mask.device)
    allowed = _allowed(attention_mask)
    return allowed.shape[2] == q_len and bool((allowed == expected).all())


def gear_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function "gear": on decode steps of a :class:`GEARCache` it runs
    :func:`lowrank_ops.kvcache.attention` on the compressed layer (``key``/``value`` are then only
    the new tokens, already appended); otherwise it is transformers' SDPA (with attention sinks:
    :func:`_dense_attention`). Returns (batch, q_len, q_heads, head_dim) as every transformers
    attention function."""
    for name, what in UNSUPPORTED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: the 'gear' attention (GEAR decode kernels, SDPA prefill) has no {what}, "
                             f"got {name}={kwargs[name]!r} from {type(module).__name__}; use DynamicCache with this model")
    layer: Optional[GEARLayer] = kwargs.pop(LAYER_KWARG, None)
    sinks: Optional[Tensor] = kwargs.pop("s_aux", None)
    if dropout and (layer is not None or sinks is not None):
        raise ValueError(f"dropout: the 'gear' attention over a compressed cache or with attention sinks is "
                         f"inference-only, got dropout={dropout}")
    if layer is None:
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, sinks, **kwargs)
    layer.awaiting_attention = False
    kv = layer.kv
    window = kwargs.get("sliding_window")
    if window is not None and kv.seq_len > window:
        raise ValueError(f"GEARCache: sliding-window attention (window {window}) is not supported, cache holds {kv.seq_len} tokens")
    q_len = query.shape[2]
    key_mask = decode_key_mask(attention_mask, kv.seq_len)
    rows = query.shape[1] // kv.kv_heads * q_len
    if q_len > 1 and (rows > CHUNK_MAX_ROWS or not is_causal_over(attention_mask, key_mask, q_len, kv.seq_len)):
        k, v = kv.decompress(query.dtype)  # a long chunk, or a mask the causal kernel does not express
        return _dense_attention(module, query, k, v, attention_mask, dropout, scaling, sinks, **kwargs)
    out = kv_ops.attention(query, kv, key_mask=key_mask, scale=scaling, causal=True, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def _dense_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                     dropout: float, scaling: Optional[float], sinks: Optional[Tensor], **kwargs: Any) -> tuple[Tensor, None]:
    """Attention over uncompressed K/V (prefill, window layers, long chunks): transformers' SDPA, or
    with attention sinks (which SDPA lacks) :func:`lowrank_ops.kvcache.ops.softmax_attention` in
    fp32 under the mask, or else the bottom-right causal one (what SDPA's ``is_causal`` does;
    inference only: the caller refuses dropout), :data:`SINK_SCORE_ENTRIES` scores at a time."""
    if sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, q_heads, q_len, _ = query.shape
    if attention_mask is None:
        attention_mask = kv_ops.causal_allowed(q_len, key.shape[2], query.device)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    step = max(1, SINK_SCORE_ENTRIES // (batch * q_heads * key.shape[2]))  # query tokens per chunk
    mask_rows = attention_mask.shape[-2]  # 1 when the mask broadcasts over the query tokens
    out = torch.cat([
        kv_ops.softmax_attention(query[:, :, i:i + step], key, value, scale,
                                 attention_mask[..., i:i + step, :] if mask_rows > 1 else attention_mask, sinks)
        for i in range(0, q_len, step)], dim=2)
    return out.transpose(1, 2).contiguous(), None


register()
