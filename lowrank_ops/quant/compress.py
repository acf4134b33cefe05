"""Quantizers: dense weight ``W`` (N × K, ``nn.Linear`` layout) [+ calibration statistics] →
:class:`~lowrank_ops.quant.format.QuantFormat`.

* :func:`quantize_rtn` — round-to-nearest, per-group min/max asymmetric (data-free baseline).
* :func:`quantize_hqq` — HQQ-style data-free: the zero point of each group is refined by
  half-quadratic alternating updates of a sparsity-promoting lp (p < 1) error (scale fixed).
* :func:`quantize_gptq` — GPTQ error feedback with the inverse Hessian ``H = 2 XᵀX/n`` (upper
  Cholesky of ``H⁻¹``, lazy block updates), optional activation order, optional SpQR-style
  outliers (below).
* :func:`quantize_lut` — SqueezeLLM-style non-uniform codes: a per-row table of 2^b centroids
  from 1-D k-means weighted by the input sensitivity ``diag(XᵀX)``.
* :func:`lowrank_compensation` — EoRA: rank-r correction of the remaining error, optimal for the
  output error on the calibration inputs (eigenspace of ``XᵀX/n``).
* :func:`quantize` — the one entry point combining them.

Scales and zeros are rounded to fp16 *before* the codes are chosen, so the codes are optimal for
the numbers the kernels actually read. With ``quantize_stats`` (RTN and GPTQ) they are stored in
the SpQR-style second-level form instead (see :mod:`lowrank_ops.quant.format`): the range of each
group is widened to contain 0, its scale is rounded up on the shared 4-bit log grid of its block
of 16 rows, and the zero point is the integer ``round(−min / scale)``; again the codes are chosen
against exactly these decoded numbers (GPTQ fits them group column by group column, as it goes).

Outliers (SpQR idea, exact count). A weight's outlier *gain* is the drop of its group row's
quantization error, weighted by the output sensitivity ``1/d_j²`` of each column (``d_j`` the
diagonal of the upper Cholesky factor of ``H⁻¹`` in processing order, i.e. ``[H⁻¹]_jj`` of the
columns not yet quantized), when the weight is kept exactly and left out of its group's min/max.
Non-extreme weights gain their own weighted error; a row's max (min) also gains the shrinking of
the range to the second largest (smallest) value. The total count ``T = round(fraction·N·K)`` is
met exactly in two steps: (1) a pre-pass scores every weight of the original ``W`` and takes the
global top ``T``; its per-group counts become the *quotas*; (2) during the GPTQ pass, when a group
starts, the gains are recomputed on the current (error-updated) weights and the ``quota`` best of
that group become outliers: they are excluded from the group's min/max, keep their current value
exactly (stored as the fp16 residual ``w − Ŵ``) and feed back no error. With ``act_order``
(static groups) the pre-pass mask is used as is. RTN uses the pre-pass alone (sensitivity
``diag(XᵀX)`` with stats, 1 without).

All arithmetic runs in float32 (Hessian factorizations, eigen/SVD in float64) on the weight's
device.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from lowrank_ops.calibration import InputStats, check_input_stats
from lowrank_ops.core.obs import damped_hessian, few_threads, inverse_cholesky_upper
from lowrank_ops.core.checks import FLOAT_DTYPES, check_bool, check_choice, check_finite, check_int, check_positive_float, check_tensor
from lowrank_ops.quant.format import (
    BITS,
    GROUP_SIZES,
    MAX_OUTLIER_K,
    STAT_BITS,
    QuantFormat,
    outliers_to_csr,
    pack_codes,
    pack_group_stats,
    padded_k,
    stat_blocks,
    unpack_group_stats,
)

_WEIGHT_DTYPES = FLOAT_DTYPES + (torch.float64,)
_MIN_SCALE = 2.0**-14  # smallest normal fp16: a constant group still gets a usable scale
_FP16_MAX = 65504.0
MAX_OUTLIER_FRACTION = 0.05
METHODS = ("auto", "rtn", "hqq", "gptq", "lut")


# ----------------------------------------------------------------------------- checks


def _check_weight(weight: object) -> Tensor:
    check_tensor("weight", weight, ndim=2, dtypes=_WEIGHT_DTYPES)
    if weight.numel() == 0:
        raise ValueError(f"weight: expected a non-empty (N, K) tensor, got shape {tuple(weight.shape)}")
    check_finite("weight", weight)
    return weight


def _check_stats(stats: object, in_features: int, required: bool = True) -> InputStats | None:
    return None if stats is None and not required else check_input_stats(stats, in_features)


def _check_fraction(weight: Tensor, outliers: object) -> float:
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)):
        raise TypeError(f"outliers: expected a float in [0, {MAX_OUTLIER_FRACTION}], got {type(outliers).__name__}")
    outliers = float(outliers)
    if not (0.0 <= outliers <= MAX_OUTLIER_FRACTION):
        raise ValueError(f"outliers: expected a fraction in [0, {MAX_OUTLIER_FRACTION}], got {outliers}")
    if outliers > 0 and weight.shape[1] > MAX_OUTLIER_K:
        raise ValueError(f"weight: expected at most {MAX_OUTLIER_K} input features with outliers (16-bit columns), got {weight.shape[1]}")
    return outliers


# ----------------------------------------------------------------------------- shared pieces


def _uniform_params(wmin: Tensor, wmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16-representable (scale, zero) (as float32) of min/max asymmetric quantization."""
    maxq = (1 << bits) - 1
    scale = ((wmax - wmin) / maxq).clamp_min(_MIN_SCALE).half().float()
    zero = (-wmin / scale).clamp(-_FP16_MAX, _FP16_MAX).half().float()
    return scale, zero


def _second_level_params(wmin: Tensor, wmax: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scale, zero, stat_codes, stat_meta) of min/max quantization with second-level statistics
    for (N, G) ``wmin``/``wmax``: the range widened to contain 0, the scale rounded up on the
    block's log grid, the integer zero point fitted to that scale (so it lies in [0, 2^b − 1])."""
    maxq = (1 << bits) - 1
    low, high = wmin.clamp(max=0.0), wmax.clamp(min=0.0)
    wanted = ((high - low) / maxq).clamp_min(_MIN_SCALE)
    stat_codes, stat_meta = pack_group_stats(wanted, torch.zeros_like(wanted))
    scale = unpack_group_stats(stat_codes, stat_meta)[0]
    zero = torch.round(-low / scale).clamp_(0, maxq)
    return scale, zero, stat_codes | (zero.to(torch.uint8) << STAT_BITS), stat_meta


class _GroupStats:
    """Scale and zero of every (row, group), fitted from min/max one or more group columns at a
    time: fp16 numbers, or (``second_level``) the 4-bit second-level form. ``scale``/``zero``
    (float32, N × G) are always the decoded numbers the kernels will read."""

    def __init__(self, n: int, groups: int, bits: int, second_level: bool, device: torch.device) -> None:
        self.bits, self.second_level = bits, second_level
        self.scale = torch.zeros(n, groups, device=device)
        self.zero = torch.zeros(n, groups, device=device)
        self.stat_codes = torch.zeros(n, groups, dtype=torch.uint8, device=device) if second_level else None
        self.stat_meta = torch.zeros(2, stat_blocks(n), groups, dtype=torch.float16, device=device) if second_level else None

    def fit(self, wmin: Tensor, wmax: Tensor, cols: slice = slice(None)) -> None:
        """Fit group columns ``cols`` from their (N, len(cols)) min and max."""
        if self.second_level:
            scale, zero, codes, meta = _second_level_params(wmin, wmax, self.bits)
            self.stat_codes[:, cols], self.stat_meta[:, :, cols] = codes, meta
        else:
            scale, zero = _uniform_params(wmin, wmax, self.bits)
        self.scale[:, cols], self.zero[:, cols] = scale, zero

    def fields(self) -> dict[str, Tensor]:
        """The format's statistics tensors (``scales``/``zeros`` or ``stat_codes``/``stat_meta``)."""
        if self.second_level:
            return {"stat_codes": self.stat_codes, "stat_meta": self.stat_meta}
        return {"scales": self.scale.half(), "zeros": self.zero.half()}


def _codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.round(w / scale + zero).clamp_(0, (1 << bits) - 1)


def _grouped(w: Tensor, g: int, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """(N, K) → (N, G, g) padded with ``fill``, and the (G, g) validity mask."""
    n, k = w.shape
    k_pad = padded_k(k, g)
    padded = torch.full((n, k_pad), fill, dtype=w.dtype, device=w.device)
    padded[:, :k] = w
    valid = torch.arange(k_pad, device=w.device) < k
    return padded.reshape(n, -1, g), valid.reshape(-1, g)


def _masked_minmax(w: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max over the last dim of the ``keep`` entries (rows with none kept: over all)."""
    inf = torch.tensor(math.inf, dtype=w.dtype, device=w.device)
    wmin = torch.where(keep, w, inf).amin(-1)
    wmax = torch.where(keep, w, -inf).amax(-1)
    none = ~keep.any(-1)
    if bool(none.any()):
        wmin = torch.where(none, w.amin(-1), wmin)
        wmax = torch.where(none, w.amax(-1), wmax)
    return wmin, wmax


def _outlier_gain(w: Tensor, sens: Tensor, valid: Tensor, bits: int) -> Tensor:
    """SpQR-style gain of keeping each weight exactly and leaving it out of its group's min/max.

    ``w`` (N, G, g), ``sens`` (G, g) output sensitivity per column, ``valid`` (G, g). Returns
    (N, G, g) gains (−inf at padding): the drop of ``Σ_j sens_j (w_j − ŵ_j)²`` over the group row.
    """
    inf = math.inf
    hi = torch.where(valid, w, -inf)
    lo = torch.where(valid, w, inf)
    top, top_idx = hi.topk(min(2, w.shape[-1]), dim=-1)
    bot, bot_idx = (-lo).topk(min(2, w.shape[-1]), dim=-1)
    bot = -bot
    wmax, wmin = top[..., 0], bot[..., 0]
    max2 = top[..., -1].where(torch.isfinite(top[..., -1]), wmax)
    min2 = bot[..., -1].where(torch.isfinite(bot[..., -1]), wmin)

    def weighted_err(mn: Tensor, mx: Tensor) -> Tensor:
        scale, zero = _uniform_params(mn, mx, bits)
        scale, zero = scale[..., None], zero[..., None]
        deq = (_codes(w, scale, zero, bits) - zero) * scale
        return (w - deq).square() * sens * valid  # (N, G, g)

    own = weighted_err(wmin, wmax)
    base = own.sum(-1)
    gain = own.clone()
    e_max = weighted_err(wmin, max2)  # the row's max left out
    g_max = base - (e_max.sum(-1) - e_max.gather(-1, top_idx[..., :1]).squeeze(-1))
    e_min = weighted_err(min2, wmax)
    g_min = base - (e_min.sum(-1) - e_min.gather(-1, bot_idx[..., :1]).squeeze(-1))
    gain.scatter_(-1, top_idx[..., :1], g_max[..., None])
    gain.scatter_(-1, bot_idx[..., :1], torch.maximum(g_min, gain.gather(-1, bot_idx[..., :1]).squeeze(-1))[..., None])
    return gain.masked_fill(~valid, -inf)


def _top_mask(score: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` largest entries (deterministic on ties: lowest index first)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[score.flatten().topk(count, sorted=False).indices] = True
    return mask.reshape(score.shape)


def _outlier_count(fraction: float, n: int, k: int) -> int:
    return int(round(fraction * n * k))


def _build(
    codes: Tensor,
    bits: int,
    group_size: int,
    *,
    stats: dict[str, Tensor] | None = None,
    lut: Tensor | None = None,
    outlier_mask: Tensor | None = None,
    kept: Tensor | None = None,
    lr: tuple[Tensor, Tensor] | None = None,
) -> QuantFormat:
    """Assemble a format from (N, K) codes (padding and packing here) and the group ``stats``
    tensors by field name (:meth:`_GroupStats.fields`); outliers store ``kept − Ŵ`` at
    ``outlier_mask``."""
    n, k = codes.shape
    k_pad = padded_k(k, group_size)
    q = torch.zeros(n, k_pad, dtype=torch.uint8, device=codes.device)
    q[:, :k] = codes.to(torch.uint8)
    qweight, qweight_hi = pack_codes(q, bits)
    fields = dict(
        qweight=qweight, qweight_hi=qweight_hi, scales=None, zeros=None,
        lut=None if lut is None else lut.half().contiguous(),
        outlier_rowptr=None, outlier_cols=None, outlier_vals=None,
        lr_u=None if lr is None else lr[0].contiguous(),
        lr_v=None if lr is None else lr[1].contiguous(),
        bits=bits, group_size=group_size, in_features=k, out_features=n,
    )
    fields.update({name: t.contiguous() for name, t in (stats or {}).items()})
    fmt = QuantFormat(**fields)
    if outlier_mask is not None:
        residual = kept.float() - fmt.dequantized(torch.float32)
        rowptr, cols, vals = outliers_to_csr(outlier_mask, residual)
        fmt = QuantFormat(**{**fields, "outlier_rowptr": rowptr, "outlier_cols": cols, "outlier_vals": vals})
    return fmt


def _second_moment(stats: InputStats, device: torch.device) -> Tensor:
    c = stats.second_moment().to(device=device, dtype=torch.float64)
    if not float(c.diagonal().max()) > 0:
        raise ValueError("stats: expected calibration inputs with some non-zero channel, got all-zero inputs")
    return c


# ----------------------------------------------------------------------------- RTN / HQQ


def _rtn_params(w: Tensor, bits: int, g: int, keep: Tensor | None = None, second_level: bool = False) -> _GroupStats:
    """Per-group (N, G) scale/zero from min/max of the valid (and kept) entries."""
    wg, valid = _grouped(w, g)
    mask = valid.expand_as(wg) if keep is None else valid & _grouped(keep, g, False)[0]
    wmin, wmax = _masked_minmax(wg, mask)
    params = _GroupStats(w.shape[0], wg.shape[1], bits, second_level, w.device)
    params.fit(wmin, wmax)
    return params


def _group_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int, g: int) -> Tensor:
    cols = torch.arange(w.shape[1], device=w.device) // g
    return _codes(w, scale[:, cols], zero[:, cols], bits)


def _rtn_outliers(w: Tensor, bits: int, g: int, fraction: float, sens: Tensor | None) -> Tensor:
    wg, valid = _grouped(w, g)
    s = torch.ones(w.shape[1], device=w.device) if sens is None else sens.float()
    sg = _grouped(s[None], g)[0][0]
    gain = _outlier_gain(wg, sg, valid, bits).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return _top_mask(gain, _outlier_count(fraction, *w.shape))


def quantize_rtn(weight: Tensor, bits: int = 4, group_size: int = 128, *, outliers: float = 0.0,
                 stats: InputStats | None = None, quantize_stats: bool = False) -> QuantFormat:
    """Round-to-nearest: per group ``scale = (max − min)/(2^b − 1)``, ``zero = −min/scale`` (fp16,
    or the second-level form with ``quantize_stats``), ``q = clamp(round(w/scale + zero))``. With
    ``outliers > 0`` the pre-pass gain (see module docstring; sensitivity ``diag(XᵀX)`` when
    ``stats`` is given) picks the outliers, which are left out of the min/max."""
    weight = _check_weight(weight)
    bits = check_choice("bits", bits, BITS)
    g = check_choice("group_size", group_size, GROUP_SIZES)
    fraction = _check_fraction(weight, outliers)
    stats = _check_stats(stats, weight.shape[1], required=False)
    quantize_stats = check_bool("quantize_stats", quantize_stats)
    w = weight.float()
    mask = None
    if fraction > 0:
        sens = None if stats is None else _second_moment(stats, w.device).diagonal()
        mask = _rtn_outliers(w, bits, g, fraction, sens)
    params = _rtn_params(w, bits, g, None if mask is None else ~mask, quantize_stats)
    codes = _group_codes(w, params.scale, params.zero, bits, g)
    return _build(codes, bits, g, stats=params.fields(), outlier_mask=mask, kept=w)


def _shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalised soft-thresholding: the proximal step of ``|x|^p`` (p < 1) at weight ``beta``."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)


def quantize_hqq(weight: Tensor, bits: int = 4, group_size: int = 128, iters: int = 20, *,
                 p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> QuantFormat:
    """HQQ-style data-free quantization (Badri & Shaji 2023): scales from min/max, then the zero
    point of each group alternates ``W_e ← shrink_lp(W − Ŵ)``, ``z ← mean(q − (W − W_e)/s)`` with
    ``β`` growing by ``κ`` per step; each group keeps its zero of smallest mean |W − Ŵ|."""
    weight = _check_weight(weight)
    bits = check_choice("bits", bits, BITS)
    g = check_choice("group_size", group_size, GROUP_SIZES)
    iters = check_int("iters", iters, low=0)
    w = weight.float()
    n, k = w.shape
    params = _rtn_params(w, bits, g)
    scale = params.scale
    wg, valid = _grouped(w, g)
    s, z = scale[..., None], params.zero[..., None]
    count = valid.sum(-1).clamp_min(1)

    def l1(zv: Tensor) -> Tensor:
        return (((wg - (_codes(wg, s, zv, bits) - zv) * s).abs() * valid).sum(-1) / count)

    best_z, best_err = z.clone(), l1(z)
    for _ in range(iters):
        q = _codes(wg, s, z, bits)
        err = wg - (q - z) * s
        we = _shrink_lp(err, beta, p)
        z = (((q - (wg - we) / s) * valid).sum(-1) / count)[..., None]
        beta *= kappa
        zr = z.clamp(-_FP16_MAX, _FP16_MAX).half().float()
        e = l1(zr)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_z = torch.where(better[..., None], zr, best_z)
    zero = best_z[..., 0]
    codes = _group_codes(w, scale, zero, bits, g)
    return _build(codes, bits, g, stats={"scales": scale.half(), "zeros": zero.half()})


# ----------------------------------------------------------------------------- GPTQ


def quantize_gptq(weight: Tensor, stats: InputStats, bits: int = 4, group_size: int = 128,
                  outlier_fraction: float = 0.0, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, quantize_stats: bool = False) -> QuantFormat:
    """GPTQ (Frantar et al. 2022) with group-wise asymmetric scales, optional activation order
    (static groups: all scales/zeros from the original weight), SpQR-style outliers and
    second-level statistics (module docstring). Minimises the calibration output error
    ``‖(W − Ŵ) Xᵀ‖``."""
    weight = _check_weight(weight)
    stats = _check_stats(stats, weight.shape[1])
    bits = check_choice("bits", bits, BITS)
    g = check_choice("group_size", group_size, GROUP_SIZES)
    fraction = _check_fraction(weight, outlier_fraction)
    act_order = check_bool("act_order", act_order)
    quantize_stats = check_bool("quantize_stats", quantize_stats)
    damp = check_positive_float("damp", damp)
    block_size = check_int("block_size", block_size, low=1)
    block = max(g, block_size // g * g)  # whole groups per block: a group never straddles blocks

    w = weight.float().clone()
    n, k = w.shape
    h = damped_hessian(stats, w, damp)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    upper = inverse_cholesky_upper(h[perm][:, perm]).float()
    d = upper.diagonal()
    sens_orig = torch.empty(k, device=w.device)
    sens_orig[perm] = d.square().reciprocal()  # output sensitivity 1/[H⁻¹]_jj per original column
    total = _outlier_count(fraction, n, k)

    pre_mask = None
    if total:
        wg, valid = _grouped(w, g)
        gain = _outlier_gain(wg, _grouped(sens_orig[None], g)[0][0], valid, bits)
        pre_mask = _top_mask(gain.reshape(n, -1)[:, :k], total)
    if act_order:  # static groups from the original weight (outliers left out)
        params = _rtn_params(w, bits, g, None if pre_mask is None else ~pre_mask, quantize_stats)
        quota = None
    else:
        params = _GroupStats(n, padded_k(k, g) // g, bits, quantize_stats, w.device)
        quota = None if pre_mask is None else _grouped(pre_mask, g, False)[0].sum((0, 2)).tolist()
    out_mask = torch.zeros(n, k, dtype=torch.bool, device=w.device) if total else None
    kept = torch.zeros(n, k, device=w.device) if total else None

    wp = w[:, perm]
    codes = torch.zeros(n, k, device=w.device)
    with few_threads(w.device, n * block):
        _gptq_pass(wp, upper, perm, codes, params, g, bits, block, act_order, quota, pre_mask, out_mask, kept)
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return _build(out, bits, g, stats=params.fields(), outlier_mask=out_mask, kept=kept)


def _gptq_pass(wp: Tensor, upper: Tensor, perm: Tensor, codes: Tensor, params: _GroupStats,
               g: int, bits: int, block: int, act_order: bool, quota: list | None,
               pre_mask: Tensor | None, out_mask: Tensor | None, kept: Tensor | None) -> None:
    """The column loop of :func:`quantize_gptq` (fills ``codes``, ``params`` for dynamic groups,
    ``out_mask``/``kept`` for outliers, in place)."""
    k = wp.shape[1]
    maxq = (1 << bits) - 1
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i]) if act_order else i1 + i
            grp = col // g
            if not act_order and col % g == 0:  # a group starts: its statistics from current weights
                wgrp = w1[:, i:i + g]
                keep = None
                if quota is not None and quota[grp]:
                    sens = u1.diagonal()[i:i + g].square().reciprocal()
                    gain = _outlier_gain(wgrp[:, None], sens[None], torch.ones_like(sens[None], dtype=torch.bool), bits)[:, 0]
                    chosen = _top_mask(gain, int(quota[grp]))
                    out_mask[:, col:col + wgrp.shape[1]] = chosen
                    keep = ~chosen
                wmin, wmax = _masked_minmax(wgrp, torch.ones_like(wgrp, dtype=torch.bool) if keep is None else keep)
                params.fit(wmin[:, None], wmax[:, None], slice(grp, grp + 1))
            wc = w1[:, i]
            s, z = params.scale[:, grp], params.zero[:, grp]
            q = torch.round(wc / s + z).clamp_(0, maxq)
            deq = (q - z) * s
            codes[:, i1 + i] = q
            if out_mask is not None:
                om = out_mask[:, col] if not act_order else pre_mask[:, col]
                if act_order:
                    out_mask[:, col] = om
                kept[:, col] = wc
                deq = torch.where(om, wc, deq)
            e = (wc - deq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        wp[:, i2:] -= err1 @ upper[i1:i2, i2:]


# ----------------------------------------------------------------------------- LUT (k-means)


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest of the ascending centroids ``c`` (R, C) for each ``x`` (R, K)."""
    mid = (c[:, 1:] + c[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous())


def _weighted_kmeans_rows(w: Tensor, weights: Tensor, clusters: int, iters: int, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per-row 1-D weighted k-means. ``w`` (N, K), ``weights`` (N, K) ≥ 0. Deterministic
    quantile initialisation. Returns centroids (N, C) ascending and codes (N, K)."""
    n, k = w.shape
    levels = (torch.arange(clusters, device=w.device, dtype=w.dtype) + 0.5) / clusters
    cents, codes = [], []
    for r0 in range(0, n, chunk):
        x, a = w[r0:r0 + chunk], weights[r0:r0 + chunk]
        c = torch.quantile(x, levels, dim=1).T.contiguous()  # (R, C)
        for _ in range(iters):
            idx = _nearest(x, c)
            num = torch.zeros_like(c).scatter_add_(1, idx, a * x)
            den = torch.zeros_like(c).scatter_add_(1, idx, a)
            new = torch.where(den > 0, num / den.clamp_min(1e-30), c).sort(dim=1).values
            if torch.equal(new, c):
                break
            c = new
        c = c.half().float()  # fp16 table: codes chosen for the stored values
        cents.append(c)
        codes.append(_nearest(x, c))
    return torch.cat(cents), torch.cat(codes)


def quantize_lut(weight: Tensor, bits: int = 4, stats: InputStats | None = None, iters: int = 30, *,
                 group_size: int = 128, outliers: float = 0.0) -> QuantFormat:
    """SqueezeLLM-style: per output row a table of 2^b fp16 centroids from 1-D k-means weighted by
    ``diag(XᵀX/n)`` (sensitivity; uniform without ``stats``). With ``outliers > 0`` the largest
    ``|w|·sqrt(diag)`` are kept exactly and left out of the clustering. ``group_size`` only sets
    the padding ``K_pad`` the kernels expect."""
    weight = _check_weight(weight)
    bits = check_choice("bits", bits, BITS)
    g = check_choice("group_size", group_size, GROUP_SIZES)
    stats = _check_stats(stats, weight.shape[1], required=False)
    iters = check_int("iters", iters, low=0)
    fraction = _check_fraction(weight, outliers)
    w = weight.float()
    n, k = w.shape
    sens = torch.ones(k, device=w.device) if stats is None else _second_moment(stats, w.device).diagonal().float()
    sens = sens.clamp_min(1e-12 * float(sens.max()))
    weights = sens[None].expand(n, k).clone()
    mask = None
    if fraction > 0:
        mask = _top_mask(w.abs() * sens.sqrt(), _outlier_count(fraction, n, k))
        weights[mask] = 0.0
    lut, codes = _weighted_kmeans_rows(w, weights, 1 << bits, iters)
    return _build(codes, bits, g, lut=lut, outlier_mask=mask, kept=w)


# ----------------------------------------------------------------------------- low-rank (EoRA)


def lowrank_compensation(weight: Tensor, approx: Tensor, stats: InputStats | None, rank: int,
                         *, eig_floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """EoRA: rank-``rank`` ``U`` (N, r), ``V`` (r, K) (float32) with ``U V ≈ E = W − approx``
    minimising ``‖(E − UV) Xᵀ‖`` on the calibration inputs: with ``XᵀX/n = Q Λ Qᵀ``, truncated
    SVD of ``E Q Λ^{1/2}``, mapped back by ``Λ^{-1/2} Qᵀ`` (eigenvalues floored at
    ``eig_floor·max λ``). Without ``stats``: truncated SVD of ``E``. Singular values are split
    as ``√σ`` into both factors."""
    weight = _check_weight(weight)
    check_tensor("approx", approx, ndim=2, dtypes=_WEIGHT_DTYPES)
    if approx.shape != weight.shape:
        raise ValueError(f"approx: expected shape {tuple(weight.shape)} (that of weight), got {tuple(approx.shape)}")
    stats = _check_stats(stats, weight.shape[1], required=False)
    rank = check_int("rank", rank, low=1, high=min(weight.shape))
    e = weight.double() - approx.to(weight.device).double()
    if stats is None:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        root = s[:rank].sqrt()
        return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
    lam, q = torch.linalg.eigh(_second_moment(stats, weight.device))
    lam = lam.clamp_min(eig_floor * float(lam.max()))
    u, s, vh = torch.linalg.svd((e @ q) * lam.sqrt(), full_matrices=False)
    root = s[:rank].sqrt()
    v = ((root[:, None] * vh[:rank]) / lam.sqrt()) @ q.T
    return (u[:, :rank] * root).float(), v.float()


# ----------------------------------------------------------------------------- one entry


def quantize(weight: Tensor, *, bits: int = 4, group_size: int = 128, outliers: float = 0.0,
             method: str = "auto", lowrank_rank: int = 0, stats: InputStats | None = None,
             act_order: bool = False, quantize_stats: bool = False, dtype: torch.dtype = torch.float16) -> QuantFormat:
    """Quantize one (N, K) weight into a :class:`QuantFormat`.

    ``method``: ``"gptq"`` (needs ``stats``), ``"rtn"``, ``"hqq"``, ``"lut"`` or ``"auto"``
    (``"gptq"`` with ``stats``, else ``"hqq"``; with outliers or ``quantize_stats`` and no stats
    ``"rtn"``, since HQQ has neither an outlier path nor integer zero points). ``outliers`` ∈
    [0, 0.05] is the exact fraction of weights kept sparse. ``quantize_stats`` stores the group
    scales/zeros in the 4-bit second-level form (RTN and GPTQ). ``lowrank_rank`` > 0 adds an EoRA
    path (plain SVD without ``stats``) fitted to the remaining error ``W − (Ŵ + S)``, stored in
    ``dtype``.
    """
    weight = _check_weight(weight)
    bits = check_choice("bits", bits, BITS)
    group_size = check_choice("group_size", group_size, GROUP_SIZES)
    fraction = _check_fraction(weight, outliers)
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str in {list(METHODS)}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    stats = _check_stats(stats, weight.shape[1], required=False)
    lowrank_rank = check_int("lowrank_rank", lowrank_rank, low=0, high=min(weight.shape))
    act_order = check_bool("act_order", act_order)
    quantize_stats = check_bool("quantize_stats", quantize_stats)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {[str(t) for t in FLOAT_DTYPES]}, got {dtype}")
    if method == "auto":
        method = "gptq" if stats is not None else ("rtn" if fraction > 0 or quantize_stats else "hqq")
    if method == "gptq" and stats is None:
        raise ValueError("stats: method 'gptq' needs calibration statistics (InputStats), got None")
    if method == "hqq" and fraction > 0:
        raise ValueError(f"outliers: method 'hqq' has no outlier path; expected 0, got {fraction} (use 'rtn', 'gptq' or 'lut')")
    if act_order and method != "gptq":
        raise ValueError(f"act_order: only meaningful for method 'gptq', got method {method!r}")
    if quantize_stats and method not in ("gptq", "rtn"):
        raise ValueError(f"quantize_stats: second-level statistics are fitted by 'gptq' and 'rtn', got method {method!r}")

    if method == "gptq":
        fmt = quantize_gptq(weight, stats, bits, group_size, outlier_fraction=fraction, act_order=act_order,
                            quantize_stats=quantize_stats)
    elif method == "rtn":
        fmt = quantize_rtn(weight, bits, group_size, outliers=fraction, stats=stats, quantize_stats=quantize_stats)
    elif method == "hqq":
        fmt = quantize_hqq(weight, bits, group_size)
    else:
        fmt = quantize_lut(weight, bits, stats, group_size=group_size, outliers=fraction)
    if lowrank_rank == 0:
        return fmt
    u, v = lowrank_compensation(weight, fmt.dense(torch.float32), stats, lowrank_rank)
    return dataclasses.replace(fmt, lr_u=u.to(dtype), lr_v=v.to(dtype))
