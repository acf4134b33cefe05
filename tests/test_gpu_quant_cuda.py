"""GPU lane: the hand-written CUDA quant decode kernel (csrc/quant_decode.cu) against the reference op.

Uses the installed ``lowrank_ops._C`` when it loads, else builds csrc/ for this GPU into the
cache (needs nvcc). Error measure: ‖out − ref‖ / ‖ref‖ against the fp32 reference
(:func:`lowrank_ops.quant.ops.quant_linear_reference`) of the same inputs.
"""
import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.quant import cuda_decode
from lowrank_ops.quant.ops import quant_linear, quant_linear_reference

from test_quant_cuda_wrapper import make_packed

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
FIELDS = ("qweight", "qweight_hi", "scales", "zeros", "lut", "outlier_rowptr", "outlier_cols", "outlier_vals",
          "lr_u", "lr_v", "bias")


def _case(m, k, n, bits, g, lut, outliers, lowrank, dtype, bias=True, seed=0, qstats=False):
    x, t = make_packed(m=m, k=k, n=n, bits=bits, g=g, lut=lut, outliers=outliers, bias=bias, dtype=dtype,
                       device="cuda", seed=seed, qstats=qstats)
    if lowrank:
        r = 16
        t["lr_u"] = (torch.randn(n, r, device="cuda") * 0.05).half()
        t["lr_v"] = (torch.randn(r, k, device="cuda") * 0.05).half()
    return x, t


def _ref(x, t, bits, g):
    return quant_linear_reference(x, *(t.get(f) for f in FIELDS), bits=bits, group_size=g,
                                  in_features=x.shape[1]).double()


def _rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed element)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("lut", [False, True])
@pytest.mark.parametrize("k,n,g", [(4096, 4099, 128), (100, 37, 32), (1000, 257, 64)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_matches_reference(ext, m, k, n, g, bits, lut, dtype):
    for outliers, lowrank in [(False, False), (True, False), (True, True)]:
        x, t = _case(m, k, n, bits, g, lut, outliers, lowrank, dtype)
        out = cuda_decode.quant_decode(x, **t, bits=bits, group_size=g)
        assert out.shape == (m, n) and out.dtype == dtype
        err = _rel_err(out, _ref(x, t, bits, g))
        assert err < TOL[dtype], (outliers, lowrank, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n,g", [(4096, 4099, 32), (1000, 37, 64)])
@pytest.mark.parametrize("m", [1, 5])
def test_second_level_statistics_match_reference(ext, m, k, n, g, bits, dtype):
    x, t = _case(m, k, n, bits, g, False, True, False, dtype, qstats=True)
    assert t["scales"].dtype == torch.uint8
    err = _rel_err(cuda_decode.quant_decode(x, **t, bits=bits, group_size=g), _ref(x, t, bits, g))
    assert err < TOL[dtype], err


def test_every_output_written_and_no_bias(ext):
    """Raw _C call with a NaN-filled y: every element must be written (odd N, K tail)."""
    x, t = _case(3, 100, 13, 3, 32, False, True, False, torch.float16, bias=False)
    y = torch.full((3, 13), float("nan"), dtype=torch.float16, device="cuda")
    p = lambda name: t[name].data_ptr() if name in t else 0  # noqa: E731
    ext.quant_decode(x.data_ptr(), p("qweight"), p("qweight_hi"), p("scales"), p("zeros"), 0, p("outlier_rowptr"),
                     p("outlier_cols"), p("outlier_vals"), 0, y.data_ptr(), 3, 100, 13, 3, 32, 0, 0,
                     torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert _rel_err(y, _ref(x, t, 3, 32)) < TOL[torch.float16]


def test_outliers_in_high_columns_and_empty_csr(ext):
    """Columns >= 32768 (negative as int16) are read unsigned; an all-empty CSR adds nothing."""
    k, n = 40000, 9
    x, t = _case(2, k, n, 4, 128, False, False, False, torch.float16)
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[:, 39990:] = True
    from lowrank_ops.quant.format import outliers_to_csr

    rowptr, cols, vals = outliers_to_csr(mask, torch.randn(n, k))
    t.update(outlier_rowptr=rowptr.cuda(), outlier_cols=cols.cuda(), outlier_vals=vals.cuda())
    out = cuda_decode.quant_decode(x, **t, bits=4, group_size=128)
    assert _rel_err(out, _ref(x, t, 4, 128)) < TOL[torch.float16]
    empty = torch.zeros(n + 1, dtype=torch.int32, device="cuda")
    t.update(outlier_rowptr=empty, outlier_cols=cols[:0].cuda(), outlier_vals=vals[:0].cuda())
    out = cuda_decode.quant_decode(x, **t, bits=4, group_size=128)
    assert _rel_err(out, _ref(x, t, 4, 128)) < TOL[torch.float16]


def test_misaligned_views_are_handled(ext):
    x, t = _case(2, 4096, 64, 4, 128, False, True, False, torch.float16)
    xo = torch.empty(2 * 4096 + 1, dtype=x.dtype, device="cuda")[1:].view(2, 4096)
    xo.copy_(x)  # x 2 bytes off 16-byte alignment: scalar staging path
    qo = torch.empty(t["qweight"].numel() + 1, dtype=torch.int32, device="cuda")[1:].view_as(t["qweight"])
    qo.copy_(t["qweight"])  # qweight 4 bytes off: the wrapper copies it
    out = cuda_decode.quant_decode(xo, **{**t, "qweight": qo}, bits=4, group_size=128)
    assert _rel_err(out, _ref(x, t, 4, 128)) < TOL[torch.float16]


def test_op_routes_to_cuda_and_backward_still_works(ext):
    x, t = _case(4, 1000, 300, 3, 64, True, True, True, torch.bfloat16)
    from lowrank_ops.quant import ops

    assert ops._quant_backend(x, 3, True, 64) == "cuda"
    with use_backend("cuda"):
        y = quant_linear(x, **t, bits=3, group_size=64, in_features=1000)
    assert _rel_err(y, _ref(x, t, 3, 64)) < TOL[torch.bfloat16]
    xg = x.clone().requires_grad_(True)
    with use_backend("cuda"):
        quant_linear(xg, **t, bits=3, group_size=64, in_features=1000).float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_cuda_graph_capture(ext):
    x, t = _case(1, 4096, 4096, 4, 128, False, True, True, torch.float16)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (allocator, lazy module init)
            cuda_decode.quant_decode(static_x, **t, bits=4, group_size=128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cuda_decode.quant_decode(static_x, **t, bits=4, group_size=128)
    for seed in range(3):
        static_x.copy_(torch.randn(x.shape, device=x.device, dtype=x.dtype) if seed else x)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(static_y, _ref(static_x, t, 4, 128)) < TOL[torch.float16]
