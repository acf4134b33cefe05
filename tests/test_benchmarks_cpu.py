"""CPU test of the benchmark plumbing: shape lists, rank and rotation arithmetic, roofline counts,
timers (wall clock, and the CUDA code paths against a fake ``torch.cuda``), JSON and tables, the
``--cpu-smoke`` run, bench/plot.py and bench/device_check.sh's syntax. No timing assertions.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowrank_ops.benchmarks import lowrank as LB
from lowrank_ops.benchmarks import timing as T

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- shapes and ranks
@pytest.mark.parametrize(
    "n,k,ratio,rank",
    [(4096, 4096, 0.25, 512), (4096, 4096, 0.5, 1024), (4096, 11008, 0.25, 736), (4096, 11008, 0.5, 1488),
     (11008, 4096, 0.25, 736), (8192, 8192, 0.25, 1024), (8192, 8192, 0.5, 2048)],
)
def test_rank_for_ratio(n, k, ratio, rank):
    r = T.rank_for_ratio(n, k, ratio)
    assert r == rank and r % 16 == 0
    assert r * (n + k) <= ratio * n * k < (r + 16) * (n + k)  # rounded down, by less than one step


def test_rank_for_ratio_rejects_bad_ratio_and_keeps_a_minimum():
    with pytest.raises(ValueError, match="ratio"):
        T.rank_for_ratio(64, 64, 0)
    with pytest.raises(ValueError, match="ratio"):
        T.rank_for_ratio(64, 64, 1.5)
    assert T.rank_for_ratio(32, 32, 0.1) == 16


def test_full_and_quick_case_lists():
    full = LB.lowrank_cases(LB.FULL["shapes"], LB.FULL["ratios"], LB.FULL["batches"])
    assert len(full) == 4 * 2 * 6
    fixed = LB.lowrank_cases(LB.FULL["rank_shapes"], [], LB.FULL["batches"], LB.FULL["fixed_ranks"])
    assert len(fixed) == 4 * 2 * 6 and {c.rank for c in fixed} == {64, 256} and all(c.ratio is None for c in fixed)
    assert {(c.n, c.k) for c in full} == {(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)}
    assert {c.m for c in full} == {1, 4, 16, 64, 256, 1024}
    assert all(c.rank % 16 == 0 and c.rank * (c.n + c.k) <= c.ratio * c.n * c.k for c in full)
    lora = LB.lora_cases(LB.FULL["lora_shapes"], LB.FULL["lora_ranks"], LB.FULL["lora_batches"])
    assert {c.rank for c in lora} == {16, 64} and all(c.family == "lora" for c in lora)
    quick = (LB.lowrank_cases(LB.QUICK["shapes"], LB.QUICK["ratios"], LB.QUICK["batches"])
             + LB.lowrank_cases(LB.QUICK["rank_shapes"], [], LB.QUICK["batches"], LB.QUICK["fixed_ranks"])
             + LB.lora_cases(LB.QUICK["lora_shapes"], LB.QUICK["lora_ranks"], LB.QUICK["lora_batches"]))
    assert len(quick) <= 11  # the device check's time budget
    assert all(c.m in LB.FULL["batches"] for c in quick)


def test_parse_shapes_and_ints():
    assert LB.parse_shapes("4096x4096, 11008X4096,") == [(4096, 4096), (11008, 4096)]
    with pytest.raises(ValueError, match="--shapes"):
        LB.parse_shapes("4096*4096")
    with pytest.raises(ValueError, match="positive"):
        LB.parse_shapes("0x5")
    assert LB.parse_ints("1,16", "--batches") == [1, 16]
    with pytest.raises(ValueError, match="--batches"):
        LB.parse_ints("1,a", "--batches")


def test_main_rejects_bad_shapes(capsys):
    assert LB.main(["--cpu-smoke", "--shapes", "12by5"]) == 2
    assert "--shapes" in capsys.readouterr().err


# --------------------------------------------------------------------------- rotating buffers
def test_rotation_copies_exceed_twice_the_cache():
    l2 = 50 * 1000 * 1000
    for per_copy in (4096 * 2, 8 * 2**20, 33 * 2**20, 49_999_999):
        n = T.rotation_copies(per_copy, l2, max_copies=10**9, max_total_bytes=10**15)
        assert n * per_copy > 2 * l2 >= (n - 1) * per_copy
    assert T.rotation_copies(128 * 2**20, l2) == 1  # one 128 MiB weight is already > 2 x L2


def test_rotation_copies_caps_and_floors():
    l2 = 50 * 1000 * 1000
    assert T.rotation_copies(1000, l2) == T.MAX_COPIES
    assert T.rotation_copies(10 * 2**20, l2, max_total_bytes=30 * 2**20) == 3
    assert T.rotation_copies(10 * 2**30, l2, max_total_bytes=2**30) == 1  # never below one
    assert T.rotation_copies(200 * 2**20, l2, min_copies=2) == 2
    assert T.rotation_copies(1, 0) == 1
    with pytest.raises(ValueError, match="bytes_per_copy"):
        T.rotation_copies(0, l2)
    with pytest.raises(ValueError, match="cache_bytes"):
        T.rotation_copies(1, -1)


def test_operand_bytes_match_the_tensors_made():
    case = LB.Case("lowrank", 96, 80, 16, 3, 0.25)
    env = LB.Env(torch.device("cpu"), torch.float16)
    for family in ("dense", "factors", "lora"):
        (copy,) = LB.make_operands(case, family, 1, env)
        assert T.tensors_nbytes(copy) == LB.operand_bytes(case, family, 2)
        assert all(t.dtype == torch.float16 for t in copy)
    with pytest.raises(ValueError):
        LB.operand_bytes(case, "nope", 2)
    # the H100 decode case: 4096x4096 at rank 512, fp16 -> ~8.4 MB a copy -> 12 copies > 100 MB
    llm = LB.Case("lowrank", 4096, 4096, 512, 1, 0.25)
    per_copy = LB.operand_bytes(llm, "factors", 2)
    n = T.rotation_copies(per_copy, 50_000_000)
    assert n == 12 and n * per_copy > 100_000_000


# --------------------------------------------------------------------------- roofline counts
def test_costs():
    m, n, k, r = 4, 4096, 11008, 736
    d = T.dense_cost(m, n, k)
    assert d.bytes == 2 * (m * k + n * k + m * n) and d.flops == 2 * m * n * k
    lr = T.lowrank_cost(m, n, k, r, bias=True)
    assert lr.bytes == 2 * (m * k + r * k + n * r + m * n + n) and lr.flops == 2 * m * r * (k + n)
    assert T.two_gemm_cost(m, n, k, r).bytes - T.lowrank_cost(m, n, k, r).bytes == 2 * 2 * m * r
    lo = T.lora_cost(m, n, k, 16, elem=4)
    assert lo.bytes == 4 * (m * k + n * k + 16 * k + n * 16 + m * n)
    assert lo.flops == 2 * m * n * k + 2 * m * 16 * (k + n)
    # batch 1 at 25 % of the parameters: close to the 4x byte ratio
    assert 3.9 < T.batch1_speedup_limit(4096, 4096, 512) < 4.0
    assert d.floor_s(1000.0) == pytest.approx(d.bytes / 1e12)
    assert T.dense_cost(8192, 8192, 8192).floor_s(3000.0, 800.0) == pytest.approx(2 * 8192**3 / 800e12)
    assert d.intensity == pytest.approx(d.flops / d.bytes)


def test_derived_metrics():
    cost = T.OpCost(bytes=3_000_000, flops=2_000_000_000)
    out = T.derived_metrics(1000.0, cost, copy_gbps=3000.0, matmul_tflops=800.0)
    assert out["gbps"] == pytest.approx(3.0)  # 3 MB in 1 ms
    assert out["frac_copy_bw"] == pytest.approx(1e-3)
    assert out["tflops"] == pytest.approx(2.0)
    assert out["floor_us"] == pytest.approx(2.5)  # flops-bound: 2e9 / 800e12 s
    assert out["frac_floor"] == pytest.approx(2.5e-3)
    none = T.derived_metrics(None, cost, None)
    assert none["gbps"] is None and none["floor_us"] is None and none["bytes"] == 3_000_000


def test_quantile():
    assert T.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert T.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert T.quantile([5.0], 0.8) == 5.0
    with pytest.raises(ValueError):
        T.quantile([], 0.5)


# --------------------------------------------------------------------------- timers
def test_measure_wall_clock_cycles_all_copies():
    seen = []
    sets = [(torch.full((2,), float(i)),) for i in range(3)]
    t = T.measure(lambda x: seen.append(int(x[0])), sets, torch.device("cpu"), target_ms=0.1)
    assert t.mode == "wall" and t.copies == 3 and t.samples >= 5
    assert t.p20_us <= t.median_us <= t.p80_us and t.eager_us == t.median_us
    assert set(seen) == {0, 1, 2}
    with pytest.raises(ValueError, match="arg_sets"):
        T.measure(lambda: None, [], torch.device("cpu"))


class _FakeCuda:
    """Just enough of torch.cuda for timing.measure's CUDA code paths to run on CPU.

    Each "kernel" (fn call) advances a fake GPU clock by 10 us; events read that clock.
    ``fail_capture`` makes graph capture raise, like an op that cannot be captured.
    """

    def __init__(self, fail_capture: bool = False):
        self.clock_ms = 0.0
        self.fail_capture = fail_capture
        self.capturing: list | None = None
        self.calls = 0

    def kernel(self):
        self.calls += 1
        if self.capturing is not None:
            self.capturing.append(1)
        else:
            self.clock_ms += 0.010

    def install(self, monkeypatch):
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = fake.clock_ms

            def elapsed_time(self, other):
                return other.t - self.t

        class Stream:
            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def __init__(self):
                self.kernels = 0

            def replay(self):
                fake.clock_ms += 0.010 * self.kernels

        @contextlib.contextmanager
        def graph(g, *args, **kwargs):
            fake.capturing = []
            try:
                yield
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
                g.kernels = len(fake.capturing)
            finally:
                fake.capturing = None

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


@pytest.mark.parametrize("n_copies", [1, 5])
def test_measure_cuda_graph_path_with_fake_cuda(monkeypatch, n_copies):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    used = set()

    def fn(i):
        used.add(i)
        fake.kernel()

    t = T.measure(fn, [(i,) for i in range(n_copies)], torch.device("cuda"), target_ms=2.0)
    assert t.mode == "graph" and t.note == "" and t.copies == n_copies
    assert t.calls_per_sample % n_copies == 0 and t.calls_per_sample >= 32
    assert t.median_us == pytest.approx(10.0) and t.eager_us == pytest.approx(10.0)
    assert 5 <= t.samples <= 100
    assert used == set(range(n_copies))


def test_measure_cuda_falls_back_to_events_when_capture_fails(monkeypatch):
    fake = _FakeCuda(fail_capture=True)
    fake.install(monkeypatch)
    t = T.measure(lambda: fake.kernel(), [()], torch.device("cuda"), target_ms=1.0)
    assert t.mode == "events" and "graph capture failed" in t.note and "RuntimeError" in t.note
    assert t.median_us == pytest.approx(10.0)
    t2 = T.measure(lambda: fake.kernel(), [()], torch.device("cuda"), use_graph=False, eager=False, target_ms=1.0)
    assert t2.mode == "events" and t2.note == ""


def test_no_gpu_queries_at_import(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("GPU queried at import")

    for name in ("is_available", "device_count", "current_device", "get_device_properties", "mem_get_info",
                 "synchronize", "init"):
        monkeypatch.setattr(torch.cuda, name, boom)
    importlib.reload(T)
    importlib.reload(LB)


# --------------------------------------------------------------------------- methods per case
def _cuda_env(triton_ok=True, cuda_why=""):
    return LB.Env(torch.device("cuda"), torch.float16, triton_ok=triton_ok,
                  triton_why="" if triton_ok else "no triton", cuda_ok=not cuda_why, cuda_why=cuda_why)


def _names(methods):
    return [(m.name, m.path, m.skip != "") for m in methods]


def test_lowrank_methods_on_a_cuda_run():
    decode = LB.Case("lowrank", 4096, 4096, 512, 1, 0.25)
    assert _names(LB.lowrank_methods(decode, _cuda_env())) == [
        ("dense", None, False), ("two_matmul", None, False), ("cuda", None, False),
        ("triton", "two_gemm", False), ("triton:decode", "decode", False)]  # r = 512: no fused kernel
    big = LB.Case("lowrank", 4096, 4096, 512, 256, 0.25)
    assert _names(LB.lowrank_methods(big, _cuda_env())) == [
        ("dense", None, False), ("two_matmul", None, False), ("triton", "two_gemm", False)]
    mid_rank = LB.Case("lowrank", 4096, 4096, 128, 64, None)  # fused kernel fits, dispatch prefers two GEMMs
    assert _names(LB.lowrank_methods(mid_rank, _cuda_env())) == [
        ("dense", None, False), ("two_matmul", None, False), ("triton", "two_gemm", False),
        ("triton:fused", "fused", False)]
    small_rank = LB.Case("lowrank", 4096, 4096, 64, 1, None)  # one row, small rank: Triton decode
    assert _names(LB.lowrank_methods(small_rank, _cuda_env())) == [
        ("dense", None, False), ("two_matmul", None, False), ("cuda", None, False),
        ("triton", "decode", False), ("triton:fused", "fused", False), ("triton:two_gemm", "two_gemm", False)]
    # no Triton, no extension: skipped rows with the reason, never a crash
    skipped = LB.lowrank_methods(decode, _cuda_env(triton_ok=False, cuda_why="not built"))
    assert _names(skipped)[2:] == [("cuda", None, True), ("triton", "two_gemm", True)]
    assert skipped[2].skip == "not built"


def test_lora_methods():
    case = LB.Case("lora", 4096, 4096, 16, 1)
    assert [m.name for m in LB.lora_methods(case, _cuda_env())] == ["dense", "dense+adapter", "triton", "triton:fused"]
    big = LB.Case("lora", 4096, 4096, 16, 256)
    assert [(m.name, m.path) for m in LB.lora_methods(big, _cuda_env())][2:] == [("triton", "fused")]
    cpu = LB.Env(torch.device("cpu"), torch.float32, triton_why="no interpreter")
    methods = LB.lora_methods(case, cpu)
    assert [m.name for m in methods] == ["dense", "dense+adapter", "reference", "triton"]
    assert methods[-1].skip == "no interpreter"


def test_forced_path_overrides_and_restores():
    from lowrank_ops.lowrank import ops

    original = ops.lowrank_path
    with LB.forced_path("fused"):
        assert ops.lowrank_path(1, 4096, 4096, 512) == "fused"
    assert ops.lowrank_path is original
    with pytest.raises(RuntimeError):
        with LB.forced_path("decode"):
            raise RuntimeError("inside")
    assert ops.lowrank_path is original
    with LB.forced_path(None):
        assert ops.lowrank_path is original
    with LB.forced_path("fused", "lora"):
        assert ops.lora_path(1) == "fused"
    assert ops.lora_path(1) == "unfused"


def test_add_speedups_and_summary():
    rows = []
    for method, kind, t in (("dense", "baseline", 40.0), ("two_matmul", "baseline", 20.0),
                            ("triton", "ours", 10.0), ("cuda", "ours", 8.0), ("triton:fused", "ours", None)):
        rows.append({"family": "lowrank", "shape": "64x64", "rank": 16, "m": 1, "dtype": "fp16", "method": method,
                     "kind": kind, "median_us": t, "status": "ok" if t else "error", "frac_copy_bw": 0.5,
                     "path": "decode" if method == "triton" else None, "auto": method == "cuda"})
    LB.add_speedups(rows)
    by = {r["method"]: r for r in rows}
    assert by["dense"]["vs_dense"] == 1.0 and by["cuda"]["vs_dense"] == 5.0 and by["cuda"]["vs_unfused"] == 2.5
    assert by["triton:fused"]["vs_dense"] is None
    (line,) = LB.summarize_rows(rows)
    assert line["best"] == "cuda* (1 err)" and line["best_us"] == 8.0 and line["dense_us"] == 40.0
    table = LB.format_rows(rows)
    assert "triton(decode)" in table and "cuda*" in table


# --------------------------------------------------------------------------- output
def test_format_table_is_fixed_width():
    cols = [T.Column("a", "alpha", 6), T.Column("b", "b", 8, ".2f"), T.Column("c", "c", 5, align="<")]
    rows = [{"a": 1, "b": 3.14159, "c": "x"}, {"a": None, "b": float("nan"), "c": "much-too-long"},
            {"a": 123456789, "b": 2, "c": None}]
    text = T.format_table(rows, cols, title="T", trailing=lambda r: "note" if r["a"] == 1 else "")
    lines = text.splitlines()
    assert lines[0] == "T" and set(lines[2]) == {"-"}
    body = [line[: 6 + 1 + 8 + 1 + 5] for line in lines[3:]]
    assert lines[3].endswith(" note")
    assert "  3.14" in body[0] and "-" in body[1] and "much~" in body[1] and "12345~" in body[2]
    assert all(line[6] == " " and line[15] == " " for line in lines[3:])  # column separators line up


def test_write_json_roundtrip(tmp_path):
    payload = {"x": float("nan"), "y": (1, 2), "d": torch.float16, "nested": {"inf": float("inf"), "ok": 1.5}}
    path = T.write_json(tmp_path / "sub" / "r.json", payload)
    data = json.loads(path.read_text())
    assert data == {"x": None, "y": [1, 2], "d": "torch.float16", "nested": {"inf": None, "ok": 1.5}}
    assert T.load_json(path) == data
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_run_metadata_on_cpu(monkeypatch):
    monkeypatch.setenv("LOWRANK_OPS_GIT_COMMIT", "abc123")
    meta = T.run_metadata(torch.device("cpu"), dtype="fp16")
    assert meta["git_commit"] == "abc123" and meta["torch"] == torch.__version__ and meta["dtype"] == "fp16"
    assert meta["device_type"] == "cpu" and "date" in meta and "l2_bytes" in meta


# --------------------------------------------------------------------------- main
def test_main_without_cuda_exits_zero(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert LB.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


REQUIRED_ROW_KEYS = {"family", "shape", "n", "k", "rank", "m", "dtype", "method", "kind", "status", "median_us",
                     "p20_us", "p80_us", "eager_us", "gbps", "frac_copy_bw", "tflops", "vs_dense", "vs_unfused",
                     "bytes", "flops", "note", "auto"}


def test_cpu_smoke_run_writes_json_and_prints_table_last(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert LB.main(["--cpu-smoke", "--out", str(tmp_path), "--methods", "reference,cuda", "--target-ms", "0.5"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("lora ")  # the table is the last thing printed
    payload = json.loads((tmp_path / "lowrank-cpu-smoke.json").read_text())
    assert payload["suite"] == "lowrank" and payload["mode"] == "cpu-smoke"
    assert payload["copy_bandwidth_gbps"] > 0 and payload["matmul_tflops"] > 0
    meta = payload["meta"]
    for key in ("device", "torch", "triton", "date", "git_commit", "dtype"):
        assert key in meta
    rows = payload["rows"]
    assert {r["family"] for r in rows} == {"lowrank", "lora"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(REQUIRED_ROW_KEYS <= set(r) for r in ok)
    assert all(r["median_us"] > 0 and r["gbps"] > 0 for r in ok)
    assert all(r["vs_dense"] == 1.0 for r in ok if r["method"] == "dense")
    assert {r["method"] for r in ok} == {"dense", "two_matmul", "dense+adapter", "reference"}
    assert all(r["auto"] for r in ok if r["method"] == "reference")
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all(r["note"] for r in skipped)
    # the summary reads the file back
    capsys.readouterr()
    assert LB.main(["--summarize", str(tmp_path / "lowrank-cpu-smoke.json")]) == 0
    summary = capsys.readouterr().out
    assert "reference*" in summary and "256x192" in summary


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs the Triton interpreter (conftest sets it on machines without CUDA)")
def test_cpu_smoke_forced_triton_paths_really_run(tmp_path, monkeypatch):
    from lowrank_ops.kernels import lowrank as kernels

    seen = []
    real = kernels.lowrank_matmul

    def spy(x, v, u, bias, path):
        seen.append(path)
        return real(x, v, u, bias, path=path)

    monkeypatch.setattr(kernels, "lowrank_matmul", spy)
    assert LB.main(["--cpu-smoke", "--out", str(tmp_path), "--batches", "1", "--no-lora", "--target-ms", "0.1"]) == 0
    rows = json.loads((tmp_path / "lowrank-cpu-smoke.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert by["triton"]["path"] == "decode" and by["triton"]["status"] == "ok"
    assert by["triton:fused"]["status"] == "ok" and by["triton:two_gemm"]["status"] == "ok"
    assert {"decode", "fused"} <= set(seen)


# --------------------------------------------------------------------------- bench/plot.py
def _load_plot():
    spec = importlib.util.spec_from_file_location("bench_plot", REPO / "bench" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_payload():
    rows = []
    for shape, rank in (("4096x4096", 512), ("11008x4096", 736)):
        for m in (1, 16, 256):
            for method, t in (("dense", 40.0), ("two_matmul", 20.0), ("triton", 12.0), ("cuda", 9.0)):
                if method == "cuda" and m > 16:
                    continue
                rows.append({"family": "lowrank", "shape": shape, "rank": rank, "m": m, "method": method,
                             "status": "ok", "vs_dense": 40.0 / t, "vs_unfused": 20.0 / t, "auto": method == "cuda",
                             "path": "decode" if method == "triton" else None})
    rows.append({"family": "lowrank", "shape": "4096x4096", "rank": 512, "m": 1, "method": "triton:fused",
                 "status": "error", "vs_dense": None, "vs_unfused": None})
    rows.append({"family": "lora", "shape": "4096x4096", "rank": 16, "m": 1, "method": "triton", "status": "ok",
                 "vs_dense": 0.9, "vs_unfused": 1.8})
    return {"suite": "lowrank", "mode": "quick", "meta": {"device": "fake", "dtype": "fp16"},
            "copy_bandwidth_gbps": 3000.0, "rows": rows}


def test_plot_panels_skip_unmeasured_rows():
    plot = _load_plot()
    panels = plot.panels(_synthetic_payload()["rows"], "dense")
    assert set(panels) == {("lowrank", "4096x4096", 512), ("lowrank", "11008x4096", 736), ("lora", "4096x4096", 16)}
    p = panels[("lowrank", "4096x4096", 512)]
    assert "triton:fused" not in p and [m for m, _ in p["cuda*"]] == [1, 16]
    assert p["triton(auto path)"][0] == (1, pytest.approx(40.0 / 12.0))
    assert plot.byte_limit(("lowrank", "4096x4096", 512)) == pytest.approx(
        T.batch1_speedup_limit(4096, 4096, 512))
    assert plot.byte_limit(("lora", "4096x4096", 16)) is None


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _load_plot()
    src = tmp_path / "lowrank-quick.json"
    src.write_text(json.dumps(_synthetic_payload()))
    assert plot.main([str(src)]) == 0
    png = tmp_path / "lowrank-quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(src), "-o", str(tmp_path / "u.png"), "--baseline", "unfused"]) == 0
    assert (tmp_path / "u.png").stat().st_size > 1000


# --------------------------------------------------------------------------- bench/device_check.sh
def test_device_check_script_parses():
    script = REPO / "bench" / "device_check.sh"
    assert os.access(script, os.X_OK), "bench/device_check.sh should be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_run_cases_saves_after_every_case_and_survives_a_failing_case(tmp_path):
    """A run killed mid-way keeps what it measured: the JSON is rewritten after each case."""
    from lowrank_ops.benchmarks import timing as T

    path = tmp_path / "suite.json"
    seen = []

    def run_case(case):
        if case == "bad":
            raise RuntimeError("boom")
        return [{"case": case}]

    def save(rows, notes):
        seen.append(len(T.load_json(path)["rows"]) if path.exists() else None)
        return checkpoint(rows, notes)

    checkpoint = T.json_checkpoint(path, {"suite": "demo"}, time.perf_counter())
    rows, notes = T.run_cases(["a", "bad", "c"], run_case, lambda case, exc: {"case": case, "error": str(exc)},
                              lambda case, rows: case, torch.device("cpu"), None, checkpoint=save)
    saved = T.load_json(path)
    assert seen == [None, 1, 2]  # before each save, the file holds the previous cases
    assert saved["suite"] == "demo" and saved["rows"] == rows
    assert [r["case"] for r in rows] == ["a", "bad", "c"] and rows[1]["error"] == "boom"


def test_device_check_gpu_lane_lists_every_gpu_test_file():
    """The gpu lane's default file list (priority order) holds every file with gpu-marked tests."""
    import re

    script = (REPO / "bench" / "device_check.sh").read_text()
    listed = re.search(r'^GPU_TEST_FILES="([^"]+)"', script, re.M).group(1).split()
    gpu_mark = re.compile(r"^(@pytest\.mark\.gpu|pytestmark = pytest\.mark\.gpu)", re.M)
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py") if gpu_mark.search(p.read_text())}
    assert len(listed) == len(set(listed)) and set(listed) == marked


def test_device_check_runs_every_suite_and_stays_within_eight_files():
    """One step per benchmark module, and at most 8 files under $OUT (the device tool's limit)."""
    import re

    script = (REPO / "bench" / "device_check.sh").read_text()
    suites = re.search(r'^SUITES="([^"]+)"', script, re.M).group(1).split()
    modules = {p.stem for p in (REPO / "lowrank_ops" / "benchmarks").glob("*.py")} - {"__init__", "timing"}
    assert set(suites) == modules
    assert '"lowrank_ops.benchmarks.$suite" --summarize' in script
    written = set(re.findall(r'\$OUTDIR/([A-Za-z0-9_.$-]+)', script)) - {"$suite-$BENCH_MODE.json"}
    written |= {f"{suite}-quick.json" for suite in suites}
    written = {w.replace("$BENCH_MODE", "quick") for w in written if not w.endswith(".tmp")}
    assert len(written) <= 8, sorted(written)


def test_kernel_profile_script_imports_and_needs_cuda(capsys):
    """bench/kernel_profile.py (device_check.sh's profile step) imports against the current
    suites and kernels, and without CUDA says so and exits 0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_profile", REPO / "bench" / "kernel_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert module.main() == 0 and "needs a CUDA device" in capsys.readouterr().out
    assert all(path in ("decode", "tile", "dequant") for *_, path in module.QUANT_CASES)


@pytest.mark.parametrize("suite", ["lowrank", "quant", "sparse", "kvcache"])
def test_every_suite_prints_its_help(suite):
    """--help renders (a "%" in a help text, e.g. the quant configuration "4b+1%", broke it)."""
    proc = subprocess.run([sys.executable, "-m", f"lowrank_ops.benchmarks.{suite}", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--out" in proc.stdout
