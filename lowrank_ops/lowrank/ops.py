"""Low-rank linear ops: ``y = (x Vᵀ) Uᵀ + b`` and ``y = x Wᵀ + s·(x Aᵀ) Bᵀ + b``.

Each op is a ``torch.library`` custom op in namespace ``lowrank_ops`` with a fake (meta)
implementation for ``torch.compile`` and CUDA graphs, autograd, and a plain-torch reference
that is both the CPU path and the test oracle. Inside the op one backend is chosen per call
(:mod:`lowrank_ops.core.backend`); within the Triton backend :func:`lowrank_path` picks the
kernel by batch size and rank.

The ops take 2-D ``x`` (tokens × features); :func:`lowrank_linear` and :func:`lora_linear`
are the checked, any-leading-shape public wrappers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_dim, check_same, check_tensor

DECODE_MAX_M = 16  # the decode kernels (Triton and CUDA) serve up to this many rows

# Dispatch thresholds, measured on one H100 (bench/results/h100-2026-11-26-d6cbff8, fp16):
PREFER_DECODE_MAX_M = 1  # at M = 16 two cuBLAS GEMMs (10-16 us) beat both decode kernels (11-84 us)
PREFER_DECODE_MAX_RANK = 64  # Triton decode at M = 1: r = 64 6.6 us vs 9.6 us; r = 512 17.8 us vs 11.6 us
LORA_UNFUSED_MAX_M = 16  # LoRA at M = 1: base GEMM + adapter 28.8 us, fused kernel 34.3 us; M = 256: 34.4 vs 33.2


def lowrank_path(m: int, n: int, k: int, rank: int) -> str:
    """Triton-backend route for ``(x Vᵀ) Uᵀ``: ``"decode"`` or ``"two_gemm"`` (``"fused"`` on request).

    decode:   split over rank and K, then over N, so batch 1 fills the GPU and V and U are
              each read once; it beats two GEMMs only at one row and small ranks (measured).
    two_gemm: two cuBLAS GEMMs; the M × r intermediate's round trip through memory is small
              next to either product.
    fused:    one launch keeping the (BLOCK_M × r) intermediate in registers. Every program
              re-reads its x rows and all of V, and on the H100 that measured about 2× slower
              than two GEMMs at every batch tried (r = 64: 20.9 vs 9.6 us at M = 1, 26.5 vs
              10.6 us at M = 256), so it is never chosen automatically; the benchmark still
              times it (``triton:fused``) and the kernel is kept correct in every lane.
    """
    if m <= PREFER_DECODE_MAX_M and rank <= PREFER_DECODE_MAX_RANK:
        return "decode"
    return "two_gemm"


def lora_path(m: int) -> str:
    """Triton-backend route for LoRA: ``"unfused"`` (cuBLAS base GEMM + adapter) or ``"fused"``."""
    return "unfused" if m <= LORA_UNFUSED_MAX_M else "fused"


# --------------------------------------------------------------------------- references
def lowrank_reference(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Plain torch, fp32 accumulation: ``(x Vᵀ) Uᵀ + b``."""
    y = (x.float() @ v.float().t()) @ u.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lora_reference(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """Plain torch, fp32 accumulation: ``x Wᵀ + s·(x Aᵀ) Bᵀ + b``."""
    xf = x.float()
    y = xf @ w.float().t() + scale * ((xf @ a.float().t()) @ b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- backend support
def _cuda_decode_support(x: Tensor, rank: int) -> Support:
    if x.device.type != "cuda":
        return Support(False, f"x is on {x.device}, the CUDA kernel needs a CUDA tensor")
    from lowrank_ops.lowrank import cuda_decode

    verdict = cuda_decode.supports(x, rank)
    if verdict.ok and x.shape[0] > PREFER_DECODE_MAX_M:
        why = f"{x.shape[0]} rows: two cuBLAS GEMMs measured faster than the CUDA decode kernel above M = {PREFER_DECODE_MAX_M}"
        return Support(True, why, preferred=False)
    return verdict


def _lora_triton_support(x: Tensor, rank: int) -> Support:
    verdict = backend.triton_support(x.device)
    if not verdict.ok:
        return verdict
    from lowrank_ops.kernels.lowrank import LORA_MAX_RANK

    if rank > LORA_MAX_RANK:
        return Support(False, f"the fused LoRA kernel keeps rank <= {LORA_MAX_RANK} on chip, got rank {rank}")
    return Support(True)


def _lowrank_backend(x: Tensor, v: Tensor) -> str:
    support = {
        "cuda": _cuda_decode_support(x, v.shape[0]),
        "triton": backend.triton_support(x.device),
        "reference": Support(True),
    }
    return backend.select_backend("lowrank_linear", support, x.device)


# --------------------------------------------------------------------------- lowrank_linear op
def _lowrank_linear_impl(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    chosen = _lowrank_backend(x, v)
    if chosen == "reference":
        return lowrank_reference(x, v, u, bias)
    if chosen == "cuda":
        from lowrank_ops.lowrank import cuda_decode

        return cuda_decode.lowrank_decode(x, v, u, bias)
    path = lowrank_path(x.shape[0], u.shape[0], x.shape[1], v.shape[0])
    if path == "two_gemm":
        y = torch.nn.functional.linear(torch.nn.functional.linear(x, v), u, bias)
        return y
    from lowrank_ops.kernels import lowrank as kernels

    return kernels.lowrank_matmul(x, v, u, bias, path=path)


_lowrank_linear_op = torch.library.custom_op("lowrank_ops::lowrank_linear", _lowrank_linear_impl, mutates_args=())


@_lowrank_linear_op.register_fake
def _(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], u.shape[0]))


def _lowrank_setup(ctx, inputs, output) -> None:
    x, v, u, bias = inputs
    ctx.save_for_backward(x, v, u)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad: Tensor):
    x, v, u = ctx.saved_tensors
    need_x, need_v, need_u, need_bias = ctx.needs_input_grad
    grad = grad.contiguous()
    grad_u_space = grad @ u  # (M, r): dy projected into the rank space, shared by dx and dV
    dx = grad_u_space @ v if need_x else None
    dv = grad_u_space.t() @ x if need_v else None
    du = grad.t() @ (x @ v.t()) if need_u else None
    dbias = grad.sum(0) if (need_bias and ctx.has_bias) else None
    return dx, dv, du, dbias


torch.library.register_autograd("lowrank_ops::lowrank_linear", _lowrank_backward, setup_context=_lowrank_setup)


# --------------------------------------------------------------------------- lora_linear op
def _lora_backend(x: Tensor, rank: int) -> str:
    support = {
        "cuda": Support(False, "no CUDA kernel for the base + low-rank form; use triton"),
        "triton": _lora_triton_support(x, rank),
        "reference": Support(True),
    }
    return backend.select_backend("lora_linear", support, x.device)


def _lora_linear_impl(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    if _lora_backend(x, a.shape[0]) == "reference":
        return lora_reference(x, w, a, b, scale, bias)
    if lora_path(x.shape[0]) == "unfused":
        linear = torch.nn.functional.linear
        return torch.addmm(linear(x, w, bias), linear(x, a), b.t(), alpha=scale)
    from lowrank_ops.kernels import lowrank as kernels

    return kernels.lora_matmul(x, w, a, b, scale, bias)


_lora_linear_op = torch.library.custom_op("lowrank_ops::lora_linear", _lora_linear_impl, mutates_args=())


@_lora_linear_op.register_fake
def _(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def _lora_setup(ctx, inputs, output) -> None:
    x, w, a, b, scale, bias = inputs
    ctx.save_for_backward(x, w, a, b)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _lora_backward(ctx, grad: Tensor):
    x, w, a, b = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad
    s = ctx.scale
    grad = grad.contiguous()
    grad_rank_space = grad @ b  # (M, r)
    dx = grad @ w + s * (grad_rank_space @ a) if need_x else None
    dw = grad.t() @ x if need_w else None
    da = s * (grad_rank_space.t() @ x) if need_a else None
    db = s * (grad.t() @ (x @ a.t())) if need_b else None
    dbias = grad.sum(0) if (need_bias and ctx.has_bias) else None
    return dx, dw, da, db, None, dbias


torch.library.register_autograd("lowrank_ops::lora_linear", _lora_backward, setup_context=_lora_setup)


# --------------------------------------------------------------------------- public wrappers
def _check_common(x: Tensor, k: int, bias: Optional[Tensor], n: int) -> None:
    check_tensor("x", x)
    check_dim("x", x, -1, k, "in_features")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "x", x)
        check_dim("bias", bias, 0, n, "out_features")


def _flatten(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def lowrank_linear(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y = (x Vᵀ) Uᵀ + b`` for x of shape (..., K), V (r, K), U (N, r), bias (N,) or None.

    All tensors share one dtype (fp16, bf16, fp32) and device. Differentiable in every input.
    """
    check_tensor("v", v, ndim=2)
    check_tensor("u", u, ndim=2)
    check_same("v", v, "u", u)
    check_dim("u", u, 1, v.shape[0], "rank = v.shape[0]")
    _check_common(x, v.shape[1], bias, u.shape[0])
    check_same("x", x, "v", v)
    op = _lowrank_linear_impl if backend.eager_inference(x, v, u, bias) else _lowrank_linear_op
    y = op(_flatten(x), v.contiguous(), u.contiguous(), None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], u.shape[0])


def lora_linear(
    x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float = 1.0, bias: Optional[Tensor] = None
) -> Tensor:
    """``y = x Wᵀ + s·(x Aᵀ) Bᵀ + b``: a dense base W (N, K) plus a rank-r path A (r, K), B (N, r)."""
    check_tensor("w", w, ndim=2)
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    check_same("a", a, "w", w)
    check_same("b", b, "w", w)
    check_dim("a", a, 1, w.shape[1], "in_features = w.shape[1]")
    check_dim("b", b, 0, w.shape[0], "out_features = w.shape[0]")
    check_dim("b", b, 1, a.shape[0], "rank = a.shape[0]")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    _check_common(x, w.shape[1], bias, w.shape[0])
    check_same("x", x, "w", w)
    op = _lora_linear_impl if backend.eager_inference(x, w, a, b, bias) else _lora_linear_op
    y = op(_flatten(x), w.contiguous(), a.contiguous(), b.contiguous(), float(scale), None if bias is None else bias.contiguous())
    return y.reshape(*x.shape[:-1], w.shape[0])
