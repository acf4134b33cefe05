"""Eager inference skips the custom ops (``backend.eager_inference``): a layer's forward under
``torch.no_grad()`` (as ``generate()`` runs) calls the op's implementation directly, while a call
that needs gradients, or one torch.compile traces, goes through the op and its autograd; both give
the same output. The op objects are replaced by stubs that fail, so a test sees which path ran."""
import pytest
import torch

from lowrank_ops import LoRALinear, LowRankLinear, QuantLinear, SparseLinear, use_backend
from lowrank_ops.core import backend
from lowrank_ops.lowrank import ops as lowrank_ops_module
from lowrank_ops.quant import ops as quant_ops_module
from lowrank_ops.sparse import ops as sparse_ops_module

LAYERS = {
    "lowrank": (lambda lin: LowRankLinear.from_linear(lin, rank=8), lowrank_ops_module, "_lowrank_linear_op"),
    "lora": (lambda lin: LoRALinear.from_linear(lin, rank=4), lowrank_ops_module, "_lora_linear_op"),
    "quant": (lambda lin: QuantLinear.from_linear(lin, bits=4, group_size=32, outliers=0.02), quant_ops_module,
              "_quant_linear_op"),
    "sparse": (lambda lin: SparseLinear.from_linear(lin, 2, 4), sparse_ops_module, "_nm_linear_op"),
}


def _stub(*args, **kwargs):
    raise AssertionError("the custom op ran")


@pytest.mark.parametrize("name", list(LAYERS))
def test_no_grad_forward_skips_the_op_and_matches_it(name, monkeypatch):
    make, module, op_name = LAYERS[name]
    torch.manual_seed(0)
    with use_backend("reference"):
        layer = make(torch.nn.Linear(64, 48))
        x = torch.randn(3, 64)
        through_op = layer(x.clone().requires_grad_())  # needs a gradient: the op and its autograd
        monkeypatch.setattr(module, op_name, _stub)
        with torch.no_grad():
            direct = layer(x)
        with pytest.raises(AssertionError, match="the custom op ran"):
            layer(x.clone().requires_grad_())
    torch.testing.assert_close(direct, through_op.detach(), rtol=0, atol=0)


def test_eager_inference_needs_no_compile_and_no_gradient():
    x, w = torch.randn(2, 3), torch.randn(3, 3, requires_grad=True)
    assert backend.eager_inference(x, None)
    assert not backend.eager_inference(x, w)
    with torch.no_grad():
        assert backend.eager_inference(x, w)
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def traced(t):
        seen.append(backend.eager_inference(t))
        return t + 1

    traced(x)
    assert seen == [False]
