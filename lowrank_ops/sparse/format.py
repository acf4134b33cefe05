"""The packed N:M structured-sparse weight format: kept values + bit-packed in-group positions,
optionally with 4-bit quantized values and a low-rank compensation path. This is the contract
the kernels read; everything below is exactly what they load.

Shapes. ``W`` is (N, K) (``nn.Linear`` layout). Sparsity runs along K: in each group of ``m``
consecutive input columns exactly ``n`` weights are stored (some may be zero). ``m`` ∈ {4, 8, 16},
``1 ≤ n < m``, ``K`` a multiple of ``m``. ``G = K / m`` groups, ``KK = G·n`` kept values per row.

``values`` (N, KK), fp16/bf16/fp32, row-major contiguous: row r, group g, slot s (``0 ≤ s < n``)
is ``values[r, g·n + s]``; the n slots of a group are in strictly increasing column order.

``indices`` int32 (N, W), row-major contiguous: kept value j has an in-group position
``p_j ∈ [0, m)`` (its column is ``(j // n)·m + p_j``) coded on ``b = log2(m)`` bits;
``per_word = 32 // b`` positions per word (m=4: 16, m=8: 10 with the top two bits unused,
m=16: 8); value j lives in word ``j // per_word`` at bit offset ``(j % per_word)·b`` (bit 0 =
least significant; read the word unsigned: ``(word >> off) & (m − 1)``); ``W = ceil(KK /
per_word)``; every unused bit is 0.

Quantized values (optional): the (N, KK) values matrix stored as a 4-bit uniform
:class:`~lowrank_ops.quant.format.QuantFormat` (groups along KK, no outliers, no low-rank path)
instead of a dense tensor; same ``indices``.

Low-rank compensation (optional): ``lr_u`` (N, r), ``lr_v`` (r, K) in the compute dtype:
``y = x Wₙₘᵀ + (x lr_vᵀ) lr_uᵀ + bias``.

Bytes: values (or the quantized values' codes + scales + zeros) + indices + low-rank factors;
the bias is counted separately (:attr:`NMFormat.bias_nbytes`), as the other formats do.
``bits_per_weight = 8·nbytes / (N·K)``; fp16 values: 2:4 → 8 + 2·2/4 = 9, 1:4 → 4.5, 2:8 →
4 + 2·3.2/8 = 4.8 (10 three-bit positions per 32-bit word).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from lowrank_ops.core.checks import FLOAT_DTYPES, check_choice, check_device, check_dim, check_format_metadata, check_int, check_lowrank_pair, check_tensor
from lowrank_ops.quant.format import QuantFormat

M_CHOICES = (4, 8, 16)
_PACK_DTYPES = FLOAT_DTYPES + (torch.float64,)  # pack/unpack also serve float64 references
_TENSOR_FIELDS = ("values", "indices", "lr_u", "lr_v", "bias")


def check_nm(n: object, m: object) -> tuple[int, int]:
    """``m`` ∈ {4, 8, 16} and ``n`` an int in ``[1, m − 1]``; returns ``(n, m)``."""
    m = check_choice("m", m, M_CHOICES)
    n = check_int("n", n)
    if not 1 <= n < m:
        raise ValueError(f"n: expected 1 <= n < m={m} (n:m sparsity keeps n of every m weights), got n={n}")
    return n, m


def index_bits(m: int) -> int:
    """Bits ``b = log2(m)`` of one in-group position."""
    return {4: 2, 8: 3, 16: 4}[m]


def positions_per_word(m: int) -> int:
    """How many positions one int32 index word holds: ``32 // log2(m)``."""
    return 32 // index_bits(m)


def index_words(kept: int, m: int) -> int:
    """``W = ceil(KK / per_word)``: int32 words per row for ``kept`` = KK positions."""
    return -(-kept // positions_per_word(m))


def _check_in_features(in_features: object, m: int, name: str = "in_features") -> int:
    k = check_int(name, in_features, low=1)
    if k % m:
        raise ValueError(f"{name}: expected a multiple of m={m} (whole groups of m input columns), got {k}")
    return k


# ----------------------------------------------------------------------------- masks


def check_nm_mask(mask: Tensor, n: int, m: int) -> Tensor:
    """``mask`` is a bool (N, K) tensor with exactly ``n`` ``True`` in every group of ``m``
    consecutive columns; returns it."""
    n, m = check_nm(n, m)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    _check_in_features(mask.shape[1], m, "mask.shape[1]")
    counts = mask.reshape(mask.shape[0], -1, m).sum(-1)
    bad = counts != n
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"mask: expected exactly {n} kept entries in every group of {m} columns, got "
            f"{int(counts[row, group])} in row {row}, columns {group * m}..{group * m + m - 1} "
            f"({int(bad.sum())} bad groups)"
        )
    return mask


def nm_mask_from_scores(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool (N, K) mask keeping the ``n`` highest ``scores`` of every group of ``m`` columns
    (ties go to the lower column)."""
    n, m = check_nm(n, m)
    check_tensor("scores", scores, ndim=2, dtypes=_PACK_DTYPES)
    _check_in_features(scores.shape[1], m, "scores.shape[1]")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores: expected no NaN (a top-n choice is undefined), got NaN entries")
    rows = scores.shape[0]
    grouped = scores.reshape(rows, -1, m)
    # stable descending sort: equal scores keep column order, so ties go to the lower column
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros(grouped.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


# ----------------------------------------------------------------------------- packing


def pack_positions(positions: Tensor, m: int) -> Tensor:
    """(N, KK) in-group positions in ``[0, m)`` → (N, W) int32 index words (see module docstring)."""
    bits, per_word = index_bits(m), positions_per_word(m)
    rows, kept = positions.shape
    words = index_words(kept, m)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=positions.device)
    padded[:, :kept] = positions.to(torch.int64)
    shifts = torch.arange(per_word, device=positions.device, dtype=torch.int64) * bits
    packed = (padded.reshape(rows, words, per_word) << shifts).sum(-1)  # < 2^32, exact in int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # same bits, as signed int32
    return packed.to(torch.int32)


def unpack_positions(indices: Tensor, n: int, m: int, kept: int) -> Tensor:
    """Inverse of :func:`pack_positions`: (N, W) int32 words → (N, ``kept``) int64 positions."""
    n, m = check_nm(n, m)
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,))
    check_dim("indices", indices, 1, index_words(kept, m), f"ceil(KK / {positions_per_word(m)}) int32 words, KK={kept}")
    bits, per_word = index_bits(m), positions_per_word(m)
    unsigned = indices.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=indices.device, dtype=torch.int64) * bits
    pos = (unsigned[:, :, None] >> shifts) & (m - 1)
    return pos.reshape(indices.shape[0], -1)[:, :kept]


def kept_columns(indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """(N, KK) int64 input column of every kept value: ``(j // n)·m + p_j``."""
    n, m = check_nm(n, m)
    k = _check_in_features(in_features, m)
    kept = k // m * n
    pos = unpack_positions(indices, n, m, kept)
    return torch.arange(kept, device=indices.device) // n * m + pos


def pack_nm(weight: Tensor, mask: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Pack the entries of ``weight`` (N, K) where ``mask`` (an N:M mask, see
    :func:`check_nm_mask`) is ``True`` into ``(values (N, KK) in weight's dtype, indices (N, W)
    int32)``."""
    n, m = check_nm(n, m)
    check_tensor("weight", weight, ndim=2, dtypes=_PACK_DTYPES)
    check_nm_mask(mask, n, m)
    if mask.shape != weight.shape:
        raise ValueError(f"mask: expected shape {tuple(weight.shape)} (that of weight), got {tuple(mask.shape)}")
    check_device("mask", mask, weight.device, "weight")
    rows, k = weight.shape
    grouped = mask.reshape(rows, k // m, m)
    col = torch.arange(m, device=weight.device)
    # kept positions first, in increasing order (pruned ones pushed past m)
    key = torch.where(grouped, col, col + m)
    pos = torch.sort(key, dim=-1).values[..., :n]  # (N, G, n), strictly increasing
    columns = (pos + torch.arange(k // m, device=weight.device)[:, None] * m).reshape(rows, -1)
    values = torch.gather(weight, 1, columns).contiguous()
    return values, pack_positions(pos.reshape(rows, -1), m)


def unpack_nm(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """Dense (N, K) weight in ``values``' dtype: kept values at their columns, zeros elsewhere
    (the reference for every kernel)."""
    n, m = check_nm(n, m)
    k = _check_in_features(in_features, m)
    check_tensor("values", values, ndim=2, dtypes=_PACK_DTYPES)
    check_dim("values", values, 1, k // m * n, "KK = in_features / m · n kept values per row")
    check_dim("indices", indices, 0, values.shape[0], "out_features (rows of values)")
    check_device("indices", indices, values.device, "values")
    cols = kept_columns(indices, n, m, k)
    dense = torch.zeros(values.shape[0], k, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, cols, values)


# ----------------------------------------------------------------------------- the format


@dataclass
class NMFormat:
    """One N:M-sparse (out_features × in_features) weight; see the module docstring for the layout.

    Exactly one of ``values`` (dense kept values) and ``qvalues`` (the same (N, KK) matrix as a
    4-bit :class:`QuantFormat`) is given. ``lr_u``/``lr_v`` are both present or both ``None``.
    """

    values: Tensor | None
    indices: Tensor
    n: int
    m: int
    in_features: int
    bias: Tensor | None = None
    qvalues: QuantFormat | None = None
    lr_u: Tensor | None = None
    lr_v: Tensor | None = None

    NAME = "nm"

    def __post_init__(self) -> None:
        self.validate()

    # --------------------------------------------------------------- metadata
    @property
    def out_features(self) -> int:
        return self.indices.shape[0]

    @property
    def kept(self) -> int:
        """KK: stored values per row."""
        return self.in_features // self.m * self.n

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else self.lr_u.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors (absent ones left out) by name; quantized values as ``qvalues.<field>``."""
        out = {name: getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None}
        if self.qvalues is not None:
            out.update({f"qvalues.{k}": v for k, v in self.qvalues.tensors().items()})
        return out

    # --------------------------------------------------------------- checks
    def validate(self) -> None:
        n, m = check_nm(self.n, self.m)
        k = _check_in_features(self.in_features, m)
        kept = k // m * n
        check_tensor("indices", self.indices, ndim=2, dtypes=(torch.int32,))
        rows = self.indices.shape[0]
        if rows < 1:
            raise ValueError(f"indices: expected at least one row (out_features >= 1), got shape {tuple(self.indices.shape)}")
        check_dim("indices", self.indices, 1, index_words(kept, m), f"ceil(KK / {positions_per_word(m)}) int32 words, KK={kept}")
        if not self.indices.is_contiguous():
            raise ValueError("indices: expected a row-major contiguous tensor, got a strided view")
        dev = self.device


        if (self.values is None) == (self.qvalues is None):
            raise ValueError("values/qvalues: expected exactly one (dense kept values or their 4-bit QuantFormat), got "
                             + ("both" if self.values is not None else "neither"))
        if self.values is not None:
            check_tensor("values", self.values, ndim=2)
            check_dim("values", self.values, 0, rows, "out_features (rows of indices)")
            check_dim("values", self.values, 1, kept, "KK = in_features / m · n kept values per row")
            if not self.values.is_contiguous():
                raise ValueError("values: expected a row-major contiguous tensor, got a strided view")
            check_device("values", self.values, dev, "indices")
        else:
            q = self.qvalues
            if not isinstance(q, QuantFormat):
                raise TypeError(f"qvalues: expected a lowrank_ops.quant.format.QuantFormat, got {type(q).__name__}")
            if q.bits != 4 or q.is_lut or q.quantized_stats or q.has_outliers or q.rank:
                raise ValueError("qvalues: expected a plain 4-bit uniform QuantFormat (fp16 scales/zeros; no LUT, "
                                 f"second-level statistics, outliers or low-rank path), got {q.config()}")
            if (q.out_features, q.in_features) != (rows, kept):
                raise ValueError(f"qvalues: expected shape ({rows}, {kept}) (out_features, KK), got ({q.out_features}, {q.in_features})")
            check_device("qvalues", q, dev, "indices")

        # positions: strictly increasing within each group, unused bits zero
        pos = unpack_positions(self.indices, n, m, kept)
        if kept and n > 1 and bool((pos.reshape(rows, -1, n).diff(dim=-1) <= 0).any()):
            raise ValueError(f"indices: expected strictly increasing in-group positions within each group of {n} kept values")
        if not torch.equal(pack_positions(pos, m), self.indices):
            raise ValueError("indices: expected every unused bit to be 0 (padding slots and the top bits of each word)")

        if self.bias is not None:
            check_tensor("bias", self.bias, ndim=1)
            check_dim("bias", self.bias, 0, rows, "out_features")
            check_device("bias", self.bias, dev, "indices")
        check_lowrank_pair(self.lr_u, self.lr_v, rows, k)
        if self.lr_u is not None:
            check_device("lr_u", self.lr_u, dev, "indices")
            check_device("lr_v", self.lr_v, dev, "indices")

    # --------------------------------------------------------------- bytes
    @property
    def nbytes(self) -> int:
        """Bytes of the weight representation: values (or codes + scales + zeros), indices and
        low-rank factors; the bias is not included (see :attr:`bias_nbytes`)."""
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name != "bias")

    @property
    def bias_nbytes(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size()

    @property
    def bits_per_weight(self) -> float:
        """``8·nbytes / (N·K)``: stored bits per entry of the dense weight, all overheads included."""
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    # --------------------------------------------------------------- reference
    def kept_values(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (N, KK) kept values (dequantized when quantized), in ``dtype`` (default: stored
        dtype, fp32 for quantized values)."""
        if self.qvalues is not None:
            return self.qvalues.dense(dtype or torch.float32)
        return self.values if dtype is None else self.values.to(dtype)

    def sparse_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Wₙₘ`` alone as a dense (N, K) tensor (no low-rank path)."""
        return unpack_nm(self.kept_values(dtype), self.indices, self.n, self.m, self.in_features)

    def mask(self) -> Tensor:
        """The bool (N, K) N:M mask of stored positions."""
        cols = kept_columns(self.indices, self.n, self.m, self.in_features)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.device)
        return mask.scatter_(1, cols, True)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reference weight ``Wₙₘ + lr_u·lr_v`` (N, K) in ``dtype`` (bias not included)."""
        w = self.sparse_dense(dtype)
        if self.lr_u is not None:
            w = w + self.lr_u.to(dtype) @ self.lr_v.to(dtype)
        return w

    # --------------------------------------------------------------- (de)serialisation
    def config(self) -> dict[str, Any]:
        """JSON-able static metadata (enough, with :meth:`to_state_dict`, to rebuild the format)."""
        return {
            "format": self.NAME,
            "n": self.n,
            "m": self.m,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "rank": self.rank,
            "quant": None if self.qvalues is None else self.qvalues.config(),
        }

    def to_state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> "NMFormat":
        """Rebuild from :meth:`to_state_dict` + :meth:`config`; refuses missing or extra tensors."""
        check_format_metadata(state, metadata, ("format", "n", "m", "in_features", "out_features", "bias", "rank", "quant"), cls.NAME, "NMFormat")
        quant = metadata["quant"]
        qstate = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("qvalues.")}
        plain = {k: v for k, v in state.items() if not k.startswith("qvalues.")}
        expected = {"indices"} | ({"values"} if quant is None else set())
        expected |= {"bias"} if metadata["bias"] else set()
        expected |= {"lr_u", "lr_v"} if metadata["rank"] else set()
        got = set(plain)
        if got != expected or (quant is None and qstate):
            raise ValueError(
                f"state: expected tensors {sorted(expected)}{' + qvalues.*' if quant else ''}, got {sorted(state)} "
                f"(missing {sorted(expected - got)}, unexpected {sorted(got - expected)})"
            )
        fmt = cls(
            values=plain.get("values"), indices=plain["indices"], n=metadata["n"], m=metadata["m"],
            in_features=metadata["in_features"], bias=plain.get("bias"),
            qvalues=None if quant is None else QuantFormat.from_state_dict(qstate, quant),
            lr_u=plain.get("lr_u"), lr_v=plain.get("lr_v"),
        )
        if fmt.out_features != metadata["out_features"] or fmt.rank != metadata["rank"]:
            raise ValueError(
                f"state: expected out_features {metadata['out_features']} and rank {metadata['rank']} (metadata), "
                f"got {fmt.out_features} and {fmt.rank}"
            )
        return fmt


# ----------------------------------------------------------------------------- torch 2:4 interop

SEMI_STRUCTURED_MULTIPLE = (32, 64)  # weight shape multiple every torch 2:4 backend accepts (CUTLASS fp16/bf16)


def nm_mask_of_dense(weight: Tensor, n: int, m: int) -> Tensor:
    """The N:M mask of an already N:M-sparse dense ``weight``: its nonzeros, each group completed
    to exactly ``n`` entries with its lowest-column zeros (a zero kept value is still a valid
    slot). Raises if a group has more than ``n`` nonzeros."""
    n, m = check_nm(n, m)
    check_tensor("weight", weight, ndim=2)
    _check_in_features(weight.shape[1], m, "weight.shape[1]")
    nonzero = weight != 0
    counts = nonzero.reshape(weight.shape[0], -1, m).sum(-1)
    if bool((counts > n).any()):
        row, group = (int(i) for i in (counts > n).nonzero()[0])
        raise ValueError(f"weight: expected at most {n} nonzeros in every group of {m} columns ({n}:{m} sparse), "
                         f"got {int(counts[row, group])} in row {row}, columns {group * m}..{group * m + m - 1}")
    return nm_mask_from_scores(nonzero.to(torch.float32), n, m)


def _check_semi_shape(rows: int, cols: int) -> None:
    mr, mc = SEMI_STRUCTURED_MULTIPLE
    if rows % mr or cols % mc:
        raise ValueError(f"weight: torch's 2:4 semi-structured format needs a shape that is a multiple of "
                         f"{SEMI_STRUCTURED_MULTIPLE}, got ({rows}, {cols})")


def to_semi_structured(values: Tensor, indices: Tensor, in_features: int) -> Tensor:
    """A packed 2:4 weight as torch's ``SparseSemiStructuredTensor`` (CUDA only, fp16/bf16; torch
    picks cuSPARSELt or CUTLASS). Kept values that are exactly zero may land on other slots of
    their group; the dense weight is the same."""
    check_tensor("values", values, ndim=2)
    _check_semi_shape(values.shape[0], in_features)
    if values.device.type != "cuda":
        raise ValueError(f"values: torch's semi-structured sparse tensors are CUDA-only, got device {values.device}")
    return torch.sparse.to_sparse_semi_structured(unpack_nm(values, indices, 2, 4, in_features))


def from_semi_structured(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` (2:4) of a ``SparseSemiStructuredTensor`` or of a dense 2:4-sparse
    (N, K) tensor, on its device, in its dtype."""
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        weight = weight.to_dense()
    mask = nm_mask_of_dense(weight, 2, 4)
    return pack_nm(weight, mask, 2, 4)


def _cutlass_conversions():
    try:
        from torch.sparse import _semi_structured_conversions as conv
    except ImportError as err:  # a private torch module; present since torch 2.1
        raise RuntimeError(f"this torch has no CUTLASS 2:4 conversion helpers ({err})") from err
    return conv


def to_semi_structured_cutlass(values: Tensor, indices: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    """The CUTLASS 2:4 layout ``(packed (N, K/2), meta int16 (N, K/16) in CUTLASS's reordered
    order)`` of a packed 2:4 weight, on any device (torch's own conversion routine). ``packed``
    equals ``values`` whenever no kept value is zero."""
    check_tensor("values", values, ndim=2)
    _check_semi_shape(values.shape[0], in_features)
    return _cutlass_conversions().sparse_semi_structured_from_dense_cutlass(unpack_nm(values, indices, 2, 4, in_features))


def from_semi_structured_cutlass(packed: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`to_semi_structured_cutlass`: ``(values, indices)`` from CUTLASS's
    ``packed`` values and reordered ``meta``."""
    check_tensor("packed", packed, ndim=2)
    check_tensor("meta", meta, ndim=2, dtypes=(torch.int16, torch.int32))
    _check_semi_shape(packed.shape[0], packed.shape[1] * 2)
    return from_semi_structured(_cutlass_conversions().sparse_semi_structured_to_dense_cutlass(packed, meta))
