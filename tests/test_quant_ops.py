"""Reference lane for the quantized linear op: packing contract, reference math, autograd,
opcheck, torch.compile, dispatch and bad inputs. CPU only, no Triton needed.

Packed tensors are built by this file's own helper straight from the format spec (codes first,
then packed), so the reference dequantization is checked against an independent construction.
"""
import math

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.quant import ops


# --------------------------------------------------------------------------- packed-format test helper
def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes (N, K_pad) in [0, 2^bits) -> int32 words (N, K_pad·bits/32), code k at bit (k % E)·bits."""
    per_word = 32 // bits
    n, k_pad = q.shape
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (q.reshape(n, k_pad // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_packed(n, k, *, bits, group, mode="uniform", outlier_frac=0.0, rank=0, lr_dtype=torch.float32, gen=None):
    """Random packed weight per the spec; returns (tensors dict for the op, float64 dense Ŵ_total (N, K))."""
    k_pad = math.ceil(k / group) * group
    n_groups = k_pad // group
    q = torch.randint(0, 2**bits, (n, k_pad), generator=gen)
    q[:, k:] = 0
    t = dict(qweight_hi=None, scales=None, zeros=None, lut=None, outlier_rowptr=None, outlier_cols=None,
             outlier_vals=None, lr_u=None, lr_v=None)
    if bits == 3:
        t["qweight"], t["qweight_hi"] = pack_codes(q & 3, 2), pack_codes(q >> 2, 1)
    else:
        t["qweight"] = pack_codes(q, bits)
    gidx = torch.arange(k) // group
    if mode == "lut":
        t["lut"] = (torch.randn(n, 2**bits, generator=gen) * k**-0.5).half()
        w = t["lut"].double().gather(1, q[:, :k])
    elif mode == "qstats":  # second-level statistics in the scales/zeros slots: uint8 codes, fp16 meta
        levels = 2**bits - 1
        code = torch.randint(0, 16, (n, n_groups), generator=gen)
        zero = torch.randint(0, levels + 1, (n, n_groups), generator=gen)
        blocks = -(-n // 16)
        lo = (math.log2(2 * k**-0.5 / levels) - 1 + torch.rand(blocks, n_groups, generator=gen)).half()
        step = (torch.rand(blocks, n_groups, generator=gen) * 0.1).half()
        t["scales"], t["zeros"] = (code | zero << 4).to(torch.uint8), torch.stack([lo, step])
        block = torch.arange(n) // 16
        scale = torch.exp2(lo.double()[block] + code * step.double()[block])
        w = (q[:, :k].double() - zero.double()[:, gidx]) * scale[:, gidx]
    else:
        levels = 2**bits - 1
        t["scales"] = ((torch.rand(n, n_groups, generator=gen) + 0.5) * 2 * k**-0.5 / levels).half()
        t["zeros"] = (levels / 2 + torch.randn(n, n_groups, generator=gen) * 0.5).half()  # fractional zeros
        w = (q[:, :k].double() - t["zeros"].double()[:, gidx]) * t["scales"].double()[:, gidx]
    if outlier_frac > 0:
        keep = torch.rand(n, k, generator=gen) < outlier_frac
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: CSR order
        counts = keep.sum(1)
        t["outlier_rowptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        t["outlier_cols"] = torch.where(cols >= 2**15, cols - 2**16, cols).to(torch.int16)  # unsigned in 16 bits
        t["outlier_vals"] = (torch.randn(len(rows), generator=gen) * 2 * k**-0.5).half()
        w[rows, cols] += t["outlier_vals"].double()
    if rank > 0:
        t["lr_u"] = (torch.randn(n, rank, generator=gen) * rank**-0.5).to(lr_dtype)
        t["lr_v"] = (torch.randn(rank, k, generator=gen) * 0.3 * k**-0.5).to(lr_dtype)
        w = w + t["lr_u"].double() @ t["lr_v"].double()
    return t, w


def meta(bits, group, k):
    return dict(bits=bits, group_size=group, in_features=k)


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


ORDER = ("qweight", "qweight_hi", "scales", "zeros", "lut", "outlier_rowptr", "outlier_cols", "outlier_vals", "lr_u", "lr_v")


def op_args(x, t, bias, bits, group, k):
    return (x, *(t[name] for name in ORDER), bias, bits, group, k)


# --------------------------------------------------------------------------- reference math
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mode", ["uniform", "lut", "qstats"])
@pytest.mark.parametrize("k,group", [(100, 32), (128, 128), (70, 64)])
def test_dequantize_reference_matches_codes(bits, mode, k, group):
    t, w = make_packed(19, k, bits=bits, group=group, mode=mode, outlier_frac=0.05, rank=3)
    deq = ops.dequantize_reference(**t, **meta(bits, group, k))
    assert deq.dtype == torch.float32 and deq.shape == (19, k)
    assert rel(deq, w) < 1e-6


def test_outlier_columns_read_as_unsigned():
    k = 40000  # columns >= 32768 are stored as negative int16
    t, w = make_packed(2, k, bits=4, group=128, outlier_frac=0.001)
    assert int(t["outlier_cols"].min()) < 0, "test setup: no column past 32767"
    deq = ops.dequantize_reference(**t, **meta(4, 128, k))
    assert rel(deq, w) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bits,mode", [(2, "uniform"), (3, "lut"), (4, "uniform"), (3, "qstats")])
def test_quant_linear_matches_float64(dtype, tol, bits, mode):
    t, w = make_packed(23, 100, bits=bits, group=32, mode=mode, outlier_frac=0.02, rank=4, lr_dtype=dtype)
    x = torch.randn(2, 5, 100).to(dtype)
    b = torch.randn(23).to(dtype)
    y = ops.quant_linear(x, **t, bias=b, **meta(bits, 32, 100))
    assert y.shape == (2, 5, 23) and y.dtype == dtype
    ref = x.double() @ w.t() + b.double()
    assert rel(y, ref) < tol


def test_gradients_match_float64_autograd():
    k, n, r = 70, 13, 4
    t, w = make_packed(n, k, bits=3, group=32, outlier_frac=0.05, rank=r)
    base = w - t["lr_u"].double() @ t["lr_v"].double()  # Ŵ + S
    x = torch.randn(6, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    g = torch.randn(6, n, dtype=torch.float64)
    leaves = [x.float().requires_grad_(), t["lr_u"].requires_grad_(), t["lr_v"].requires_grad_(), bias.float().requires_grad_()]
    ops.quant_linear(leaves[0], **{**t, "lr_u": leaves[1], "lr_v": leaves[2]}, bias=leaves[3], **meta(3, 32, k)).backward(g.float())
    refs = [x.requires_grad_(), leaves[1].detach().double().requires_grad_(), leaves[2].detach().double().requires_grad_(), bias.requires_grad_()]
    (refs[0] @ (base + refs[1] @ refs[2]).t() + refs[3]).backward(g)
    for mine, ref, name in zip(leaves, refs, ("x", "lr_u", "lr_v", "bias")):
        assert mine.grad is not None, name
        assert rel(mine.grad, ref.grad) < 1e-5, name
    assert t["qweight"].grad is None and t["scales"].grad is None


def test_pinned_backends_and_dispatch():
    t, _ = make_packed(8, 32, bits=4, group=32)
    x = torch.randn(3, 32)
    with use_backend("reference"):
        y = ops.quant_linear(x, **t, **meta(4, 32, 32))
    torch.testing.assert_close(y, ops.quant_linear_reference(x, *(t[n] for n in ORDER), None, **meta(4, 32, 32)))
    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend .cuda.*CUDA tensor"):
        ops.quant_linear(x, **t, **meta(4, 32, 32))
    assert ops.quant_path(1, 4096, 4096) == "decode"
    assert ops.quant_path(16, 4096, 4096) == "decode"
    assert ops.quant_path(17, 4096, 4096) == "tile"


# --------------------------------------------------------------------------- opcheck, torch.compile
@pytest.mark.parametrize("bits,mode,frac,rank,bias", [(4, "uniform", 0.05, 3, True), (3, "lut", 0.0, 0, False),
                                                      (2, "uniform", 0.0, 2, False), (3, "qstats", 0.05, 2, True)])
def test_opcheck(bits, mode, frac, rank, bias):
    t, _ = make_packed(12, 40, bits=bits, group=32, mode=mode, outlier_frac=frac, rank=rank)
    if rank:
        t["lr_u"].requires_grad_()
        t["lr_v"].requires_grad_()
    x = torch.randn(5, 40, requires_grad=True)
    b = torch.randn(12, requires_grad=True) if bias else None
    with use_backend("reference"):
        torch.library.opcheck(ops._quant_linear_op, op_args(x, t, b, bits, 32, 40))


class TinyQuantLinear(torch.nn.Module):
    def __init__(self, t, bits, group, k):
        super().__init__()
        for name in ORDER:
            if t[name] is not None and name not in ("lr_u", "lr_v"):
                self.register_buffer(name, t[name])
        self.lr_u = torch.nn.Parameter(t["lr_u"])
        self.lr_v = torch.nn.Parameter(t["lr_v"])
        self.meta = meta(bits, group, k)

    def forward(self, x):
        packed = {name: getattr(self, name, None) for name in ORDER}
        return ops.quant_linear(x, **packed, **self.meta)


def test_torch_compile_fullgraph_has_no_graph_break():
    t, _ = make_packed(16, 48, bits=3, group=32, outlier_frac=0.05, rank=2)
    model = torch.nn.Sequential(TinyQuantLinear(t, 3, 32, 48), torch.nn.GELU())
    x = torch.randn(2, 3, 48)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[0].lr_u.grad is not None and model[0].lr_v.grad is not None


# --------------------------------------------------------------------------- bad inputs
def _bad(t, **changes):
    return {**t, **changes}


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda x, t, m: ((x.numpy(),), t, m), TypeError, "x: expected a torch.Tensor"),
        (lambda x, t, m: ((x.int(),), t, m), TypeError, "x: expected dtype"),
        (lambda x, t, m: ((x[:, :50],), t, m), ValueError, "x: expected size 100"),
        (lambda x, t, m: ((x,), _bad(t, qweight=t["qweight"].long()), m), TypeError, "qweight: expected dtype"),
        (lambda x, t, m: ((x,), _bad(t, qweight=t["qweight"][:, :3]), m), ValueError, "qweight: expected size"),
        (lambda x, t, m: ((x,), _bad(t, qweight_hi=None), m), ValueError, "qweight_hi: required"),
        (lambda x, t, m: ((x,), _bad(t, scales=t["scales"].float()), m), TypeError, "scales: expected dtype"),
        (lambda x, t, m: ((x,), _bad(t, zeros=t["zeros"][:, :2]), m), ValueError, "zeros: expected size"),
        (lambda x, t, m: ((x,), _bad(t, zeros=None), m), ValueError, "scales: uniform mode needs"),
        (lambda x, t, m: ((x,), _bad(t, lut=torch.zeros(9, 8, dtype=torch.float16)), m), ValueError, "lut: LUT mode"),
        (lambda x, t, m: ((x,), _bad(t, outlier_cols=t["outlier_cols"].int()), m), TypeError, "outlier_cols: expected dtype"),
        (lambda x, t, m: ((x,), _bad(t, outlier_vals=None), m), ValueError, "all or none"),
        (lambda x, t, m: ((x,), _bad(t, outlier_vals=t["outlier_vals"][:-1]), m), ValueError, "outlier_vals: expected size"),
        (lambda x, t, m: ((x,), _bad(t, outlier_rowptr=t["outlier_rowptr"][:-1]), m), ValueError, "outlier_rowptr: expected size"),
        (lambda x, t, m: ((x,), _bad(t, lr_v=None), m), ValueError, "lr_u and lr_v"),
        (lambda x, t, m: ((x,), _bad(t, lr_v=t["lr_v"][:, :10]), m), ValueError, "lr_v: expected size 100"),
        (lambda x, t, m: ((x,), _bad(t, lr_u=t["lr_u"].double()), m), TypeError, "lr_u: expected dtype"),
        (lambda x, t, m: ((x, torch.zeros(3)), t, m), ValueError, "bias: expected size 9"),
        (lambda x, t, m: ((x,), t, {**m, "bits": 5}), ValueError, "bits: expected one of"),
        (lambda x, t, m: ((x,), t, {**m, "group_size": 48}), ValueError, "group_size: expected one of"),
        (lambda x, t, m: ((x,), t, {**m, "in_features": 1.5}), TypeError, "in_features: expected an int"),
    ],
)
def test_bad_inputs(change, error, match):
    t, _ = make_packed(9, 100, bits=3, group=32, outlier_frac=0.05, rank=2)
    (args, t, m) = change(torch.randn(3, 100), t, meta(3, 32, 100))
    x, *rest = args
    bias = rest[0] if rest else None
    with pytest.raises(error, match=match):
        ops.quant_linear(x, **t, bias=bias, **m)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(zeros=lambda t: t["zeros"][:, :1]), ValueError, "stat_meta: expected size"),
        (dict(zeros=lambda t: t["zeros"].float()), TypeError, "stat_meta: expected dtype"),
        (dict(scales=lambda t: t["scales"][:5]), ValueError, "stat_codes: expected size"),
    ],
)
def test_bad_second_level_statistics(change, error, match):
    t, _ = make_packed(20, 100, bits=3, group=32, mode="qstats")
    t = {**t, **{name: fn(t) for name, fn in change.items()}}
    with pytest.raises(error, match=match):
        ops.quant_linear(torch.randn(3, 100), **t, **meta(3, 32, 100))
