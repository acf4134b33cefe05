"""CPU test of the KV-cache benchmark plumbing (lowrank_ops/benchmarks/kvcache.py): case lists,
operands, speedups, summaries and targets, the ``--cpu-smoke`` run (reference backend, and the
Triton kernel under the interpreter), the JSON rewritten after every case, ``--summarize``.
No timing assertions.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from lowrank_ops.benchmarks import kvcache as KB

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_case_lists_and_geometry():
    full = KB.kv_cases(KB.FULL["contexts"], KB.FULL["batches"], q_lens=KB.FULL["q_lens"])
    assert len(full) == 4 * 3 * 3 and {c.context for c in full} == {1024, 4096, 16384, 32768}
    quick = KB.kv_cases(KB.QUICK["contexts"], KB.QUICK["batches"], KB.QUICK["skip"], KB.QUICK["q_lens"])
    # the decode steps first (a run cut by its time cap loses the draft checks)
    assert [(c.context, c.batch, c.q_len) for c in quick] == [
        (8192, 1, 1), (8192, 16, 1), (32768, 1, 1), (32768, 16, 1), (8192, 1, 7), (8192, 16, 7)]
    assert quick[-1].label == "T=8192 b=16 q=7" and quick[0].label == "T=8192 b=1"
    assert KB.QUICK["configs"] == ["2b-r4-s2", "2b-r4-s2-i8", "2b", "4b"] and set(KB.FULL["configs"]) == set(KB.CONFIGS)
    # the goals (2 bits, r = 4, s = 2 %): >= 2x SDPA and <= 30 % of fp16 memory at T >= 8k
    goals = {(t.config, t.kind, t.goal, t.min_context) for t in KB.TARGETS}
    assert {("2b-r4-s2", "vs_sdpa", 2.0, 8192), ("2b-r4-s2-i8", "mem_vs_fp16", 0.30, 8192)} <= goals
    assert all(t.config in KB.QUICK["configs"] for t in KB.TARGETS)
    assert KB.GPU_GEOMETRY == KB.Geometry(32, 8, 128)
    for name in KB.CONFIGS:  # every configuration is a valid GEARConfig for both geometries
        cfg = KB.gear_config(name)
        cfg.check_head_dim(KB.GPU_GEOMETRY.head_dim)
        cfg.check_head_dim(KB.CPU_GEOMETRY.head_dim)


def test_targets_name_known_configs():
    assert all(t.config in KB.CONFIGS for t in KB.TARGETS)
    assert {t.kind for t in KB.TARGETS} == {"vs_sdpa", "mem_vs_fp16"}


def _env() -> KB.Env:
    return KB.Env(CPU, torch.float16, KB.CPU_GEOMETRY)


def test_operands_clone_and_first_sequence():
    from lowrank_ops.kvcache import compress

    case = KB.Case(context=70, batch=3)
    keys, values = KB.random_kv(case, _env(), seed=1)
    assert keys.shape == values.shape == (3, 2, 70, 64) and keys.dtype == torch.float16
    assert torch.equal(keys, KB.random_kv(case, _env(), seed=1)[0])  # seeded
    kv = compress(keys, values, KB.gear_config("2b-r4-s2"))
    copy = KB.clone_kv(kv)
    for name, t in kv.tensors().items():
        other = copy.tensors()[name]
        assert torch.equal(t, other) and (t.numel() == 0 or t.data_ptr() != other.data_ptr())
    one = KB.first_sequence(kv)
    assert one.batch == 1 and one.seq_len == kv.seq_len
    assert torch.equal(one.decompress()[0], kv.decompress()[0][:1])
    qs = KB.random_q(case, _env(), 2, seed=3)
    assert len(qs) == 2 and qs[0].shape == (3, 8, 1, 64) and not torch.equal(qs[0], qs[1])


def test_sdpa_baselines_agree():
    case = KB.Case(context=50, batch=2)
    keys, values = (t.float() for t in KB.random_kv(case, _env(), seed=1))
    q = KB.random_q(case, _env(), 1, seed=2)[0].float()
    ref = torch.softmax(q @ keys.repeat_interleave(4, 1).transpose(-1, -2) / 8.0, -1) @ values.repeat_interleave(4, 1)
    assert torch.allclose(KB._sdpa(q, keys, values), ref, atol=1e-5)
    assert torch.allclose(KB._sdpa_packed(q, keys, values), ref, atol=1e-5)


def test_sdpa_baselines_agree_on_a_causal_chunk():
    """Query i of a 3-token chunk sees the first 48 + i tokens, in both SDPA layouts."""
    case = KB.Case(context=50, batch=2, q_len=3)
    keys, values = (t.float() for t in KB.random_kv(case, _env(), seed=1))
    q = KB.random_q(case, _env(), 1, seed=2)[0].float()
    mask = KB.chunk_mask(case, CPU)
    assert mask.shape == (3, 50) and mask.sum(1).tolist() == [48, 49, 50]
    k, v = keys.repeat_interleave(4, 1), values.repeat_interleave(4, 1)
    ref = torch.cat([torch.softmax(q[:, :, i:i + 1] @ k[:, :, :48 + i].transpose(-1, -2) / 8.0, -1) @ v[:, :, :48 + i]
                     for i in range(3)], dim=2)
    assert torch.allclose(KB._sdpa(q, keys, values, mask), ref, atol=1e-5)
    assert torch.allclose(KB._sdpa_packed(q, keys, values, mask), ref, atol=1e-5)
    assert KB.chunk_mask(KB.Case(50, 2), CPU) is None


def test_attention_cost_counts_cache_bytes_q_and_out():
    cost = KB.attention_cost(KB.Case(1024, 2), KB.GPU_GEOMETRY, cache_bytes=1000, elem=2)
    assert cost.bytes == 1000 + 2 * 2 * 2 * 32 * 128
    assert cost.flops == 4 * 2 * 32 * 1024 * 128
    chunk = KB.attention_cost(KB.Case(1024, 2, 7), KB.GPU_GEOMETRY, cache_bytes=1000, elem=2)
    assert chunk.bytes == 1000 + 2 * 2 * 2 * 32 * 7 * 128 and chunk.flops == 7 * cost.flops


def _row(context, batch, method, median, config=None, kind="ours", q_len=1, **kw):
    return {"context": context, "batch": batch, "q_len": q_len, "config": config, "method": method, "kind": kind,
            "median_us": median, "status": "ok", "auto": False, **kw}


def test_speedups_summary_and_targets():
    rows = [_row(8192, 1, "sdpa", 40.0, kind="baseline"), _row(8192, 1, "sdpa:packed", 30.0, kind="baseline"),
            _row(8192, 1, "triton", 10.0, "2b-r4-s2", mem_vs_fp16=0.28, bytes_per_token_per_layer=1150.0),
            _row(8192, 1, "dequant+sdpa", 60.0, "2b-r4-s2", kind="baseline", mem_vs_fp16=0.28),
            _row(8192, 1, "triton", 20.0, "2b-r4-s2-i8", mem_vs_fp16=0.31),
            _row(1024, 1, "sdpa", 8.0, kind="baseline"), _row(1024, 1, "triton", None, "2b-r4-s2", status="error"),
            # a draft check at 8k: its own SDPA time, and no target line
            _row(8192, 1, "sdpa", 90.0, kind="baseline", q_len=7), _row(8192, 1, "triton", 45.0, "2b-r4-s2", q_len=7)]
    KB.add_speedups(rows)
    assert rows[0]["vs_sdpa"] == 0.75 and rows[2]["vs_sdpa"] == 3.0 and rows[3]["vs_sdpa"] == 0.5
    assert rows[6]["vs_sdpa"] is None and rows[-1]["vs_sdpa"] == 2.0
    summary = {(s["context"], s["config"]): s for s in KB.summarize_rows(rows) if s["q_len"] == 1}
    chunk = [s for s in KB.summarize_rows(rows) if s["q_len"] == 7]
    assert [(c["sdpa_us"], c["best_us"]) for c in chunk] == [(90.0, 45.0)]
    assert summary[(8192, "2b-r4-s2")]["best_us"] == 10.0 and summary[(8192, "2b-r4-s2")]["sdpa_us"] == 30.0
    assert summary[(8192, "2b-r4-s2")]["bytes_per_token_per_layer"] == 1150.0
    assert summary[(1024, "2b-r4-s2")]["best"] == "- (1 err)"
    targets = {(t["target"], t["context"]): t["met"] for t in KB.evaluate_targets(rows)}
    assert targets[("2b-r4-s2 >= 2x SDPA, T >= 8k", 8192)] == "yes"  # 30 / 10
    assert targets[("2b-r4-s2-i8 >= 2x SDPA, T >= 8k", 8192)] == "NO"  # 30 / 20
    assert targets[("2b-r4-s2 memory <= 0.30x fp16, T >= 8k", 8192)] == "yes"
    assert targets[("2b-r4-s2-i8 memory <= 0.30x fp16, T >= 8k", 8192)] == "NO"
    assert not any(context == 1024 for _, context in targets)  # below every target's min context
    assert len(KB.evaluate_targets(rows)) == 4  # the draft check's row is nobody's target
    text = KB.format_summary({"mode": "quick", "meta": {"device": "X"}, "geometry": {}, "rows": rows})
    assert "targets (printed, not asserted)" in text and "triton" in text


def test_main_rejects_bad_arguments(capsys):
    assert KB.main(["--cpu-smoke", "--configs", "2b,9b"]) == 2
    assert "--configs" in capsys.readouterr().err
    assert KB.main(["--cpu-smoke", "--contexts", "0"]) == 2
    assert KB.main(["--cpu-smoke", "--batches", "x"]) == 2
    assert KB.main(["--cpu-smoke", "--q-lens", "81"]) == 2  # longer than the shortest context, 80
    assert "--q-lens" in capsys.readouterr().err


def test_main_without_cuda_exits_zero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert KB.main(["--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


REQUIRED_ROW_KEYS = {"suite", "family", "context", "batch", "q_heads", "kv_heads", "head_dim", "config", "method",
                     "kind", "status", "median_us", "p20_us", "p80_us", "eager_us", "gbps", "frac_copy_bw", "vs_sdpa",
                     "bytes", "flops", "cache_bytes", "bytes_per_token_per_layer", "bits_per_entry", "mem_vs_fp16",
                     "err_vs_fp16", "note", "auto"}


def test_cpu_smoke_run_writes_json_after_every_case_and_prints_table_last(tmp_path, capsys, monkeypatch):
    from lowrank_ops.kvcache import dense_nbytes

    seen = []
    original = KB.run_case

    def spy(case, *args, **kw):  # the JSON on disk holds every case finished before this one
        path = tmp_path / "kvcache-cpu-smoke.json"
        seen.append(len({(r["context"], r["batch"], r["q_len"]) for r in json.loads(path.read_text())["rows"]})
                    if path.exists() else 0)
        return original(case, *args, **kw)

    monkeypatch.setattr(KB, "run_case", spy)
    threads = torch.get_num_threads()
    assert KB.main(["--cpu-smoke", "--out", str(tmp_path), "--methods", "reference", "--target-ms", "0.2"]) == 0
    assert torch.get_num_threads() == threads
    assert seen == list(range(8))  # 2 contexts x 2 batches x (1 and 3 query tokens)
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("   200   3  3 ")  # the full table is the last thing printed
    payload = json.loads((tmp_path / "kvcache-cpu-smoke.json").read_text())
    assert payload["suite"] == "kvcache" and payload["mode"] == "cpu-smoke" and set(payload["configs"]) == set(KB.CONFIGS)
    assert payload["geometry"] == {"q_heads": 8, "kv_heads": 2, "head_dim": 64}
    rows = payload["rows"]
    assert not [r for r in rows if r["status"] == "error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(REQUIRED_ROW_KEYS <= set(r) for r in ok)
    assert all(r["median_us"] > 0 and r["gbps"] > 0 for r in ok)
    ours = [r for r in ok if r["kind"] == "ours"]
    assert {(r["config"], r["context"], r["batch"], r["q_len"]) for r in ours} == {
        (c, t, b, q) for c in KB.CONFIGS for t in KB.CPU_SMOKE["contexts"] for b in KB.CPU_SMOKE["batches"]
        for q in (1, 3)}
    assert all(r["method"] == "reference" and r["auto"] and r["err_vs_ref"] == 0.0 for r in ours)
    for r in ok:
        fp16 = dense_nbytes(r["batch"], 2, r["context"], 64)
        assert r["bytes"] == r["cache_bytes"] + 2 * 2 * r["batch"] * 8 * r["q_len"] * 64  # true count: cache + q + out
        assert r["mem_vs_fp16"] == pytest.approx(r["cache_bytes"] / fp16)
        if r["method"].startswith("sdpa"):
            assert r["cache_bytes"] == fp16 and r["err_vs_fp16"] < 1e-3
        else:  # a compressed cache: smaller than fp16 once the tail buffer is amortized
            assert r["err_vs_fp16"] > 1e-3
            if r["context"] == 200:
                assert r["mem_vs_fp16"] < 0.7
    dequant = [r for r in ok if r["method"] == "dequant+sdpa"]
    assert len(dequant) == len(ours) and all(r["err_vs_ref"] < 5e-3 for r in dequant)
    skipped = [r for r in rows if r["method"] == "triton"]
    assert skipped == [] or all(r["status"] == "skipped" and r["note"] for r in skipped)
    capsys.readouterr()
    assert KB.main(["--summarize", str(tmp_path / "kvcache-cpu-smoke.json")]) == 0
    summary = capsys.readouterr().out
    assert "reference*" in summary and "2b-r4-s2" in summary and "targets" not in summary  # contexts < 4k


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs the Triton interpreter (conftest sets it on machines without CUDA)")
def test_cpu_smoke_triton_row_really_runs(tmp_path, monkeypatch):
    from lowrank_ops.kernels import kvcache_attention as kernels

    calls = []
    original = kernels.gear_decode_attention

    def spy(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(kernels, "gear_decode_attention", spy)
    assert KB.main(["--cpu-smoke", "--out", str(tmp_path), "--contexts", "80", "--batches", "1", "--q-lens", "1,3",
                    "--configs", "2b-r4-s2", "--methods", "triton", "--target-ms", "0.1"]) == 0
    rows = json.loads((tmp_path / "kvcache-cpu-smoke.json").read_text())["rows"]
    ours = [r for r in rows if r["kind"] == "ours"]
    assert [r["q_len"] for r in ours] == [1, 3]  # a decode step and a causal chunk
    for row in ours:
        assert row["method"] == "triton" and row["status"] == "ok", row["note"]
        assert row["err_vs_ref"] < 2e-3 and calls
