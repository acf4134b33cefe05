"""Python side of the hand-written CUDA N:M sparse decode kernel (csrc/sparse_decode.cu).

``y = x Wₙₘᵀ + b`` for M ≤ 8 rows of x (fp16/bf16), every pattern of the format (m ∈ {4, 8, 16},
1 ≤ n < m), kept values dense (in x's dtype) or 4-bit (int32 codes, 8 a word along KK, with fp16
scales/zeros per group of 32/64/128 kept values: the format's ``qvalues``), bias fused; one
launch on the current stream (CUDA-graph capturable). The compiled module takes raw device
pointers, sizes, the pattern, a dtype code and the stream as ints; this wrapper checks the
tensors (dtype, device, shapes, contiguity) and allocates y.

Alignment: none required beyond the dtypes' own. The kernel reads values as 128-bit words when
KK % 8 == 0 and the values base is 16-byte aligned, x likewise when K % 8 == 0; otherwise it
falls back to scalar loads (any view works). Index words and 4-bit codes are read as 32-bit
words (index rows are not 16-byte aligned in general: W = ceil(KK / 10) for m = 8).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support, cuda_kernel_support
from lowrank_ops.core.checks import check_decode_x, check_kernel_device, check_kernel_operand
from lowrank_ops.quant.format import padded_k
from lowrank_ops.sparse.format import M_CHOICES, check_nm, index_words

CUDA_SPARSE_MAX_M = 8  # rows of x the kernel serves
CUDA_SPARSE_GROUP_SIZES = (32, 64, 128)  # group sizes of 4-bit kept values

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # = _C.DTYPE_FLOAT16 / _C.DTYPE_BFLOAT16


def supports(x: object, values: object, n: object, m: object, group_size: object = None) -> Support:
    """Whether the CUDA N:M decode kernel can serve ``x`` (M, K) with ``values`` at pattern n:m:
    dense values of x's dtype (``group_size`` None) or 4-bit int32 codes in groups of
    ``group_size``. Cheap; never raises."""
    def shape_check(t: Tensor) -> Support:
        dtype = t.dtype if group_size is None else torch.int32
        if not isinstance(values, Tensor) or values.dtype != dtype:
            got = values.dtype if isinstance(values, Tensor) else type(values).__name__
            what = f"x's dtype {t.dtype}" if group_size is None else "int32 (4-bit codes)"
            return Support(False, f"values must be a tensor of {what}, got {got}")
        return shape_support(t.dtype, tuple(t.shape), n, m, group_size)

    return cuda_kernel_support(x, "CUDA sparse decode kernel", shape_check)


def shape_support(dtype: torch.dtype, shape: tuple[int, ...], n: object, m: object,
                  group_size: object = None) -> Support:
    """The dtype / shape / pattern / group-size part of :func:`supports` (device- and
    build-independent)."""
    if dtype not in _DTYPE_CODES:
        return Support(False, f"x has dtype {dtype}; the CUDA sparse decode kernel takes float16 or bfloat16")
    if len(shape) != 2:
        return Support(False, f"x must be 2-D (M, K), got shape {shape}")
    rows, k = shape
    if not 1 <= rows <= CUDA_SPARSE_MAX_M:
        return Support(False, f"x has {rows} rows; the CUDA sparse decode kernel serves 1..{CUDA_SPARSE_MAX_M}")
    if isinstance(m, bool) or m not in M_CHOICES or isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < m:
        return Support(False, f"pattern {n!r}:{m!r}; the CUDA sparse decode kernel serves n:m with m in {M_CHOICES}, 1 <= n < m")
    if k < 1 or k % m:
        return Support(False, f"x has K = {k} columns; expected a positive multiple of m = {m}")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in CUDA_SPARSE_GROUP_SIZES):
        return Support(False, f"group_size={group_size!r}; the CUDA sparse decode kernel serves 4-bit values in "
                              f"groups of {CUDA_SPARSE_GROUP_SIZES}")
    return Support(True)


def check_inputs(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bias: Optional[Tensor],
                 qscales: Optional[Tensor] = None, qzeros: Optional[Tensor] = None,
                 group_size: Optional[int] = None, device_type: str = "cuda") -> tuple[int, int, int]:
    """Raise ``TypeError``/``ValueError`` unless the kernel takes this call; return (M, K, N).

    The device check (``device_type``: cpu for the emulation lane) comes last, so every other check
    can be exercised with CPU tensors.
    """
    n, m = check_nm(n, m)
    rows, k = check_decode_x(x, _DTYPE_CODES, CUDA_SPARSE_MAX_M, "CUDA sparse decode kernel")
    if k % m:
        raise ValueError(f"x: expected K a positive multiple of m={m} columns, got shape {tuple(x.shape)}")
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise ValueError(f"values: expected a 2-D (N, KK) tensor, got {getattr(values, 'shape', type(values).__name__)}")
    n_out, kept = values.shape[0], k // m * n
    dev = x.device
    if group_size is None:
        if qscales is not None or qzeros is not None:
            raise ValueError("group_size: expected 32, 64 or 128 with qscales/qzeros (4-bit values), got None")
        check_kernel_operand("values", values, (x.dtype,), (n_out, kept), dev)
    else:
        if isinstance(group_size, bool) or group_size not in CUDA_SPARSE_GROUP_SIZES:
            raise ValueError(f"group_size: expected one of {CUDA_SPARSE_GROUP_SIZES}, got {group_size!r}")
        kk_pad = padded_k(kept, group_size)
        check_kernel_operand("values", values, (torch.int32,), (n_out, kk_pad // 8), dev)
        for name, t in (("qscales", qscales), ("qzeros", qzeros)):
            check_kernel_operand(name, t, (torch.float16,), (n_out, kk_pad // group_size), dev)
    check_kernel_operand("indices", indices, (torch.int32,), (n_out, index_words(kept, m)), dev)
    if bias is not None:
        check_kernel_operand("bias", bias, (x.dtype,), (n_out,), dev)
    check_kernel_device(x, device_type)
    return rows, k, n_out


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def nm_linear_decode(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None, *,
                     qscales: Optional[Tensor] = None, qzeros: Optional[Tensor] = None,
                     group_size: Optional[int] = None, target: Optional[cuda_ext.LaunchTarget] = None) -> Tensor:
    """``x Wₙₘᵀ + b`` on the CUDA N:M decode kernel; x (M ≤ 8, K) fp16/bf16, values in x's dtype,
    or, with ``group_size`` ∈ {32, 64, 128}, 4-bit kept values: ``values`` the int32 codes
    (N, KK_pad / 8), ``qscales``/``qzeros`` fp16 (N, KK_pad / group_size).

    Tensors as in :mod:`lowrank_ops.sparse.format` (contiguous, on x's device). Returns (M, N) in
    x's dtype. Launches on ``torch.cuda.current_stream()``; capturable in a CUDA graph.
    ``target``: another module to run it (the CPU emulation lane's, on CPU tensors).
    """
    rows, k, n_out = check_inputs(x, values, indices, n, m, bias, qscales, qzeros, group_size,
                                  target.device_type if target else "cuda")
    with cuda_ext.on_device(x.device, "nm_linear_decode", target) as t:
        y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
        if n_out == 0:
            return y
        t.module.sparse_decode(x.data_ptr(), values.data_ptr(), indices.data_ptr(), _ptr(bias), y.data_ptr(),
                               rows, k, n_out, n, m, _DTYPE_CODES[x.dtype], t.stream, _ptr(qscales), _ptr(qzeros),
                               group_size or 0)
    return y
