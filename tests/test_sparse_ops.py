"""Reference lane: the ``lowrank_ops::nm_linear`` op (reference vs float64, autograd, opcheck,
torch.compile, dispatch, bad inputs; dense and 4-bit kept values); the Triton backend through the
op, backward included, on the interpreter; the op's GPU paths are in the gpu lane at the end."""
import sys
import types

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.sparse import ops
from lowrank_ops.sparse.format import kept_columns, nm_mask_from_scores, pack_nm, unpack_nm

PATTERNS = [(1, 4), (2, 4), (2, 8), (4, 8), (3, 16)]


def _packed(rows, k, n, m, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen)
    mask = nm_mask_from_scores(torch.rand(rows, k, generator=gen), n, m)
    values, indices = pack_nm(w.to(dtype), mask, n, m)
    return values, indices, mask


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _q4(values, group):
    """(qweight, scales, zeros) of the 4-bit RTN-quantized kept values and their float64 dequantization."""
    from lowrank_ops.quant.compress import quantize_rtn

    q = quantize_rtn(values.float(), bits=4, group_size=group)
    return (q.qweight, q.scales, q.zeros), q.dense(torch.float64)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 17)])
def test_reference_matches_float64_dense(n, m, dtype, tol, shape):
    k, rows = 4 * m, 9
    values, indices, mask = _packed(rows, k, n, m, dtype)
    x = torch.randn(*shape, k).to(dtype)
    bias = torch.randn(rows).to(dtype)
    y = ops.nm_linear(x, values, indices, bias, n=n, m=m, in_features=k)
    dense = unpack_nm(values.double(), indices, n, m, k)
    ref = x.double() @ dense.t() + bias.double()
    assert y.shape == (*shape, rows) and y.dtype == dtype
    assert _rel(y, ref) < tol
    assert bool((dense[~mask] == 0).all())


def test_one_dimensional_input():
    values, indices, _ = _packed(5, 16, 2, 4)
    x = torch.randn(16)
    y = ops.nm_linear(x, values, indices, n=2, m=4, in_features=16)
    assert y.shape == (5,)
    torch.testing.assert_close(y, unpack_nm(values, indices, 2, 4, 16) @ x)


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (5, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_dense_masked_autograd(n, m, bias):
    k, rows = 3 * m, 7
    values, indices, mask = _packed(rows, k, n, m)
    x = torch.randn(2, 5, k, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(rows, requires_grad=True) if bias else None
    y = ops.nm_linear(x, v, indices, b, n=n, m=m, in_features=k)
    grad = torch.randn_like(y)
    y.backward(grad)
    # float64 oracle: autograd through a dense weight, masked
    x64 = x.detach().double().requires_grad_()
    w64 = unpack_nm(values.double(), indices, n, m, k).requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = x64 @ (w64 * mask).t() + (b64 if bias else 0)
    y64.backward(grad.double())
    assert _rel(x.grad, x64.grad) < 1e-6
    expected = torch.gather(w64.grad, 1, kept_columns(indices, n, m, k))
    assert _rel(v.grad, expected) < 1e-6
    # the kept-value gradient is exactly the dense gradient at the kept positions
    assert _rel(unpack_nm(v.grad.double(), indices, n, m, k), w64.grad * mask) < 1e-6
    if bias:
        assert _rel(b.grad, b64.grad) < 1e-6


def test_frozen_weight_gets_no_gradient():
    values, indices, _ = _packed(6, 16, 2, 4)
    x = torch.randn(3, 16, requires_grad=True)
    ops.nm_linear(x, values, indices, n=2, m=4, in_features=16).sum().backward()
    assert x.grad is not None and values.grad is None and indices.grad is None


# --------------------------------------------------------------------------- 4-bit kept values
@pytest.mark.parametrize("n,m,k,group,dtype,tol", [
    (2, 4, 100, 32, torch.float32, 1e-6), (1, 4, 256, 64, torch.float16, 2e-3), (2, 8, 200, 128, torch.bfloat16, 1e-2),
    (4, 16, 112, 32, torch.float32, 1e-6),
], ids=str)
def test_q4_reference_and_gradients_match_float64(n, m, k, group, dtype, tol):
    """4-bit kept values (codes + scales/zeros, KK off the group size): y, dx and dbias against
    float64 autograd through the dequantized dense weight; codes/scales/zeros stay frozen."""
    values, indices, _ = _packed(9, k, n, m)
    (qweight, scales, zeros), dequant = _q4(values, group)
    x = torch.randn(2, 3, k).to(dtype).requires_grad_()
    bias = torch.randn(9).to(dtype).requires_grad_()
    y = ops.nm_linear(x, qweight, indices, bias, n=n, m=m, in_features=k, qscales=scales, qzeros=zeros,
                      group_size=group)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y64 = x64 @ unpack_nm(dequant, indices, n, m, k).t() + b64
    y64.backward(grad.double())
    assert y.dtype == dtype and _rel(y, y64) < tol
    assert _rel(x.grad, x64.grad) < tol and _rel(bias.grad, b64.grad) < tol
    assert all(t.grad is None for t in (qweight, scales, zeros, indices))
    ref = ops.nm_linear_reference(x.detach().reshape(-1, k), qweight, indices, bias.detach(), n, m, k, scales, zeros, group)
    torch.testing.assert_close(y.detach().reshape(-1, 9), ref)


# --------------------------------------------------------------------------- opcheck, torch.compile
@pytest.mark.parametrize("n,m,bias,train", [(2, 4, True, True), (1, 4, False, False), (3, 16, True, False), (4, 8, False, True)])
def test_opcheck(n, m, bias, train):
    k, rows = 2 * m, 6
    values, indices, _ = _packed(rows, k, n, m)
    values.requires_grad_(train)
    x = torch.randn(5, k, requires_grad=True)
    b = torch.randn(rows, requires_grad=True) if bias else None
    with use_backend("reference"):
        torch.library.opcheck(ops._nm_linear_op, (x, values, indices, b, n, m, k, "auto"))


@pytest.mark.parametrize("n,m,group,bias", [(2, 4, 32, True), (3, 8, 64, False)])
def test_opcheck_q4(n, m, group, bias):
    k, rows = 10 * m, 6
    values, indices, _ = _packed(rows, k, n, m)
    (qweight, scales, zeros), _ = _q4(values, group)
    x = torch.randn(5, k, requires_grad=True)
    b = torch.randn(rows, requires_grad=True) if bias else None
    with use_backend("reference"):
        torch.library.opcheck(ops._nm_linear_op, (x, qweight, indices, b, n, m, k, "auto", scales, zeros, group))


class TinySparseLinear(torch.nn.Module):
    def __init__(self, values, indices, n, m, k):
        super().__init__()
        self.values = torch.nn.Parameter(values)
        self.register_buffer("indices", indices)
        self.bias = torch.nn.Parameter(torch.randn(values.shape[0]))
        self.meta = dict(n=n, m=m, in_features=k)

    def forward(self, x):
        return ops.nm_linear(x, self.values, self.indices, self.bias, **self.meta)


def test_torch_compile_fullgraph_has_no_graph_break():
    values, indices, _ = _packed(12, 32, 2, 8)
    model = torch.nn.Sequential(TinySparseLinear(values, indices, 2, 8, 32), torch.nn.GELU())
    x = torch.randn(2, 3, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[0].values.grad is not None and model[0].bias.grad is not None


# --------------------------------------------------------------------------- dispatch
def test_nm_path():
    assert [ops.nm_path(r) for r in (1, 16, 17, ops.EXPAND_MIN_ROWS - 1, ops.EXPAND_MIN_ROWS)] == [
        "decode", "decode", "tile", "tile", "expand"]
    assert ops.nm_path(16, 2, 4) == "decode"
    assert ops.nm_path(ops.SEMI_STRUCTURED_MIN_ROWS - 1, 2, 4) == "tile"
    assert ops.nm_path(ops.SEMI_STRUCTURED_MIN_ROWS, 2, 4) == "semi_structured"
    assert ops.nm_path(ops.SEMI_STRUCTURED_MIN_ROWS, 2, 4, quantized=True) == "expand"
    assert ops.nm_path(4096, 2, 8) == "expand"


def test_semi_structured_support_reasons():
    values, _, _ = _packed(32, 64, 2, 4, torch.float16)
    x = torch.randn(256, 64).half()
    assert "CUDA tensor" in ops.semi_structured_support(x, values, 2, 4).why
    assert "2:4 only" in ops.semi_structured_support(x, values, 2, 8).why
    # an fp32 call on the auto path falls back to the expand path (256 rows)
    assert ops._resolve_path("auto", x.float(), values.float(), 2, 4) == "expand"
    assert ops._resolve_path("auto", x[:3], values, 2, 4) == "decode"
    assert ops._resolve_path("semi_structured", x[:3], values, 2, 4) == "semi_structured"


def test_pinned_backends_and_unavailable_kernels(monkeypatch):
    values, indices, _ = _packed(8, 32, 2, 4)
    x = torch.randn(3, 32)
    with use_backend("reference"):
        y = ops.nm_linear(x, values, indices, n=2, m=4, in_features=32)
    torch.testing.assert_close(y, ops.nm_linear_reference(x, values, indices, None, 2, 4, 32))
    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend 'cuda' cannot run this call"):
        ops.nm_linear(x, values, indices, n=2, m=4, in_features=32)
    # a missing kernel module or function makes the triton backend unsupported, with the reason
    import lowrank_ops.kernels as kernel_pkg

    monkeypatch.delattr(kernel_pkg, "sparse", raising=False)
    monkeypatch.setitem(sys.modules, "lowrank_ops.kernels.sparse", None)
    assert "lowrank_ops.kernels.sparse is not available" in ops._triton_support(x, values, 2, 4, "auto").why
    monkeypatch.setitem(sys.modules, "lowrank_ops.kernels.sparse", types.ModuleType("lowrank_ops.kernels.sparse"))
    verdict = ops._triton_support(x, values, 2, 4, "auto")
    if verdict.why.startswith("Triton cannot launch"):
        pytest.skip("Triton cannot launch here (no CUDA and no interpreter)")
    assert "lacks nm_matmul_decode()" in verdict.why
    with use_backend("triton"), pytest.raises(ValueError, match="lacks nm_matmul_tile"):
        ops.nm_linear(torch.randn(20, 32), values, indices, n=2, m=4, in_features=32)
    import lowrank_ops.sparse as sparse_pkg

    monkeypatch.delattr(sparse_pkg, "cuda_decode", raising=False)
    monkeypatch.setitem(sys.modules, "lowrank_ops.sparse.cuda_decode", None)
    assert "cuda_decode is not available" in ops._cuda_support(x, values, 2, 4).why


@pytest.mark.interpreter
@pytest.mark.parametrize("rows,path,group", [(3, "auto", None), (17, "auto", None), (3, "tile", None),
                                             (3, "auto", 32), (17, "auto", 64), (3, "tile", 32)])
def test_triton_backend_through_the_op(rows, path, group, monkeypatch):
    """The op reaches the Triton kernels (interpreter on CPU), forward and backward (to x, and to
    dense kept values), with dense or 4-bit kept values, and agrees with the reference; no
    direction expands or dequantizes the weight, or forms the dense gradient, in torch."""
    pytest.importorskip("triton")
    values, indices, _ = _packed(24, 64, 2, 8)
    q4 = {}
    if group is not None:
        (qweight, scales, zeros), _ = _q4(values, group)
        values, q4 = qweight, dict(qscales=scales, qzeros=zeros, group_size=group)
    x = torch.randn(rows, 64, requires_grad=True)
    bias = torch.randn(24)
    grad = torch.randn(rows, 24)
    w = ops.nm_dense_weight(values, indices, 2, 8, 64, q4.get("qscales"), q4.get("qzeros"), q4.get("group_size"))
    out, dx = x.detach() @ w.t() + bias, grad @ w

    def expanded(*args, **kwargs):
        raise AssertionError("the triton backend expanded the weight in torch")

    if group is None:  # dense kept values train: their gradient too comes from a kernel (SDDMM)
        values = values.clone().requires_grad_()
        dvalues = torch.gather(grad.t() @ x.detach(), 1, kept_columns(indices, 2, 8, 64))
    monkeypatch.setattr(ops, "unpack_nm", expanded)
    monkeypatch.setattr(ops, "dequantize_reference", expanded)
    monkeypatch.setattr(ops, "kept_columns", expanded)
    with use_backend("triton"):
        y = ops.nm_linear(x, values, indices, bias, n=2, m=8, in_features=64, path=path, **q4)
        y.backward(grad)
    assert _rel(y, out) < 1e-5 and _rel(x.grad, dx) < 1e-5
    if group is None:
        assert _rel(values.grad, dvalues) < 1e-5


def test_backward_backend_reasons(monkeypatch):
    """The backward products run on Triton or the reference, never on a CUDA kernel (a pinned
    "cuda" is refused with the reason); a missing kernel makes Triton unsupported."""
    values, indices, _ = _packed(8, 32, 2, 4)
    grad = torch.randn(3, 8)
    assert ops._backward_backend("dx", grad.device) == "reference"  # automatic choice on CPU
    with use_backend("cuda"), pytest.raises(ValueError, match=r"no CUDA kernel for the backward \(dx\)"):
        ops.nm_linear_dx(grad, values, indices, 2, 4, 32)
    with use_backend("cuda"), pytest.raises(ValueError, match=r"no CUDA kernel for the backward \(dvalues\)"):
        ops.nm_linear_dvalues(grad, torch.randn(3, 32), indices, 2, 4, 32, torch.float32)
    monkeypatch.setitem(sys.modules, "lowrank_ops.kernels.sparse", types.ModuleType("lowrank_ops.kernels.sparse"))
    import lowrank_ops.kernels as kernel_pkg

    monkeypatch.delattr(kernel_pkg, "sparse", raising=False)
    with use_backend("triton"), pytest.raises(ValueError, match="Triton cannot launch|lacks nm_matmul_dx_q4"):
        ops._backward_backend("dx", grad.device, 32)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "x": a["x"].numpy()}, TypeError, "x: expected a torch.Tensor"),
        (lambda a: {**a, "x": a["x"].int()}, TypeError, "x: expected dtype"),
        (lambda a: {**a, "x": a["x"][:, :30]}, ValueError, "x: expected size 32 at dim -1"),
        (lambda a: {**a, "values": a["values"].half()}, TypeError, "values: expected dtype torch.float32 .that of x."),
        (lambda a: {**a, "values": a["values"][:, :10]}, ValueError, "values: expected size 16 at dim 1"),
        (lambda a: {**a, "indices": a["indices"].long()}, TypeError, "indices: expected dtype"),
        (lambda a: {**a, "indices": a["indices"][:4]}, ValueError, "indices: expected size 9 at dim 0"),
        (lambda a: {**a, "indices": torch.zeros(9, 3, dtype=torch.int32)}, ValueError, "indices: expected size 1 at dim 1"),
        (lambda a: {**a, "bias": torch.zeros(4)}, ValueError, "bias: expected size 9"),
        (lambda a: {**a, "bias": torch.zeros(9).half()}, TypeError, "bias: expected dtype"),
        (lambda a: {**a, "n": 4}, ValueError, "n: expected 1 <= n < m=4"),
        (lambda a: {**a, "m": 5}, ValueError, r"m: expected one of \[4, 8, 16\]"),
        (lambda a: {**a, "in_features": 30}, ValueError, "in_features: expected a positive multiple of m=4"),
        (lambda a: {**a, "in_features": 32.0}, ValueError, "in_features: expected a positive multiple"),
        (lambda a: {**a, "path": "fast"}, ValueError, "path: expected one of"),
    ],
)
def test_bad_inputs(change, error, match):
    values, indices, _ = _packed(9, 32, 2, 4)
    args = change(dict(x=torch.randn(3, 32), values=values, indices=indices, bias=None, n=2, m=4, in_features=32))
    with pytest.raises(error, match=match):
        ops.nm_linear(args.pop("x"), args.pop("values"), args.pop("indices"), args.pop("bias"), **args)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "qzeros": None}, ValueError, r"qscales/qzeros/group_size: .*need all three, got only \['qscales', 'group_size'\]"),
        (lambda a: {**a, "group_size": None}, ValueError, "need all three"),
        (lambda a: {**a, "group_size": 48}, ValueError, r"group_size: expected one of \[32, 64, 128\]"),
        (lambda a: {**a, "group_size": 32.0}, TypeError, "group_size: expected an int"),
        (lambda a: {**a, "values": a["values"].float()}, TypeError, "values: expected dtype in \\['torch.int32'\\]"),
        (lambda a: {**a, "values": a["values"][:, :3]}, ValueError, "values: expected size 4 at dim 1 .4-bit codes"),
        (lambda a: {**a, "qscales": a["qscales"].float()}, TypeError, "qscales: expected dtype"),
        (lambda a: {**a, "qzeros": a["qzeros"][:5]}, ValueError, "qzeros: expected size 9 at dim 0"),
        (lambda a: {**a, "qscales": a["qscales"].repeat(1, 2)}, ValueError, "qscales: expected size 1 at dim 1"),
        (lambda a: {**a, "qzeros": a["qzeros"].to("meta")}, ValueError, "qzeros: expected device cpu .that of x."),
        (lambda a: {**a, "group_size": 64}, ValueError, "values: expected size 8 at dim 1"),  # KK pads to 64: 8 words
    ],
)
def test_bad_q4_inputs(change, error, match):
    """4-bit kept values: KK = 16 in groups of 32 → codes (9, 4) int32, scales/zeros (9, 1) fp16."""
    values, indices, _ = _packed(9, 32, 2, 4)
    (qweight, scales, zeros), _ = _q4(values, 32)
    args = change(dict(x=torch.randn(3, 32), values=qweight, indices=indices, qscales=scales, qzeros=zeros,
                       group_size=32))
    with pytest.raises(error, match=match):
        ops.nm_linear(args.pop("x"), args.pop("values"), args.pop("indices"), n=2, m=4, in_features=32, **args)


# --------------------------------------------------------------------------- gpu lane
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 256])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_gpu_auto_dispatch_matches_reference(dtype, rows, n, m):
    values, indices, _ = _packed(256, 512, n, m, dtype)
    values, indices = values.cuda(), indices.cuda()
    x = torch.randn(rows, 512, device="cuda").to(dtype)
    bias = torch.randn(256, device="cuda").to(dtype)
    y = ops.nm_linear(x, values, indices, bias, n=n, m=m, in_features=512)
    ref = ops.nm_linear_reference(x, values, indices, bias, n, m, 512)
    assert bool(torch.isfinite(y).all()) and _rel(y, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_semi_structured_path_and_cache(dtype):
    values, indices, _ = _packed(256, 512, 2, 4, dtype)
    values, indices = values.cuda(), indices.cuda()
    x = torch.randn(300, 512, device="cuda").to(dtype)
    ref = ops.nm_linear_reference(x, values, indices, None, 2, 4, 512)
    y = ops.nm_linear(x, values, indices, n=2, m=4, in_features=512, path="semi_structured")
    assert _rel(y, ref) < 1e-2
    first = ops.semi_structured_weight(values, indices, 512)
    assert ops.semi_structured_weight(values, indices, 512) is first  # cached while unchanged
    values.mul_(2)  # an in-place update bumps the version counter: rebuilt, results follow
    assert ops.semi_structured_weight(values, indices, 512) is not first
    y2 = ops.nm_linear(x, values, indices, n=2, m=4, in_features=512, path="semi_structured")
    assert _rel(y2, 2 * ref) < 1e-2
    with pytest.raises(ValueError, match="path: 'semi_structured' was forced but cannot serve"):
        ops.nm_linear(x.float(), values.float(), indices, n=2, m=4, in_features=512, path="semi_structured")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 256])
@pytest.mark.parametrize("n,m", [(2, 4), (2, 8)])
def test_gpu_q4_auto_dispatch_and_backward_match_reference(dtype, rows, n, m):
    """4-bit kept values through the op on every automatic route (CUDA decode kernel at M ≤ 8,
    Triton decode, tile — 2:4 at 256 rows falls back from semi-structured), and dx by the Triton
    backward kernel."""
    values, indices, _ = _packed(256, 520, n, m)
    (qweight, scales, zeros), _ = _q4(values, 64)
    q4 = dict(qscales=scales.cuda(), qzeros=zeros.cuda(), group_size=64)
    qweight, indices = qweight.cuda(), indices.cuda()
    x = torch.randn(rows, 520, device="cuda").to(dtype).requires_grad_()
    bias = torch.randn(256, device="cuda").to(dtype)
    y = ops.nm_linear(x, qweight, indices, bias, n=n, m=m, in_features=520, **q4)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = ops.nm_dense_weight(qweight, indices, n, m, 520, q4["qscales"], q4["qzeros"], 64)
    assert bool(torch.isfinite(y).all()) and _rel(y, x.detach().float() @ w.t() + bias.float()) < 1e-2
    assert _rel(x.grad, grad.float() @ w) < 1e-2


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph():
    values, indices, _ = _packed(128, 256, 2, 8, torch.float16)
    layer = TinySparseLinear(values.cuda(), indices.cuda(), 2, 8, 256).half().cuda()
    x = torch.randn(4, 256, device="cuda").half()
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=2e-3, atol=2e-3)
        static_x = x.clone()
        layer(static_x)  # warm up outside the capture (autotuning, lazy imports)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(2 * x)
        graph.replay()
        torch.testing.assert_close(static_y, layer(2 * x), rtol=2e-3, atol=2e-3)
