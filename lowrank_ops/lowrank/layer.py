"""Drop-in layers of the low-rank family.

* :class:`LowRankLinear` — ``y = (x Vᵀ) Uᵀ + b``: a factorized weight (compression, or training
  factors from scratch).
* :class:`LoRALinear` — ``y = x Wᵀ + s·(x Aᵀ) Bᵀ + b``: a frozen dense base plus a trainable
  rank-r adapter, one fused kernel.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowrank_ops.calibration import InputStats, as_input_stats
from lowrank_ops.core.checks import check_int, check_linear
from lowrank_ops.core.layers import CompressedLinear
from lowrank_ops.lowrank import compress
from lowrank_ops.lowrank.format import LowRankFormat
from lowrank_ops.lowrank.ops import lora_linear, lowrank_linear


def _new_parameter(shape: tuple[int, ...], like: Tensor | None, dtype: torch.dtype | None, device) -> nn.Parameter:
    if like is not None:
        dtype, device = like.dtype, like.device
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


class LowRankLinear(CompressedLinear):
    """``nn.Linear`` with its weight stored as U (out×r) and V (r×in); both trainable."""

    FORMAT = "lowrank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, low=1)
        self.out_features = check_int("out_features", out_features, low=1)
        check_int("rank", rank, low=1, high=min(in_features, out_features))
        self.u = _new_parameter((out_features, rank), None, dtype, device)
        self.v = _new_parameter((rank, in_features), None, dtype, device)
        self.bias = _new_parameter((out_features,), None, dtype, device) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors whose product has the scale of ``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        self.u.data.mul_(math.sqrt(3.0))  # (x Vᵀ) has 1/3 of x's variance; restore it before U
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    def setting(self) -> str:
        return f"rank {self.rank}"

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def format(self) -> LowRankFormat:
        return LowRankFormat(self.u.detach(), self.v.detach())

    @property
    def weight_nbytes(self) -> int:
        return self.format.nbytes

    def dense_weight(self) -> Tensor:
        return self.format.dense()

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None = None) -> "LowRankLinear":
        """A layer holding copies of the given factors (U: out×r, V: r×in) and bias."""
        fmt = LowRankFormat(u, v)
        layer = cls(fmt.in_features, fmt.out_features, fmt.rank, bias is not None, u.device, u.dtype)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        calib: InputStats | Tensor | None = None,
        whiten: bool | None = None,
    ) -> "LowRankLinear":
        """Factorize ``linear`` (exactly one of ``rank``, ``ratio``, ``energy``).

        ``calib`` (collected :class:`InputStats` or a tensor of sample inputs) turns on the
        activation-aware whitened SVD unless ``whiten=False``. Raises ``ValueError`` when the
        chosen rank would not store fewer bytes than the dense weight. ``linear`` is not changed.
        """
        linear = check_linear(linear)
        layer = _factorized(linear, as_input_stats(calib, linear.in_features), whiten, rank=rank, ratio=ratio, energy=energy)
        if layer is None:
            limit = compress.max_saving_rank(linear.out_features, linear.in_features)
            raise ValueError(
                f"rank/ratio/energy: the chosen rank saves no bytes for a {linear.out_features}x{linear.in_features} "
                f"weight (factorizing pays only up to rank {limit})"
            )
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return lowrank_linear(x, self.v, self.u, self.bias)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> "LowRankLinear":
        return cls(config["in_features"], config["out_features"], config["rank"], config["bias"], device, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight:.2f}"
        )


class LoRALinear(CompressedLinear):
    """A frozen dense base ``W`` plus a trainable low-rank adapter: ``x Wᵀ + (α/r)·(x Aᵀ) Bᵀ + b``."""

    FORMAT = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, low=1)
        self.out_features = check_int("out_features", out_features, low=1)
        check_int("rank", rank, low=1, high=min(in_features, out_features))
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha: expected a float or None, got {type(alpha).__name__}")
        self.alpha = float(rank if alpha is None else alpha)
        self.weight = _new_parameter((out_features, in_features), None, dtype, device).requires_grad_(False)
        self.bias = _new_parameter((out_features,), None, dtype, device).requires_grad_(False) if bias else None
        self.lora_a = _new_parameter((rank, in_features), None, dtype, device)
        self.lora_b = _new_parameter((out_features, rank), None, dtype, device)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """LoRA initialisation: random A, zero B, so the layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def setting(self) -> str:
        return f"rank {self.rank}"

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.lora_a, self.lora_b))

    def dense_weight(self) -> Tensor:
        return self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int = 8, alpha: float | None = None) -> "LoRALinear":
        """Wrap a copy of ``linear``'s weight and bias (frozen) with a fresh rank-``rank`` adapter."""
        linear = check_linear(linear)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, alpha, linear.bias is not None, w.device, w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into the weight."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.weight.device, self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scale, self.bias)

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
            "alpha": self.alpha, "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device=None) -> "LoRALinear":
        return cls(config["in_features"], config["out_features"], config["rank"], config["alpha"], config["bias"], device, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}, bias={self.bias is not None}"


def build_lowrank_layers(
    linears: Mapping[str, nn.Linear],
    stats: Mapping[str, InputStats] | None,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    allocation: str = "uniform",
    whiten: bool | None = None,
    probe: Callable[[str, nn.Module], float] | None = None,
    progress: bool = False,
) -> dict[str, LowRankLinear | None]:
    """Factorize each named linear; ``None`` for a layer left dense because factors would not save bytes.

    ``allocation="uniform"`` applies ``rank``/``ratio``/``energy`` to every layer;
    ``allocation="global"`` treats ``ratio`` as a budget over all the layers' parameters and
    spends rank where it lowers the model's error most: each layer's (whitened, when
    calibrated) spectrum says how its relative error falls with rank, and ``probe`` (see
    :class:`lowrank_ops.calibration.OutputProbe`), when given, says how much one unit of that
    layer's error moves the model's outputs, measured with the layer alone at the uniform rank.
    """
    if allocation not in ("uniform", "global"):
        raise ValueError(f"allocation: expected 'uniform' or 'global', got {allocation!r}")
    ranks: dict[str, dict[str, Any]] = {name: {"rank": rank, "ratio": ratio, "energy": energy} for name in linears}
    if allocation == "global":
        if ratio is None or rank is not None or energy is not None:
            raise ValueError("allocation='global': expected ratio (the parameter budget) and neither rank nor energy")
        spectra, weights = _spectra_and_sensitivities(linears, stats, ratio, whiten, probe, progress)
        ranks = {name: {"rank": r} for name, r in compress.allocate_ranks(spectra, ratio, weights).items()}
    layers: dict[str, LowRankLinear | None] = {}
    for name, linear in tqdm(linears.items(), desc="low-rank", disable=not progress, leave=False):
        choice = ranks[name]
        if allocation == "global" and choice["rank"] is None:  # the budget keeps this layer dense
            layers[name] = None
            continue
        layer_stats = None if stats is None else stats[name]
        try:
            layers[name] = _factorized(linear, layer_stats, whiten, **choice)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {name!r}: {err}") from err
    return layers


def _spectra_and_sensitivities(
    linears: Mapping[str, nn.Linear],
    stats: Mapping[str, InputStats] | None,
    ratio: float,
    whiten: bool | None,
    probe: Callable[[str, nn.Module], float] | None,
    progress: bool,
) -> tuple[dict[str, compress.LayerSpectrum], dict[str, float] | None]:
    """Each layer's spectrum and, with a probe, its sensitivity: the output error the probe
    measures with the layer alone at the uniform rank, per unit of the layer's own relative
    squared error at that rank."""
    use_stats = stats is not None and whiten is not False
    spectra: dict[str, compress.LayerSpectrum] = {}
    weights: dict[str, float] = {}
    for name, linear in tqdm(linears.items(), desc="spectra", disable=not progress, leave=False):
        svd = compress.decompose(linear.weight.detach(), stats[name] if use_stats else None)
        spectra[name] = spec = svd.spectrum()
        if probe is None:
            continue
        r = min(compress.rank_for_ratio(spec.out_features, spec.in_features, ratio), compress.max_saving_rank(spec.out_features, spec.in_features))
        power = spec.singular_values.double().square()
        own_error = float(power[max(r, 0):].sum() / power.sum().clamp_min(1e-300))
        if r < 1 or own_error == 0.0:
            weights[name] = 0.0
            continue
        u, v = svd.factors(r)
        bias = None if linear.bias is None else linear.bias.detach()
        candidate = LowRankLinear.from_factors(u.to(linear.weight.dtype), v.to(linear.weight.dtype), bias)
        weights[name] = probe(name, candidate) / own_error
    return spectra, (weights if probe is not None else None)


def _factorized(linear: nn.Linear, stats: InputStats | None, whiten: bool | None, **choice: Any) -> LowRankLinear | None:
    """``linear`` as a :class:`LowRankLinear`, or None when the chosen rank saves no bytes."""
    rank = choice.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > compress.max_saving_rank(linear.out_features, linear.in_features):
        return None
    result = compress.factorize(linear.weight.detach(), stats=stats, whiten=whiten, **choice)
    if result is None:
        return None
    dtype = linear.weight.dtype
    bias = None if linear.bias is None else linear.bias.detach()
    return LowRankLinear.from_factors(result.u.to(dtype), result.v.to(dtype), bias)
