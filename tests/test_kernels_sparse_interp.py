"""Interpreter lane: the N:M kernels (decode gather, tile expand + dot, the backward-to-x
kernel; dense and 4-bit kept values) against a float64 reference of the same packed weight
(``format.unpack_nm``).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or on
a CUDA device. Every launcher allocation is NaN-filled first, so an unwritten output element (or
split partial) shows up. The (pattern × dtype × path) product is covered in full; rows
M ∈ {1, 3, 16, 17}, N ∈ {19, 37} (off the block sizes), K (whole groups, off the blocks; some large
enough that the decode path splits K) and bias are sampled across it. The dx kernel and the
4-bit paths get focused cases: every pattern family, M ∈ {1, 3, 17}, K and N off the blocks.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, DTYPES, MARKS, assert_close, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.kernels import sparse as kernels  # noqa: E402
from lowrank_ops.sparse.format import nm_mask_from_scores, pack_nm, unpack_nm  # noqa: E402

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (4, 16)]
PATHS = {"decode": kernels.nm_matmul_decode, "tile": kernels.nm_matmul_tile, "expand": kernels.nm_matmul_expand}


def make_nm(n_out, k, n, m, dtype):
    """Random N:M weight (random mask, values in ``dtype``) packed by the format module."""
    w = torch.randn(n_out, k) * k**-0.5
    mask = nm_mask_from_scores(torch.rand(n_out, k), n, m)
    values, indices = pack_nm(w, mask, n, m)
    return values.to(dtype=dtype, device=DEVICE), indices.to(DEVICE)


def reference(x, values, indices, n, m, bias):
    w = unpack_nm(values.cpu().float(), indices.cpu(), n, m, x.shape[1]).double()  # fp32 holds fp16/bf16 exactly
    y = x.cpu().double() @ w.t()
    return y if bias is None else y + bias.cpu().double()


def quantized(values, group):
    """The 4-bit uniform QuantFormat (RTN) of the (N, KK) kept values, on DEVICE."""
    from lowrank_ops.quant.compress import quantize_rtn

    q = quantize_rtn(values.cpu().float(), bits=4, group_size=group)
    assert q.qweight_hi is None and q.lut is None and not q.has_outliers
    return q, (q.qweight.to(DEVICE), q.scales.to(DEVICE), q.zeros.to(DEVICE), group)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


def _cases():
    """(pattern, dtype, path) in full; rows, N, K size and bias sampled with co-prime periods."""
    out = []
    for i, ((n, m), dtype, path) in enumerate(itertools.product(PATTERNS, DTYPES, PATHS)):
        rows = (1, 3, 16)[i % 3] if path == "decode" else (1, 3, 17)[i % 3]
        groups = (7, 25)[(i // 2) % 2]  # K = groups·m: off every block size; 25 groups split decode K
        out.append(dict(n=n, m=m, dtype=dtype, path=path, rows=rows, n_out=(37, 19)[i % 2], k=groups * m,
                        bias=bool((i // 5) % 2)))
    out.append(dict(n=2, m=4, dtype=torch.float16, path="tile", rows=40, n_out=70, k=100, bias=True))
    return out


CASES = _cases()


def _id(c):
    return "{path}-{n}of{m}-{d}-M{rows}-N{n_out}-K{k}-{b}".format(
        **c, d=str(c["dtype"]).split(".")[-1], b="bias" if c["bias"] else "nobias")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_nm_matmul(case, poisoned):
    n, m, dtype = case["n"], case["m"], case["dtype"]
    values, indices = make_nm(case["n_out"], case["k"], n, m, dtype)
    x = torch.randn(case["rows"], case["k"]).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(case["n_out"]).to(dtype=dtype, device=DEVICE) if case["bias"] else None
    y = PATHS[case["path"]](x, values, indices, n, m, bias)
    assert poisoned, "the launcher allocated nothing through kernels._empty: poisoning is not in effect"
    assert y.dtype == dtype
    assert_close(y, reference(x, values, indices, n, m, bias), dtype, _id(case))


def test_decode_split_k_is_exercised_and_deterministic(poisoned):
    """A long K at few output rows splits K: fp32 partials (poisoned) summed by the reduce kernel."""
    n, m, k = 2, 4, 400
    values, indices = make_nm(19, k, n, m, torch.float32)
    x = torch.randn(2, k, device=DEVICE)
    bias = torch.randn(19, device=DEVICE)
    splits = kernels.decode_k_split(2, 19, values.shape[1], x.device)
    assert splits > 1
    y = kernels.nm_matmul_decode(x, values, indices, n, m, bias)
    assert (splits, 2, 19) in poisoned, poisoned
    assert_close(y, reference(x, values, indices, n, m, bias), torch.float32, "split-K decode")
    assert torch.equal(y, kernels.nm_matmul_decode(x, values, indices, n, m, bias))


def test_values_dtype_may_differ_from_x():
    """fp16 kept values with fp32 activations: y in x's dtype, products in fp32."""
    values, indices = make_nm(37, 64, 2, 8, torch.float16)
    x = torch.randn(3, 64, device=DEVICE)
    for fn in PATHS.values():
        y = fn(x, values, indices, 2, 8, None)
        assert y.dtype == torch.float32
        assert_close(y, reference(x, values, indices, 2, 8, None), torch.float32, fn.__name__)


@pytest.mark.parametrize("path,n,m,k,group,rows,dtype", [
    ("decode", 2, 4, 100, 32, 1, torch.float16), ("decode", 2, 8, 400, 64, 3, torch.bfloat16),
    ("decode", 1, 4, 520, 128, 16, torch.float32), ("decode", 3, 8, 200, 32, 5, torch.float16),
    ("tile", 2, 4, 100, 32, 17, torch.float16), ("tile", 4, 8, 200, 64, 3, torch.bfloat16),
    ("tile", 1, 4, 520, 128, 1, torch.float32), ("tile", 4, 16, 400, 32, 40, torch.float32),
    ("expand", 2, 8, 400, 64, 20, torch.bfloat16), ("expand", 1, 4, 520, 128, 3, torch.float32),
], ids=str)
def test_nm_matmul_q4(path, n, m, k, group, rows, dtype, poisoned):
    """4-bit kept values (the quant family's uniform format along KK, KK off the group size) read
    by the decode and tile kernels, against the float64 product with the dequantized values."""
    values, indices = make_nm(37, k, n, m, torch.float32)
    q, q4 = quantized(values, group)
    x = torch.randn(rows, k).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(37).to(dtype=dtype, device=DEVICE)
    fn = {"decode": kernels.nm_matmul_decode_q4, "tile": kernels.nm_matmul_tile_q4, "expand": kernels.nm_matmul_expand_q4}[path]
    y = fn(x, *q4, indices, n, m, bias)
    assert y.dtype == dtype and poisoned
    assert_close(y, reference(x, q.dense(torch.float32), indices, n, m, bias), dtype, f"{path} q4 {n}:{m} g{group}")
    with pytest.raises(ValueError, match="group_size"):
        fn(x, *q4[:3], 16, indices, n, m, bias)


# (n, m, 4-bit group size or None for dense values, rows, N, K, dtype): every pattern family in
# both modes, each mode over M ∈ {1, 3, 17} and every dtype; N = 37 spans two BLOCK_N steps,
# K (whole groups) is off the K block, KK off the group size.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DX_CASES = [
    (1, 4, None, 1, 37, 100, F16), (2, 4, None, 3, 19, 28, BF16), (3, 4, None, 17, 37, 100, F32),
    (2, 8, None, 17, 19, 56, F16), (4, 8, None, 1, 37, 200, BF16), (4, 16, None, 3, 37, 112, F32),
    (1, 4, 32, 3, 19, 100, BF16), (2, 4, 64, 17, 37, 100, F16), (3, 4, 32, 1, 37, 28, F32),
    (2, 8, 32, 3, 37, 200, F32), (4, 8, 128, 17, 19, 200, BF16), (4, 16, 32, 1, 37, 400, F16),
]


@pytest.mark.parametrize("n,m,group,rows,n_out,k,dtype", DX_CASES, ids=str)
def test_nm_matmul_dx(n, m, group, rows, n_out, k, dtype, poisoned):
    """dx = dy · Ŵ from the packed weight (tiles expanded on chip) against float64 dy · Ŵ."""
    values, indices = make_nm(n_out, k, n, m, torch.float32 if group else dtype)
    dy = torch.randn(rows, n_out).to(dtype=dtype, device=DEVICE)
    if group is None:
        dx = kernels.nm_matmul_dx(dy, values, indices, n, m, k)
    else:
        q, q4 = quantized(values, group)
        values = q.dense(torch.float32)
        dx = kernels.nm_matmul_dx_q4(dy, *q4, indices, n, m, k)
    assert dx.shape == (rows, k) and dx.dtype == dtype
    assert (rows, k) in poisoned
    w = unpack_nm(values.cpu().float(), indices.cpu(), n, m, k).double()
    assert_close(dx, dy.cpu().double() @ w, dtype, f"dx {n}:{m} group={group} M={rows}")


# (n, m, rows M, N, K, dtype): every pattern family, M the reduction (1, odd, past BLOCK_M),
# N past BLOCK_N, K (whole groups) off the K block.
DVALUES_CASES = [
    (1, 4, 1, 37, 100, F16), (2, 4, 17, 19, 28, BF16), (3, 4, 40, 37, 100, F32),
    (2, 8, 3, 37, 56, F16), (4, 8, 17, 19, 200, BF16), (4, 16, 33, 37, 112, F32),
]


@pytest.mark.parametrize("n,m,rows,n_out,k,dtype", DVALUES_CASES, ids=str)
def test_nm_matmul_dvalues(n, m, rows, n_out, k, dtype, poisoned):
    """The kept values' gradient (dyᵀ x at the kept columns, SDDMM) against float64."""
    values, indices = make_nm(n_out, k, n, m, dtype)
    dy = torch.randn(rows, n_out).to(dtype=dtype, device=DEVICE)
    x = torch.randn(rows, k).to(dtype=dtype, device=DEVICE)
    dv = kernels.nm_matmul_dvalues(dy, x, indices, n, m, dtype)
    assert dv.shape == values.shape and dv.dtype == dtype
    assert values.shape in poisoned
    kept = unpack_nm(torch.ones_like(values, dtype=torch.float64).cpu(), indices.cpu(), n, m, k).bool()
    dense = dy.cpu().double().t() @ x.cpu().double()
    assert_close(dv, dense[kept].reshape(values.shape), dtype, f"dvalues {n}:{m} M={rows}")


def test_bad_pattern_and_rows():
    values, indices = make_nm(8, 32, 2, 4, torch.float32)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="m"):
        kernels.nm_matmul_tile(x, values, indices, 2, 6)
    with pytest.raises(ValueError, match="n"):
        kernels.nm_matmul_decode(x, values, indices, 4, 4)
    with pytest.raises(ValueError, match="x2d"):
        kernels.nm_matmul_decode(torch.randn(17, 32, device=DEVICE), values, indices, 2, 4)


def test_compile_cases_cover_every_kernel_and_pattern():
    """Every kernel compiles for every pattern and for both 16-bit dtypes (not every pair), the
    4-bit-values variants too, the decode kernel in both modes, fp32 for the all-configs run."""
    names = [c.name for c in kernels.COMPILE_CASES]
    for kernel in ("nm_tile", "nm_decode", "nm_dx", "nm_dvalues", "nm_expand", "nm_tile_q4", "nm_dx_q4", "nm_decode_q4",
                   "nm_expand_q4"):
        ours = [name for name in names if name.startswith(f"{kernel}[")]
        for dtype in ("fp16", "bf16"):
            assert any(name.startswith(f"{kernel}[{dtype},") for name in ours), (kernel, dtype)
        if not kernel.endswith("_q4"):
            for n, m in ((2, 4), (1, 4), (2, 8), (4, 16)):
                assert any(f",{n}:{m}" in name for name in ours), (kernel, n, m)
    for kernel in ("nm_tile", "nm_dx", "nm_dvalues"):  # every autotune config checked on sm_80
        assert f"{kernel}[fp32,2:4]" in names, kernel
    assert any("split" in name for name in names) and any("direct" in name for name in names)