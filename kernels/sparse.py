"""Triton kernels for the N:M sparse family: ``y = x Wₙₘᵀ + b`` straight from the packed format.

The format is the shared contract of ``lowrank_ops/sparse/format.py``: W (N, K) keeps n of every
M consecutive columns (M ∈ {4, 8, 16}, 1 ≤ n < M), stored as

* ``values`` (N, KK), KK = (K / M)·n, row-major: kept value j of a row is slot j % n of group
  j // n (slots in increasing column order);
* ``indices`` int32 (N, W): the in-group position p_j ∈ [0, M) of kept value j uses b = log2(M)
  bits at bit ``(j % E)·b`` of word ``j // E``, E = 32 // b positions per word (16, 10, 8);
  the column of value j is ``(j // n)·M + p_j``.

Three paths (chosen by ``ops.nm_path``; for 2:4 at many rows PyTorch's semi-structured kernel):

* ``"decode"`` — M ≤ 16: GEMV style, reads only the kept values and their index words. Grid
  (N-blocks × K-splits); each program walks its run of kept values, unpacks positions with
  shifts/masks and gathers x at the kept columns (x is a few KB, L1/L2-resident), fp32 FMAs.
  With one split the program adds the bias and writes y; with several it writes fp32 partials
  and the quant family's reduce kernel sums them in split order (deterministic, no atomics).
  :func:`nm_matmul_decode_q4` is the same kernel reading 4-bit kept values (the quant family's
  uniform format along KK) instead of dense ones.
* ``"tile"`` — one launch, grid (M-blocks × N-blocks): each K step expands the kept values of a
  (BLOCK_K × BLOCK_N) tile of Wᵀ on chip (for each slot: ``where(pos == column in group, value,
  0)``) and feeds it to a tensor-core ``tl.dot``; bias fused. :func:`nm_matmul_tile_q4` reads
  4-bit kept values the same way.
* ``"expand"`` — many rows: the same expansion writes a transient dense weight once
  (:func:`nm_expand`), and one dense GEMM (cuBLAS) does the product.

The backward to x, ``dx = dy · Ŵ`` (:func:`nm_matmul_dx`, :func:`nm_matmul_dx_q4`), is one
launch over (M-blocks × K-blocks) that sweeps N and expands each (BLOCK_N × BLOCK_K) tile of Ŵ on
chip with the tile path's expansion: the dense weight never exists in memory. The gradient of
dense kept values (fixed-mask sparse training, :func:`nm_matmul_dvalues`) is the mirror image:
tiles of dyᵀx on tensor cores, only their kept entries stored (SDDMM).

Every product accumulates in fp32; the expanded tile is rounded to the activations' dtype (x's,
dy's in the backward: fp16/bf16 run on tensor cores, fp32 uses exact "ieee" dots). ``_dot``, the
config helper and the allocation hook come from :mod:`lowrank_ops.kernels.lowrank`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowrank_ops.sparse.format import check_nm, index_bits, positions_per_word

from ._codes import codes_to_f32
from ._compile_check import CompileCase
from ._launch import launch
from .lowrank import (DX_GPU_TABLE, DX_NAMES, INTERPRET, _configs, _dot, _dot_precision, _empty, _pruner, _target_programs,
                      cdiv, next_pow2)
from .quant import GROUP_SIZES, _quant_decode_reduce_kernel

DECODE_MAX_ROWS = 16  # the decode kernel keeps a (rows × BLOCK_N × BLOCK_J) gather tile in registers
Q4_GROUP_SIZES = GROUP_SIZES  # group sizes of 4-bit kept values: the quant format's
_DECODE_J_CHUNK = 64 if INTERPRET else 256  # fewest kept values per row one decode split is given
_DECODE_MAX_SPLIT = 16
_REDUCE_BLOCK_N = 32 if INTERPRET else 128
_REDUCE_BLOCK_M = 16
# expand kernel tile: 32 rows × 128 columns of the dense weight (a multiple of every M in {4, 8, 16})
_EXPAND_BLOCK_N = 32
_EXPAND_BLOCK_K = 128


# --------------------------------------------------------------------------- config tables
# GPU tables: a few configs under @triton.autotune (autotuning time on a lent GPU is scarce); the
# interpreter gets one row of large blocks (multi-config autotuning cannot run there).
_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_TILE_GPU_TABLE = [
    # BLOCK_M BLOCK_N BLOCK_K warps stages
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
]
_TILE_TABLE = [(32, 32, 64, 4, 1)] if INTERPRET else _TILE_GPU_TABLE
_TILE_PRUNE = _pruner(
    loop_tile=lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"]),
    after_tile=lambda m: 0,
    acc_tile=lambda m: m["BLOCK_M"] * m["BLOCK_N"],
)
_DECODE_NAMES = ("BLOCK_N", "BLOCK_J")
_DECODE_GPU_TABLE = [
    # BLOCK_N BLOCK_J warps stages   (BLOCK_J = kept values per row per step)
    (32, 128, 4, 3),  # (BLOCK_N, BLOCK_J) pairs with BLOCK_N·BLOCK_J = 4096 serve 1-2 rows,
    (16, 256, 4, 3),
    (16, 64, 4, 3),   # 4-8 rows,
    (16, 32, 8, 2),   # 16 rows (see _decode_prune): eight warps share the gather tile
]
_DECODE_TABLE = [(32, 64, 4, 1)] if INTERPRET else _DECODE_GPU_TABLE
_DECODE_REGS_BUDGET = 32  # gathered x elements per thread per step (each also holds a 64-bit address and an fp32 accumulator)
_DX_TABLE = [(32, 32, 64, 4, 1)] if INTERPRET else DX_GPU_TABLE


def _decode_prune(configs, named_args, **kwargs):
    """Keep configs whose (BLOCK_M × BLOCK_N × BLOCK_J) gather tile stays within the register
    budget per thread; the leanest config when none does."""

    def regs(c):
        return kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_J"] / (32 * c.num_warps)

    fits = [c for c in configs if regs(c) <= _DECODE_REGS_BUDGET]
    return fits or [min(configs, key=regs)]


# --------------------------------------------------------------------------- decode path
@triton.jit
def _load_kept(values_ptr, scales_ptr, zeros_ptr, rows, offs_j, mask, kk,
               Q4: tl.constexpr, QGROUP: tl.constexpr):
    """fp32 kept values of rows ``rows`` (int64) at kept indices ``offs_j``, both broadcast to
    ``mask``'s tile shape ((BLOCK_N × BLOCK_J) in the decode kernel, (groups × BLOCK_N) per slot
    in the tile expansion); zero where ``mask`` is off.

    Dense: a plain load of ``values`` (N, KK). Q4 (4-bit kept values, the quant family's uniform
    format along KK): ``values_ptr`` is its ``qweight`` (N, KK_pad / 8) int32, code j in word
    j // 8 at bit (j % 8)·4 (8 consecutive j share one word, served by L1), and the value is
    (q − zeros[r, j // QGROUP]) · scales[r, j // QGROUP] (fp16, (N, KK_pad / QGROUP)).
    """
    if Q4:
        kk_pad = tl.cdiv(kk, QGROUP) * QGROUP
        word = tl.load(values_ptr + rows * (kk_pad // 8) + offs_j // 8, mask=mask, other=0)
        q = codes_to_f32((word >> ((offs_j % 8) * 4)) & 0xF)
        gidx = rows * (kk_pad // QGROUP) + offs_j // QGROUP
        s = tl.load(scales_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, (q - z) * s, 0.0)
    return tl.load(values_ptr + rows * kk + offs_j, mask=mask, other=0.0).to(tl.float32)


# Grid (cdiv(N, BLOCK_N), K_SPLIT). Program (pn, ks) owns output rows [pn·BLOCK_N, +BLOCK_N) and
# the ks-th contiguous run of BLOCK_J-blocks of kept values. Per step it loads a (BLOCK_N ×
# BLOCK_J) tile of values (contiguous along j; or their 4-bit codes + group scales/zeros when Q4,
# see ``_load_kept``) and the index words behind it (BLOCK_J / E words
# per row, repeated addresses served by L1), unpacks the positions, and gathers the kept columns
# of every x row (BLOCK_M × BLOCK_N × BLOCK_J, rows ≥ M masked) into an fp32 accumulator of the
# same shape, acc3 += x[m, col] · v; the sum over j runs once after the loop (a per-step sum cost
# a shuffle-and-add tree every step: 224 of the 1002 instructions of a 2:4 M = 1 step on sm_90).
# DIRECT (K_SPLIT = 1): bias added, y stored in x's dtype. Else fp32 partials to
# part[ks, m, r] (K_SPLIT × M × N, contiguous); an empty run writes zeros.
@triton.autotune(configs=_configs(_DECODE_TABLE, _DECODE_NAMES),
                 key=["BLOCK_M", "N", "K", "K_SPLIT", "NM_N", "NM_M", "Q4", "QGROUP"],
                 prune_configs_by={"early_config_prune": _decode_prune})
@triton.jit
def _nm_decode_kernel(
    x_ptr, values_ptr, scales_ptr, zeros_ptr, indices_ptr, bias_ptr, out_ptr,
    M, N, K, K_SPLIT,
    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
    Q4: tl.constexpr, QGROUP: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    kk = (K // NM_M) * NM_N  # kept values per row
    words = tl.cdiv(kk, PER_WORD)  # index words per row
    rows = offs_n.to(tl.int64)
    j_blocks = tl.cdiv(kk, BLOCK_J)
    per_split = tl.cdiv(j_blocks, K_SPLIT)
    first = split * per_split
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_J), dtype=tl.float32)  # reduced over j once, after the loop
    for jb in range(first, tl.minimum(first + per_split, j_blocks)):
        offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        mask = n_mask[:, None] & (offs_j < kk)[None, :]
        v = _load_kept(values_ptr, scales_ptr, zeros_ptr, rows[:, None], offs_j[None, :], mask, kk, Q4, QGROUP)
        pos = _kept_positions(indices_ptr, rows[:, None], offs_j[None, :], mask, words, NM_M, POS_BITS, PER_WORD)
        col = (offs_j // NM_N)[None, :] * NM_M + pos  # (BLOCK_N, BLOCK_J) columns of x
        xg = tl.load(x_ptr + offs_m[:, None, None].to(tl.int64) * K + col[None, :, :],
                     mask=m_mask[:, None, None] & mask[None, :, :], other=0.0).to(tl.float32)
        acc3 += xg * v[None, :, :]
    acc = tl.sum(acc3, axis=2)
    out_mask = m_mask[:, None] & n_mask[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + split.to(tl.int64) * M * N + out_offs, acc, mask=out_mask)


# --------------------------------------------------------------------------- tile path
@triton.jit
def _kept_positions(indices_ptr, rows, j, mask, words,
                    NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """In-group positions of kept values ``j`` of rows ``rows`` (int64; both broadcast to ``mask``'s
    shape): position j of a row sits in index word j // PER_WORD at bit (j % PER_WORD)·POS_BITS."""
    word = tl.load(indices_ptr + rows * words + j // PER_WORD, mask=mask, other=0)
    return (word >> ((j % PER_WORD) * POS_BITS)) & (NM_M - 1)


@triton.jit
def _expand_nm_tile(values_ptr, scales_ptr, zeros_ptr, indices_ptr, offs_n, g0, N, K,
                    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
                    Q4: tl.constexpr, QGROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense fp32 (BLOCK_K × BLOCK_N) tile of Wᵀ for columns [g0·M, g0·M + BLOCK_K) and rows
    ``offs_n``, expanded from the kept values: zero where nothing is kept or outside W.

    The tile is viewed as (groups × M × BLOCK_N). For each slot s < n one (groups × BLOCK_N)
    tile of kept values (stride n along the group axis; dense or 4-bit, see ``_load_kept``) and
    its positions are loaded; the value is placed where the position equals the column within
    the group (``where(pos == c, v, 0)``). Slots of one group hold distinct positions, so the n
    placements never collide and their sum is the dense tile.
    """
    G_B: tl.constexpr = BLOCK_K // NM_M
    kk = (K // NM_M) * NM_N
    words = tl.cdiv(kk, PER_WORD)
    offs_g = g0 + tl.arange(0, G_B)
    mask = (offs_g < K // NM_M)[:, None] & (offs_n < N)[None, :]
    rows = offs_n.to(tl.int64)[None, :]
    in_group = tl.arange(0, NM_M)[None, :, None]
    w = tl.zeros((G_B, NM_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(NM_N):
        j = offs_g[:, None] * NM_N + s  # (G_B, 1) kept index
        v = _load_kept(values_ptr, scales_ptr, zeros_ptr, rows, j, mask, kk, Q4, QGROUP)
        pos = _kept_positions(indices_ptr, rows, j, mask, words, NM_M, POS_BITS, PER_WORD)
        w += tl.where(pos[:, None, :] == in_group, v[:, None, :], 0.0)
    return tl.reshape(w, (BLOCK_K, BLOCK_N))


# Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); program (pm, pn) owns one (BLOCK_M × BLOCK_N)
# output tile. One pass over K in BLOCK_K steps (BLOCK_K is a multiple of every M, so a step
# covers whole groups): the x tile (BLOCK_M × BLOCK_K, row-major, rows K apart), the expanded
# (BLOCK_K × BLOCK_N) tile of Wᵀ (reads only kept values — or their 4-bit codes + group
# scales/zeros when Q4 — and index words), one tensor-core dot. Then the bias, one store.
@triton.autotune(configs=_configs(_TILE_TABLE, _TILE_NAMES),
                 key=["M_BUCKET", "N", "K", "NM_N", "NM_M", "Q4", "QGROUP"], prune_configs_by=_TILE_PRUNE)
@triton.jit
def _nm_tile_kernel(
    x_ptr, values_ptr, scales_ptr, zeros_ptr, indices_ptr, bias_ptr, y_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: next power of two of M
    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
    Q4: tl.constexpr, QGROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & (offs_k < K)[None, :], other=0.0)
        w = _expand_nm_tile(values_ptr, scales_ptr, zeros_ptr, indices_ptr, offs_n, kb * (BLOCK_K // NM_M), N, K,
                            NM_N, NM_M, POS_BITS, PER_WORD, Q4, QGROUP, BLOCK_K, BLOCK_N)
        acc = _dot(x, w.to(dtype), acc, DOT_PRECISION)
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


# --------------------------------------------------------------------------- expand path (large M)
# Grid (cdiv(N, EX_BLOCK_N), cdiv(K, EX_BLOCK_K)). Program (pn, pk) expands the (EX_BLOCK_K ×
# EX_BLOCK_N) tile of Wᵀ for columns [pk·EX_BLOCK_K, +EX_BLOCK_K) and rows [pn·EX_BLOCK_N,
# +EX_BLOCK_N) with the tile path's expansion and stores it into the dense row-major (N × K)
# weight in its dtype (zeros where nothing is kept): each row's EX_BLOCK_K columns are one
# contiguous run. A streaming kernel: the kept values and index words are read once, the dense
# weight written once, for one dense GEMM to consume.
@triton.jit
def _nm_expand_kernel(
    values_ptr, scales_ptr, zeros_ptr, indices_ptr, w_ptr, N, K,
    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
    Q4: tl.constexpr, QGROUP: tl.constexpr, EX_BLOCK_N: tl.constexpr, EX_BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * EX_BLOCK_N + tl.arange(0, EX_BLOCK_N)
    offs_k = tl.program_id(1) * EX_BLOCK_K + tl.arange(0, EX_BLOCK_K)
    wt = _expand_nm_tile(values_ptr, scales_ptr, zeros_ptr, indices_ptr, offs_n, tl.program_id(1) * (EX_BLOCK_K // NM_M),
                         N, K, NM_N, NM_M, POS_BITS, PER_WORD, Q4, QGROUP, EX_BLOCK_K, EX_BLOCK_N)
    tl.store(w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None], wt.to(w_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------- backward: dx = dy · Ŵ
# Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); program (pm, pk) owns one (BLOCK_M × BLOCK_K) tile
# of dx and sweeps N in BLOCK_N steps: a (BLOCK_M × BLOCK_N) tile of dy (row-major, rows N
# apart) times the (BLOCK_N × BLOCK_K) tile of Ŵ, expanded on chip from the kept values (dense
# or Q4) and index words by the forward's ``_expand_nm_tile`` (its (BLOCK_K × BLOCK_N) result
# transposed). BLOCK_K is a multiple of every M, so a K-block covers whole groups. The packed
# weight is read once per M-block and never expanded in memory; fp32 accumulation, dx stored
# in dy's dtype.
@triton.autotune(configs=_configs(_DX_TABLE, DX_NAMES), key=["M_BUCKET", "N", "K", "NM_N", "NM_M", "Q4", "QGROUP"])
@triton.jit
def _nm_dx_kernel(
    dy_ptr, values_ptr, scales_ptr, zeros_ptr, indices_ptr, dx_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: next power of two of M
    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
    Q4: tl.constexpr, QGROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pk = tl.program_id(1)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=m_mask & (offs_n < N)[None, :], other=0.0)
        wt = _expand_nm_tile(values_ptr, scales_ptr, zeros_ptr, indices_ptr, offs_n, pk * (BLOCK_K // NM_M), N, K,
                             NM_N, NM_M, POS_BITS, PER_WORD, Q4, QGROUP, BLOCK_K, BLOCK_N)
        acc = _dot(dy, tl.trans(wt.to(dtype)), acc, DOT_PRECISION)
    tl.store(dx_ptr + rows * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m_mask & (offs_k < K)[None, :])


# --------------------------------------------------------------------------- backward: dvalues (fixed-mask training)
# Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)); program (pn, pk) owns output rows ``offs_n`` and the
# whole groups of columns [pk·BLOCK_K, +BLOCK_K). It sweeps the M rows in BLOCK_M steps and
# accumulates the dense (BLOCK_N × BLOCK_K) tile of dW = dyᵀ x on tensor cores (dy tile
# (BLOCK_M × BLOCK_N) transposed, x tile (BLOCK_M × BLOCK_K), both row-major), then keeps only
# its kept entries: viewed as (BLOCK_N × groups × M), slot s of each group selects the entry at
# its position and is stored to dvalues[n, g·n + s]. The dense gradient never exists in memory
# (SDDMM); fp32 accumulation, dvalues in the values' dtype.
@triton.autotune(configs=_configs(_DX_TABLE, DX_NAMES), key=["M_BUCKET", "N", "K", "NM_N", "NM_M"])
@triton.jit
def _nm_dvalues_kernel(
    dy_ptr, x_ptr, indices_ptr, dv_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: next power of two of M
    NM_N: tl.constexpr, NM_M: tl.constexpr, POS_BITS: tl.constexpr, PER_WORD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pk = tl.program_id(1)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)[:, None]
        m_mask = offs_m[:, None] < M
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=m_mask & n_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & (offs_k < K)[None, :], other=0.0)
        acc = _dot(tl.trans(dy), x, acc, DOT_PRECISION)
    G_B: tl.constexpr = BLOCK_K // NM_M
    kk = (K // NM_M) * NM_N
    dense = tl.reshape(acc, (BLOCK_N, G_B, NM_M))
    offs_g = pk * G_B + tl.arange(0, G_B)
    mask = n_mask[:, None] & (offs_g < K // NM_M)[None, :]
    out_rows = offs_n.to(tl.int64)[:, None]
    in_group = tl.arange(0, NM_M)[None, None, :]
    for s in tl.static_range(NM_N):
        j = offs_g[None, :] * NM_N + s  # (1, G_B) kept index
        pos = _kept_positions(indices_ptr, out_rows, j, mask, tl.cdiv(kk, PER_WORD), NM_M, POS_BITS, PER_WORD)
        val = tl.sum(tl.where(pos[:, :, None] == in_group, dense, 0.0), axis=2)
        tl.store(dv_ptr + out_rows * kk + j, val.to(dv_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def _pattern(n: int, m: int) -> dict:
    """The constexprs of one N:M pattern (``ValueError`` for a pattern outside the contract)."""
    n, m = check_nm(n, m)
    return dict(NM_N=n, NM_M=m, POS_BITS=index_bits(m), PER_WORD=positions_per_word(m))


def _kept_args(values: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], group_size: int) -> tuple[tuple, dict]:
    """Kernel pointers (values, scales, zeros) and the Q4/QGROUP constexprs: 4-bit kept values when
    ``scales`` is given (``ValueError`` for a group size outside :data:`Q4_GROUP_SIZES`), else dense
    values (absent scale/zero pointers stand in as ``values``: their branch is compiled out)."""
    if scales is None:
        return (values, values, values), dict(Q4=False, QGROUP=1)
    if group_size not in Q4_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {list(Q4_GROUP_SIZES)}, got {group_size!r}")
    return (values, scales, zeros), dict(Q4=True, QGROUP=group_size)


def decode_k_split(rows: int, n_out: int, kept: int, device: torch.device) -> int:
    """K splits so that (N-blocks × splits) ≈ 2 programs per SM (nominal BLOCK_N 32), each split
    given at least ``_DECODE_J_CHUNK`` kept values per row."""
    columns = cdiv(n_out, 32)
    return max(1, min(cdiv(kept, _DECODE_J_CHUNK), _target_programs(device) // columns, _DECODE_MAX_SPLIT))


def nm_matmul_decode(x2d: Tensor, values: Tensor, indices: Tensor, n: int, m: int,
                     bias: Optional[Tensor] = None) -> Tensor:
    """``x2d Wₙₘᵀ + b`` by the split-K gather kernel, for x2d (rows ≤ 16, K) contiguous.

    Inputs are trusted (``ops.nm_linear`` checks them): values (N, KK) and indices (N, W) in the
    packed format, contiguous, on x's device; bias (N,) in x's dtype or None. Returns (rows, N) in
    x's dtype. Reads each kept value and index word once (per split), x from cache.
    """
    return _decode(x2d, values, None, None, 0, indices, n, m, bias)


def nm_matmul_decode_q4(x2d: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                        indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`nm_matmul_decode` with the kept values stored in 4 bits: the (N, KK) values matrix as
    the quant family's uniform format (``QuantFormat`` with bits=4, no LUT/outliers/low-rank):
    ``qweight`` int32 (N, KK_pad / 8), ``scales``/``zeros`` fp16 (N, KK_pad / group_size),
    KK_pad = ceil(KK / group_size)·group_size. Same indices, bias and result; trusted inputs."""
    return _decode(x2d, qweight, scales, zeros, group_size, indices, n, m, bias)


def _decode(x2d: Tensor, values: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], group_size: int,
            indices: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """Launch the decode kernel (dense values, or 4-bit codes when ``scales`` is given) + reduce."""
    pattern = _pattern(n, m)
    kept, q4 = _kept_args(values, scales, zeros, group_size)
    rows, k = x2d.shape
    if not 1 <= rows <= DECODE_MAX_ROWS:
        raise ValueError(f"x2d: the decode kernel serves 1..{DECODE_MAX_ROWS} rows, got shape {tuple(x2d.shape)}")
    n_out = values.shape[0]
    y = _empty((rows, n_out), x2d.dtype, x2d.device)
    k_split = decode_k_split(rows, n_out, k // m * n, x2d.device)
    b = bias if bias is not None else y
    flags = dict(BLOCK_M=next_pow2(rows), **q4, **pattern)
    grid = lambda meta: (cdiv(n_out, meta["BLOCK_N"]), k_split)  # noqa: E731
    if k_split == 1:
        launch(_nm_decode_kernel, grid, x2d, *kept, indices, b, y, rows, n_out, k, 1, DIRECT=True,
               HAS_BIAS=bias is not None, **flags)
        return y
    part = _empty((k_split, rows, n_out), torch.float32, x2d.device)
    launch(_nm_decode_kernel, grid, x2d, *kept, indices, b, part, rows, n_out, k, k_split, DIRECT=False,
           HAS_BIAS=False, **flags)
    launch(_quant_decode_reduce_kernel, (cdiv(n_out, _REDUCE_BLOCK_N), 1),
        x2d, part, part, part, part, b, y, rows, n_out, 0, k_split,
        HAS_LR=False, R_PAD=16, DOT_PRECISION=_dot_precision(x2d.dtype),
        HAS_OUTLIERS=False, HAS_BIAS=bias is not None, BLOCK_M=_REDUCE_BLOCK_M, BLOCK_N=_REDUCE_BLOCK_N,
    )
    return y


def nm_matmul_tile(x2d: Tensor, values: Tensor, indices: Tensor, n: int, m: int,
                   bias: Optional[Tensor] = None) -> Tensor:
    """``x2d Wₙₘᵀ + b`` by the expand-on-chip tensor-core kernel, for x2d (any rows, K) contiguous.

    Same trusted inputs and result as :func:`nm_matmul_decode`; one launch."""
    return _tile(x2d, values, None, None, 0, indices, n, m, bias)


def nm_matmul_tile_q4(x2d: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`nm_matmul_tile` with 4-bit kept values (tensors as in :func:`nm_matmul_decode_q4`)."""
    return _tile(x2d, qweight, scales, zeros, group_size, indices, n, m, bias)


def _tile(x2d: Tensor, values: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], group_size: int,
          indices: Tensor, n: int, m: int, bias: Optional[Tensor]) -> Tensor:
    """Launch the tile kernel (dense values, or 4-bit codes when ``scales`` is given)."""
    pattern = _pattern(n, m)
    kept, q4 = _kept_args(values, scales, zeros, group_size)
    rows, k = x2d.shape
    n_out = values.shape[0]
    y = _empty((rows, n_out), x2d.dtype, x2d.device)
    launch(_nm_tile_kernel, lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(n_out, meta["BLOCK_N"])),
        x2d, *kept, indices, bias if bias is not None else y, y, rows, n_out, k, next_pow2(rows),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2d.dtype), **q4, **pattern,
    )
    return y


def nm_matmul_expand(x2d: Tensor, values: Tensor, indices: Tensor, n: int, m: int,
                     bias: Optional[Tensor] = None) -> Tensor:
    """``x2d Wₙₘᵀ + b`` for many rows: W expanded once to a transient dense weight in x2d's dtype
    (one streaming launch), then one dense GEMM. Same trusted inputs and result as
    :func:`nm_matmul_decode`."""
    w = nm_expand(values, None, None, 0, indices, n, m, x2d.shape[1], x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


def nm_matmul_expand_q4(x2d: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                        indices: Tensor, n: int, m: int, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`nm_matmul_expand` with 4-bit kept values (tensors as in :func:`nm_matmul_decode_q4`)."""
    w = nm_expand(qweight, scales, zeros, group_size, indices, n, m, x2d.shape[1], x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


def nm_expand(values: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], group_size: int, indices: Tensor,
              n: int, m: int, in_features: int, dtype: torch.dtype) -> Tensor:
    """The dense (N, K) weight in ``dtype`` from the packed N:M format (dense kept values, or
    4-bit codes when ``scales`` is given): one ``_nm_expand_kernel`` launch."""
    pattern = _pattern(n, m)
    kept, q4 = _kept_args(values, scales, zeros, group_size)
    n_out = values.shape[0]
    w = _empty((n_out, in_features), dtype, values.device)
    launch(_nm_expand_kernel, (cdiv(n_out, _EXPAND_BLOCK_N), cdiv(in_features, _EXPAND_BLOCK_K)),
        *kept, indices, w, n_out, in_features, EX_BLOCK_N=_EXPAND_BLOCK_N, EX_BLOCK_K=_EXPAND_BLOCK_K, **q4, **pattern,
    )
    return w


def nm_matmul_dx(dy: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """``dx = dy · Wₙₘ`` (M, K = ``in_features``) in dy's dtype, for dy (M, N) contiguous: the
    backward to x, reading the packed weight (expanded tile by tile on chip, never in memory).
    Trusted inputs as in :func:`nm_matmul_tile`."""
    return _dx(dy, values, None, None, 0, indices, n, m, in_features)


def nm_matmul_dx_q4(dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """:func:`nm_matmul_dx` with 4-bit kept values (tensors as in :func:`nm_matmul_decode_q4`)."""
    return _dx(dy, qweight, scales, zeros, group_size, indices, n, m, in_features)


def _dx(dy: Tensor, values: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], group_size: int,
        indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """Launch the dx kernel (dense values, or 4-bit codes when ``scales`` is given)."""
    pattern = _pattern(n, m)
    kept, q4 = _kept_args(values, scales, zeros, group_size)
    rows, n_out = dy.shape
    k = in_features
    dx = _empty((rows, k), dy.dtype, dy.device)
    launch(_nm_dx_kernel, lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(k, meta["BLOCK_K"])),
        dy, *kept, indices, dx, rows, n_out, k, next_pow2(rows),
        DOT_PRECISION=_dot_precision(dy.dtype), **q4, **pattern,
    )
    return dx


def nm_matmul_dvalues(dy: Tensor, x: Tensor, indices: Tensor, n: int, m: int, dtype: torch.dtype) -> Tensor:
    """The kept values' gradient (N, KK) in ``dtype``: ``(dyᵀ x)`` at the kept positions, for dy
    (M, N) and x (M, K) contiguous in one dtype, ``indices`` the format's (N, W) index words. The
    dense (N, K) gradient is never formed. Trusted inputs (``ops.nm_linear``'s backward)."""
    pattern = _pattern(n, m)
    rows, n_out = dy.shape
    k = x.shape[1]
    dv = _empty((n_out, k // m * n), dtype, dy.device)
    launch(_nm_dvalues_kernel, lambda meta: (cdiv(n_out, meta["BLOCK_N"]), cdiv(k, meta["BLOCK_K"])),
        dy, x, indices, dv, rows, n_out, k, next_pow2(rows),
        DOT_PRECISION=_dot_precision(x.dtype), **pattern,
    )
    return dv


# --------------------------------------------------------------------------- compile lane
# Which (kernel, dtype, pattern) combinations compile: the forward tile kernel for every pattern
# the issue names (2:4, 1:4, 2:8 with 3-bit positions crossing words, 4:16) in fp16 and bf16, and
# fp32 2:4 (exact dots, the largest tiles: every autotune config is checked on sm_80); the decode
# kernel in both modes (DIRECT with bias at 1 row, split partials at 16) for every pattern in fp16,
# two in bf16, 2:4 in fp32. The backward kernels (dx, dvalues) and the 4-bit-values variants
# (g128) and the expand kernel are compiled for every pattern and both 16-bit dtypes between them, not for every pair
# (each case is a few seconds per architecture in CI). The reduce kernel is the quant family's
# and is compiled by its cases.
_ALL_PATTERNS = ((2, 4), (1, 4), (2, 8), (4, 16))
_CASE_TABLE = {  # kernel -> (dtype, (n, m)) pairs
    "tile": [("fp16", nm) for nm in _ALL_PATTERNS] + [("bf16", nm) for nm in _ALL_PATTERNS] + [("fp32", (2, 4))],
    "decode": [("fp16", nm) for nm in _ALL_PATTERNS] + [("bf16", (2, 4)), ("bf16", (2, 8)), ("fp32", (2, 4))],
    "dx": [("fp16", (1, 4)), ("fp16", (2, 8)), ("fp16", (4, 16)), ("bf16", (2, 4)), ("fp32", (2, 4))],
    "dvalues": [("fp16", (2, 4)), ("fp16", (4, 16)), ("bf16", (2, 8)), ("bf16", (1, 4)), ("fp32", (2, 4))],
    "tile_q4": [("fp16", (2, 4)), ("bf16", (2, 8))],
    "dx_q4": [("fp16", (2, 8)), ("bf16", (2, 4))],
    "decode_q4": [("fp16", (2, 4)), ("bf16", (2, 8))],
    "expand": [("fp16", (1, 4)), ("fp16", (2, 8)), ("bf16", (4, 16)), ("bf16", (2, 4))],
    "expand_q4": [("fp16", (2, 8)), ("bf16", (2, 4))],
}


def _compile_cases() -> list[CompileCase]:
    cases = []
    for kernel, combos in _CASE_TABLE.items():
        q4 = kernel.endswith("_q4")
        for dtype, (n, m) in combos:
            p, prec = f"*{dtype}", ("ieee" if dtype == "fp32" else "tf32")
            pattern = _pattern(n, m)
            tag = f"{dtype},{n}:{m}"
            vals = dict(values_ptr="*i32", scales_ptr="*fp16", zeros_ptr="*fp16") if q4 else \
                dict(values_ptr=p, scales_ptr=p, zeros_ptr=p)
            flags = dict(Q4=q4, QGROUP=128 if q4 else 1, **pattern)
            ints = dict(M="i32", N="i32", K="i32")
            if kernel.startswith("tile"):
                cases.append(CompileCase(
                    f"nm_{kernel}[{tag}]", _nm_tile_kernel,
                    dict(x_ptr=p, **vals, indices_ptr="*i32", bias_ptr=p, y_ptr=p, **ints, M_BUCKET="i32"),
                    dict(HAS_BIAS=True, DOT_PRECISION=prec, **flags)))
            elif kernel.startswith("dx"):
                cases.append(CompileCase(
                    f"nm_{kernel}[{tag}]", _nm_dx_kernel,
                    dict(dy_ptr=p, **vals, indices_ptr="*i32", dx_ptr=p, **ints, M_BUCKET="i32"),
                    dict(DOT_PRECISION=prec, **flags)))
            elif kernel.startswith("expand"):
                cases.append(CompileCase(
                    f"nm_{kernel}[{tag}]", _nm_expand_kernel,
                    dict(**vals, indices_ptr="*i32", w_ptr=p, N="i32", K="i32"),
                    dict(EX_BLOCK_N=_EXPAND_BLOCK_N, EX_BLOCK_K=_EXPAND_BLOCK_K, **flags), dict(num_warps=4)))
            elif kernel == "dvalues":
                cases.append(CompileCase(
                    f"nm_dvalues[{tag}]", _nm_dvalues_kernel,
                    dict(dy_ptr=p, x_ptr=p, indices_ptr="*i32", dv_ptr=p, **ints, M_BUCKET="i32"),
                    dict(DOT_PRECISION=prec, **pattern)))
            else:
                for rows, direct in ((4, False),) if q4 else ((1, True), (16, False)):
                    cases.append(CompileCase(
                        f"nm_{kernel}[{tag},M{rows},{'direct' if direct else 'split'}]", _nm_decode_kernel,
                        dict(x_ptr=p, **vals, indices_ptr="*i32", bias_ptr=p, out_ptr=p if direct else "*fp32",
                             **ints, K_SPLIT="i32"),
                        dict(DIRECT=direct, HAS_BIAS=direct, BLOCK_M=rows, **flags)))
    return cases


COMPILE_CASES = _compile_cases()
