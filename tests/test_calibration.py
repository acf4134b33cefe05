"""Reference lane: per-layer input statistics (lowrank_ops.calibration)."""
import copy

import pytest
import torch
from torch import nn

from lowrank_ops.calibration import InputStats, collect_input_stats


def _xtx(*xs: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    return rows.T @ rows


# ----------------------------------------------------------------------------- InputStats
F32_SUMS = dict(rtol=1e-6, atol=1e-5)  # each batch's XᵀX is formed in float32, summed in float64



def test_update_accumulates_over_batches_and_leading_dims():
    a, b = torch.randn(2, 5, 6), torch.randn(7, 6, dtype=torch.float16)
    stats = InputStats()
    stats.update(a)
    stats.update(b)
    assert stats.in_features == 6 and stats.count == 17
    assert stats.xtx.dtype == torch.float64
    torch.testing.assert_close(stats.xtx, _xtx(a, b.float()), **F32_SUMS)
    torch.testing.assert_close(stats.second_moment(), _xtx(a, b.float()) / 17, **F32_SUMS)
    torch.testing.assert_close(stats.channel_norms(), torch.cat([a.reshape(-1, 6), b.float()]).double().norm(dim=0), **F32_SUMS)


def test_update_one_row_and_empty_batch():
    stats = InputStats(3)
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    stats.update(torch.empty(0, 3))
    assert stats.count == 1
    torch.testing.assert_close(stats.channel_norms(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_update_rejects_nan_naming_the_layer():
    stats = InputStats(4, name="blocks.0.fc1")
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.fc1.*finite"):
        stats.update(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        stats.update(x)
    assert stats.count == 0


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(3, 5), ValueError, "in_features"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "dtype"),
        ([[1.0] * 4], TypeError, "torch.Tensor"),
        (torch.tensor(1.0), ValueError, "scalar"),
    ],
)
def test_update_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        InputStats(4).update(x)


def test_bad_in_features():
    with pytest.raises(ValueError, match="in_features"):
        InputStats(0)


def test_empty_stats_refuse_moments():
    for method in (InputStats(4, name="fc").second_moment, InputStats().channel_norms):
        with pytest.raises(ValueError, match="stats"):
            method()


# ----------------------------------------------------------------------------- collect_input_stats


class TwoInputs(nn.Module):
    """``fc(x + shift)``: callable as model(x), model(x, shift) or model(x=..., shift=...)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, shift=None):
        return self.drop(self.fc(x if shift is None else x + shift))


def _sequential():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))


def test_collect_sequential_matches_manual():
    model = _sequential()
    batches = [torch.randn(4, 8), torch.randn(2, 3, 8)]
    stats = collect_input_stats(model, batches, ["0", "3"])
    assert set(stats) == {"0", "3"}
    assert stats["0"].count == 10 and stats["3"].count == 10
    torch.testing.assert_close(stats["0"].xtx, _xtx(*batches), **F32_SUMS)
    with torch.no_grad():  # eval mode: dropout is the identity
        hidden = [torch.relu(model[0](b)) for b in batches]
    torch.testing.assert_close(stats["3"].xtx, _xtx(*hidden), **F32_SUMS)


def test_collect_item_kinds_dict_tuple_tensor():
    model = TwoInputs()
    x, shift = torch.randn(6, 5), torch.randn(5)
    items = [x, (x, shift), [x, shift], {"x": x, "shift": shift}]
    stats = collect_input_stats(model, iter(items), ["fc"])  # a one-shot iterator is fine
    assert stats["fc"].count == 24
    torch.testing.assert_close(stats["fc"].xtx, _xtx(x, x + shift, x + shift, x + shift), **F32_SUMS)


def test_collect_keyword_input_to_the_layer():
    class KwCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(input=x)

    x = torch.randn(3, 4)
    stats = collect_input_stats(KwCall(), [x], ["fc"])
    torch.testing.assert_close(stats["fc"].xtx, _xtx(x), **F32_SUMS)


def test_collect_restores_hooks_modes_and_parameters():
    model = _sequential()
    model.train()
    model[2].eval()  # mixed modes must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_training = []
    model[0].register_forward_hook(lambda m, i, o: seen_training.append(m.training))
    collect_input_stats(model, [torch.randn(2, 8)], ["0", "3"], progress=True)
    assert seen_training == [False]  # ran in eval mode
    assert [m.training for m in model] == [True, True, False, True]
    assert not model[3]._forward_pre_hooks and len(model[0]._forward_hooks) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_collect_nan_input_names_layer_and_cleans_up():
    model = _sequential().train()
    bad = torch.randn(2, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'0'.*finite"):
        collect_input_stats(model, [torch.randn(2, 8), bad], ["0"])
    assert not model[0]._forward_pre_hooks
    assert all(m.training for m in model.modules())


def test_collect_empty_data():
    model = _sequential()
    with pytest.raises(ValueError, match=r"^calib_data: expected at least one batch, got none$"):
        collect_input_stats(model, [], ["0"])
    assert not model[0]._forward_pre_hooks


@pytest.mark.parametrize(
    "model, names, error, match",
    [
        ("not a model", ["0"], TypeError, "model"),
        (None, "0", TypeError, "layer_names"),
        (None, [], ValueError, "layer_names"),
        (None, ["0", "0"], ValueError, "layer_names.*distinct"),
        (None, ["nope"], ValueError, "layer_names.*nope"),
        (None, [0], TypeError, "layer_names"),
    ],
)
def test_collect_bad_arguments(model, names, error, match):
    with pytest.raises(error, match=match):
        collect_input_stats(_sequential() if model is None else model, [torch.randn(2, 8)], names)


def test_collect_wrong_width_input():
    with pytest.raises(ValueError, match="in_features"):
        collect_input_stats(_sequential(), [torch.randn(2, 9)], ["0"])


def test_collect_module_without_in_features_infers_width():
    stats = collect_input_stats(TwoInputs(), [torch.randn(2, 5)], ["drop"])
    assert stats["drop"].in_features == 3 and stats["drop"].count == 2


# ----------------------------------------------------------------------------- OutputProbe


def test_output_probe_measures_relative_output_change_and_restores():
    from lowrank_ops.calibration import OutputProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    batches = [torch.randn(5, 6), (torch.randn(4, 6),)]
    probe = OutputProbe(model, batches)
    original = model[2]
    assert probe("2", copy.deepcopy(original)) == 0.0
    zero = nn.Linear(8, 3)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    assert probe("2", zero) == pytest.approx(1.0)  # output removed entirely: relative error 1
    assert model[2] is original and model.training  # swapped back, mode restored

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        probe("2", Boom())
    assert model[2] is original
    with pytest.raises(ValueError, match="batches"):
        OutputProbe(model, [])


def test_output_probe_reads_dict_and_tuple_outputs():
    from lowrank_ops.calibration import OutputProbe

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return {"a": y, "b": (y * 2, torch.ones(1, dtype=torch.long))}

    model = Two()
    probe = OutputProbe(model, [torch.randn(3, 4)])
    shifted = copy.deepcopy(model.fc)
    with torch.no_grad():
        shifted.bias += 1.0
    assert probe("fc", shifted) > 0
