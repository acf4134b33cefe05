"""Save and load compressed KV caches: a long prompt compressed once, reused from disk.

    >>> from lowrank_ops.kvcache import compress, save_kv, load_kv
    >>> save_kv([kv_layer0, kv_layer1], "prompt.safetensors")
    >>> layers = load_kv("prompt.safetensors", device="cuda")      # [GEARKV, GEARKV]

One safetensors file (:mod:`lowrank_ops.core.files`: written atomically, a SHA-256 digest of
every tensor checked on load) whose tensors are each layer's stored fields as they are
(``layers.<i>.<field>``, the packed codes, scales, outliers and factors bit for bit), and whose
header (metadata key :data:`STORE_KEY`) lists per layer its kind and what is not a tensor:

* ``gear``: a :class:`~lowrank_ops.kvcache.GEARKV`, its :class:`GEARConfig` fields and
  ``tail_len``. Only the tail's ``tail_len`` valid tokens are written (a cropped tail's stale
  rows are not); the loader rebuilds the B-token tail buffer around them. Files written before
  the format had a prefix (``GEARConfig.prefix_tokens``) lack its two tensors and the setting,
  and load as caches without one (``prefix_tokens=0``).
* ``uncompressed``: an :class:`UncompressedState`, the keys and values a layer keeps as they
  are: a hybrid model's sliding-window layer, or a layer its ``GEARCache`` leaves uncompressed
  (written by :meth:`lowrank_ops.kvcache.hf.GEARCache.save`).
* ``empty``: a layer with nothing cached yet.

A loaded layer is checked as a fresh one is (:meth:`GEARKV.validate`: every shape and dtype
against the format), and so are the values the kernels index with: each outlier channel must be
below head_dim and distinct within its vector. The file is the cache's state, not a snapshot
of how it got there: appending to a loaded cache gives what appending to the saved one gives.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from lowrank_ops.core.files import check_path, read_file, write_file
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.format import PREFIX_FIELDS, TENSOR_FIELDS, GEARKV

STORE_KEY = "lowrank_ops_kvcache"
STORE_VERSION = 1
_TAILS = ("tail_keys", "tail_values")


@dataclass
class UncompressedState:
    """A layer's uncompressed cache: ``keys``/``values`` (batch, kv_heads, n, head_dim), the
    layer's sliding ``window`` (None: a full-attention layer, which keeps every token) and the
    tokens it has ``seen`` (n of them are kept)."""

    keys: Tensor
    values: Tensor
    window: Optional[int]
    seen: int

    def to(self, device: torch.device | str) -> "UncompressedState":
        """This state with its tensors on ``device``."""
        return dataclasses.replace(self, keys=self.keys.to(device), values=self.values.to(device))

    def validate(self) -> None:
        """Shapes and dtypes of the two tensors, the window and the count against what is kept."""
        for name in ("keys", "values"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"{name}: expected a floating (batch, kv_heads, n, head_dim) tensor, got "
                                 f"{type(t).__name__ if not isinstance(t, Tensor) else f'{t.dtype} {tuple(t.shape)}'}")
        if self.values.shape != self.keys.shape or self.values.dtype != self.keys.dtype:
            raise ValueError(f"values: expected the shape and dtype of keys {tuple(self.keys.shape)} {self.keys.dtype}, "
                             f"got {tuple(self.values.shape)} {self.values.dtype}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window: expected a positive int or None, got {self.window!r}")
        kept = self.keys.shape[2]
        if isinstance(self.seen, bool) or not isinstance(self.seen, int) or self.seen < kept or (
                self.window is None and self.seen != kept):
            expected = f"{kept} (a full layer keeps every token)" if self.window is None else f"an int >= the {kept} tokens kept"
            raise ValueError(f"seen: expected {expected}, got {self.seen!r}")


Layer = Union[GEARKV, UncompressedState, None]


def check_device_arg(name: str, device: object) -> None:
    """``device`` is None, a str or a torch.device (an int would silently mean a CUDA index)."""
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name}: expected a str, a torch.device or None, got {type(device).__name__}")


def _layer_record(i: int, layer: object) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One layer's header entry and tensors (named ``layers.<i>.<field>``, on CPU, contiguous)."""
    prefix = f"layers.{i}."
    if layer is None:
        return {"kind": "empty"}, {}
    if isinstance(layer, UncompressedState):
        layer.validate()
        tensors = {"keys": layer.keys, "values": layer.values}
        entry = {"kind": "uncompressed", "window": layer.window, "seen": layer.seen}
    elif isinstance(layer, GEARKV):
        tensors = {name: t[:, :, : layer.tail_len] if name in _TAILS else t for name, t in layer.tensors().items()}
        entry = {"kind": "gear", "config": dataclasses.asdict(layer.config), "tail_len": layer.tail_len}
    else:
        raise TypeError(f"layers[{i}]: expected a GEARKV, an UncompressedState or None, got {type(layer).__name__}")
    return entry, {prefix + name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def save_kv(layers: Union[GEARKV, Sequence[Layer]], path: Union[str, os.PathLike]) -> Path:
    """Write one or several layers' compressed caches (a GEARKV, or a sequence of GEARKV /
    :class:`UncompressedState` / None) to ``path``, a safetensors file (see the module docstring).
    Returns the path. The layers are not changed."""
    if isinstance(layers, GEARKV):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers: expected a GEARKV or a sequence of them, got {type(layers).__name__}")
    path = check_path(path)
    records = [_layer_record(i, layer) for i, layer in enumerate(layers)]
    if all(entry["kind"] == "empty" for entry, _ in records):
        raise ValueError(f"layers: expected at least one filled layer, got {len(records)} empty ones")
    tensors = {name: t for _, named in records for name, t in named.items()}
    header = {"version": STORE_VERSION, "layers": [entry for entry, _ in records]}
    return write_file(tensors, path, STORE_KEY, header)


def _check_outlier_channels(kv: GEARKV) -> None:
    """Outlier channels below head_dim and distinct within each vector (the kernels index by them)."""
    for kind in ("key", "value"):
        idx = getattr(kv, f"{kind}_out_idx")
        if idx.numel() == 0:
            continue
        if int(idx.max()) >= kv.head_dim:
            raise ValueError(f"{kind}_out_idx: expected channels below head_dim={kv.head_dim}, got {int(idx.max())}")
        ordered = idx.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"{kind}_out_idx: expected distinct channels within each vector, found a repeat")


def _gear_layer(entry: dict[str, Any], tensors: dict[str, Tensor]) -> GEARKV:
    """A GEARKV from its header entry and tensors, validated as a fresh one is, plus its outlier channels."""
    config = GEARConfig(**{"prefix_tokens": 0, **entry["config"]})  # files from before the prefix have none
    tail_len = entry["tail_len"]
    fields = {name: tensors[name] for name in TENSOR_FIELDS if name in tensors}
    for name in _TAILS:  # the valid rows back into a B-token tail buffer
        rows = fields[name]
        if rows.dim() != 4 or rows.shape[2] != tail_len:
            raise ValueError(f"{name}: expected (batch, kv_heads, tail_len={tail_len}, head_dim), got {tuple(rows.shape)}")
        buffer = rows.new_zeros(rows.shape[0], rows.shape[1], config.buffer_tokens, rows.shape[3])
        buffer[:, :, :tail_len] = rows
        fields[name] = buffer
    kv = GEARKV(config=config, tail_len=tail_len, **fields)
    _check_outlier_channels(kv)
    return kv


def _build_layer(entry: object, tensors: dict[str, Tensor]) -> Layer:
    """A layer from its header entry and its tensors (names without the ``layers.<i>.`` prefix)."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    expected = {"empty": (), "uncompressed": ("keys", "values"), "gear": TENSOR_FIELDS}.get(kind)
    if expected is None:
        raise ValueError(f"unknown kind in {entry!r} (expected 'gear', 'uncompressed' or 'empty')")
    old_gear = kind == "gear" and "prefix_tokens" not in entry.get("config", {})  # written before the prefix existed
    if set(tensors) != set(expected) and not (old_gear and set(tensors) == set(expected) - set(PREFIX_FIELDS)):
        raise ValueError(f"expected tensors {sorted(expected)}, got {sorted(tensors)}")
    if kind == "empty":
        return None
    if kind == "uncompressed":
        state = UncompressedState(tensors["keys"], tensors["values"], entry.get("window"), entry.get("seen"))
        state.validate()
        return state
    return _gear_layer(entry, tensors)


def load_kv(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> list[Layer]:
    """The layers saved by :func:`save_kv` at ``path``, on ``device`` (default: CPU): a GEARKV per
    compressed layer, an :class:`UncompressedState` per layer kept uncompressed, None per empty one.
    ``ValueError`` naming what is wrong for a foreign, damaged or inconsistent file."""
    path = check_path(path)
    check_device_arg("device", device)
    header, tensors = read_file(path, STORE_KEY, STORE_VERSION, "KV-cache")
    entries = header.get("layers")
    if not isinstance(entries, list):
        raise ValueError(f"path: {str(path)!r} has a damaged lowrank_ops header (no layer list)")
    per_layer: list[dict[str, Tensor]] = [{} for _ in entries]
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(entries):
            raise ValueError(f"path: {str(path)!r} holds a tensor {name!r} of no listed layer")
        per_layer[int(parts[1])][parts[2]] = t
    layers = []
    for i, (entry, named) in enumerate(zip(entries, per_layer)):
        try:
            layers.append(_build_layer(entry, named))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path: {str(path)!r}, layer {i} is invalid: {err}") from err
    if device is None:
        return layers
    return [None if layer is None else layer.to(device) for layer in layers]  # built and checked on CPU
