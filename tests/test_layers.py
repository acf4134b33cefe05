"""Reference lane for LowRankLinear and LoRALinear."""
import pytest
import torch
from torch import nn

from lowrank_ops import InputStats, LoRALinear, LowRankLinear


def test_from_linear_is_the_best_rank_r_approximation():
    lin = nn.Linear(12, 10)
    layer = LowRankLinear.from_linear(lin, rank=4)
    x = torch.randn(7, 12)
    assert layer(x).shape == (7, 10)
    # rank 4 of a 10x12 random weight is lossy; check it is the best rank-4 (Eckart–Young)
    s = torch.linalg.svdvals(lin.weight.detach())
    err = (layer.dense_weight() - lin.weight).norm().item()
    assert err == pytest.approx(s[4:].norm().item(), rel=1e-4)


def test_from_linear_keeps_bias_dtype_and_leaves_linear_unchanged():
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    layer = LowRankLinear.from_linear(lin, ratio=0.5)
    assert layer.u.dtype == torch.bfloat16 and layer.rank == int(0.5 * 64 * 48 / (64 + 48))
    assert torch.equal(layer.bias, lin.bias)
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


def test_bytes_and_bits_are_exact():
    layer = LowRankLinear(100, 60, rank=8, dtype=torch.float16)
    assert layer.weight_nbytes == 2 * 8 * (100 + 60)
    assert layer.nbytes == layer.weight_nbytes + 2 * 60
    assert layer.bits_per_weight == pytest.approx(16 * 8 * 160 / 6000)


def test_calibrated_from_linear_accepts_sample_inputs():
    torch.manual_seed(1)
    lin = nn.Linear(32, 32)
    x = torch.randn(256, 32) * torch.logspace(-2, 1, 32)  # strongly anisotropic inputs
    plain = LowRankLinear.from_linear(lin, rank=6)
    aware = LowRankLinear.from_linear(lin, rank=6, calib=x)
    ref = lin(x)
    assert (aware(x) - ref).norm() < (plain(x) - ref).norm()


def test_energy_choice_and_no_saving_refused():
    lin = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="saves no bytes"):
        LowRankLinear.from_linear(lin, energy=1.0)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(lin, rank=4, ratio=0.5)
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(1, 1, 1), rank=1)
    with pytest.raises(TypeError, match="calib"):
        LowRankLinear.from_linear(lin, rank=1, calib=[1, 2])


def test_training_factors_from_scratch_learns_a_low_rank_map():
    torch.manual_seed(0)
    target = torch.randn(20, 3) @ torch.randn(3, 24)
    layer = LowRankLinear(24, 20, rank=3, bias=False)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    x = torch.randn(256, 24)
    for _ in range(300):
        opt.zero_grad()
        loss = ((layer(x) - x @ target.t()) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * (x @ target.t()).pow(2).mean().item()


def test_init_scale_matches_nn_linear():
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    dense, low = nn.Linear(512, 512, bias=False), LowRankLinear(512, 512, rank=128, bias=False)
    ratio = low(x).std() / dense(x).std()
    assert 0.5 < ratio < 2.0


def test_lora_starts_equal_to_base_and_trains_only_adapter():
    lin = nn.Linear(16, 8)
    lora = LoRALinear.from_linear(lin, rank=4, alpha=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lora(x), lin(x))
    lora(x).pow(2).sum().backward()
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.lora_b.grad is not None and lora.scale == 2.0
    with torch.no_grad():
        lora.lora_b.normal_()
    torch.testing.assert_close(lora.merged()(x), lora(x), rtol=1e-5, atol=1e-5)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]


def test_lora_on_lowrank_layer_stack_backward():
    layer = LowRankLinear(8, 8, rank=2)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.u.grad is not None and layer.v.grad is not None


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(in_features=0, out_features=4, rank=1), ValueError, "in_features"),
        (dict(in_features=4, out_features=4, rank=5), ValueError, "rank"),
        (dict(in_features=4, out_features=4, rank=0), ValueError, "rank"),
        (dict(in_features=4, out_features=4, rank=1.5), TypeError, "rank"),
    ],
)
def test_constructor_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowRankLinear(**kwargs)
    with pytest.raises(error, match=match):
        LoRALinear(**kwargs)


def test_input_stats_reexported():
    assert InputStats(4).count == 0
