"""Triton kernel for GEAR decompression: K̂ or V̂ of a whole cache in one pass.

:meth:`lowrank_ops.kvcache.format.GEARKV.decompress_reference` (the oracle) rebuilds the cache
in plain torch: unpack the codes to a byte per entry, dequantize (a broadcast subtract and
multiply), scatter-add the outliers, add the low-rank product, concatenate the tail: about ten
passes over a cache-sized tensor and as many launches per kind, with temporaries of several times
the output's bytes. A chunk of new tokens too long for the decode kernel (and
``transformers``' other multi-token steps) decompresses a whole layer this way before SDPA.

Here one program writes one (BLOCK_T tokens × D_PAD channels) tile of the output, reading each
input once: the tile's packed code words (one vector load per token row, unpacked on chip by
:func:`kernels._codes.load_row_codes`), its scales and zeros (keys: the rows of the tile's key
groups, per channel; values: per token, per channel group, gathered from L1), each outlier
slot's channel and value (one compare and select per entry and slot), and the low-rank term as
r outer products of an A column (BLOCK_T) and a B_j column (D) in fp32 (int8 factors: A times its
block's column scale, B̂ times 1/127, as the reference). All arithmetic is fp32 and the result is
rounded once into the output dtype. Tiles of the tail copy (and convert) the fp16/bf16/fp32 tail
rows; the cache's uncompressed prefix (at most 16 tokens) is copied into the output's first rows
before the launch, and the kernel writes the rows after it. BLOCK_T is the largest power of two dividing B (at most 64, and BLOCK_T · D_PAD ≤ 4096), so
no tile straddles a block or the compressed/tail boundary. Grid: one axis of
(batch · kv_heads) × tiles, tiles fastest (consecutive programs write consecutive rows); 4 warps;
int64 offsets per tile, int32 within it. SASS of the compile cases: 96–159 registers, no spill,
except head_dim-80 values without outliers (ptxas stops at 80 registers and spills 40–48 bytes:
a padded-channel case, not the decode geometry). Not yet timed on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowrank_ops.kvcache.format import BLOCK_FIELDS, GEARKV

from ._codes import codes_to_f32, load_row_codes
from ._compile_check import CompileCase
from ._launch import launch
from .lowrank import MIN_DOT, _empty, cdiv, next_pow2

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_TILE_TOKENS = 64
_MAX_TILE = 4096  # BLOCK_T · D_PAD: 32 fp32 entries of a tile per thread at 4 warps


@triton.jit
def _gear_decompress_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_idx_ptr, out_val_ptr, lr_a_ptr, lr_b_ptr, lr_scale_ptr, tail_ptr, out_ptr,
    PREFIX_LEN, COMPRESSED, TAIL_LEN, TILES,
    KEYS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, N_OUT: tl.constexpr, R: tl.constexpr,
    INT8_FACTORS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = (pid // TILES).to(tl.int64)
    t0 = (pid % TILES) * BLOCK_T
    # int64 scalar offsets of the tile's first row, int32 offsets within it
    toks = tl.arange(0, BLOCK_T)
    chans = tl.arange(0, D_PAD)
    chan_ok = chans < HEAD_DIM
    out_ptr += (bh * (PREFIX_LEN + COMPRESSED + TAIL_LEN) + PREFIX_LEN + t0) * HEAD_DIM
    tile = toks[:, None] * HEAD_DIM + chans[None, :]
    if t0 >= COMPRESSED:  # a tail tile: copy its valid rows
        ok = (t0 - COMPRESSED + toks < TAIL_LEN)[:, None] & chan_ok[None, :]
        tail = tl.load(tail_ptr + (bh * BLOCK_TOKENS + t0 - COMPRESSED) * HEAD_DIM + tile, mask=ok, other=0.0)
        tl.store(out_ptr + tile, tail.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        row0 = bh * COMPRESSED + t0  # the tile's first row in every per-token tensor
        WORDS: tl.constexpr = HEAD_DIM * BITS // 32
        whole = toks[:, None] >= 0  # (BLOCK_T, 1), all true: a compressed tile has no missing rows
        codes = load_row_codes(codes_ptr + row0 * WORDS + toks[:, None] * WORDS, 0, WORDS, whole, BITS, D_PAD)
        if KEYS:  # per channel, per group of GROUP tokens
            stats = (bh * (COMPRESSED // GROUP) + t0 // GROUP) * HEAD_DIM
            stat = (toks // GROUP)[:, None] * HEAD_DIM + chans[None, :]
        else:  # per token, per group of GROUP channels
            stats = row0 * (HEAD_DIM // GROUP)
            stat = toks[:, None] * (HEAD_DIM // GROUP) + (chans // GROUP)[None, :]
        zero = tl.load(zero_ptr + stats + stat, mask=whole & chan_ok[None, :], other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + stats + stat, mask=whole & chan_ok[None, :], other=0.0).to(tl.float32)
        x = (codes_to_f32(codes) - zero) * scale
        for o in tl.static_range(N_OUT):
            idx = tl.load(out_idx_ptr + row0 * N_OUT + toks * N_OUT + o).to(tl.int32)
            val = tl.load(out_val_ptr + row0 * N_OUT + toks * N_OUT + o).to(tl.float32)
            x += tl.where(chans[None, :] == idx[:, None], val[:, None], 0.0)
        if R > 0:
            block = bh * (COMPRESSED // BLOCK_TOKENS) + t0 // BLOCK_TOKENS
            lowrank = tl.zeros((BLOCK_T, D_PAD), tl.float32)
            for r in tl.static_range(R):
                a = tl.load(lr_a_ptr + row0 * R + toks * R + r).to(tl.float32)
                b = tl.load(lr_b_ptr + block * HEAD_DIM * R + chans * R + r, mask=chan_ok, other=0.0).to(tl.float32)
                if INT8_FACTORS:
                    a = a * tl.load(lr_scale_ptr + block * R + r)
                    b = b * (1.0 / 127.0)
                lowrank += a[:, None] * b[None, :]
            x += lowrank
        tl.store(out_ptr + tile, x.to(out_ptr.dtype.element_ty), mask=whole & chan_ok[None, :])


def tile_tokens(buffer_tokens: int, head_dim: int) -> int:
    """Tokens per tile: the largest power of two dividing B, at most 64 and 4096 / D_PAD."""
    return min(buffer_tokens & -buffer_tokens, _MAX_TILE_TOKENS, _MAX_TILE // max(MIN_DOT, next_pow2(head_dim)))


def unsupported(dtype: torch.dtype) -> str:
    """Why the kernel cannot write ``dtype`` ("" when it can)."""
    return "" if dtype in OUT_DTYPES else f"the Triton GEAR decompression writes {OUT_DTYPES}, got {dtype}"


def gear_decompress(kv: GEARKV, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(K̂, V̂) of the GEAR cache ``kv``, each (batch, kv_heads, seq_len, head_dim) in ``dtype``
    (float16, bfloat16 or float32): the reference's reconstruction in one launch per kind."""
    why = unsupported(dtype)
    if why:
        raise ValueError(f"dtype: {why}")
    cfg = kv.config
    b, h, d, seq = kv.batch, kv.kv_heads, kv.head_dim, kv.seq_len
    block_t = tile_tokens(cfg.buffer_tokens, d)
    prefix_len = kv.prefix_len
    tiles = cdiv(seq - prefix_len, block_t)
    n_out = kv.key_out_idx.shape[-1]
    int8_factors = cfg.rank > 0 and cfg.factor_bits == 8
    outs = []
    for kind, tail, prefix in (("key", kv.tail_keys, kv.prefix_keys), ("value", kv.tail_values, kv.prefix_values)):
        t = {f: getattr(kv, f"{kind}_{f}").contiguous() for f in BLOCK_FIELDS}  # no-ops for the format's own
        dummy = t["codes"]  # pointer for absent tensors (their branches are compiled out)
        out = _empty((b, h, seq, d), dtype, kv.device)
        out[:, :, :prefix_len] = prefix  # (at most prefix_tokens rows; the kernel writes the rest)
        if tiles and b * h:
            launch(_gear_decompress_kernel, (b * h * tiles,),
                t["codes"], t["scale"], t["zero"], t["out_idx"] if n_out else dummy, t["out_val"] if n_out else dummy,
                t["lr_a"] if cfg.rank else dummy, t["lr_b"] if cfg.rank else dummy,
                t["lr_scale"] if int8_factors else dummy, tail.contiguous(), out, prefix_len, kv.compressed_len,
                kv.tail_len, tiles,
                KEYS=kind == "key", BITS=cfg.bits, GROUP=cfg.group_size, BLOCK_TOKENS=cfg.buffer_tokens,
                HEAD_DIM=d, D_PAD=max(MIN_DOT, next_pow2(d)), N_OUT=n_out, R=cfg.rank,
                INT8_FACTORS=int8_factors, BLOCK_T=block_t, num_warps=4,
            )
        outs.append(out)
    return outs[0], outs[1]


# --------------------------------------------------------------------------- compile lane
# The default format (keys and values), 4-bit fp16 factors at head_dim 64 into bf16, and a
# head_dim-80 bf16 tail into fp32 without outliers or rank.
def _compile_cases() -> list[CompileCase]:
    cases = []
    for keys, bits, head_dim, n_out, rank, factors, tail, out in (
        (True, 2, 128, 3, 4, "i8", "fp16", "fp16"), (False, 2, 128, 3, 4, "i8", "fp16", "fp16"),
        (True, 4, 64, 1, 4, "fp16", "bf16", "bf16"), (False, 2, 80, 0, 0, "fp16", "bf16", "fp32"),
    ):
        sig = dict(codes_ptr="*i32", scale_ptr="*fp16", zero_ptr="*fp16", out_idx_ptr="*u8", out_val_ptr="*fp16",
                   lr_a_ptr=f"*{factors}", lr_b_ptr=f"*{factors}", lr_scale_ptr="*fp32", tail_ptr=f"*{tail}",
                   out_ptr=f"*{out}", PREFIX_LEN="i32", COMPRESSED="i32", TAIL_LEN="i32", TILES="i32")
        d_pad = next_pow2(head_dim)
        flags = dict(KEYS=keys, BITS=bits, GROUP=16 if head_dim == 80 else 32, BLOCK_TOKENS=64, HEAD_DIM=head_dim,
                     D_PAD=d_pad, N_OUT=n_out, R=rank, INT8_FACTORS=factors == "i8",
                     BLOCK_T=tile_tokens(64, head_dim))
        name = f"gear_decompress[{'k' if keys else 'v'},{bits}b,d{head_dim},n{n_out},r{rank}-{factors},{tail}->{out}]"
        cases.append(CompileCase(name, _gear_decompress_kernel, sig, flags, dict(num_warps=4)))
    return cases


COMPILE_CASES = _compile_cases()
