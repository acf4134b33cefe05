"""Safetensors files with a JSON header of ours: written atomically, checked whole when read.

Both kinds of file lowrank_ops writes (compressed models, :mod:`lowrank_ops.io`; compressed KV
caches, :mod:`lowrank_ops.kvcache.store`) are one safetensors file whose metadata holds, under
the kind's key, a JSON document with a format ``version`` and a SHA-256 digest (``sha256``) of
every tensor's name and bytes. A file is written under a temporary name and renamed, so an
interrupted save never leaves a half-written file under the final name; reading checks the
header, the version and the digest before anything is built from it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def check_path(path: object) -> Path:
    """``path`` as a Path; ``TypeError`` unless it is a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes, in name order."""
    sha = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        sha.update(key.encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return sha.hexdigest()


def write_file(tensors: Mapping[str, torch.Tensor], path: Path, key: str, header: Mapping[str, Any]) -> Path:
    """Write CPU-contiguous ``tensors`` to ``path`` with ``header`` plus their digest under ``key``;
    atomically (a temporary file renamed), creating the parent directory. Returns ``path``."""
    document = {**header, "sha256": digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata={key: json.dumps(document)})
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def read_file(path: Path, key: str, version: int, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header (without its digest) and the tensors (on CPU) of a file written by
    :func:`write_file` under ``key``; ``FileNotFoundError`` when there is none, ``ValueError``
    (calling it a ``what``) when it is not readable, not ours, of another version or damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"path: no {what} file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers/buffers
        raise ValueError(f"path: {str(path)!r} is not a readable safetensors file ({err})") from err
    if key not in metadata:
        raise ValueError(f"path: {str(path)!r} is not a lowrank_ops {what} (no {key!r} metadata)")
    try:
        header = json.loads(metadata[key])
        found_version, stored_digest = header.pop("version"), header.pop("sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"path: {str(path)!r} has a damaged lowrank_ops header ({err})") from err
    if found_version != version:
        raise ValueError(f"path: {what} version {found_version} is not supported (expected {version})")
    if digest(tensors) != stored_digest:
        raise ValueError(f"path: {str(path)!r} is damaged: its tensor bytes do not match the stored SHA-256")
    return header, tensors
