"""CPU test of the sparse benchmark plumbing (lowrank_ops/benchmarks/sparse.py): case lists, formats
and the semi-structured baseline's refusal on CPU, method lists, speedups, summaries, targets, the
``--cpu-smoke`` run (reference, and Triton under the interpreter), the JSON written after every
case, and ``--summarize``. No timing assertions.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from lowrank_ops.benchmarks import sparse as SB

CPU = torch.device("cpu")


def test_case_lists():
    full = SB.sparse_cases(SB.FULL["shapes"], SB.FULL["batches"])
    assert {(c.n, c.k) for c in full} == {(4096, 4096), (11008, 4096), (4096, 11008)}
    assert {c.m for c in full} == {1, 4, 16, 64, 256, 1024, 4096}
    quick = SB.sparse_cases(SB.QUICK["shapes"], SB.QUICK["batches"])
    assert [(c.shape, c.m) for c in quick] == [("4096x4096", 1), ("4096x4096", 1024), ("11008x4096", 1),
                                               ("11008x4096", 1024)]
    assert SB.FULL["patterns"] == ["2:4", "1:4", "2:8", "2:4+q4", "2:8+q4"]
    assert SB.QUICK["patterns"] == ["2:4", "1:4", "2:8", "2:4+q4"]
    assert all(t.pattern in SB.PATTERNS for t in SB.TARGETS)
    # the goals, as written there, each measurable in the quick run
    goals = {(t.pattern, t.goal, t.max_m, t.min_m) for t in SB.TARGETS if t.kind == "vs_dense"}
    assert {("2:4", 1.6, 1, 0), ("1:4", 3.0, 1, 0), ("2:8", 2.9, 1, 0), ("2:4+q4", 4.5, 1, 0)} <= {
        (p, g, mx, mn) for p, g, mx, mn in goals if mx == 1}
    assert ("2:4", 1.2, 1 << 30, 1024) in goals
    for t in SB.TARGETS:
        assert t.pattern in SB.QUICK["patterns"] or t.min_m, t.text
        assert any(t.min_m <= c.m <= t.max_m for c in quick), t.text


@pytest.mark.parametrize("pattern", list(SB.PATTERNS))
def test_build_format_counts_bytes_honestly(pattern):
    n, m = SB.PATTERNS[pattern]
    fmt = SB.build_format(32, 256, pattern, CPU, torch.float16)
    assert (fmt.n, fmt.m, fmt.in_features) == (n, m, 256)
    kept = 256 // m * n
    index_bits = 32 * fmt.indices.shape[1] / 256  # 2:8: ceil(64 / 10) = 7 words a row
    if pattern in SB.Q4_PATTERNS:
        q = fmt.qvalues
        assert fmt.values is None and (q.bits, q.group_size, q.in_features) == (4, SB.Q4_GROUP, kept)
        assert fmt.nbytes == q.qweight.numel() * 4 + q.scales.numel() * 2 + q.zeros.numel() * 2 + fmt.indices.numel() * 4
        # codes 4 bits per kept value (KK padded to the group), fp16 scale + zero per group
        padded = -(-kept // SB.Q4_GROUP) * SB.Q4_GROUP
        expected_bits = (4 * padded + 32 * (padded // SB.Q4_GROUP)) / 256 + index_bits
    else:
        assert fmt.nbytes == fmt.values.numel() * 2 + fmt.indices.numel() * 4
        assert fmt.values.shape == (32, kept) and fmt.values.dtype == torch.float16
        expected_bits = 16 * kept / 256 + index_bits
    assert fmt.bits_per_weight == pytest.approx(expected_bits)
    if pattern in ("2:4", "1:4"):
        assert fmt.bits_per_weight == {"2:4": 9.0, "1:4": 4.5}[pattern]  # the design table's figures


def test_semi24_refused_on_cpu():
    with pytest.raises(RuntimeError, match="CUDA-only"):
        SB.build_semi24(64, 128, 1, CPU, torch.float16)


def test_our_methods_on_a_cuda_run():
    env = SB.Env(torch.device("cuda"), torch.float16, triton_ok=True)
    small = [(name, path) for name, _b, path, _s in SB.our_methods(SB.Case(4096, 4096, 1), "2:8", env)]
    assert small == [("cuda", "auto"), ("triton", "auto"), ("triton:tile", "tile")]
    q4_small = [(name, path) for name, _b, path, _s in SB.our_methods(SB.Case(4096, 4096, 1), "2:8+q4", env)]
    assert q4_small == small  # 4-bit kept values: the same backends and paths, through nm_linear
    q4_large = [(name, path) for name, _b, path, _s in SB.our_methods(SB.Case(4096, 4096, 256), "2:4+q4", env)]
    # auto is the expand path (no semi-structured 4-bit); the tile path is timed beside it
    assert q4_large == [("cuda", "auto"), ("triton", "auto"), ("triton:tile", "tile")]
    large = [(name, path) for name, _b, path, _s in SB.our_methods(SB.Case(4096, 4096, 256), "2:4", env)]
    assert ("triton", "auto") in large and ("triton:tile", "tile") in large and ("triton:decode", "decode") not in large
    assert ("triton:expand", "expand") in large  # auto there is torch's semi-structured kernel
    env = SB.Env(torch.device("cuda"), torch.float16, triton_ok=False, triton_why="no triton")
    rows = SB.our_methods(SB.Case(4096, 4096, 1), "1:4", env)
    assert [r[0] for r in rows] == ["cuda", "triton"] and rows[1][3] == "no triton"


def _row(m, method, median, pattern=None, kind="ours", **kw):
    return {"shape": "4096x4096", "m": m, "pattern": pattern, "config": pattern, "method": method, "kind": kind,
            "median_us": median, "status": "ok", "auto": False, **kw}


def test_speedups_summary_and_targets():
    rows = [_row(1, "dense", 40.0, kind="baseline"), _row(1, "semi24", 50.0, "2:4", kind="baseline"),
            _row(1, "triton", 25.0, "2:4", path="decode", limit=1.78), _row(1, "cuda", 20.0, "2:4", limit=1.78),
            _row(1, "triton", 20.0, "1:4", path="decode", limit=3.56),
            _row(256, "dense", 100.0, kind="baseline"), _row(256, "semi24", None, "2:4", kind="baseline", status="skipped"),
            _row(256, "triton", 110.0, "2:4", path="tile")]
    SB.add_speedups(rows)
    assert rows[0]["vs_dense"] == 1.0 and rows[3]["vs_dense"] == 2.0 and rows[3]["vs_semi24"] == 2.5
    assert rows[-1]["vs_semi24"] is None and rows[-1]["vs_dense"] == pytest.approx(100 / 110)
    summary = {(s["m"], s["pattern"]): s for s in SB.summarize_rows(rows)}
    assert summary[(1, "2:4")]["best"] == "cuda" and summary[(1, "2:4")]["best_us"] == 20.0
    assert summary[(1, "2:4")]["dense_us"] == 40.0 and summary[(1, "2:4")]["semi24_us"] == 50.0
    assert summary[(1, "2:4")]["limit"] == 1.78
    targets = {(t["target"], t["m"]): t for t in SB.evaluate_targets(rows)}
    assert targets[("2:4 batch 1 >= 1.6x dense", 1)]["met"] == "yes"
    assert targets[("1:4 batch 1 >= 3x dense", 1)]["met"] == "NO"
    assert targets[("2:4 batch <= 16 faster than semi24", 1)]["met"] == "yes"
    assert targets[("2:4 batch >= 256 >= 0.8x dense", 256)]["met"] == "yes"
    assert not any(t["m"] == 256 and "batch 1 " in t["target"] for t in targets.values())
    text = SB.format_summary({"mode": "quick", "meta": {"device": "X"}, "rows": rows})
    assert "targets (printed, not asserted)" in text and "cuda" in text


def test_main_rejects_bad_arguments(capsys):
    assert SB.main(["--cpu-smoke", "--patterns", "2:4,3:9"]) == 2
    assert "--patterns" in capsys.readouterr().err
    assert SB.main(["--cpu-smoke", "--shapes", "64x100"]) == 2
    assert "K must be a multiple of 16 (whole groups of every pattern), got 64x100" in capsys.readouterr().err
    assert SB.main(["--cpu-smoke", "--shapes", "64by100"]) == 2


def test_main_without_cuda_exits_zero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert SB.main(["--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


REQUIRED_ROW_KEYS = {"suite", "family", "shape", "n", "k", "m", "pattern", "dtype", "method", "kind", "status",
                     "median_us", "p20_us", "p80_us", "eager_us", "gbps", "frac_copy_bw", "vs_dense", "vs_semi24",
                     "bytes", "flops", "note", "auto", "weight_bytes"}


def test_cpu_smoke_run_writes_json_after_every_case_and_prints_table_last(tmp_path, capsys, monkeypatch):
    snapshots = []
    real_write = SB.T.write_json

    def spy(path, payload):
        snapshots.append(len(payload["rows"]))
        return real_write(path, payload)

    monkeypatch.setattr(SB.T, "write_json", spy)
    threads = torch.get_num_threads()
    assert SB.main(["--cpu-smoke", "--out", str(tmp_path), "--methods", "reference,cuda", "--target-ms", "0.5"]) == 0
    assert torch.get_num_threads() == threads
    cases = len(SB.CPU_SMOKE["shapes"]) * len(SB.CPU_SMOKE["batches"])
    assert len(snapshots) == cases + 1 and snapshots[0] > 0 and snapshots[0] < snapshots[-2] == snapshots[-1]
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("64x256 ")  # the full table is the last thing printed
    payload = json.loads((tmp_path / "sparse-cpu-smoke.json").read_text())
    assert payload["suite"] == "sparse" and payload["mode"] == "cpu-smoke"
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(REQUIRED_ROW_KEYS <= set(r) for r in ok)
    assert all(r["median_us"] > 0 and r["gbps"] > 0 for r in ok)
    assert {(r["pattern"], r["m"]) for r in ok if r["method"] == "reference"} == {
        (p, m) for p in SB.PATTERNS for m in SB.CPU_SMOKE["batches"]}
    assert all(r["auto"] for r in ok if r["method"] == "reference")
    for r in ok:  # true byte count: values + indices + x + y
        if r["kind"] == "ours":
            assert r["bytes"] == r["weight_bytes"] + 2 * (r["m"] * r["k"] + r["m"] * r["n"])
            assert r["limit"] == pytest.approx(2 * r["n"] * r["k"] / r["weight_bytes"])
    skipped = [r for r in rows if r["method"] in ("semi24", "cuda")]
    assert skipped and all(r["status"] == "skipped" and r["note"] for r in skipped)
    assert not [r for r in rows if r["status"] == "error"]
    capsys.readouterr()
    assert SB.main(["--summarize", str(tmp_path / "sparse-cpu-smoke.json")]) == 0
    summary = capsys.readouterr().out
    assert "reference*" in summary and "64x256" in summary and "semi24 skipped" in summary


def test_time_budget_stops_early_and_still_writes(tmp_path):
    assert SB.main(["--cpu-smoke", "--out", str(tmp_path), "--methods", "reference", "--patterns", "2:4",
                    "--target-ms", "0.1", "--time-budget", "0"]) == 0
    payload = json.loads((tmp_path / "sparse-cpu-smoke.json").read_text())
    assert payload["rows"] == []  # the budget is spent before the first case starts
    assert payload["notes"] and "time budget" in payload["notes"][0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs the Triton interpreter (conftest sets it on machines without CUDA)")
def test_cpu_smoke_triton_paths_really_run(tmp_path, monkeypatch):
    from lowrank_ops.kernels import sparse as kernels

    seen = []
    names = ("nm_matmul_decode", "nm_matmul_tile", "nm_matmul_decode_q4", "nm_matmul_tile_q4")
    for name in names:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: seen.append(_n) or _f(*a))
    assert SB.main(["--cpu-smoke", "--out", str(tmp_path), "--patterns", "2:8,2:8+q4", "--batches", "1,20",
                    "--methods", "triton,triton:tile", "--target-ms", "0.1"]) == 0
    rows = json.loads((tmp_path / "sparse-cpu-smoke.json").read_text())["rows"]
    ours = [r for r in rows if r["kind"] == "ours" and r["status"] != "skipped"]
    assert ours and all(r["status"] == "ok" for r in ours), [r["note"] for r in ours]
    expected = {("triton", "decode", 1), ("triton:tile", "tile", 1), ("triton", "tile", 20)}
    assert {(r["method"], r["path"], r["m"]) for r in ours if r["pattern"] == "2:8"} == expected
    assert {(r["method"], r["path"], r["m"]) for r in ours if r["pattern"] == "2:8+q4"} == expected
    assert set(names) <= set(seen)
