"""Reference lane: low-rank compression algorithms (lowrank_ops.lowrank.compress)."""
import math

import pytest
import torch

from lowrank_ops.calibration import InputStats
from lowrank_ops.lowrank.compress import (
    Factorization,
    LayerSpectrum,
    allocate_ranks,
    calib_error,
    decompose,
    factorize,
    layer_spectrum,
    max_saving_rank,
    rank_for_energy,
    rank_for_ratio,
    truncated_svd,
    weight_error,
    whitened_svd,
)

SHAPES = [(24, 40), (40, 24), (17, 17)]


def _low_rank(n, k, r):
    return torch.randn(n, r) @ torch.randn(r, k)


def _stats(x: torch.Tensor) -> InputStats:
    stats = InputStats()
    stats.update(x)
    return stats


def _anisotropic(m, k):
    """Inputs whose channel scales span three decades, mixed by a random rotation."""
    q, _ = torch.linalg.qr(torch.randn(k, k))
    return (torch.randn(m, k) * torch.logspace(-2, 1, k)) @ q


def _direct_calib_error(w, u, v, x):
    w, x = w.double(), x.double()
    return float(((w - u.double() @ v.double()) @ x.T).norm() / (w @ x.T).norm())


def _tail(s: torch.Tensor, r: int) -> float:
    p = s.double().square()
    return float(p[r:].sum() / p.sum())


# ----------------------------------------------------------------------------- truncated_svd


@pytest.mark.parametrize("n, k", SHAPES)
def test_truncated_svd_exact_on_rank_r(n, k):
    w = _low_rank(n, k, 5)
    u, v = truncated_svd(w, 5)
    assert u.shape == (n, 5) and v.shape == (5, k)
    assert u.dtype == v.dtype == torch.float32
    assert weight_error(w, u, v) < 1e-6


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("rank", [1, 7, 16])
def test_truncated_svd_eckart_young(n, k, rank):
    w = torch.randn(n, k, dtype=torch.float64)
    u, v = truncated_svd(w, rank)
    s = torch.linalg.svdvals(w)
    assert weight_error(w, u, v) ** 2 == pytest.approx(_tail(s, rank), rel=1e-5)


def test_truncated_svd_balanced_factors():
    w = torch.randn(30, 20)
    u, v = truncated_svd(w, 6)
    torch.testing.assert_close(u.T @ u, v @ v.T, atol=1e-4, rtol=1e-4)  # both diag(σ_r)
    torch.testing.assert_close(torch.diagonal(u.T @ u), torch.linalg.svdvals(w)[:6], atol=1e-4, rtol=1e-4)


def test_truncated_svd_half_precision_weight():
    w = torch.randn(32, 48).half()
    u, v = truncated_svd(w, 4)
    assert u.dtype == torch.float32
    assert weight_error(w, u, v) ** 2 == pytest.approx(_tail(torch.linalg.svdvals(w.double()), 4), rel=1e-5)


# ----------------------------------------------------------------------------- whitened_svd


@pytest.mark.parametrize("n, k", SHAPES)
def test_whitened_beats_plain_on_calibration_error(n, k):
    x = _anisotropic(2000, k)
    stats, w = _stats(x), torch.randn(n, k)
    for rank in (2, 8, 12):
        plain = calib_error(w, *truncated_svd(w, rank), stats)
        white = calib_error(w, *whitened_svd(w, rank, stats), stats)
        assert white < 0.8 * plain


def test_whitened_error_is_the_whitened_tail():
    """Undamped whitening is optimal: its squared calibration error is the σ² tail of W·S."""
    k = 32
    x = _anisotropic(1000, k)
    stats, w = _stats(x), torch.randn(20, k)
    s = layer_spectrum(w, stats).singular_values
    for rank in (1, 5, 15):
        assert calib_error(w, *whitened_svd(w, rank, stats), stats) ** 2 == pytest.approx(_tail(s, rank), rel=1e-4)


@pytest.mark.parametrize("n, k", SHAPES)
def test_whitened_exact_at_full_rank(n, k):
    w = torch.randn(n, k)
    u, v = whitened_svd(w, min(n, k), _stats(_anisotropic(500, k)))
    assert weight_error(w, u, v) < 1e-5


def test_whitened_singular_second_moment_is_damped():
    k = 24
    w = torch.randn(16, k)
    few = _stats(torch.randn(8, k))  # rank-8 second moment
    zero_channel = torch.randn(400, k)
    zero_channel[:, 3] = 0
    for stats, x in ((few, None), (_stats(zero_channel), zero_channel)):
        u, v = whitened_svd(w, 16, stats)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        assert weight_error(w, u, v) < 1e-5  # full rank of this 16×24 weight
        u, v = whitened_svd(w, 6, stats)
        assert weight_error(w, u, v) < 2.0  # damping keeps V bounded
        assert calib_error(w, u, v, stats) < calib_error(w, *truncated_svd(w, 6), stats)


def test_whitened_all_zero_inputs_refused():
    with pytest.raises(ValueError, match="stats.*zero"):
        whitened_svd(torch.randn(4, 6), 2, _stats(torch.zeros(10, 6)))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("n, k", SHAPES)
def test_calib_error_matches_direct(n, k):
    x = _anisotropic(300, k)
    w = torch.randn(n, k)
    stats = _stats(x)
    for u, v in (truncated_svd(w, 3), whitened_svd(w, 3, stats)):
        assert calib_error(w, u, v, stats) == pytest.approx(_direct_calib_error(w, u, v, x), rel=1e-6)


def test_errors_of_zero_weight():
    w = torch.zeros(4, 6)
    u, v = torch.zeros(4, 1), torch.zeros(1, 6)
    assert weight_error(w, u, v) == 0.0
    assert calib_error(w, u, v, _stats(torch.randn(5, 6))) == 0.0
    assert weight_error(w, torch.ones(4, 1), torch.ones(1, 6)) == math.inf


# ----------------------------------------------------------------------------- rank choice


def test_rank_for_ratio_values():
    assert rank_for_ratio(4096, 4096, 0.5) == 1024
    assert rank_for_ratio(4096, 11008, 0.25) == math.floor(0.25 * 4096 * 11008 / 15104)
    assert rank_for_ratio(6, 4, 1.0) == 2
    assert rank_for_ratio(100, 10, 0.01) == 1  # at least 1


def test_rank_for_energy_values():
    s = torch.tensor([3.0, 2.0, 1.0])  # σ² = 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.65) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(torch.zeros(4), 0.5) == 1


def test_max_saving_rank_values():
    assert max_saving_rank(4096, 4096) == 2047
    assert max_saving_rank(10, 10) == 4  # 5·20 = 100 saves nothing
    assert max_saving_rank(1, 100) == 0
    for n, k in [(7, 13), (64, 3), (4096, 11008)]:
        r = max_saving_rank(n, k)
        assert r * (n + k) < n * k <= (r + 1) * (n + k)


# ----------------------------------------------------------------------------- factorize


def test_factorize_by_rank_ratio_energy():
    w = torch.randn(40, 60)
    f = factorize(w, rank=5)
    assert isinstance(f, Factorization) and f.rank == 5 and f.calib_error is None
    assert f.weight_error == pytest.approx(math.sqrt(_tail(torch.linalg.svdvals(w), 5)), rel=1e-5)
    assert factorize(w, ratio=0.3).rank == rank_for_ratio(40, 60, 0.3)
    s = torch.linalg.svdvals(w.double())
    assert factorize(w, energy=0.5).rank == rank_for_energy(s, 0.5)


def test_factorize_with_stats_whitens_by_default():
    x = _anisotropic(800, 32)
    stats, w = _stats(x), torch.randn(24, 32)
    white, plain = factorize(w, rank=4, stats=stats), factorize(w, rank=4, stats=stats, whiten=False)
    assert white.calib_error < plain.calib_error and plain.weight_error < white.weight_error
    assert white.calib_error == pytest.approx(_direct_calib_error(w, white.u, white.v, x), rel=1e-6)


def test_factorize_reuses_precomputed_svd():
    x = _anisotropic(300, 20)
    stats, w = _stats(x), torch.randn(30, 20)
    svd = decompose(w, stats)
    a, b = factorize(w, rank=3, stats=stats, svd=svd), factorize(w, rank=3, stats=stats)
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v) and a.calib_error == b.calib_error
    with pytest.raises(ValueError, match="svd.*plain"):
        factorize(w, rank=3, svd=svd)
    with pytest.raises(ValueError, match="svd"):
        factorize(torch.randn(20, 30), rank=3, svd=decompose(w))
    with pytest.raises(TypeError, match="svd"):
        factorize(w, rank=3, svd=(svd.u, svd.s, svd.vh))


def test_factorize_returns_none_when_no_saving():
    w = torch.randn(10, 10)
    assert factorize(w, rank=4) is not None
    assert factorize(w, rank=5) is None
    assert factorize(w, ratio=0.9).rank == 4
    assert factorize(w, ratio=1.0) is None  # rank 5 keeps every parameter
    assert factorize(w, energy=1.0) is None  # a flat-ish random spectrum needs all 10
    assert factorize(torch.randn(1, 50), rank=1) is None


# ----------------------------------------------------------------------------- allocate_ranks


def _cost(spec: LayerSpectrum, r):
    n, k = spec.out_features, spec.in_features
    return n * k if r is None else r * (n + k)


def _total_error(specs, ranks):
    return sum(0.0 if ranks[name] is None else _tail(spec.singular_values, ranks[name]) for name, spec in specs.items())


def _budget_ok(specs, ranks, ratio):
    return sum(_cost(s, ranks[n]) for n, s in specs.items()) <= ratio * sum(s.out_features * s.in_features for s in specs.values())


def _decaying_and_flat(n=64, k=64):
    decaying = (torch.randn(n, k) * 0.6 ** torch.arange(k)) @ torch.linalg.qr(torch.randn(k, k))[0]
    return {"decaying": layer_spectrum(decaying), "flat": layer_spectrum(torch.linalg.qr(torch.randn(n, k))[0])}


def test_allocate_prefers_useful_ranks_and_beats_uniform():
    specs = _decaying_and_flat()
    for ratio in (0.1, 0.2, 0.3, 0.45):
        ranks = allocate_ranks(specs, ratio)
        assert _budget_ok(specs, ranks, ratio)
        uniform = {name: rank_for_ratio(64, 64, ratio) for name in specs}
        if ratio >= 0.2:
            assert ranks["decaying"] < uniform["decaying"] < ranks["flat"]
        assert _total_error(specs, ranks) < _total_error(specs, uniform)
        # greedy: the decaying layer's last kept σ² is worth more than a flat rank (1/64 of its
        # energy, same cost), the first one it dropped less
        s = specs["decaying"].singular_values.square()
        p = s / s.sum()
        assert p[ranks["decaying"] - 1] >= 1 / 64 >= p[ranks["decaying"]]


def test_allocate_goes_dense_for_flat_spectrum():
    """An orthogonal matrix: ranks cost N+K each for 1/K of the energy; dense costs N·K for all."""
    specs = _decaying_and_flat()
    ranks = allocate_ranks(specs, 0.6)
    assert ranks["flat"] is None and isinstance(ranks["decaying"], int)
    assert _budget_ok(specs, ranks, 0.6)


def test_allocate_exact_low_rank_layer_gets_its_rank():
    specs = {"lr": layer_spectrum(_low_rank(48, 64, 6)), "rand": layer_spectrum(torch.randn(48, 64))}
    assert allocate_ranks(specs, 0.5)["lr"] == 6


def test_allocate_budget_on_random_layers():
    gen = torch.Generator().manual_seed(1)
    for trial in range(10):
        specs = {}
        for i in range(4):
            n, k = (int(v) for v in torch.randint(2, 50, (2,), generator=gen))
            decay = float(torch.rand((), generator=gen))
            s = (torch.rand(min(n, k), generator=gen) * decay ** torch.arange(min(n, k))).sort(descending=True).values
            specs[f"l{i}"] = LayerSpectrum(s, n, k)
        ratio = 0.3 + 0.7 * float(torch.rand((), generator=gen))
        try:
            ranks = allocate_ranks(specs, ratio)
        except ValueError:
            continue  # budget below rank 1 everywhere
        assert _budget_ok(specs, ranks, ratio)
        for name, r in ranks.items():
            spec = specs[name]
            assert r is None or 1 <= r <= max_saving_rank(spec.out_features, spec.in_features)


def test_allocate_tiny_layer_is_dense_and_budget_too_small():
    specs = {"row": LayerSpectrum(torch.ones(1), 1, 30), "big": layer_spectrum(torch.randn(30, 30))}
    ranks = allocate_ranks(specs, 0.5)
    assert ranks["row"] is None and ranks["big"] >= 1
    with pytest.raises(ValueError, match="ratio"):
        allocate_ranks(specs, 0.01)


# ----------------------------------------------------------------------------- bad inputs

W = torch.randn(8, 12)
STATS = _stats(torch.randn(20, 12))
U, V = torch.randn(8, 2), torch.randn(2, 12)
NAN_W = W.clone()
NAN_W[0, 0] = float("nan")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: truncated_svd(W.numpy(), 2), TypeError, "weight"),
        (lambda: truncated_svd(W[0], 2), ValueError, "weight"),
        (lambda: truncated_svd(W.int(), 2), TypeError, "weight"),
        (lambda: truncated_svd(NAN_W, 2), ValueError, "weight.*finite"),
        (lambda: truncated_svd(W, 0), ValueError, "rank"),
        (lambda: truncated_svd(W, 9), ValueError, "rank"),
        (lambda: truncated_svd(W, 2.0), TypeError, "rank"),
        (lambda: whitened_svd(W, 2, None), TypeError, "stats"),
        (lambda: whitened_svd(W, 2, "stats"), TypeError, "stats"),
        (lambda: whitened_svd(W, 2, _stats(torch.randn(5, 7))), ValueError, "stats.*12"),
        (lambda: whitened_svd(W, 2, InputStats(12)), ValueError, "stats"),
        (lambda: whitened_svd(W, 2, STATS, damp=0.0), ValueError, "damp"),
        (lambda: whitened_svd(W, 2, STATS, damp="x"), TypeError, "damp"),
        (lambda: rank_for_ratio(0, 4, 0.5), ValueError, "out_features"),
        (lambda: rank_for_ratio(4, 4.0, 0.5), TypeError, "in_features"),
        (lambda: rank_for_ratio(4, 4, 0.0), ValueError, "ratio"),
        (lambda: rank_for_ratio(4, 4, 1.5), ValueError, "ratio"),
        (lambda: rank_for_ratio(4, 4, "half"), TypeError, "ratio"),
        (lambda: rank_for_energy(torch.ones(2, 2), 0.5), ValueError, "singular_values"),
        (lambda: rank_for_energy(torch.ones(0), 0.5), ValueError, "singular_values"),
        (lambda: rank_for_energy([1.0], 0.5), TypeError, "singular_values"),
        (lambda: rank_for_energy(torch.ones(3), 0.0), ValueError, "energy"),
        (lambda: max_saving_rank(0, 3), ValueError, "n"),
        (lambda: max_saving_rank(3, True), TypeError, "k"),
        (lambda: weight_error(W, U, V[:, :5]), ValueError, "v"),
        (lambda: weight_error(W, U[:3], V), ValueError, "u"),
        (lambda: weight_error(W, U, V[:1]), ValueError, "v.*rank"),
        (lambda: calib_error(W, U, V, None), TypeError, "stats"),
        (lambda: factorize(W), ValueError, "rank, ratio, energy.*none"),
        (lambda: factorize(W, rank=2, ratio=0.5), ValueError, "exactly one"),
        (lambda: factorize(W, rank=2, whiten=True), ValueError, "whiten"),
        (lambda: factorize(W, rank=2, stats=STATS, whiten="yes"), TypeError, "whiten"),
        (lambda: factorize(W, rank=20), ValueError, "rank"),
        (lambda: factorize(W, ratio=-1.0), ValueError, "ratio"),
        (lambda: factorize(W, energy=2.0), ValueError, "energy"),
        (lambda: factorize(NAN_W, rank=2), ValueError, "weight"),
        (lambda: factorize(W, rank=2, stats=torch.eye(12)), TypeError, "stats"),
        (lambda: layer_spectrum(NAN_W), ValueError, "weight"),
        (lambda: LayerSpectrum(torch.ones(3), 4, 5), ValueError, "singular_values"),
        (lambda: LayerSpectrum(torch.ones(4), 4, 0), ValueError, "in_features"),
        (lambda: allocate_ranks({}, 0.5), ValueError, "layers"),
        (lambda: allocate_ranks([layer_spectrum(W)], 0.5), TypeError, "layers"),
        (lambda: allocate_ranks({"a": torch.ones(8)}, 0.5), TypeError, "layers"),
        (lambda: allocate_ranks({"a": layer_spectrum(W)}, 0.0), ValueError, "ratio"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_allocate_weights_move_rank_to_the_sensitive_layer():
    torch.manual_seed(0)
    same = torch.linspace(1.0, 0.1, 32)
    layers = {"a": LayerSpectrum(same, 32, 32), "b": LayerSpectrum(same.clone(), 32, 32)}
    even = allocate_ranks(layers, 0.4)
    assert even["a"] == even["b"]
    tilted = allocate_ranks(layers, 0.4, weights={"a": 10.0, "b": 1.0})
    assert tilted["a"] > even["a"] > tilted["b"]
    with pytest.raises(ValueError, match="weights"):
        allocate_ranks(layers, 0.4, weights={"a": 1.0})
    with pytest.raises(ValueError, match="weights"):
        allocate_ranks(layers, 0.4, weights={"a": 1.0, "b": float("nan")})
