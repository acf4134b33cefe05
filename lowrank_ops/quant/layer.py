"""``QuantLinear``: ``nn.Linear`` with a 2/3/4-bit packed weight, sparse outliers and an optional
low-rank compensation path, computed by one fused dequant-matmul op."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from lowrank_ops.calibration import InputStats, as_input_stats
from lowrank_ops.core.checks import check_bool, check_linear
from lowrank_ops.core.layers import PackedFormatLinear, build_per_layer
from lowrank_ops.quant import compress
from lowrank_ops.quant.format import QuantFormat, group_stats_layout, padded_k
from lowrank_ops.quant.ops import quant_linear

_FROZEN = ("qweight", "qweight_hi", "scales", "zeros", "stat_codes", "stat_meta", "lut", "outlier_rowptr", "outlier_cols",
           "outlier_vals")


class QuantLinear(PackedFormatLinear):
    """Packed codes, group statistics (scales/zeros or their second-level form) or LUT and CSR
    outliers are frozen buffers; the low-rank
    compensation factors ``lr_u`` (out×r), ``lr_v`` (r×in) and the bias are trainable parameters,
    so the layer is a QLoRA/LQ-LoRA-style base for adapters out of the box."""

    FORMAT = "quant"
    PACKED_BUFFERS = _FROZEN

    def __init__(self, fmt: QuantFormat, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = fmt.in_features, fmt.out_features
        self.bits, self.group_size = fmt.bits, fmt.group_size
        for name in _FROZEN:
            self.register_buffer(name, getattr(fmt, name))
        self.lr_u = None if fmt.lr_u is None else nn.Parameter(fmt.lr_u.to(dtype))
        self.lr_v = None if fmt.lr_v is None else nn.Parameter(fmt.lr_v.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone())
        self._dtype = dtype

    @property
    def format(self) -> QuantFormat:
        tensors = {name: getattr(self, name) for name in _FROZEN}
        lr = {"lr_u": None if self.lr_u is None else self.lr_u.detach(), "lr_v": None if self.lr_v is None else self.lr_v.detach()}
        return QuantFormat(**tensors, **lr, bits=self.bits, group_size=self.group_size,
                           in_features=self.in_features, out_features=self.out_features)

    def setting(self) -> str:
        fmt = self.format
        parts = [f"{self.bits}b g{self.group_size}" + (" lut" if fmt.is_lut else "") + (" qstats" if fmt.quantized_stats else "")]
        if fmt.has_outliers:
            parts.append(f"{100 * fmt.nnz / (self.in_features * self.out_features):.1f}%o")
        if fmt.rank:
            parts.append(f"r{fmt.rank}")
        return " ".join(parts)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int = 4,
        group_size: int = 128,
        outliers: float = 0.0,
        method: str = "auto",
        lut: bool = False,
        lowrank_rank: int = 0,
        act_order: bool = False,
        quantize_stats: bool = False,
        calib: InputStats | Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear`` (left unchanged). ``method="auto"`` takes the best the inputs allow:
        GPTQ (+ SpQR-style outliers) with calibration, data-free HQQ (or RTN with outliers or
        ``quantize_stats``) without; ``lut=True`` uses per-channel k-means lookup tables instead of
        a uniform grid; ``quantize_stats=True`` stores the group scales/zeros in SpQR's 4-bit
        second-level form (pairs well with ``group_size=32``). ``calib`` is collected
        :class:`InputStats` or a tensor of sample inputs (..., in_features)."""
        linear = check_linear(linear)
        lut = check_bool("lut", lut)
        if lut and method not in ("auto", "lut"):
            raise ValueError(f"lut/method: lut=True uses method 'lut', got method {method!r}")
        stats = as_input_stats(calib, linear.in_features)
        fmt = compress.quantize(
            linear.weight.detach(), bits=bits, group_size=group_size, outliers=outliers,
            method="lut" if lut else method, lowrank_rank=lowrank_rank, stats=stats, act_order=act_order,
            quantize_stats=quantize_stats, dtype=linear.weight.dtype,
        )
        return cls(fmt, linear.bias, linear.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        first, second = (self.stat_codes, self.stat_meta) if self.stat_codes is not None else (self.scales, self.zeros)
        return quant_linear(
            x, self.qweight, self.qweight_hi, first, second, self.lut,
            self.outlier_rowptr, self.outlier_cols, self.outlier_vals, self.lr_u, self.lr_v, self.bias,
            bits=self.bits, group_size=self.group_size, in_features=self.in_features,
        )

    def config(self) -> dict[str, Any]:
        return {**self.format.config(), "nnz": self.format.nnz, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> "QuantLinear":
        n, k, bits, g = config["out_features"], config["in_features"], config["bits"], config["group_size"]
        k_pad, rank, nnz = padded_k(k, g), config["rank"], config["nnz"]

        def empty(*shape: int, dt: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dt, device=device)

        rowptr = None
        if config["outliers"]:  # placeholder pointers that pass validate(); the state dict overwrites them
            rowptr = torch.full((n + 1,), nnz, dtype=torch.int32, device=device)
            rowptr[0] = 0

        stats = {}
        if not config["lut"]:
            layout = group_stats_layout(config.get("quantized_stats", False), n, k_pad // g)
            stats = {name: empty(*shape, dt=dt) for name, dt, shape in layout}
        fmt = QuantFormat(
            qweight=empty(n, k_pad * (2 if bits == 3 else bits) // 32, dt=torch.int32),
            qweight_hi=empty(n, k_pad // 32, dt=torch.int32) if bits == 3 else None,
            scales=stats.get("scales"), zeros=stats.get("zeros"),
            stat_codes=stats.get("stat_codes"), stat_meta=stats.get("stat_meta"),
            lut=empty(n, 1 << bits, dt=torch.float16) if config["lut"] else None,
            outlier_rowptr=rowptr,
            outlier_cols=empty(nnz, dt=torch.int16) if config["outliers"] else None,
            outlier_vals=empty(nnz, dt=torch.float16) if config["outliers"] else None,
            lr_u=empty(n, rank, dt=dtype) if rank else None,
            lr_v=empty(rank, k, dt=dtype) if rank else None,
            bits=bits, group_size=g, in_features=k, out_features=n,
        )
        return cls(fmt, empty(n, dt=dtype) if config["bias"] else None, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.setting()}, "
            f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight:.2f}"
        )


def build_quant_layers(
    linears: Mapping[str, nn.Linear],
    stats: Mapping[str, InputStats] | None,
    *,
    recipes: Mapping[str, Mapping[str, Any]] | None = None,
    probe: Callable[[str, nn.Module], float] | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, QuantLinear]:
    """Quantize every named linear with ``options`` (see :meth:`QuantLinear.from_linear`).

    ``recipes`` maps glob patterns of layer names to option overrides (first match wins), for
    mixed recipes such as 4-bit attention with 3-bit MLPs. ``probe`` is unused: quantization
    settings are per layer.
    """
    return build_per_layer(QuantLinear.from_linear, linears, stats, recipes, options, desc="quantize", progress=progress)
