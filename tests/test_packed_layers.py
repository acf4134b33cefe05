"""Reference lane: the packed-format layers (QuantLinear, SparseLinear) under the module-wide
``.to(dtype)`` / ``.half()`` / ``.float()`` calls a user makes on a whole model: the format's own
buffers keep their dtypes bit for bit, the compute dtype follows, the layer keeps working."""
import copy

import pytest
import torch
from torch import nn

from lowrank_ops import QuantLinear, SparseLinear

LAYERS = {
    "quant 3b +outliers +r4": lambda lin: QuantLinear.from_linear(lin, bits=3, group_size=32, outliers=0.02, lowrank_rank=4),
    "quant 4b second-level stats": lambda lin: QuantLinear.from_linear(lin, bits=4, group_size=32, quantize_stats=True),
    "quant 3b lut": lambda lin: QuantLinear.from_linear(lin, bits=3, lut=True),
    "nm 2:4": lambda lin: SparseLinear.from_linear(lin),
    "nm 2:4 4-bit values": lambda lin: SparseLinear.from_linear(lin, quantize_values=True, group_size=32),
}


def _packed(layer):
    return {name: buf for name, buf in layer.named_buffers() if name in type(layer).PACKED_BUFFERS}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dtype_calls_keep_the_format_and_move_the_compute_dtype(kind, dtype):
    lin = nn.Linear(64, 48)
    layer = LAYERS[kind](lin)
    packed = {name: buf.clone() for name, buf in _packed(layer).items()}
    assert any(buf.is_floating_point() for buf in packed.values()) or kind == "nm 2:4"  # fp16 scales, tables...
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = layer(x)
    model = nn.Sequential(copy.deepcopy(layer)).to(dtype)  # what a user does to a whole model
    moved = model[0]
    assert moved.dtype == dtype
    for name, buf in _packed(moved).items():
        assert buf.dtype == packed[name].dtype and torch.equal(buf, packed[name]), name
    for param in moved.parameters():
        assert param.dtype == dtype
    with torch.no_grad():
        y = model(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert float((y.float() - ref).norm() / ref.norm()) < tol
    back = copy.deepcopy(moved).half().float()  # a round trip through fp16 leaves the format untouched
    assert all(torch.equal(buf, packed[name]) for name, buf in _packed(back).items())
