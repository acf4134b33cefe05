"""Reference lane for compress(): selection, calibration, report, all-or-nothing."""
import copy

import pytest
import torch
from torch import nn

import lowrank_ops
from lowrank_ops import LowRankLinear, compress


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.tiny = nn.Linear(32, 1)  # factorizing a one-row layer never saves bytes

    def forward(self, x, scale=1.0):
        h = x + self.attn(x) * scale
        return self.tiny(h + self.mlp(h))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def calib_batches(n=4):
    return [torch.randn(8, 5, 32) for _ in range(n)]


def test_compress_swaps_layers_and_reports_bytes():
    model = Block()
    report = compress(model, "lowrank", ratio=0.5)
    assert isinstance(model.attn, LowRankLinear) and isinstance(model.mlp[2], LowRankLinear)
    assert type(model.tiny) is nn.Linear  # kept: factors would be larger
    rows = {r.name: r for r in report.layers}
    assert rows["tiny"].format == "dense" and rows["tiny"].bytes_after == rows["tiny"].bytes_before
    assert rows["attn"].bytes_after == model.attn.nbytes == 4 * (2 * 8 * 32 + 32)
    assert report.bytes_after < report.bytes_before
    assert 0 < rows["attn"].weight_error < 1 and rows["attn"].calib_error is None
    text = str(report)
    assert "attn" in text and "smaller" in text


def test_calibration_inputs_as_tuple_and_dict_and_whitening_helps():
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(64, 32) * torch.logspace(-2, 1, 32)
    plain, aware = copy.deepcopy(base), copy.deepcopy(base)
    compress(plain, "lowrank", ratio=0.3, include=["mlp.*"])
    data = [(x[:32], 1.0), {"x": x[32:], "scale": 1.0}]
    report = compress(aware, "lowrank", ratio=0.3, include=["mlp.*"], calib_data=data)
    assert all(r.calib_error is not None for r in report.layers)
    ref = base(x)
    assert (aware(x) - ref).norm() < (plain(x) - ref).norm()


def test_global_allocation_respects_budget():
    model = Block()
    report = compress(model, "lowrank", ratio=0.4, allocation="global", calib_data=calib_batches(), exclude=["tiny"])
    params_before = sum(r.shape[0] * r.shape[1] for r in report.layers)
    params_after = sum(
        m.u.numel() + m.v.numel() if isinstance(m, LowRankLinear) else m.weight.numel()
        for m in (model.attn, model.mlp[0], model.mlp[2])
    )
    assert params_after <= 0.4 * params_before


def test_global_allocation_with_calibration_spends_rank_where_outputs_care():
    torch.manual_seed(0)

    class TwoPaths(nn.Module):
        """Two identical-looking layers; the model's output barely depends on the second."""

        def __init__(self):
            super().__init__()
            self.loud, self.quiet = nn.Linear(48, 48), nn.Linear(48, 48)
            with torch.no_grad():
                self.quiet.weight.copy_(self.loud.weight)

        def forward(self, x):
            return self.loud(x) + 1e-3 * self.quiet(x)

    model = TwoPaths()
    report = compress(model, "lowrank", ratio=0.4, allocation="global", calib_data=calib_batches_48())
    ranks = {r.name: r.setting for r in report.layers}
    assert int(ranks["loud"].split()[1]) > int(ranks["quiet"].split()[1]), ranks


def calib_batches_48(n=4):
    return [torch.randn(16, 48) for _ in range(n)]


def test_include_exclude_and_no_match():
    model = Block()
    compress(model, "lowrank", rank=4, include=["mlp.*"], exclude=["mlp.2"])
    assert isinstance(model.mlp[0], LowRankLinear)
    assert type(model.mlp[2]) is nn.Linear and type(model.attn) is nn.Linear
    with pytest.raises(ValueError, match="include/exclude"):
        compress(Block(), "lowrank", rank=4, include=["nothing*"])
    with pytest.raises(TypeError, match="include"):
        compress(Block(), "lowrank", rank=4, include="mlp.*")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(), ValueError, "rank"),  # no rank/ratio/energy
        (dict(kind="prune"), ValueError, "kind"),
        (dict(ratio=1.5), ValueError, "ratio"),
        (dict(ratio=0.5, allocation="best"), ValueError, "allocation"),
        (dict(rank=4, allocation="global"), ValueError, "allocation"),
        (dict(rank=4, whiten=True), ValueError, "whiten"),
        (dict(rank=4, calib_data=[]), ValueError, "calib_data"),
        (dict(rank=4, calib_data=[torch.full((2, 32), float("nan"))]), ValueError, "NaN"),
    ],
)
def test_failures_leave_model_exactly_as_it_was(kwargs, error, match):
    model = Block()
    before, modules = state(model), dict(model.named_modules())
    kind = kwargs.pop("kind", "lowrank")
    with pytest.raises(error, match=match):
        compress(model, kind, **kwargs)
    after = model.state_dict()
    assert dict(model.named_modules()) == modules
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_failure_during_swap_restores(monkeypatch):
    model = Block()
    modules = dict(model.named_modules())
    real_setattr = nn.Module.__setattr__
    calls = {"n": 0}

    def flaky_setattr(self, name, value):
        if isinstance(value, LowRankLinear):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")
        real_setattr(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", flaky_setattr)
    with pytest.raises(RuntimeError, match="injected"):
        compress(model, "lowrank", rank=4)
    monkeypatch.undo()
    assert dict(model.named_modules()) == modules


def test_rank_too_large_for_every_layer_keeps_them_dense():
    model = Block()
    report = compress(model, "lowrank", rank=64)
    assert {r.format for r in report.layers} == {"dense"} and report.bytes_after == report.bytes_before


def test_model_type_checked():
    with pytest.raises(TypeError, match="model"):
        lowrank_ops.compress("not a model", "lowrank", rank=2)
