"""Quantized linear op: ``y = x (Ŵ + S)ᵀ + (x Vᵀ) Uᵀ + b`` from the packed format.

``lowrank_ops::quant_linear`` is a ``torch.library`` custom op (fake impl, autograd) that takes
the raw tensors of the packed format (see ``lowrank_ops/quant/format.py``, the shared contract):

* ``qweight`` int32 (N, K_pad·bits/32) — for 3 bits the low 2-bit plane (N, K_pad/16) — and
  ``qweight_hi`` int32 (N, K_pad/32), the 3-bit high plane (None otherwise);
* uniform mode: the group statistics in the ``scales``/``zeros`` slots — fp16 ``scales`` and
  ``zeros`` (N, G), or their SpQR-style second-level form, told apart by the first slot's dtype:
  ``stat_codes`` uint8 (N, G) and ``stat_meta`` fp16 (2, ceil(N/16), G); LUT mode: ``lut`` fp16
  (N, 2^bits);
* CSR outliers (optional): ``outlier_rowptr`` int32 (N+1), ``outlier_cols`` int16 (nnz,)
  (unsigned column), ``outlier_vals`` fp16 (nnz,);
* low-rank compensation (optional): ``lr_u`` (N, r), ``lr_v`` (r, K), fp16 or x's dtype;
* ``bias`` (N,) in x's dtype, ``bits`` ∈ {2, 3, 4}, ``group_size`` ∈ {32, 64, 128},
  ``in_features`` = K.

Backends per call (:mod:`lowrank_ops.core.backend`): ``cuda`` (the hand-written decode kernel of
:mod:`lowrank_ops.quant.cuda_decode`: M ≤ 8, fp16/bf16, 3/4 bits; low-rank path added by the
low-rank op), ``triton`` (the fused
dequant-matmul kernels of :mod:`lowrank_ops.kernels.quant`, path chosen by :func:`quant_path`),
``reference`` (plain torch via :func:`dequantize_reference`). Gradients flow to x, lr_u, lr_v
and bias; the packed weight, scales/zeros/LUT and outliers are frozen. The backward to x
(:func:`quant_linear_dx`) reads the packed weight with its own Triton kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_choice, check_device, check_dim, check_int, check_same, check_tensor
from lowrank_ops.quant.format import (
    BITS,
    GROUP_SIZES,
    MAX_OUTLIER_K,
    csr_coordinates,
    csr_to_dense,
    float_group_stats,
    group_stats_layout,
    padded_k,
    stats_are_quantized,
    unpack_codes,
)

DECODE_MAX_M = 16  # at or below this many rows the weight read dominates: split-K decode kernels
# Opt-in: from this many rows the Triton backend dequantizes the weight once (a streaming kernel)
# and runs one dense GEMM. Measured on an H100 at M = 256 (4ec857a, dequant / tile): 46.3 / 55.7 µs
# at 4096² 4-bit, but 113.0 / 88.0 at 11008 × 4096 and 219.5 / 135.8 with 1 % outliers.
# None (the default) keeps the fused paths, which never materialize a dense weight, as the quant
# issue specifies; set e.g. 256 to allow the transient dense weight at large batch.
DEQUANT_MIN_M: Optional[int] = None
QUANT_MAX_RANK = 128  # = kernels.quant.QUANT_MAX_RANK (not imported: that would import Triton)


def quant_path(m: int, n: int, k: int) -> str:
    """Triton route: ``"decode"`` for M ≤ 16 (split-K so batch 1 fills the GPU, two launches),
    ``"tile"`` above ((M-blocks × N-blocks) tensor-core tiles), or ``"dequant"`` from
    :data:`DEQUANT_MIN_M` rows when that opt-in is set (a transient dense weight, then cuBLAS)."""
    if m <= DECODE_MAX_M:
        return "decode"
    return "dequant" if DEQUANT_MIN_M is not None and m >= DEQUANT_MIN_M else "tile"


# --------------------------------------------------------------------------- reference
def dequantize_reference(
    qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], lr_u: Optional[Tensor], lr_v: Optional[Tensor],
    *, bits: int, group_size: int, in_features: int,
) -> Tensor:
    """Ŵ_total = Deq(Q) + S + U V as a float32 (N, K) tensor, straight from the spec."""
    n, k = qweight.shape[0], in_features
    q = unpack_codes(qweight, qweight_hi, bits, padded_k(k, group_size))[:, :k].to(torch.int64)
    if lut is not None:
        w = torch.gather(lut.float(), 1, q)
    else:
        group = torch.arange(k, device=q.device) // group_size
        scale, zero = float_group_stats(scales, zeros)
        w = (q.float() - zero[:, group]) * scale[:, group]
    if outlier_rowptr is not None:
        w = w + csr_to_dense(outlier_rowptr, outlier_cols, outlier_vals, (n, k))
    if lr_u is not None:
        w = w + lr_u.float() @ lr_v.float()
    return w


def quant_linear_reference(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], lr_u: Optional[Tensor], lr_v: Optional[Tensor], bias: Optional[Tensor],
    *, bits: int, group_size: int, in_features: int,
) -> Tensor:
    """Plain torch, fp32: ``x Ŵ_totalᵀ + b`` in x's dtype."""
    w = dequantize_reference(qweight, qweight_hi, scales, zeros, lut, outlier_rowptr, outlier_cols, outlier_vals,
                             lr_u, lr_v, bits=bits, group_size=group_size, in_features=in_features)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- backend support
def _quant_backend(x: Tensor, bits: int, has_lut: bool, group_size: int) -> str:
    from lowrank_ops.quant import cuda_decode

    support = {
        "cuda": cuda_decode.supports(x, bits, has_lut, group_size),
        "triton": backend.triton_support(x.device),
        "reference": Support(True),
    }
    return backend.select_backend("quant_linear", support, x.device)


# --------------------------------------------------------------------------- custom op
def _quant_linear_impl(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], lr_u: Optional[Tensor], lr_v: Optional[Tensor], bias: Optional[Tensor],
    bits: int, group_size: int, in_features: int,
) -> Tensor:
    packed = (qweight, qweight_hi, scales, zeros, lut, outlier_rowptr, outlier_cols, outlier_vals)
    chosen = _quant_backend(x, bits, lut is not None, group_size)
    if chosen == "reference":
        return quant_linear_reference(x, *packed, lr_u, lr_v, bias, bits=bits, group_size=group_size,
                                      in_features=in_features)
    if chosen == "cuda":
        from lowrank_ops.quant import cuda_decode

        return cuda_decode.quant_decode(x, *packed, lr_u, lr_v, bias, bits=bits, group_size=group_size)
    from lowrank_ops.kernels import quant as kernels

    path = quant_path(x.shape[0], qweight.shape[0], in_features)
    if lr_u is not None and lr_u.shape[1] > kernels.QUANT_MAX_RANK:
        # rank too large to keep on chip next to the accumulator: low-rank path as two GEMMs
        y = kernels.quant_matmul(x, *packed, None, None, bias, bits, group_size, path=path)
        return y + (x @ lr_v.to(x.dtype).t()) @ lr_u.to(x.dtype).t()
    return kernels.quant_matmul(x, *packed, lr_u, lr_v, bias, bits, group_size, path=path)


_quant_linear_op = torch.library.custom_op("lowrank_ops::quant_linear", _quant_linear_impl, mutates_args=())


@_quant_linear_op.register_fake
def _(x, qweight, qweight_hi, scales, zeros, lut, outlier_rowptr, outlier_cols, outlier_vals, lr_u, lr_v, bias,
      bits, group_size, in_features):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _quant_setup(ctx, inputs, output) -> None:
    x, *packed_and_lr, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(x, *packed_and_lr)
    ctx.meta = dict(bits=bits, group_size=group_size, in_features=in_features)
    ctx.has_bias = bias is not None


def _dx_backend(grad: Tensor) -> str:
    support = {
        "cuda": Support(False, "no CUDA kernel for the backward to x; the Triton kernel serves it"),
        "triton": backend.triton_support(grad.device),
        "reference": Support(True),
    }
    return backend.select_backend("quant_linear backward", support, grad.device)


def quant_linear_dx(grad: Tensor, packed: tuple, lr_u: Optional[Tensor], lr_v: Optional[Tensor], *,
                    bits: int, group_size: int, in_features: int) -> Tensor:
    """dx = dy · Ŵ_total as float32 (M, K), for grad (M, N) contiguous.

    Triton: the packed base by ``quant_matmul_dx`` (never expanded in memory), the outliers as a
    sparse (Kᵀ-major COO) product and the low-rank path as (dy U) V, all in fp32. Reference:
    the dense Ŵ_total from :func:`dequantize_reference`.
    """
    if _dx_backend(grad) == "reference":
        w = dequantize_reference(*packed, lr_u, lr_v, bits=bits, group_size=group_size, in_features=in_features)
        return grad.float() @ w
    from lowrank_ops.kernels import quant as kernels

    qweight, qweight_hi, scales, zeros, lut, rowptr, cols, vals = packed
    dx = kernels.quant_matmul_dx(grad, qweight, qweight_hi, scales, zeros, lut, bits, group_size, in_features)
    if rowptr is not None and vals.numel() > 0:
        rows, cols64 = csr_coordinates(rowptr, cols)
        s_t = torch.sparse_coo_tensor(torch.stack([cols64, rows]), vals.float(), (in_features, grad.shape[1]))
        dx += torch.sparse.mm(s_t, grad.float().t()).t()
    if lr_u is not None:
        dx += (grad.float() @ lr_u.float()) @ lr_v.float()
    return dx


def _quant_backward(ctx, grad: Tensor):
    x, *packed, lr_u, lr_v = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad = grad.contiguous()
    gf = grad.float()
    dx = du = dv = dbias = None
    if needs[0]:
        dx = quant_linear_dx(grad, tuple(packed), lr_u, lr_v, **ctx.meta).to(x.dtype)
    if lr_u is not None and (needs[9] or needs[10]):
        xf, uf, vf = x.float(), lr_u.float(), lr_v.float()
        if needs[9]:
            du = (gf.t() @ (xf @ vf.t())).to(lr_u.dtype)  # dU = dyᵀ (x Vᵀ)
        if needs[10]:
            dv = ((gf @ uf).t() @ xf).to(lr_v.dtype)  # dV = (dy U)ᵀ x
    if needs[11] and ctx.has_bias:
        dbias = grad.sum(0)
    return (dx,) + (None,) * 8 + (du, dv, dbias, None, None, None)


torch.library.register_autograd("lowrank_ops::quant_linear", _quant_backward, setup_context=_quant_setup)


# --------------------------------------------------------------------------- public wrapper
def _check_int_tensor(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...], x: Tensor) -> Tensor:
    check_tensor(name, t, ndim=len(shape), dtypes=(dtype,))
    for dim, size in enumerate(shape):
        check_dim(name, t, dim, size, f"{name} shape {shape}")
    check_device(name, t, x.device, "x")
    return t


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def quant_linear(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor] = None, scales: Optional[Tensor] = None,
    zeros: Optional[Tensor] = None, lut: Optional[Tensor] = None, outlier_rowptr: Optional[Tensor] = None,
    outlier_cols: Optional[Tensor] = None, outlier_vals: Optional[Tensor] = None, lr_u: Optional[Tensor] = None,
    lr_v: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, bits: int, group_size: int, in_features: int,
) -> Tensor:
    """``y = x (Ŵ + S)ᵀ + (x Vᵀ) Uᵀ + b`` for x of shape (..., K) and the packed format's tensors.

    Exactly one of (``scales`` and ``zeros``) or ``lut`` (the two slots may instead hold the
    second-level ``stat_codes`` and ``stat_meta``); the three outlier tensors all or none;
    ``lr_u``/``lr_v`` both or none. Shapes and dtypes are checked here (values, e.g. a
    monotone rowptr, are the format's ``validate()``'s job). Differentiable in x, lr_u, lr_v, bias.
    """
    bits = check_choice("bits", bits, BITS)
    group_size = check_choice("group_size", group_size, GROUP_SIZES)
    k = check_int("in_features", in_features, low=1)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {tuple(x.shape)}")
    check_dim("x", x, -1, k, "in_features")
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    n = qweight.shape[0]
    k_pad = padded_k(k, group_size)
    _check_int_tensor("qweight", qweight, torch.int32, (n, k_pad * (2 if bits == 3 else bits) // 32), x)
    if bits == 3:
        if qweight_hi is None:
            raise ValueError("qweight_hi: required for bits=3 (the high-bit plane), got None")
        _check_int_tensor("qweight_hi", qweight_hi, torch.int32, (n, k_pad // 32), x)
    elif qweight_hi is not None:
        raise ValueError(f"qweight_hi: only used for bits=3, got a tensor with bits={bits}")

    if lut is not None:
        if scales is not None or zeros is not None:
            raise ValueError("lut: LUT mode takes no scales/zeros; pass either lut or scales and zeros")
        _check_int_tensor("lut", lut, torch.float16, (n, 1 << bits), x)
    else:
        if scales is None or zeros is None:
            raise ValueError("scales: uniform mode needs both scales and zeros (or pass lut)")
        for t, (name, dtype, shape) in zip((scales, zeros), group_stats_layout(stats_are_quantized(scales), n, k_pad // group_size)):
            _check_int_tensor(name, t, dtype, shape, x)

    outliers = (outlier_rowptr, outlier_cols, outlier_vals)
    if any(t is not None for t in outliers):
        if any(t is None for t in outliers):
            raise ValueError("outlier_rowptr: outlier_rowptr, outlier_cols and outlier_vals go together (all or none)")
        if k > MAX_OUTLIER_K:
            raise ValueError(f"in_features: outlier columns are 16-bit, K must be <= {MAX_OUTLIER_K}, got {k}")
        _check_int_tensor("outlier_rowptr", outlier_rowptr, torch.int32, (n + 1,), x)
        check_tensor("outlier_cols", outlier_cols, ndim=1, dtypes=(torch.int16,))
        _check_int_tensor("outlier_cols", outlier_cols, torch.int16, (outlier_cols.shape[0],), x)
        _check_int_tensor("outlier_vals", outlier_vals, torch.float16, (outlier_cols.shape[0],), x)

    if (lr_u is None) != (lr_v is None):
        raise ValueError("lr_u: lr_u and lr_v go together (both or none)")
    if lr_u is not None:
        lr_dtypes = (torch.float16, x.dtype)
        check_tensor("lr_u", lr_u, ndim=2, dtypes=lr_dtypes)
        check_tensor("lr_v", lr_v, ndim=2, dtypes=lr_dtypes)
        r = lr_u.shape[1]
        if r < 1:
            raise ValueError(f"lr_u: expected rank >= 1, got shape {tuple(lr_u.shape)}")
        check_dim("lr_u", lr_u, 0, n, "out_features = qweight.shape[0]")
        check_dim("lr_v", lr_v, 0, r, "rank = lr_u.shape[1]")
        check_dim("lr_v", lr_v, 1, k, "in_features")
        check_same("lr_v", lr_v, "lr_u", lr_u)
        check_device("lr_u", lr_u, x.device, "x")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "x", x)
        check_dim("bias", bias, 0, n, "out_features = qweight.shape[0]")

    direct = backend.eager_inference(x, scales, zeros, lut, outlier_vals, lr_u, lr_v, bias)
    y = (_quant_linear_impl if direct else _quant_linear_op)(
        x.reshape(-1, k).contiguous(), qweight.contiguous(), _contig(qweight_hi), _contig(scales), _contig(zeros),
        _contig(lut), _contig(outlier_rowptr), _contig(outlier_cols), _contig(outlier_vals), _contig(lr_u),
        _contig(lr_v), _contig(bias), bits, group_size, k,
    )
    return y.reshape(*x.shape[:-1], n)
