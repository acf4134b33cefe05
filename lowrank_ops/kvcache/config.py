"""``GEARConfig``: the settings of one GEAR-compressed KV cache (validated on construction).

GEAR (KIVI-style quantization + per-vector outliers + low-rank residual + fp16 tail):

* ``bits`` ∈ {2, 4}: asymmetric uniform codes; keys per channel over groups of
  ``group_size`` tokens, values per token over groups of ``group_size`` channels;
* ``outlier_ratio`` s ∈ [0, 0.1]: round(s · head_dim) entries of every key/value vector kept
  exactly outside the quantizer, chosen by ``outlier_rule``: ``"farthest"`` (default) from the
  vector's mean, or ``"extremes"`` (GEAR's: half the largest, half the smallest), 2 % more
  output error on MiniLM;
* ``rank`` r ≥ 0: the remaining error of each (sequence, head, block) approximated as A Bᵀ
  with ``power_iters`` ≥ 1 subspace iterations (r = 0: no low-rank part);
* ``factor_bits`` ∈ {8, 16}: the factors' storage. 16: fp16 A and B. 8 (default): int8 A and B
  with one fp32 scale per (block, rank column) for their product, ``A Bᵀ = Â diag(s) B̂ᵀ``;
  half the factor bytes (0.75 instead of 1.5 bits per entry at r = 4, B = 64, head_dim 128) at
  a measured 0.5 % more output error (``tests/test_kvcache_quality.py``);
* ``lowrank_fit``: ``"joint"`` (default) fits a rank-r term to the data first, quantizes what it
  leaves and refits the term to the remaining error; ``"residual"`` (GEAR's order) quantizes the
  data and fits the term to the quantization error only (same format, more error: see
  :mod:`lowrank_ops.kvcache.compress`);
* ``buffer_tokens`` B: the newest tokens stay uncompressed until B of them are there, then
  those B are compressed once into a block (append-only, never re-quantized);
* ``clip_search``: each quantization group's range is the one among its min-max span with
  0, 1/16 or 1/8 of the span trimmed off either end (9 ranges) whose codes give its kept entries
  the least squared error (:data:`lowrank_ops.kvcache.compress.CLIP_STEPS`). Default (None): on at
  2 bits, where it cuts MiniLM's attention-output error by 19 %, off at 4 bits, where it did not
  help; the format is the same either way;
* ``prefix_tokens`` P ∈ [0, 16], default 1: the cache's first P tokens are kept uncompressed, in
  the input dtype, and never enter a block (attention-sink tokens: a decoder's BOS, an encoder's
  [CLS] take a large share of every query's attention, and their extreme channels widen the
  ranges of the key groups they would join). P = 1 cut the attention-output error on MiniLM by
  10 % (GEAR's settings) to 24 % (4-bit) for 2 · P · head_dim values per (sequence, kv head)
  (``tests/test_kvcache_quality.py``); 0 is GEAR's format. Positions are shared by the batch: in
  a left-padded batch the first P positions of a shorter row are padding (masked as any other).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lowrank_ops.core.checks import check_choice, check_int, check_name

GEAR_BITS = (2, 4)
GEAR_GROUP_SIZES = (16, 32, 64, 128)  # powers of two ≥ 16 (Triton tiles, packed words)
MAX_OUTLIER_RATIO = 0.1
MAX_BUFFER_TOKENS = 4096
MAX_POWER_ITERS = 16
MAX_PREFIX_TOKENS = 16  # the combine kernel scores them in one (16 × head_dim) tile per q row
LOWRANK_FITS = ("joint", "residual")
OUTLIER_RULES = ("farthest", "extremes")
FACTOR_BITS = (8, 16)


@dataclass(frozen=True)
class GEARConfig:
    """Settings of a GEAR KV cache; ``ValueError``/``TypeError`` naming the field on bad values.

    ``group_size`` must divide ``buffer_tokens`` (key groups never straddle a block) and the
    head dimension (checked when tensors arrive: :meth:`check_head_dim`); ``rank`` must not
    exceed ``buffer_tokens`` (nor the head dimension, checked likewise).
    """

    bits: int = 2
    group_size: int = 32
    rank: int = 4
    outlier_ratio: float = 0.02
    buffer_tokens: int = 64
    power_iters: int = 2
    factor_bits: int = 8
    lowrank_fit: str = "joint"
    clip_search: Optional[bool] = None  # None: True at 2 bits, False at 4 (resolved on construction)
    outlier_rule: str = "farthest"
    prefix_tokens: int = 1

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, GEAR_BITS)
        check_choice("group_size", self.group_size, GEAR_GROUP_SIZES)
        check_int("buffer_tokens", self.buffer_tokens, low=self.group_size, high=MAX_BUFFER_TOKENS)
        if self.buffer_tokens % self.group_size:
            raise ValueError(
                f"buffer_tokens: expected a multiple of group_size={self.group_size} "
                f"(key groups must not straddle a block), got {self.buffer_tokens}"
            )
        check_int("rank", self.rank, low=0, high=self.buffer_tokens)
        check_int("power_iters", self.power_iters, low=1, high=MAX_POWER_ITERS)
        check_choice("factor_bits", self.factor_bits, FACTOR_BITS)
        check_name("lowrank_fit", self.lowrank_fit, LOWRANK_FITS)
        check_name("outlier_rule", self.outlier_rule, OUTLIER_RULES)
        check_int("prefix_tokens", self.prefix_tokens, low=0, high=MAX_PREFIX_TOKENS)
        if self.clip_search is None:
            object.__setattr__(self, "clip_search", self.bits == 2)
        elif not isinstance(self.clip_search, bool):
            raise TypeError(f"clip_search: expected a bool or None, got {type(self.clip_search).__name__}")
        ratio = self.outlier_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"outlier_ratio: expected a float in [0, {MAX_OUTLIER_RATIO}], got {type(ratio).__name__}")
        if not 0.0 <= float(ratio) <= MAX_OUTLIER_RATIO:
            raise ValueError(f"outlier_ratio: expected a number in [0, {MAX_OUTLIER_RATIO}], got {ratio}")

    def outliers_per_vector(self, head_dim: int) -> int:
        """n_out = round(s · head_dim): the entries of a vector farthest from its mean kept exactly."""
        return int(round(self.outlier_ratio * head_dim))

    def check_head_dim(self, head_dim: int, name: str = "keys") -> None:
        """``head_dim`` is a multiple of 16 in [16, 256] that ``group_size`` divides and that is ≥ ``rank``."""
        if head_dim % 16 or not 16 <= head_dim <= 256:
            raise ValueError(f"{name}: expected a head_dim (last dim) that is a multiple of 16 in [16, 256], got {head_dim}")
        if head_dim % self.group_size:
            raise ValueError(f"{name}: expected a head_dim that group_size={self.group_size} divides, got {head_dim}")
        if self.rank > head_dim:
            raise ValueError(f"{name}: expected head_dim >= rank={self.rank}, got {head_dim}")
