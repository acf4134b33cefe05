"""Lazy, safe access to the compiled CUDA module ``lowrank_ops._C``.

Nothing here runs at import of :mod:`lowrank_ops`: the module is looked for on the first
call of :func:`load` or :func:`available`, and that result is cached. A missing module is
normal (no nvcc at install time) and stays quiet; a module that exists but fails to load
(wrong Python ABI, missing symbol, ...) logs one warning and is treated as missing. Nothing
here initialises a CUDA context.

:func:`build_and_load` builds ``csrc/`` from the source checkout into a cache directory and
loads that build instead (used by the compile-lane test and the GPU check script, where the
package may have been installed without nvcc).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

logger = logging.getLogger(__name__)

MODULE = "lowrank_ops._C"
CACHE_ENV = "LOWRANK_OPS_CACHE_DIR"
DISABLE_ENV = "LOWRANK_OPS_DISABLE_CUDA_EXT"  # "1": behave as if _C were not built

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_reason = "not looked for yet"
_cuda_ok: bool | None = None


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip() == "1"


def load() -> ModuleType | None:
    """``lowrank_ops._C`` or None (not built, disabled, or failed to load: see :func:`unavailable_reason`)."""
    global _module, _tried, _reason
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if _disabled():
            _reason = f"disabled by ${DISABLE_ENV}=1"
        elif MODULE in sys.modules:  # e.g. loaded by build_and_load()
            _module, _reason = sys.modules[MODULE], ""
        else:
            spec = None
            try:
                spec = importlib.util.find_spec(MODULE)
            except (ImportError, ValueError):
                pass
            if spec is None:
                _reason = "lowrank_ops._C is not built (install with nvcc on the PATH, or LOWRANK_OPS_BUILD_CUDA=1)"
            else:
                try:
                    _module, _reason = importlib.import_module(MODULE), ""
                except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
                    _reason = f"lowrank_ops._C exists at {spec.origin} but failed to load: {type(exc).__name__}: {exc}"
                    logger.warning("%s; the CUDA backend is disabled", _reason)
        _tried = True
    return _module


def _cuda_available() -> bool:
    global _cuda_ok
    if _cuda_ok is None:
        import torch

        _cuda_ok = bool(torch.cuda.is_available())
    return _cuda_ok


def available() -> bool:
    """True when ``_C`` loads and torch sees a CUDA device. Cached; cheap after the first call."""
    return load() is not None and _cuda_available()


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    if load() is None:
        return _reason
    if not _cuda_available():
        return "torch.cuda.is_available() is False"
    return ""


def reset() -> None:
    """Forget the cached result (tests; after building a module by hand)."""
    global _module, _tried, _reason, _cuda_ok
    with _lock:
        _module, _tried, _reason, _cuda_ok = None, False, "not looked for yet", None


def load_from(path: str | os.PathLike) -> ModuleType:
    """Import the extension file at ``path`` as ``lowrank_ops._C`` and make it the one in use."""
    global _module, _tried, _reason
    path = Path(path)
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load an extension module from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with _lock:
        sys.modules[MODULE] = mod
        import lowrank_ops

        lowrank_ops._C = mod  # type: ignore[attr-defined]
        _module, _tried, _reason = mod, True, ""
    return mod


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lowrank_ops"
    )
    return Path(root) / "cuda"


def build_and_load(
    cache_dir: str | os.PathLike | None = None,
    *,
    archs: object = None,
    force: bool = False,
    verbose: bool = False,
) -> ModuleType:
    """Build ``csrc/`` (from the source checkout) into ``cache_dir/<hash>/`` and load it.

    The subdirectory is keyed by a hash of the sources, archs, nvcc and Python ABI, so a
    second call with the same inputs reuses the build. Raises
    :class:`~lowrank_ops.core.cuda_build.CudaBuildError` when nvcc is missing or the build fails.
    """
    from lowrank_ops.core import cuda_build

    nvcc = cuda_build.find_nvcc()
    if nvcc is None:
        raise cuda_build.CudaBuildError("nvcc not found (set $NVCC or $CUDA_HOME, or put nvcc on the PATH)")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = base / cuda_build.source_hash(archs=archs, nvcc=nvcc)
    target = out / cuda_build.ext_filename()
    if force or not target.is_file():
        cuda_build.build(out, archs=archs, nvcc=nvcc, verbose=verbose)
    return load_from(target)


@dataclass(frozen=True)
class LaunchTarget:
    """Where a csrc/ kernel call runs: the module holding the kernel (``lowrank_ops._C``, or the
    CPU emulation's, :mod:`lowrank_ops.core.cuda_emulation`), the stream handle it launches on,
    the SM count its launch plan sizes grids for, the device type its tensors live on, and whether
    its kernels may launch with programmatic stream serialization (sm_90 and later: a kernel's CTAs
    start while the stream's previous kernel finishes, and wait for it on the device)."""

    module: Any
    stream: int
    num_sms: int
    device_type: str = "cuda"
    dependent_launch: bool = False


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """SMs of CUDA device ``device_index`` (queried once per device)."""
    import torch

    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


DEPENDENT_LAUNCH_MAJOR = 9  # programmatic dependent launch (griddepcontrol) needs sm_90
DEPENDENT_LAUNCH_ENV = "LOWRANK_OPS_DEPENDENT_LAUNCH"  # "0": plain launches on every device


def dependent_launch(device_index: int) -> bool:
    """Whether kernels on CUDA device ``device_index`` launch as programmatic dependent launches:
    on sm_90 and later unless ``$LOWRANK_OPS_DEPENDENT_LAUNCH`` is ``0`` (a switch for drivers or
    tools that mishandle them; ``1`` or unset: by the device). Raises ValueError for another value."""
    setting = os.environ.get(DEPENDENT_LAUNCH_ENV, "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"${DEPENDENT_LAUNCH_ENV}: expected 0 or 1, got {setting!r}")
    return setting == "1" and _capability_major(device_index) >= DEPENDENT_LAUNCH_MAJOR


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_capability(device_index)[0]


@contextlib.contextmanager
def on_device(device: Any, what: str, target: Optional[LaunchTarget] = None) -> Iterator[LaunchTarget]:
    """The target of a call whose tensors are on ``device``: ``target`` itself when given, else
    ``lowrank_ops._C`` on the device's current stream, with the device made current for the
    launch. Raises RuntimeError naming ``what`` when the module is unavailable."""
    if target is not None:
        yield target
        return
    import torch

    module = load()
    if module is None:
        raise RuntimeError(f"{what}: {unavailable_reason()}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        yield LaunchTarget(module, torch.cuda.current_stream(index).cuda_stream, sm_count(index),
                           dependent_launch=dependent_launch(index))
