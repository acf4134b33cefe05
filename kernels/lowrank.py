"""Triton kernels for the low-rank family.

* :func:`lowrank_matmul` — ``y = (x Vᵀ) Uᵀ + b`` by one of two paths (see ``ops.lowrank_path``):
  ``"fused"`` (one launch, the intermediate stays on chip) or ``"decode"`` (two launches,
  split over rank and K so that batch 1 fills the GPU).
* :func:`lora_matmul` — ``y = x Wᵀ + s·(x Aᵀ) Bᵀ + b`` in one launch that reads x once for
  both the base weight and the low-rank path.

All tensors are row-major and contiguous, so a row's stride is its length: x (M, K),
V (R, K), U (N, R), W (N, K), A (R, K), B (N, R), y (M, N). Every product accumulates in
fp32; the rank-space intermediate is rounded to the input dtype before it meets U or B, so
fp16/bf16 run both products on tensor cores. fp32 inputs use exact (``"ieee"``) dots.

Block sizes come from one config table per kernel: several configs under ``@triton.autotune``
on a GPU, exactly one under the interpreter (``TRITON_INTERPRET=1``, read when this module is
imported), where multi-config autotuning cannot run and where large blocks keep the number of
interpreted programs and loop trips small. Nothing here touches a GPU at import time.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowrank_ops.core import cuda_ext

from ._compile_check import CompileCase
from ._launch import INTERPRET, launch

LORA_MAX_RANK = 128  # the fused LoRA kernel keeps a (BLOCK_M x rank) fp32 tile next to its accumulator
FUSED_MAX_RANK = 256  # the fused low-rank kernel keeps a (BLOCK_M x rank) tile in registers
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
DECODE_BLOCK_M = MIN_DOT  # decode rows are padded (and masked) to one 16-row tile
_INTERPRETER_SMS = 2  # stand-in "SM count" under the interpreter: a few programs, splits still exercised
_DECODE_K_CHUNK = 64 if INTERPRET else 128  # smallest K range one decode split is given


def _configs(table: list[tuple], names: tuple[str, ...], options: tuple[str, ...] = ("num_warps", "num_stages"),
             every_row: bool = False) -> list[triton.Config]:
    """``(block sizes..., num_warps, num_stages)`` rows -> Configs (``options`` names the trailing
    Config options of a row, e.g. ``maxnreg`` too); the first row alone under the interpreter
    unless ``every_row``."""
    rows = table[:1] if INTERPRET and not every_row else table
    n = len(options)
    return [triton.Config(dict(zip(names, row[:-n])), **dict(zip(options, row[-n:]))) for row in rows]


# --------------------------------------------------------------------------- config tables
# Each table's first row is the interpreter config (large blocks, few programs).
# The backward-to-x kernels of the packed families (quant, N:M): dx tiles (BLOCK_M × BLOCK_K),
# N swept in BLOCK_N steps, fp32 accumulator; each family prepends its interpreter row.
DX_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
DX_GPU_TABLE = [
    # BLOCK_M BLOCK_N BLOCK_K warps stages
    (64, 64, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (64, 32, 128, 4, 3),
    (32, 32, 64, 4, 2),  # lean: small M, and fp32
]
_FUSED_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_FUSED_TABLE = [
    # BLOCK_M BLOCK_N BLOCK_K warps stages
    (32, 32, 64, 4, 3) if INTERPRET else (64, 64, 64, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (32, 64, 64, 4, 4),
    (64, 64, 32, 8, 3),  # R_PAD = 256: more warps share the (64 x 256) intermediate
    (32, 32, 32, 4, 2),  # lean: fp32 at R_PAD = 256
]
_DECODE_XV_NAMES = ("BLOCK_R", "BLOCK_K")
_DECODE_XV_TABLE = [
    # BLOCK_R BLOCK_K warps stages
    (128, 32, 4, 1) if INTERPRET else (32, 128, 4, 3),
    (64, 128, 4, 3),
    (32, 64, 4, 4),
    (16, 128, 4, 3),
]
_DECODE_TU_NAMES = ("BLOCK_N", "BLOCK_R")
_DECODE_TU_TABLE = [
    # BLOCK_N BLOCK_R warps stages
    (32, 128, 4, 1) if INTERPRET else (32, 64, 4, 3),
    (16, 64, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
]
_LORA_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_LORA_TABLE = [
    # BLOCK_M BLOCK_N BLOCK_K warps stages
    (32, 32, 64, 4, 1) if INTERPRET else (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (32, 64, 64, 4, 4),
    (16, 64, 128, 4, 3),  # decode-sized M
    (32, 64, 32, 4, 2),  # lean: fp32 at R_PAD = 128
]


# A config is tried only when its estimated shared memory (an upper bound, checked against the
# compile lane's measurements) fits an A100 and its fp32 accumulator tiles take at most 128
# registers a thread; e.g. fp32 at R_PAD = 256 leaves only the lean row of the fused table.
SMEM_BUDGET = 160 * 1024
ACC_REGS_BUDGET = 128


def _pruner(loop_tile, after_tile, acc_tile) -> dict:
    """``prune_configs_by`` from per-config tile sizes in elements: the tiles loaded per K step
    (pipelined over ``num_stages - 1`` buffers), the tile loaded after the K loop (two buffers)
    and the fp32 accumulators. Keeps the leanest config when none fits."""

    def cost(config, kwargs, esize):
        meta = {**kwargs, **config.kwargs}
        smem = ((config.num_stages - 1) * loop_tile(meta) + 2 * after_tile(meta)) * esize
        return smem, acc_tile(meta) / (32 * config.num_warps)

    def prune(configs, named_args, **kwargs):
        esize = named_args["x_ptr"].element_size()
        costs = {id(c): cost(c, kwargs, esize) for c in configs}
        fits = [c for c in configs if costs[id(c)][0] <= SMEM_BUDGET and costs[id(c)][1] <= ACC_REGS_BUDGET]
        return fits or [min(configs, key=lambda c: costs[id(c)][0])]

    return {"early_config_prune": prune}


_FUSED_PRUNE = _pruner(
    loop_tile=lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["R_PAD"]),
    after_tile=lambda m: m["R_PAD"] * m["BLOCK_N"],
    acc_tile=lambda m: m["BLOCK_M"] * (m["R_PAD"] + m["BLOCK_N"]),
)
_LORA_PRUNE = _pruner(
    loop_tile=lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"] + m["R_PAD"]),
    after_tile=lambda m: m["R_PAD"] * m["BLOCK_N"],
    acc_tile=lambda m: m["BLOCK_M"] * (m["R_PAD"] + m["BLOCK_N"]),
)


# The interpreter multiplies bf16 tiles as their raw uint16 bits (triton-lang/triton#11584, "not
# supported yet"), so under it bf16 operands are widened to fp32 first: bf16 products are exact in
# fp32, as on tensor cores. Compiled kernels never take this branch.
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# --------------------------------------------------------------------------- fused (x Vᵀ) Uᵀ
# Grid (cdiv(M, BLOCK_M), N_SPLIT). Program (pm, ps) owns rows [pm·BLOCK_M, +BLOCK_M) and the
# ps-th contiguous run of N-blocks. Phase 1 walks K in BLOCK_K steps and accumulates the
# (BLOCK_M × R_PAD) intermediate T = X Vᵀ in registers (V is read as a (BLOCK_K × R_PAD) tile
# of Vᵀ; rows of V past R are masked to zero). T is rounded to the input dtype once and never
# leaves the chip. Phase 2 walks the program's N-blocks: y_tile = T @ U_blockᵀ (+ b), where
# U_blockᵀ is an (R_PAD × BLOCK_N) tile read from U's rows. N_SPLIT programs share a row block,
# each recomputing T: the launcher picks N_SPLIT so that about 2 programs run per SM.
@triton.autotune(configs=_configs(_FUSED_TABLE, _FUSED_NAMES),
                  key=["M_BUCKET", "N", "K", "R_PAD"], prune_configs_by=_FUSED_PRUNE)
@triton.jit
def _lowrank_fused_kernel(
    x_ptr, v_ptr, u_ptr, bias_ptr, y_ptr,
    M, N, K, R,
    M_BUCKET,  # autotune key only: next power of two of M
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    r_mask = offs_r < R

    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & k_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        t = _dot(x, vt, t, DOT_PRECISION)
    t = t.to(x_ptr.dtype.element_ty)

    n_blocks = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_blocks, tl.num_programs(1))
    first = tl.program_id(1) * per_split
    for nb in range(first, tl.minimum(first + per_split, n_blocks)):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        ut = tl.load(u_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = _dot(t, ut, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


# --------------------------------------------------------------------------- decode, step 1: T_part = X Vᵀ
# Grid (cdiv(R, BLOCK_R), K_SPLIT, cdiv(M, 16)). The K-blocks are dealt out in contiguous runs
# to the K_SPLIT programs of a column; program (pr, ks, pm) computes the partial product of
# x rows [pm·16, +16) (masked to M) with V rows [pr·BLOCK_R, +BLOCK_R) over its K run and
# writes it in fp32 to t_part[ks, m, r] (shape K_SPLIT × M × R, contiguous). A split whose run
# is empty writes zeros, so every element is written and no atomics are needed: the sum in
# step 2 is deterministic.
@triton.autotune(configs=_configs(_DECODE_XV_TABLE, _DECODE_XV_NAMES), key=["M_BUCKET", "K", "R", "K_SPLIT"])
@triton.jit
def _lowrank_decode_xv_kernel(
    x_ptr, v_ptr, t_part_ptr,
    M, K, R, K_SPLIT,
    M_BUCKET,  # autotune key only: next power of two of M
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    r_mask = offs_r < R

    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, K_SPLIT)
    first = split * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(first, tl.minimum(first + per_split, k_blocks)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & k_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _dot(x, vt, acc, DOT_PRECISION)
    out = t_part_ptr + split.to(tl.int64) * M * R + rows * R + offs_r[None, :]
    tl.store(out, acc, mask=m_mask & r_mask[None, :])


# --------------------------------------------------------------------------- decode, step 2: y = (Σ T_part) Uᵀ
# Grid (cdiv(N, BLOCK_N), cdiv(M, 16)). Program (pn, pm) walks the rank in BLOCK_R chunks: it
# sums the K_SPLIT fp32 partials of T for its 16 rows (a few KB, L2-resident, re-read by every
# N-block), rounds the sum to the input dtype and multiplies it by the (BLOCK_R × BLOCK_N)
# tile of Uᵀ read from U rows [pn·BLOCK_N, +BLOCK_N). Any rank works: the loop runs cdiv(R,
# BLOCK_R) times. U, the large operand, is read exactly once over the whole grid (for M ≤ 16).
@triton.autotune(configs=_configs(_DECODE_TU_TABLE, _DECODE_TU_NAMES), key=["M_BUCKET", "N", "R", "K_SPLIT"])
@triton.jit
def _lowrank_decode_tu_kernel(
    t_part_ptr, u_ptr, bias_ptr, y_ptr,
    M, N, R, K_SPLIT,
    M_BUCKET,  # autotune key only: next power of two of M
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(0, K_SPLIT):
            part = t_part_ptr + split * M * R + rows * R + offs_r[None, :]
            t += tl.load(part, mask=m_mask & r_mask[None, :], other=0.0)
        ut = tl.load(u_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = _dot(t.to(u_ptr.dtype.element_ty), ut, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


# --------------------------------------------------------------------------- LoRA: x Wᵀ + s·(x Aᵀ) Bᵀ
@triton.jit
def _load_dense_base_tile(w_ptr, offs_n, offs_k, N, K):
    """(BLOCK_K × BLOCK_N) tile of Wᵀ from a dense row-major W (N, K); zero outside the matrix.

    The base-weight loader of the LoRA kernel: quantized or N:M-sparse bases swap in a
    loader that dequantizes / expands their own format into the same tile.
    """
    mask = (offs_n[None, :] < N) & (offs_k[:, None] < K)
    return tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=mask, other=0.0)


# Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); program (pm, pn) owns one (BLOCK_M × BLOCK_N)
# output tile. One pass over K in BLOCK_K steps loads each x tile once and feeds two dots:
# acc += x · W_tileᵀ (the base, BLOCK_N columns) and t += x · Aᵀ (the whole padded rank,
# R_PAD columns, rows of A past R masked to zero). After the loop the rank-space tile t is
# rounded to the input dtype and acc += s · t @ B_tileᵀ with B_tileᵀ an (R_PAD × BLOCK_N) tile
# read from B rows [pn·BLOCK_N, +BLOCK_N); then + b and one store. The x·Aᵀ product is
# recomputed by every N-block: R_PAD/BLOCK_N extra work next to the base product.
@triton.autotune(configs=_configs(_LORA_TABLE, _LORA_NAMES),
                  key=["M_BUCKET", "N", "K", "R_PAD"], prune_configs_by=_LORA_PRUNE)
@triton.jit
def _lora_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    M_BUCKET,  # autotune key only: next power of two of M
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    rows = offs_m.to(tl.int64)[:, None]
    m_mask = offs_m[:, None] < M
    n_mask = offs_n < N
    r_mask = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=m_mask & k_mask[None, :], other=0.0)
        acc = _dot(x, _load_dense_base_tile(w_ptr, offs_n, offs_k, N, K), acc, DOT_PRECISION)
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        t = _dot(x, at, t, DOT_PRECISION)
    bt = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None], other=0.0)
    lowrank = _dot(t.to(x_ptr.dtype.element_ty), bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
    acc += scale * lowrank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


# --------------------------------------------------------------------------- launchers
# Host arithmetic for the launchers. triton.cdiv / triton.next_power_of_2 are constexpr functions:
# about 6 µs per call from Python, several per launch, on the decode path's critical host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 dots for fp32 inputs; fp16/bf16 run on tensor cores whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_pad(rank: int) -> int:
    return max(MIN_DOT, next_pow2(rank))


def _sm_count(device: torch.device) -> int:
    """SMs of ``device`` (queried once per device, on first launch); the interpreter's stand-in on CPU."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return cuda_ext.sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _target_programs(device: torch.device) -> int:
    """About two programs per SM."""
    return 2 * _sm_count(device)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launchers allocate (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _lowrank_fused(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    (m, k), (n, r) = x.shape, u.shape
    if r > FUSED_MAX_RANK:
        raise ValueError(f"rank: the fused path supports rank <= {FUSED_MAX_RANK}, got {r}")
    y = _empty((m, n), x.dtype, x.device)
    target = _target_programs(x.device)

    def grid(meta):
        m_blocks = cdiv(m, meta["BLOCK_M"])
        return m_blocks, min(max(1, target // m_blocks), cdiv(n, meta["BLOCK_N"]))

    launch(_lowrank_fused_kernel, grid,
        x, v, u, bias if bias is not None else y, y, m, n, k, r, next_pow2(m),
        HAS_BIAS=bias is not None, R_PAD=_rank_pad(r), DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y


def _lowrank_decode(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor]) -> Tensor:
    (m, k), (n, r) = x.shape, u.shape
    m_blocks = cdiv(m, DECODE_BLOCK_M)
    rank_columns = cdiv(r, 64) * m_blocks  # step-1 programs per K split, for a nominal BLOCK_R
    # Every step-2 program re-reads K_SPLIT × 16 × R fp32 partials from L2; keeping K_SPLIT·M ≤ 32
    # bounds that to about the bytes of its own U tile, at some loss of step-1 parallelism for M ≈ 16.
    k_split = max(1, min(cdiv(k, _DECODE_K_CHUNK), _target_programs(x.device) // rank_columns, 32 // m))
    t_part = _empty((k_split, m, r), torch.float32, x.device)
    y = _empty((m, n), x.dtype, x.device)
    precision, m_bucket = _dot_precision(x.dtype), next_pow2(m)

    launch(_lowrank_decode_xv_kernel, lambda meta: (cdiv(r, meta["BLOCK_R"]), k_split, m_blocks),
        x, v, t_part, m, k, r, k_split, m_bucket, DOT_PRECISION=precision, BLOCK_M=DECODE_BLOCK_M,
    )
    launch(_lowrank_decode_tu_kernel, lambda meta: (cdiv(n, meta["BLOCK_N"]), m_blocks),
        t_part, u, bias if bias is not None else y, y, m, n, r, k_split, m_bucket,
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_M=DECODE_BLOCK_M,
    )
    return y


_LOWRANK_PATHS = {"fused": _lowrank_fused, "decode": _lowrank_decode}


def lowrank_matmul(x: Tensor, v: Tensor, u: Tensor, bias: Optional[Tensor], path: str) -> Tensor:
    """``(x Vᵀ) Uᵀ + b`` for contiguous x (M, K), V (R, K), U (N, R), bias (N,) or None, one dtype.

    ``path``: ``"fused"`` (one launch, R ≤ 256) or ``"decode"`` (two launches, any R; made for
    M ≤ 16 but correct for any M). Returns (M, N) in x's dtype.
    """
    if path not in _LOWRANK_PATHS:
        raise ValueError(f"path: expected one of {sorted(_LOWRANK_PATHS)}, got {path!r}")
    return _LOWRANK_PATHS[path](x, v, u, bias)


def lora_matmul(x: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """``x Wᵀ + s·(x Aᵀ) Bᵀ + b`` for contiguous x (M, K), W (N, K), A (R, K), B (N, R), bias (N,) or None.

    One launch; R ≤ :data:`LORA_MAX_RANK`. Returns (M, N) in x's dtype.
    """
    (m, k), (n, r) = x.shape, b.shape
    if r > LORA_MAX_RANK:
        raise ValueError(f"rank: the fused LoRA kernel supports rank <= {LORA_MAX_RANK}, got {r}")
    y = _empty((m, n), x.dtype, x.device)
    launch(_lora_kernel, lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])),
        x, w, a, b, bias if bias is not None else y, y, m, n, k, r, float(scale), next_pow2(m),
        HAS_BIAS=bias is not None, R_PAD=_rank_pad(r), DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y


# --------------------------------------------------------------------------- compile lane
# One representative specialization of every kernel per dtype, compiled for sm_80 and sm_90 by
# ``python -m lowrank_ops.kernels._compile_check`` with each autotuned kernel's first config that
# survives its pruning (R_PAD at the path's limit: the largest tiles).
def _compile_cases() -> list[CompileCase]:
    cases = []
    for dtype in ("fp16", "bf16", "fp32"):
        p, prec = f"*{dtype}", ("ieee" if dtype == "fp32" else "tf32")
        cases += [
            CompileCase(
                f"lowrank_fused[{dtype}]", _lowrank_fused_kernel,
                dict(x_ptr=p, v_ptr=p, u_ptr=p, bias_ptr=p, y_ptr=p,
                     M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32"),
                dict(HAS_BIAS=True, R_PAD=FUSED_MAX_RANK, DOT_PRECISION=prec),
            ),
            CompileCase(
                f"lowrank_decode_xv[{dtype}]", _lowrank_decode_xv_kernel,
                dict(x_ptr=p, v_ptr=p, t_part_ptr="*fp32", M="i32", K="i32", R="i32", K_SPLIT="i32", M_BUCKET="i32"),
                dict(DOT_PRECISION=prec, BLOCK_M=DECODE_BLOCK_M),
            ),
            CompileCase(
                f"lowrank_decode_tu[{dtype}]", _lowrank_decode_tu_kernel,
                dict(t_part_ptr="*fp32", u_ptr=p, bias_ptr=p, y_ptr=p,
                     M="i32", N="i32", R="i32", K_SPLIT="i32", M_BUCKET="i32"),
                dict(HAS_BIAS=True, DOT_PRECISION=prec, BLOCK_M=DECODE_BLOCK_M),
            ),
            CompileCase(
                f"lora[{dtype}]", _lora_kernel,
                dict(x_ptr=p, w_ptr=p, a_ptr=p, b_ptr=p, bias_ptr=p, y_ptr=p,
                     M="i32", N="i32", K="i32", R="i32", scale="fp32", M_BUCKET="i32"),
                dict(HAS_BIAS=True, R_PAD=LORA_MAX_RANK, DOT_PRECISION=prec),
            ),
        ]
    return cases


COMPILE_CASES = _compile_cases()
