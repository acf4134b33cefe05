"""What the kernel test modules share: where Triton runs (a CUDA device, or CPU
tensors under TRITON_INTERPRET=1, which conftest.py sets before any kernel module is imported),
the tolerances, the comparison against a float64 reference, and NaN-poisoned allocations.

A test module does ``pytest.importorskip("triton")`` first, then imports from here and sets
``pytestmark = MARKS``.
"""
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MARKS = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton needs a CUDA device or TRITON_INTERPRET=1 (set by conftest.py before import)",
    ),
]


def assert_close(out, ref, dtype, what="", tol=TOL):
    """``‖out − ref‖ / ‖ref‖ < tol[dtype]`` against a float64 ``ref``, and no NaN in ``out``."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{what}: {int(out.isnan().sum())} NaN (unwritten or poisoned) elements"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < tol[dtype], f"{what}: relative error {err:.3g} >= {tol[dtype]:g} ({dtype})"


def poison_allocations(monkeypatch, kernels) -> list:
    """Make ``kernels._empty`` (every launcher allocation) return NaN-filled tensors (-1, or 255
    for uint8, when integer), so an element a kernel fails to write shows up; returns the list
    of allocated shapes."""
    allocated = []

    def poisoned_empty(shape, dtype, device):
        allocated.append(tuple(shape))
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(255 if dtype == torch.uint8 else -1)

    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    return allocated


def capture_graph(fn):
    """Warm up ``fn()`` on a side stream (Triton compiles and autotunes there), then capture it
    into a CUDA graph; returns (graph, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
