"""GEAR compression: (keys, values) → :class:`~lowrank_ops.kvcache.format.GEARKV`.

A block of B tokens is compressed once into quantized codes, per-vector outliers and a rank-r
term ``L`` (per sequence, head and block), with ``X ≈ deq + outliers + L``:

1. ``lowrank_fit="joint"`` (default) starts from ``L₀`` = the rank-r approximation of the data
   ``X`` itself; ``"residual"`` (GEAR's order) starts from ``L₀ = 0``;
2. quantization with outliers of ``X − L₀`` (:func:`quantize_reference`, or the fused Triton
   kernel of :mod:`kernels.kvcache_compress` on a GPU): per vector the n entries farthest from
   its mean (GEAR's rule, ``outlier_rule="extremes"``: the largest and smallest halves) are set
   aside (:func:`outlier_slots`); keys are quantized per channel over groups of
   ``group_size`` tokens, values per token over groups of ``group_size`` channels, with min/max
   asymmetric parameters of the remaining entries; the outliers keep ``x − deq`` in fp16;
3. ``L`` = the rank-r approximation of what quantization and outliers leave, ``X − deq −
   outliers``, stored as factors (:func:`lowrank_factors`; :func:`lowrank_basis` runs
   ``power_iters`` subspace iterations with Gram-Schmidt orthonormalization (:func:`orthonormalize`,
   batched torch ops; one Triton kernel per fit on a GPU); ``L₀`` is
   ``X V₀ V₀ᵀ`` in float32, never stored). The joint refit starts from V₀ and runs one
   iteration less (at least one): on MiniLM as good as ``power_iters`` from the fixed start.

The format (and so every decode kernel) is the same for both orders. The joint start takes the
data's dominant low-rank structure (channel offsets of the values, token-wide patterns of the
keys) out before quantization, so the quantization groups span a smaller range; on MiniLM's
keys and values it cuts GEAR's error by 20-23 % at the same bits (``tests/test_kvcache_quality.py``).

Quantization parameters (identical in the kernel): over the kept entries of a group,
``scale = fp16(max((mx − mn)/maxq, max(|mn|, |mx|)·2⁻¹⁰, 2⁻¹⁴))`` (the floors keep the zero
point within ±1024 and away from a zero scale; a group with no kept entry uses mn = mx = 0),
``zero = fp16(−mn / scale)``, ``code = clamp(floor(x / scale + zero + ½), 0, maxq)``. With
``config.clip_search`` (default at 2 bits) mn and mx are first narrowed to the range of
:func:`clipped_range` (the kept entries' least squared error among trims of either end of the span).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_device, check_finite, check_same, check_tensor
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.kvcache.format import FACTOR_DTYPES, GEARKV, INT8_BASIS_SCALE, TAIL_DTYPES, pack_last

REL_SCALE_FLOOR = 2.0**-10  # scale ≥ max(|mn|, |mx|) · this: |zero| ≤ 1024, exact enough in fp16
ABS_SCALE_FLOOR = 2.0**-14  # smallest normal fp16
_BASIS_SEED = 0x6EA2
DEPENDENT = 1e-5  # a Gram-Schmidt column keeping less of its norm than this is dependent: zero
# K (or V) entries compressed per pass: 8 kv heads x 65,536 tokens x 128 took 5.2 GB above the
# inputs (20x their 256 MB) and 17.6 s in one pass on this project's CPU, 0.62 GB and 6.6 s at this
PASS_ENTRIES = 1 << 22
# clip_search: the fractions of a group's min-max span trimmed off its low and its high end, each
# independently (3 x 3 ranges, untrimmed first). Powers of two, so every trimmed bound is one
# rounding of an exact product, the same in the kernel with or without FMA. On MiniLM
# (tests/test_kvcache_quality.py) at 2 bits they cut GEAR's attention-output error by 19 %:
# centred shrinks to 90/80/70 % cut 14 %, a 4 x 4 grid (to 3/16) lowered K and V more but the
# output less.
CLIP_STEPS = (0.0, 1.0 / 16, 1.0 / 8)


# ----------------------------------------------------------------------------- quantization (reference)
def quant_params(mn: Tensor, mx: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16-representable (scale, zero), as float32, of the min/max of a group (mx < mn: empty group)."""
    empty = mx < mn
    mn = torch.where(empty, 0.0, mn)
    mx = torch.where(empty, 0.0, mx)
    spread = (mx - mn) * (1.0 / ((1 << bits) - 1))
    floor = torch.maximum(mn.abs(), mx.abs()) * REL_SCALE_FLOOR
    scale = torch.maximum(torch.maximum(spread, floor), torch.full_like(spread, ABS_SCALE_FLOOR)).half().float()
    zero = (-mn / scale).half().float()
    return scale, zero


def quantized(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(:func:`quant_codes`, ``x − deq``): the codes of ``x`` and their float32 error."""
    codes = quant_codes(x, scale, zero, bits)
    return codes, x - (codes - zero) * scale


def quant_codes(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``clamp(floor(x / scale + zero + ½), 0, maxq)`` as float32 (round half up, as the kernel)."""
    return torch.floor(x / scale + zero + 0.5).clamp_(0, (1 << bits) - 1)


def outlier_distance(x: Tensor) -> Tensor:
    """|x − mean| of each entry over the last dim, in float32: the mean is summed in float64 (so
    its value does not depend on the summation order: the kernel's agrees) and rounded once."""
    mean = (x.double().sum(-1, keepdim=True) / x.shape[-1]).float()
    return (x - mean).abs()


def outlier_slots(x: Tensor, n_out: int, rule: str = "farthest") -> Tensor:
    """int64 (..., D): slot 0..n_out−1 of each outlier entry of the last dim, −1 elsewhere.

    ``rule`` (``GEARConfig.outlier_rule``): "farthest", the n_out entries farthest from the
    vector's mean (:func:`outlier_distance`), slot 0 the farthest; "extremes" (GEAR's), the
    ceil(n/2) largest entries in descending order, then the floor(n/2) smallest in ascending
    order. On ties the first index wins (``argmax``), exactly as the kernel picks.
    """
    slot = torch.full(x.shape, -1, dtype=torch.int64, device=x.device)
    work, n_hi = (outlier_distance(x), n_out) if rule == "farthest" else (x.clone(), (n_out + 1) // 2)
    for i in range(n_out):
        if i == n_hi:  # "extremes": the smallest of the entries left
            work = torch.where(slot >= 0, torch.inf, x)
        j = (work.argmax(-1) if i < n_hi else work.argmin(-1)).unsqueeze(-1)
        slot.scatter_(-1, j, i)
        work.scatter_(-1, j, -torch.inf if i < n_hi else torch.inf)
    return slot


def _masked_minmax(x: Tensor, keep: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    mn = torch.where(keep, x, torch.inf).amin(dim)
    mx = torch.where(keep, x, -torch.inf).amax(dim)
    return mn, mx


def clipped_range(x: Tensor, keep: Tensor, mn: Tensor, mx: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor]:
    """(lo, hi) per group of ``x`` (groups along ``dim``): among the ranges [mn + a·span, mx − b·span]
    for a, b in :data:`CLIP_STEPS` (span = mx − mn; a = b = 0 first), the one whose codes give the
    ``keep`` entries the least squared error (fp32 errors as :func:`quantize_reference` makes them,
    summed in float64; ties keep the earlier range; an empty group keeps mn > mx)."""
    empty = mx < mn
    lo0, hi0 = torch.where(empty, 0.0, mn), torch.where(empty, 0.0, mx)
    span = hi0 - lo0
    best_lo, best_hi, best = mn, mx, None
    for trim_lo in CLIP_STEPS:
        for trim_hi in CLIP_STEPS:
            lo = torch.where(empty, mn, lo0 + trim_lo * span)
            hi = torch.where(empty, mx, hi0 - trim_hi * span)
            scale, zero = quant_params(lo, hi, bits)
            s, z = scale.unsqueeze(dim), zero.unsqueeze(dim)
            err = torch.where(keep, quantized(x, s, z, bits)[1], 0.0)
            sse = err.double().square().sum(dim)
            better = torch.zeros_like(empty) if best is None else sse < best
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
            best = sse if best is None else torch.minimum(sse, best)
    return best_lo, best_hi


def quantize_reference(x: Tensor, config: GEARConfig, kind: str) -> dict[str, Tensor]:
    """Quantize (b, h, T, D) tokens (T a multiple of group_size) of ``kind`` "key" or "value".

    Returns ``codes`` (packed int32), ``scale``, ``zero`` (fp16, the format's shapes),
    ``out_idx`` (uint8), ``out_val`` (fp16) and ``residual`` = x − deq − outliers (float32).
    """
    b, h, t, d = x.shape
    g, bits, n_out = config.group_size, config.bits, config.outliers_per_vector(d)
    x = x.float()
    slot = outlier_slots(x, n_out, config.outlier_rule)
    keep = slot < 0
    # keys: per channel over groups of g tokens (dim 3); values: per token over groups of g channels (dim 4)
    shape, dim = ((b, h, t // g, g, d), 3) if kind == "key" else ((b, h, t, d // g, g), 4)
    grouped, kept = x.reshape(shape), keep.reshape(shape)
    mn, mx = _masked_minmax(grouped, kept, dim)
    if config.clip_search:
        mn, mx = clipped_range(grouped, kept, mn, mx, bits, dim)
    scale, zero = quant_params(mn, mx, bits)
    s, z = scale.repeat_interleave(g, dim - 1), zero.repeat_interleave(g, dim - 1)
    codes, err = quantized(x, s, z, bits)
    out_val = err.half()
    residual = err - torch.where(keep, 0.0, out_val.float())
    order = slot.clamp_min(0) + torch.where(keep, n_out, 0)  # outliers first, by slot
    out_idx = order.argsort(dim=-1, stable=True)[..., :n_out]
    return dict(
        codes=pack_last(codes.to(torch.int64), bits), scale=scale.half(), zero=zero.half(),
        out_idx=out_idx.to(torch.uint8), out_val=torch.gather(out_val, -1, out_idx), residual=residual,
    )


# ----------------------------------------------------------------------------- low rank
@functools.lru_cache(maxsize=32)
def _start_basis(head_dim: int, rank: int, device: torch.device) -> Tensor:
    """Fixed Gaussian (head_dim × rank) start of the subspace iteration: same data, same factors."""
    gen = torch.Generator().manual_seed(_BASIS_SEED)
    return torch.randn(head_dim, rank, generator=gen).to(device)


def orthonormalize(y: Tensor) -> Tensor:
    """Orthonormal columns spanning those of ``y`` (..., n, r), in order: classical Gram-Schmidt
    applied twice per column ("twice is enough": orthogonal to rounding for any numerically
    independent columns). A column left with less than :data:`DEPENDENT` of its norm (dependent
    on the ones before it, to rounding, or zero) becomes zero, so no direction is made of rounding
    noise and every implementation agrees on rank-deficient blocks. R's diagonal is positive, as
    in the Triton kernel (:mod:`kernels.kvcache_lowrank`). Batched torch ops, r steps whatever the
    batch: ``torch.linalg.qr``, used before, runs its Householder product one matrix at a time on
    CUDA (a cuSOLVER call per matrix: milliseconds for the batch · kv heads matrices of a block)."""
    q = torch.zeros_like(y)
    for j in range(y.shape[-1]):
        col = y[..., j]
        before = col.norm(dim=-1, keepdim=True)
        for _ in range(2):
            col = col - (q @ (q.transpose(-1, -2) @ col[..., None]))[..., 0]
        after = col.norm(dim=-1, keepdim=True)
        q[..., j] = torch.where(after > DEPENDENT * before, col / after.clamp_min(torch.finfo(y.dtype).tiny), 0.0)
    return q


def _fit_backend(x: Tensor, rank: int) -> str:
    """Triton (one program per block) or torch (the reference) for :func:`lowrank_basis`."""
    triton = backend.triton_support(x.device)
    if triton.ok:
        from lowrank_ops.kernels.kvcache_lowrank import misfit

        why = misfit(x.shape[-2], x.shape[-1], rank)
        triton = Support(not why, why)
    return backend.triton_or_reference("gear_lowrank_fit", "the GEAR low-rank fit", triton, x.device)


def lowrank_basis(x: Tensor, rank: int, power_iters: int, start: Tensor | None = None) -> Tensor:
    """Orthonormal float32 (b, h, nblocks, D, r) basis of the rank-r approximation of each block
    of ``x`` (b, h, nblocks, B, D): subspace iteration from ``start`` (default: a fixed Gaussian
    Ω), Y = X Ω, then ``power_iters`` times (Q = orth(Y), V = orth(Xᵀ Q), Y = X V), orth being
    :func:`orthonormalize`, on the backend :func:`select_backend` picks (Triton on a GPU when a
    block fits one program). The approximation is X V Vᵀ."""
    v = _start_basis(x.shape[-1], rank, x.device) if start is None else start
    if _fit_backend(x, rank) == "triton":
        from lowrank_ops.kernels.kvcache_lowrank import subspace_basis

        return subspace_basis(x, rank, power_iters, v)
    y = x @ v
    for _ in range(power_iters):
        q = orthonormalize(y)
        v = orthonormalize(x.transpose(-1, -2) @ q)
        y = x @ v
    return v


def lowrank_factors(residual: Tensor, rank: int, power_iters: int, factor_bits: int,
                    start: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-block rank-r factors of ``residual`` (b, h, nblocks, B, D) float32, stored as
    ``factor_bits`` asks (see :mod:`lowrank_ops.kvcache.format`): B = :func:`lowrank_basis`
    (from ``start``) rounded to its storage, A = E B with that rounded B (int8: A's columns scaled to ±127 per
    block). Returns ``lr_a`` (b, h, nblocks·B, r), ``lr_b`` (b, h, nblocks, D, r) and ``lr_scale``
    (b, h, nblocks, r for int8, 0 for fp16). At r = min(B, D) and fp16 factors the product is E
    up to fp16 rounding.
    """
    b, h, nblocks, buf, d = residual.shape
    int8 = factor_bits == 8
    scale = residual.new_empty(b, h, nblocks, rank if int8 else 0)
    if rank == 0:
        return (residual.new_empty(b, h, nblocks * buf, 0, dtype=FACTOR_DTYPES[factor_bits]),
                residual.new_empty(b, h, nblocks, d, 0, dtype=FACTOR_DTYPES[factor_bits]), scale)
    v = lowrank_basis(residual, rank, power_iters, start)
    # QR's Q is column-major; the format (and the kernels) read B row-major
    v = (v / INT8_BASIS_SCALE).round_().clamp_(-127, 127).to(torch.int8) if int8 else v.half()
    a = residual @ (v.float() * INT8_BASIS_SCALE if int8 else v.float())
    if int8:
        scale = a.abs().amax(dim=3) / 127
        scale = torch.where(scale > 0, scale, 1.0)
        a = (a / scale[:, :, :, None, :]).round_().clamp_(-127, 127)
    return a.reshape(b, h, nblocks * buf, rank).to(FACTOR_DTYPES[factor_bits]), v.contiguous(), scale


# ----------------------------------------------------------------------------- block compression
def _quantize(keys: Tensor, values: Tensor, config: GEARConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both quantizations of whole blocks, by the backend :func:`select_backend` picks."""
    triton = backend.triton_support(keys.device)
    if backend.triton_or_reference("gear_compress", "GEAR block compression", triton, keys.device) == "triton":
        from lowrank_ops.kernels.kvcache_compress import gear_quantize

        return gear_quantize(keys, values, config.bits, config.group_size, config.outliers_per_vector(keys.shape[-1]),
                             config.clip_search, config.outlier_rule)
    return quantize_reference(keys, config, "key"), quantize_reference(values, config, "value")


def compress_blocks(keys: Tensor, values: Tensor, config: GEARConfig) -> dict[str, Tensor]:
    """The format's 16 block tensors (``key_codes`` … ``value_lr_scale``) of (b, h, nblocks·B, D)
    tokens, compressed in passes of whole blocks of at most :data:`PASS_ENTRIES` entries each
    (blocks are independent; a pass's float32 working copies take about 20 times its fp16 size)."""
    check_finite("keys", keys)
    check_finite("values", values)
    b, h, t, d = keys.shape
    per_pass = max(1, PASS_ENTRIES // (b * h * config.buffer_tokens * d)) * config.buffer_tokens
    parts = [_compress_pass(keys[:, :, s: s + per_pass], values[:, :, s: s + per_pass], config)
             for s in range(0, max(t, 1), per_pass)]  # no block: one pass still gives the empty tensors
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts], dim=2) for name in parts[0]}


def _compress_pass(keys: Tensor, values: Tensor, config: GEARConfig) -> dict[str, Tensor]:
    """:func:`compress_blocks` of one pass."""
    b, h, t, d = keys.shape
    buf = config.buffer_tokens

    def blocks(x: Tensor) -> Tensor:
        return x.reshape(b, h, t // buf, buf, d)

    data = (keys.contiguous(), values.contiguous())
    starts, bases, refit_iters = [0.0, 0.0], [None, None], config.power_iters
    if config.rank > 0 and config.lowrank_fit == "joint":
        # the data's basis V₀ and L₀ = X V₀ V₀ᵀ (float32, never stored); the refit starts from V₀
        data = tuple(blocks(x.float()) for x in data)
        bases = [lowrank_basis(x, config.rank, config.power_iters) for x in data]
        starts = [(x @ v @ v.transpose(-1, -2)).reshape(b, h, t, d) for x, v in zip(data, bases)]
        data = tuple(x.reshape(b, h, t, d) - l0 for x, l0 in zip(data, starts))
        refit_iters = max(1, config.power_iters - 1)
    out = {}
    for kind, q, l0, v0 in zip(("key", "value"), _quantize(*data, config), starts, bases):
        left = q.pop("residual") + l0  # X − deq − outliers
        out.update({f"{kind}_{name}": tensor for name, tensor in q.items()})
        out[f"{kind}_lr_a"], out[f"{kind}_lr_b"], out[f"{kind}_lr_scale"] = lowrank_factors(
            blocks(left), config.rank, refit_iters, config.factor_bits, start=v0)
    return out


# ----------------------------------------------------------------------------- public API
def _check_kv(keys: object, values: object, config: object) -> tuple[Tensor, Tensor, GEARConfig]:
    if not isinstance(config, GEARConfig):
        raise TypeError(f"config: expected a GEARConfig, got {type(config).__name__}")
    check_tensor("keys", keys, ndim=4, dtypes=TAIL_DTYPES)
    check_tensor("values", values, ndim=4, dtypes=TAIL_DTYPES)
    if values.shape != keys.shape:
        raise ValueError(f"values: expected shape {tuple(keys.shape)} (that of keys), got {tuple(values.shape)}")
    check_same("values", values, "keys", keys)
    config.check_head_dim(keys.shape[-1], "keys")
    return keys, values, config


def compress(keys: Tensor, values: Tensor, config: GEARConfig) -> GEARKV:
    """Compress (batch, kv_heads, seq, head_dim) keys and values (fp16/bf16/fp32, seq ≥ 1).

    The first ``config.prefix_tokens`` tokens are kept as they are (the prefix); of the rest, the
    first full blocks of B tokens are compressed and the remaining ones go to the uncompressed
    tail. Grow the result with :meth:`GEARKV.append`.
    """
    keys, values, config = _check_kv(keys, values, config)
    b, h, t, d = keys.shape
    if t < 1:
        raise ValueError(f"keys: expected at least one token (dim 2), got shape {tuple(keys.shape)}")
    buf, p = config.buffer_tokens, min(config.prefix_tokens, t)
    t_c = p + (t - p) // buf * buf  # the end of the last full block
    blocks = compress_blocks(keys[:, :, p:t_c], values[:, :, p:t_c], config)
    tail_k = keys.new_zeros(b, h, buf, d)
    tail_v = values.new_zeros(b, h, buf, d)
    tail_k[:, :, : t - t_c] = keys[:, :, t_c:]
    tail_v[:, :, : t - t_c] = values[:, :, t_c:]
    return GEARKV(config=config, **blocks, tail_keys=tail_k, tail_values=tail_v, tail_len=t - t_c,
                  prefix_keys=keys[:, :, :p].clone(), prefix_values=values[:, :, :p].clone())


def append_tokens(kv: GEARKV, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor] | None:
    """Implementation of :meth:`GEARKV.append`: the prefix until it holds ``prefix_tokens``, then
    the tail; every B tail tokens become a block. Returns None when no block was compressed, else
    the raw keys and values from the old tail's start to the end (what the new blocks were
    compressed from, and the new tail)."""
    keys, values, _ = _check_kv(keys, values, kv.config)
    expected = (kv.batch, kv.kv_heads, keys.shape[2], kv.head_dim)
    if tuple(keys.shape) != expected:
        raise ValueError(f"keys: expected shape (batch, kv_heads, n, head_dim) = {expected} (that of the cache), got {tuple(keys.shape)}")
    if keys.dtype != kv.dtype:
        raise TypeError(f"keys: expected dtype {kv.dtype} (that of the cache), got {keys.dtype}")
    check_device("keys", keys, kv.device, "the cache")
    into_prefix = min(kv.config.prefix_tokens - kv.prefix_len, keys.shape[2])
    if into_prefix:
        kv.prefix_keys = torch.cat([kv.prefix_keys, keys[:, :, :into_prefix]], dim=2)
        kv.prefix_values = torch.cat([kv.prefix_values, values[:, :, :into_prefix]], dim=2)
        keys, values = keys[:, :, into_prefix:], values[:, :, into_prefix:]
    buf, n = kv.config.buffer_tokens, keys.shape[2]
    if kv.tail_len + n < buf:  # decode fast path: write into the tail buffer
        kv.tail_keys[:, :, kv.tail_len: kv.tail_len + n] = keys
        kv.tail_values[:, :, kv.tail_len: kv.tail_len + n] = values
        kv.tail_len += n
        return None
    all_k, all_v = keys, values  # (no copy of a prompt compressed into an empty tail)
    if kv.tail_len:
        all_k = torch.cat([kv.tail_keys[:, :, : kv.tail_len], keys], dim=2)
        all_v = torch.cat([kv.tail_values[:, :, : kv.tail_len], values], dim=2)
    t_c = all_k.shape[2] // buf * buf
    blocks = compress_blocks(all_k[:, :, :t_c], all_v[:, :, :t_c], kv.config)
    for name, tensor in blocks.items():
        have = getattr(kv, name)
        setattr(kv, name, torch.cat([have, tensor], dim=2) if have.shape[2] else tensor)
    rest = all_k.shape[2] - t_c
    kv.tail_keys[:, :, :rest] = all_k[:, :, t_c:]
    kv.tail_values[:, :, :rest] = all_v[:, :, t_c:]
    kv.tail_len = rest
    return all_k, all_v
