"""``SparseLinear``: ``nn.Linear`` with an N:M structured-sparse packed weight (optionally 4-bit
kept values and a low-rank compensation path), computed by the ``lowrank_ops::nm_linear`` op
(4-bit kept values go to the op as codes + scales/zeros: the kernels dequantize them on chip);
and ``SRSTELinear``, the training-time layer whose N:M mask may change (SR-STE), frozen into a
``SparseLinear`` when training is done."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from lowrank_ops.calibration import InputStats, as_input_stats
from lowrank_ops.core.checks import FLOAT_DTYPES, check_linear, check_tensor
from lowrank_ops.core.layers import PackedFormatLinear, build_per_layer
from lowrank_ops.lowrank.ops import lowrank_linear
from lowrank_ops.quant.format import QuantFormat, padded_k
from lowrank_ops.sparse import compress
from lowrank_ops.sparse.format import NMFormat, check_nm, index_words, nm_mask_from_scores, pack_nm, pack_positions
from lowrank_ops.sparse.ops import nm_linear

_QUANT_FIELDS = ("qweight", "scales", "zeros")  # the 4-bit uniform QuantFormat of the kept values


class SparseLinear(PackedFormatLinear):
    """Packed N:M weight: ``indices`` (int32) is a frozen buffer; the kept ``values`` are a frozen
    buffer, or a trainable parameter with ``trainable=True`` (fixed-mask sparse training: only
    kept positions get gradient). With 4-bit values the codes/scales/zeros are frozen buffers
    ``qvalues_qweight``/``qvalues_scales``/``qvalues_zeros``. The low-rank factors ``lr_u`` (out×r),
    ``lr_v`` (r×in) and the bias are trainable parameters."""

    FORMAT = "nm"
    PACKED_BUFFERS = ("indices",) + tuple(f"qvalues_{name}" for name in _QUANT_FIELDS)

    def __init__(self, fmt: NMFormat, bias: Tensor | None, dtype: torch.dtype, *, trainable: bool = False) -> None:
        super().__init__()
        if not isinstance(fmt, NMFormat):
            raise TypeError(f"fmt: expected an NMFormat, got {type(fmt).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {[str(t) for t in FLOAT_DTYPES]}, got {dtype}")
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable: expected a bool, got {type(trainable).__name__}")
        if trainable and fmt.qvalues is not None:
            raise ValueError("trainable: 4-bit quantized values cannot be trained; expected trainable=False with quantized values")
        self.in_features, self.out_features = fmt.in_features, fmt.out_features
        self.n, self.m = fmt.n, fmt.m
        self.trainable = trainable
        self._dtype = dtype
        self.register_buffer("indices", fmt.indices)
        self.quant_group_size = None if fmt.qvalues is None else fmt.qvalues.group_size
        if fmt.qvalues is None:
            values = fmt.values.detach().to(dtype).contiguous()
            if trainable:
                self.values = nn.Parameter(values)
            else:
                self.register_buffer("values", values)
        else:
            self.values = None
            for name in _QUANT_FIELDS:
                self.register_buffer(f"qvalues_{name}", getattr(fmt.qvalues, name))
        self.lr_u = None if fmt.lr_u is None else nn.Parameter(fmt.lr_u.detach().to(dtype))
        self.lr_v = None if fmt.lr_v is None else nn.Parameter(fmt.lr_v.detach().to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone())

    # --------------------------------------------------------------- the format
    def _qvalues(self) -> QuantFormat | None:
        if self.quant_group_size is None:
            return None
        return QuantFormat(**{name: getattr(self, f"qvalues_{name}") for name in _QUANT_FIELDS}, qweight_hi=None, lut=None,
                           outlier_rowptr=None, outlier_cols=None, outlier_vals=None, lr_u=None, lr_v=None,
                           bits=4, group_size=self.quant_group_size, in_features=self.kept, out_features=self.out_features)

    @property
    def kept(self) -> int:
        """KK: stored values per row."""
        return self.in_features // self.m * self.n

    @property
    def format(self) -> NMFormat:
        """The packed weight as an :class:`NMFormat` (tensors shared, detached; bias not included)."""
        return NMFormat(
            values=None if self.values is None else self.values.detach(), indices=self.indices, n=self.n, m=self.m,
            in_features=self.in_features, qvalues=self._qvalues(),
            lr_u=None if self.lr_u is None else self.lr_u.detach(), lr_v=None if self.lr_v is None else self.lr_v.detach(),
        )

    def setting(self) -> str:
        parts = [f"{self.n}:{self.m}"]
        if self.quant_group_size is not None:
            parts.append(f"q4 g{self.quant_group_size}")
        if self.lr_u is not None:
            parts.append(f"r{self.lr_u.shape[1]}")
        return " ".join(parts)

    # --------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int = 2,
        m: int = 4,
        *,
        method: str = "auto",
        calib: InputStats | Tensor | None = None,
        quantize_values: bool = False,
        group_size: int = 128,
        lowrank_rank: int = 0,
        trainable: bool = False,
    ) -> "SparseLinear":
        """Prune ``linear`` (left unchanged) to ``n:m`` along its input dimension.

        ``method="auto"`` takes the best the inputs allow: SparseGPT with calibration, magnitude
        without (``"wanda"``/``"magnitude"``/``"sparsegpt"`` force one). ``calib`` is collected
        :class:`InputStats` or a tensor of sample inputs (..., in_features). ``quantize_values``
        stores the kept values in 4 bits (groups of ``group_size`` along the kept values);
        ``lowrank_rank`` > 0 adds a low-rank compensation path; ``trainable`` makes the kept
        values a parameter (fixed-mask sparse fine-tuning)."""
        linear = check_linear(linear)
        stats = as_input_stats(calib, linear.in_features)
        fmt = compress.prune(
            linear.weight.detach(), n=n, m=m, method=method, stats=stats, quantize_values=quantize_values,
            group_size=group_size, lowrank_rank=lowrank_rank, dtype=linear.weight.dtype,
        )
        return cls(fmt, linear.bias, linear.weight.dtype, trainable=trainable)

    # --------------------------------------------------------------- compute
    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, dtypes=(self._dtype,))  # the layer's compute dtype, named in the error
        nm = dict(n=self.n, m=self.m, in_features=self.in_features)
        if self.values is not None:
            y = nm_linear(x, self.values, self.indices, self.bias, **nm)
        else:  # 4-bit kept values: the op reads the codes, scales and zeros as stored
            y = nm_linear(x, self.qvalues_qweight, self.indices, self.bias, **nm, qscales=self.qvalues_scales,
                          qzeros=self.qvalues_zeros, group_size=self.quant_group_size)
        if self.lr_u is not None:
            y = y + lowrank_linear(x, self.lr_v, self.lr_u)
        return y

    # --------------------------------------------------------------- (de)serialisation
    def config(self) -> dict[str, Any]:
        return {**self.format.config(), "bias": self.bias is not None, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> "SparseLinear":
        n, m = check_nm(config["n"], config["m"])
        rows, k, rank = config["out_features"], config["in_features"], config["rank"]
        kept = k // m * n
        # placeholder positions 0..n-1 in every group (valid for validate()); the state dict overwrites them
        indices = pack_positions(torch.arange(n, device=device).repeat(rows, k // m), m)
        if indices.shape[1] != index_words(kept, m):
            raise ValueError(f"config: inconsistent n={n}, m={m}, in_features={k}")
        quant = config["quant"]
        qvalues = None
        if quant is not None:
            g = quant["group_size"]
            k_pad = padded_k(kept, g)
            qvalues = QuantFormat(
                qweight=torch.zeros(rows, k_pad // 8, dtype=torch.int32, device=device), qweight_hi=None,
                scales=torch.zeros(rows, k_pad // g, dtype=torch.float16, device=device),
                zeros=torch.zeros(rows, k_pad // g, dtype=torch.float16, device=device), lut=None,
                outlier_rowptr=None, outlier_cols=None, outlier_vals=None, lr_u=None, lr_v=None,
                bits=4, group_size=g, in_features=kept, out_features=rows,
            )
        fmt = NMFormat(
            values=None if quant is not None else torch.zeros(rows, kept, dtype=dtype, device=device),
            indices=indices, n=n, m=m, in_features=k, qvalues=qvalues,
            lr_u=torch.zeros(rows, rank, dtype=dtype, device=device) if rank else None,
            lr_v=torch.zeros(rank, k, dtype=dtype, device=device) if rank else None,
        )
        bias = torch.zeros(rows, dtype=dtype, device=device) if config["bias"] else None
        return cls(fmt, bias, dtype, trainable=bool(config.get("trainable", False)))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.setting()}, "
            f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight:.2f}"
        )


# ----------------------------------------------------------------------------- SR-STE training


class _SRSTEMasked(torch.autograd.Function):
    """``W ⊙ mask`` forward; backward straight through to every weight plus the SR-STE decay
    ``λ·(1 − mask)·W`` on the pruned ones (Zhou et al. 2021), which pulls weights that keep being
    pruned towards zero so the mask settles."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask) * weight, None, None


class SRSTELinear(nn.Module):
    """Training-time N:M layer with a changing mask: a dense ``weight`` parameter; each forward
    keeps the top-``n`` ``|W|`` of every group of ``m`` input columns (recomputed every step),
    gradients reach all weights (straight-through) plus the SR-STE decay ``decay·(1 − mask)·W``.
    ``decay`` may be changed between steps (a schedule). :meth:`freeze` packs the current mask
    into a :class:`SparseLinear`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, n: int = 2, m: int = 4, *, decay: float = 2e-4) -> None:
        super().__init__()
        self.n, self.m = check_nm(n, m)
        check_tensor("weight", weight, ndim=2)
        if weight.shape[1] % self.m:
            raise ValueError(f"weight: expected in_features (K = {weight.shape[1]}) to be a multiple of m={self.m}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"decay: expected a number >= 0, got {decay!r}")
        self.out_features, self.in_features = weight.shape
        self.decay = float(decay)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int = 2, m: int = 4, *, decay: float = 2e-4) -> "SRSTELinear":
        """Start from a dense ``linear``'s weights (copied; ``linear`` is left unchanged)."""
        linear = check_linear(linear)
        return cls(linear.weight, linear.bias, n, m, decay=decay)

    def mask(self) -> Tensor:
        """The current bool N:M mask (top ``n`` of ``|W|`` per group)."""
        return nm_mask_from_scores(self.weight.detach().abs(), self.n, self.m)

    def forward(self, x: Tensor) -> Tensor:
        weight = _SRSTEMasked.apply(self.weight, self.mask(), self.decay)
        return nn.functional.linear(x, weight, self.bias)

    def freeze(self, *, trainable: bool = False) -> SparseLinear:
        """The packed :class:`SparseLinear` of the current mask and weights."""
        values, indices = pack_nm(self.weight.detach(), self.mask(), self.n, self.m)
        fmt = NMFormat(values.contiguous(), indices, self.n, self.m, self.in_features)
        return SparseLinear(fmt, self.bias, self.weight.dtype, trainable=trainable)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, "
                f"decay={self.decay}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- model-level


def build_sparse_layers(
    linears: Mapping[str, nn.Linear],
    stats: Mapping[str, InputStats] | None,
    *,
    recipes: Mapping[str, Mapping[str, Any]] | None = None,
    probe: Callable[[str, nn.Module], float] | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, SparseLinear]:
    """Prune every named linear with ``options`` (see :meth:`SparseLinear.from_linear`).

    ``recipes`` maps glob patterns of layer names to option overrides (first match wins), e.g.
    2:8 for the MLPs and 2:4 elsewhere. ``probe`` is unused: sparsity settings are per layer.
    Nothing is swapped here; an error in any layer raises (naming it) before any model changes.
    """
    return build_per_layer(SparseLinear.from_linear, linears, stats, recipes, options, desc="prune", progress=progress)
