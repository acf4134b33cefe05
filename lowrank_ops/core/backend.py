"""Which implementation runs an op: ``cuda`` (csrc/) -> ``triton`` -> ``reference``.

Every op asks :func:`select_backend` once per call with what that call needs. The
automatic choice walks the chain and takes the first backend that supports the call;
a pinned backend (environment variable ``LOWRANK_OPS_BACKEND`` or the context manager
:func:`use_backend`) is taken strictly: if it cannot serve the call, a ``ValueError``
says why, so a test that pins a backend knows that backend ran.

Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "LOWRANK_OPS_BACKEND"
_AUTO = "auto"

_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowrank_ops_backend", default=None)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + (_AUTO,):
        raise ValueError(f"{source}: expected one of {BACKENDS + (_AUTO,)}, got {name!r}")
    return name


def pinned_backend() -> str | None:
    """The backend pinned by :func:`use_backend` or ``$LOWRANK_OPS_BACKEND`` (None = automatic)."""
    name = _pinned.get()
    if name is None:
        name = _check_name(os.environ.get(ENV_VAR, _AUTO).strip().lower() or _AUTO, f"${ENV_VAR}")
    return None if name == _AUTO else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Pin one backend (``"cuda"``, ``"triton"``, ``"reference"`` or ``"auto"``) inside a ``with`` block."""
    token = _pinned.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _pinned.reset(token)


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Triton can launch on ``device``: a CUDA device, or CPU under the interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not triton_interpreter_enabled()
    return device.type == "cpu" and triton_interpreter_enabled()


@dataclass(frozen=True)
class Support:
    """Whether one backend can serve one call, and if not, why (for the error message).

    ``preferred=False`` marks a backend that can serve the call but measured slower than the
    next one for it: the automatic choice passes it over, pinning it still runs it.
    """

    ok: bool
    why: str = ""
    preferred: bool = True


def triton_support(device: torch.device) -> Support:
    """The ``triton`` backend's device verdict (:func:`triton_runs_on`), with the reason."""
    if not triton_runs_on(device):
        return Support(False, f"Triton cannot launch on {device} (CUDA device, or CPU with TRITON_INTERPRET=1)")
    return Support(True)


def triton_or_reference(op: str, what: str, triton: Support, device: torch.device) -> str:
    """:func:`select_backend` for an op that has a Triton kernel (``triton``: its verdict) and a
    torch reference but no csrc kernel; ``what`` names the op in the ``cuda`` refusal."""
    support = {
        "cuda": Support(False, f"there is no CUDA (csrc) kernel for {what}; use triton"),
        "triton": triton,
        "reference": Support(True),
    }
    return select_backend(op, support, device)


def cuda_kernel_support(x: object, kernel: str, shape_check: Callable[[torch.Tensor], Support]) -> Support:
    """Whether a csrc ``kernel`` can serve a call on ``x``: a CUDA tensor, ``shape_check(x)``
    (dtype, shape, format parameters) and the extension built. Cheap; never raises."""
    if not isinstance(x, torch.Tensor):
        return Support(False, f"x must be a tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        return Support(False, f"x is on {x.device}; the {kernel} needs a CUDA tensor")
    verdict = shape_check(x)
    if not verdict.ok:
        return verdict
    from lowrank_ops.core import cuda_ext

    if not cuda_ext.available():
        return Support(False, f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}")
    return Support(True)


def eager_inference(*inputs: torch.Tensor | None) -> bool:
    """Whether an op's call may run its implementation directly instead of through its custom op:
    torch.compile is not tracing it and no input needs a gradient. The op's dispatch and autograd
    wrapper are then pure host time (about 20 µs a call, bench/host_overhead.py), and an eager
    decode step pays it once per layer and token, for kernels that run a few µs at batch 1."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs)


def select_backend(op: str, support: dict[str, Support], device: torch.device) -> str:
    """Pick the backend for one call of ``op``.

    ``support`` maps each backend to whether it serves this call (by device, dtype, shape,
    availability). Automatic choice on a CPU tensor is always ``reference``: the Triton
    interpreter is a correctness tool, used only when pinned.
    """
    pinned = pinned_backend()
    if pinned is not None:
        verdict = support.get(pinned, Support(False, "no such implementation for this op"))
        if not verdict.ok:
            raise ValueError(f"{op}: pinned backend {pinned!r} cannot run this call: {verdict.why}")
        return pinned
    if device.type != "cuda":
        return "reference"
    for name in BACKENDS:
        verdict = support.get(name, Support(False))
        if verdict.ok and verdict.preferred:
            return name
    return "reference"
