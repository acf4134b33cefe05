"""GPU lane for ``quant_linear``'s Triton paths (pytest -m gpu; collected and skipped without CUDA).

On the real benchmark shape 4096×4096: the ``decode`` (M ≤ 16) and ``tile`` paths, automatic and
forced, against a float64 product with the reference dequantization, for 3/4 bits, uniform and
LUT codes, second-level statistics (3-bit g32), 1 % outliers and rank-64 compensation, M ∈ {1, 7, 16, 64, 300}, fp16 and bf16; the
backward to x from the packed weight. Also:
``torch.compile(fullgraph=True)`` of a module built on :class:`QuantLinear` (a graph break
raises) and CUDA-graph capture and replay of the op.

Formats are RTN/LUT-quantized once per configuration on the GPU (module cache) to keep the lane
fast: every (constexpr set, M bucket, dtype) is a Triton compile + autotune.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.quant import ops
from lowrank_ops.quant.ops import quant_linear
from kernel_lane import capture_graph

pytestmark = pytest.mark.gpu

DEV = "cuda"
F16, BF16 = torch.float16, torch.bfloat16
TOL = {F16: 2e-3, BF16: 1e-2}
N = K = 4096
M_ALL = (1, 7, 16, 64, 300)
# name -> quantize() options
CONFIGS = {
    "4b": dict(bits=4, method="rtn"),
    "3b": dict(bits=3, method="rtn"),
    "4b-lut": dict(bits=4, method="lut"),
    "3b-lut": dict(bits=3, method="lut"),
    "4b+1%": dict(bits=4, method="rtn", outliers=0.01),
    "3b+1%": dict(bits=3, method="rtn", outliers=0.01),
    "4b+r64": dict(bits=4, method="rtn", lowrank_rank=64),
    "3b+1%+r64": dict(bits=3, method="rtn", outliers=0.01, lowrank_rank=64),
    "3b-g32-qstats": dict(bits=3, method="rtn", group_size=32, quantize_stats=True),
}


@functools.lru_cache(maxsize=None)
def fmt_of(name: str):
    from lowrank_ops.quant.compress import quantize

    gen = torch.Generator(device=DEV)
    gen.manual_seed(sum(map(ord, name)))
    w = torch.randn(N, K, device=DEV, generator=gen).div(K**0.5).half()
    return quantize(w, dtype=F16, **{"group_size": 128, **CONFIGS[name]})


@functools.lru_cache(maxsize=None)
def dense_of(name: str) -> torch.Tensor:
    """Ŵ_total (N, K) in float64, from the reference dequantization."""
    fmt = fmt_of(name)
    w = ops.dequantize_reference(*tensors(name), bits=fmt.bits, group_size=fmt.group_size, in_features=K)
    return w.double()


def tensors(name: str) -> tuple:
    return fmt_of(name).op_tensors()


def run(name: str, x: torch.Tensor, bias=None) -> torch.Tensor:
    fmt = fmt_of(name)
    return quant_linear(x, *tensors(name), bias, bits=fmt.bits, group_size=fmt.group_size, in_features=K)


def ref64(name: str, x: torch.Tensor, bias=None) -> torch.Tensor:
    y = x.double().reshape(-1, K) @ dense_of(name).t()
    return (y if bias is None else y + bias.double()).reshape(*x.shape[:-1], N)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert y.dtype == dtype and y.shape == ref.shape and y.device.type == torch.device(DEV).type, what
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = rel(y, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:g}"


def make_x(m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed + m)
    return torch.randn(m, K, device=DEV, generator=gen).to(dtype)


@pytest.fixture
def force_path(monkeypatch):
    def force(path: str) -> None:
        monkeypatch.setattr(ops, "quant_path", lambda m, n, k: path)

    return force


# --------------------------------------------------------------------------- accuracy
# every M for the four that between them cover bits 3/4, uniform/LUT, outliers and rank; the rest at
# one decode and one tile size (each new constexpr set × M bucket × dtype costs a compile + autotune)
FULL_M = ("4b", "3b-lut", "4b+1%", "3b+1%+r64")
AUTO_CASES = ([(name, F16, m) for name in FULL_M for m in M_ALL]
              + [(name, F16, m) for name in CONFIGS if name not in FULL_M for m in (1, 64)]
              + [(name, BF16, m) for name in ("4b", "3b-lut", "3b+1%+r64") for m in (1, 300)])


@pytest.mark.parametrize("name,dtype,m", AUTO_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_triton_auto_path_matches_float64(name, dtype, m):
    x = make_x(m, dtype)
    bias = torch.randn(N, device=DEV).to(dtype) if m % 2 else None
    with use_backend("triton"):
        y = run(name, x, bias)
    check(y, ref64(name, x, bias), dtype, f"{name} {ops.quant_path(m, N, K)} M={m}")


# the other paths, forced: tile at decode sizes, decode (correct for any M) at M = 64, dequant
# (opt-in, ops.DEQUANT_MIN_M) at small and large M and in every mode
FORCED_CASES = ([("tile", name, F16, m) for name in FULL_M for m in (1, 7)]
                + [("tile", "4b+r64", BF16, 1)]
                + [("decode", name, F16, 64) for name in ("3b", "4b-lut", "4b+r64")]
                + [("dequant", name, F16, 7) for name in ("3b-lut", "3b-g32-qstats", "4b+1%")]
                + [("dequant", name, F16, 300) for name in ("4b", "3b+1%+r64")]
                + [("dequant", "3b+1%+r64", BF16, 64)])


@pytest.mark.parametrize("path,name,dtype,m", FORCED_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_triton_forced_path_matches_float64(path, name, dtype, m, force_path):
    force_path(path)
    x = make_x(m, dtype, seed=1)
    with use_backend("triton"):
        y = run(name, x)
    check(y, ref64(name, x), dtype, f"{name} forced {path} M={m}")


# --------------------------------------------------------------------------- backward to x
@pytest.mark.parametrize("name,dtype,m", [("4b", F16, 64), ("3b+1%+r64", F16, 300), ("3b-lut", BF16, 7),
                                           ("3b-g32-qstats", BF16, 17)],
                         ids=lambda p: str(p).replace("torch.", ""))
def test_backward_to_x_from_the_packed_weight(name, dtype, m):
    """dx = dy · Ŵ_total through the Triton dx kernel (+ sparse outliers + low-rank) vs float64."""
    x = make_x(m, dtype, seed=2).requires_grad_()
    dy = make_x(m, dtype, seed=3)[:, :N].contiguous()
    with use_backend("triton"):
        run(name, x).backward(dy)
    check(x.grad, dy.double() @ dense_of(name), dtype, f"{name} dx M={m}")


def test_batched_leading_dims():
    x = make_x(12, F16).reshape(3, 4, K)
    with use_backend("triton"):
        y = run("4b+1%", x)
    assert y.shape == (3, 4, N)
    check(y, ref64("4b+1%", x), F16)


# --------------------------------------------------------------------------- torch.compile
class _QuantMLP(torch.nn.Module):
    """Two QuantLinear layers around a GELU, as in a quantized MLP block."""

    def __init__(self):
        super().__init__()
        from lowrank_ops.quant.layer import QuantLinear

        up = torch.nn.Linear(K, 1024, bias=True, device=DEV, dtype=F16)
        down = torch.nn.Linear(1024, K, bias=False, device=DEV, dtype=F16)
        self.up = QuantLinear.from_linear(up, bits=4, method="rtn", outliers=0.01, lowrank_rank=16)
        self.down = QuantLinear.from_linear(down, bits=3, lut=True)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + 1.0


@pytest.mark.parametrize("m", [4, 96])  # decode path and tile path inside one compiled graph each
def test_torch_compile_fullgraph(m):
    torch._dynamo.reset()
    block = _QuantMLP()
    x = torch.randn(2, m // 2, K, device=DEV, dtype=F16)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)  # fullgraph: a graph break raises
    with torch.no_grad():
        eager = block(x)
        out = compiled(x)
    assert out.shape == eager.shape == (2, m // 2, K)
    assert torch.isfinite(out).all()
    assert rel(out, eager.double()) < 2e-3


# --------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("backend,name,m", [("auto", "4b", 1), ("triton", "3b+1%+r64", 1), ("triton", "4b-lut", 7),
                                            ("triton", "4b+1%", 300), ("auto", "3b+1%", 64), ("dequant", "4b+1%", 300)])
def test_cuda_graph_capture_and_replay(backend, name, m, force_path):
    if backend == "dequant":  # the opt-in path: a transient dense weight inside the captured graph
        force_path("dequant")
        backend = "triton"
    x = make_x(m, F16, seed=2)
    with use_backend(backend):
        graph, y_static = capture_graph(lambda: run(name, x))
    for i in range(2):  # replay on fresh inputs copied into the captured buffer
        x.copy_(make_x(m, F16, seed=10 + i))
        graph.replay()
        torch.cuda.synchronize()
        with use_backend(backend):
            eager = run(name, x)
        check(y_static, ref64(name, x), F16, f"graph {name} M={m}")
        assert rel(y_static, eager.double()) < 1e-3
