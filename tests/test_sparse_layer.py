"""Reference lane for SparseLinear / SRSTELinear and build_sparse_layers: layer, fixed-mask and
SR-STE training, freeze, quantized values (and, on the interpreter, that they reach the kernels
as codes), save/load, model-level all-or-nothing."""
import copy
import json

import pytest
import torch
from torch import nn

from lowrank_ops import io, model as model_mod
from lowrank_ops.calibration import InputStats
from lowrank_ops.sparse.compress import prune
from lowrank_ops.sparse.format import check_nm_mask
from lowrank_ops.sparse.layer import SparseLinear, SRSTELinear, build_sparse_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _stats(x):
    s = InputStats(x.shape[-1])
    s.update(x)
    return s


@pytest.mark.parametrize("kwargs", [dict(), dict(n=1, m=4), dict(n=2, m=8), dict(n=4, m=8), dict(n=3, m=16),
                                    dict(lowrank_rank=4), dict(quantize_values=True, group_size=32)])
def test_forward_equals_its_dense_weight(kwargs):
    lin = nn.Linear(96, 40)
    before = lin.weight.clone()
    layer = SparseLinear.from_linear(lin, **kwargs)
    assert torch.equal(lin.weight, before)
    x = torch.randn(3, 5, 96)
    y = layer(x)
    assert y.shape == (3, 5, 40)
    assert rel(y, x @ layer.dense_weight().t() + lin.bias) < 1e-5
    assert layer.nbytes == layer.weight_nbytes + 40 * 4
    assert layer.bits_per_weight == pytest.approx(8 * layer.format.nbytes / (40 * 96))
    assert f"{layer.n}:{layer.m}" in repr(layer)
    if not kwargs.get("lowrank_rank"):
        assert check_nm_mask(layer.format.mask(), layer.n, layer.m) is not None
        assert bool((layer.dense_weight()[~layer.format.mask()] == 0).all())


def test_fp16_bytes_and_defaults():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64).half()
    layer = SparseLinear.from_linear(lin)  # 2:4, magnitude without calibration
    assert layer.values.dtype == torch.float16 and layer.dtype == torch.float16
    assert layer.weight_nbytes == 64 * 128 * 2 + 64 * 128 * 2 // 8  # fp16 values + 2-bit positions
    assert layer.bits_per_weight == pytest.approx(9.0)
    assert torch.equal(layer.dense_weight(), prune(lin.weight.detach(), method="magnitude").dense())


def test_auto_uses_sparsegpt_with_calibration():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    x = torch.randn(512, 128) * torch.logspace(-1, 1, 128)
    ref = lin(x)
    errors = {
        method: rel(SparseLinear.from_linear(lin, method=method, calib=x)(x), ref)
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    auto = SparseLinear.from_linear(lin, calib=x)
    assert torch.equal(auto.dense_weight(), SparseLinear.from_linear(lin, method="sparsegpt", calib=x).dense_weight())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    compensated = rel(SparseLinear.from_linear(lin, calib=x, lowrank_rank=8)(x), ref)
    assert compensated < errors["sparsegpt"]


def test_fixed_mask_training_updates_kept_values_only():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = SparseLinear.from_linear(lin, n=2, m=8, trainable=True)
    assert {n for n, p in layer.named_parameters()} == {"values", "bias"}
    indices = layer.indices.clone()
    mask = layer.format.mask()
    teacher = nn.Linear(64, 32)
    x = torch.randn(256, 64)
    target = teacher(x).detach()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(layer.indices, indices) and torch.equal(layer.format.mask(), mask)
    assert bool((layer.dense_weight()[~mask] == 0).all())


@pytest.mark.interpreter
@pytest.mark.parametrize("rows", [3, 17])
def test_q4_layer_hands_codes_to_the_kernels(rows, monkeypatch):
    """With 4-bit kept values the layer passes codes + scales/zeros to the op: on the Triton
    backend (interpreter) neither the forward nor the backward to x dequantizes or expands the
    weight in torch, and both match the layer's dense weight."""
    pytest.importorskip("triton")
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.sparse import ops

    lin = nn.Linear(96, 40)
    layer = SparseLinear.from_linear(lin, n=2, m=8, quantize_values=True, group_size=32)
    x = torch.randn(rows, 96, requires_grad=True)
    w = layer.dense_weight()
    grad = torch.randn(rows, 40)

    def expanded(*args, **kwargs):
        raise AssertionError("the 4-bit weight was dequantized / expanded in torch")

    monkeypatch.setattr(ops, "dequantize_reference", expanded)
    monkeypatch.setattr(ops, "unpack_nm", expanded)
    with use_backend("triton"):
        y = layer(x)
        y.backward(grad)
    assert rel(y, x.detach() @ w.t() + lin.bias) < 1e-5
    assert rel(x.grad, grad @ w) < 1e-5
    assert layer.bias.grad is not None


def test_frozen_layer_has_no_weight_parameter():
    layer = SparseLinear.from_linear(nn.Linear(32, 8), lowrank_rank=2)
    assert {n for n, p in layer.named_parameters()} == {"lr_u", "lr_v", "bias"}
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lr_u.grad is not None
    with pytest.raises(ValueError, match="trainable: 4-bit quantized values cannot be trained"):
        SparseLinear.from_linear(nn.Linear(32, 8), quantize_values=True, group_size=32, trainable=True)


# ----------------------------------------------------------------------------- SR-STE


def test_srste_gradient_is_straight_through_plus_decay():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6)
    layer = SRSTELinear.from_linear(lin, 2, 4, decay=0.1)
    x = torch.randn(5, 16)
    mask = layer.mask()
    layer(x).square().sum().backward()
    # oracle: the gradient w.r.t. the masked weight W ⊙ mask, passed to every weight, plus λ·(1−mask)·W
    ws = (lin.weight.detach() * mask).requires_grad_()
    (x @ ws.t() + lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ws.grad + 0.1 * (~mask) * lin.weight.detach())
    assert bool((layer.weight.grad[~mask] != 0).all())  # pruned weights do receive gradient


def test_srste_mask_changes_during_training_and_freezes():
    torch.manual_seed(0)
    k = 32
    teacher_mask = torch.zeros(8, k, dtype=torch.bool)
    teacher_mask[:, 2::4] = True
    teacher_mask[:, 3::4] = True  # the best 2:4 pattern: columns 2, 3 of each group (weights away from 0)
    teacher_w = torch.sign(torch.randn(8, k)) * (0.5 + torch.rand(8, k)) * teacher_mask
    lin = nn.Linear(k, 8)
    with torch.no_grad():  # start from a weight whose magnitude mask is columns 0, 1
        lin.weight.copy_(torch.randn(8, k) * 0.1)
        lin.weight[:, 0::4] = 1.0
        lin.weight[:, 1::4] = -1.0
    layer = SRSTELinear.from_linear(lin, 2, 4, decay=2e-2)
    start = layer.mask()
    assert bool(start[:, 0::4].all())
    x = torch.randn(512, k)
    target = x @ teacher_w.t()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
    end = layer.mask()
    assert check_nm_mask(end, 2, 4) is end
    assert float((end != start).float().mean()) > 0.3
    assert float((end == teacher_mask).float().mean()) > 0.95
    frozen = layer.freeze()
    assert isinstance(frozen, SparseLinear) and (frozen.n, frozen.m) == (2, 4)
    torch.testing.assert_close(frozen(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen.format.mask(), end)
    assert rel(frozen(x), target) < 0.1


def test_srste_bad_inputs():
    with pytest.raises(ValueError, match="weight: expected in_features .K = 10. to be a multiple of m=4"):
        SRSTELinear.from_linear(nn.Linear(10, 4))
    with pytest.raises(ValueError, match="decay: expected a number >= 0"):
        SRSTELinear.from_linear(nn.Linear(16, 4), decay=-1.0)
    with pytest.raises(ValueError, match="n: expected 1 <= n < m=8"):
        SRSTELinear.from_linear(nn.Linear(16, 4), 8, 8)


# ----------------------------------------------------------------------------- (de)serialisation


@pytest.mark.parametrize("kwargs", [dict(), dict(trainable=True), dict(n=3, m=16, lowrank_rank=3),
                                    dict(quantize_values=True, group_size=32, lowrank_rank=2)])
@pytest.mark.parametrize("bias", [True, False])
def test_config_state_dict_round_trip(kwargs, bias):
    lin = nn.Linear(64, 24, bias=bias).to(torch.bfloat16)
    layer = SparseLinear.from_linear(lin, **kwargs)
    config = json.loads(json.dumps(layer.config()))
    fresh = SparseLinear.from_config(config, dtype=torch.bfloat16)
    assert fresh.state_dict().keys() == layer.state_dict().keys()
    for key, t in layer.state_dict().items():
        assert fresh.state_dict()[key].shape == t.shape and fresh.state_dict()[key].dtype == t.dtype, key
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.config() == layer.config()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.mlp(x + self.attn(x))


@pytest.fixture
def integrated(monkeypatch):
    """The two integration lines for shared files, applied for the test."""
    monkeypatch.setitem(model_mod.METHODS, "nm", build_sparse_layers)
    monkeypatch.setitem(io.LAYER_TYPES, SparseLinear.FORMAT, SparseLinear)


def test_compress_nm_with_recipes_and_roundtrip(tmp_path, integrated):
    torch.manual_seed(0)
    original = Net()
    model = copy.deepcopy(original)
    data = [torch.randn(32, 64) for _ in range(3)]
    report = model_mod.compress(model, "nm", calib_data=data, recipes={"mlp.*": {"n": 2, "m": 8, "lowrank_rank": 2}})
    settings = {r.name: r.setting for r in report.layers}
    assert settings == {"attn": "2:4", "mlp.0": "2:8 r2", "mlp.2": "2:8 r2"}
    assert isinstance(model.attn, SparseLinear)
    path = io.save_compressed(model, tmp_path / "nm.safetensors")
    fresh = copy.deepcopy(original)
    io.load_compressed(fresh, path)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))
    assert isinstance(fresh.mlp[2], SparseLinear)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n=4, m=4), ValueError, "layer 'attn'.*n: expected 1 <= n < m=4"),
        (dict(m=12), ValueError, r"m: expected one of \[4, 8, 16\]"),
        (dict(method="wanda"), ValueError, "stats: method 'wanda' needs calibration"),
        (dict(method="obs"), ValueError, "method: expected one of"),
        (dict(recipes={"mlp.2": {"m": 16, "n": 3, "group_size": 48, "quantize_values": True}}), ValueError, "layer 'mlp.2'.*group_size"),
        (dict(recipes=["attn"]), TypeError, "recipes: expected a mapping"),
    ],
)
def test_bad_settings_leave_the_model_unchanged(kwargs, error, match, integrated):
    model = Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        model_mod.compress(model, "nm", **kwargs)
    assert all(type(m) is not SparseLinear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_from_linear_bad_inputs():
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="calib"):
        SparseLinear.from_linear(nn.Linear(32, 8), calib="data")
    with pytest.raises(ValueError, match="weight: expected in_features .K = 30. to be a multiple of m=4"):
        SparseLinear.from_linear(nn.Linear(30, 8))
    bad = nn.Linear(32, 8)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight: expected finite values"):
        SparseLinear.from_linear(bad)
    with pytest.raises(ValueError, match="expected size 32 at dim -1"):
        SparseLinear.from_linear(nn.Linear(32, 8), calib=torch.randn(10, 16))
    with pytest.raises(ValueError, match="stats: expected statistics of 32 input features"):
        SparseLinear.from_linear(nn.Linear(32, 8), calib=_stats(torch.randn(10, 16)))
    layer = SparseLinear.from_linear(nn.Linear(32, 8))
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer(torch.randn(2, 32).half())
    with pytest.raises(ValueError, match="x: expected size 32"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("kwargs", [dict(lowrank_rank=2), dict(quantize_values=True, group_size=32), dict(trainable=True)])
def test_layer_compiles_fullgraph(kwargs):
    layer = SparseLinear.from_linear(nn.Linear(64, 32), **kwargs)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.bias.grad is not None
