"""Python side of the hand-written CUDA quantized decode kernel (csrc/quant_decode.cu).

``y = x (Ŵ + S)ᵀ + b`` for M ≤ 8 rows of x (fp16/bf16), 2-, 3- or 4-bit codes, uniform
(scale/zero) or LUT mode, CSR outliers fused; one launch on the current stream (CUDA-graph
capturable). The compiled module takes raw device pointers, sizes, a dtype code and the stream
as ints; this wrapper checks the tensors (dtype, device, shapes, contiguity) and allocates y.

Low-rank path: not fused into the kernel. When ``lr_u``/``lr_v`` are given, :func:`quant_decode`
adds ``(x lr_vᵀ) lr_uᵀ`` with the existing low-rank op
(:func:`lowrank_ops.lowrank.ops.lowrank_linear`, itself served by the CUDA low-rank decode
kernel at small M). Reason: the rank-r GEMV pair needs a reduction over all of K before the
second product, i.e. a grid-wide dependency that one-warp-per-row decode cannot express without
a second pass; the low-rank op already is that two-pass kernel. Bias is fused in the kernel.

Alignment: the kernel reads qweight as 16-byte words and needs a 16-byte aligned base (4 bytes
for qweight_hi); a misaligned (offset view) plane is copied here first. x takes a 128-bit
staging path when K % 8 == 0 and it is 16-byte aligned, else scalar loads (any x works).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support, cuda_kernel_support
from lowrank_ops.core.checks import check_decode_x, check_kernel_device, check_kernel_operand
from lowrank_ops.quant.format import group_stats_layout, padded_k, stats_are_quantized

CUDA_QUANT_MAX_M = 8  # rows of x the kernel serves
CUDA_QUANT_BITS = (2, 3, 4)
CUDA_QUANT_GROUP_SIZES = (32, 64, 128)

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # = _C.DTYPE_FLOAT16 / _C.DTYPE_BFLOAT16


def supports(x: object, bits: object, has_lut: bool = False, group_size: object = 128) -> Support:
    """Whether the CUDA quant decode kernel can serve ``x`` (M, K) at ``bits``. Cheap; never raises.

    ``has_lut`` is accepted for symmetry with the format (both modes are served)."""
    return cuda_kernel_support(x, "CUDA quant decode kernel",
                               lambda t: shape_support(t.dtype, tuple(t.shape), bits, group_size))


def shape_support(dtype: torch.dtype, shape: tuple[int, ...], bits: object, group_size: object = 128) -> Support:
    """The dtype / shape / bits part of :func:`supports` (device- and build-independent)."""
    if dtype not in _DTYPE_CODES:
        return Support(False, f"x has dtype {dtype}; the CUDA quant decode kernel takes float16 or bfloat16")
    if len(shape) != 2:
        return Support(False, f"x must be 2-D (M, K), got shape {shape}")
    m, k = shape
    if not 1 <= m <= CUDA_QUANT_MAX_M:
        return Support(False, f"x has {m} rows; the CUDA quant decode kernel serves 1..{CUDA_QUANT_MAX_M}")
    if k < 1:
        return Support(False, "x has K = 0 columns")
    if isinstance(bits, bool) or bits not in CUDA_QUANT_BITS:
        return Support(False, f"bits={bits!r}; the CUDA quant decode kernel serves {CUDA_QUANT_BITS}")
    if isinstance(group_size, bool) or group_size not in CUDA_QUANT_GROUP_SIZES:
        return Support(False, f"group_size={group_size!r}; the CUDA quant decode kernel serves {CUDA_QUANT_GROUP_SIZES}")
    return Support(True)


def check_inputs(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], bias: Optional[Tensor], *, bits: int, group_size: int, device_type: str = "cuda",
) -> tuple[int, int, int]:
    """Raise ``TypeError``/``ValueError`` unless the kernel takes this call; return (M, K, N).

    The device check (``device_type``: cpu for the emulation lane) comes last, so every other check
    can be exercised with CPU tensors.
    """
    m, k = check_decode_x(x, _DTYPE_CODES, CUDA_QUANT_MAX_M, "CUDA quant decode kernel")
    if isinstance(bits, bool) or bits not in CUDA_QUANT_BITS:
        raise ValueError(f"bits: expected one of {CUDA_QUANT_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in CUDA_QUANT_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {CUDA_QUANT_GROUP_SIZES}, got {group_size!r}")
    if not isinstance(qweight, Tensor) or qweight.dim() != 2:
        raise ValueError(f"qweight: expected a 2-D int32 tensor, got {getattr(qweight, 'shape', type(qweight).__name__)}")
    n = qweight.shape[0]
    k_pad = padded_k(k, group_size)
    dev = x.device
    i32 = (torch.int32,)
    check_kernel_operand("qweight", qweight, i32, (n, k_pad * (4 if bits == 4 else 2) // 32), dev)
    if bits == 3:
        if qweight_hi is None:
            raise ValueError("qweight_hi: required for bits=3 (the high-bit plane), got None")
        check_kernel_operand("qweight_hi", qweight_hi, i32, (n, k_pad // 32), dev)
    elif qweight_hi is not None:
        raise ValueError(f"qweight_hi: only used for bits=3, got a tensor with bits={bits}")
    f16 = (torch.float16,)
    if lut is not None:
        if scales is not None or zeros is not None:
            raise ValueError("lut: LUT mode takes no scales/zeros; pass either lut or scales and zeros")
        check_kernel_operand("lut", lut, f16, (n, 1 << bits), dev)
    else:
        if scales is None or zeros is None:
            raise ValueError("scales: uniform mode needs both scales and zeros (or pass lut)")
        for t, (name, dtype, shape) in zip((scales, zeros), group_stats_layout(stats_are_quantized(scales), n, k_pad // group_size)):
            check_kernel_operand(name, t, (dtype,), shape, dev)
    outliers = (outlier_rowptr, outlier_cols, outlier_vals)
    if any(t is not None for t in outliers):
        if any(t is None for t in outliers):
            raise ValueError("outlier_rowptr: outlier_rowptr, outlier_cols and outlier_vals go together (all or none)")
        if k > 65535:
            raise ValueError(f"x: outlier columns are 16-bit, K must be <= 65535, got {k}")
        check_kernel_operand("outlier_rowptr", outlier_rowptr, i32, (n + 1,), dev)
        if not isinstance(outlier_cols, Tensor) or outlier_cols.dim() != 1:
            raise ValueError("outlier_cols: expected a 1-D int16 tensor")
        nnz = outlier_cols.shape[0]
        check_kernel_operand("outlier_cols", outlier_cols, (torch.int16,), (nnz,), dev)
        check_kernel_operand("outlier_vals", outlier_vals, f16, (nnz,), dev)
    if bias is not None:
        check_kernel_operand("bias", bias, (x.dtype,), (n,), dev)
    check_kernel_device(x, device_type)
    return m, k, n


def _aligned(t: Optional[Tensor], align: int) -> Optional[Tensor]:
    return t if t is None or t.data_ptr() % align == 0 else t.clone()


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def quant_decode(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor] = None, scales: Optional[Tensor] = None,
    zeros: Optional[Tensor] = None, lut: Optional[Tensor] = None, outlier_rowptr: Optional[Tensor] = None,
    outlier_cols: Optional[Tensor] = None, outlier_vals: Optional[Tensor] = None, lr_u: Optional[Tensor] = None,
    lr_v: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, bits: int, group_size: int,
    target: Optional[cuda_ext.LaunchTarget] = None,
) -> Tensor:
    """``x (Ŵ + S)ᵀ + (x lr_vᵀ) lr_uᵀ + b`` on the CUDA quant decode kernel; x (M ≤ 8, K) fp16/bf16.

    Tensors as in :mod:`lowrank_ops.quant.format` (contiguous, on x's device). Returns (M, N) in
    x's dtype. Launches on ``torch.cuda.current_stream()``; capturable in a CUDA graph.
    ``target``: another module to run it (the CPU emulation lane's, on CPU tensors).
    """
    if (lr_u is None) != (lr_v is None):
        raise ValueError("lr_u: lr_u and lr_v go together (both or none)")
    m, k, n = check_inputs(x, qweight, qweight_hi, scales, zeros, lut, outlier_rowptr, outlier_cols, outlier_vals,
                           bias, bits=bits, group_size=group_size, device_type=target.device_type if target else "cuda")
    if outlier_vals is not None and outlier_vals.numel() == 0:
        # an empty CSR adds nothing; its empty tensors have null data pointers, which the kernel
        # would read as a CSR missing its columns and values
        outlier_rowptr = outlier_cols = outlier_vals = None
    qweight = _aligned(qweight, 16)
    qweight_hi = _aligned(qweight_hi, 4)
    with cuda_ext.on_device(x.device, "quant_decode", target) as t:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if n == 0:
            return y
        t.module.quant_decode(
            x.data_ptr(), qweight.data_ptr(), _ptr(qweight_hi), _ptr(scales), _ptr(zeros), _ptr(lut),
            _ptr(outlier_rowptr), _ptr(outlier_cols), _ptr(outlier_vals), _ptr(bias), y.data_ptr(),
            m, k, n, bits, group_size, _DTYPE_CODES[x.dtype], int(stats_are_quantized(scales)), t.stream,
        )
    if lr_u is not None:
        from lowrank_ops.lowrank.cuda_decode import CUDA_DECODE_MAX_RANK
        from lowrank_ops.lowrank.ops import lowrank_linear

        u, v = lr_u.to(x.dtype), lr_v.to(x.dtype)
        if u.shape[1] <= CUDA_DECODE_MAX_RANK:
            y = y + lowrank_linear(x, v, u)  # its own backend choice (the CUDA low-rank decode kernel here)
        else:  # beyond the low-rank kernel's rank limit (and a pinned "cuda" would refuse it): two GEMMs
            y = y + (x @ v.t()) @ u.t()
    return y
