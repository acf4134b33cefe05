"""Triton kernels for the quantization family: fused dequant-matmul.

    y = x (Ŵ + S)ᵀ + (x Vᵀ) Uᵀ + b

with Ŵ the packed 2/3/4-bit weight (uniform groups with fp16 scales/zeros, or a per-row fp16
lookup table), S the CSR outliers and U (N × r), V (r × K) an optional low-rank compensation
path. The packed format is the shared contract of ``lowrank_ops/quant/format.py``:

* codes of row n, column k live in int32 word ``k // E`` of row n at bit ``(k % E) · bits``
  (E = 8 for 4-bit, 16 for 2-bit and for the low plane of 3-bit, 32 for the 3-bit high plane);
  rows are ``K_pad / E`` words long, K_pad = ceil(K / g) · g;
* uniform: Ŵ = (q − zeros[n, k // g]) · scales[n, k // g], the statistics fp16 or (``QSTATS``)
  in the second-level form, passed in the same two pointer slots: ``scales_ptr`` → stat codes
  uint8 (N, G) (scale code | zero << 4), ``zeros_ptr`` → stat meta fp16 (2, ceil(N/16), G)
  (log2_lo, log2_step planes), scale = exp2(lo + code · step); LUT: Ŵ = lut[n, q];
* outliers: ``rowptr`` int32 (N + 1), ``cols`` int16 (read as unsigned), ``vals`` fp16.

Three paths (chosen by ``ops.quant_path``):

* ``"tile"`` — one launch, grid (M-blocks, N-blocks), tensor-core dots on dequantized tiles
  (with a low-rank path, x Vᵀ (M × r) comes from one small GEMM before it);
* ``"decode"`` — M ≤ 16: split-K over (N-blocks × K-splits) programs writing fp32 partials
  (the first N-block's programs also x Vᵀ's), then a small reduction kernel that adds the
  low-rank term, the outliers and the bias. Two launches, no atomics, deterministic;
* ``"dequant"`` — large M, opt-in (``ops.DEQUANT_MIN_M``): ``_quant_dequant_kernel`` writes the
  dense Ŵ (transient, in x's dtype), the outliers and U V are added into it, and one dense GEMM
  (cuBLAS) does the rest.

With outliers, the tile and decode paths first launch ``_quant_outlier_kernel``: the fp32 (M × N) x Sᵀ, from
a CSR walk over many programs with contiguous gathers from xᵀ, which the tile or reduce kernel
adds before its one rounding. (Walked inside those kernels, the gathers from x were one
sector per element, and the decode path's walk ran in only N / 128 programs: on an H100 at
4096², 1 % outliers cost 5.7× the decode time at M = 16 and 18× the tile time at M = 256.)

and, for training adapters on a frozen quantized base, ``quant_matmul_dx``: dx = dy · Ŵ from
the packed weight (one launch, tiles of dx, N swept inside).

Every product accumulates in fp32; the dequantized tile is rounded to x's dtype (fp16/bf16 run
on tensor cores, fp32 uses exact "ieee" dots). Config tables, the pruner, ``_dot`` and the
allocation hook follow (and are imported from) :mod:`lowrank_ops.kernels.lowrank`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowrank_ops.quant.format import csr_coordinates

from ._codes import codes_to_f32, load_row_codes, row_codes_f16
from ._compile_check import CompileCase
from ._launch import launch
from .lowrank import (
    DECODE_BLOCK_M,
    DX_GPU_TABLE,
    DX_NAMES,
    INTERPRET,
    _configs,
    _dot,
    _dot_precision,
    _empty,
    _pruner,
    _rank_pad,
    _target_programs,
    cdiv,
    next_pow2,
)

QUANT_MAX_RANK = 128  # the fused kernels keep a (BLOCK_M × R_PAD) fp32 tile next to the accumulator
BITS_SUPPORTED = (2, 3, 4)
GROUP_SIZES = (32, 64, 128)
_DECODE_K_CHUNK = 64 if INTERPRET else 256  # smallest K range one decode split is given
_DECODE_MAX_SPLIT = 16
_REDUCE_BLOCK_N = 32 if INTERPRET else 128
# outlier kernel: output features per program, most x rows per program, CSR entries per step, and
# the gather tile's element budget (features × entries × rows) that sets that step. Measured on an
# H100 (4b + 1 %, M = 256): 32 features and 8 entries per step 84.5 µs at 4096² and 163 µs at
# 11008 × 4096 (4ccb0e0); 8 features and up to 32 entries (shorter dependent chains, 4× the
# programs) 135.8 and 298.8 µs (4ec857a), so the first shape stays.
_OUTLIER_BLOCK_N = 32
_OUTLIER_MAX_M = 64
_OUTLIER_MAX_JC = 8
_OUTLIER_GATHER = 4096
# dequant kernel tile: 16 rows × 256 columns (512 contiguous bytes of fp16 output per row)
_DQ_BLOCK_N = 16
_DQ_BLOCK_K = 64 if INTERPRET else 256

# --------------------------------------------------------------------------- config tables
# GPU tables: a few configs under @triton.autotune (each autotuned key compiles and times
# every row: on the H100 seven rows cost ~10 s per key, so the tables stay at four). The
# interpreter gets one row of large blocks instead (multi-config autotuning cannot run there).
_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
TILE_LARGE_M = 256  # from this M (its power-of-two bucket) the tile path tries the 8-warp rows only
_TILE_GPU_TABLE = [
    # BLOCK_M BLOCK_N BLOCK_K warps stages
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (64, 64, 128, 4, 3),  # one 128-group per K step: scales loaded once per tile
    (32, 64, 32, 4, 2),  # lean: fp32 at R_PAD = 128
    # M >= TILE_LARGE_M: two warpgroups on 128-row tiles, as dense fp16 GEMMs take on sm_90; each
    # dequantized weight tile serves 128 rows of x
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
]
_TILE_TABLE = [(32, 32, 64, 4, 1)] if INTERPRET else _TILE_GPU_TABLE
_DECODE_NAMES = ("BLOCK_N", "BLOCK_K")
_DECODE_GPU_TABLE = [
    # BLOCK_N BLOCK_K warps stages
    (64, 128, 4, 3),
    (32, 128, 4, 3),
    (32, 256, 4, 3),
    (32, 64, 4, 2),  # lean: fp32 at R_PAD = 128
]
_DECODE_TABLE = [(32, 32, 4, 1)] if INTERPRET else _DECODE_GPU_TABLE
_DX_TABLE = [(32, 64, 32, 4, 1)] if INTERPRET else DX_GPU_TABLE
_TILE_FIT = _pruner(  # the low-rank path: a (BLOCK_M × R_PAD) tile of x Vᵀ and one of Uᵀ after the loop
    loop_tile=lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"]),
    after_tile=lambda m: m["R_PAD"] * (m["BLOCK_M"] + m["BLOCK_N"]),
    acc_tile=lambda m: m["BLOCK_M"] * m["BLOCK_N"],
)["early_config_prune"]


def _tile_prune(configs: list, named_args: dict, **kwargs) -> list:
    """The 8-warp rows for M ≥ TILE_LARGE_M, the others below (so an M bucket times at most four
    rows), then what fits (:func:`lowrank._pruner`); the single interpreter row always stays."""
    large = named_args["M_BUCKET"] >= TILE_LARGE_M
    return _TILE_FIT([c for c in configs if (c.num_warps == 8) == large] or configs, named_args, **kwargs)


_TILE_PRUNE = {"early_config_prune": _tile_prune}
_DECODE_PRUNE = _pruner(  # BLOCK_M = 16 passed as a constexpr; V tiles in the loop (first N-block)
    loop_tile=lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"] + m["R_PAD"]),
    after_tile=lambda m: 0,
    acc_tile=lambda m: m["BLOCK_M"] * (m["R_PAD"] + m["BLOCK_N"]),
)


# --------------------------------------------------------------------------- dequantization
@triton.jit
def _load_group_stats(scales_ptr, zeros_ptr, rows, gcol, n_groups, N, gmask, QSTATS: tl.constexpr):
    """fp32 (scale, zero) of rows ``rows`` at group columns ``gcol`` (broadcastable tiles).

    fp16 mode: one fp16 pair per (row, group). ``QSTATS``: one stat byte per (row, group) and the
    (log2_lo, log2_step) fp16 pair of its 16-row block (rows of a tile share it: L1 hits), decoded
    as exp2(lo + code · step) and zero = code >> 4 — once per (row, group), not per weight.
    """
    gidx = rows * n_groups + gcol
    if QSTATS:
        code = tl.load(scales_ptr + gidx, mask=gmask, other=0).to(tl.int32)
        midx = (rows // 16) * n_groups + gcol
        lo = tl.load(zeros_ptr + midx, mask=gmask, other=0.0).to(tl.float32)
        step = tl.load(zeros_ptr + tl.cdiv(N, 16) * n_groups + midx, mask=gmask, other=0.0).to(tl.float32)
        s = tl.exp2(lo + (code & 15).to(tl.float32) * step)
        z = (code >> 4).to(tl.float32)
    else:
        s = tl.load(scales_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _load_quant_base_tile(
    qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, offs_n, offs_k, k0, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr, BLOCK_K: tl.constexpr,
    dtype: tl.constexpr,
):
    """(BLOCK_N × BLOCK_K) tile of Ŵ (rows ``offs_n``, columns ``offs_k`` = k0 + [0, BLOCK_K))
    dequantized from the packed rows, fp16 for ``dtype`` fp16 with 2/4-bit uniform codes, else
    fp32 (the caller rounds it to ``dtype``). Outside the matrix (rows ≥ N, k ≥ K) the entries are finite
    but not zero ((0 − z)·s at padded codes): every caller multiplies the tile with an operand
    that is zero there (x past K, dy past N), so no per-element select is spent on masking.

    Row-major like the packed weight: each row's BLOCK_K codes are its BLOCK_K / E consecutive
    words (one vector load per row), unpacked on chip by ``load_row_codes`` with a thread keeping
    its words' codes adjacent; 3-bit codes OR the 1-bit plane, unpacked the same way, above the
    2-bit plane. Codes become floats by the exact magic-number trick (``codes_to_f32``), and
    (code · s − z · s) is one FFMA per code. For fp16, 2/4-bit uniform codes take
    ``row_codes_f16`` instead: two codes per LOP3 into an fp16 pair, then f16x2 arithmetic (an
    HADD2 and an HFMA2 per two codes) — a third of the instructions per code of the fp32 route
    with its converts to fp16, at one extra fp16 rounding (of z · s).
    Scales/zeros are one fp16 pair per (row, group) (or their second-level form,
    :func:`_load_group_stats`): when BLOCK_K ≤ GROUP the K-blocks never straddle a group (both
    powers of two, K-blocks start at multiples of BLOCK_K), so one (BLOCK_N × 1) column serves
    the tile. The tensor-core dots take the tile transposed (Ŵᵀ) or as it is (dx).
    """
    k_pad = tl.cdiv(K, GROUP) * GROUP
    n_groups = k_pad // GROUP
    n_mask = offs_n[:, None] < N
    mask = n_mask & (offs_k[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]
    # fp16 tiles of 2/4-bit uniform codes are formed in f16x2 arithmetic, two codes per instruction
    PAIRS: tl.constexpr = (dtype == tl.float16) and (BITS != 3) and (not USE_LUT)
    if PAIRS:
        E: tl.constexpr = 32 // BITS
        q = row_codes_f16(qw_ptr + rows * (k_pad // E), k0 // E, k_pad // E, n_mask, BITS, BLOCK_K)
    elif BITS == 4:
        q = load_row_codes(qw_ptr + rows * (k_pad // 8), k0 // 8, k_pad // 8, n_mask, 4, BLOCK_K)
    else:
        # 2-bit codes, or the low 2 bits of 3-bit codes
        q = load_row_codes(qw_ptr + rows * (k_pad // 16), k0 // 16, k_pad // 16, n_mask, 2, BLOCK_K)
        if BITS == 3:
            q = q | (load_row_codes(qwhi_ptr + rows * (k_pad // 32), k0 // 32, k_pad // 32, n_mask, 1, BLOCK_K) << 2)
    if USE_LUT:
        # per-row table of 2^BITS fp16 values (tiny, L1/L2-resident): a gather
        w = tl.load(lut_ptr + rows * (1 << BITS) + q, mask=mask, other=0.0).to(tl.float32)
    else:
        if BLOCK_K <= GROUP:
            s, z = _load_group_stats(scales_ptr, zeros_ptr, rows, k0 // GROUP, n_groups, N, n_mask, QSTATS)
        else:
            s, z = _load_group_stats(scales_ptr, zeros_ptr, rows, offs_k[None, :] // GROUP, n_groups, N, mask, QSTATS)
        if PAIRS:
            w = q * s.to(tl.float16) - (z * s).to(tl.float16)  # one HFMA2 per two codes
        else:
            w = codes_to_f32(q) * s - z * s  # one FFMA per code: z · s is per (row, group)
    return w


@triton.jit
def _quant_k_run(
    x_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, v_ptr,
    offs_m, offs_n, kb_first, kb_last, M, N, K, R, lr_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr, HAS_LR: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_M × BLOCK_N) product acc of x rows ``offs_m`` with Ŵᵀ columns ``offs_n`` and
    fp32 (BLOCK_M × R_PAD) rank-space product t = x Vᵀ, both over the K-blocks [kb_first, kb_last).

    Each x tile is loaded once and feeds two dots: acc += x · Ŵ_tileᵀ and, with the low-rank
    path and ``lr_on`` (a runtime flag, the same for the whole program), t += x · V_tileᵀ (a
    (BLOCK_K × R_PAD) tile of Vᵀ, rows of V past R masked to zero); t stays zero otherwise.
    """
    dtype = x_ptr.dtype.element_ty
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for kb in range(kb_first, kb_last):
        k0 = kb * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & k_mask[None, :], other=0.0)
        w = _load_quant_base_tile(qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, offs_n, offs_k, k0, N, K,
                                  BITS, GROUP, USE_LUT, QSTATS, BLOCK_K, dtype)
        acc = _dot(x, tl.trans(w.to(dtype)), acc, DOT_PRECISION)
        if HAS_LR:
            if lr_on:
                vt = tl.load(v_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None],
                             other=0.0)
                t = _dot(x, vt.to(dtype), t, DOT_PRECISION)
    return acc, t


@triton.jit
def _add_lowrank(acc, t, u_ptr, offs_n, N, R, DOT_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """acc + t U_tileᵀ: t (BLOCK_M × R_PAD, fp32, rank space) rounded to ``dtype`` once, times the
    (R_PAD × BLOCK_N) tile of Uᵀ read from U rows ``offs_n`` (columns past R masked to zero)."""
    offs_r = tl.arange(0, t.shape[1])
    ut = tl.load(u_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None],
                 mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)
    return _dot(t.to(dtype), ut.to(dtype), acc, DOT_PRECISION)


# --------------------------------------------------------------------------- outliers: x Sᵀ
# Grid (cdiv(N, OUT_BLOCK_N), cdiv(M, OB_M)). Program (pn, pm) owns the fp32 (OUT_BLOCK_N × OB_M)
# block of (x Sᵀ)ᵀ for output features [pn·OUT_BLOCK_N, +OUT_BLOCK_N) and rows [pm·OB_M, +OB_M).
# It walks its features' CSR rows in lockstep, JC entries per step (the trip count is the largest
# row nnz of the block / JC): a (OUT_BLOCK_N × JC) tile of columns and values, then the
# (OUT_BLOCK_N × JC × OB_M) gather from xᵀ (K × M, written by the launcher): the OB_M rows of
# one column are adjacent there, so every gather is a contiguous run (reading x itself, each
# element would be a sector of its own). The block is stored into the (M × N) fp32 partial that
# the tile or reduce kernel adds before its one rounding.
@triton.jit
def _quant_outlier_kernel(
    xt_ptr, rowptr_ptr, cols_ptr, vals_ptr, out_ptr, M, N,
    OUT_BLOCK_N: tl.constexpr, OB_M: tl.constexpr, JC: tl.constexpr,
):
    offs_n = tl.program_id(0) * OUT_BLOCK_N + tl.arange(0, OUT_BLOCK_N)
    offs_m = tl.program_id(1) * OB_M + tl.arange(0, OB_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    start = tl.load(rowptr_ptr + offs_n, mask=n_mask, other=0)
    count = tl.load(rowptr_ptr + offs_n + 1, mask=n_mask, other=0) - start
    offs_j = tl.arange(0, JC)[None, :]
    acc = tl.zeros([OUT_BLOCK_N, OB_M], dtype=tl.float32)
    for j0 in range(0, tl.max(count, axis=0), JC):
        valid = (j0 + offs_j) < count[:, None]
        entry = start[:, None] + j0 + offs_j
        col = tl.load(cols_ptr + entry, mask=valid, other=0).to(tl.int32) & 0xFFFF  # int16 read as unsigned
        val = tl.load(vals_ptr + entry, mask=valid, other=0.0).to(tl.float32)
        xg = tl.load(xt_ptr + col.to(tl.int64)[:, :, None] * M + offs_m[None, None, :],
                     mask=valid[:, :, None] & m_mask[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * val[:, :, None], axis=1)
    tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc, mask=n_mask[:, None] & m_mask[None, :])


# --------------------------------------------------------------------------- dequant path (large M)
# Grid (cdiv(N, DQ_BLOCK_N), cdiv(K, DQ_BLOCK_K)). Program (pn, pk) writes the (DQ_BLOCK_N ×
# DQ_BLOCK_K) tile of Ŵ at rows [pn·DQ_BLOCK_N, +DQ_BLOCK_N), columns [pk·DQ_BLOCK_K, +DQ_BLOCK_K)
# of the dense row-major (N × K) output in its dtype: the packed rows are read once (one vector
# load per row run, the tile path's loader) and the tile is stored row by row, a contiguous
# DQ_BLOCK_K run per row; columns past K are not written. A streaming kernel: 4.25 bits read and
# 16 written per weight at 4-bit g128.
@triton.jit
def _quant_dequant_kernel(
    qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, w_ptr, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr,
    DQ_BLOCK_N: tl.constexpr, DQ_BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * DQ_BLOCK_N + tl.arange(0, DQ_BLOCK_N)
    k0 = tl.program_id(1) * DQ_BLOCK_K
    offs_k = k0 + tl.arange(0, DQ_BLOCK_K)
    dtype = w_ptr.dtype.element_ty
    w = _load_quant_base_tile(qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, offs_n, offs_k, k0, N, K,
                              BITS, GROUP, USE_LUT, QSTATS, DQ_BLOCK_K, dtype)
    tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(dtype),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------- tile path
# Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); program (pm, pn) owns one (BLOCK_M × BLOCK_N)
# output tile. One pass over K (``_quant_k_run``): x tile (BLOCK_M × BLOCK_K, row-major, rows
# K apart), packed words of the (BLOCK_K × BLOCK_N) tile of Ŵᵀ (BLOCK_K / E words per weight
# row) dequantized in registers, then tensor-core dots. Then the low-rank term t Uᵀ with t = x Vᵀ
# (M × r) formed once per call by the launcher (one small GEMM: formed here, every N-block would
# redo it, r / BLOCK_N more tensor-core work: doubling it at r = 64), the outliers' fp32 x Sᵀ
# tile (from ``_quant_outlier_kernel``, launched just before), the bias, one store.
@triton.autotune(configs=_configs(_TILE_TABLE, _TILE_NAMES),
                  key=["M_BUCKET", "N", "K", "R_PAD", "BITS", "GROUP", "USE_LUT", "QSTATS"], prune_configs_by=_TILE_PRUNE)
@triton.jit
def _quant_tile_kernel(
    x_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, opart_ptr,
    u_ptr, t_ptr, bias_ptr, y_ptr,
    M, N, K, R,
    M_BUCKET,  # autotune key only: next power of two of M
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _ = _quant_k_run(x_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, t_ptr,
                          offs_m, offs_n, 0, tl.cdiv(K, BLOCK_K), M, N, K, R, False,
                          BITS, GROUP, USE_LUT, QSTATS, False, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)[None, :]
        t = tl.load(t_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r, mask=(offs_m[:, None] < M) & (offs_r < R),
                    other=0.0)
        acc = _add_lowrank(acc, t, u_ptr, offs_n, N, R, DOT_PRECISION, x_ptr.dtype.element_ty)
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_OUTLIERS:
        acc += tl.load(opart_ptr + rows * N + offs_n[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- decode, step 1: split-K partials
# Grid (cdiv(N, BLOCK_N), K_SPLIT, cdiv(M, 16)). At batch 1 the (M-blocks × N-blocks) grid of
# the tile path has far fewer programs than SMs; splitting K too fills the GPU. The K-blocks are
# dealt out in contiguous runs; program (pn, ks, pm) dequantizes its run of the (K × BLOCK_N)
# weight columns, multiplies with 16 x rows (masked to M) on tensor cores and writes fp32
# partials to part[ks, m, n] (K_SPLIT × M × N, contiguous); an empty run writes zeros. The
# low-rank path is split by linearity, (x Vᵀ) Uᵀ = (Σ_s x_s V_sᵀ) Uᵀ: only the programs of the
# first N-block (pn = 0) form their split's rank-space partial x_s V_sᵀ, written to
# tpart[ks, m, r] (K_SPLIT × M × R, fp32); the reduce kernel sums it and applies U. So V is read
# once per call, not once per N-block (64 times at N = 4096), and U once.
@triton.autotune(configs=_configs(_DECODE_TABLE, _DECODE_NAMES),
                  key=["M_BUCKET", "N", "K", "R_PAD", "K_SPLIT", "BITS", "GROUP", "USE_LUT", "QSTATS"],
                  prune_configs_by=_DECODE_PRUNE)
@triton.jit
def _quant_decode_split_kernel(
    x_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, v_ptr, part_ptr, tpart_ptr,
    M, N, K, R, K_SPLIT,
    M_BUCKET,  # autotune key only: next power of two of M
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr,
    HAS_LR: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, K_SPLIT)
    first = split * per_split
    first_block = tl.program_id(0) == 0
    acc, t = _quant_k_run(x_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, v_ptr,
                          offs_m, offs_n, first, tl.minimum(first + per_split, k_blocks), M, N, K, R, first_block,
                          BITS, GROUP, USE_LUT, QSTATS, HAS_LR, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None]
    out = part_ptr + split.to(tl.int64) * M * N + rows * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    if HAS_LR:
        if first_block:
            offs_r = tl.arange(0, R_PAD)[None, :]
            tl.store(tpart_ptr + split.to(tl.int64) * M * R + rows * R + offs_r, t,
                     mask=(offs_m[:, None] < M) & (offs_r < R))


# --------------------------------------------------------------------------- decode, step 2: reduce + outliers + bias
@triton.jit
def _sum_splits(ptrs, mask, K_SPLIT, slab):
    """fp32 sum of the K_SPLIT partial tiles at ``ptrs``, ``ptrs + slab``, ... (one split's slab
    after another), zero where ``mask`` is off."""
    acc = tl.zeros(ptrs.shape, dtype=tl.float32)
    for _ in range(0, K_SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += slab
    return acc


# Grid (cdiv(N, BLOCK_N), cdiv(M, 16)). Program (pn, pm) sums the K_SPLIT fp32 partials of its
# (16 × BLOCK_N) output tile (L2-resident, written just before), adds the low-rank term (the
# K_SPLIT rank-space partials summed, rounded to x's dtype once, times its tile of Uᵀ), the
# outliers' fp32 x Sᵀ tile (``_quant_outlier_kernel``, as for the tile path) and the bias, and
# stores in x's dtype.
@triton.jit
def _quant_decode_reduce_kernel(
    x_ptr, part_ptr, tpart_ptr, u_ptr, opart_ptr, bias_ptr, y_ptr,
    M, N, R, K_SPLIT,
    HAS_LR: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    n_mask = offs_n < N
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    acc = _sum_splits(part_ptr + rows * N + offs_n[None, :], mask, K_SPLIT, M * N)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)[None, :]
        t = _sum_splits(tpart_ptr + rows * R + offs_r, (offs_m[:, None] < M) & (offs_r < R), K_SPLIT, M * R)
        acc = _add_lowrank(acc, t, u_ptr, offs_n, N, R, DOT_PRECISION, x_ptr.dtype.element_ty)
    if HAS_OUTLIERS:
        acc += tl.load(opart_ptr + rows * N + offs_n[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward: dx = dy · Ŵ
# Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); program (pm, pk) owns one (BLOCK_M × BLOCK_K) tile
# of dx and sweeps N in BLOCK_N steps: a (BLOCK_M × BLOCK_N) tile of dy (row-major, rows N
# apart) times the (BLOCK_N × BLOCK_K) tile of Ŵ dequantized in registers by the forward's
# loader. The packed weight is read once per
# M-block and never expanded in memory; dx is written in fp32 (the caller adds the outlier and
# low-rank terms before its one rounding). BLOCK_K and the group size are powers of two, so a
# K-block lies in one group or covers whole groups, as the loader needs.
@triton.autotune(configs=_configs(_DX_TABLE, DX_NAMES), key=["M_BUCKET", "N", "K", "BITS", "GROUP", "USE_LUT", "QSTATS"])
@triton.jit
def _quant_dx_kernel(
    dy_ptr, qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, dx_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: next power of two of M
    BITS: tl.constexpr, GROUP: tl.constexpr, USE_LUT: tl.constexpr, QSTATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=m_mask & (offs_n[None, :] < N), other=0.0)
        w = _load_quant_base_tile(qw_ptr, qwhi_ptr, scales_ptr, zeros_ptr, lut_ptr, offs_n, offs_k, k0, N, K,
                                  BITS, GROUP, USE_LUT, QSTATS, BLOCK_K, dtype)
        acc = _dot(dy, w.to(dtype), acc, DOT_PRECISION)
    tl.store(dx_ptr + rows * K + offs_k[None, :], acc, mask=m_mask & (offs_k[None, :] < K))


# --------------------------------------------------------------------------- launchers
def _quantized_stats(scales: Optional[Tensor]) -> bool:
    """The statistics slots hold the second-level form (uint8 stat codes), not fp16 scales."""
    return scales is not None and scales.dtype == torch.uint8


def _has_outliers(rowptr: Optional[Tensor], cols: Optional[Tensor]) -> bool:
    """A CSR with at least one entry (an empty one adds nothing: no launch, no scatter)."""
    return rowptr is not None and cols is not None and cols.numel() > 0


def _decode_k_split(m: int, n: int, k: int, device: torch.device) -> int:
    """K splits so that (N-blocks × splits × M-blocks) ≈ 2 programs per SM (nominal BLOCK_N 64)."""
    columns = cdiv(n, 64) * cdiv(m, DECODE_BLOCK_M)
    return max(1, min(cdiv(k, _DECODE_K_CHUNK), _target_programs(device) // columns, _DECODE_MAX_SPLIT))


def _outlier_product(x: Tensor, rowptr: Tensor, cols: Tensor, vals: Tensor, n: int) -> Tensor:
    """fp32 (M × N) x Sᵀ of the CSR outliers, for the tile or reduce kernel to add (one launch;
    x is transposed once, M × K elements, so that the kernel's gathers are contiguous)."""
    m = x.shape[0]
    xt = x.t().contiguous()
    out = _empty((m, n), torch.float32, x.device)
    ob_m = min(_OUTLIER_MAX_M, next_pow2(m))
    jc = max(1, min(_OUTLIER_MAX_JC, _OUTLIER_GATHER // (_OUTLIER_BLOCK_N * ob_m)))
    launch(_quant_outlier_kernel, (cdiv(n, _OUTLIER_BLOCK_N), cdiv(m, ob_m)),
        xt, rowptr, cols, vals, out, m, n, OUT_BLOCK_N=_OUTLIER_BLOCK_N, OB_M=ob_m, JC=jc,
    )
    return out


def quant_dequantize(
    qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], lr_u: Optional[Tensor], lr_v: Optional[Tensor],
    bits: int, group_size: int, in_features: int, dtype: torch.dtype,
) -> Tensor:
    """Dense (N, K) Ŵ + S + U V in ``dtype``: one ``_quant_dequant_kernel`` launch for Ŵ, the CSR
    outliers added at their coordinates, U V by one GEMM into it. Inputs are trusted."""
    n, k = qweight.shape[0], in_features
    w = _empty((n, k), dtype, qweight.device)
    dummy = qweight
    use_lut = lut is not None
    launch(_quant_dequant_kernel, (cdiv(n, _DQ_BLOCK_N), cdiv(k, _DQ_BLOCK_K)),
        qweight, qweight_hi if bits == 3 else dummy, dummy if use_lut else scales, dummy if use_lut else zeros,
        lut if use_lut else dummy, w, n, k, BITS=bits, GROUP=group_size, USE_LUT=use_lut,
        QSTATS=_quantized_stats(scales), DQ_BLOCK_N=_DQ_BLOCK_N, DQ_BLOCK_K=_DQ_BLOCK_K,
    )
    if _has_outliers(outlier_rowptr, outlier_cols):
        w.index_put_(csr_coordinates(outlier_rowptr, outlier_cols), outlier_vals.to(dtype), accumulate=True)
    if lr_u is not None:
        w.addmm_(lr_u.to(dtype), lr_v.to(dtype))
    return w


def quant_matmul(
    x: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], outlier_rowptr: Optional[Tensor], outlier_cols: Optional[Tensor],
    outlier_vals: Optional[Tensor], lr_u: Optional[Tensor], lr_v: Optional[Tensor], bias: Optional[Tensor],
    bits: int, group_size: int, path: str,
) -> Tensor:
    """``x (Ŵ + S)ᵀ + (x Vᵀ) Uᵀ + b`` for contiguous x (M, K) and tensors in the packed format.

    Inputs are trusted (``ops.quant_linear`` checks them): LUT mode when ``lut`` is given,
    else scales/zeros (second-level stat codes/meta when ``scales`` is uint8); outliers when ``outlier_rowptr`` is given and nnz > 0; the low-rank
    path when ``lr_u`` is given (rank ≤ :data:`QUANT_MAX_RANK` on the fused paths). ``path``:
    ``"tile"`` (one launch), ``"decode"`` (split-K + reduce; made for M ≤ 16, correct for any M)
    or ``"dequant"`` (large M: :func:`quant_dequantize`, then one dense GEMM; the dense weight is
    transient, one layer's worth).
    """
    if path not in ("tile", "decode", "dequant"):
        raise ValueError(f"path: expected 'tile', 'decode' or 'dequant', got {path!r}")
    (m, k), n = x.shape, qweight.shape[0]
    if path == "dequant":
        w = quant_dequantize(qweight, qweight_hi, scales, zeros, lut, outlier_rowptr, outlier_cols, outlier_vals,
                             lr_u, lr_v, bits, group_size, k, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    use_lut = lut is not None
    has_out = _has_outliers(outlier_rowptr, outlier_cols)
    has_lr = lr_u is not None
    r = lr_u.shape[1] if has_lr else 0
    if r > QUANT_MAX_RANK:
        raise ValueError(f"rank: the fused quant kernels support rank <= {QUANT_MAX_RANK}, got {r}")
    y = _empty((m, n), x.dtype, x.device)
    dummy = qweight  # pointer for absent tensors (their branches are compiled out)
    qwhi = qweight_hi if bits == 3 else dummy
    sc, zr, lt = (dummy, dummy, lut) if use_lut else (scales, zeros, dummy)
    opart = _outlier_product(x, outlier_rowptr, outlier_cols, outlier_vals, n) if has_out else dummy
    u, v = (lr_u, lr_v) if has_lr else (dummy, dummy)
    b = bias if bias is not None else y
    flags = dict(BITS=bits, GROUP=group_size, USE_LUT=use_lut, QSTATS=_quantized_stats(scales), HAS_LR=has_lr,
                 R_PAD=_rank_pad(max(r, 1)), DOT_PRECISION=_dot_precision(x.dtype))
    m_bucket = next_pow2(m)
    if path == "tile":
        t = (x @ lr_v.to(x.dtype).t()).contiguous() if has_lr else dummy  # x Vᵀ, once per call
        launch(_quant_tile_kernel, lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])),
            x, qweight, qwhi, sc, zr, lt, opart, u, t, b, y, m, n, k, r, m_bucket,
            HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None, **flags,
        )
        return y
    k_split = _decode_k_split(m, n, k, x.device)
    m_blocks = cdiv(m, DECODE_BLOCK_M)
    part = _empty((k_split, m, n), torch.float32, x.device)
    tpart = _empty((k_split, m, r), torch.float32, x.device) if has_lr else part
    launch(_quant_decode_split_kernel, lambda meta: (cdiv(n, meta["BLOCK_N"]), k_split, m_blocks),
        x, qweight, qwhi, sc, zr, lt, v, part, tpart, m, n, k, r, k_split, m_bucket,
        BLOCK_M=DECODE_BLOCK_M, **flags,
    )
    launch(_quant_decode_reduce_kernel, (cdiv(n, _REDUCE_BLOCK_N), m_blocks),
        x, part, tpart, u, opart, b, y, m, n, r, k_split,
        HAS_LR=has_lr, R_PAD=flags["R_PAD"], DOT_PRECISION=flags["DOT_PRECISION"],
        HAS_OUTLIERS=has_out, HAS_BIAS=bias is not None, BLOCK_M=DECODE_BLOCK_M, BLOCK_N=_REDUCE_BLOCK_N,
    )
    return y


def quant_matmul_dx(
    dy: Tensor, qweight: Tensor, qweight_hi: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
    lut: Optional[Tensor], bits: int, group_size: int, in_features: int,
) -> Tensor:
    """``dy · Deq(Q)`` as float32 (M, K) for contiguous dy (M, N): the packed base's part of the
    backward to x (outliers and the low-rank path are the caller's). Inputs are trusted."""
    m, n = dy.shape
    k = in_features
    use_lut = lut is not None
    dx = _empty((m, k), torch.float32, dy.device)
    dummy = qweight
    sc, zr, lt = (dummy, dummy, lut) if use_lut else (scales, zeros, dummy)
    launch(_quant_dx_kernel, lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(k, meta["BLOCK_K"])),
        dy, qweight, qweight_hi if bits == 3 else dummy, sc, zr, lt, dx, m, n, k, next_pow2(m),
        BITS=bits, GROUP=group_size, USE_LUT=use_lut, QSTATS=_quantized_stats(scales),
        DOT_PRECISION=_dot_precision(dy.dtype),
    )
    return dx


# --------------------------------------------------------------------------- compile lane
# Representative specializations, compiled for sm_80 and sm_90, every option on (outliers,
# rank 128, bias): each of the tile and split kernels in every (dtype, bits) and every
# (bits, mode) — tile as fp16 uniform + bf16 LUT, split as fp16 LUT + bf16 uniform, the 3-bit
# uniform ones with second-level statistics — the dx kernel for every bit width per dtype (bf16
# 4-bit with second-level statistics), the reduce kernel per dtype, and both autotuned kernels
# in fp32 (the largest tiles: only the lean config survives pruning at R_PAD = 128).
def _packed_signature(p: str, qstats: bool) -> dict[str, str]:
    """Pointer types of x and the packed weight (the statistics slots typed by ``qstats``)."""
    return dict(x_ptr=p, qw_ptr="*i32", qwhi_ptr="*i32", scales_ptr="*u8" if qstats else "*fp16",
                zeros_ptr="*fp16", lut_ptr="*fp16")


# the dequant kernel's loader variants (fp16 pairs, 2/3-bit, LUT, second-level statistics) and the
# outlier kernel's row blocks (batch-1 decode, tile), spread over the dtypes
_DEQUANT_COMPILE = {"fp16": ((4, "uniform"),), "bf16": ((3, "lut"), (2, "uniform")), "fp32": ((3, "qstats"),)}
_OUTLIER_COMPILE_ROWS = {"fp16": (1,), "bf16": (_OUTLIER_MAX_M,), "fp32": (_OUTLIER_MAX_M,)}


def _compile_cases() -> list[CompileCase]:
    cases = []
    ints = dict(M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32")
    for dtype in ("fp16", "bf16", "fp32"):
        p, prec, is_fp32 = f"*{dtype}", ("ieee" if dtype == "fp32" else "tf32"), dtype == "fp32"
        for bits in (3,) if is_fp32 else BITS_SUPPORTED:
            # tile: fp16 uniform + bf16 LUT; split: the other two; fp32: both kernels uniform
            for kernel, lut in ((_quant_tile_kernel, dtype == "bf16"), (_quant_decode_split_kernel, dtype == "fp16")):
                lut = lut and not is_fp32
                qstats = bits == 3 and not lut and not is_fp32
                packed = _packed_signature(p, qstats)
                # the split kernel's first config at R_PAD = 128 uses 160 of sm_80's 163 KB shared
                # memory; second-level statistics add 4 KB, so that case compiles at rank 64 (at
                # rank 128 on sm_80 the autotuner skips the config that does not fit)
                r_pad = 64 if qstats and kernel is _quant_decode_split_kernel else QUANT_MAX_RANK
                flags = dict(BITS=bits, GROUP=128, USE_LUT=lut, QSTATS=qstats, HAS_LR=True, R_PAD=r_pad,
                             DOT_PRECISION=prec)
                mode = "lut" if lut else ("uniform+qstats" if qstats else "uniform")
                if kernel is _quant_tile_kernel:
                    name, sig = f"quant_tile[{dtype},{bits}b,{mode}]", dict(
                        **packed, opart_ptr="*fp32", u_ptr=p, t_ptr=p, bias_ptr=p, y_ptr=p, **ints)
                    flags.update(HAS_OUTLIERS=True, HAS_BIAS=True)
                else:
                    name, sig = f"quant_decode_split[{dtype},{bits}b,{mode}]", dict(
                        **packed, v_ptr=p, part_ptr="*fp32", tpart_ptr="*fp32", K_SPLIT="i32", **ints)
                    flags.update(BLOCK_M=DECODE_BLOCK_M)
                cases.append(CompileCase(name, kernel, sig, flags))
                if kernel is _quant_tile_kernel and dtype == "fp16" and bits == 4:  # the 8-warp rows, rank ≤ 16
                    cases.append(CompileCase(f"quant_tile[fp16,4b,{mode},large-M]", kernel, sig,
                                             {**flags, "R_PAD": 16}, args=dict(M_BUCKET=TILE_LARGE_M)))
        for bits, lut in ((4, False), (3, dtype == "bf16"), (2, dtype == "fp16")):
            qstats = bits == 4 and dtype == "bf16"
            packed = _packed_signature(p, qstats)
            del packed["x_ptr"]
            cases.append(CompileCase(
                f"quant_dx[{dtype},{bits}b,{'lut' if lut else ('uniform+qstats' if qstats else 'uniform')}]",
                _quant_dx_kernel,
                dict(dy_ptr=p, **packed, dx_ptr="*fp32", M="i32", N="i32", K="i32", M_BUCKET="i32"),
                dict(BITS=bits, GROUP=64, USE_LUT=lut, QSTATS=qstats, DOT_PRECISION=prec),
            ))
        cases.append(CompileCase(
            f"quant_decode_reduce[{dtype}]", _quant_decode_reduce_kernel,
            dict(x_ptr=p, part_ptr="*fp32", tpart_ptr="*fp32", u_ptr=p, opart_ptr="*fp32", bias_ptr=p, y_ptr=p,
                 M="i32", N="i32", R="i32", K_SPLIT="i32"),
            dict(HAS_LR=True, R_PAD=QUANT_MAX_RANK, DOT_PRECISION=prec, HAS_OUTLIERS=True, HAS_BIAS=True,
                 BLOCK_M=DECODE_BLOCK_M, BLOCK_N=128),
            dict(num_warps=4),
        ))
        for bits, mode in _DEQUANT_COMPILE[dtype]:
            qstats = mode == "qstats"
            cases.append(CompileCase(
                f"quant_dequant[{dtype},{bits}b,{mode}]", _quant_dequant_kernel,
                dict(**{k: v for k, v in _packed_signature(p, qstats).items() if k != "x_ptr"}, w_ptr=p, N="i32", K="i32"),
                dict(BITS=bits, GROUP=128, USE_LUT=mode == "lut", QSTATS=qstats, DQ_BLOCK_N=_DQ_BLOCK_N,
                     DQ_BLOCK_K=_DQ_BLOCK_K),
                dict(num_warps=4),
            ))
        for ob_m in _OUTLIER_COMPILE_ROWS[dtype]:
            cases.append(CompileCase(
                f"quant_outliers[{dtype},M{ob_m}]", _quant_outlier_kernel,
                dict(xt_ptr=p, rowptr_ptr="*i32", cols_ptr="*i16", vals_ptr="*fp16", out_ptr="*fp32", M="i32", N="i32"),
                dict(OUT_BLOCK_N=_OUTLIER_BLOCK_N, OB_M=ob_m,
                     JC=max(1, min(_OUTLIER_MAX_JC, _OUTLIER_GATHER // (_OUTLIER_BLOCK_N * ob_m)))),
                dict(num_warps=4),
            ))
    return cases


COMPILE_CASES = _compile_cases()
