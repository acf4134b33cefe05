"""Reference lane for the low-rank ops: math, autograd, opcheck, torch.compile, bad inputs."""
import pytest
import torch

from lowrank_ops import lora_linear, lowrank_linear, use_backend
from lowrank_ops.lowrank import ops

DTYPE_TOL = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def factors(n, k, r, dtype, bias=True):
    v = torch.randn(r, k, dtype=dtype) / k**0.5
    u = torch.randn(n, r, dtype=dtype) / r**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    return v, u, b


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("shape", [(1, 37, 19, 5), (3, 64, 50, 16), (17, 100, 33, 33)])
def test_lowrank_matches_float64(dtype, tol, shape):
    m, k, n, r = shape
    x = torch.randn(2, m, k, dtype=dtype)
    v, u, b = factors(n, k, r, dtype)
    y = lowrank_linear(x, v, u, b)
    assert y.shape == (2, m, n) and y.dtype == dtype
    ref = (x.double() @ v.double().t()) @ u.double().t() + b.double()
    assert rel(y, ref) < tol


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_lora_matches_float64(dtype, tol):
    x = torch.randn(5, 41, dtype=dtype)
    w = torch.randn(23, 41, dtype=dtype) / 41**0.5
    v, u, b = factors(23, 41, 4, dtype)
    y = lora_linear(x, w, v, u, 0.5, b)
    xd = x.double()
    ref = xd @ w.double().t() + 0.5 * (xd @ v.double().t()) @ u.double().t() + b.double()
    assert rel(y, ref) < tol


def test_lowrank_gradients_match_autograd_of_reference():
    x = torch.randn(7, 30, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 30, dtype=torch.float64, requires_grad=True)
    u = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    # float64 is not a kernel dtype: run the op's autograd formula on float32 copies
    leaves = [t.detach().float().requires_grad_() for t in (x, v, u, b)]
    g = torch.randn(7, 11)
    lowrank_linear(*leaves).backward(g)
    ((x @ v.t()) @ u.t() + b).backward(g.double())
    for mine, ref in zip(leaves, (x, v, u, b)):
        assert rel(mine.grad, ref.grad) < 1e-5


def test_lora_gradients_match_autograd_of_reference():
    x, w, a, b, bias = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(6, 20), (9, 20), (3, 20), (9, 3), (9,)])
    leaves = [t.detach().float().requires_grad_() for t in (x, w, a, b, bias)]
    g = torch.randn(6, 9)
    lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], 1.5, leaves[4]).backward(g)
    (x @ w.t() + 1.5 * (x @ a.t()) @ b.t() + bias).backward(g.double())
    for mine, ref in zip(leaves, (x, w, a, b, bias)):
        assert rel(mine.grad, ref.grad) < 1e-5


def test_frozen_inputs_get_no_gradient_work():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8)  # frozen base
    a, b = torch.randn(2, 8, requires_grad=True), torch.zeros(5, 2, requires_grad=True)
    lora_linear(x, w, a, b, 2.0).sum().backward()
    assert w.grad is None and x.grad is not None and b.grad is not None
    assert torch.count_nonzero(a.grad) == 0  # B = 0 at LoRA init: no signal reaches A yet


def test_opcheck_lowrank_and_lora():
    x = torch.randn(5, 24, requires_grad=True)
    v, u, b = (t.requires_grad_() for t in factors(12, 24, 4, torch.float32))
    torch.library.opcheck(ops._lowrank_linear_op, (x, v, u, b))
    torch.library.opcheck(ops._lowrank_linear_op, (x, v, u, None))
    w = torch.randn(12, 24)
    torch.library.opcheck(ops._lora_linear_op, (x, w, v, u, 0.5, b))


def test_torch_compile_fullgraph_has_no_graph_break():
    from lowrank_ops import LoRALinear, LowRankLinear

    model = torch.nn.Sequential(
        LowRankLinear(16, 32, rank=4), torch.nn.GELU(), LoRALinear.from_linear(torch.nn.Linear(32, 8), rank=2)
    )
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()  # the backward graph compiles too
    assert model[0].u.grad is not None


def test_pinned_reference_backend_runs_on_cpu():
    x = torch.randn(3, 8)
    v, u, b = factors(4, 8, 2, torch.float32)
    with use_backend("reference"):
        torch.testing.assert_close(lowrank_linear(x, v, u, b), ops.lowrank_reference(x, v, u, b))
    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend 'cuda'"):
        lowrank_linear(x, v, u, b)


def test_dispatch_follows_the_measured_thresholds():
    """The routes the H100 measurements picked (see the thresholds' comments in ops.py)."""
    assert ops.lowrank_path(1, 4096, 4096, 64) == "decode"
    assert ops.lowrank_path(1, 4096, 4096, 65) == "two_gemm"
    assert ops.lowrank_path(2, 4096, 4096, 16) == "two_gemm"
    assert ops.lowrank_path(64, 4096, 4096, 64) == "two_gemm"
    assert ops.lowrank_path(4096, 4096, 4096, 1024) == "two_gemm"
    assert [ops.lora_path(m) for m in (1, 16, 17, 4096)] == ["unfused", "unfused", "fused", "fused"]


def test_unfused_lora_route_matches_the_reference(monkeypatch):
    """The cuBLAS-style LoRA route (small batches) computes the same sum as the reference."""
    x, w, a, b = (torch.randn(*s) for s in ((3, 8), (5, 8), (2, 8), (5, 2)))
    bias = torch.randn(5)
    monkeypatch.setattr(ops.backend, "select_backend", lambda op, support, device: "triton")
    torch.testing.assert_close(ops.lora_linear(x, w, a, b, 0.5, bias), ops.lora_reference(x, w, a, b, 0.5, bias))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, v, u: lowrank_linear(x.numpy(), v, u), TypeError, "x: expected a torch.Tensor"),
        (lambda x, v, u: lowrank_linear(x.int(), v, u), TypeError, "x: expected dtype"),
        (lambda x, v, u: lowrank_linear(x[:, :5], v, u), ValueError, "x: expected size 8 at dim -1"),
        (lambda x, v, u: lowrank_linear(x, v, u[:, :1]), ValueError, "u: expected size 2 at dim 1"),
        (lambda x, v, u: lowrank_linear(x, v.double(), u), TypeError, "v: expected dtype"),
        (lambda x, v, u: lowrank_linear(x, v, u.half()), TypeError, "v: expected dtype torch.float16"),
        (lambda x, v, u: lowrank_linear(x.half(), v, u), TypeError, "x: expected dtype torch.float32"),
        (lambda x, v, u: lowrank_linear(x, v[0], u), ValueError, "v: expected 2 dimensions"),
        (lambda x, v, u: lowrank_linear(x, v, u, torch.zeros(3)), ValueError, "bias: expected size 4"),
        (lambda x, v, u: lora_linear(x, torch.zeros(4, 8), v, u, scale="a"), TypeError, "scale"),
        (lambda x, v, u: lora_linear(x, torch.zeros(4, 7), v, u), ValueError, "a: expected size 7"),
    ],
)
def test_bad_inputs(call, error, match):
    x = torch.randn(3, 8)
    v, u, _ = factors(4, 8, 2, torch.float32)
    with pytest.raises(error, match=match):
        call(x, v, u)
