"""The GEAR KV-cache storage: an uncompressed prefix of at most P tokens, append-only compressed
blocks of B tokens, an uncompressed tail.

This is the contract the attention kernels read. Keys and values are (batch, kv_heads, seq,
head_dim) = (b, h, T, D); all sequences of the batch share token positions (ragged lengths are
a key mask at attention time; padded positions are stored like any other token). Positions
0 … p − 1 are the prefix (``p = prefix_len ≤ P = config.prefix_tokens``; the prefix fills before
anything else, so blocks and tail exist only once p = P), then the blocks, then the tail. With
``nblocks`` full blocks, ``T_c = nblocks · B`` compressed tokens, ``G = group_size``,
``E = 32 / bits`` codes per int32 word, ``n_out = round(s · D)`` and rank r:

===================  ==============================  =====  ===========================================
tensor               shape                           dtype  meaning
===================  ==============================  =====  ===========================================
key_codes            (b, h, T_c, D·bits/32)          int32  packed codes along D
key_scale/key_zero   (b, h, T_c / G, D)              fp16   per channel, per group of G tokens
value_codes          (b, h, T_c, D·bits/32)          int32  packed codes along D
value_scale/_zero    (b, h, T_c, D / G)              fp16   per token, per group of G channels
*_out_idx            (b, h, T_c, n_out)              uint8  channel of each outlier
*_out_val            (b, h, T_c, n_out)              fp16   x − dequant(code) at that channel
*_lr_a               (b, h, T_c, r)                  F      per token row of A
*_lr_b               (b, h, nblocks, D, r)           F      per block B
*_lr_scale           (b, h, nblocks, r or 0)         fp32   int8 factors: A's scale per rank column
prefix_keys/_values  (b, h, p, D)                    input  the first p tokens, exactly
tail_keys/_values    (b, h, B, D)                    input  first ``tail_len`` rows valid
===================  ==============================  =====  ===========================================

F is the factor storage of ``config.factor_bits``: fp16 (16; ``lr_scale`` has 0 columns), or
int8 (8): A = Â ⊙ s_j with s_j the block's ``lr_scale`` row, and B = B̂ / 127 (B's columns
are orthonormal, so its entries lie in [-1, 1]).

Packing: code d of a vector sits in word ``d // E`` at bit ``(d % E) · bits`` (bit 31 is a
payload bit: read words as unsigned). Dequantization ``deq = (code − zero) · scale`` (zeros are
fractional fp16). Outliers: per vector, n_out entries (``config.outlier_rule``: those farthest
from the vector's mean, or GEAR's largest and smallest halves; the decoders read them in any
order) are excluded from the min/max of their quantization groups; their code is the clamped code of the value and ``out_val`` stores
the residual ``x − deq`` there, so the additive reconstruction gives x to fp16 precision.
Reconstruction of the t-th compressed token (counted from the first block) in block j = t // B::

    x̂_t = deq(codes_t) + scatter(out_idx_t, out_val_t) + A_t @ B_jᵀ

Prefix and tail are stored in the input dtype (fp16, bf16 or fp32). ``nbytes`` counts every
tensor above, the whole B-token tail buffer included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support
from lowrank_ops.core.checks import check_device, check_dim, check_int, check_tensor
from lowrank_ops.kvcache.config import GEARConfig

BLOCK_FIELDS = ("codes", "scale", "zero", "out_idx", "out_val", "lr_a", "lr_b", "lr_scale")
FACTOR_DTYPES = {8: torch.int8, 16: torch.float16}  # config.factor_bits -> storage of A and B
INT8_BASIS_SCALE = 1.0 / 127  # int8 B: its columns are orthonormal, so every entry is in [-1, 1]
BLOCK_TENSORS = tuple(f"key_{f}" for f in BLOCK_FIELDS) + tuple(f"value_{f}" for f in BLOCK_FIELDS)
PREFIX_FIELDS = ("prefix_keys", "prefix_values")
TENSOR_FIELDS = BLOCK_TENSORS + PREFIX_FIELDS + ("tail_keys", "tail_values")
TAIL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- packing
def pack_last(codes: Tensor, bits: int) -> Tensor:
    """Codes (..., D) in [0, 2^bits) → int32 words (..., D·bits/32), code d at bit (d % E)·bits of word d // E."""
    per_word = 32 // bits
    *lead, d = codes.shape
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (codes.to(torch.int64).reshape(*lead, d // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_last(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_last`: int32 (..., W) → uint8 codes (..., W·32/bits). In int32 (an
    arithmetic shift sign-extends bit 31, which the mask drops) and stored in one byte: a whole
    cache's codes cost one byte per entry here, not eight (``decompress`` of a long context)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = ((words[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per_word)


# ----------------------------------------------------------------------------- reconstruction pieces
def dequant_keys(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Per-channel key groups: codes (b, h, T, D), scale/zero (b, h, T/G, D) → (b, h, T, D)
    (the statistics broadcast over each group's tokens, never expanded)."""
    grouped = codes.to(dtype).unflatten(2, (-1, group_size))
    return ((grouped - zero.to(dtype)[:, :, :, None]) * scale.to(dtype)[:, :, :, None]).flatten(2, 3)


def dequant_values(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Per-token value groups: codes (b, h, T, D), scale/zero (b, h, T, D/G) → (b, h, T, D)."""
    grouped = codes.to(dtype).unflatten(3, (-1, group_size))
    return ((grouped - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]).flatten(3, 4)


def add_outliers_(x: Tensor, idx: Tensor, val: Tensor) -> Tensor:
    """``x`` (..., D) with ``val`` added at channels ``idx`` (distinct per vector), in place."""
    return x.scatter_add_(-1, idx.to(torch.int64), val.to(x.dtype))


def lowrank_product(a: Tensor, b: Tensor, scale: Tensor, buffer_tokens: int, dtype: torch.dtype) -> Tensor:
    """A (b, h, T_c, r) with per-block B (b, h, nblocks, D, r) and column scales ``scale`` (b, h,
    nblocks, r; r = 0 columns for fp16 factors) → (b, h, T_c, D): row t times B_jᵀ of its block
    j = t // B. Int8 factors become ``Â ⊙ s_j`` and ``B̂ · INT8_BASIS_SCALE``; both factors are
    rounded to ``dtype`` before the product (as the kernels' tiles)."""
    bt, h, t, r = a.shape
    nblocks, d = b.shape[2], b.shape[3]
    if r == 0:
        return torch.zeros(bt, h, t, d, dtype=dtype, device=a.device)
    a = a.float().reshape(bt, h, nblocks, buffer_tokens, r)
    b = b.float()
    if scale.shape[-1]:
        a = a * scale[:, :, :, None, :]
        b = b * INT8_BASIS_SCALE
    return (a.to(dtype) @ b.to(dtype).transpose(-1, -2)).reshape(bt, h, t, d)


# ----------------------------------------------------------------------------- the cache
@dataclass
class GEARKV:
    """One layer's GEAR-compressed keys and values (see the module docstring for the layout).

    Build with :func:`lowrank_ops.kvcache.compress`; grow with :meth:`append` (in place).
    """

    config: GEARConfig
    key_codes: Tensor
    key_scale: Tensor
    key_zero: Tensor
    key_out_idx: Tensor
    key_out_val: Tensor
    key_lr_a: Tensor
    key_lr_b: Tensor
    key_lr_scale: Tensor
    value_codes: Tensor
    value_scale: Tensor
    value_zero: Tensor
    value_out_idx: Tensor
    value_out_val: Tensor
    value_lr_a: Tensor
    value_lr_b: Tensor
    value_lr_scale: Tensor
    tail_keys: Tensor
    tail_values: Tensor
    tail_len: int
    prefix_keys: Optional[Tensor] = None  # None: no prefix token yet, (b, h, 0, D) of the tail's dtype
    prefix_values: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for name in PREFIX_FIELDS:
            if getattr(self, name) is None and isinstance(self.tail_keys, Tensor) and self.tail_keys.dim() == 4:
                setattr(self, name, self.tail_keys[:, :, :0].clone())
        self.validate()

    # --------------------------------------------------------------- metadata
    @property
    def batch(self) -> int:
        return self.tail_keys.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.tail_keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.tail_keys.shape[3]

    @property
    def nblocks(self) -> int:
        return self.key_codes.shape[2] // self.config.buffer_tokens

    @property
    def prefix_len(self) -> int:
        """Tokens held in the uncompressed prefix (positions 0 … prefix_len − 1)."""
        return self.prefix_keys.shape[2]

    @property
    def compressed_len(self) -> int:
        """Tokens held in compressed blocks (``nblocks · B``)."""
        return self.key_codes.shape[2]

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.compressed_len + self.tail_len

    @property
    def dtype(self) -> torch.dtype:
        """The input (and tail) dtype; :meth:`decompress` returns it by default."""
        return self.tail_keys.dtype

    @property
    def device(self) -> torch.device:
        return self.tail_keys.device

    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor, by field name (the order of :data:`TENSOR_FIELDS`)."""
        return {name: getattr(self, name) for name in TENSOR_FIELDS}

    # --------------------------------------------------------------- bytes
    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, zeros, outlier indices and values, factors, tail buffer."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_entry(self) -> float:
        """``8·nbytes / (2·batch·kv_heads·seq_len·head_dim)``: stored bits per cached K or V entry."""
        return 8.0 * self.nbytes / (2 * self.batch * self.kv_heads * max(self.seq_len, 1) * self.head_dim)

    @property
    def bytes_per_token_per_layer(self) -> float:
        """``nbytes / (batch · seq_len)``: bytes this layer stores per token of a sequence (all KV heads, K and V)."""
        return self.nbytes / (self.batch * max(self.seq_len, 1))

    # --------------------------------------------------------------- checks
    def validate(self) -> None:
        """Shapes, dtypes and devices of every tensor against the layout (no value checks)."""
        cfg = self.config
        if not isinstance(cfg, GEARConfig):
            raise TypeError(f"config: expected a GEARConfig, got {type(cfg).__name__}")
        check_tensor("tail_keys", self.tail_keys, ndim=4, dtypes=TAIL_DTYPES)
        b, h, buf, d = self.tail_keys.shape
        cfg.check_head_dim(d, "tail_keys")
        check_dim("tail_keys", self.tail_keys, 2, cfg.buffer_tokens, "buffer_tokens")
        check_int("tail_len", self.tail_len, low=0, high=cfg.buffer_tokens - 1)
        t_c = self.key_codes.shape[2] if self.key_codes.dim() == 4 else -1
        if t_c % cfg.buffer_tokens:
            raise ValueError(f"key_codes: expected a multiple of buffer_tokens={cfg.buffer_tokens} tokens at dim 2, got shape {tuple(self.key_codes.shape)}")
        nblocks, g, r = t_c // cfg.buffer_tokens, cfg.group_size, cfg.rank
        n_out, words = cfg.outliers_per_vector(d), d * cfg.bits // 32
        check_tensor("prefix_keys", self.prefix_keys, ndim=4)
        p = self.prefix_keys.shape[2]
        if p > cfg.prefix_tokens:
            raise ValueError(f"prefix_keys: expected at most prefix_tokens={cfg.prefix_tokens} tokens at dim 2, "
                             f"got shape {tuple(self.prefix_keys.shape)}")
        if p < cfg.prefix_tokens and (t_c or self.tail_len):
            raise ValueError(f"prefix_keys: expected the whole prefix of prefix_tokens={cfg.prefix_tokens} tokens "
                             f"before any block or tail token, got {p}")
        expected = {
            "prefix_keys": ((b, h, p, d), (self.tail_keys.dtype,)),
            "prefix_values": ((b, h, p, d), (self.tail_keys.dtype,)),
            "tail_values": ((b, h, buf, d), (self.tail_keys.dtype,)),
            "key_codes": ((b, h, t_c, words), (torch.int32,)),
            "key_scale": ((b, h, t_c // g, d), (torch.float16,)),
            "key_zero": ((b, h, t_c // g, d), (torch.float16,)),
            "value_codes": ((b, h, t_c, words), (torch.int32,)),
            "value_scale": ((b, h, t_c, d // g), (torch.float16,)),
            "value_zero": ((b, h, t_c, d // g), (torch.float16,)),
        }
        factor = (FACTOR_DTYPES[cfg.factor_bits],)
        scales = r if cfg.factor_bits == 8 else 0
        for kind in ("key", "value"):
            expected[f"{kind}_out_idx"] = ((b, h, t_c, n_out), (torch.uint8,))
            expected[f"{kind}_out_val"] = ((b, h, t_c, n_out), (torch.float16,))
            expected[f"{kind}_lr_a"] = ((b, h, t_c, r), factor)
            expected[f"{kind}_lr_b"] = ((b, h, nblocks, d, r), factor)
            expected[f"{kind}_lr_scale"] = ((b, h, nblocks, scales), (torch.float32,))
        for name, (shape, dtypes) in expected.items():
            t = getattr(self, name)
            check_tensor(name, t, ndim=len(shape), dtypes=dtypes)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
            check_device(name, t, self.tail_keys.device, "tail_keys")

    # --------------------------------------------------------------- reference reconstruction
    def _reconstruct(self, kind: str, dtype: torch.dtype) -> Tensor:
        cfg = self.config
        codes = unpack_last(getattr(self, f"{kind}_codes"), cfg.bits)
        deq = dequant_keys if kind == "key" else dequant_values
        x = deq(codes, getattr(self, f"{kind}_scale"), getattr(self, f"{kind}_zero"), cfg.group_size, dtype)
        add_outliers_(x, getattr(self, f"{kind}_out_idx"), getattr(self, f"{kind}_out_val"))
        x += lowrank_product(getattr(self, f"{kind}_lr_a"), getattr(self, f"{kind}_lr_b"),
                             getattr(self, f"{kind}_lr_scale"), cfg.buffer_tokens, dtype)
        prefix = self.prefix_keys if kind == "key" else self.prefix_values
        tail = (self.tail_keys if kind == "key" else self.tail_values)[:, :, : self.tail_len]
        return torch.cat([prefix.to(dtype), x, tail.to(dtype)], dim=2)

    def decompress(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(K̂, V̂), each (batch, kv_heads, seq_len, head_dim) in ``dtype`` (default: the input
        dtype), on the backend :func:`~lowrank_ops.core.backend.select_backend` picks: the Triton
        kernel (``kernels/kvcache_decompress.py``: one pass, fp32 arithmetic rounded once) on a GPU
        for fp16/bf16/fp32, else :meth:`decompress_reference`."""
        dtype = self.dtype if dtype is None else dtype
        if _decompress_backend(self, dtype) == "triton":
            from lowrank_ops.kernels.kvcache_decompress import gear_decompress

            return gear_decompress(self, dtype)
        return self.decompress_reference(dtype)

    def decompress_reference(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(K̂, V̂) in plain torch, computed in ``dtype`` (default: the input dtype): the reference
        of the format, which the attention reference and the kernels' tests build on."""
        dtype = self.dtype if dtype is None else dtype
        return self._reconstruct("key", dtype), self._reconstruct("value", dtype)

    def to(self, device: torch.device | str) -> "GEARKV":
        """The same cache with every tensor on ``device`` (tensors already there are shared, not copied)."""
        return GEARKV(config=self.config, tail_len=self.tail_len,
                      **{name: t.to(device) for name, t in self.tensors().items()})

    # --------------------------------------------------------------- growth
    def keep_blocks(self, nblocks: int) -> "GEARKV":
        """Keep the prefix, the first ``nblocks`` compressed blocks and an empty tail, in place (a
        rollback: the caller appends again the raw tokens it keeps after them). Returns self."""
        check_int("nblocks", nblocks, low=0, high=self.nblocks)
        have = self.nblocks
        if nblocks < have:  # every block tensor's dim 2 is proportional to the block count
            for name in BLOCK_TENSORS:
                t = getattr(self, name)
                setattr(self, name, t[:, :, : t.shape[2] // have * nblocks].clone())
        self.tail_len = 0
        return self

    def append(self, keys: Tensor, values: Tensor) -> "GEARKV":
        """Append (batch, kv_heads, n, head_dim) new tokens in place (n ≥ 0): they join the tail,
        and each time the tail reaches B tokens it is compressed into a new block. Returns self."""
        from lowrank_ops.kvcache.compress import append_tokens  # compress builds on this module

        append_tokens(self, keys, values)
        return self


def _decompress_backend(kv: GEARKV, dtype: torch.dtype) -> str:
    """Triton (one pass per kind) or torch (the reference) for :meth:`GEARKV.decompress`."""
    triton = backend.triton_support(kv.device)
    if triton.ok:
        from lowrank_ops.kernels.kvcache_decompress import unsupported

        why = unsupported(dtype)
        triton = Support(False, why) if why else triton
    return backend.triton_or_reference("gear_decompress", "GEAR decompression", triton, kv.device)


def dense_nbytes(batch: int, kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of an uncompressed K and V cache of that size in ``dtype`` (the fp16 baseline)."""
    return 2 * batch * kv_heads * seq_len * head_dim * torch.empty((), dtype=dtype).element_size()
