"""Python side of the hand-written CUDA GEAR decode-attention kernel (csrc/gear_decode.cu).

``softmax(scale · q K̂ᵀ + mask) V̂`` straight from the compressed cache (codes into the tensor
cores' fragment layout, key scale folded into q, outliers and low rank as corrections, fp16/bf16
tail), split over the sequence: one launch when one split suffices and the cache has no
uncompressed prefix, else two (partials, then their merge, which also attends the prefix,
``GEARConfig.prefix_tokens``; on sm_90 the second is a programmatic dependent launch, so its CTAs
are placed while the first finishes). The compiled module takes raw device pointers, sizes, a dtype code and the stream
as ints; this wrapper checks what the kernel serves, allocates the output and the fp32
workspace with torch (CUDA-graph pools apply) and launches on the current stream.

Automatic dispatch takes it for eager calls at small sizes, where its shorter host path wins, and
takes the Triton kernel under CUDA-graph capture and for large calls (:func:`preferred`, with the
measurements); pin either with ``LOWRANK_OPS_BACKEND`` or :func:`lowrank_ops.core.backend.use_backend`.
Served: fp16/bf16 q with a cache of the same dtype, 2 or 4 bits, head_dim 64 or 128, rank 0, 4
or 8 with fp16 or int8 factors, up to 8 outliers per vector, group sizes 16–128 (≤ head_dim).
Anything else goes to the Triton kernel (:func:`supports` says why). Automatic dispatch does not
take it for int8 factors (:data:`INT8_NOT_PREFERRED`); pinned, it serves them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support

if TYPE_CHECKING:
    from lowrank_ops.kvcache.format import GEARKV

CUDA_GEAR_BITS = (2, 4)
CUDA_GEAR_HEAD_DIMS = (64, 128)
CUDA_GEAR_RANKS = (0, 4, 8)
CUDA_GEAR_MAX_OUTLIERS = 8  # per vector (round(outlier_ratio * head_dim)): the kernel stages a step's in shared memory
STEP_TOKENS = 16  # tokens per warp step of the kernel
ROWS_PER_BLOCK = 8  # q rows (of one kv head) per CTA: the N of the kernel's transposed mma tiles
WARPS_PER_SPLIT = 4
MAX_SPLITS = 1024
CTAS_PER_SM = 2  # what split_plan aims at (the kernel fits three per SM on sm_90; on sm_80 two at head_dim 128)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}  # = _C.DTYPE_FLOAT16 / _C.DTYPE_BFLOAT16
_LOG2E = math.log2(math.e)  # the kernel's softmax runs in base 2
# When automatic dispatch takes this kernel (H100, bench/results/h100-2026-11-27-4ec857a, 32 q / 8
# kv heads, head_dim 128): its device time is behind the Triton kernel's (graph replay, 8k, batch 1:
# 24-36 us against 16-33; batch 16: 174-437 against 148-383), but an eager call costs far less host
# time (8k, batch 1: 89-145 us against 178-302; 32k, batch 1 (88e7c84): 104-200 against 178-456),
# and at small sizes an eager decode step is host-bound. So it is preferred for eager calls up to
# EAGER_MAX_WORK = batch * kv_heads * seq_len (the measured cases: 65K and 262K won, 1M = 8k x 16
# lost, 182-444 us against 186-345), and never while a CUDA graph is being captured (graphs remove
# the host time, and there Triton is faster).
EAGER_MAX_WORK = 1 << 19
NOT_PREFERRED = "the Triton GEAR kernel is faster under CUDA-graph capture and for large eager calls (measured on an H100)"
# The kernel's int8-factor path (written 2026-11-27) compiles for sm_80/sm_90 without spills,
# matches the reference in the CPU emulation lane and has gpu-lane tests, but has not run on a GPU
# yet: until it has, automatic dispatch keeps int8 factors on the Triton kernel, whose int8 path
# the interpreter lane checks.
INT8_NOT_PREFERRED = "int8 factors: the CUDA kernel's int8 path has not yet run on a GPU; pin backend cuda to use it"


def config_support(dtype: torch.dtype, cache_dtype: torch.dtype, bits: int, head_dim: int, rank: int,
                   group_size: int, n_out: int = 0, factor_bits: int = 16) -> Support:
    """The dtype / format part of :func:`supports` (device- and build-independent)."""
    if dtype not in _DTYPE_CODES:
        return Support(False, f"q has dtype {dtype}; the CUDA GEAR kernel takes float16 or bfloat16")
    if cache_dtype != dtype:
        return Support(False, f"the cache tail is {cache_dtype} and q is {dtype}; the CUDA GEAR kernel needs one dtype")
    if bits not in CUDA_GEAR_BITS:
        return Support(False, f"bits={bits}; the CUDA GEAR kernel serves {CUDA_GEAR_BITS}")
    if head_dim not in CUDA_GEAR_HEAD_DIMS:
        return Support(False, f"head_dim={head_dim}; the CUDA GEAR kernel serves {CUDA_GEAR_HEAD_DIMS}")
    if rank not in CUDA_GEAR_RANKS:
        return Support(False, f"rank={rank}; the CUDA GEAR kernel serves ranks {CUDA_GEAR_RANKS}")
    if factor_bits not in (8, 16):
        return Support(False, f"factor_bits={factor_bits}; the CUDA GEAR kernel reads int8 (8) or fp16 (16) factors")
    if group_size > head_dim:
        return Support(False, f"group_size={group_size} > head_dim={head_dim}: a value group would exceed a vector")
    if n_out > CUDA_GEAR_MAX_OUTLIERS:
        return Support(False, f"{n_out} outliers per vector; the CUDA GEAR kernel stages at most {CUDA_GEAR_MAX_OUTLIERS}")
    return Support(True)


def supports(q: object, kv: "GEARKV", causal: bool = False, sinks: bool = False) -> Support:
    """Whether the CUDA GEAR kernel can serve ``attention(q, kv, causal=causal)`` (with attention
    sinks when ``sinks``). Cheap; never raises."""
    if not isinstance(q, Tensor):
        return Support(False, f"q must be a tensor, got {type(q).__name__}")
    if sinks:
        return Support(False, "attention sinks: the CUDA GEAR kernel has none; Triton has")
    if causal and q.dim() == 4 and q.shape[2] > 1:
        return Support(False, f"causal attention of {q.shape[2]} query tokens: the CUDA GEAR kernel has no causal "
                              "mask among new tokens (one query token per sequence); Triton has")
    if q.device.type != "cuda":
        return Support(False, f"q is on {q.device}; the CUDA GEAR kernel needs a CUDA tensor")
    cfg = kv.config
    verdict = config_support(q.dtype, kv.dtype, cfg.bits, kv.head_dim, cfg.rank, cfg.group_size,
                             cfg.outliers_per_vector(kv.head_dim), cfg.factor_bits)
    if not verdict.ok:
        return verdict
    misaligned = [name for name, x in kv.tensors().items() if x.data_ptr() % 16]
    if misaligned:
        return Support(False, f"{misaligned[0]} is not 16-byte aligned (the kernel reads 128-bit words)")
    if not cuda_ext.available():
        return Support(False, f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}")
    if not hasattr(cuda_ext.load(), "gear_decode"):
        return Support(False, "the CUDA extension was built without gear_decode (older csrc/): rebuild it")
    chosen = preferred(kv)
    return Support(True, "" if chosen else INT8_NOT_PREFERRED if _int8_factors(kv) else NOT_PREFERRED, preferred=chosen)


def _int8_factors(kv: "GEARKV") -> bool:
    return kv.config.rank > 0 and kv.config.factor_bits == 8


def preferred(kv: "GEARKV") -> bool:
    """Whether automatic dispatch takes this kernel for ``kv`` (see :data:`EAGER_MAX_WORK`): an eager
    call (no CUDA graph being captured) over at most EAGER_MAX_WORK cached head-tokens, with fp16
    factors or none (:data:`INT8_NOT_PREFERRED`)."""
    if _int8_factors(kv):
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return kv.batch * kv.kv_heads * kv.seq_len <= EAGER_MAX_WORK


def launch_geometry(q: Tensor, kv: "GEARKV") -> tuple[int, int]:
    """(16-token steps of the cache, CTAs per sequence split: batch · kv_heads · row blocks)."""
    m = (q.shape[1] // kv.kv_heads) * q.shape[2]
    steps = kv.compressed_len // STEP_TOKENS + -(-kv.tail_len // STEP_TOKENS)
    return steps, q.shape[0] * kv.kv_heads * -(-m // ROWS_PER_BLOCK)


def split_plan(steps: int, columns: int, num_sms: int, ctas_per_sm: int = CTAS_PER_SM) -> tuple[int, int]:
    """(splits, steps per split) for ``steps`` 16-token steps and ``columns`` CTAs per split:
    about ``ctas_per_sm`` CTAs per SM (at least one step per warp, no empty split). The kernel's
    registers and shared memory let three run per SM on sm_90, two on sm_80 at head_dim 128, so the default plan
    runs in one wave on both; whether three per SM pay at batch 1 is for a GPU to say
    (bench/kernel_profile.py times each)."""
    return _even_splits(steps, min(MAX_SPLITS, -(-ctas_per_sm * num_sms // columns), -(-steps // WARPS_PER_SPLIT)))


def _even_splits(steps: int, want: int) -> tuple[int, int]:
    """(splits, steps per split): ``steps`` (at least one) cut into at most ``want`` (at least one)
    equal runs of whole steps, no split empty."""
    per_split = -(-max(steps, 1) // max(1, want))
    return -(-max(steps, 1) // per_split), per_split


def gear_decode(q: Tensor, kv: "GEARKV", key_mask: Optional[Tensor], scale: float,
                num_splits: Optional[int] = None) -> Tensor:
    """Decode attention of ``q`` (batch, q_heads, q_len, head_dim) over ``kv`` on the CUDA kernel.

    Inputs as checked by :func:`lowrank_ops.kvcache.attention` (``key_mask`` bool
    (batch, seq_len) or None, ``scale`` the score scale); :func:`supports` must hold.
    ``num_splits`` overrides the sequence split count (tests). Returns q's shape and dtype.
    """
    verdict = supports(q, kv)
    if not verdict.ok:
        raise ValueError(f"q: the CUDA GEAR kernel cannot serve this call: {verdict.why}")
    return launch(q, kv, key_mask, scale, num_splits)


def launch(q: Tensor, kv: "GEARKV", key_mask: Optional[Tensor], scale: float,
           num_splits: Optional[int] = None, target: Optional[cuda_ext.LaunchTarget] = None,
           dependent_launch: Optional[bool] = None) -> Tensor:
    """:func:`gear_decode` without its :func:`supports` check, for a caller that has just made it
    (automatic dispatch: the check scans every tensor's alignment, and eager decode is host-bound),
    or with another ``target`` (the CPU emulation lane's module, on CPU tensors).
    ``dependent_launch`` overrides the target's choice of programmatic dependent launches (sm_90:
    the split kernel's and the combine kernel's CTAs start while the kernel before them finishes;
    ``bench/kernel_profile.py`` times both)."""
    with cuda_ext.on_device(q.device, "gear_decode", target) as chosen:
        overlap = chosen.dependent_launch if dependent_launch is None else dependent_launch
        return _run(chosen, q, kv, key_mask, scale, num_splits, overlap)


def _run(target: cuda_ext.LaunchTarget, q: Tensor, kv: "GEARKV", key_mask: Optional[Tensor], scale: float,
         num_splits: Optional[int], dependent_launch: bool) -> Tensor:
    cfg = kv.config
    batch, q_heads, q_len, head_dim = q.shape
    q = q.contiguous()
    t = {name: x.contiguous() for name, x in kv.tensors().items()}  # no-ops for the format's own tensors
    m = (q_heads // kv.kv_heads) * q_len
    steps, columns = launch_geometry(q, kv)
    if num_splits is None:
        splits, per_split = split_plan(steps, columns, target.num_sms)
    else:
        splits, per_split = _even_splits(steps, min(num_splits, steps))
    out = torch.empty_like(q)
    combined = splits > 1 or kv.prefix_len > 0  # partials, then the combine kernel (which attends the prefix)
    rows = batch * kv.kv_heads * splits * m if combined else 0
    part_m = torch.empty(rows, dtype=torch.float32, device=q.device)
    part_l = torch.empty(rows, dtype=torch.float32, device=q.device)
    part_acc = torch.empty(rows * head_dim, dtype=torch.float32, device=q.device)
    n_out = t["key_out_idx"].shape[-1]

    def ptr(name: str, present: bool = True) -> int:
        return t[name].data_ptr() if present and t[name].numel() else 0

    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else None
    target.module.gear_decode(
        q.data_ptr(), ptr("key_codes"), ptr("key_scale"), ptr("key_zero"), ptr("key_out_idx", n_out > 0),
        ptr("key_out_val", n_out > 0), ptr("key_lr_a", cfg.rank > 0), ptr("key_lr_b", cfg.rank > 0),
        ptr("key_lr_scale", cfg.rank > 0), ptr("value_codes"), ptr("value_scale"), ptr("value_zero"),
        ptr("value_out_idx", n_out > 0), ptr("value_out_val", n_out > 0), ptr("value_lr_a", cfg.rank > 0),
        ptr("value_lr_b", cfg.rank > 0), ptr("value_lr_scale", cfg.rank > 0),
        ptr("tail_keys"), ptr("tail_values"), mask.data_ptr() if mask is not None else 0,
        part_m.data_ptr() if rows else 0, part_l.data_ptr() if rows else 0, part_acc.data_ptr() if rows else 0,
        out.data_ptr(), ptr("prefix_keys"), ptr("prefix_values"), batch * kv.kv_heads, kv.kv_heads, m, kv.nblocks,
        cfg.buffer_tokens, kv.tail_len, kv.prefix_len, cfg.bits, cfg.group_size, head_dim, n_out, cfg.rank,
        cfg.factor_bits, splits, per_split,
        float(scale) * _LOG2E, _DTYPE_CODES[q.dtype], target.stream, dependent_launch,
    )
    return out
