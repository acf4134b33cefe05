"""Triton decode attention that reads a GEAR-compressed KV cache directly (flash-decoding).

    out = softmax(scale · q K̂ᵀ + mask) V̂,   x̂_t = Deq(codes_t) + scatter(out_idx_t, out_val_t) + A_t B_jᵀ

for the cached tokens t of blocks j = t // B plus the fp16 tail, as stored by
``lowrank_ops/kvcache/format.py`` (the shared GEAR contract):

* key codes (batch, kv_heads, T, D·bits/32) int32, code d of a token in word d // E at bit
  (d % E)·bits (E = 32 / bits); per-channel scale/zero (batch, kv_heads, T / G, D) of each
  group of G tokens; value codes packed the same way, per-token scale/zero
  (batch, kv_heads, T, D / G) of each group of G channels; Deq = (code − zero) · scale;
* outliers: n_out (uint8 channel, fp16 value) pairs per token vector (distinct channels; n_out is
  ~2 % of D). Keys': q at each outlier's channel times its value, on the rows that can be real
  only, starting the score dot's accumulator (``_key_outlier_scores``); values': added into the
  dequantized V tile by channel compare (fp16 tiles compare channel pairs, ``_add_outliers``);
* low rank: A (batch, kv_heads, T, r), B (batch, kv_heads, T / B, D, r), used factored only:
  scores += (q B_j) A_tᵀ and out += (p A_t) B_jᵀ, the product A Bᵀ is never formed; the rank r
  is a compile-time constant (the factor rows are then vector loads). Factors are fp16, or int8
  (``INT8_FACTORS``) with A's per-(block, rank column) scales (batch, kv_heads, T / B, r) and
  B = B̂ / 127: Â and B̂ enter the dots as exact fp16 integers (made by a magic number, not
  integer converts, at the rank's own width and padded to the dot's after, ``_spread_columns``), and
  A's scales with the 1/127 multiply the (rows × r) rank-space products q B̂ and P Â, never a
  factor tile;
* tail: (batch, kv_heads, B, D) in the cache dtype, ``tail_len`` valid tokens;
* prefix: (batch, kv_heads, prefix_len ≤ 16, D) in the cache dtype, the cache's first tokens
  kept exactly (positions before the blocks; ``GEARConfig.prefix_tokens``).

Two launches, no atomics, deterministic:

1. ``_gear_split_kernel``, grid (splits, M-blocks, batch · kv_heads): the sequence is cut into
   units (each compressed block of B tokens, then the tail) dealt out to the splits in
   contiguous runs, so one decoded token fills the GPU (flash-decoding); the split count fills
   one wave at the autotune row's programs per SM. A program owns all
   q heads of one kv head (GQA: the G = q_heads / kv_heads heads × q_len rows of a kv group are
   contiguous in q) and keeps the running max / sum-exp / accumulator in fp32, then writes its
   partial (max, sum, acc) to a workspace;
2. ``_gear_combine_kernel``, grid (batch · kv_heads, M): merges one q row's split partials,
   all splits' weights at once (no serial rescaling chain), attends the prefix (a few tokens
   scored and weighed with the splits), adds the row's attention sink to the softmax sum where
   there are sinks (gpt-oss: a logit per q head without a value), and stores in q's dtype.

``CAUSAL`` (several new tokens, the cache's newest: assisted decoding, chunked prefill): row r's
query is token seq_len − q_len + r % q_len and sees no later position (``_causal_scores``, one
compare per score, compiled out of the one-token decode).
Rows that attend to nothing (a fully masked sequence) give 0, never NaN. Every product
accumulates in fp32; the compressed tiles are fp16 for fp16 and bf16 q (all they are built
from is fp16) and fp32 for fp32 q (exact "ieee" dots); the fp16 tail is read in q's dtype.
Codes become floats by the magic-number trick (OR into a power of two's mantissa, subtract
it), not by integer → float converts, and are unpacked by in-thread joins so a thread keeps
each word's codes adjacent (no shared-memory shuffle of single halves before the dots). Tiles
are BLOCK_N tokens, the largest power of two dividing B, at most 64: when a tile lies in one
key group (G ≥ BLOCK_N), that group's per-channel scale is folded into q,
q·Deq(k)ᵀ = (q ⊙ s)·(code − z)ᵀ; otherwise (e.g. the default G = 32, B = 64) the key tile is
dequantized like the values, (code − z) · s, in f16x2 arithmetic (fp32 for fp32 q):
one multiply more per two codes buys tiles twice as long, halving the per-tile work (softmax
step, factor loads, loop overhead) per token.
Each tile's inputs are loaded in two halves, keys' and values' (``_key_inputs``, ``_value_inputs``):
where they are used, or (autotune rows with LOAD_AHEAD) one tile ahead of that. One autotune
config under the interpreter, eight (programs per SM × load-ahead × warps × stages × register cap)
on a GPU.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowrank_ops.core.checks import check_device, check_dim, check_tensor
from lowrank_ops.kvcache.config import MAX_PREFIX_TOKENS

from ._codes import codes_to_f32, word_codes, word_codes_f16
from ._compile_check import CompileCase
from ._launch import forget, launch
from .lowrank import (INTERPRET, MIN_DOT, _configs, _dot, _dot_precision, _empty, _rank_pad, _sm_count, cdiv,
                      next_pow2)

if TYPE_CHECKING:
    from lowrank_ops.kvcache.format import GEARKV

KV_MAX_RANK = 64  # the split kernel keeps (BLOCK_M × R_PAD) and (R_PAD × D) factor tiles on chip
# lowrank_ops.kvcache.format.INT8_BASIS_SCALE (a test checks they agree), as a constexpr for the kernel
INT8_BASIS_SCALE = tl.constexpr(1.0 / 127)
_LOG2E = 1.4426950408889634
_MAX_BLOCK_M = 64  # q rows (heads of a kv group × q_len) per program; more rows -> more M-blocks

# --------------------------------------------------------------------------- config table
# Tiles are fixed by the format (BLOCK_N tokens, see _tile_tokens: one block or part of one);
# a GPU autotunes warps, pipeline depth and register cap over a handful of rows, the interpreter
# takes the first.
# The full configuration's loop needs ~220 registers per thread, which leaves two 4-warp
# programs per SM (eight warps to hide every load and dot latency); the capped rows trade a few
# spilled loop invariants (L1-resident reloads) for more warps per SM (docs/gear-speed.md). Eight
# warps split a tile's work less evenly (~40 % more instructions per token) but hide latency
# better, which a batch-1 step (a few tiles per program) may prefer. Each row also sets how many
# programs per SM its grid targets (the sequence split count, one wave at the occupancy its
# registers allow, see _split_count), so a row is timed at its own occupancy. LOAD_AHEAD rows load
# each tile's inputs one iteration ahead (_key_inputs / _value_inputs): their HBM latency hides
# behind the previous tile, for ~40-60 more instructions and up to 255 registers (too many for the
# capped rows, which would spill them); the others load where used and leave prefetching to
# Triton's pipeliner (num_stages). The last row is the former first row, kept to compare. The
# autotuner measures.
_SPLIT_NAMES = ("PROGRAMS_PER_SM", "LOAD_AHEAD")
_SPLIT_OPTIONS = ("num_warps", "num_stages", "maxnreg")
_SPLIT_TABLE = [
    # programs per SM, load ahead, warps, stages, register cap (None: the compiler's choice)
    (2, True, 4, 1, None) if INTERPRET else (2, True, 4, 2, None),
    (2, False, 4, 3, None),
    (1, True, 8, 2, None),
    (3, False, 4, 2, 168),
    (4, False, 4, 2, 128),
    (2, False, 8, 2, 128),
    (4, False, 4, 2, None),  # the launcher's former split count for every row: two waves of two
    (2, False, 4, 1, None) if INTERPRET else (2, False, 4, 2, None),  # the former first row
]
_MAX_PROGRAMS_PER_SM = max(row[0] for row in _SPLIT_TABLE)  # sizes the partials' workspace
_MAX_BLOCK_N = 64
MAX_SPLITS = 128  # the combine kernel reads every split's max as one vector
_COMBINE_CHUNK = 32  # splits merged per step of the combine kernel ((32 × D_PAD) fp32 tile)


# --------------------------------------------------------------------------- on-chip helpers
@triton.jit
def _tile_codes(words, BITS: tl.constexpr, D_PAD: tl.constexpr, dtype: tl.constexpr):
    """(BLOCK_N × D_PAD) codes of a tile's loaded (BLOCK_N × D_PAD · BITS / 32) words as floats,
    token-major; fp16 when ``dtype`` is fp16, made two at a time (``word_codes_f16``), else fp32."""
    if dtype == tl.float16:
        return word_codes_f16(words, BITS, D_PAD)
    else:
        return codes_to_f32(word_codes(words, BITS, D_PAD))


@triton.jit
def _add_outliers(x, idxs, vals):
    """x (BLOCK_N × D_PAD) + the outliers of each token row: ``idxs`` and ``vals`` are N_OUT
    (BLOCK_N) channel and value vectors as loaded (a token's channels are distinct).

    The outliers are selected into a zero tile by channel compare, a select chain, then added
    once. fp16 tiles select channel pairs: a token's outlier j becomes the 32-bit word holding
    its fp16 value in the half of its channel (bits 0-15 for even channels, 16-31 for odd) and
    is selected into the (BLOCK_N × D_PAD / 2) pair tile by pair index, so a compare and a select
    serve two channels, and the word tile is read as fp16 pairs for one f16x2 add. Two outliers of
    a token can share a pair; each word first ORs in the other half of any earlier outlier in
    its pair (per row, N_OUT² cheap steps), so the chain's last match holds both.
    """
    N_OUT: tl.constexpr = len(idxs)
    if N_OUT == 0:
        return x
    D_PAD: tl.constexpr = x.shape[1]
    if x.dtype == tl.float16:
        pair = tl.arange(0, D_PAD // 2)[None, :]
        out = tl.zeros([x.shape[0], D_PAD // 2], dtype=tl.int32)
        idx_prev = ()
        word_prev = ()
        for j in tl.static_range(N_OUT):
            idx = idxs[j].to(tl.int32)
            bits = vals[j].to(tl.int16, bitcast=True)
            word = (bits.to(tl.int32) & 0xFFFF) << ((idx & 1) * 16)
            for i in tl.static_range(j):
                word |= tl.where((idx_prev[i] >> 1) == (idx >> 1), word_prev[i], 0)
            out = tl.where(pair == (idx >> 1)[:, None], word[:, None], out)
            idx_prev = idx_prev + (idx,)
            word_prev = word_prev + (word,)
        halves = tl.join((out & 0xFFFF).to(tl.int16), (out >> 16).to(tl.int16)).to(tl.float16, bitcast=True)
        return x + tl.reshape(halves, (x.shape[0], D_PAD))
    else:
        offs_d = tl.arange(0, D_PAD)[None, :]
        out = tl.zeros(x.shape, dtype=x.dtype)
        for j in tl.static_range(N_OUT):
            out = tl.where(offs_d == idxs[j].to(tl.int32)[:, None], vals[j].to(x.dtype)[:, None], out)
        return x + out


@triton.jit
def _key_outlier_scores(q_rows_ptr, q_row0, M, idxs, vals, HEAD_DIM: tl.constexpr, M_REAL: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """(BLOCK_M × BLOCK_N) fp32 q·oᵀ, the key outliers' share of the scores, in the program's row
    order (q row q_row0 + j at tile row j · BLOCK_M / M_REAL, zeros between) and q's units as
    stored: q at each of a token's N_OUT outlier channels (a load from q's rows, L1-resident)
    times the outlier's value, summed, for the M_REAL rows that can be real only (a decode
    step's GQA group: 4 of the dot's 16), then spread to the tile rows by joins (_spread_columns) and
    turned. A load and an FMA per (real row, token, outlier), where adding the outliers into the
    key tile cost a compare and a select per (token, channel pair, outlier)."""
    rows = tl.minimum(q_row0 + tl.arange(0, M_REAL), M - 1)  # a row past M reads a real one; never stored
    corr = tl.zeros([idxs[0].shape[0], M_REAL], dtype=tl.float32)
    for j in tl.static_range(len(idxs)):
        q_at = tl.load(q_rows_ptr + rows[None, :] * HEAD_DIM + idxs[j].to(tl.int32)[:, None])
        corr += q_at.to(tl.float32) * vals[j].to(tl.float32)[:, None]
    return tl.trans(_spread_columns(corr, BLOCK_M))


@triton.jit
def _key_scores(q, s0, words, scale, zero, BITS: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_M × BLOCK_N) scores s0 + q Deq(codes)ᵀ of a tile from its loaded words and key
    statistics (``_key_inputs``): the tile lies in one key group (BLOCK_N ≤ GROUP; scale and zero
    are that group's (D_PAD) rows) or covers BLOCK_N / GROUP whole groups ((NG × D_PAD) rows);
    s0 (the outliers' share) is the dot's accumulator.

    In one group, its per-channel scale is folded into q instead of being applied to every code:
    q·Deq(k)ᵀ = (q ⊙ s)·(code − z)ᵀ, so the K tile is the unpacked codes minus the zero row
    (f16x2 arithmetic for fp16). Otherwise the group rows are broadcast over their tokens on chip
    and the tile is (code − z) · s.
    """
    code = _tile_codes(words, BITS, D_PAD, q.dtype)
    if BLOCK_N <= GROUP:
        k = (code - zero[None, :].to(code.dtype)).to(q.dtype)
        q = (q.to(tl.float32) * scale.to(tl.float32)[None, :]).to(q.dtype)
    else:
        NG: tl.constexpr = BLOCK_N // GROUP if BLOCK_N > GROUP else 1
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], (NG, BLOCK_N // NG, D_PAD)), (BLOCK_N, D_PAD))
        zero = tl.reshape(tl.broadcast_to(zero[:, None, :], (NG, BLOCK_N // NG, D_PAD)), (BLOCK_N, D_PAD))
        k = ((code - zero.to(code.dtype)) * scale.to(code.dtype)).to(q.dtype)
    return _dot(q, tl.trans(k), s0, DOT_PRECISION)


@triton.jit
def _value_tile(words, scale, zero, idxs, vals, BITS: tl.constexpr, GROUP: tl.constexpr, D_PAD: tl.constexpr,
                dtype: tl.constexpr):
    """V tile (BLOCK_N × D_PAD), Deq(codes) + outliers, from a tile's loaded words, per-token
    (BLOCK_N × D_PAD / GROUP) scale and zero of each channel group and outliers
    (``_value_inputs``; all zero at tokens past the tile's end and channels past HEAD_DIM).

    Token-major, the dot's natural right operand: a token is a row, so its per-token data is one
    value per row. The group statistics are broadcast over their channels on chip; for fp16,
    codes come two per instruction and (code − z) · s is three f16x2 operations per two codes
    (the magic number's subtraction, z's, the scale). The outliers (distinct channels per token)
    are added by :func:`_add_outliers`.
    """
    G_PAD: tl.constexpr = D_PAD // GROUP
    BLOCK_N: tl.constexpr = words.shape[0]
    code = _tile_codes(words, BITS, D_PAD, dtype)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, G_PAD, GROUP)), (BLOCK_N, D_PAD))
    zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (BLOCK_N, G_PAD, GROUP)), (BLOCK_N, D_PAD))
    x = (code - zero.to(code.dtype)) * scale.to(code.dtype)
    return _add_outliers(x, idxs, vals)


@triton.jit
def _factor_tile(x, dtype: tl.constexpr, INT8_FACTORS: tl.constexpr):
    """Loaded factor entries ``x`` as ``dtype``; int8 ones as their exact integers, for fp16
    without an integer → float convert: (x + 128) ORed into the mantissa of 1024, minus 1152."""
    if INT8_FACTORS and dtype == tl.float16:
        return ((x.to(tl.int16) + 128) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    else:
        return x.to(dtype)


# Tile inputs. Everything a compressed tile reads from memory, as stored, in two halves: the key
# side (used by the scores) and the value side (used after the softmax); zero when ``tile`` is not
# below ``tile_end`` (a load one tile past a run's end). With LOAD_AHEAD the split kernel issues
# both one tile before the math that uses them, so a tile's HBM latency hides behind the previous
# tile's work: Triton's own pipelining keeps only the dot-bound loads in flight (at two stages it
# waits for them at the top of the very iteration after the one that issued them, at its end),
# and the 1- and 2-byte outlier loads it never pipelines. Without it each half is loaded where
# it is used.
@triton.jit
def _tile_rows(tile, tile_end, BLOCK_N: tl.constexpr):
    """The tile's token positions and whether they are loaded (the tile is below tile_end)."""
    tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    return tok, tok < tile_end * BLOCK_N


@triton.jit
def _tile_side(codes_ptr, idx_ptr, val_ptr, a_ptr, tok, rows, N_OUT: tl.constexpr, BITS: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr,
               HAS_LR: tl.constexpr):
    """What keys and values share: the packed words (BLOCK_N × D_PAD · BITS / 32), N_OUT
    (channel, value) vectors, one per outlier slot, and the A rows (BLOCK_N × R_TILE)."""
    E: tl.constexpr = 32 // BITS
    offs_w = tl.arange(0, D_PAD // E)[None, :]
    words = tl.load(codes_ptr + tok[:, None] * (HEAD_DIM // E) + offs_w, mask=rows[:, None] & (offs_w < HEAD_DIM // E),
                    other=0)
    idxs, vals = (), ()
    for j in tl.static_range(N_OUT):
        idxs = idxs + (tl.load(idx_ptr + tok * N_OUT + j, mask=rows, other=0),)
        vals = vals + (tl.load(val_ptr + tok * N_OUT + j, mask=rows, other=0.0),)
    a = 0
    if HAS_LR:
        offs_r = tl.arange(0, R_TILE)[None, :]
        a = tl.load(a_ptr + tok[:, None] * R + offs_r, mask=rows[:, None] & (offs_r < R), other=0)
    return words, idxs, vals, a


@triton.jit
def _key_inputs(kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, mask_ptr, tile, tile_end, N_OUT: tl.constexpr,
                BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr, HAS_LR: tl.constexpr,
                HAS_MASK: tl.constexpr):
    """The key side of a tile (_tile_side), its key statistics ((D_PAD) rows of its group, or
    (NG × D_PAD) rows of its NG groups) and its mask bytes."""
    tok, rows = _tile_rows(tile, tile_end, BLOCK_N)
    words, idxs, vals, a = _tile_side(kc_ptr, koi_ptr, kov_ptr, ka_ptr, tok, rows, N_OUT, BITS, HEAD_DIM, D_PAD, R,
                                      R_TILE, HAS_LR)
    offs_d = tl.arange(0, D_PAD)
    d_mask = (offs_d < HEAD_DIM) & (tl.full([D_PAD], tile, tl.int32) < tile_end)
    if BLOCK_N <= GROUP:
        group = (tile * BLOCK_N // GROUP) * HEAD_DIM + offs_d
        scale = tl.load(ks_ptr + group, mask=d_mask, other=0.0)
        zero = tl.load(kz_ptr + group, mask=d_mask, other=0.0)
    else:
        NG: tl.constexpr = BLOCK_N // GROUP if BLOCK_N > GROUP else 1
        group = ((tile * BLOCK_N // GROUP) + tl.arange(0, NG))[:, None] * HEAD_DIM + offs_d[None, :]
        scale = tl.load(ks_ptr + group, mask=d_mask[None, :], other=0.0)
        zero = tl.load(kz_ptr + group, mask=d_mask[None, :], other=0.0)
    keep = 0
    if HAS_MASK:
        keep = tl.load(mask_ptr + tok, mask=rows, other=0)
    return words, scale, zero, idxs, vals, a, keep


@triton.jit
def _value_inputs(vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, tile, tile_end, N_OUT: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, R: tl.constexpr, R_TILE: tl.constexpr, HAS_LR: tl.constexpr):
    """The value side of a tile (_tile_side) and its per-token (BLOCK_N × D_PAD / GROUP) scale and
    zero of each channel group."""
    tok, rows = _tile_rows(tile, tile_end, BLOCK_N)
    words, idxs, vals, a = _tile_side(vc_ptr, voi_ptr, vov_ptr, va_ptr, tok, rows, N_OUT, BITS, HEAD_DIM, D_PAD, R,
                                      R_TILE, HAS_LR)
    offs_g = tl.arange(0, D_PAD // GROUP)[None, :]
    stats = tok[:, None] * (HEAD_DIM // GROUP) + offs_g
    g_mask = rows[:, None] & (offs_g < HEAD_DIM // GROUP)
    scale = tl.load(vs_ptr + stats, mask=g_mask, other=0.0)
    zero = tl.load(vz_ptr + stats, mask=g_mask, other=0.0)
    return words, scale, zero, idxs, vals, a


@triton.jit
def _spread_columns(x, WIDTH: tl.constexpr):
    """(rows × n) -> (rows × WIDTH), n and WIDTH powers of two: column c moves to c · WIDTH / n,
    zeros between (joins: no shared memory). Lets small operands be built at their own width:
    int8 rank factors (both operands of a rank-space dot spread alike, so the dot's order over
    the padded rank axis does not matter) and the key outliers' scores of the real q rows."""
    if x.shape[1] >= WIDTH:
        return x
    else:
        return _spread_columns(tl.reshape(tl.join(x, tl.zeros_like(x)), (x.shape[0], 2 * x.shape[1])), WIDTH)


@triton.jit
def _rank_scales(scale_ptr, blk, offs_r, r_mask, R: tl.constexpr):
    """fp32 (R_PAD) column scales of block ``blk``'s int8 A, times B̂'s 1/127: the int8 factors'
    whole scaling, applied to a (BLOCK_M × R_PAD) rank-space tile."""
    return tl.load(scale_ptr + blk * R + offs_r, mask=r_mask, other=0.0) * INT8_BASIS_SCALE


@triton.jit
def _masked_scores(s, valid, mask_bytes, HAS_MASK: tl.constexpr):
    """Scores; -inf where not ``valid`` or, with a mask, where its loaded byte is 0."""
    keep = valid
    if HAS_MASK:
        keep = keep & (mask_bytes != 0)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def _causal_scores(s, pos, q_rows, SEQ_LEN, Q_LEN):
    """Scores; -inf where key position ``pos`` lies after the query of row ``q_rows``: the q_len
    queries are the cache's newest tokens, row r's is token SEQ_LEN − Q_LEN + r % Q_LEN."""
    newest = SEQ_LEN - Q_LEN + q_rows % Q_LEN
    return tl.where(pos[None, :] <= newest[:, None], s, float("-inf"))


@triton.jit
def _online_softmax(s, m_i, l_i, acc):
    """One flash-attention step in base 2: new running max, rescaled sum and accumulator, and the
    tile's probabilities p. A row that has seen only -inf keeps max -inf and gets p = 0 (the max
    is read as 0 there, so no inf - inf)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, m_new, l_i, acc * alpha[:, None]


# --------------------------------------------------------------------------- step 1: split partials
# Grid (splits, M-blocks, batch · kv_heads). Program (sp, mb, bh) owns q rows
# [mb·BLOCK_M, +BLOCK_M) of kv group bh (M = (q_heads / kv_heads) · q_len rows, contiguous in q:
# heads of one kv head are adjacent) and the sp-th contiguous run of sequence units (compressed
# blocks of B tokens, then the tail as one more unit). All tensors are contiguous; the program
# offsets every pointer to its (batch, kv head) slab once, then walks its BLOCK_N-token tiles in
# one loop (BLOCK_N divides B: a tile never straddles a block; it lies in one key group or covers
# whole ones):
# qB_j = q B_kj of the tile's block j (rank space, rounded to the tile dtype), scores
# from the codes (scale folded into q, or applied on chip) + the outliers' q[idx]·val + qB_j A_kᵀ,
# masked, online softmax; then the V tile (BLOCK_N × D, token-major so per-token data is one
# value per row) dequantized + outliers, acc += p V + (p A_v) B_vjᵀ. Only compact tiles
# leave memory (packed words, one scale row per group / per token); codes and scales are
# expanded in registers. The tail tile is read as it is. The partial (max, sum-exp, acc) of the
# M real rows goes to the fp32 workspace part[bh, split, m(, d)].
@triton.autotune(configs=_configs(_SPLIT_TABLE, _SPLIT_NAMES, _SPLIT_OPTIONS),
                  key=["BLOCK_TOKENS", "HEAD_DIM", "N_OUT", "BITS", "GROUP", "BLOCK_M", "R", "R_PAD", "HAS_LR",
                       "INT8_FACTORS", "DOT_PRECISION", "BLOCK_N", "M_REAL", "WIDE_GRID"])
@triton.jit(do_not_specialize=["WIDE_GRID"])  # narrow and wide grids share one binary per row
def _gear_split_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, kb_ptr, kas_ptr,
    vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, vb_ptr, vas_ptr,
    tk_ptr, tv_ptr, mask_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    H_KV, M, SEQ_LEN, NBLOCKS, TAIL_LEN, UNITS, WIDE_GRID, qk_scale, Q_LEN, PREFIX_LEN,
    N_OUT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, R: tl.constexpr, R_LOAD: tl.constexpr, R_PAD: tl.constexpr,
    HAS_LR: tl.constexpr, INT8_FACTORS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, M_REAL: tl.constexpr, CAUSAL: tl.constexpr,
    # the autotune row's: programs per SM (sets the grid's split count; unused here; a constexpr:
    # the interpreter hands a grid function its runtime integers converted to tensors), and
    # whether each tile's inputs are loaded one iteration ahead (_key_inputs, _value_inputs)
    PROGRAMS_PER_SM: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):
    split = tl.program_id(0)
    # tile row i holds q row q_row0 + i // SPREAD when i % SPREAD == 0 (M_REAL = the rows that can
    # be real, a power of two <= BLOCK_M): rows are independent, and the key outliers' scores
    # are computed on the M_REAL rows alone and spread to these positions (_key_outlier_scores)
    SPREAD: tl.constexpr = BLOCK_M // M_REAL
    q_row0 = tl.program_id(1) * M_REAL
    offs_m = q_row0 + tl.arange(0, BLOCK_M) // SPREAD
    spread_ok = (tl.arange(0, BLOCK_M) % SPREAD) == 0
    bh = tl.program_id(2).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    T = NBLOCKS * BLOCK_TOKENS
    WORDS: tl.constexpr = HEAD_DIM * BITS // 32
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    # int8 factors are loaded and converted at their own width (R_LOAD, a power of two >= R) and
    # padded to the dot's after conversion (_spread_columns); fp16 ones load padded (masked) directly
    R_TILE: tl.constexpr = R_LOAD if INT8_FACTORS else R_PAD
    offs_r = tl.arange(0, R_TILE)
    r_mask = offs_r < R
    # (batch, kv head) slabs
    kc_ptr += bh * T * WORDS
    vc_ptr += bh * T * WORDS
    ks_ptr += bh * (T // GROUP) * HEAD_DIM
    kz_ptr += bh * (T // GROUP) * HEAD_DIM
    vs_ptr += bh * T * (HEAD_DIM // GROUP)
    vz_ptr += bh * T * (HEAD_DIM // GROUP)
    koi_ptr += bh * T * N_OUT
    kov_ptr += bh * T * N_OUT
    voi_ptr += bh * T * N_OUT
    vov_ptr += bh * T * N_OUT
    ka_ptr += bh * T * R
    va_ptr += bh * T * R
    kb_ptr += bh * NBLOCKS * HEAD_DIM * R
    vb_ptr += bh * NBLOCKS * HEAD_DIM * R
    kas_ptr += bh * NBLOCKS * R
    vas_ptr += bh * NBLOCKS * R
    tk_ptr += bh * BLOCK_TOKENS * HEAD_DIM
    tv_ptr += bh * BLOCK_TOKENS * HEAD_DIM
    # SEQ_LEN counts blocks and tail (positions from the first block on); the key mask's rows also
    # hold the PREFIX_LEN positions before them, which the combine kernel attends
    mask_ptr += (bh // H_KV) * (PREFIX_LEN + SEQ_LEN) + PREFIX_LEN

    q_rows_ptr = q_ptr + bh * M * HEAD_DIM
    m_mask = (offs_m < M) & spread_ok
    q = tl.load(q_rows_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)
    # The compressed tiles run in fp16 for fp16 and bf16 q: their codes, scales, outliers and
    # factors are fp16 already, and bf16 tiles would have to be formed in fp32 (the interpreter
    # lane has no bf16 arithmetic). q meets them prescaled by the softmax scale and, for fp16, by
    # a power of two per row that brings its largest entry to (1/2, 1] (any bf16 q fits fp16
    # then, and q ⊙ key scale cannot overflow); the scores are multiplied back in fp32.
    cdtype: tl.constexpr = tl.float32 if dtype == tl.float32 else tl.float16
    qf = q.to(tl.float32) * qk_scale
    row_exp = tl.zeros([BLOCK_M], dtype=tl.float32)
    if cdtype == tl.float16:
        row_exp = tl.ceil(tl.log2(tl.maximum(tl.max(tl.abs(qf), axis=1), 1e-30)))
    q_mul = qk_scale * tl.exp2(-row_exp)[:, None]  # q's prescale (the key outliers read q from memory)
    qc = (q.to(tl.float32) * q_mul).to(cdtype)
    row_scale = tl.exp2(row_exp)[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    per_split = tl.cdiv(UNITS, tl.num_programs(0))  # the grid's splits (the row's, or the caller's count)
    first = split * per_split
    last = tl.minimum(first + per_split, UNITS)
    # one flat loop over the run's BLOCK_N-token tiles (BLOCK_N divides B: a tile lies in one block
    # and one key group); its inputs loaded where used or, LOAD_AHEAD, one tile ahead
    TILES: tl.constexpr = BLOCK_TOKENS // BLOCK_N
    tile_end = tl.minimum(last, NBLOCKS) * TILES
    keys_ahead, values_ahead = 0, 0  # LOAD_AHEAD: the next tile's inputs, loaded while this one computes
    if LOAD_AHEAD:
        keys_ahead = _key_inputs(kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, mask_ptr, first * TILES, tile_end,
                                 N_OUT, BITS, GROUP, HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR, HAS_MASK)
        values_ahead = _value_inputs(vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, first * TILES, tile_end, N_OUT,
                                     BITS, GROUP, HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR)
    for tile in range(first * TILES, tile_end):
        if LOAD_AHEAD:
            keys, values = keys_ahead, values_ahead
            keys_ahead = _key_inputs(kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, mask_ptr, tile + 1, tile_end,
                                     N_OUT, BITS, GROUP, HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR, HAS_MASK)
            values_ahead = _value_inputs(vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, tile + 1, tile_end, N_OUT,
                                         BITS, GROUP, HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR)
        else:  # loaded where used; Triton's pipeliner prefetches the dot-bound ones (num_stages)
            keys = _key_inputs(kc_ptr, ks_ptr, kz_ptr, koi_ptr, kov_ptr, ka_ptr, mask_ptr, tile, tile_end, N_OUT,
                               BITS, GROUP, HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR, HAS_MASK)
        key_words, key_scale, key_zero, key_idx, key_val, key_a, keep = keys
        s0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if N_OUT > 0:  # the key outliers' scores start the dot's accumulator (in its layout)
            s0 = _key_outlier_scores(q_rows_ptr, q_row0, M, key_idx, key_val, HEAD_DIM, M_REAL, BLOCK_M) * q_mul
        s = _key_scores(qc, s0, key_words, key_scale, key_zero, BITS, GROUP, D_PAD, BLOCK_N, DOT_PRECISION)
        if HAS_LR:  # (q B_kj) A_kᵀ with block j = tile // TILES; B_kj, B_vj are L1/L2 hits after the first tile
            blk = tile // TILES
            # int8 Â and B̂ enter as exact integers; their scales go on q B̂ (rank space)
            bk = tl.load(kb_ptr + (blk * HEAD_DIM + offs_d[:, None]) * R + offs_r[None, :],
                         mask=d_mask[:, None] & r_mask[None, :], other=0)
            bk = _spread_columns(_factor_tile(bk, cdtype, INT8_FACTORS), R_PAD)
            qb = _dot(qc, bk, tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32), DOT_PRECISION)
            if INT8_FACTORS:
                qb = qb * _spread_columns(_rank_scales(kas_ptr, blk, offs_r, r_mask, R)[None, :], R_PAD)
            a = _spread_columns(_factor_tile(key_a, cdtype, INT8_FACTORS), R_PAD)
            s = _dot(qb.to(cdtype), tl.trans(a), s, DOT_PRECISION)
        s = _masked_scores(s * row_scale, tl.full([BLOCK_N], True, tl.int1), keep, HAS_MASK)
        if CAUSAL:
            s = _causal_scores(s, tile * BLOCK_N + tl.arange(0, BLOCK_N), offs_m, SEQ_LEN, Q_LEN)
        p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
        p = p.to(cdtype)
        if not LOAD_AHEAD:
            values = _value_inputs(vc_ptr, vs_ptr, vz_ptr, voi_ptr, vov_ptr, va_ptr, tile, tile_end, N_OUT, BITS, GROUP,
                                   HEAD_DIM, D_PAD, BLOCK_N, R, R_TILE, HAS_LR)
        value_words, value_scale, value_zero, value_idx, value_val, value_a = values
        v = _value_tile(value_words, value_scale, value_zero, value_idx, value_val, BITS, GROUP, D_PAD, cdtype)
        acc = _dot(p, v.to(cdtype), acc, DOT_PRECISION)
        if HAS_LR:  # (p A_v) B_vjᵀ
            av = _spread_columns(_factor_tile(value_a, cdtype, INT8_FACTORS), R_PAD)
            pa = _dot(p, av, tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32), DOT_PRECISION)
            if INT8_FACTORS:  # the scales on P Â (rank space)
                pa = pa * _spread_columns(_rank_scales(vas_ptr, blk, offs_r, r_mask, R)[None, :], R_PAD)
            if INT8_FACTORS:  # converted compact, padded, then turned (R_PAD × D)
                bv = tl.load(vb_ptr + (blk * HEAD_DIM + offs_d[:, None]) * R + offs_r[None, :],
                             mask=d_mask[:, None] & r_mask[None, :], other=0)
                bvt = tl.trans(_spread_columns(_factor_tile(bv, cdtype, INT8_FACTORS), R_PAD))
            else:
                bvt = tl.load(vb_ptr + (blk * HEAD_DIM + offs_d[None, :]) * R + offs_r[:, None],
                              mask=d_mask[None, :] & r_mask[:, None], other=0)
                bvt = _factor_tile(bvt, cdtype, INT8_FACTORS)
            acc = _dot(pa.to(cdtype), bvt, acc, DOT_PRECISION)
    if (first <= NBLOCKS) & (last > NBLOCKS):  # this run holds the tail unit
        for n0 in range(0, TAIL_LEN, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < TAIL_LEN
            kt = tl.load(tk_ptr + offs_n[None, :] * HEAD_DIM + offs_d[:, None], mask=valid[None, :] & d_mask[:, None],
                         other=0.0)
            s = _dot(q, kt.to(dtype), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
            keep = 0
            if HAS_MASK:
                keep = tl.load(mask_ptr + T + offs_n, mask=valid, other=0)
            s = _masked_scores(s * qk_scale, valid, keep, HAS_MASK)
            if CAUSAL:
                s = _causal_scores(s, T + offs_n, offs_m, SEQ_LEN, Q_LEN)
            p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc)
            v = tl.load(tv_ptr + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None] & d_mask[None, :],
                        other=0.0)
            acc = _dot(p.to(dtype), v.to(dtype), acc, DOT_PRECISION)

    rows = (bh * tl.num_programs(0) + split) * M + offs_m
    tl.store(part_m_ptr + rows, m_i, mask=m_mask)
    tl.store(part_l_ptr + rows, l_i, mask=m_mask)
    tl.store(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=m_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- step 2: combine splits
# Grid (batch · kv_heads, M): program (bh, m) merges the N_SPLIT partials of one q row (fp32,
# L2-resident, written just before). The splits' maxima come in as one (S_PAD) vector, so the
# global max and every split's weight 2^(m_s − max) are known at once; the (S_CHUNK × D_PAD)
# partial-accumulator tiles are then summed with those weights, S_CHUNK splits per step, with no
# step depending on the one before (no serial rescaling chain). With HAS_SINK the row's sink
# (a base-2 logit, (batch · kv_heads, M) fp32) adds its weight to the sum only. With HAS_PREFIX
# the cache's uncompressed prefix (positions 0 … PREFIX_LEN − 1, (batch · kv_heads, PREFIX_LEN,
# D) in the cache's dtype, which the split kernel does not read) is attended here: its keys as
# one (P_PAD × D_PAD) fp32 tile scored against the row's q (fp32, the softmax scale in
# qk_scale), under the key mask and the causal order, its scores joining the splits' maxima and
# its values the weighted sum. A row whose every key was masked has sum 0 (or the sink's weight
# alone) and is written as 0; the output is stored in its dtype.
@triton.jit
def _gear_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, sink_ptr, q_ptr, pk_ptr, pv_ptr, mask_ptr, out_ptr, M, N_SPLIT,
    PREFIX_LEN, H_KV, SEQ_LEN, Q_LEN, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, S_CHUNK: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_PREFIX: tl.constexpr, P_PAD: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    offs_s = tl.arange(0, S_PAD)
    m_all = tl.load(part_m_ptr + (bh * N_SPLIT + offs_s) * M + row, mask=offs_s < N_SPLIT, other=float("-inf"))
    m_g = tl.max(m_all, axis=0)
    if HAS_PREFIX:
        offs_p = tl.arange(0, P_PAD)
        p_ok = offs_p < PREFIX_LEN
        if HAS_MASK:
            p_ok &= tl.load(mask_ptr + (bh // H_KV) * SEQ_LEN + offs_p, mask=p_ok, other=0) != 0
        if CAUSAL:  # row's query is the cache's token SEQ_LEN − Q_LEN + row % Q_LEN
            p_ok &= offs_p <= SEQ_LEN - Q_LEN + row % Q_LEN
        prefix_rows = (bh * PREFIX_LEN + offs_p[:, None]) * HEAD_DIM + offs_d[None, :]
        p_tile_ok = p_ok[:, None] & d_mask[None, :]
        q_row = tl.load(q_ptr + (bh * M + row) * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        keys = tl.load(pk_ptr + prefix_rows, mask=p_tile_ok, other=0.0).to(tl.float32)
        s_p = tl.where(p_ok, tl.sum(keys * q_row[None, :], axis=1) * qk_scale, float("-inf"))
        m_g = tl.maximum(m_g, tl.max(s_p, axis=0))
    m_safe = tl.where(m_g == float("-inf"), 0.0, m_g)
    l_g = 0.0
    if HAS_SINK:  # a sink far above every score gives l_g = inf: the row's true output, 0
        l_g = tl.exp2(tl.load(sink_ptr + bh * M + row) - m_safe)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    if HAS_PREFIX:
        w_p = tl.exp2(s_p - m_safe)
        l_g += tl.sum(w_p, axis=0)
        acc += tl.sum(w_p[:, None] * tl.load(pv_ptr + prefix_rows, mask=p_tile_ok, other=0.0).to(tl.float32), axis=0)
    for s0 in tl.static_range(0, S_PAD, S_CHUNK):
        offs_c = s0 + tl.arange(0, S_CHUNK)
        c_mask = offs_c < N_SPLIT
        rows = (bh * N_SPLIT + offs_c) * M + row
        w = tl.exp2(tl.load(part_m_ptr + rows, mask=c_mask, other=float("-inf")) - m_safe)
        l_g += tl.sum(w * tl.load(part_l_ptr + rows, mask=c_mask, other=0.0), axis=0)
        part = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=c_mask[:, None] & d_mask[None, :],
                       other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
    out = acc / tl.where(l_g > 0.0, l_g, 1.0)
    tl.store(out_ptr + (bh * M + row) * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# --------------------------------------------------------------------------- launcher
def _tile_tokens(buffer_tokens: int) -> int:
    """Tokens per tile: the largest power of two dividing B, at most 64. Tiles never straddle a
    block, and since the key group size G (a power of two) divides B, a tile lies in one key group
    or covers whole ones; B = 48 (G = 16) gives 16-token tiles."""
    return min(buffer_tokens & -buffer_tokens, _MAX_BLOCK_N)


def _even_splits(units: int, splits: int) -> int:
    """At most ``splits`` (and MAX_SPLITS) splits of cdiv(units, splits) units each, none empty."""
    splits = max(1, min(units, MAX_SPLITS, splits))
    return cdiv(units, cdiv(units, splits))


def _split_count(units: int, columns: int, programs_per_sm: int, device: torch.device) -> int:
    """Sequence splits so that (splits × columns) programs fill one wave of ``programs_per_sm``
    per SM (an autotune row's occupancy: the dependent load → unpack → dot chain needs every
    resident warp, and a second, partial wave would idle most SMs); non-decreasing in
    ``programs_per_sm``."""
    return _even_splits(units, programs_per_sm * _sm_count(device) // columns)


@contextlib.contextmanager
def pin_split_row(row: int) -> Iterator[triton.Config]:
    """Run the split kernel with autotune row ``row`` of ``_SPLIT_TABLE`` only (its warps, stages,
    register cap and split count; under the interpreter only the split count matters), for tests
    that check every row and for profiling one; restores the table and the autotuner's choices."""
    kernel = _gear_split_kernel
    config = _configs(_SPLIT_TABLE, _SPLIT_NAMES, _SPLIT_OPTIONS, every_row=True)[row]
    saved_configs, saved_cache = kernel.configs, dict(kernel.cache)
    kernel.configs = [config]
    kernel.cache.clear()
    forget(kernel)
    try:
        yield config
    finally:
        kernel.configs = saved_configs
        kernel.cache.clear()
        kernel.cache.update(saved_cache)
        forget(kernel)


def last_split_config() -> Optional[str]:
    """The autotune row (programs per SM, warps, stages, register cap) the last launch of the split
    kernel ran with, as Triton prints it; None before one. The benchmark records it next to each
    time."""
    best = getattr(_gear_split_kernel, "best_config", None)
    return None if best is None else str(best)


def gear_decode_attention(
    q: Tensor, kv: "GEARKV", key_mask: Optional[Tensor], scale: Optional[float], *, causal: bool = False,
    sinks: Optional[Tensor] = None, num_splits: Optional[int] = None, tile_tokens: Optional[int] = None,
) -> Tensor:
    """Decode attention of ``q`` (batch, q_heads, q_len, head_dim) over every cached token of the
    GEAR cache ``kv`` (a ``lowrank_ops.kvcache.GEARKV``), read in its compressed form.

    ``key_mask``: optional bool (batch, seq_len), True = attend; ``scale``: score scale, None for
    head_dim ** -0.5. q_heads must be a multiple of kv_heads (GQA). ``causal``: the q_len queries
    are the cache's newest tokens, query i sees positions ≤ seq_len − q_len + i (else every
    query sees every cached token). ``sinks``: optional (q_heads,) attention-sink logits (one more
    softmax term per row, without a value). Returns (batch, q_heads, q_len, head_dim) in q's dtype;
    a row with every key masked out is 0. ``num_splits`` overrides the sequence split count (tests), and
    ``tile_tokens`` the tokens per tile (a power of two dividing B, at most 64; tests and
    ``bench/kernel_profile.py``: 32-token tiles at G = 32 fold the key scale into q).
    """
    check_tensor("q", q, ndim=4)
    cfg = kv.config
    batch, q_heads, q_len, head_dim = q.shape
    check_dim("q", q, 0, kv.batch, "batch of the cache")
    check_dim("q", q, 3, kv.head_dim, "head_dim of the cache")
    if q_heads % kv.kv_heads:
        raise ValueError(
            f"q: expected q_heads (dim 1) a multiple of the cache's kv_heads {kv.kv_heads}, got shape {tuple(q.shape)}")
    check_device("q", q, kv.device, "the cache")
    seq_len = kv.seq_len
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,))
        check_dim("key_mask", key_mask, 0, batch, "batch")
        check_dim("key_mask", key_mask, 1, seq_len, "cached tokens")
        check_device("key_mask", key_mask, q.device, "q")
    if causal and q_len > seq_len:
        raise ValueError(f"q: causal queries are the cache's newest tokens, expected q_len <= seq_len={seq_len}, "
                         f"got shape {tuple(q.shape)}")
    if cfg.rank > KV_MAX_RANK:
        raise ValueError(f"kv: the Triton decode kernel supports rank <= {KV_MAX_RANK}, got {cfg.rank}")
    if sinks is not None:
        check_tensor("sinks", sinks, ndim=1)
        check_dim("sinks", sinks, 0, q_heads, "q_heads")
        check_device("sinks", sinks, q.device, "q")
    if scale is None:
        scale = head_dim**-0.5
    block_n = _tile_tokens(cfg.buffer_tokens)
    if tile_tokens is not None:
        if tile_tokens not in (16, 32, 64) or cfg.buffer_tokens % tile_tokens:
            raise ValueError(f"tile_tokens: expected 16, 32 or 64 dividing buffer_tokens={cfg.buffer_tokens}, "
                             f"got {tile_tokens!r}")
        block_n = tile_tokens

    q = q.contiguous()
    t = {name: x.contiguous() for name, x in kv.tensors().items()}  # no-ops for the format's own tensors
    kv_heads, nblocks, tail_len, rank, prefix_len = kv.kv_heads, kv.nblocks, kv.tail_len, cfg.rank, kv.prefix_len
    n_out = t["key_out_idx"].shape[-1]
    m = (q_heads // kv_heads) * q_len
    block_m = min(max(MIN_DOT, next_pow2(m)), _MAX_BLOCK_M)
    m_blocks = cdiv(m, block_m)
    d_pad = max(MIN_DOT, next_pow2(head_dim))
    units = max(1, nblocks + (tail_len > 0))  # (a cache of prefix tokens only: one split that reads nothing)
    columns = batch * kv_heads * m_blocks
    fixed = _even_splits(units, num_splits) if num_splits is not None else None

    def splits_of(programs_per_sm: int) -> int:
        return fixed or _split_count(units, columns, programs_per_sm, q.device)

    # the workspace holds the most splits any row may take; the kernel writes the first ones.
    # WIDE_GRID (an autotune key, unused by the body): at least half as many columns as SMs, so
    # splits are few and long (issue-bound, e.g. batch 16), else many and short (latency-bound,
    # batch 1); the autotuner keeps a row for each
    rows = batch * kv_heads * splits_of(_MAX_PROGRAMS_PER_SM) * m
    part_m = _empty((rows,), torch.float32, q.device)
    part_l = _empty((rows,), torch.float32, q.device)
    part_acc = _empty((rows, head_dim), torch.float32, q.device)
    dummy = t["key_codes"]  # pointer for absent tensors (their branches are compiled out)
    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else dummy
    has_lr = rank > 0
    outl = [t[n] if n_out else dummy for n in ("key_out_idx", "key_out_val", "value_out_idx", "value_out_val")]
    int8_factors = has_lr and cfg.factor_bits == 8
    lr = [t[n] if has_lr else dummy for n in ("key_lr_a", "key_lr_b", "value_lr_a", "value_lr_b")]
    lr_scale = [t[n] if int8_factors else dummy for n in ("key_lr_scale", "value_lr_scale")]
    launch(_gear_split_kernel, lambda meta: (splits_of(meta["PROGRAMS_PER_SM"]), m_blocks, batch * kv_heads),
        q, t["key_codes"], t["key_scale"], t["key_zero"], outl[0], outl[1], lr[0], lr[1], lr_scale[0],
        t["value_codes"], t["value_scale"], t["value_zero"], outl[2], outl[3], lr[2], lr[3], lr_scale[1],
        t["tail_keys"], t["tail_values"], mask, part_m, part_l, part_acc,
        kv_heads, m, seq_len - prefix_len, nblocks, tail_len, units, int(2 * columns >= _sm_count(q.device)),
        float(scale) * _LOG2E, q_len, prefix_len, N_OUT=n_out, BITS=cfg.bits, GROUP=cfg.group_size, BLOCK_TOKENS=cfg.buffer_tokens, HEAD_DIM=head_dim,
        D_PAD=d_pad, BLOCK_M=block_m, R=rank, R_LOAD=next_pow2(max(rank, 1)), R_PAD=_rank_pad(max(rank, 1)),
        HAS_LR=has_lr, INT8_FACTORS=int8_factors,
        HAS_MASK=key_mask is not None,
        DOT_PRECISION=_dot_precision(q.dtype), BLOCK_N=block_n,
        M_REAL=min(block_m, next_pow2(m)),  # the q rows a program can hold (4 of 16 for a GQA-4 decode step)
        CAUSAL=causal and q_len > 1,
    )
    splits = splits_of(_gear_split_kernel.best_config.kwargs["PROGRAMS_PER_SM"])  # the row it ran with
    out = _empty((batch, q_heads, q_len, head_dim), q.dtype, q.device)
    s_pad = next_pow2(splits)
    launch(_gear_combine_kernel, (batch * kv_heads, m),
        part_m, part_l, part_acc, part_m if sinks is None else _sink_rows(sinks, batch, kv_heads, q_len), q,
        t["prefix_keys"] if prefix_len else dummy, t["prefix_values"] if prefix_len else dummy, mask, out, m, splits,
        prefix_len, kv_heads, seq_len, q_len, float(scale) * _LOG2E,
        HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=s_pad, S_CHUNK=min(s_pad, _COMBINE_CHUNK), HAS_SINK=sinks is not None,
        HAS_PREFIX=prefix_len > 0, P_PAD=MAX_PREFIX_TOKENS, HAS_MASK=key_mask is not None,
        CAUSAL=causal and q_len > 1,
    )
    return out


def _sink_rows(sinks: Tensor, batch: int, kv_heads: int, q_len: int) -> Tensor:
    """Per-head sink logits (q_heads,) as the combine kernel's base-2 (batch · kv_heads, M) rows:
    row g · q_len + i of kv head h is query head h · G + g."""
    per_row = (sinks.float() * _LOG2E).reshape(kv_heads, -1, 1).expand(-1, -1, q_len).reshape(kv_heads, -1)
    return per_row.repeat(batch, 1).contiguous()


# --------------------------------------------------------------------------- compile lane
# 2 and 4 bits, head_dim 64 and 128, outliers and low rank (fp16 and int8 factors) each on and
# off, fp16 and bf16 q, one causal chunk, 64-token tiles across two key groups and 32-token
# tiles in one, each value in at least one case (every case compiles in seconds); one fp32 case
# (exact dots) for the all-configs fp32 run; the combine kernel per output dtype.
def _compile_cases() -> list[CompileCase]:
    cases = []
    ints = dict(H_KV="i32", M="i32", SEQ_LEN="i32", NBLOCKS="i32", TAIL_LEN="i32", UNITS="i32",
                WIDE_GRID="i32", qk_scale="fp32", Q_LEN="i32", PREFIX_LEN="i32")
    for dtype, bits, head_dim, has_out, lr, block_n in (
        ("fp16", 4, 128, True, "fp16", 64), ("bf16", 2, 128, False, None, 64), ("fp16", 2, 64, True, None, 32),
        ("bf16", 4, 64, False, "i8", 32), ("fp32", 4, 128, True, "fp16", 64), ("fp16", 2, 128, True, "i8", 64),
    ):
        f = f"*{lr or 'fp16'}"
        packed = dict(kc_ptr="*i32", ks_ptr="*fp16", kz_ptr="*fp16", koi_ptr="*u8", kov_ptr="*fp16", ka_ptr=f,
                      kb_ptr=f, kas_ptr="*fp32", vc_ptr="*i32", vs_ptr="*fp16", vz_ptr="*fp16", voi_ptr="*u8",
                      vov_ptr="*fp16", va_ptr=f, vb_ptr=f, vas_ptr="*fp32")
        p = f"*{dtype}"
        sig = dict(q_ptr=p, **packed, tk_ptr=p, tv_ptr=p, mask_ptr="*u8", part_m_ptr="*fp32", part_l_ptr="*fp32",
                   part_acc_ptr="*fp32", **ints)
        flags = dict(N_OUT=round(0.02 * head_dim) if has_out else 0, BITS=bits, GROUP=32, BLOCK_TOKENS=64,
                     HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=16, R=4 if lr else 0, R_LOAD=4, R_PAD=16,
                     HAS_LR=lr is not None, INT8_FACTORS=lr == "i8", BLOCK_N=block_n, HAS_MASK=True,
                     M_REAL=16 if dtype == "fp32" or head_dim == 64 else 4,
                     CAUSAL=dtype == "bf16" and lr == "i8",
                     DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        name = f"gear_split[{dtype},{bits}b,d{head_dim},n{block_n}{',out' if has_out else ''}{f',lr-{lr}' if lr else ''}]"
        cases.append(CompileCase(name, _gear_split_kernel, sig, flags))
    for dtype in ("fp16", "bf16", "fp32"):  # bf16 with a sink, fp16 with a prefix under a mask, causal
        cases.append(CompileCase(
            f"gear_combine[{dtype}{',prefix' if dtype == 'fp16' else ''}]", _gear_combine_kernel,
            dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", sink_ptr="*fp32", q_ptr=f"*{dtype}",
                 pk_ptr=f"*{dtype}", pv_ptr=f"*{dtype}", mask_ptr="*u8", out_ptr=f"*{dtype}", M="i32", N_SPLIT="i32",
                 PREFIX_LEN="i32", H_KV="i32", SEQ_LEN="i32", Q_LEN="i32", qk_scale="fp32"),
            dict(HEAD_DIM=128, D_PAD=128, S_PAD=128, S_CHUNK=_COMBINE_CHUNK, HAS_SINK=dtype == "bf16",
                 HAS_PREFIX=dtype == "fp16", P_PAD=MAX_PREFIX_TOKENS, HAS_MASK=dtype == "fp16", CAUSAL=dtype == "fp16"),
            dict(num_warps=4),
        ))
    return cases


COMPILE_CASES = _compile_cases()
