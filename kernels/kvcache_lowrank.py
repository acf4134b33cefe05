"""Triton kernel for GEAR's low-rank fit: the subspace iteration of one block in one program.

:func:`lowrank_ops.kvcache.compress.lowrank_basis` (the oracle) computes, per block X (B × D,
float32) of every (sequence, kv head), an orthonormal basis V (D × r) of its rank-r
approximation: from a start Ω (shared, or one per block), Y = X Ω, then ``power_iters`` times
Q = orth(Y), V = orth(Xᵀ Q), Y = X V, where orth is classical Gram-Schmidt applied twice per
column (:func:`lowrank_ops.kvcache.compress.orthonormalize`). In torch that is a few dozen
small launches per iteration whatever the batch; ``torch.linalg.qr``, which it replaces, ran one
cuSOLVER call per matrix on CUDA.

Here one program holds one block. X is read where it is used, as a (B_PAD × D_PAD) tile for
Y = X V and as its transpose for Xᵀ Q (L1/L2 hits after the first read; holding both layouts
across the loop spilled); V as a (D_PAD × R_PAD) and Y / Q as (B_PAD × R_PAD) register tiles,
rank columns padded to R_PAD = 16 for ``tl.dot``. The dots are "tf32x3" (three TF32 tensor-core
products, fp32 accuracy to about 1e-6; exact "ieee" FMA dots needed 255 registers and spilled at
the default size). Gram-Schmidt runs on the tile's columns: a column is taken out by a masked
row sum, projected out of the columns before it twice, normalized (or zeroed when dependent)
and put back by a select; padded rows, channels and rank columns stay zero throughout. Grid:
one program of 4 warps per block, up to MAX_TILE (64 × 128) elements; SASS at the default block:
158-207 registers on sm_90 (128-157 on sm_80), no spill, 144 KB of shared memory for two
iterations (one program per SM: a decode step's batch · kv heads blocks take one wave).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile_check import CompileCase
from ._launch import launch
from .lowrank import MIN_DOT, _empty, next_pow2

MAX_TILE = 64 * 128  # B_PAD · D_PAD of one program (a larger block: the torch path; 128 x 128 would
# need 272 KB of shared memory for the tf32x3 dots' operands)
MAX_RANK = 16  # rank columns per program (R_PAD = 16)
DEPENDENT = tl.constexpr(1e-5)  # lowrank_ops.kvcache.compress.DEPENDENT (a test checks they agree)


@triton.jit
def _orthonormalize(y, cols, R: tl.constexpr):
    """Gram-Schmidt twice per column on the first R columns of the (rows × R_PAD) tile ``y``."""
    q = tl.zeros_like(y)
    for j in range(R):
        col = tl.sum(tl.where(cols[None, :] == j, y, 0.0), axis=1)
        before = tl.sqrt(tl.sum(col * col, axis=0))
        for _ in tl.static_range(2):
            col = col - tl.sum(q * tl.sum(q * col[:, None], axis=0)[None, :], axis=1)
        after = tl.sqrt(tl.sum(col * col, axis=0))
        col = tl.where(after > DEPENDENT * before, col / tl.maximum(after, 1e-38), 0.0)
        q = tl.where(cols[None, :] == j, col[:, None], q)
    return q


@triton.jit
def _subspace_kernel(x_ptr, start_ptr, out_ptr, START_STRIDE, B: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                     B_PAD: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr, ITERS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, B_PAD)
    chans = tl.arange(0, D_PAD)
    cols = tl.arange(0, R_PAD)
    x_ptr += n * B * D
    x_mask = (rows[:, None] < B) & (chans[None, :] < D)
    basis_mask = (chans[:, None] < D) & (cols[None, :] < R)
    v = tl.load(start_ptr + n * START_STRIDE + chans[:, None] * R + cols[None, :], mask=basis_mask, other=0.0)
    for _ in range(ITERS):  # X is read where used (L1/L2 hits after the first), X and Xᵀ never both live
        x = tl.load(x_ptr + rows[:, None] * D + chans[None, :], mask=x_mask, other=0.0)
        q = _orthonormalize(tl.dot(x, v, input_precision="tf32x3"), cols, R)
        xt = tl.load(x_ptr + rows[None, :] * D + chans[:, None], mask=tl.trans(x_mask), other=0.0)
        v = _orthonormalize(tl.dot(xt, q, input_precision="tf32x3"), cols, R)
    tl.store(out_ptr + n * D * R + chans[:, None] * R + cols[None, :], v, mask=basis_mask)


def misfit(block_tokens: int, head_dim: int, rank: int) -> str:
    """Why one program cannot hold a (block_tokens × head_dim) block at ``rank`` ("" when it can)."""
    if max(MIN_DOT, next_pow2(block_tokens)) * max(MIN_DOT, next_pow2(head_dim)) <= MAX_TILE and rank <= MAX_RANK:
        return ""
    return (f"a ({block_tokens} x {head_dim}) block at rank {rank} exceeds one program of the Triton fit "
            f"(B_PAD * D_PAD <= {MAX_TILE}, rank <= {MAX_RANK})")


def subspace_basis(x: Tensor, rank: int, power_iters: int, start: Tensor) -> Tensor:
    """:func:`lowrank_ops.kvcache.compress.lowrank_basis` of the float32 blocks ``x`` (..., B, D)
    from ``start`` (D, r) or (..., D, r): the orthonormal (..., D, r) basis, one program per block."""
    *lead, block, head_dim = x.shape
    why = misfit(block, head_dim, rank)
    if why:
        raise ValueError(f"x: {why}")
    count = x[..., 0, 0].numel()
    x = x.float().contiguous()
    start = start.float().contiguous()
    out = _empty((*lead, head_dim, rank), torch.float32, x.device)
    if count == 0 or rank == 0:
        return out
    launch(_subspace_kernel, (count,),
        x, start, out, 0 if start.dim() == 2 else head_dim * rank, B=block, D=head_dim, R=rank,
        B_PAD=max(MIN_DOT, next_pow2(block)), D_PAD=max(MIN_DOT, next_pow2(head_dim)), R_PAD=MIN_DOT,
        ITERS=power_iters, num_warps=4, num_stages=1,
    )
    return out


# --------------------------------------------------------------------------- compile lane
# The default fit (B = 64, head_dim 128, rank 4, the joint fit's two iterations and its refit's
# one) and a rank-16, head_dim-64 block of 128 tokens (both tiles of MAX_TILE).
def _compile_cases() -> list[CompileCase]:
    sig = dict(x_ptr="*fp32", start_ptr="*fp32", out_ptr="*fp32", START_STRIDE="i32")
    cases = []
    for block, head_dim, rank, iters in ((64, 128, 4, 2), (64, 128, 4, 1), (128, 64, 16, 2)):
        flags = dict(B=block, D=head_dim, R=rank, B_PAD=block, D_PAD=head_dim, R_PAD=MIN_DOT, ITERS=iters)
        cases.append(CompileCase(f"gear_subspace[B{block},d{head_dim},r{rank},i{iters}]", _subspace_kernel, sig, flags,
                                 dict(num_warps=4, num_stages=1)))
    return cases


COMPILE_CASES = _compile_cases()
