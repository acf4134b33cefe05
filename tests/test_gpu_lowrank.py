"""GPU lane for the low-rank ops: real LLM shapes on a CUDA device, every backend and Triton path.

Run by ``bench/device_check.sh`` on a lent GPU (``pytest -m gpu tests/``); skipped without CUDA
(conftest.py). Every backend is compared with a float64 reference of the *same* factors:
‖out − ref‖ / ‖ref‖ < 2e-3 (fp16), 1e-2 (bf16), 1e-5 (fp32, Triton decode/fused with ieee dots).
Also: ``torch.compile(fullgraph=True)``, CUDA-graph capture and replay, gradients, opcheck.

``LOWRANK_OPS_REQUIRE_CUDA_EXT=1`` (set by the device check, where nvcc built csrc/) turns
"CUDA extension unavailable" from a skip into a failure.

The case lists are kept short on purpose: each new (shape, power-of-two M bucket, dtype) makes
Triton autotune a kernel, and the whole device check has a few minutes.
"""
from __future__ import annotations

import os

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.lowrank import ops
from lowrank_ops.lowrank.ops import lora_linear, lowrank_linear
from kernel_lane import capture_graph

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-4}
REQUIRE_CUDA_EXT = os.environ.get("LOWRANK_OPS_REQUIRE_CUDA_EXT") == "1"

# (N, K, rank): N = out_features, K = in_features
S_LLM = (4096, 4096, 512)  # a Llama-7B attention projection at 25 % of its parameters
S_FUSED = (4096, 4096, 256)  # largest rank the fused path takes
S_ODD = (4000, 4100, 200)  # nothing a multiple of the block sizes
M_ALL = (1, 7, 16, 64, 300)
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# --------------------------------------------------------------------------- helpers
def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def make(m: int, shape: tuple[int, int, int], dtype: torch.dtype, bias: bool = True):
    """Fresh random x (m, K), V (r, K), U (N, r), bias (N,) on the GPU, outputs of order 1."""
    n, k, r = shape
    x = torch.randn(m, k, device=DEV).to(dtype)
    v = (torch.randn(r, k, device=DEV) / k**0.5).to(dtype)
    u = (torch.randn(n, r, device=DEV) / r**0.5).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype) if bias else None
    return x, v, u, b


def ref64(x, v, u, b):
    y = (x.double() @ v.double().t()) @ u.double().t()
    return y + b.double() if b is not None else y


def make_lora(m: int, n: int, k: int, r: int, dtype: torch.dtype, bias: bool = False):
    x = torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    a = (torch.randn(r, k, device=DEV) / k**0.5).to(dtype)
    b = (torch.randn(n, r, device=DEV) / r**0.5).to(dtype)
    bias_t = torch.randn(n, device=DEV).to(dtype) if bias else None
    return x, w, a, b, bias_t


def lora_ref64(x, w, a, b, scale, bias):
    xd = x.double()
    y = xd @ w.double().t() + scale * ((xd @ a.double().t()) @ b.double().t())
    return y + bias.double() if bias is not None else y


def cuda_ext_or_skip(x: torch.Tensor, rank: int) -> None:
    """Skip unless the CUDA decode kernel serves (x, rank); fail instead when it must exist."""
    try:
        from lowrank_ops.lowrank import cuda_decode

        verdict = cuda_decode.supports(x, rank)
        ok, why = bool(verdict.ok), getattr(verdict, "why", "")
    except Exception as exc:  # module missing or extension failed to load
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok and not REQUIRE_CUDA_EXT:
        pytest.skip(f"cuda backend does not serve this call: {why}")
    assert ok, f"the CUDA decode kernel must serve this call (LOWRANK_OPS_REQUIRE_CUDA_EXT=1): {why}"


def check_output(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    assert y.dtype == dtype and y.shape == ref.shape and y.device.type == "cuda"
    assert torch.isfinite(y).all(), "non-finite output"
    err = rel(y, ref)
    assert err < (tol if tol is not None else TOL[dtype]), f"relative error {err:.2e}"


@pytest.fixture
def force_path(monkeypatch):
    """Force the Triton route: ``force_path("fused")`` (ops looks lowrank_path up per call)."""

    def force(path: str) -> None:
        monkeypatch.setattr(ops, "lowrank_path", lambda m, n, k, rank: path)

    return force


# --------------------------------------------------------------------------- the CUDA extension
def test_cuda_extension_serves_decode_shapes():
    """On the device check (REQUIRE set) the CUDA decode kernel must be built and loadable."""
    cuda_ext_or_skip(torch.empty(1, S_LLM[1], device=DEV, dtype=F16), S_LLM[2])


# --------------------------------------------------------------------------- lowrank_linear accuracy
TRITON_CASES = (
    [("decode", S_LLM, F16, m) for m in (1, 7, 16)]
    + [("decode", S_ODD, F16, m) for m in (1, 7, 16)]
    + [("decode", S_LLM, BF16, m) for m in (1, 16)]
    + [("fused", S_FUSED, F16, m) for m in M_ALL]
    + [("fused", S_ODD, F16, m) for m in (7, 300)]
    + [("fused", S_FUSED, BF16, m) for m in (16, 300)]
    + [("two_gemm", S_LLM, F16, m) for m in M_ALL]
    + [("two_gemm", S_LLM, BF16, 64)]
    + [("decode", S_ODD, F32, m) for m in (1, 16)]
    + [("fused", S_FUSED, F32, m) for m in (7, 64)]
)


def _id(case) -> str:
    path, (n, k, r), dtype, m = case
    return f"{path}-{n}x{k}r{r}-{str(dtype).replace('torch.', '')}-M{m}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_triton_path_matches_float64(case, force_path):
    path, shape, dtype, m = case
    force_path(path)
    x, v, u, b = make(m, shape, dtype, bias=(m % 2 == 1))
    with use_backend("triton"):
        y = lowrank_linear(x, v, u, b)
    check_output(y, ref64(x, v, u, b), dtype)


@pytest.mark.parametrize("dtype,m", [(F16, m) for m in M_ALL] + [(BF16, 1), (BF16, 300)])
def test_triton_auto_path_matches_float64(dtype, m):
    x, v, u, b = make(m, S_LLM, dtype)
    with use_backend("triton"):
        y = lowrank_linear(x, v, u, b)
    check_output(y, ref64(x, v, u, b), dtype)


@pytest.mark.parametrize(
    "shape,dtype,m",
    [(S_LLM, F16, m) for m in (1, 7, 16)] + [(S_LLM, BF16, m) for m in (1, 7, 16)] + [(S_ODD, F16, m) for m in (1, 7)],
    ids=lambda p: str(p).replace("torch.", "") if not isinstance(p, tuple) else "x".join(map(str, p)),
)
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_backend_matches_float64(shape, dtype, m, bias):
    x, v, u, b = make(m, shape, dtype, bias=bias)
    cuda_ext_or_skip(x, shape[2])
    with use_backend("cuda"):
        y = lowrank_linear(x, v, u, b)
    check_output(y, ref64(x, v, u, b), dtype)


@pytest.mark.parametrize("m", [1, 300])
def test_reference_backend_on_cuda(m):
    x, v, u, b = make(m, S_LLM, F16)
    with use_backend("reference"):
        y = lowrank_linear(x, v, u, b)
    check_output(y, ref64(x, v, u, b), F16)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_automatic_dispatch_on_cuda(m):
    """No pin: whatever the dispatch picks (cuda for decode when built, else Triton) is right."""
    x, v, u, b = make(m, S_LLM, F16)
    y = lowrank_linear(x.view(1, m, -1), v, u, b)  # leading dims are flattened and restored
    assert y.shape == (1, m, S_LLM[0])
    check_output(y[0], ref64(x, v, u, b), F16)


# --------------------------------------------------------------------------- lora_linear accuracy
LORA_CASES = (
    [(16, F16, m) for m in (1, 7, 64, 300)]
    + [(64, F16, m) for m in (1, 300)]
    + [(16, BF16, m) for m in (16, 300)]
    + [(64, F32, 7)]
)


@pytest.mark.parametrize("r,dtype,m", LORA_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_lora_triton_matches_float64(r, dtype, m, monkeypatch):
    monkeypatch.setattr(ops, "lora_path", lambda m: "fused")  # the kernel at every batch size
    x, w, a, b, bias = make_lora(m, 4096, 4096, r, dtype, bias=(m % 2 == 1))
    with use_backend("triton"):
        y = lora_linear(x, w, a, b, 0.5, bias)
    # fp32: the base x Wᵀ is a K=4096 dot; ieee fp32 accumulation lands near 1e-6
    check_output(y, lora_ref64(x, w, a, b, 0.5, bias), dtype)


def test_lora_automatic_dispatch_on_cuda():
    x, w, a, b, bias = make_lora(16, 4096, 4096, 16, F16, bias=True)
    y = lora_linear(x, w, a, b, 2.0, bias)
    check_output(y, lora_ref64(x, w, a, b, 2.0, bias), F16)


# --------------------------------------------------------------------------- torch.compile
class _Block(torch.nn.Module):
    """A low-rank projection feeding a LoRA-adapted one, as in a compressed MLP."""

    def __init__(self, k: int, hidden: int, rank: int, out: int, lora_rank: int, dtype: torch.dtype):
        super().__init__()
        self.v = torch.nn.Parameter(torch.randn(rank, k, device=DEV).div(k**0.5).to(dtype))
        self.u = torch.nn.Parameter(torch.randn(hidden, rank, device=DEV).div(rank**0.5).to(dtype))
        self.bias = torch.nn.Parameter(torch.randn(hidden, device=DEV).to(dtype))
        self.w = torch.nn.Parameter(torch.randn(out, hidden, device=DEV).div(hidden**0.5).to(dtype))
        self.a = torch.nn.Parameter(torch.randn(lora_rank, hidden, device=DEV).div(hidden**0.5).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(out, lora_rank, device=DEV).div(lora_rank**0.5).to(dtype))

    def forward(self, x):
        h = torch.nn.functional.gelu(lowrank_linear(x, self.v, self.u, self.bias))
        return lora_linear(h, self.w, self.a, self.b, 0.5) + 1.0


@pytest.mark.parametrize("m", [4, 96])  # decode path and tile path inside one compiled graph each
def test_torch_compile_fullgraph(m):
    torch._dynamo.reset()
    block = _Block(1024, 2048, 128, 1024, 16, F16)
    x = torch.randn(2, m // 2, 1024, device=DEV, dtype=F16)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)  # fullgraph: a graph break raises
    with torch.no_grad():
        eager = block(x)
        out = compiled(x)
    assert out.shape == eager.shape == (2, m // 2, 1024)
    assert torch.isfinite(out).all()
    assert rel(out, eager.double()) < 2e-3


# --------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("backend,m", [("auto", 1), ("auto", 64), ("triton", 1), ("triton", 7), ("triton", 300),
                                       ("cuda", 1), ("cuda", 16)])
def test_cuda_graph_capture_and_replay(backend, m):
    x, v, u, b = make(m, S_LLM, F16)
    if backend == "cuda":
        cuda_ext_or_skip(x, S_LLM[2])
    with use_backend(backend):
        graph, y_static = capture_graph(lambda: lowrank_linear(x, v, u, b))
    for _ in range(2):  # replay on fresh inputs copied into the captured buffer
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        with use_backend(backend):
            eager = lowrank_linear(x, v, u, b)
        check_output(y_static, ref64(x, v, u, b), F16)
        assert rel(y_static, eager.double()) < 1e-3


def test_cuda_graph_lora():
    x, w, a, b, bias = make_lora(16, 4096, 4096, 16, F16, bias=True)
    with use_backend("triton"):
        graph, y_static = capture_graph(lambda: lora_linear(x, w, a, b, 0.5, bias))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check_output(y_static, lora_ref64(x, w, a, b, 0.5, bias), F16)


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype,m", [(F32, 16), (F32, 64), (F16, 7), (F16, 300)])
def test_lowrank_gradients_on_gpu(dtype, m):
    x, v, u, b = make(m, S_LLM, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, v, u, b)]
    refs = [t.detach().double().requires_grad_() for t in (x, v, u, b)]
    g = torch.randn(m, S_LLM[0], device=DEV)
    y = lowrank_linear(*leaves)
    y.backward(g.to(dtype))
    ((refs[0] @ refs[1].t()) @ refs[2].t() + refs[3]).backward(g.double())
    check_output(y.detach(), ref64(x, v, u, b), dtype, tol=max(TOL[dtype], 1e-5))
    for name, mine, ref in zip("xvub", leaves, refs):
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        err = rel(mine.grad, ref.grad)
        assert err < GRAD_TOL[dtype], f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [F32, F16])
def test_lora_gradients_on_gpu(dtype):
    m, n, k, r = 64, 4096, 4096, 16
    x, w, a, b, bias = make_lora(m, n, k, r, dtype, bias=True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, a, b, bias)]
    refs = [t.detach().double().requires_grad_() for t in (x, w, a, b, bias)]
    g = torch.randn(m, n, device=DEV)
    lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], 0.5, leaves[4]).backward(g.to(dtype))
    xd, wd, ad, bd, biasd = refs
    (xd @ wd.t() + 0.5 * ((xd @ ad.t()) @ bd.t()) + biasd).backward(g.double())
    for name, mine, ref in zip(("x", "w", "a", "b", "bias"), leaves, refs):
        err = rel(mine.grad, ref.grad)
        assert err < GRAD_TOL[dtype], f"d{name}: relative error {err:.2e}"


# --------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("backend,dtype,m", [("auto", F16, 1), ("auto", F32, 64), ("triton", F32, 1),
                                             ("triton", F32, 64), ("reference", F32, 7), ("cuda", F16, 7)])
def test_opcheck_lowrank_on_cuda(backend, dtype, m):
    x, v, u, b = make(m, (512, 768, 64), dtype)
    if backend == "cuda":
        cuda_ext_or_skip(x, 64)
    args = tuple(t.requires_grad_() for t in (x, v, u, b))
    with use_backend(backend):
        torch.library.opcheck(torch.ops.lowrank_ops.lowrank_linear.default, args)
        torch.library.opcheck(torch.ops.lowrank_ops.lowrank_linear.default, (x, v, u, None))


@pytest.mark.parametrize("m", [1, 64])
def test_opcheck_lora_on_cuda(m):
    x, w, a, b, bias = make_lora(m, 512, 768, 16, F32, bias=True)
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.lowrank_ops.lora_linear.default,
                              tuple(t.requires_grad_() for t in (x, w, a, b)) + (0.5, bias.requires_grad_()))
