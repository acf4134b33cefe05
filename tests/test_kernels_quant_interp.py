"""Interpreter lane: the fused dequant-matmul kernels against a float64 reference of the same
dequantized weights (``ops.dequantize_reference``).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or on
a CUDA device. Every launcher allocation is NaN-filled first, so an unwritten output element
shows up. The (path × bits × mode × dtype) product is covered in full (modes: uniform fp16
statistics, LUT, second-level statistics); outliers (0 / ~2%), the
low-rank path (r = 0 / 8), bias, M ∈ {1, 3, 17, 40} and group size are sampled across it so
every value meets every path. K = 100 with g = 32 → K_pad = 128; N odd.
"""
import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, DTYPES, MARKS, assert_close, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import quant as kernels  # noqa: E402
from lowrank_ops.quant import ops  # noqa: E402

ORDER = ("qweight", "qweight_hi", "scales", "zeros", "lut", "outlier_rowptr", "outlier_cols", "outlier_vals", "lr_u", "lr_v")


# --------------------------------------------------------------------------- packed-format test helper (from the spec)
def pack_codes(q, bits):
    """int64 codes (N, K_pad) -> int32 words, code k in word k // E at bit (k % E)·bits."""
    per_word = 32 // bits
    n, k_pad = q.shape
    words = (q.reshape(n, k_pad // per_word, per_word) << (torch.arange(per_word) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_packed(n, k, *, bits, group, mode, outlier_frac, rank, dtype):
    k_pad = math.ceil(k / group) * group
    q = torch.randint(0, 2**bits, (n, k_pad))
    q[:, k:] = 0
    t = dict.fromkeys(ORDER)
    if bits == 3:
        t["qweight"], t["qweight_hi"] = pack_codes(q & 3, 2), pack_codes(q >> 2, 1)
    else:
        t["qweight"] = pack_codes(q, bits)
    if mode == "lut":
        t["lut"] = (torch.randn(n, 2**bits) * k**-0.5).half()
    elif mode == "qstats":  # second-level statistics: uint8 codes | zero << 4, fp16 (log2 lo, log2 step)
        levels = 2**bits - 1
        codes = torch.randint(0, 16, (n, k_pad // group)) | torch.randint(0, levels + 1, (n, k_pad // group)) << 4
        lo = math.log2(2 * k**-0.5 / levels) - 1 + torch.rand(-(-n // 16), k_pad // group)
        t["scales"], t["zeros"] = codes.to(torch.uint8), torch.stack([lo, torch.rand_like(lo) * 0.1]).half()
    else:
        levels = 2**bits - 1
        t["scales"] = ((torch.rand(n, k_pad // group) + 0.5) * 2 * k**-0.5 / levels).half()
        t["zeros"] = (levels / 2 + torch.randn(n, k_pad // group) * 0.5).half()
    if outlier_frac > 0:
        keep = torch.rand(n, k) < outlier_frac
        keep[n // 2, :4] = True  # at least one row with several entries
        _, cols = keep.nonzero(as_tuple=True)
        t["outlier_rowptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)]).to(torch.int32)
        t["outlier_cols"] = cols.to(torch.int16)
        t["outlier_vals"] = (torch.randn(len(cols)) * 2 * k**-0.5).half()
    if rank > 0:
        t["lr_u"] = (torch.randn(n, rank) * rank**-0.5).to(dtype)
        t["lr_v"] = (torch.randn(rank, k) * 0.3 * k**-0.5).to(dtype)
    return {name: (None if v is None else v.to(DEVICE)) for name, v in t.items()}


def f64(t):
    return None if t is None else t.detach().double().cpu()


def reference(x, t, bias, bits, group, k):
    """float64 x Ŵ_totalᵀ + b with Ŵ_total from the reference dequantization (float32, exact here)."""
    cpu = {name: (None if v is None else v.cpu()) for name, v in t.items()}
    w = ops.dequantize_reference(**cpu, bits=bits, group_size=group, in_features=k).double()
    y = f64(x) @ w.t()
    return y if bias is None else y + f64(bias)




@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


# --------------------------------------------------------------------------- kernels, direct
def _cases():
    """(path, bits, mode, dtype) in full; the other axes sampled with co-prime periods."""
    out = []
    paths = ("tile", "decode", "dequant")
    for i, (path, bits, mode, dtype) in enumerate(itertools.product(paths, (2, 3, 4), ("uniform", "lut", "qstats"), DTYPES)):
        out.append(dict(
            path=path, bits=bits, mode=mode, dtype=dtype,
            m=(1, 3, 17)[i % 3], n=(37, 19)[i % 2], group=(32, 32, 64, 128)[i % 4],
            frac=(0.0, 0.02)[(i // 2) % 2], rank=(0, 8)[(i // 3) % 2], bias=bool((i // 5) % 2),
        ))
    out.append(dict(path="tile", bits=4, mode="uniform", dtype=torch.float16, m=40, n=70, group=32, frac=0.02, rank=8, bias=True))
    out.append(dict(path="decode", bits=3, mode="uniform", dtype=torch.float32, m=16, n=37, group=32, frac=0.02, rank=8, bias=True))
    out.append(dict(path="dequant", bits=4, mode="uniform", dtype=torch.float16, m=40, n=70, group=32, frac=0.02, rank=8, bias=True))
    return out


CASES = _cases()


def _id(c):
    return "{path}-{bits}b-{mode}-{d}-M{m}-N{n}-g{group}-o{frac}-r{rank}-{b}".format(
        **c, d=str(c["dtype"]).split(".")[-1], b="bias" if c["bias"] else "nobias")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_quant_matmul(case, poisoned):
    k, dtype, bits, group = 100, case["dtype"], case["bits"], case["group"]
    t = make_packed(case["n"], k, bits=bits, group=group, mode=case["mode"], outlier_frac=case["frac"],
                    rank=case["rank"], dtype=dtype)
    x = torch.randn(case["m"], k).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(case["n"]).to(dtype=dtype, device=DEVICE) if case["bias"] else None
    y = kernels.quant_matmul(x, *(t[name] for name in ORDER), bias, bits, group, path=case["path"])
    assert poisoned, "the launcher allocated nothing through kernels._empty: poisoning is not in effect"
    assert y.dtype == dtype
    assert_close(y, reference(x, t, bias, bits, group, k), dtype, _id(case))


def test_bad_path_and_rank():
    t = make_packed(8, 32, bits=4, group=32, mode="uniform", outlier_frac=0, rank=kernels.QUANT_MAX_RANK + 1, dtype=torch.float32)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rank"):
        kernels.quant_matmul(x, *(t[name] for name in ORDER), None, 4, 32, path="tile")
    with pytest.raises(ValueError, match="path"):
        kernels.quant_matmul(x, *(t[name] for name in ORDER), None, 4, 32, path="gemv")


# --------------------------------------------------------------------------- public op, triton pinned
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,path", [((2, 3), "decode"), ((17,), "tile")])
def test_quant_linear_triton(lead, path, dtype, monkeypatch):
    taken = []
    real = kernels.quant_matmul
    monkeypatch.setattr(kernels, "quant_matmul", lambda *a, path: taken.append(path) or real(*a, path=path))
    k, n = 100, 37
    t = make_packed(n, k, bits=3, group=32, mode="uniform", outlier_frac=0.02, rank=8, dtype=dtype)
    x = torch.randn(*lead, k).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(n).to(dtype=dtype, device=DEVICE)
    with use_backend("triton"):
        y = ops.quant_linear(x, **t, bias=bias, bits=3, group_size=32, in_features=k)
    assert taken == [path]
    assert y.shape == (*lead, n)
    assert_close(y.reshape(-1, n), reference(x.reshape(-1, k), t, bias, 3, 32, k), dtype, f"quant_linear {path}")


DX_CASES = [
    dict(bits=bits, mode=mode, dtype=dtype, m=(1, 3, 17)[i % 3], n=(37, 70)[i % 2], group=(32, 64, 128)[i % 3])
    for i, (bits, mode, dtype) in enumerate(itertools.product((2, 3, 4), ("uniform", "lut", "qstats"), DTYPES))
]


@pytest.mark.parametrize("c", DX_CASES, ids=lambda c: "{bits}b-{mode}-{d}-M{m}-N{n}-g{group}".format(
    **c, d=str(c["dtype"]).split(".")[-1]))
def test_quant_matmul_dx(c, poisoned):
    """The backward kernel: dy · Deq(Q) from the packed weight, K = 100 off every block and group."""
    k = 100
    t = make_packed(c["n"], k, bits=c["bits"], group=c["group"], mode=c["mode"], outlier_frac=0.0, rank=0,
                    dtype=c["dtype"])
    dy = torch.randn(c["m"], c["n"]).to(dtype=c["dtype"], device=DEVICE)
    dx = kernels.quant_matmul_dx(dy, t["qweight"], t["qweight_hi"], t["scales"], t["zeros"], t["lut"],
                                 c["bits"], c["group"], k)
    assert poisoned == [(c["m"], k)] and dx.dtype == torch.float32
    cpu = {name: (None if v is None else v.cpu()) for name, v in t.items()}
    w = ops.dequantize_reference(**cpu, bits=c["bits"], group_size=c["group"], in_features=k).double()
    assert_close(dx, f64(dy) @ w, c["dtype"], "dx")


@pytest.mark.parametrize("m", [3, 17], ids=["decode", "tile"])
def test_quant_linear_grads(m):
    k, n, bits, group = 100, 19, 4, 32
    t = make_packed(n, k, bits=bits, group=group, mode="lut", outlier_frac=0.02, rank=8, dtype=torch.float32)
    frozen = {name: v for name, v in t.items() if name not in ("lr_u", "lr_v")}
    cpu = {name: (None if v is None else v.cpu()) for name, v in frozen.items()}
    base = ops.dequantize_reference(**cpu, lr_u=None, lr_v=None, bits=bits, group_size=group, in_features=k).double()
    inputs = [torch.randn(m, k, device=DEVICE), t["lr_u"], t["lr_v"], torch.randn(n, device=DEVICE)]
    leaves = [v.detach().clone().requires_grad_() for v in inputs]
    refs = [f64(v).requires_grad_() for v in inputs]
    grad_out = torch.randn(m, n, dtype=torch.float64)
    with use_backend("triton"):
        y = ops.quant_linear(leaves[0], **frozen, lr_u=leaves[1], lr_v=leaves[2], bias=leaves[3],
                             bits=bits, group_size=group, in_features=k)
    y.backward(grad_out.float().to(DEVICE))
    ref_y = refs[0] @ (base + refs[1] @ refs[2]).t() + refs[3]
    ref_y.backward(grad_out)
    assert_close(y, ref_y.detach(), torch.float32, "forward")
    for leaf, ref, name in zip(leaves, refs, ("x", "lr_u", "lr_v", "bias")):
        assert leaf.grad is not None, f"{name}: no gradient"
        assert_close(leaf.grad, ref.grad, torch.float32, f"grad of {name}")


def test_tile_configs_by_batch():
    """The tile path's autotuner times the 4-warp rows below TILE_LARGE_M and the 8-warp,
    128-row tiles from there (at most four rows per M bucket); the rows that survive fit."""
    import triton

    configs = [triton.Config(dict(zip(kernels._TILE_NAMES, row[:-2])), num_warps=row[-2], num_stages=row[-1])
               for row in kernels._TILE_GPU_TABLE]
    x16 = torch.empty(0, dtype=torch.float16)
    for m_bucket, warps in ((16, 4), (128, 4), (kernels.TILE_LARGE_M, 8), (4096, 8)):
        kept = kernels._tile_prune(configs, dict(x_ptr=x16, M_BUCKET=m_bucket), R_PAD=16)
        assert 1 <= len(kept) <= 4 and {c.num_warps for c in kept} == {warps}, (m_bucket, kept)
        assert all(c.kwargs["BLOCK_M"] >= 128 for c in kept) == (warps == 8)


@pytest.mark.parametrize("m,k", [(1, 300), (5, 40000), (70, 300)])
def test_outlier_product_walks_long_rows_and_row_blocks(m, k, poisoned):
    """The outlier kernel's fp32 x Sᵀ: rows with more entries than one step takes (JC), an empty
    row, x rows over two row blocks (M = 70 > 64), N not a multiple of its feature block, and
    columns >= 32768 (int16 read unsigned, K = 40000)."""
    n = 45
    keep = torch.rand(n, k) < 0.03
    keep[3] = False
    keep[7, -80:] = True  # 80 entries in one row (over two steps of any JC), the last columns of K
    _, cols = keep.nonzero(as_tuple=True)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)]).to(torch.int32)
    vals = torch.randn(len(cols)).half()
    x = torch.randn(m, k).half()
    out = kernels._outlier_product(x.to(DEVICE), rowptr.to(DEVICE), cols.to(torch.int16).to(DEVICE), vals.to(DEVICE), n)
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[keep] = vals.double()
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert_close(out, f64(x) @ dense.t(), torch.float32, f"outliers M={m} K={k}")


@pytest.mark.parametrize("bits,mode,dtype", [(4, "uniform", torch.float16), (3, "lut", torch.bfloat16),
                                             (2, "qstats", torch.float32), (3, "uniform", torch.float16)])
def test_dequantize_matches_reference(bits, mode, dtype, poisoned):
    """The dequant path's dense Ŵ + S + U V against the spec's float32 dequantization: every
    element written (poisoned buffers), K = 100 not a multiple of the kernel's column block."""
    k, n = 100, 37
    t = make_packed(n, k, bits=bits, group=32, mode=mode, outlier_frac=0.05, rank=4, dtype=dtype)
    w = kernels.quant_dequantize(*(t[name] for name in ORDER), bits, 32, k, dtype)
    cpu = {name: (None if v is None else v.cpu()) for name, v in t.items()}
    ref = ops.dequantize_reference(**cpu, bits=bits, group_size=32, in_features=k).double()
    assert w.dtype == dtype and w.shape == (n, k)
    assert_close(w, ref, dtype, f"dequantize {bits}b {mode}")
