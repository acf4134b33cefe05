"""Interpreter lane: the low-rank Triton kernels against a float64 reference of the same factors.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or
on a CUDA device. Every buffer the launchers allocate is filled with NaN first, so an output
element a kernel fails to write shows up as NaN. Shapes are small and odd (K and N not
multiples of any block, M = 1, 3, 17, 40); each (path, shape) runs in all three dtypes.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, DTYPES, MARKS, assert_close, poison_allocations  # noqa: E402

pytestmark = MARKS

import lowrank_ops.lowrank.ops as ops  # noqa: E402
from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import lowrank as kernels  # noqa: E402


# (M, K, N, R, bias): K and N off every block size; R from 1 to the path's limit.
FUSED_SHAPES = [
    (1, 37, 19, 5, True),
    (3, 100, 50, 33, False),
    (17, 100, 19, 16, True),
    (40, 37, 130, 1, False),  # two row blocks, N split in two runs of N-blocks
    (3, 37, 19, 256, True),  # the fused path's largest rank
]
DECODE_SHAPES = FUSED_SHAPES[:4] + [
    (3, 100, 50, 300, True),  # rank over several BLOCK_R chunks, masked last chunk
    (1, 37, 19, 1024, False),  # largest decode rank tested
]
LORA_SHAPES = [
    (1, 37, 19, 5, True, 0.5),
    (3, 100, 50, 33, False, -2.0),
    (17, 37, 19, 1, True, 1.0),
    (40, 100, 130, 16, False, 0.25),
    (3, 37, 19, kernels.LORA_MAX_RANK, True, 1.5),
]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


@pytest.fixture
def triton_backend():
    """Pin the triton backend for the public ops."""
    with use_backend("triton"):
        yield


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def lowrank_factors(m, k, n, r, bias, dtype):
    x = rand(m, k, dtype=dtype)
    v = rand(r, k, dtype=dtype, scale=k**-0.5)
    u = rand(n, r, dtype=dtype, scale=r**-0.5)
    b = rand(n, dtype=dtype) if bias else None
    return x, v, u, b


def f64(t):
    return None if t is None else t.detach().double().cpu()


def lowrank_ref(x, v, u, b):
    y = (f64(x) @ f64(v).t()) @ f64(u).t()
    return y if b is None else y + f64(b)


def lora_ref(x, w, a, b, scale, bias):
    y = f64(x) @ f64(w).t() + scale * ((f64(x) @ f64(a).t()) @ f64(b).t())
    return y if bias is None else y + f64(bias)




def _ids(shapes):
    return ["M{}_K{}_N{}_R{}_{}".format(*s[:4], "bias" if s[4] else "nobias") for s in shapes]


# --------------------------------------------------------------------------- kernels, direct
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "path,shape",
    [("fused", s) for s in FUSED_SHAPES] + [("decode", s) for s in DECODE_SHAPES],
    ids=[f"fused-{i}" for i in _ids(FUSED_SHAPES)] + [f"decode-{i}" for i in _ids(DECODE_SHAPES)],
)
def test_lowrank_matmul(path, shape, dtype, poisoned):
    x, v, u, b = lowrank_factors(*shape, dtype)
    y = kernels.lowrank_matmul(x, v, u, b, path=path)
    assert poisoned, "the launcher allocated nothing through kernels._empty: poisoning is not in effect"
    assert y.dtype == dtype
    assert_close(y, lowrank_ref(x, v, u, b), dtype, f"{path} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=[f"{i}_s{s[5]}" for i, s in zip(_ids(LORA_SHAPES), LORA_SHAPES)])
def test_lora_matmul(shape, dtype, poisoned):
    m, k, n, r, bias, scale = shape
    x, a, b, bias_t = lowrank_factors(m, k, n, r, bias, dtype)
    w = rand(n, k, dtype=dtype, scale=k**-0.5)
    y = kernels.lora_matmul(x, w, a, b, scale, bias_t)
    assert poisoned
    assert y.dtype == dtype
    assert_close(y, lora_ref(x, w, a, b, scale, bias_t), dtype, f"lora {shape}")


def test_limits_and_bad_path():
    x, v, u, _ = lowrank_factors(2, 16, 16, kernels.FUSED_MAX_RANK + 1, False, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        kernels.lowrank_matmul(x, v, u, None, path="fused")
    with pytest.raises(ValueError, match="path"):
        kernels.lowrank_matmul(x, v, u, None, path="two_gemm")
    x, a, b, _ = lowrank_factors(2, 16, 16, kernels.LORA_MAX_RANK + 1, False, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        kernels.lora_matmul(x, torch.zeros(16, 16), a, b, 1.0, None)


# --------------------------------------------------------------------------- public ops, triton pinned
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lead,k,n,r,bias,path",
    [
        ((2, 3), 37, 19, 5, True, "decode"),  # 6 rows: within the decode kernel's 16
        ((40,), 100, 50, 33, False, "fused"),
        ((17,), 37, 19, 64, True, "fused"),
        ((17,), 37, 19, 256, True, "two_gemm"),
    ],
)
def test_lowrank_linear_triton(lead, k, n, r, bias, path, dtype, triton_backend, monkeypatch):
    """Each Triton route through the pinned public op (the route forced; dispatch is tested apart)."""
    monkeypatch.setattr(ops, "lowrank_path", lambda m, n, k, rank: path)
    taken = []
    real = kernels.lowrank_matmul
    monkeypatch.setattr(kernels, "lowrank_matmul", lambda *a, path: taken.append(path) or real(*a, path=path))
    x = rand(*lead, k, dtype=dtype)
    _, v, u, b = lowrank_factors(1, k, n, r, bias, dtype)
    y = ops.lowrank_linear(x, v, u, b)
    assert taken == ([] if path == "two_gemm" else [path])
    assert y.shape == (*lead, n)
    assert_close(y.reshape(-1, n), lowrank_ref(x.reshape(-1, k), v, u, b), dtype, f"lowrank_linear {path}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_triton(dtype, triton_backend):
    x = rand(2, 9, 37, dtype=dtype)
    w = rand(50, 37, dtype=dtype, scale=37**-0.5)
    _, a, b, bias = lowrank_factors(1, 37, 50, 7, True, dtype)
    y = ops.lora_linear(x, w, a, b, scale=0.75, bias=bias)
    assert y.shape == (2, 9, 50)
    assert_close(y.reshape(-1, 50), lora_ref(x.reshape(-1, 37), w, a, b, 0.75, bias), dtype, "lora_linear")


def _grads_vs_float64(fn, inputs):
    """Run ``fn`` on fp32 leaves (triton) and on float64 copies (torch autograd); compare every grad."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [f64(t).requires_grad_() for t in inputs]
    y = fn(*leaves)
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_out.to(y.dtype).to(y.device))
    ref_y = fn(*ref_leaves, reference=True)
    ref_y.backward(grad_out)
    assert_close(y, ref_y.detach(), torch.float32, "forward")
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        assert leaf.grad is not None, f"input {i}: no gradient"
        assert_close(leaf.grad, ref_leaf.grad, torch.float32, f"grad of input {i}")


@pytest.mark.parametrize("m,path", [(3, "decode"), (40, "fused")], ids=["decode", "fused"])
def test_lowrank_linear_grads(m, path, triton_backend, monkeypatch):
    monkeypatch.setattr(ops, "lowrank_path", lambda m, n, k, rank: path)

    def fn(x, v, u, b, reference=False):
        return (x @ v.t()) @ u.t() + b if reference else ops.lowrank_linear(x, v, u, b)

    _grads_vs_float64(fn, lowrank_factors(m, 37, 19, 5, True, torch.float32))


def test_lora_linear_grads(triton_backend):  # 17 rows: the fused LoRA kernel
    def fn(x, w, a, b, bias, reference=False):
        return x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + bias if reference else ops.lora_linear(x, w, a, b, 0.5, bias)

    x, a, b, bias = lowrank_factors(17, 37, 19, 5, True, torch.float32)
    _grads_vs_float64(fn, (x, rand(19, 37, dtype=torch.float32, scale=37**-0.5), a, b, bias))
