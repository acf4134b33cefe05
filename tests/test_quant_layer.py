"""Reference lane for QuantLinear and compress(model, "quant"): layer, training, save/load, recipes."""
import copy

import pytest
import torch
from torch import nn

import lowrank_ops
from lowrank_ops import QuantLinear, compress, load_compressed, save_compressed, use_backend


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("bits,lut", [(2, False), (3, False), (4, False), (3, True)])
def test_forward_equals_its_dequantized_weight(bits, lut):
    lin = nn.Linear(100, 37)
    layer = QuantLinear.from_linear(lin, bits=bits, group_size=32, lut=lut)
    x = torch.randn(3, 5, 100)
    ref = x @ layer.dense_weight().t() + lin.bias
    assert layer(x).shape == (3, 5, 37)
    assert rel(layer(x), ref) < 1e-5
    assert 0 < rel(layer.dense_weight(), lin.weight) < (0.5 if bits == 2 else 0.25)


def test_bytes_are_exact_and_linear_is_unchanged():
    lin = nn.Linear(256, 64).half()
    before = lin.weight.clone()
    layer = QuantLinear.from_linear(lin, bits=4, group_size=128)
    assert torch.equal(lin.weight, before)
    # codes 4 bits + fp16 scale and zero per 128 weights = 4.25 bits per weight
    assert layer.weight_nbytes == 64 * 256 // 2 + 2 * 2 * 64 * 2
    assert layer.bits_per_weight == pytest.approx(4.25)
    assert layer.nbytes == layer.weight_nbytes + 64 * 2


def test_calibrated_outliers_and_compensation_lower_the_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    x = torch.randn(512, 128) * torch.logspace(-1, 1, 128)
    ref = lin(x)
    errors = [
        rel(QuantLinear.from_linear(lin, bits=3, group_size=32, **kw)(x), ref)
        for kw in (dict(method="rtn"), dict(calib=x), dict(calib=x, outliers=0.01), dict(calib=x, outliers=0.01, lowrank_rank=8))
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


def test_adapter_trains_on_a_frozen_quantized_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(lin, bits=4, group_size=32, lowrank_rank=4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lr_u", "lr_v", "bias"}
    codes = layer.qweight.clone()
    x = torch.randn(64, 64, requires_grad=True)
    target = torch.randn(64, 32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and x.grad is not None
    assert torch.equal(layer.qweight, codes)  # the packed base never moves


def test_dx_matches_autograd_through_the_dense_weight():
    lin = nn.Linear(40, 24)
    layer = QuantLinear.from_linear(lin, bits=3, group_size=32, outliers=0.02, lowrank_rank=2)
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 24)
    layer(x).backward(g)
    xd = x.detach().double().requires_grad_()
    (xd @ layer.dense_weight().double().t()).backward(g.double())
    assert rel(x.grad, xd.grad) < 1e-5


@pytest.mark.interpreter
def test_triton_backend_serves_the_layer():
    lin = nn.Linear(100, 40)
    layer = QuantLinear.from_linear(lin, bits=3, group_size=32, outliers=0.01, lowrank_rank=4)
    x = torch.randn(3, 100)
    with use_backend("triton"):
        y = layer(x)
    with use_backend("reference"):
        ref = layer(x)
    assert rel(y, ref) < 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.mlp(x + self.attn(x))


def test_compress_quant_with_recipes_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    original = Net()
    model = copy.deepcopy(original)
    data = [torch.randn(32, 64) for _ in range(3)]
    report = compress(model, "quant", bits=3, group_size=32, outliers=0.01, calib_data=data, recipes={"attn": {"bits": 4}})
    settings = {r.name: r.setting for r in report.layers}
    assert settings["attn"].startswith("4b") and settings["mlp.0"].startswith("3b")
    assert report.bytes_after < report.bytes_before / 3
    path = save_compressed(model, tmp_path / "q.safetensors")
    fresh = copy.deepcopy(original)
    load_compressed(fresh, path)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))
    assert isinstance(fresh.mlp[2], QuantLinear)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bits=5), ValueError, "bits"),
        (dict(bits=4, group_size=48), ValueError, "group_size"),
        (dict(bits=4, outliers=0.2), ValueError, "outliers"),
        (dict(bits=4, method="gptq"), ValueError, "stats"),  # the quantizer, passed through
        (dict(bits=4, lut="yes"), TypeError, "lut"),
        (dict(bits=4, method="hqq", quantize_stats=True), ValueError, "quantize_stats"),
        (dict(bits=4, recipes={"mlp.*": {"bits": 7}}), ValueError, "layer 'mlp.0'.*bits"),
    ],
)
def test_bad_settings_leave_the_model_unchanged(kwargs, error, match):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        compress(model, "quant", **kwargs)
    assert all(type(m) is not QuantLinear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_from_linear_type_errors():
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="calib"):
        QuantLinear.from_linear(nn.Linear(32, 8), calib="data")
    assert lowrank_ops.quant_linear is not None


def test_second_level_statistics_layer_round_trip(tmp_path):
    """quantize_stats: a smaller layer, the same forward after save/load, and the setting reported."""
    torch.manual_seed(0)
    original = Net()
    model, plain = copy.deepcopy(original), copy.deepcopy(original)
    data = [torch.randn(32, 64) for _ in range(2)]
    report = compress(model, "quant", bits=3, group_size=32, quantize_stats=True, calib_data=data)
    plain_report = compress(plain, "quant", bits=3, group_size=32, calib_data=data)
    assert all(r.setting.startswith("3b g32 qstats") for r in report.layers)
    assert report.bytes_after < plain_report.bytes_after
    layer = model.mlp[0]
    assert layer.scales is None and layer.stat_codes.dtype == torch.uint8 and layer.format.quantized_stats
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ layer.format.dense().t() + layer.bias, rtol=1e-5, atol=1e-5)
    path = save_compressed(model, tmp_path / "qs.safetensors")
    fresh = copy.deepcopy(original)
    load_compressed(fresh, path)
    assert torch.equal(fresh(x), model(x))


def test_reload_into_an_already_quantized_model(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    compress(model, "quant", bits=4, group_size=32)  # no bias, no low-rank: a layer of buffers only
    path = save_compressed(model, tmp_path / "b.safetensors")
    other = nn.Sequential(nn.Linear(64, 32, bias=False))
    compress(other, "quant", bits=4, group_size=32)
    load_compressed(other, path)
    x = torch.randn(2, 64)
    assert torch.equal(other(x), model(x))
