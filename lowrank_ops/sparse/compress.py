"""Pruners: dense weight ``W`` (N × K, ``nn.Linear`` layout) [+ calibration statistics] → N:M
mask (and updated kept weights) → :class:`~lowrank_ops.sparse.format.NMFormat`.

* :func:`magnitude_mask` — keep the ``n`` largest ``|W|`` of every group of ``m`` input columns.
* :func:`wanda_mask` — Wanda (Sun et al. 2023): score ``|W_ij|·‖X_j‖₂`` (input-channel norms of
  the calibration inputs), top ``n`` per group.
* :func:`sparsegpt` — SparseGPT (Frantar & Alistarh 2023): walks the columns left to right with
  the upper Cholesky factor ``U`` of ``H⁻¹`` (``H = 2XᵀX/n`` + damping); when a group of ``m``
  columns starts, its mask is chosen on the current (already error-updated) weights by the OBS
  saliency ``w²/[U]_jj²``; each pruned weight's error is fed back into the not-yet-processed
  columns (lazy block updates), so the kept weights absorb what pruning removed.
* :func:`prune` — the one entry point: mask + kept values, optional 4-bit quantization of the kept
  values (the quantization family's HQQ quantizer) and optional low-rank compensation of the
  remaining error (the quantization family's EoRA :func:`lowrank_compensation`).

All arithmetic runs in float32 on the weight's device.
"""
from __future__ import annotations


import torch
from torch import Tensor

from lowrank_ops.calibration import InputStats, check_input_stats
from lowrank_ops.core.obs import damped_hessian, few_threads, inverse_cholesky_upper
from lowrank_ops.core.checks import FLOAT_DTYPES, check_choice, check_finite, check_int, check_positive_float, check_tensor
from lowrank_ops.quant.compress import lowrank_compensation, quantize
from lowrank_ops.quant.format import GROUP_SIZES
from lowrank_ops.sparse.format import NMFormat, check_nm, nm_mask_from_scores, pack_nm

METHODS = ("auto", "magnitude", "wanda", "sparsegpt")
_WEIGHT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_weight(weight: object, m: int) -> Tensor:
    check_tensor("weight", weight, ndim=2, dtypes=_WEIGHT_DTYPES)
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty (N, K) tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(f"weight: expected in_features (K = {weight.shape[1]}) to be a multiple of m={m}")
    check_finite("weight", weight)
    return weight


# ----------------------------------------------------------------------------- masks


def magnitude_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Bool (N, K) N:M mask keeping the ``n`` largest ``|W|`` per group of ``m`` input columns."""
    n, m = check_nm(n, m)
    weight = _check_weight(weight, m)
    return nm_mask_from_scores(weight.abs().float(), n, m)


def wanda_mask(weight: Tensor, stats: InputStats, n: int = 2, m: int = 4) -> Tensor:
    """Bool (N, K) N:M mask keeping the ``n`` largest ``|W_ij|·‖X_j‖₂`` per group of ``m``."""
    n, m = check_nm(n, m)
    weight = _check_weight(weight, m)
    stats = check_input_stats(stats, weight.shape[1])
    norms = stats.channel_norms().to(device=weight.device, dtype=torch.float32)
    return nm_mask_from_scores(weight.abs().float() * norms, n, m)


# ----------------------------------------------------------------------------- SparseGPT


def _sparsegpt_group(w1: Tensor, err1: Tensor, u1: Tensor, mask: Tensor, g0: int, n: int, m: int) -> None:
    """One group of ``m`` columns starting at ``g0`` of the block ``w1`` (updated in place, with
    the group's errors in ``err1`` and its mask written into ``mask``, an (N, m) view).

    The mask keeps the ``n`` highest OBS saliencies ``w²/U_jj²`` of the current weights. The
    column-by-column OBS step (``e_j = p_j·w_j/U_jj``, then ``w_l -= e_j·U_jl`` for l > j, with
    ``p_j = 1`` for pruned columns) is solved for the whole group at once: per row, the errors
    satisfy the unit lower-triangular system ``(I + diag(p/d)·Ũᵀ) e = (p/d)·w`` (``Ũ`` the strictly
    upper part of the group's block of ``U``), one batched triangular solve instead of ``m``
    sequential rank-1 updates."""
    ug = u1[g0:g0 + m, g0:g0 + m]
    d = ug.diagonal()
    wg = w1[:, g0:g0 + m]
    keep = torch.topk(wg.square() / d.square(), n, dim=1).indices
    mask.scatter_(1, keep, True)
    scale = (~mask).float() / d  # p / d per row and column
    system = torch.eye(m, device=w1.device) + scale[:, :, None] * ug.triu(1).t()
    e = torch.linalg.solve_triangular(system, (scale * wg)[:, :, None], upper=False, unitriangular=True)[..., 0]
    w1[:, g0:] -= e @ u1[g0:g0 + m, g0:]
    err1[:, g0:g0 + m] = e


def sparsegpt(weight: Tensor, stats: InputStats, n: int = 2, m: int = 4, *, damp: float = 0.01,
              block_size: int = 128) -> tuple[Tensor, Tensor]:
    """SparseGPT N:M pruning (module docstring). Returns ``(pruned weight (N, K) float32 with the
    OBS-updated kept values and exact zeros elsewhere, bool N:M mask)``; minimises the
    calibration output error ``‖(W − Ŵ) Xᵀ‖``."""
    n, m = check_nm(n, m)
    weight = _check_weight(weight, m)
    stats = check_input_stats(stats, weight.shape[1])
    damp = check_positive_float("damp", damp)
    block_size = check_int("block_size", block_size, low=1)
    block = max(m, block_size // m * m)  # whole groups per block: a group never straddles blocks

    w = weight.float().clone()
    rows, k = w.shape
    upper = inverse_cholesky_upper(damped_hessian(stats, w, damp, torch.float32))
    mask = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    with few_threads(w.device, rows * block):
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            u1 = upper[i1:i2, i1:i2]
            for g0 in range(0, i2 - i1, m):
                _sparsegpt_group(w1, err1, u1, mask[:, i1 + g0:i1 + g0 + m], g0, n, m)
            w[:, i1:i2] = w1
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w * mask, mask


# ----------------------------------------------------------------------------- one entry


def prune(weight: Tensor, *, n: int = 2, m: int = 4, method: str = "auto", stats: InputStats | None = None,
          quantize_values: bool = False, group_size: int = 128, lowrank_rank: int = 0,
          dtype: torch.dtype = torch.float16, damp: float = 0.01) -> NMFormat:
    """Prune one (N, K) weight into an :class:`NMFormat` with values in ``dtype``.

    ``method``: ``"magnitude"``, ``"wanda"`` (needs ``stats``), ``"sparsegpt"`` (needs ``stats``)
    or ``"auto"`` (``"sparsegpt"`` with ``stats``, else ``"magnitude"``). ``quantize_values``
    stores the kept values as a 4-bit :class:`~lowrank_ops.quant.format.QuantFormat` (data-free
    HQQ, groups of ``group_size`` along KK). ``lowrank_rank`` > 0 adds a low-rank path (EoRA with
    ``stats``, plain SVD without) fitted to the remaining error ``W − Wₙₘ``, stored in ``dtype``.
    """
    n, m = check_nm(n, m)
    weight = _check_weight(weight, m)
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str in {list(METHODS)}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    stats = None if stats is None else check_input_stats(stats, weight.shape[1])
    if not isinstance(quantize_values, bool):
        raise TypeError(f"quantize_values: expected a bool, got {type(quantize_values).__name__}")
    group_size = check_choice("group_size", group_size, GROUP_SIZES)
    lowrank_rank = check_int("lowrank_rank", lowrank_rank, low=0, high=min(weight.shape))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(t) for t in FLOAT_DTYPES]}, got {dtype}")
    if method == "auto":
        method = "sparsegpt" if stats is not None else "magnitude"
    if method in ("wanda", "sparsegpt") and stats is None:
        raise ValueError(f"stats: method {method!r} needs calibration statistics (InputStats), got None")

    if method == "sparsegpt":
        pruned, mask = sparsegpt(weight, stats, n, m, damp=damp)
    else:
        mask = magnitude_mask(weight, n, m) if method == "magnitude" else wanda_mask(weight, stats, n, m)
        pruned = weight.float() * mask
    values, indices = pack_nm(pruned, mask, n, m)
    if quantize_values:
        fmt = NMFormat(None, indices, n, m, weight.shape[1], qvalues=quantize(values, bits=4, group_size=group_size, method="hqq"))
    else:
        fmt = NMFormat(values.to(dtype).contiguous(), indices, n, m, weight.shape[1])
    if lowrank_rank == 0:
        return fmt
    u, v = lowrank_compensation(weight, fmt.sparse_dense(torch.float32), stats, lowrank_rank)
    fmt.lr_u, fmt.lr_v = u.to(dtype), v.to(dtype)
    fmt.validate()
    return fmt
