"""Save and load compressed models: one safetensors file, our JSON config in its header.

The file holds the model's whole state dict (compressed layers and everything else, so
fine-tuned values come back too), plus under the metadata key ``lowrank_ops`` a JSON
document naming each compressed layer's format and settings and a SHA-256 digest of all
tensor bytes. Loading rebuilds the compressed layers in a fresh copy of the original
architecture. Everything is checked before the model is touched: a wrong architecture, a
foreign or damaged file is refused with a ``ValueError`` and the model is left as it was.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lowrank_ops.core.files import check_path, read_file, write_file
from lowrank_ops.core.layers import CompressedLinear, swap_modules
from lowrank_ops.lowrank.layer import LoRALinear, LowRankLinear
from lowrank_ops.quant.layer import QuantLinear
from lowrank_ops.sparse.layer import SparseLinear

CHECKPOINT_KEY = "lowrank_ops"
CHECKPOINT_VERSION = 1
LAYER_TYPES: dict[str, type[CompressedLinear]] = {cls.FORMAT: cls for cls in (LowRankLinear, LoRALinear, QuantLinear, SparseLinear)}


def save_compressed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (with its compressed layers) to ``path`` (a ``.safetensors`` file)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = check_path(path)
    layers = {
        name: {"format": m.FORMAT, "dtype": str(m.dtype).removeprefix("torch."), "config": m.config()}
        for name, m in model.named_modules()
        if isinstance(m, CompressedLinear)
    }
    if not layers:
        raise ValueError("model: expected at least one compressed layer (run lowrank_ops.compress first), found none")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors stores each once
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return write_file(tensors, path, CHECKPOINT_KEY, {"version": CHECKPOINT_VERSION, "layers": layers})


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header, tensors = read_file(path, CHECKPOINT_KEY, CHECKPOINT_VERSION, "checkpoint")
    layers = header.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"path: {str(path)!r} has a damaged lowrank_ops header (no layer table)")
    return layers, tensors


def _replacement(model: nn.Module, name: str, entry: Mapping[str, Any]) -> CompressedLinear:
    try:
        current = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"model: has no layer {name!r} named in the checkpoint (a different architecture?)") from err
    try:
        cls = LAYER_TYPES[entry["format"]]
        dtype = getattr(torch, entry["dtype"])
        config = entry["config"]
    except (KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"path: checkpoint entry for layer {name!r} is damaged or of an unknown format ({entry!r})") from err
    if not isinstance(current, (nn.Linear, CompressedLinear)):
        raise ValueError(f"model: layer {name!r} is a {type(current).__name__}, expected nn.Linear")
    if (current.out_features, current.in_features) != (config.get("out_features"), config.get("in_features")):
        raise ValueError(
            f"model: layer {name!r} is {current.out_features}x{current.in_features}, the checkpoint's is "
            f"{config.get('out_features')}x{config.get('in_features')}"
        )
    device = next(itertools.chain(current.parameters(), current.buffers())).device
    try:
        return cls.from_config(config, dtype=dtype, device=device)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"path: checkpoint config of layer {name!r} is invalid: {err}") from err


def load_compressed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the compressed layers saved at ``path`` in ``model`` (a fresh copy of the original
    architecture) and load all saved values. Returns ``model``. All or nothing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers, tensors = _read_checkpoint(check_path(path))
    replacements = {name: _replacement(model, name, entry) for name, entry in layers.items()}

    expected: dict[str, torch.Tensor] = {
        k: t for k, t in model.state_dict().items() if not any(k.startswith(n + ".") for n in replacements)
    }
    for name, layer in replacements.items():
        expected.update({f"{name}.{k}": t for k, t in layer.state_dict().items()})
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"path: checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in expected.items():
        if tensors[key].shape != t.shape or tensors[key].dtype != t.dtype:
            raise ValueError(
                f"path: tensor {key!r} is {tuple(tensors[key].shape)} {tensors[key].dtype} in the checkpoint, "
                f"the model expects {tuple(t.shape)} {t.dtype}"
            )

    kept_state = {k: t.detach().clone() for k, t in model.state_dict().items() if k in expected}
    originals = {name: model.get_submodule(name) for name in replacements}
    swap_modules(model, replacements)
    try:
        model.load_state_dict(tensors, strict=True)
    except BaseException:
        swap_modules(model, originals)
        model.load_state_dict(kept_state, strict=False)
        raise
    return model
