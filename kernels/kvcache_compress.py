"""Triton kernel for GEAR KV-cache compression: outlier extraction + quantization + packing, fused.

One launch quantizes whole blocks of keys and values (b, h, T, D), T a multiple of the group
size G, into the layout of ``lowrank_ops/kvcache/format.py``:

* per vector (key or value token), the n entries farthest from the vector's mean are outliers
  (farthest first, first index on ties; the mean summed in float64), or with GEAR's rule the
  ceil(n/2) largest then floor(n/2) smallest; they are left out of the min/max of their groups;
* keys: per channel over each group of G tokens; values: per token over groups of G channels;
  ``scale = fp16(max((mx − mn)/maxq, max(|mn|, |mx|)·2⁻¹⁰, 2⁻¹⁴))``, ``zero = fp16(−mn/scale)``,
  ``code = clamp(floor(x/scale + zero + ½), 0, maxq)`` (IEEE divisions, ``div_rn``) — the formulas of
  :func:`lowrank_ops.kvcache.compress.quantize_reference`, the oracle of this kernel; with
  ``CLIP`` (``GEARConfig.clip_search``) mn and mx first become the trim of either end of the span
  by CLIP_STEPS with the least squared error of the kept entries (``_clipped_range``: the tile
  quantized once per candidate range, 9 in all, in registers, the errors summed per group in
  float64);
* codes packed along D into int32 words (code d at bit (d % E)·bits of word d // E);
* outliers store their channel (uint8) and ``x − deq`` (fp16);
* the residual ``x − deq − outliers`` is written in fp32 for the low-rank step.

The low-rank approximation of the residual is :func:`lowrank_ops.kvcache.compress.lowrank_factors`:
its subspace iteration runs in :mod:`kernels.kvcache_lowrank` (one program per block), the
factors' products and rounding in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile_check import CompileCase
from ._launch import launch
from .lowrank import _empty, next_pow2

# The scale floors of lowrank_ops.kvcache.compress (REL_SCALE_FLOOR, ABS_SCALE_FLOOR; a test
# checks they agree), as constexprs so that kernels may read them.
REL_SCALE_FLOOR = tl.constexpr(2.0**-10)
ABS_SCALE_FLOOR = tl.constexpr(2.0**-14)
CLIP_STEPS = tl.constexpr((0.0, 1.0 / 16, 1.0 / 8))  # lowrank_ops.kvcache.compress.CLIP_STEPS (a test checks)
N_CLIP_STEPS = tl.constexpr(len(CLIP_STEPS.value))


@triton.jit
def _quant_params(mn, mx, MAXQ: tl.constexpr):
    """(scale, zero) as fp32 holding fp16 values, from group min/max (mx < mn: empty group)."""
    empty = mx < mn
    mn = tl.where(empty, 0.0, mn)
    mx = tl.where(empty, 0.0, mx)
    spread = (mx - mn) * (1.0 / MAXQ)
    floor = tl.maximum(tl.abs(mn), tl.abs(mx)) * REL_SCALE_FLOOR
    scale = tl.maximum(tl.maximum(spread, floor), ABS_SCALE_FLOOR).to(tl.float16).to(tl.float32)
    zero = tl.math.div_rn(-mn, scale).to(tl.float16).to(tl.float32)  # IEEE division, as torch
    return scale, zero


@triton.jit
def _quantized(x, s, z, MAXQ: tl.constexpr):
    """(codes as fp32, x − deq): ``clamp(floor(x/s + z + ½), 0, MAXQ)`` with an IEEE division."""
    q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x, s) + z + 0.5), 0.0), MAXQ)
    return q, x - (q - z) * s


@triton.jit
def _spread(stat, IS_KEY: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr):
    """Group statistics over the tile: keys' (D_PAD) per channel as a row, values' (GROUP, NG)
    per token and channel group repeated over each group's GROUP channels."""
    if IS_KEY:
        return stat[None, :]
    else:
        NG: tl.constexpr = D_PAD // GROUP
        return tl.reshape(tl.broadcast_to(stat[:, :, None], (GROUP, NG, GROUP)), (GROUP, D_PAD))


@triton.jit
def _group_sum(t, IS_KEY: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr):
    """The inverse of :func:`_spread`: a (GROUP × D_PAD) tile summed over each quantization group."""
    if IS_KEY:
        return tl.sum(t, axis=0)
    else:
        return tl.sum(tl.reshape(t, (GROUP, D_PAD // GROUP, GROUP)), axis=2)


@triton.jit
def _clipped_range(x, keep, mn, mx, IS_KEY: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr,
                   MAXQ: tl.constexpr):
    """``compress.clipped_range``: per group, among [mn + a·span, mx − b·span] for a, b in
    CLIP_STEPS (powers of two: exact products), the range whose codes give the kept entries the
    least squared error (fp32 errors, float64 sums; ties keep the earlier; empty groups keep
    mn > mx)."""
    empty = mx < mn
    lo0 = tl.where(empty, 0.0, mn)
    hi0 = tl.where(empty, 0.0, mx)
    span = hi0 - lo0
    best_lo = mn
    best_hi = mx
    best = tl.zeros(mn.shape, tl.float64)
    for a in tl.static_range(N_CLIP_STEPS):
        for b in tl.static_range(N_CLIP_STEPS):
            lo = tl.where(empty, mn, lo0 + CLIP_STEPS[a] * span)
            hi = tl.where(empty, mx, hi0 - CLIP_STEPS[b] * span)
            scale, zero = _quant_params(lo, hi, MAXQ)
            s = _spread(scale, IS_KEY, GROUP, D_PAD)
            z = _spread(zero, IS_KEY, GROUP, D_PAD)
            err = tl.where(keep, _quantized(x, s, z, MAXQ)[1], 0.0).to(tl.float64)
            sse = _group_sum(err * err, IS_KEY, GROUP, D_PAD)
            if a + b == 0:
                best = sse
            else:
                better = sse < best
                best_lo = tl.where(better, lo, best_lo)
                best_hi = tl.where(better, hi, best_hi)
                best = tl.minimum(sse, best)
    return best_lo, best_hi


@triton.jit
def _first_extreme(work, cols, D_PAD: tl.constexpr, LARGEST: tl.constexpr):
    """Per row, the first column holding the row's max (``LARGEST``) or min: two plain reductions,
    which compile to far less code than ``tl.argmax``'s (value, index) tuple reduction."""
    best = tl.max(work, axis=1) if LARGEST else tl.min(work, axis=1)
    return tl.min(tl.where(work == best[:, None], cols, D_PAD), axis=1)


@triton.jit
def _quantize_tile(
    x, rows, offs_d, D,
    codes_ptr, scale_ptr, zero_ptr, idx_ptr, val_ptr, res_ptr, scale_row,
    IS_KEY: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr,
    N_HI: tl.constexpr, N_LO: tl.constexpr, FARTHEST: tl.constexpr, CLIP: tl.constexpr,
):
    """Quantize one (GROUP tokens × D_PAD channels) fp32 tile ``x`` (columns ≥ D are padding) and
    store every output of its rows ``rows`` (global token rows of the (b·h·T) flattening).

    ``slot`` marks outliers (0..N_HI+N_LO−1, −1 elsewhere), found in registers by N_HI row-wise
    max passes (FARTHEST: over the tile's distances from their row's mean, summed in float64;
    N_LO = 0) and N_LO min passes; their channel and fp16 error are scattered to
    (token, slot) by one masked store each (no per-outlier reduction). Keys reduce the kept entries over the tile's
    rows (axis 0, one group of GROUP tokens per channel; ``scale_row`` is the group's row in
    key_scale); values reduce over a (GROUP, D_PAD/GROUP, GROUP) view (per token, per channel
    group). Codes are packed by a (GROUP, D_PAD/E, E) view shifted and summed (disjoint bits).
    """
    MAXQ: tl.constexpr = (1 << BITS) - 1
    PER_WORD: tl.constexpr = 32 // BITS
    N_OUT: tl.constexpr = N_HI + N_LO
    d_mask = offs_d < D
    cols = offs_d[None, :]
    slot = tl.full(x.shape, -1, tl.int32)
    if FARTHEST:  # N_HI = N_OUT passes over the distances from the row's mean
        mean = (tl.sum(x.to(tl.float64), axis=1) / D).to(tl.float32)  # padding is 0: the mean of the D channels
        work = tl.where(d_mask[None, :], tl.abs(x - mean[:, None]), -float("inf"))
    else:  # GEAR's extremes: N_HI max passes over the entries, then N_LO min passes
        work = tl.where(d_mask[None, :], x, -float("inf"))
    for i in tl.static_range(N_HI):
        hit = cols == _first_extreme(work, cols, D_PAD, True)[:, None]
        slot = tl.where(hit, i, slot)
        work = tl.where(hit, -float("inf"), work)
    work = tl.where(d_mask[None, :] & (slot < 0), x, float("inf"))
    for i in tl.static_range(N_LO):
        hit = cols == _first_extreme(work, cols, D_PAD, False)[:, None]
        slot = tl.where(hit, N_HI + i, slot)
        work = tl.where(hit, float("inf"), work)
    keep = (slot < 0) & d_mask[None, :]
    out_at = rows[:, None] * N_OUT + slot  # each outlier's (token, slot) entry; scattered below
    tl.store(idx_ptr + out_at, tl.broadcast_to(cols, x.shape).to(tl.uint8), mask=slot >= 0)

    if IS_KEY:
        mn = tl.min(tl.where(keep, x, float("inf")), axis=0)
        mx = tl.max(tl.where(keep, x, -float("inf")), axis=0)
    else:
        NG: tl.constexpr = D_PAD // GROUP
        mn = tl.min(tl.reshape(tl.where(keep, x, float("inf")), (GROUP, NG, GROUP)), axis=2)
        mx = tl.max(tl.reshape(tl.where(keep, x, -float("inf")), (GROUP, NG, GROUP)), axis=2)
    if CLIP:
        mn, mx = _clipped_range(x, keep, mn, mx, IS_KEY, GROUP, D_PAD, MAXQ)
    scale, zero = _quant_params(mn, mx, MAXQ)  # keys: (D_PAD); values: (GROUP, NG)
    if IS_KEY:
        tl.store(scale_ptr + scale_row * D + offs_d, scale.to(tl.float16), mask=d_mask)
        tl.store(zero_ptr + scale_row * D + offs_d, zero.to(tl.float16), mask=d_mask)
    else:
        offs_g = tl.arange(0, D_PAD // GROUP)
        g_mask = offs_g[None, :] < D // GROUP
        sidx = rows[:, None] * (D // GROUP) + offs_g[None, :]
        tl.store(scale_ptr + sidx, scale.to(tl.float16), mask=g_mask)
        tl.store(zero_ptr + sidx, zero.to(tl.float16), mask=g_mask)
    s = _spread(scale, IS_KEY, GROUP, D_PAD)
    z = _spread(zero, IS_KEY, GROUP, D_PAD)

    q, err = _quantized(x, s, z, MAXQ)
    err16 = err.to(tl.float16)
    res = tl.where(keep, err, err - err16.to(tl.float32))
    tl.store(res_ptr + rows[:, None] * D + cols, res, mask=d_mask[None, :])

    W_PAD: tl.constexpr = D_PAD // PER_WORD
    shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
    qw = tl.reshape(q.to(tl.uint32), (GROUP, W_PAD, PER_WORD)) << shifts[None, None, :]
    words = tl.sum(qw, axis=2).to(tl.int32, bitcast=True)
    offs_w = tl.arange(0, W_PAD)
    tl.store(codes_ptr + rows[:, None] * (D // PER_WORD) + offs_w[None, :], words,
             mask=offs_w[None, :] < D // PER_WORD)

    tl.store(val_ptr + out_at, err16, mask=slot >= 0)  # the fp16 error at each outlier


# Grid (b·h, T / GROUP). Program (bh, gi) owns token rows [gi·GROUP, +GROUP) of sequence-head
# bh: it loads the (GROUP × D) key tile and the (GROUP × D) value tile (rows D apart in the
# contiguous (b, h, T, D) inputs, D padded to the power of two D_PAD and masked) once each and
# writes all their outputs: a key group is exactly GROUP tokens, so the program owns whole key
# groups and whole value vectors and needs no cross-program reduction.
@triton.jit
def _gear_quantize_kernel(
    k_ptr, v_ptr,
    kcodes_ptr, kscale_ptr, kzero_ptr, kidx_ptr, kval_ptr, kres_ptr,
    vcodes_ptr, vscale_ptr, vzero_ptr, vidx_ptr, vval_ptr, vres_ptr,
    T, D,
    BITS: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr, N_HI: tl.constexpr, N_LO: tl.constexpr,
    FARTHEST: tl.constexpr, CLIP: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1)
    rows = bh * T + gi * GROUP + tl.arange(0, GROUP)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_d < D)[None, :]
    ptrs = rows[:, None] * D + offs_d[None, :]
    scale_row = bh * (T // GROUP) + gi
    x = tl.load(k_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    _quantize_tile(x, rows, offs_d, D, kcodes_ptr, kscale_ptr, kzero_ptr, kidx_ptr, kval_ptr, kres_ptr, scale_row,
                   True, BITS, GROUP, D_PAD, N_HI, N_LO, FARTHEST, CLIP)
    x = tl.load(v_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    _quantize_tile(x, rows, offs_d, D, vcodes_ptr, vscale_ptr, vzero_ptr, vidx_ptr, vval_ptr, vres_ptr, scale_row,
                   False, BITS, GROUP, D_PAD, N_HI, N_LO, FARTHEST, CLIP)


def _outlier_passes(n_out: int, rule: str) -> dict[str, object]:
    """The kernel's outlier constexprs: "farthest", n_out max passes over the distances from the
    mean; "extremes", ceil(n/2) max and floor(n/2) min passes over the entries."""
    farthest = rule == "farthest"
    return dict(N_HI=n_out if farthest else (n_out + 1) // 2, N_LO=0 if farthest else n_out // 2, FARTHEST=farthest)


def _num_warps(d_pad: int, group: int, clip: bool) -> int:
    """4 warps for tiles up to 4096 elements (e.g. 32 × 128), 8 above; twice that with the clip
    search, whose candidate tiles (float64 errors among them) spilled 1.3–2 KB per thread at 4
    warps (sm_80/sm_90 SASS of the compile cases, 4 candidates); at 8 it spills 0.28–0.34 KB with
    its 9, about the min-max kernel's 0.23 KB at 4 (a block is compressed once: its outlier passes
    are unrolled)."""
    return (4 if d_pad * group <= 4096 else 8) * (2 if clip else 1)


def _outputs(b: int, h: int, t: int, d: int, bits: int, group: int, n_out: int, per_token_groups: bool,
             device: torch.device) -> dict[str, Tensor]:
    scale_shape = (b, h, t, d // group) if per_token_groups else (b, h, t // group, d)
    return dict(
        codes=_empty((b, h, t, d * bits // 32), torch.int32, device),
        scale=_empty(scale_shape, torch.float16, device),
        zero=_empty(scale_shape, torch.float16, device),
        out_idx=_empty((b, h, t, n_out), torch.uint8, device),
        out_val=_empty((b, h, t, n_out), torch.float16, device),
        residual=_empty((b, h, t, d), torch.float32, device),
    )


def gear_quantize(keys: Tensor, values: Tensor, bits: int, group_size: int, n_out: int,
                  clip_search: bool = False, outlier_rule: str = "farthest") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Quantize contiguous (b, h, T, D) keys and values (T a multiple of ``group_size``; D a
    multiple of 16 that ``group_size`` divides, ≤ 256) with ``n_out`` outliers per vector chosen
    by ``outlier_rule`` ("farthest" from the mean, or GEAR's "extremes"), each group's range
    narrowed by the least-squares search over CLIP_STEPS when ``clip_search``.

    Returns one dict per kind with ``codes``, ``scale``, ``zero``, ``out_idx``, ``out_val`` and
    ``residual``, as :func:`lowrank_ops.kvcache.compress.quantize_reference` does.
    """
    b, h, t, d = keys.shape
    out_k = _outputs(b, h, t, d, bits, group_size, n_out, False, keys.device)
    out_v = _outputs(b, h, t, d, bits, group_size, n_out, True, keys.device)
    if keys.numel() == 0:
        return out_k, out_v
    launch(_gear_quantize_kernel, (b * h, t // group_size),
        keys, values, *out_k.values(), *out_v.values(), t, d,
        BITS=bits, GROUP=group_size, D_PAD=next_pow2(d), **_outlier_passes(n_out, outlier_rule), CLIP=clip_search,
        num_warps=_num_warps(next_pow2(d), group_size, clip_search),
    )
    return out_k, out_v


# --------------------------------------------------------------------------- compile lane
# The contract's point (head_dim 128, group 32, 3 outliers = 2 %) in fp16 / 2 bits and bf16 /
# 4 bits, and fp32 input at head_dim 64 (group 64: one value group per vector, 1 outlier).
# Compiles take 14-18 s per arch at head_dim 128 on the 2-core CI CPU (a 0.7 MB cubin; with
# tl.argmax and one reduction per outlier value it was 1.4 MB and 25-45 s: the row passes are
# unrolled cross-lane reductions); head_dim 256 is left out of the lane.
def _compile_cases() -> list[CompileCase]:
    def case(dtype: str, bits: int, group: int, d_pad: int, n_out: int, clip: bool, rule: str) -> CompileCase:
        p = f"*{dtype}"
        sig = dict(k_ptr=p, v_ptr=p)
        for kind in ("k", "v"):
            sig.update({f"{kind}codes_ptr": "*i32", f"{kind}scale_ptr": "*fp16", f"{kind}zero_ptr": "*fp16",
                        f"{kind}idx_ptr": "*u8", f"{kind}val_ptr": "*fp16", f"{kind}res_ptr": "*fp32"})
        sig.update(T="i32", D="i32")
        flags = dict(BITS=bits, GROUP=group, D_PAD=d_pad, **_outlier_passes(n_out, rule), CLIP=clip)
        return CompileCase(f"gear_quantize[{dtype},{bits}b,g{group},d{d_pad},o{n_out}-{rule}{',clip' if clip else ''}]",
                           _gear_quantize_kernel, sig, flags, dict(num_warps=_num_warps(d_pad, group, clip)))

    return [case("fp16", 2, 32, 128, 3, True, "farthest"), case("bf16", 4, 32, 128, 3, False, "extremes"),
            case("fp32", 2, 64, 64, 1, True, "extremes")]


COMPILE_CASES = _compile_cases()
