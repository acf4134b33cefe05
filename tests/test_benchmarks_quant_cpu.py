"""CPU test of the quant benchmark plumbing (lowrank_ops/benchmarks/quant.py): case lists, formats
and baselines built on CPU, method lists, forced paths, speedups, targets, the ``--cpu-smoke`` run
(reference, and Triton under the interpreter), ``lowrank-ops bench --suite quant``, bench/plot.py
on its JSON and bench/device_check.sh's quant step. No timing assertions.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from lowrank_ops.benchmarks import quant as QB

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_case_lists():
    full = QB.quant_cases(QB.FULL["shapes"], QB.FULL["batches"])
    assert len(full) == 3 * 6
    assert {(c.n, c.k) for c in full} == {(4096, 4096), (4096, 11008), (11008, 4096)}
    assert {c.m for c in full} == {1, 4, 16, 64, 256, 1024}
    quick = QB.quant_cases(QB.QUICK["shapes"], QB.QUICK["batches"])
    assert [(c.shape, c.m) for c in quick] == [("4096x4096", 1), ("4096x4096", 16), ("4096x4096", 256),
                                               ("11008x4096", 1), ("11008x4096", 16), ("11008x4096", 256)]
    assert QB.QUICK["configs"] == QB.FULL["configs"] == ["4b", "4b+1%", "3b+1%", "4b+r64", "3b-lut", "3b-g32qs+1%"]
    assert all(k % 128 == 0 for _, k in QB.FULL["shapes"] + QB.CPU_SMOKE["shapes"])


def test_targets_name_known_configs():
    assert all(t.config in QB.CONFIGS for t in QB.TARGETS)
    assert {t.kind for t in QB.TARGETS} == {"vs_dense", "vs_int4pack", "cost_vs_4b"}


@pytest.mark.parametrize("config", list(QB.CONFIGS))
def test_build_format_on_cpu(config):
    spec = QB.CONFIGS[config]
    fmt = QB.build_format(32, 256, config, CPU)
    assert fmt.bits == spec["bits"] and fmt.group_size == spec["group_size"] and fmt.in_features == 256
    assert fmt.has_outliers == (spec["outliers"] > 0)
    assert fmt.rank == spec["rank"]
    assert fmt.is_lut == (spec["method"] == "lut")
    assert fmt.quantized_stats == spec.get("quantize_stats", False)
    tensors = fmt.op_tensors()
    assert len(tensors) == 10
    assert sum(t.numel() * t.element_size() for t in tensors if t is not None) == fmt.nbytes
    clones = QB.clone_tensors(tensors)
    for a, b in zip(tensors, clones):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_format_cache_reuses_and_drops_by_shape():
    cache = QB.FormatCache(CPU)
    f1 = cache.format(32, 256, "4b")
    assert cache.format(32, 256, "4b") is f1
    copies = cache.copies(32, 256, "4b", 3)
    assert len(copies) == 3 and copies[0][0] is f1.qweight and copies[1][0] is not f1.qweight
    cache.format(16, 256, "4b")
    assert cache.shape == (16, 256) and len(cache.formats) == 1


def test_int4pack_builder_never_crashes():
    try:
        packed, sz, xdtype, note = QB.build_int4pack(32, 256, 1, CPU, torch.float16)
    except QB.Int4PackUnavailable as exc:
        assert str(exc)
    else:
        assert sz.shape == (2, 32, 2) and xdtype in (torch.float16, torch.bfloat16) and isinstance(note, str)
        assert packed.device == CPU


def test_int4pack_reports_missing_ops(monkeypatch):
    monkeypatch.delattr(torch, "_weight_int4pack_mm", raising=False)
    with pytest.raises(QB.Int4PackUnavailable, match="_weight_int4pack_mm"):
        QB.build_int4pack(32, 256, 1, CPU, torch.float16)


def test_our_methods_on_a_cuda_run():
    env = QB.Env(torch.device("cuda"), torch.float16, triton_ok=True)
    small = [(name, path) for name, _b, path, skip in QB.our_methods(QB.Case(4096, 4096, 1), env)]
    assert small == [("cuda", None), ("triton", None), ("triton:tile", "tile")]
    large = [(name, path) for name, _b, path, _s in QB.our_methods(QB.Case(4096, 4096, 256), env)]
    assert large == [("cuda", None), ("triton", None), ("triton:dequant", "dequant")]  # auto: tile (dequant is opt-in)
    env = QB.Env(torch.device("cuda"), torch.float16, triton_ok=False, triton_why="no triton")
    rows = QB.our_methods(QB.Case(4096, 4096, 1), env)
    assert [r[0] for r in rows] == ["cuda", "triton"] and rows[1][3] == "no triton"


def test_forced_quant_path_overrides_and_restores():
    from lowrank_ops.quant import ops

    original = ops.quant_path
    with QB.forced_quant_path("tile"):
        assert ops.quant_path(1, 4096, 4096) == "tile"
    assert ops.quant_path is original
    with QB.forced_quant_path(None):
        assert ops.quant_path(1, 4096, 4096) == "decode"


def _row(m, method, median, config=None, kind="ours", **kw):
    return {"shape": "4096x4096", "m": m, "config": config, "method": method, "kind": kind,
            "median_us": median, "status": "ok", "auto": False, **kw}


def test_speedups_summary_and_targets():
    rows = [_row(1, "dense", 40.0, kind="baseline"), _row(1, "int4pack", 15.0, kind="baseline"),
            _row(1, "triton", 10.0, "4b", path="decode"), _row(1, "triton:tile", 20.0, "4b"),
            _row(1, "triton", 10.5, "4b+1%", path="decode"), _row(1, "triton", 12.0, "4b+r64", path="decode"),
            _row(1, "cuda", None, "4b", status="skipped"),
            _row(256, "dense", 100.0, kind="baseline"), _row(256, "int4pack", None, kind="baseline"),
            _row(256, "triton", 105.0, "4b", path="tile")]
    QB.add_speedups(rows)
    assert rows[0]["vs_dense"] == 1.0 and rows[1]["vs_dense"] == pytest.approx(40 / 15)
    assert rows[2]["vs_dense"] == 4.0 and rows[2]["vs_int4pack"] == 1.5
    assert rows[4]["cost_vs_4b"] == pytest.approx(1.05)
    assert rows[-1]["vs_int4pack"] is None and rows[-1]["vs_dense"] == pytest.approx(100 / 105)
    summary = {(s["m"], s["config"]): s for s in QB.summarize_rows(rows)}
    assert summary[(1, "4b")]["best_us"] == 10.0 and summary[(1, "4b")]["dense_us"] == 40.0
    targets = {(t["target"], t["m"]): t for t in QB.evaluate_targets(rows)}
    assert targets[("4-bit g128 batch 1 >= 3.5x dense", 1)]["met"] == "yes"
    assert targets[("4-bit g128 batch 1 faster than int4pack", 1)]["met"] == "yes"
    assert targets[("1% outliers cost <= 10% (vs 4b)", 1)]["met"] == "yes"
    assert targets[("rank-64 compensation cost <= 10% (vs 4b)", 1)]["met"] == "NO"
    assert targets[("4b batch >= 256 >= 0.9x dense", 256)]["met"] == "yes"
    assert not any(t["m"] == 1 and "256" in t["target"] for t in targets.values())
    text = QB.format_summary({"mode": "quick", "meta": {"device": "X"}, "rows": rows})
    assert "targets (printed, not asserted)" in text and "triton(decode)" in text


def test_main_rejects_bad_arguments(capsys):
    assert QB.main(["--cpu-smoke", "--configs", "4b,9b"]) == 2
    assert "--configs" in capsys.readouterr().err
    assert QB.main(["--cpu-smoke", "--shapes", "64x100"]) == 2
    assert "K must be a multiple of 128 (group size), got 64x100" in capsys.readouterr().err
    assert QB.main(["--cpu-smoke", "--shapes", "64by100"]) == 2


def test_main_without_cuda_exits_zero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert QB.main(["--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


REQUIRED_ROW_KEYS = {"suite", "family", "shape", "n", "k", "m", "config", "bits", "dtype", "method", "kind",
                     "status", "median_us", "p20_us", "p80_us", "eager_us", "gbps", "frac_copy_bw", "vs_dense",
                     "vs_int4pack", "bytes", "flops", "note", "auto", "weight_bytes"}


def test_cpu_smoke_run_writes_json_and_prints_table_last(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert QB.main(["--cpu-smoke", "--out", str(tmp_path), "--methods", "reference,cuda", "--target-ms", "0.5"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("64x256 ")  # the full table is the last thing printed
    payload = json.loads((tmp_path / "quant-cpu-smoke.json").read_text())
    assert payload["suite"] == "quant" and payload["mode"] == "cpu-smoke"
    assert set(payload["configs"]) == set(QB.CONFIGS)
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(REQUIRED_ROW_KEYS <= set(r) for r in ok)
    assert all(r["median_us"] > 0 and r["gbps"] > 0 for r in ok)
    assert {(r["config"], r["m"]) for r in ok if r["method"] == "reference"} == {
        (c, m) for c in QB.CONFIGS for m in QB.CPU_SMOKE["batches"]}
    assert all(r["auto"] for r in ok if r["method"] == "reference")
    assert all(r["vs_dense"] == 1.0 for r in ok if r["method"] == "dense")
    # true byte count: the format's bytes + x + y
    for r in ok:
        if r["kind"] == "ours":
            assert r["bytes"] == r["weight_bytes"] + 2 * (r["m"] * r["k"] + r["m"] * r["n"])
    int4 = [r for r in rows if r["method"] == "int4pack"]
    assert int4 and all(r["status"] == "ok" or (r["status"] == "skipped" and r["note"]) for r in int4)
    cuda = [r for r in rows if r["method"] == "cuda"]
    assert cuda and all(r["status"] == "skipped" and r["note"] for r in cuda)
    assert not [r for r in rows if r["status"] == "error"]
    capsys.readouterr()
    assert QB.main(["--summarize", str(tmp_path / "quant-cpu-smoke.json")]) == 0
    summary = capsys.readouterr().out
    assert "reference*" in summary and "64x256" in summary and "targets" in summary


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs the Triton interpreter (conftest sets it on machines without CUDA)")
def test_cpu_smoke_triton_paths_really_run(tmp_path, monkeypatch):
    from lowrank_ops.kernels import quant as kernels

    seen = []
    original = kernels.quant_matmul

    def spy(*args, path, **kw):
        seen.append(path)
        return original(*args, path=path, **kw)

    monkeypatch.setattr(kernels, "quant_matmul", spy)
    assert QB.main(["--cpu-smoke", "--out", str(tmp_path), "--configs", "4b+1%,4b+r64", "--batches", "1,20",
                    "--methods", "triton,triton:tile", "--target-ms", "0.1"]) == 0
    rows = json.loads((tmp_path / "quant-cpu-smoke.json").read_text())["rows"]
    ours = [r for r in rows if r["kind"] == "ours"]
    assert ours and all(r["status"] == "ok" for r in ours), [r["note"] for r in ours]
    assert {(r["method"], r["path"], r["m"]) for r in ours} == {
        ("triton", "decode", 1), ("triton:tile", "tile", 1), ("triton", "tile", 20)}
    assert {"decode", "tile"} <= set(seen)


def test_cli_bench_routes_suites(monkeypatch):
    from lowrank_ops import cli
    from lowrank_ops.benchmarks import lowrank as LB

    calls = []
    monkeypatch.setattr(QB, "main", lambda argv: calls.append(("quant", list(argv))) or 0)
    monkeypatch.setattr(LB, "main", lambda argv: calls.append(("lowrank", list(argv))) or 0)
    assert cli.main(["bench", "--quick"]) == 0
    assert cli.main(["bench", "--suite", "quant", "--quick"]) == 0
    assert cli.main(["bench", "--cpu-smoke", "--suite=quant"]) == 0
    assert cli.main(["bench", "--suite", "lowrank"]) == 0
    assert calls == [("lowrank", ["--quick"]), ("quant", ["--quick"]), ("quant", ["--cpu-smoke"]), ("lowrank", [])]
    assert cli.main(["bench", "--suite", "nope"]) == 2


def test_plot_quant_json(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bench_plot", REPO / "bench" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = [dict(_row(1, "dense", 40.0, kind="baseline"), family="quant", rank=0),
            dict(_row(1, "triton", 10.0, "4b"), family="quant", rank=0),
            dict(_row(1, "triton", 12.0, "4b+r64"), family="quant", rank=64),
            dict(_row(16, "triton", 12.0, "4b"), family="quant", rank=0),
            dict(_row(16, "dense", 48.0, kind="baseline"), family="quant", rank=0)]
    QB.add_speedups(rows)
    panels = plot.panels(rows, "dense")
    assert set(panels) == {("quant", "4096x4096", "4b"), ("quant", "4096x4096", "4b+r64"),
                           ("quant", "4096x4096", "baselines")}
    assert panels[("quant", "4096x4096", "4b")]["triton"] == [(1, 4.0), (16, 4.0)]
    out = plot.plot({"suite": "quant", "rows": rows}, tmp_path / "q.png")
    assert out.exists() and out.stat().st_size > 0


def test_auto_choice_on_cpu_and_under_a_pin():
    from lowrank_ops.core.backend import use_backend

    x = torch.empty(1, 256, dtype=torch.float16)
    assert QB.auto_choice(x, 64, 4, False, 128) == ("reference", None)
    with use_backend("reference"):
        assert QB.auto_choice(x, 64) == (None, None)  # pinned: no automatic choice to mark
