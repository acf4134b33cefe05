"""N:M sparse linear op: ``y = x Wₙₘᵀ + b`` straight from the packed format.

``lowrank_ops::nm_linear`` is a ``torch.library`` custom op (fake impl, autograd) that takes the
raw tensors of the packed format (see ``lowrank_ops/sparse/format.py``, the shared contract):
``values`` (N, KK) in x's dtype, ``indices`` int32 (N, W), ``bias`` (N,) in x's dtype or None,
``n``, ``m``, ``in_features`` = K, and ``path`` (``"auto"`` or one of :data:`PATHS`). With 4-bit
kept values (the format's ``qvalues``: a 4-bit uniform ``QuantFormat`` of the (N, KK) values
matrix) ``values`` is its ``qweight`` int32 (N, KK_pad / 8) and ``qscales``/``qzeros`` fp16
(N, KK_pad / ``group_size``) and ``group_size`` ∈ {32, 64, 128} come along; every backend reads
the codes itself (no dequantized copy is made outside the reference).

Backends per call (:mod:`lowrank_ops.core.backend`): ``cuda`` (the hand-written decode kernel of
:mod:`lowrank_ops.sparse.cuda_decode`), ``triton`` (the kernels of
:mod:`lowrank_ops.kernels.sparse`, path chosen by :func:`nm_path`), ``reference`` (plain torch:
dequantize 4-bit values → unpack → matmul). Kernel modules are imported lazily; a missing
module or function makes that backend unsupported for the call, with the reason.

Paths of the GPU (triton) backend: ``"decode"`` (M ≤ 16 rows: split-K gather, reads only kept
values + indices), ``"tile"`` (expand kept values on chip, tensor-core ``tl.dot``), ``"expand"``
(≥ :data:`EXPAND_MIN_ROWS` rows: the weight expanded once to a transient dense one, then one
dense GEMM) and, for 2:4 at ≥ :data:`SEMI_STRUCTURED_MIN_ROWS` rows of fp16/bf16 on CUDA, ``"semi_structured"``: torch's
own 2:4 sparse matmul (cuSPARSELt/CUTLASS) on a :class:`SparseSemiStructuredTensor` built once
from the packed weight and cached while ``values``/``indices`` are unchanged (same objects, same
version counters; dense values only). Pass ``path=`` to force one (the benchmark compares them).

Autograd: ``dx = dy · Ŵ`` (:func:`nm_linear_dx`: on the triton backend a kernel that expands Ŵ
tile by tile on chip, dense or 4-bit values; the reference expands it in torch); dense kept
``values`` get ``dvalues[r, j] = (dyᵀ x)[r, col(r, j)]`` (:func:`nm_linear_dvalues`: on the
triton backend an SDDMM kernel that never forms the dense gradient; fixed-mask sparse training:
the pruned positions never receive gradient), ``dbias = Σ dy``; ``indices`` and 4-bit codes, scales and
zeros are frozen. Nothing is computed for inputs that do not require grad.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_choice, check_device, check_dim, check_same, check_tensor
from lowrank_ops.quant.format import GROUP_SIZES, padded_k
from lowrank_ops.quant.ops import dequantize_reference
from lowrank_ops.sparse.format import (
    SEMI_STRUCTURED_MULTIPLE,
    check_nm,
    index_words,
    kept_columns,
    to_semi_structured,
    unpack_nm,
)

DECODE_MAX_M = 16  # at or below this many rows the weight read dominates: split-K decode kernel
SEMI_STRUCTURED_MIN_ROWS = 128  # 2:4 at this many rows or more: torch's sparse tensor-core matmul
# Other patterns (and 4-bit kept values) at this many rows or more: the weight expanded once to a
# transient dense one, then cuBLAS. Measured on an H100 at 4096² × 1024 (4ec857a, expand / tile):
# 1:4 58.1 / 317.1 µs, 2:8 59.4 / 269.3, 2:4 with 4-bit values 71.5 / 847.2 (fp16 GEMM 46.2).
EXPAND_MIN_ROWS = 128
PATHS = ("decode", "tile", "expand", "semi_structured")
_KERNEL_FUNCTIONS = {"decode": "nm_matmul_decode", "tile": "nm_matmul_tile", "expand": "nm_matmul_expand",  # + "_q4"
                     "dx": "nm_matmul_dx", "dvalues": "nm_matmul_dvalues"}


def nm_path(rows: int, n: int | None = None, m: int | None = None, quantized: bool = False) -> str:
    """GPU route for ``rows`` rows of x: ``"decode"`` for ≤ 16 rows, ``"semi_structured"`` for
    2:4 dense kept values (not ``quantized``) at ≥ :data:`SEMI_STRUCTURED_MIN_ROWS` rows (when the
    pattern is given), ``"expand"`` for the others at ≥ :data:`EXPAND_MIN_ROWS` rows, else
    ``"tile"``. Calls the semi-structured path cannot serve (dtype, shape) fall back to
    ``"expand"``."""
    if rows <= DECODE_MAX_M:
        return "decode"
    if (n, m) == (2, 4) and not quantized and rows >= SEMI_STRUCTURED_MIN_ROWS:
        return "semi_structured"
    return "expand" if rows >= EXPAND_MIN_ROWS else "tile"


# --------------------------------------------------------------------------- reference
def nm_dense_weight(values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                    qscales: Optional[Tensor] = None, qzeros: Optional[Tensor] = None,
                    group_size: Optional[int] = None) -> Tensor:
    """The dense fp32 (N, K) ``Ŵ`` in plain torch: 4-bit kept values (``group_size`` given)
    dequantized by the quant family's reference, then unpacked to their columns."""
    if group_size is not None:
        kept = in_features // m * n
        values = dequantize_reference(values, None, qscales, qzeros, None, None, None, None, None, None,
                                      bits=4, group_size=group_size, in_features=kept)
    return unpack_nm(values.float(), indices, n, m, in_features)


def nm_linear_reference(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                        n: int, m: int, in_features: int, qscales: Optional[Tensor] = None,
                        qzeros: Optional[Tensor] = None, group_size: Optional[int] = None) -> Tensor:
    """Plain torch, fp32: the dense ``Ŵ`` (:func:`nm_dense_weight`) and ``x Ŵᵀ + b``, in x's dtype."""
    w = nm_dense_weight(values, indices, n, m, in_features, qscales, qzeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- semi-structured
def semi_structured_support(x: Tensor, values: Tensor, n: int, m: int) -> Support:
    """Whether torch's 2:4 semi-structured matmul can serve this call. Cheap; never raises."""
    if (n, m) != (2, 4):
        return Support(False, f"torch's semi-structured sparsity is 2:4 only, got {n}:{m}")
    if x.device.type != "cuda":
        return Support(False, f"torch's semi-structured matmul needs a CUDA tensor, x is on {x.device}")
    if values.dtype != x.dtype:
        return Support(False, f"semi-structured path needs dense kept values in x's dtype, got {values.dtype} "
                              "(4-bit kept values take the decode or tile path)")
    if x.dtype not in (torch.float16, torch.bfloat16):
        return Support(False, f"semi-structured path takes float16/bfloat16, got {x.dtype}")
    rows, cols = values.shape[0], values.shape[1] * 2
    if rows % SEMI_STRUCTURED_MULTIPLE[0] or cols % SEMI_STRUCTURED_MULTIPLE[1]:
        return Support(False, f"semi-structured weight must be a multiple of {SEMI_STRUCTURED_MULTIPLE}, got ({rows}, {cols})")
    return Support(True)


_SEMI_CACHE: dict[tuple[int, int], tuple] = {}


def semi_structured_weight(values: Tensor, indices: Tensor, in_features: int) -> Tensor:
    """The packed 2:4 weight as torch's ``SparseSemiStructuredTensor`` (CUDA), cached per
    ``(values, indices)`` pair while both objects live and their version counters are unchanged."""
    key = (id(values), id(indices))
    entry = _SEMI_CACHE.get(key)
    if entry is not None:
        vref, iref, versions, semi = entry
        if vref() is values and iref() is indices and versions == (values._version, indices._version):
            return semi
    for stale in [k for k, (vref, iref, _, _) in _SEMI_CACHE.items() if vref() is None or iref() is None]:
        del _SEMI_CACHE[stale]
    semi = to_semi_structured(values, indices, in_features)
    _SEMI_CACHE[key] = (weakref.ref(values), weakref.ref(indices), (values._version, indices._version), semi)
    return semi


# --------------------------------------------------------------------------- backend support
def _cuda_support(x: Tensor, values: Tensor, n: int, m: int, group_size: Optional[int] = None) -> Support:
    try:
        from lowrank_ops.sparse import cuda_decode
    except ImportError as err:
        return Support(False, f"lowrank_ops.sparse.cuda_decode is not available ({err})")
    if not all(hasattr(cuda_decode, f) for f in ("supports", "nm_linear_decode")):
        return Support(False, "lowrank_ops.sparse.cuda_decode lacks supports()/nm_linear_decode()")
    return cuda_decode.supports(x, values, n, m, group_size)


def _triton_kernels(path: str, group_size: Optional[int] = None):
    """The Triton function for ``path`` (``"decode"``, ``"tile"``, ``"expand"``, ``"dx"`` or
    ``"dvalues"``; its ``_q4`` variant
    for 4-bit kept values), or None and a reason string why not."""
    name = _KERNEL_FUNCTIONS[path] + ("" if group_size is None else "_q4")
    try:
        from lowrank_ops.kernels import sparse as kernels
    except ImportError as err:
        return None, f"lowrank_ops.kernels.sparse is not available ({err})"
    fn = getattr(kernels, name, None)
    if fn is None:
        return None, f"lowrank_ops.kernels.sparse lacks {name}()"
    return fn, ""


def _kept(values: Tensor, qscales: Optional[Tensor], qzeros: Optional[Tensor], group_size: Optional[int]) -> tuple:
    """The kept-value arguments of the Triton launchers: ``(values,)``, or ``(qweight, scales,
    zeros, group_size)`` for the ``_q4`` variants."""
    return (values,) if group_size is None else (values, qscales, qzeros, group_size)


def _resolve_path(path: str, x: Tensor, values: Tensor, n: int, m: int) -> str:
    rows = x.shape[0]
    if path == "auto":
        path = nm_path(rows, n, m)
        if path == "semi_structured" and not semi_structured_support(x, values, n, m).ok:
            path = "expand"
    return path


def _triton_support(x: Tensor, values: Tensor, n: int, m: int, path: str, group_size: Optional[int] = None) -> Support:
    launches = backend.triton_support(x.device)
    if not launches.ok:
        return launches
    path = _resolve_path(path, x, values, n, m)
    if path == "semi_structured":
        return semi_structured_support(x, values, n, m)
    if path == "decode" and x.shape[0] > DECODE_MAX_M:
        return Support(False, f"decode path serves 1..{DECODE_MAX_M} rows, got {x.shape[0]}")
    fn, why = _triton_kernels(path, group_size)
    return Support(fn is not None, why)


def _nm_backend(x: Tensor, values: Tensor, n: int, m: int, path: str, group_size: Optional[int] = None) -> str:
    support = {
        "cuda": (_cuda_support(x, values, n, m, group_size) if path == "auto"
                 else Support(False, f"path {path!r} was forced")),
        "triton": _triton_support(x, values, n, m, path, group_size),
        "reference": Support(True),
    }
    chosen = backend.select_backend("nm_linear", support, x.device)
    if path != "auto" and chosen == "reference" and x.device.type == "cuda" and backend.pinned_backend() is None:
        raise ValueError(f"path: {path!r} was forced but cannot serve this call: {support['triton'].why}")
    return chosen


# --------------------------------------------------------------------------- custom op
def _nm_linear_impl(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                    n: int, m: int, in_features: int, path: str, qscales: Optional[Tensor] = None,
                    qzeros: Optional[Tensor] = None, group_size: Optional[int] = None) -> Tensor:
    chosen = _nm_backend(x, values, n, m, path, group_size)
    if chosen == "reference":
        return nm_linear_reference(x, values, indices, bias, n, m, in_features, qscales, qzeros, group_size)
    if chosen == "cuda":
        from lowrank_ops.sparse import cuda_decode

        return cuda_decode.nm_linear_decode(x, values, indices, n, m, bias, qscales=qscales, qzeros=qzeros,
                                            group_size=group_size)
    path = _resolve_path(path, x, values, n, m)
    if path == "semi_structured":
        return torch.nn.functional.linear(x, semi_structured_weight(values, indices, in_features), bias)
    fn, _ = _triton_kernels(path, group_size)
    return fn(x, *_kept(values, qscales, qzeros, group_size), indices, n, m, bias)


_nm_linear_op = torch.library.custom_op("lowrank_ops::nm_linear", _nm_linear_impl, mutates_args=())


@_nm_linear_op.register_fake
def _(x, values, indices, bias, n, m, in_features, path, qscales=None, qzeros=None, group_size=None):
    return x.new_empty((x.shape[0], values.shape[0]))


def _backward_backend(kernel: str, device: torch.device, group_size: Optional[int] = None) -> str:
    """Backend of one backward product (``kernel`` "dx" or "dvalues"): Triton or the reference."""
    launches = backend.triton_support(device)
    fn, why = _triton_kernels(kernel, group_size) if launches.ok else (None, launches.why)
    support = {
        "cuda": Support(False, f"no CUDA kernel for the backward ({kernel}); the Triton kernel serves it"),
        "triton": Support(fn is not None, why),
        "reference": Support(True),
    }
    return backend.select_backend("nm_linear backward", support, device)


def nm_linear_dx(grad: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                 qscales: Optional[Tensor] = None, qzeros: Optional[Tensor] = None,
                 group_size: Optional[int] = None) -> Tensor:
    """``dx = dy · Ŵ`` (M, K) for grad (M, N) contiguous and the op's packed weight.

    Triton: ``nm_matmul_dx`` / ``nm_matmul_dx_q4`` read the kept values (dense or 4-bit) and
    index words and expand Ŵ tile by tile on chip (fp32 accumulation, result in grad's dtype).
    Reference: the dense fp32 Ŵ of :func:`nm_dense_weight`, result in fp32.
    """
    if _backward_backend("dx", grad.device, group_size) == "reference":
        return grad.float() @ nm_dense_weight(values, indices, n, m, in_features, qscales, qzeros, group_size)
    fn, _ = _triton_kernels("dx", group_size)
    return fn(grad, *_kept(values, qscales, qzeros, group_size), indices, n, m, in_features)


def nm_linear_dvalues(grad: Tensor, x: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                      dtype: torch.dtype) -> Tensor:
    """The dense kept values' gradient (N, KK) in ``dtype``: ``dyᵀ x`` at the kept columns only
    (fixed-mask sparse training), for grad (M, N) and x (M, K) contiguous. Triton: the SDDMM
    kernel ``nm_matmul_dvalues`` (the dense (N, K) gradient is never formed). Reference: the
    dense dW gathered at the kept columns."""
    if _backward_backend("dvalues", grad.device) == "reference":
        dw = grad.float().t() @ x.float()
        return torch.gather(dw, 1, kept_columns(indices, n, m, in_features)).to(dtype)
    fn, _ = _triton_kernels("dvalues")
    return fn(grad, x, indices, n, m, dtype)


def _nm_setup(ctx, inputs, output) -> None:
    x, values, indices, bias, n, m, in_features, _, qscales, qzeros, group_size = inputs
    ctx.save_for_backward(x, values, indices, qscales, qzeros)
    ctx.meta = (n, m, in_features, group_size)
    ctx.has_bias = bias is not None


def _nm_backward(ctx, grad: Tensor):
    x, values, indices, qscales, qzeros = ctx.saved_tensors
    n, m, in_features, group_size = ctx.meta
    needs = ctx.needs_input_grad
    dx = dvalues = dbias = None
    if needs[0]:
        dx = nm_linear_dx(grad.contiguous(), values, indices, n, m, in_features, qscales, qzeros, group_size).to(x.dtype)
    if needs[1]:  # dense kept values only (4-bit codes are int32, never requiring grad)
        dvalues = nm_linear_dvalues(grad.contiguous(), x, indices, n, m, in_features, values.dtype)
    if needs[3] and ctx.has_bias:
        dbias = grad.sum(0)
    return dx, dvalues, None, dbias, None, None, None, None, None, None, None


torch.library.register_autograd("lowrank_ops::nm_linear", _nm_backward, setup_context=_nm_setup)


# --------------------------------------------------------------------------- public wrapper
def nm_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None, *,
              n: int, m: int, in_features: int, path: str = "auto", qscales: Optional[Tensor] = None,
              qzeros: Optional[Tensor] = None, group_size: Optional[int] = None) -> Tensor:
    """``y = x Wₙₘᵀ + b`` for x of shape (..., K) and the packed format's ``values``/``indices``.

    ``values`` must have x's dtype (fp16/bf16/fp32), ``bias`` too. 4-bit kept values: pass the
    ``qvalues`` QuantFormat's ``qweight`` as ``values`` (int32 (N, KK_pad / 8)), its ``scales``
    and ``zeros`` as ``qscales``/``qzeros`` (fp16 (N, KK_pad / group_size)) and its
    ``group_size``; all three or none. Shapes, dtypes and devices are checked here (that
    ``indices`` hold increasing positions is the format's ``validate()``'s job). ``path`` forces
    a GPU path (:data:`PATHS`) of the triton backend; ``"auto"`` lets :func:`nm_path` choose.
    Differentiable in x, dense values (kept positions only) and bias.
    """
    n, m = check_nm(n, m)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1 or in_features % m:
        raise ValueError(f"in_features: expected a positive multiple of m={m}, got {in_features!r}")
    if not isinstance(path, str) or path not in ("auto",) + PATHS:
        raise ValueError(f"path: expected one of {['auto', *PATHS]}, got {path!r}")
    k = in_features
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {tuple(x.shape)}")
    check_dim("x", x, -1, k, "in_features")
    kept = k // m * n
    q4 = (qscales is not None, qzeros is not None, group_size is not None)
    if any(q4):
        if not all(q4):
            given = [name for name, there in zip(("qscales", "qzeros", "group_size"), q4) if there]
            raise ValueError(f"qscales/qzeros/group_size: 4-bit kept values need all three, got only {given}")
        group_size = check_choice("group_size", group_size, GROUP_SIZES)
        kk_pad = padded_k(kept, group_size)
        check_tensor("values", values, ndim=2, dtypes=(torch.int32,))
        check_dim("values", values, 1, kk_pad // 8,
                  f"4-bit codes: KK_pad / 8 int32 words per row, KK_pad = ceil(KK / {group_size})·{group_size}")
        check_device("values", values, x.device, "x")
        rows = values.shape[0]
        for name, t in (("qscales", qscales), ("qzeros", qzeros)):
            check_tensor(name, t, ndim=2, dtypes=(torch.float16,))
            check_dim(name, t, 0, rows, "out_features = values.shape[0]")
            check_dim(name, t, 1, kk_pad // group_size, f"KK_pad / {group_size} groups of kept values per row")
            check_device(name, t, x.device, "x")
    else:
        check_tensor("values", values, ndim=2)
        check_same("values", values, "x", x)
        check_dim("values", values, 1, kept, "KK = in_features / m · n kept values per row")
        rows = values.shape[0]
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,))
    check_dim("indices", indices, 0, rows, "out_features = values.shape[0]")
    check_dim("indices", indices, 1, index_words(kept, m), "ceil(KK / positions per word) int32 words")
    check_device("indices", indices, x.device, "x")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "x", x)
        check_dim("bias", bias, 0, rows, "out_features = values.shape[0]")
    op = _nm_linear_impl if backend.eager_inference(x, values, bias, qscales, qzeros) else _nm_linear_op
    y = op(x.reshape(-1, k).contiguous(), values.contiguous(), indices.contiguous(),
           None if bias is None else bias.contiguous(), n, m, k, path,
           None if qscales is None else qscales.contiguous(), None if qzeros is None else qzeros.contiguous(),
           group_size)
    return y.reshape(*x.shape[:-1], rows)
