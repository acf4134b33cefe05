"""Emulation lane for the CUDA decode kernels of the low-rank, quant and N:M families
(csrc/lowrank_decode.cu, quant_decode.cu, sparse_decode.cu): their own sources built with the
host compiler against csrc/emulate/ (lowrank_ops/core/cuda_emulation.py) and run on CPU tensors
through their Python wrappers (``target=``), against float64 / reference results of the same
inputs, on aligned and odd shapes, both dtypes, every row count bucket, and misaligned views that
take the scalar paths. The gpu lane runs the same kernels on a GPU at larger sizes.
"""
from __future__ import annotations

import pytest
import torch

from emulation_lane import MARKS
from lowrank_ops.core import cuda_emulation
from lowrank_ops.lowrank import cuda_decode as lowrank_cuda
from lowrank_ops.quant import cuda_decode as quant_cuda
from lowrank_ops.quant.ops import quant_linear_reference
from lowrank_ops.sparse import cuda_decode as sparse_cuda
from test_gpu_cuda_decode import _make as lowrank_case
from test_gpu_cuda_decode import _ref as lowrank_reference
from test_gpu_quant_cuda import FIELDS
from test_gpu_sparse import make_nm, make_q4, make_x
from test_gpu_sparse import reference as nm_reference
from test_quant_cuda_wrapper import make_packed

pytestmark = MARKS

F16, BF16 = torch.float16, torch.bfloat16
TOL = {F16: 2e-3, BF16: 1e-2}


@pytest.fixture(scope="module")
def target():
    return cuda_emulation.target()


def assert_close(out, ref, dtype, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or overflowed element)"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g}"


# --------------------------------------------------------------------------- low rank
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k,n,r", [(1000, 77, 33), (7, 5, 3), (264, 96, 1000), (512, 64, 64)],
                         ids=lambda v: str(v))
def test_lowrank_decode(target, m, k, n, r, dtype):
    """M buckets 1 / 4 / 16, R up to 1024 (> 48 KB of dynamic shared memory at M = 16), odd sizes
    (scalar paths), K split over several phase-1 programs."""
    x, v, u, b = lowrank_case(m, k, n, r, dtype, bias=m != 3, dev="cpu")
    out = lowrank_cuda.lowrank_decode(x, v, u, b, target=target)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, lowrank_reference(x, v, u, b), dtype, f"lowrank M={m} K={k} N={n} R={r}")


def test_lowrank_decode_misaligned_x_takes_the_scalar_path(target):
    x, v, u, b = lowrank_case(2, 512, 40, 24, F16, bias=True, offset=1, dev="cpu")  # x 2 bytes off 16
    assert not lowrank_cuda.vector_paths(x, v, u)[0]
    assert_close(lowrank_cuda.lowrank_decode(x, v, u, b, target=target), lowrank_reference(x, v, u, b), F16,
                 "misaligned x")


# --------------------------------------------------------------------------- quant
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("lut", [False, True], ids=["uniform", "lut"])
@pytest.mark.parametrize("m,k,n,g", [(1, 100, 37, 32), (5, 1000, 65, 64), (8, 512, 16, 128)], ids=lambda v: str(v))
def test_quant_decode(target, m, k, n, g, bits, lut, dtype):
    x, t = make_packed(m=m, k=k, n=n, bits=bits, g=g, lut=lut, outliers=True, bias=True, dtype=dtype, seed=bits)
    out = quant_cuda.quant_decode(x, **t, bits=bits, group_size=g, target=target)
    ref = quant_linear_reference(x, *(t.get(f) for f in FIELDS), bits=bits, group_size=g, in_features=k).double()
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, ref, dtype, f"quant {bits}b {'lut' if lut else 'uniform'} M={m} K={k} N={n} g={g}")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_decode_second_level_statistics(target, bits):
    x, t = make_packed(m=3, k=1000, n=37, bits=bits, g=64, outliers=False, bias=False, dtype=F16, qstats=True)
    out = quant_cuda.quant_decode(x, **t, bits=bits, group_size=64, target=target)
    ref = quant_linear_reference(x, *(t.get(f) for f in FIELDS), bits=bits, group_size=64, in_features=1000)
    assert_close(out, ref.double(), F16, f"quant {bits}b second-level statistics")


# --------------------------------------------------------------------------- N:M sparse
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (3, 4), (7, 8), (1, 16)])
@pytest.mark.parametrize("n_out,k", [(37, 208), (20, 1024)], ids=lambda v: str(v))
def test_sparse_decode(target, n_out, k, n, m, dtype):
    """Every pattern family; KK % 8 != 0 (3:4, 7:8, 1:16 at K = 208) takes the scalar values path."""
    values, indices = make_nm(n_out, k, n, m, dtype, device="cpu")
    bias = torch.randn(n_out).to(dtype)
    for rows in (1, 3, 8):
        x = make_x(rows, k, dtype, seed=rows, device="cpu")
        b = bias if rows % 2 else None
        y = sparse_cuda.nm_linear_decode(x, values, indices, n, m, b, target=target)
        assert y.shape == (rows, n_out) and y.dtype == dtype
        assert_close(y, nm_reference(x, values, indices, n, m, b), dtype, f"sparse {n}:{m} M={rows}")


@pytest.mark.parametrize("n,m,group", [(2, 4, 128), (3, 4, 64), (7, 8, 32)])
def test_sparse_decode_4bit_values(target, n, m, group):
    qweight, scales, zeros, indices, dequant = make_q4(37, 1040, n, m, group, device="cpu")
    for rows in (1, 5):
        x = make_x(rows, 1040, BF16, seed=rows, device="cpu")
        y = sparse_cuda.nm_linear_decode(x, qweight, indices, n, m, qscales=scales, qzeros=zeros, group_size=group,
                                         target=target)
        assert_close(y, nm_reference(x, dequant, indices, n, m), BF16, f"sparse q4 {n}:{m} g{group} M={rows}")


def test_launches_from_two_threads_run_side_by_side(target):
    """The module releases the GIL; each OS thread emulates its own blocks with its own shared memory."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [lowrank_case(16, 512, 300, 64, F16, bias=True, dev="cpu") for _ in range(4)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = list(pool.map(lambda c: lowrank_cuda.lowrank_decode(*c, target=target), cases))
    for (x, v, u, b), out in zip(cases, outs):
        assert_close(out, lowrank_reference(x, v, u, b), F16, "threaded")


def test_cpu_tensors_need_the_emulation_target():
    x, v, u, b = lowrank_case(1, 16, 8, 4, F16, bias=False, dev="cpu")
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        lowrank_cuda.lowrank_decode(x, v, u)
