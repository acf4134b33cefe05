"""Low-rank compression: dense weight ``W`` (N × K, ``nn.Linear`` layout) → factors ``U`` (N × r)
and ``V`` (r × K) with ``W ≈ U V``.

Two decompositions share one code path (:func:`decompose`):

* plain truncated SVD of ``W`` (Eckart–Young optimal in ‖W − UV‖_F);
* SVD-LLM whitening: with ``C = XᵀX/n = S Sᵀ`` (Cholesky), the SVD of ``W S`` truncated to
  rank r and mapped back with ``S⁻¹`` minimises the calibration output error ‖(W − UV) Xᵀ‖_F.

Singular values are split as ``√σ`` into both factors (balanced, good for fine-tuning).
All linear algebra runs in float64 on the weight's device (an offline, one-off cost that buys
a reliable Cholesky and SVD); factors come back in float32 and the caller casts.

Rank choice: a fixed rank, a parameter ratio, a spectral-energy target, or a global budget
spread over many layers (:func:`allocate_ranks`). To avoid a second SVD after allocation,
keep each layer's :class:`WeightSVD` and pass it to :func:`factorize` (``svd=``): that trades
memory (≈ the dense weights in float64) for time; without it factorize recomputes the SVD.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from lowrank_ops.calibration import InputStats, check_input_stats, relative_output_error, relative_weight_error
from lowrank_ops.core.checks import (
    FLOAT_DTYPES,
    check_dim,
    check_finite,
    check_fraction,
    check_int,
    check_tensor,
)

_WEIGHT_DTYPES = FLOAT_DTYPES + (torch.float64,)
_DAMP_STEPS = 5  # damping tried: damp, 10·damp, …, 10⁴·damp (relative to mean(diag C))
_PD_RTOL = 1e-10  # a Cholesky pivot² below this × mean(diag C) counts as "not positive definite"


# ----------------------------------------------------------------------------- checks


def _check_weight(weight: object, name: str = "weight") -> Tensor:
    check_tensor(name, weight, ndim=2, dtypes=_WEIGHT_DTYPES)
    check_finite(name, weight)
    return weight


def _check_factors(weight: Tensor, u: object, v: object) -> tuple[Tensor, Tensor]:
    n, k = weight.shape
    check_tensor("u", u, ndim=2, dtypes=_WEIGHT_DTYPES)
    check_tensor("v", v, ndim=2, dtypes=_WEIGHT_DTYPES)
    check_dim("u", u, 0, n, "out_features of weight")
    check_dim("v", v, 1, k, "in_features of weight")
    check_dim("v", v, 0, u.shape[1], "rank of u")
    return u, v


def _check_damp(damp: object) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)):
        raise TypeError(f"damp: expected a float, got {type(damp).__name__}")
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp: expected a finite number > 0, got {damp}")
    return float(damp)


# ----------------------------------------------------------------------------- decomposition


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values (descending, float64, CPU) of ``W`` or of ``W·S`` when whitened, plus the
    layer's shape: everything :func:`allocate_ranks` needs."""

    singular_values: Tensor
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        n = check_int("out_features", self.out_features, low=1)
        k = check_int("in_features", self.in_features, low=1)
        check_tensor("singular_values", self.singular_values, ndim=1, dtypes=_WEIGHT_DTYPES)
        check_dim("singular_values", self.singular_values, 0, min(n, k), "min(out_features, in_features)")
        check_finite("singular_values", self.singular_values)


@dataclass(frozen=True)
class WeightSVD:
    """``W·S = u · diag(s) · vh`` (thin SVD, float64), ``S`` the lower-triangular whitening factor
    or ``None`` for a plain SVD of ``W``."""

    u: Tensor
    s: Tensor
    vh: Tensor
    whitening: Tensor | None

    def spectrum(self) -> LayerSpectrum:
        return LayerSpectrum(self.s.cpu(), self.u.shape[0], self.vh.shape[1])

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Balanced rank-``rank`` factors ``U = u_r √σ_r``, ``V = √σ_r vh_r S⁻¹`` (float32)."""
        rank = check_int("rank", rank, low=1, high=self.s.numel())
        root = self.s[:rank].sqrt()
        u = self.u[:, :rank] * root
        v = root[:, None] * self.vh[:rank]
        if self.whitening is not None:  # V S = B  →  V = B S⁻¹, by triangular solve
            v = torch.linalg.solve_triangular(self.whitening, v, upper=False, left=False)
        return u.float().contiguous(), v.float().contiguous()


def _whitening_factor(stats: InputStats, device: torch.device, damp: float) -> Tensor:
    """Cholesky factor ``S`` of ``C = XᵀX/n`` (``C = S Sᵀ``), damped when ``C`` is not (numerically)
    positive definite: ``C + d·mean(diag C)·I`` with ``d = damp, 10·damp, …``."""
    c = stats.second_moment().to(device=device, dtype=torch.float64)
    scale = float(c.diagonal().mean())
    if not scale > 0:
        raise ValueError("stats: expected calibration inputs with some non-zero channel, got all-zero inputs")
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=device)
    for d in [0.0] + [damp * 10**i for i in range(_DAMP_STEPS)]:
        factor, info = torch.linalg.cholesky_ex(c + (d * scale) * eye)
        if int(info) == 0 and float(factor.diagonal().min()) ** 2 > _PD_RTOL * scale:
            return factor
    raise ValueError(
        f"stats: second moment is not positive definite even with damping {d:g}·mean(diag C); "
        "the calibration statistics look corrupt"
    )


def decompose(weight: Tensor, stats: InputStats | None = None, *, damp: float = 1e-2) -> WeightSVD:
    """Thin SVD of ``weight`` (plain) or of ``weight · S`` (whitened, when ``stats`` is given)."""
    weight = _check_weight(weight)
    damp = _check_damp(damp)
    w = weight.to(torch.float64)
    whitening = None
    if stats is not None:
        whitening = _whitening_factor(check_input_stats(stats, weight.shape[1]), weight.device, damp)
        w = w @ whitening
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return WeightSVD(u, s, vh, whitening)


def layer_spectrum(weight: Tensor, stats: InputStats | None = None, *, damp: float = 1e-2) -> LayerSpectrum:
    """Singular values of ``weight`` (or of ``weight · S`` with ``stats``) for :func:`allocate_ranks`."""
    return decompose(weight, stats, damp=damp).spectrum()


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of the plain truncated SVD: minimises ‖W − UV‖_F."""
    _check_weight(weight)
    check_int("rank", rank, low=1, high=min(weight.shape))
    return decompose(weight).factors(rank)


def whitened_svd(weight: Tensor, rank: int, stats: InputStats, damp: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` SVD-LLM factors: minimise ‖(W − UV) Xᵀ‖_F on the calibration inputs."""
    _check_weight(weight)
    check_int("rank", rank, low=1, high=min(weight.shape))
    if stats is None:
        raise TypeError("stats: expected an InputStats, got NoneType")
    return decompose(weight, stats, damp=damp).factors(rank)


# ----------------------------------------------------------------------------- rank choice


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors keep at most ``ratio`` of the dense parameters (at least 1)."""
    n = check_int("out_features", out_features, low=1)
    k = check_int("in_features", in_features, low=1)
    ratio = check_fraction("ratio", ratio)
    return max(1, math.floor(ratio * n * k / (n + k)))


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest rank whose leading σ² sum to at least ``energy`` of the total (1 for a zero matrix)."""
    check_tensor("singular_values", singular_values, ndim=1, dtypes=_WEIGHT_DTYPES)
    if singular_values.numel() == 0:
        raise ValueError("singular_values: expected at least one value, got an empty tensor")
    check_finite("singular_values", singular_values)
    energy = check_fraction("energy", energy)
    power = singular_values.to(torch.float64).square()
    cumulative = power.cumsum(0)
    target = energy * float(cumulative[-1]) * (1 - 1e-12)  # tolerate rounding at energy = 1
    rank = int((cumulative < target).sum()) + 1
    return min(rank, singular_values.numel())


def max_saving_rank(n: int, k: int) -> int:
    """Largest rank ``r`` with ``r·(n + k) < n·k``; above it the factors are no smaller than ``W``."""
    n = check_int("n", n, low=1)
    k = check_int("k", k, low=1)
    return (n * k - 1) // (n + k)


# ----------------------------------------------------------------------------- errors


def weight_error(weight: Tensor, u: Tensor, v: Tensor) -> float:
    """``‖W − UV‖_F / ‖W‖_F``."""
    _check_weight(weight)
    u, v = _check_factors(weight, u, v)
    return relative_weight_error(weight, u.double() @ v.double())


def calib_error(weight: Tensor, u: Tensor, v: Tensor, stats: InputStats) -> float:
    """Relative output error of ``UV`` on the calibration inputs (see
    :func:`lowrank_ops.calibration.relative_output_error`)."""
    _check_weight(weight)
    u, v = _check_factors(weight, u, v)
    return relative_output_error(weight, u.double() @ v.double(), check_input_stats(stats, weight.shape[1]))


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class Factorization:
    """Factors ``u`` (N × r), ``v`` (r × K) in float32 with their errors (see :func:`weight_error`,
    :func:`calib_error`; the latter ``None`` without calibration stats)."""

    u: Tensor
    v: Tensor
    rank: int
    weight_error: float
    calib_error: float | None


def factorize(
    weight: Tensor,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    stats: InputStats | None = None,
    whiten: bool | None = None,
    damp: float = 1e-2,
    svd: WeightSVD | None = None,
) -> Factorization | None:
    """Factorize one weight at a rank given by exactly one of ``rank``, ``ratio``, ``energy``.

    ``whiten`` (default: ``stats is not None``) selects SVD-LLM whitening. ``svd`` reuses a
    :func:`decompose` result of this weight (it must match ``whiten``). Returns ``None`` when
    the chosen rank exceeds :func:`max_saving_rank`: the factors would not be smaller.
    """
    weight = _check_weight(weight)
    n, k = weight.shape
    given = [name for name, value in (("rank", rank), ("ratio", ratio), ("energy", energy)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"rank, ratio, energy: expected exactly one of them, got {given or 'none'}")
    if stats is not None:
        check_input_stats(stats, k)
    if whiten is None:
        whiten = stats is not None
    elif not isinstance(whiten, bool):
        raise TypeError(f"whiten: expected a bool or None, got {type(whiten).__name__}")
    elif whiten and stats is None:
        raise ValueError("whiten: expected stats when whiten=True, got stats=None")
    if svd is not None:
        if not isinstance(svd, WeightSVD):
            raise TypeError(f"svd: expected a WeightSVD, got {type(svd).__name__}")
        if (svd.u.shape[0], svd.vh.shape[1]) != (n, k):
            raise ValueError(f"svd: expected a decomposition of a {n}×{k} weight, got {svd.u.shape[0]}×{svd.vh.shape[1]}")
        if (svd.whitening is not None) != whiten:
            raise ValueError(f"svd: expected a {'whitened' if whiten else 'plain'} decomposition (whiten={whiten}), got the other kind")

    limit = max_saving_rank(n, k)
    if rank is not None:
        chosen = check_int("rank", rank, low=1, high=min(n, k))
    elif ratio is not None:
        chosen = rank_for_ratio(n, k, ratio)
    else:
        check_fraction("energy", energy)
        chosen = None
    if chosen is not None and chosen > limit:
        return None  # decided before paying for the SVD
    if svd is None:
        svd = decompose(weight, stats if whiten else None, damp=damp)
    if chosen is None:
        chosen = rank_for_energy(svd.s, energy)
        if chosen > limit:
            return None
    u, v = svd.factors(chosen)
    return Factorization(
        u, v, chosen,
        weight_error(weight, u, v),
        calib_error(weight, u, v, stats) if stats is not None else None,
    )


# ----------------------------------------------------------------------------- many layers


def allocate_ranks(
    layers: Mapping[str, LayerSpectrum], ratio: float, weights: Mapping[str, float] | None = None
) -> dict[str, int | None]:
    """Spread a budget of ``ratio · Σ N·K`` parameters over ``layers`` to minimise
    ``Σ_layers Σ_{i>r} σ_i² / Σ σ_i²`` (relative squared error, whitened when the spectra are).

    Greedy on error reduction per parameter, with a lazy max-heap. Each layer starts at rank 1
    and has two kinds of move: one more rank (cost N+K, gain σ_{r+1}²/Σσ²), or going dense
    (``None``: cost N·K − r(N+K), gain the whole remaining tail), which is the better use for
    flat spectra. Rank steps stop at :func:`max_saving_rank`; a layer too small to save
    anything at rank 1 is dense from the start. The total never exceeds the budget.

    ``weights`` (default 1 for every layer) scale each layer's term of the objective: how much
    one unit of that layer's relative error costs at the model's output (see
    :func:`lowrank_ops.lowrank.layer.build_lowrank_layers`, which measures it on calibration data).
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers: expected a mapping of name → LayerSpectrum, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("layers: expected at least one layer, got none")
    for name, spec in layers.items():
        if not isinstance(spec, LayerSpectrum):
            raise TypeError(f"layers: expected LayerSpectrum values, got {type(spec).__name__} for {name!r}")
    ratio = check_fraction("ratio", ratio)
    if weights is not None:
        if set(weights) != set(layers):
            raise ValueError(f"weights: expected one weight per layer of layers, got keys {sorted(weights)[:5]}...")
        if not all(math.isfinite(w) and w >= 0 for w in weights.values()):
            raise ValueError("weights: expected finite non-negative numbers")

    rank: dict[str, int | None] = {}
    gains: dict[str, list[float]] = {}  # relative σ² per rank index
    tails: dict[str, list[float]] = {}  # tails[r] = relative error at rank r
    spent = 0
    for name, spec in layers.items():
        n, k = spec.out_features, spec.in_features
        power = spec.singular_values.to(torch.float64).square()
        total = float(power.sum())
        relative = power / total if total > 0 else torch.zeros_like(power)
        tail = torch.cat([relative.new_ones(1) if total > 0 else relative.new_zeros(1), (1 - relative.cumsum(0)).clamp_min(0)])
        weight = 1.0 if weights is None else float(weights[name])
        gains[name] = (weight * relative).tolist()
        tails[name] = (weight * tail).tolist()
        if max_saving_rank(n, k) >= 1:
            rank[name], cost = 1, n + k
        else:
            rank[name], cost = None, n * k
        spent += cost
    budget = ratio * sum(spec.out_features * spec.in_features for spec in layers.values())
    if spent > budget:
        raise ValueError(
            f"ratio: expected a budget of at least rank 1 per layer ({spent} parameters), "
            f"got {ratio} → {budget:.0f} parameters"
        )

    heap: list[tuple[float, int, str, str, int]] = []  # (-gain per parameter, tiebreak, name, move, rank)
    order = {name: i for i, name in enumerate(layers)}

    def push(name: str) -> None:
        r = rank[name]
        if r is None:
            return
        spec = layers[name]
        n, k = spec.out_features, spec.in_features
        if r < max_saving_rank(n, k) and gains[name][r] > 0:
            heapq.heappush(heap, (-gains[name][r] / (n + k), order[name], name, "step", r))
        if tails[name][r] > 0:
            heapq.heappush(heap, (-tails[name][r] / (n * k - r * (n + k)), order[name], name, "dense", r))

    for name in layers:
        push(name)
    while heap:
        _, _, name, move, r = heapq.heappop(heap)
        if rank[name] != r:
            continue  # stale: the layer moved since this entry was pushed
        spec = layers[name]
        n, k = spec.out_features, spec.in_features
        cost = n + k if move == "step" else n * k - r * (n + k)
        if spent + cost > budget:
            continue  # a dense move may fit later, after cheaper steps of this layer
        spent += cost
        rank[name] = r + 1 if move == "step" else None
        push(name)
    return rank
