"""The packed quantized-weight format: 2/3/4-bit codes + fp16 group scales/zeros or a per-row
lookup table, optional CSR outliers, optional low-rank path. This is the contract the kernels
read; everything below is exactly what they load.

Shapes. ``W`` is (N, K) (``nn.Linear`` layout). ``g`` ∈ {32, 64, 128} is the group size along K,
``K_pad = ceil(K / g)·g`` and ``G = K_pad / g``. Codes ``q[n, k]`` are unsigned in ``[0, 2^b − 1]``;
codes at ``k ≥ K`` are 0 (kernels mask them).

Dequantization.
* uniform (asymmetric) mode: ``Ŵ[n, k] = (q[n, k] − zeros[n, k // g]) · scales[n, k // g]``, with
  ``scales``, ``zeros`` fp16 (N, G); zeros may be fractional.
* lookup-table mode (SqueezeLLM style): ``Ŵ[n, k] = lut[n, q[n, k]]``, ``lut`` fp16 (N, 2^b); no
  scales/zeros (``group_size`` still sets the padding ``K_pad``).

Second-level statistics (SpQR style, optional, uniform mode). Instead of fp16 ``scales``/``zeros``
the format stores integer zero points and 4-bit scale codes on a log2 grid shared by blocks of
``STAT_ROWS = 16`` consecutive output rows of one group column (the direction GPTQ fixes them in:
all rows of a group at once):

* ``stat_codes`` uint8 (N, G): scale code in the low nibble, the zero point (an integer in
  ``[0, 2^b − 1]``, exact) in the high nibble;
* ``stat_meta`` fp16 (2, ceil(N/16), G): planes ``[log2_lo, log2_step]``;
* ``scales[n, j] = exp2(log2_lo[n // 16, j] + (stat_codes[n, j] & 15) · log2_step[n // 16, j])``
  (evaluated in fp32, not rounded to fp16: the number every kernel and the reference use),
  ``zeros[n, j] = stat_codes[n, j] >> 4``.

The log grid bounds the *relative* error of every scale (on all-MiniLM-L6-v2 at g32: mean +2.8%,
worst +30%; a linear grid has the same mean but a worst case of +330% for the small scales of a
block). Codes are rounded *up* (decoded scale ≥ the min/max scale), so a group's range is never
clipped by the coarser scale. Per group this costs 8 + 32/16 = 10 bits instead of 32: at g = 32
the overhead drops from 1.0 to 0.3125 bits per weight, so 3-bit g32 costs 3.3125 bits against
3.25 for g128 with fp16 statistics. ``scales``/``zeros`` are then ``None``.

Bit layout. Codes are packed into int32 words, row-major (N, words). With ``E`` codes per word and
``B`` bits per code, code ``k`` of row ``n`` sits in word ``k // E`` at bit offset ``(k % E)·B``
(bit 0 = least significant; bit 31 is an ordinary payload bit, so a word may read negative as
int32 — unpack through an unsigned view / ``& mask`` after the shift).
* 4-bit: ``qweight`` (N, K_pad/8), E = 8, B = 4.
* 2-bit: ``qweight`` (N, K_pad/16), E = 16, B = 2.
* 3-bit: two bit planes, exactly 3 bits per code. ``qweight`` (N, K_pad/16) holds the low two bits
  ``q & 3`` laid out as in 2-bit mode; ``qweight_hi`` (N, K_pad/32) holds the high bit ``q >> 2``
  with E = 32, B = 1. ``q = lo | (hi << 2)``. (A 3-bit code never straddles a word.)
Since ``g ≥ 32``, ``K_pad`` is a multiple of 32 and every plane divides evenly.
To unpack a tile: load word ``k // E`` (neighbouring k share the address), shift right by
``(k % E)·B``, mask ``(1 << B) − 1``.

Outliers (additive, ``Ŵ_total = Ŵ + S``): CSR by output row. ``outlier_rowptr`` int32 (N+1),
``outlier_cols`` int16 read as unsigned (``col & 0xFFFF``, hence K ≤ 65535), ``outlier_vals`` fp16
= ``w − Ŵ`` at that position (the residual, so ``Ŵ + S`` gives back the kept value to fp16
precision). nnz may be 0. Absent (``None``) when the format has no sparse part at all.

Low-rank path (optional): ``lr_u`` (N, r), ``lr_v`` (r, K) in fp16 (or the compute dtype):
``y = x (Ŵ + S)ᵀ + (x lr_vᵀ) lr_uᵀ + bias``.

Bytes: every stored tensor counts (qweight, qweight_hi, scales, zeros, stat_codes, stat_meta, lut,
rowptr, cols, vals, lr_u, lr_v); ``bits_per_weight = 8·nbytes / (N·K)``. 4-bit g128 uniform:
4 + 32/128 = 4.25 for K a multiple of 128.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from lowrank_ops.core.checks import check_choice, check_device, check_dim, check_format_metadata, check_int, check_lowrank_pair, check_tensor

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128)
MAX_OUTLIER_K = 65535
STAT_BITS = 4  # second-level codes of a scale or a zero (two per uint8)
STAT_ROWS = 16  # output rows sharing one second-level (lo, step) pair
_LR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TENSOR_FIELDS = (
    "qweight", "qweight_hi", "scales", "zeros", "stat_codes", "stat_meta", "lut",
    "outlier_rowptr", "outlier_cols", "outlier_vals", "lr_u", "lr_v",
)


def padded_k(in_features: int, group_size: int) -> int:
    """``K_pad = ceil(K / g) · g``."""
    return -(-in_features // group_size) * group_size


def _planes(bits: int) -> list[tuple[int, int]]:
    """(bits per code, shift of the code's bits) of each packed plane, low plane first."""
    return {4: [(4, 0)], 2: [(2, 0)], 3: [(2, 0), (1, 2)]}[bits]


def _check_bits(bits: object) -> int:
    return check_choice("bits", bits, BITS)


def _check_group_size(group_size: object) -> int:
    return check_choice("group_size", group_size, GROUP_SIZES)


# ----------------------------------------------------------------------------- packing


def _pack_plane(q: Tensor, width: int) -> Tensor:
    """(N, K) codes of ``width`` bits → (N, K·width/32) int32 words (code k at bit (k % E)·width)."""
    per_word = 32 // width
    n, k = q.shape
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * width
    words = (q.reshape(n, k // per_word, per_word) << shifts).sum(-1)  # < 2^32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # same bits, as signed int32
    return words.to(torch.int32)


def _unpack_plane(words: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_pack_plane`: (N, W) int32 → (N, W·32/width) int64 codes."""
    per_word = 32 // width
    n = words.shape[0]
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * width
    codes = (unsigned[:, :, None] >> shifts) & ((1 << width) - 1)
    return codes.reshape(n, -1)


def pack_codes(q: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """Pack (N, K_pad) codes in ``[0, 2^bits − 1]`` into ``(qweight, qweight_hi)`` (int32 words; the
    high plane only for 3 bits, else ``None``). ``K_pad`` must be a multiple of 32."""
    bits = _check_bits(bits)
    check_tensor("q", q, ndim=2, dtypes=(torch.uint8, torch.int16, torch.int32, torch.int64))
    if q.shape[1] % 32:
        raise ValueError(f"q: expected a number of columns (K_pad) that is a multiple of 32, got shape {tuple(q.shape)}")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"q: expected codes in [0, {(1 << bits) - 1}] for {bits} bits, got range [{int(q.min())}, {int(q.max())}]")
    planes = [_pack_plane((q >> shift) & ((1 << width) - 1), width) for width, shift in _planes(bits)]
    return planes[0], (planes[1] if bits == 3 else None)


def unpack_codes(qweight: Tensor, qweight_hi: Tensor | None, bits: int, k_pad: int) -> Tensor:
    """Codes (N, ``k_pad``) uint8 from the packed words (inverse of :func:`pack_codes`, bit-exact)."""
    bits = _check_bits(bits)
    k_pad = check_int("k_pad", k_pad, low=0)
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    plane_shapes = [k_pad * width // 32 for width, _ in _planes(bits)]
    if k_pad % 32:
        raise ValueError(f"k_pad: expected a multiple of 32, got {k_pad}")
    check_dim("qweight", qweight, 1, plane_shapes[0], f"K_pad·{_planes(bits)[0][0]}/32 words")
    if bits == 3:
        check_tensor("qweight_hi", qweight_hi, ndim=2, dtypes=(torch.int32,))
        check_dim("qweight_hi", qweight_hi, 0, qweight.shape[0], "out_features")
        check_dim("qweight_hi", qweight_hi, 1, plane_shapes[1], "K_pad/32 words")
    elif qweight_hi is not None:
        raise ValueError(f"qweight_hi: expected None for {bits}-bit codes, got a tensor of shape {tuple(qweight_hi.shape)}")
    planes = [qweight] + ([qweight_hi] if bits == 3 else [])
    q = sum(_unpack_plane(p, width) << shift for p, (width, shift) in zip(planes, _planes(bits)))
    return q.to(torch.uint8)


# ----------------------------------------------------------------------------- second-level statistics


def stat_blocks(out_features: int) -> int:
    """Second-level blocks along the output rows: ``ceil(N / STAT_ROWS)``."""
    return -(-out_features // STAT_ROWS)


def pack_group_stats(scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """Second-level form of (N, G) float ``scales`` (> 0) and integer ``zeros`` in [0, 15]:
    ``stat_codes`` uint8 (N, G) and ``stat_meta`` fp16 (2, ceil(N/16), G) (module docstring).

    Per block of 16 rows of a column, in log2 of the scales: ``lo`` = the smallest, rounded down
    to fp16; ``step`` = (largest − lo) / 15 rounded up to fp16; codes = ceil((log2 s − lo) / step),
    so the decoded scale is never below the one asked for (to fp32 rounding)."""
    check_tensor("scales", scales, ndim=2)
    check_tensor("zeros", zeros, ndim=2)
    if scales.shape != zeros.shape:
        raise ValueError(f"zeros: expected shape {tuple(scales.shape)} (that of scales), got {tuple(zeros.shape)}")
    n, g = scales.shape
    if n == 0:
        raise ValueError("scales: expected at least one output row, got shape (0, ...)")
    if g and not bool((scales > 0).all() & torch.isfinite(scales).all()):
        raise ValueError(f"scales: expected positive finite scales, got range [{float(scales.min())}, {float(scales.max())}]")
    top = (1 << STAT_BITS) - 1
    zf = zeros.float()
    if g and (bool((zf != zf.round()).any()) or float(zf.min()) < 0 or float(zf.max()) > top):
        raise ValueError(f"zeros: expected integers in [0, {top}] (second-level zero points), got range [{float(zf.min())}, {float(zf.max())}]")
    log_s = torch.log2(scales.float())
    nb = stat_blocks(n)
    blocks = torch.cat([log_s, log_s[-1:].expand(nb * STAT_ROWS - n, g)]).reshape(nb, STAT_ROWS, g)  # pad: repeat a row
    low = blocks.amin(1)
    lo = _round_fp16(low, down=True)
    step = _round_fp16((blocks.amax(1) - lo.float()) / top, down=False)
    row_block = torch.arange(n, device=scales.device) // STAT_ROWS
    lo_rows, step_rows = lo.float()[row_block], step.float()[row_block]
    codes = torch.where(step_rows > 0, torch.ceil((log_s - lo_rows) / step_rows.clamp_min(2.0**-24)), 0.0).clamp_(0, top)
    packed = codes.to(torch.int64) | (zf.to(torch.int64) << STAT_BITS)
    return packed.to(torch.uint8), torch.stack([lo, step]).contiguous()


def _round_fp16(x: Tensor, *, down: bool) -> Tensor:
    """``x`` (float32) to fp16, rounded toward −∞ (``down``) or +∞."""
    h = x.half()
    wrong = h.float() > x if down else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, -math.inf if down else math.inf)), h)


def group_stats_layout(quantized: bool, out_features: int, groups: int) -> tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]:
    """(name, dtype, shape) of the uniform mode's two group-statistics tensors: fp16 ``scales`` and
    ``zeros`` (N, G), or, ``quantized``, ``stat_codes`` uint8 (N, G) and ``stat_meta`` fp16
    (2, ceil(N/16), G). Kernels and ops take them in the same two slots, told apart by dtype."""
    if quantized:
        return (("stat_codes", torch.uint8, (out_features, groups)),
                ("stat_meta", torch.float16, (2, stat_blocks(out_features), groups)))
    return (("scales", torch.float16, (out_features, groups)), ("zeros", torch.float16, (out_features, groups)))


def stats_are_quantized(first: Tensor | None) -> bool:
    """Whether the first group-statistics slot holds second-level codes (uint8), not fp16 scales."""
    return first is not None and first.dtype == torch.uint8


def float_group_stats(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """(scales, zeros) float32 (N, G) from either form of the group statistics."""
    if stats_are_quantized(first):
        return unpack_group_stats(first, second)
    return first.float(), second.float()


def unpack_group_stats(stat_codes: Tensor, stat_meta: Tensor) -> tuple[Tensor, Tensor]:
    """(scales, zeros) float32 (N, G) the kernels compute from the second-level form."""
    n = stat_codes.shape[0]
    row_block = torch.arange(n, device=stat_codes.device) // STAT_ROWS
    meta = stat_meta.float()[:, row_block]  # (2, N, G)
    codes = stat_codes.to(torch.int64)
    scales = torch.exp2(meta[0] + (codes & ((1 << STAT_BITS) - 1)).float() * meta[1])
    return scales, (codes >> STAT_BITS).float()


# ----------------------------------------------------------------------------- outliers


def outliers_to_csr(mask: Tensor, residual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSR (row pointers int32 (N+1), columns int16 read as unsigned, values fp16) of
    ``residual`` at the ``True`` entries of ``mask`` (both (N, K)); columns ascend within a row."""
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    check_tensor("residual", residual, ndim=2, dtypes=None)
    if residual.shape != mask.shape:
        raise ValueError(f"residual: expected shape {tuple(mask.shape)} (that of mask), got {tuple(residual.shape)}")
    n, k = mask.shape
    if k > MAX_OUTLIER_K:
        raise ValueError(f"mask: expected at most {MAX_OUTLIER_K} columns (16-bit column indices), got {k}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: sorted by row, then column
    counts = torch.bincount(rows, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    rowptr[1:] = counts.cumsum(0)
    cols = torch.where(cols >= 2**15, cols - 2**16, cols).to(torch.int16)
    return rowptr.to(torch.int32), cols, residual[rows, cols.to(torch.int64) & 0xFFFF].to(torch.float16)


def csr_coordinates(rowptr: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) int64 index of every CSR entry (columns read as unsigned 16-bit)."""
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    # output_size: no device-to-host sync (so this can run inside a CUDA-graph capture)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=cols.device), counts, output_size=cols.numel())
    return rows, cols.to(torch.int64) & 0xFFFF


def csr_to_dense(rowptr: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense (N, K) ``S`` from the CSR arrays (the reference for the kernels' sparse part)."""
    n, k = shape
    dense = torch.zeros(n, k, dtype=dtype, device=vals.device)
    if vals.numel() == 0:
        return dense
    dense.index_put_(csr_coordinates(rowptr, cols), vals.to(dtype), accumulate=True)
    return dense


# ----------------------------------------------------------------------------- the format


@dataclass
class QuantFormat:
    """One quantized (out_features × in_features) weight; see the module docstring for the layout.

    Uniform mode has group statistics — fp16 ``scales``/``zeros``, or their second-level form
    ``stat_codes``/``stat_meta`` — and no ``lut``; lookup-table mode has ``lut`` alone. The three
    outlier tensors are all present or all ``None``; so are ``lr_u``/``lr_v``.
    """

    qweight: Tensor
    qweight_hi: Tensor | None
    scales: Tensor | None
    zeros: Tensor | None
    lut: Tensor | None
    outlier_rowptr: Tensor | None
    outlier_cols: Tensor | None
    outlier_vals: Tensor | None
    lr_u: Tensor | None
    lr_v: Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    stat_codes: Tensor | None = None
    stat_meta: Tensor | None = None

    NAME = "quant"

    def __post_init__(self) -> None:
        self.validate()

    # --------------------------------------------------------------- metadata
    @property
    def is_lut(self) -> bool:
        """Lookup-table (non-uniform) mode."""
        return self.lut is not None

    @property
    def quantized_stats(self) -> bool:
        """Scales/zeros stored in the 4-bit second-level form (``stat_codes``/``stat_meta``)."""
        return self.stat_codes is not None

    def group_stats(self) -> tuple[Tensor | None, Tensor | None]:
        """The two group-statistics tensors as the kernels take them: (scales, zeros) fp16, or
        (stat_codes, stat_meta) in the second-level form; (None, None) in lookup-table mode."""
        if self.quantized_stats:
            return self.stat_codes, self.stat_meta
        return self.scales, self.zeros

    def op_tensors(self) -> tuple[Tensor | None, ...]:
        """The tensors ``quant_linear`` takes after x, in its order: qweight, qweight_hi, the two
        statistics slots (:meth:`group_stats`), lut, the three outlier tensors, lr_u, lr_v."""
        return (self.qweight, self.qweight_hi, *self.group_stats(), self.lut, self.outlier_rowptr, self.outlier_cols,
                self.outlier_vals, self.lr_u, self.lr_v)

    @property
    def k_pad(self) -> int:
        return padded_k(self.in_features, self.group_size)

    @property
    def num_groups(self) -> int:
        return self.k_pad // self.group_size

    @property
    def has_outliers(self) -> bool:
        return self.outlier_vals is not None

    @property
    def nnz(self) -> int:
        return 0 if self.outlier_vals is None else self.outlier_vals.numel()

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else self.lr_u.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors (absent ones left out), by field name."""
        return {name: getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None}

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    # --------------------------------------------------------------- checks
    def validate(self) -> None:
        bits = _check_bits(self.bits)
        g = _check_group_size(self.group_size)
        n = check_int("out_features", self.out_features, low=1)
        k = check_int("in_features", self.in_features, low=1)
        k_pad = padded_k(k, g)
        check_tensor("qweight", self.qweight, ndim=2, dtypes=(torch.int32,))
        check_dim("qweight", self.qweight, 0, n, "out_features")
        check_dim("qweight", self.qweight, 1, k_pad * _planes(bits)[0][0] // 32, f"K_pad·{_planes(bits)[0][0]}/32 int32 words, K_pad={k_pad}")
        dev = self.qweight.device


        if bits == 3:
            check_tensor("qweight_hi", self.qweight_hi, ndim=2, dtypes=(torch.int32,))
            check_dim("qweight_hi", self.qweight_hi, 0, n, "out_features")
            check_dim("qweight_hi", self.qweight_hi, 1, k_pad // 32, f"K_pad/32 int32 words, K_pad={k_pad}")
            check_device("qweight_hi", self.qweight_hi, dev, "qweight")
        elif self.qweight_hi is not None:
            raise ValueError(f"qweight_hi: expected None for {bits}-bit codes (only 3-bit has a high plane), got a tensor")

        given = [name for name in ("scales", "zeros", "stat_codes", "stat_meta") if getattr(self, name) is not None]
        if self.lut is not None:
            if given:
                raise ValueError(f"{'/'.join(given)}: expected None in lookup-table mode (lut given), got tensors")
            check_tensor("lut", self.lut, ndim=2, dtypes=(torch.float16,))
            check_dim("lut", self.lut, 0, n, "out_features")
            check_dim("lut", self.lut, 1, 1 << bits, "2^bits table entries")
            check_device("lut", self.lut, dev, "qweight")
        else:
            quantized = "stat_codes" in given or "stat_meta" in given
            if quantized and ("scales" in given or "zeros" in given):
                raise ValueError("scales/zeros: expected None with second-level statistics (stat_codes/stat_meta given), got tensors")
            for name, dtype, shape in group_stats_layout(quantized, n, k_pad // g):
                t = getattr(self, name)
                if t is None:
                    raise ValueError(f"{name}: expected a {dtype} tensor of shape {shape} in uniform mode (no lut), got None")
                check_tensor(name, t, ndim=len(shape), dtypes=(dtype,))
                for dim, size in enumerate(shape):
                    check_dim(name, t, dim, size, f"shape {shape} (G = K_pad / group_size = {k_pad // g})")
                check_device(name, t, dev, "qweight")

        sparse = [self.outlier_rowptr, self.outlier_cols, self.outlier_vals]
        if any(t is not None for t in sparse):
            if any(t is None for t in sparse):
                raise ValueError("outlier_rowptr/outlier_cols/outlier_vals: expected all three or none, got a partial set")
            if k > MAX_OUTLIER_K:
                raise ValueError(f"in_features: expected at most {MAX_OUTLIER_K} with outliers (16-bit columns), got {k}")
            check_tensor("outlier_rowptr", self.outlier_rowptr, ndim=1, dtypes=(torch.int32,))
            check_dim("outlier_rowptr", self.outlier_rowptr, 0, n + 1, "out_features + 1")
            check_tensor("outlier_cols", self.outlier_cols, ndim=1, dtypes=(torch.int16,))
            check_tensor("outlier_vals", self.outlier_vals, ndim=1, dtypes=(torch.float16,))
            nnz = self.outlier_vals.numel()
            check_dim("outlier_cols", self.outlier_cols, 0, nnz, "nnz = outlier_vals.numel()")
            for name, t in zip(("outlier_rowptr", "outlier_cols", "outlier_vals"), sparse):
                check_device(name, t, dev, "qweight")
            ptr = self.outlier_rowptr
            if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
                raise ValueError(f"outlier_rowptr: expected non-decreasing pointers from 0 to nnz={nnz}, got first {int(ptr[0])}, last {int(ptr[-1])}")
            if nnz and int((self.outlier_cols.to(torch.int64) & 0xFFFF).max()) >= k:
                raise ValueError(f"outlier_cols: expected column indices < in_features={k}, got {int((self.outlier_cols.to(torch.int64) & 0xFFFF).max())}")

        check_lowrank_pair(self.lr_u, self.lr_v, n, k, _LR_DTYPES)
        if self.lr_u is not None:
            check_device("lr_u", self.lr_u, dev, "qweight")
            check_device("lr_v", self.lr_v, dev, "qweight")

    # --------------------------------------------------------------- bytes
    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales/zeros or LUT, CSR arrays, low-rank factors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """``8·nbytes / (N·K)``: stored bits per entry of the dense weight, all overheads included."""
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    # --------------------------------------------------------------- reference dequantization
    def codes(self) -> Tensor:
        """Unpacked codes, (N, K_pad) uint8 (columns ≥ K are 0)."""
        return unpack_codes(self.qweight, self.qweight_hi, self.bits, self.k_pad)

    def float_stats(self) -> tuple[Tensor, Tensor]:
        """(scales, zeros) float32 (N, G) as the kernels read them (uniform mode)."""
        return float_group_stats(*self.group_stats())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Ŵ`` alone (N, K): the quantized base without outliers and low-rank path."""
        q = self.codes()[:, : self.in_features].to(torch.int64)
        if self.lut is not None:
            return torch.gather(self.lut.to(dtype), 1, q)
        group = torch.arange(self.in_features, device=q.device) // self.group_size
        scales, zeros = (t.to(dtype)[:, group] for t in self.float_stats())
        return (q.to(dtype) - zeros) * scales

    def sparse_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``S`` as a dense (N, K) tensor (zeros without outliers)."""
        if not self.has_outliers:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.device)
        return csr_to_dense(self.outlier_rowptr, self.outlier_cols, self.outlier_vals,
                            (self.out_features, self.in_features), dtype)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reference dequantization ``Ŵ + S + lr_u·lr_v`` (N, K), computed in ``dtype``."""
        w = self.dequantized(dtype)
        if self.has_outliers:
            w = w + self.sparse_dense(dtype)
        if self.lr_u is not None:
            w = w + self.lr_u.to(dtype) @ self.lr_v.to(dtype)
        return w

    # --------------------------------------------------------------- (de)serialisation
    def config(self) -> dict[str, Any]:
        """JSON-able static metadata (enough, with :meth:`to_state_dict`, to rebuild the format)."""
        return {
            "format": self.NAME,
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "lut": self.is_lut,
            "quantized_stats": self.quantized_stats,
            "outliers": self.has_outliers,
            "rank": self.rank,
        }

    def to_state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> "QuantFormat":
        """Rebuild from :meth:`to_state_dict` + :meth:`config`; refuses missing or extra tensors."""
        check_format_metadata(state, metadata, ("format", "bits", "group_size", "in_features", "out_features", "lut", "outliers", "rank"), cls.NAME, "QuantFormat")
        bits = _check_bits(metadata["bits"])
        expected = {"qweight"}
        expected |= {"qweight_hi"} if bits == 3 else set()
        stats = {"stat_codes", "stat_meta"} if metadata.get("quantized_stats", False) else {"scales", "zeros"}
        expected |= {"lut"} if metadata["lut"] else stats
        expected |= {"outlier_rowptr", "outlier_cols", "outlier_vals"} if metadata["outliers"] else set()
        expected |= {"lr_u", "lr_v"} if metadata["rank"] else set()
        got = set(state)
        if got != expected:
            raise ValueError(
                f"state: expected tensors {sorted(expected)}, got {sorted(got)} "
                f"(missing {sorted(expected - got)}, unexpected {sorted(got - expected)})"
            )
        fmt = cls(
            **{name: state.get(name) for name in _TENSOR_FIELDS},
            bits=bits,
            group_size=metadata["group_size"],
            in_features=metadata["in_features"],
            out_features=metadata["out_features"],
        )
        if fmt.rank != metadata["rank"]:
            raise ValueError(f"state: expected low-rank factors of rank {metadata['rank']} (metadata), got rank {fmt.rank}")
        return fmt


def dense_nbytes(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed (N, K) weight in ``dtype``."""
    return out_features * in_features * torch.empty((), dtype=dtype).element_size()
