"""Python side of the hand-written CUDA decode kernel ``y = (x Vᵀ) Uᵀ + b`` (csrc/lowrank_decode.cu).

The compiled module takes raw device pointers, sizes, a dtype code and the stream as ints
(no torch C++ API, see DESIGN.md). This wrapper is where the tensors are checked: dtype,
device, shapes, contiguity; it allocates the output and the fp32 workspace with torch (so the
caching allocator and CUDA-graph pools apply) and launches on the current stream.

Alignment: the 128-bit load paths need K % 8 == 0 (phase 1) or R % 8 == 0 (phase 2) and
16-byte aligned base pointers; the C++ launcher checks the actual pointers and falls back
to scalar loads otherwise, so any contiguous tensor is accepted
(:func:`vector_paths` reports which path a call takes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support, cuda_kernel_support
from lowrank_ops.core.checks import check_kernel_device, check_same

CUDA_DECODE_MAX_M = 16  # rows of x the kernel serves (the GEMV regime)
CUDA_DECODE_MAX_RANK = 1024  # T = x Vᵀ (M × R fp32) must fit in shared memory

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # = _C.DTYPE_FLOAT16 / _C.DTYPE_BFLOAT16


def supports(x: Tensor, rank: int) -> Support:
    """Whether the CUDA decode kernel can serve ``x`` (M, K) with this rank. Cheap; never raises."""
    return cuda_kernel_support(x, "CUDA decode kernel", lambda t: shape_support(t.dtype, tuple(t.shape), rank))


def shape_support(dtype: torch.dtype, shape: tuple[int, ...], rank: object) -> Support:
    """The dtype / shape / rank part of :func:`supports` (device- and build-independent)."""
    if dtype not in _DTYPE_CODES:
        return Support(False, f"x has dtype {dtype}; the CUDA decode kernel takes float16 or bfloat16")
    if len(shape) != 2:
        return Support(False, f"x must be 2-D (M, K), got shape {shape}")
    m, k = shape
    if not 1 <= m <= CUDA_DECODE_MAX_M:
        return Support(False, f"x has {m} rows; the CUDA decode kernel serves 1..{CUDA_DECODE_MAX_M}")
    if k < 1:
        return Support(False, "x has K = 0 columns")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= CUDA_DECODE_MAX_RANK:
        return Support(False, f"rank {rank!r} is outside 1..{CUDA_DECODE_MAX_RANK} served by the CUDA decode kernel")
    return Support(True)


def vector_paths(x: Tensor, v: Tensor, u: Tensor) -> tuple[bool, bool]:
    """(phase 1 uses 128-bit loads, phase 2 uses 128-bit loads): the rule the C++ launcher applies."""
    k, r = x.shape[1], v.shape[0]
    vec1 = k % 8 == 0 and x.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
    vec2 = r % 8 == 0 and u.data_ptr() % 16 == 0
    return vec1, vec2


def _check(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: expected dtype float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous (row-major) tensor, got strides {t.stride()} for shape {tuple(t.shape)}"
        )
    return t


def check_inputs(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor],
                 device_type: str = "cuda") -> tuple[int, int, int, int]:
    """Raise ``TypeError``/``ValueError`` unless the kernel takes this call; return (M, K, N, R).

    The device check (``device_type``: cpu for the emulation lane) comes last, so every other check
    can be exercised with CPU tensors.
    """
    _check("x", x, 2)
    _check("v", v, 2)
    _check("u", u, 2)
    if bias is not None:
        _check("bias", bias, 1)
    m, k = x.shape
    r, n = v.shape[0], u.shape[0]
    for name, t in (("v", v), ("u", u), ("bias", bias)):
        if t is None:
            continue
        check_same(name, t, "x", x)
    if v.shape[1] != k:
        raise ValueError(f"v: expected shape (R, {k}) (K = x.shape[1]), got {tuple(v.shape)}")
    if u.shape[1] != r:
        raise ValueError(f"u: expected shape (N, {r}) (R = v.shape[0]), got {tuple(u.shape)}")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias: expected shape ({n},) (N = u.shape[0]), got {tuple(bias.shape)}")
    if not 1 <= m <= CUDA_DECODE_MAX_M:
        raise ValueError(f"x: expected 1..{CUDA_DECODE_MAX_M} rows for the CUDA decode kernel, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"x: expected K >= 1 columns, got shape {tuple(x.shape)}")
    if not 1 <= r <= CUDA_DECODE_MAX_RANK:
        raise ValueError(
            f"v: expected 1..{CUDA_DECODE_MAX_RANK} rows (the rank) for the CUDA decode kernel, got shape {tuple(v.shape)}"
        )
    check_kernel_device(x, device_type)
    return m, k, n, r


def lowrank_decode(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor] = None, *,
                   target: Optional[cuda_ext.LaunchTarget] = None) -> Tensor:
    """``(x Vᵀ) Uᵀ + b`` on the CUDA decode kernel: x (M ≤ 16, K), V (R ≤ 1024, K), U (N, R), bias (N,).

    fp16/bf16, contiguous, one device; fp32 accumulation; returns (M, N) in x's dtype.
    Launches on ``torch.cuda.current_stream()``; capturable in a CUDA graph. ``target``: another
    module to run it (the CPU emulation lane's, on CPU tensors).
    """
    m, k, n, r = check_inputs(x, v, u, bias, target.device_type if target else "cuda")
    with cuda_ext.on_device(x.device, "lowrank_decode", target) as t:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if n == 0:
            return y
        splits = t.module.lowrank_decode_splits(m, k, r, t.num_sms)
        workspace = torch.empty(splits * m * r, dtype=torch.float32, device=x.device)
        t.module.lowrank_decode(
            x.data_ptr(), v.data_ptr(), u.data_ptr(), 0 if bias is None else bias.data_ptr(),
            y.data_ptr(), workspace.data_ptr(), m, k, n, r, splits, t.num_sms, _DTYPE_CODES[x.dtype], t.stream,
        )
    return y
