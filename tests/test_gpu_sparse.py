"""GPU lane: the N:M kernels on a real GPU — Triton decode/tile paths, the Triton backward-to-x
kernel and the hand-written CUDA decode kernel (csrc/sparse_decode.cu), with dense and 4-bit kept
values, against a float64 reference of the same packed weight (``format.unpack_nm``), on
LLM-sized and odd shapes, plus CUDA-graph capture and replay.

The CUDA tests use the installed ``lowrank_ops._C`` when it loads, else build csrc/ for this GPU
into the cache (needs nvcc). Error measure: ‖out − ref‖ / ‖ref‖; outputs must be finite.
"""
import pytest
import torch

from lowrank_ops.sparse import cuda_decode
from lowrank_ops.sparse.format import nm_mask_from_scores, pack_nm, unpack_nm
from kernel_lane import capture_graph

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float16, torch.bfloat16]


def make_nm(n_out, k, n, m, dtype, seed=0, device=DEV):
    """(values, indices) of a random N:M weight packed by the format module, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=gen) * k**-0.5
    values, indices = pack_nm(w, nm_mask_from_scores(torch.rand(n_out, k, generator=gen), n, m), n, m)
    return values.to(device, dtype), indices.to(device)


def make_q4(n_out, k, n, m, group, seed=0, device=DEV):
    """(qweight, scales, zeros, indices, dequantized kept values fp32) of a random N:M weight whose
    kept values are RTN-quantized to 4 bits in groups of ``group``, on ``device``."""
    from lowrank_ops.quant.compress import quantize_rtn

    values, indices = make_nm(n_out, k, n, m, torch.float32, seed, device)
    q = quantize_rtn(values.cpu(), bits=4, group_size=group)
    return (q.qweight.to(device), q.scales.to(device), q.zeros.to(device), indices,
            q.dense(torch.float32).to(device))


def make_x(rows, k, dtype, seed=1, device=DEV):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def reference(x, values, indices, n, m, bias=None):
    w = unpack_nm(values.float(), indices, n, m, x.shape[1]).double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def check(out, ref, dtype, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or overflowed element)"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g}"


@pytest.fixture(scope="module")
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("gpu lane: needs a CUDA device")
    from lowrank_ops.kernels import sparse

    return sparse


# --------------------------------------------------------------------------- Triton
# Few combinations on purpose: each (pattern, dtype, rows bucket) compiles and autotunes its own
# kernels, and GPU time is scarce. Every pattern family (m = 4, 8, 16), both dtypes, LLM shapes
# and an odd one (N, K off every block size; K splits in decode).
@pytest.mark.parametrize("n_out,k,n,m,dtype", [
    (4096, 4096, 2, 4, torch.float16), (11008, 4096, 2, 8, torch.bfloat16),
    (1000, 1040, 1, 4, torch.float16), (1000, 1040, 4, 16, torch.bfloat16), (1000, 1040, 3, 8, torch.float16),
], ids=str)
def test_triton_paths_match_float64(kernels, n_out, k, n, m, dtype):
    values, indices = make_nm(n_out, k, n, m, dtype)
    bias = torch.randn(n_out, device=DEV).to(dtype)
    for rows in (1, 3):
        x = make_x(rows, k, dtype)
        check(kernels.nm_matmul_decode(x, values, indices, n, m, bias), reference(x, values, indices, n, m, bias),
              dtype, f"decode {n}:{m} M={rows}")
    for rows in (1, 17, 256):
        x = make_x(rows, k, dtype)
        check(kernels.nm_matmul_tile(x, values, indices, n, m, None), reference(x, values, indices, n, m),
              dtype, f"tile {n}:{m} M={rows}")
    x = make_x(300, k, dtype)
    check(kernels.nm_matmul_expand(x, values, indices, n, m, bias), reference(x, values, indices, n, m, bias),
          dtype, f"expand {n}:{m} M=300")


@pytest.mark.parametrize("n_out,k,n,m,dtype,group", [
    (4096, 4096, 2, 4, torch.float16, 128), (1000, 1040, 2, 8, torch.bfloat16, 64), (1000, 1040, 4, 16, torch.float16, 32),
], ids=str)
def test_triton_dx_and_q4_paths_match_float64(kernels, n_out, k, n, m, dtype, group):
    """The backward kernels (to x, dense and 4-bit values; to dense kept values) and the 4-bit tile
    path; M off the blocks."""
    values, indices = make_nm(n_out, k, n, m, dtype)
    qweight, scales, zeros, qindices, dequant = make_q4(n_out, k, n, m, group)
    for rows in (1, 17, 300):
        dy = make_x(rows, n_out, dtype)
        w = unpack_nm(values.float(), indices, n, m, k).double()
        check(kernels.nm_matmul_dx(dy, values, indices, n, m, k), dy.double() @ w, dtype, f"dx {n}:{m} M={rows}")
        wq = unpack_nm(dequant, qindices, n, m, k).double()
        check(kernels.nm_matmul_dx_q4(dy, qweight, scales, zeros, group, qindices, n, m, k), dy.double() @ wq, dtype,
              f"dx q4 {n}:{m} M={rows}")
        x = make_x(rows, k, dtype)
        check(kernels.nm_matmul_tile_q4(x, qweight, scales, zeros, group, qindices, n, m, None), x.double() @ wq.t(),
              dtype, f"tile q4 {n}:{m} M={rows}")
        check(kernels.nm_matmul_expand_q4(x, qweight, scales, zeros, group, qindices, n, m, None), x.double() @ wq.t(),
              dtype, f"expand q4 {n}:{m} M={rows}")
        kept = unpack_nm(torch.ones_like(values, dtype=torch.float64), indices, n, m, k).bool()
        check(kernels.nm_matmul_dvalues(dy, x, indices, n, m, dtype), (dy.double().t() @ x.double())[kept].reshape(values.shape),
              dtype, f"dvalues {n}:{m} M={rows}")


def test_triton_every_output_written(kernels, monkeypatch):
    """NaN-poisoned allocations (outputs and split partials) on a shape that splits K."""
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))
    values, indices = make_nm(300, 8192, 2, 8, torch.float16)
    x = make_x(3, 8192, torch.float16)
    assert kernels.decode_k_split(3, 300, values.shape[1], x.device) > 1
    for fn in (kernels.nm_matmul_decode, kernels.nm_matmul_tile):
        check(fn(x, values, indices, 2, 8, None), reference(x, values, indices, 2, 8), torch.float16, fn.__name__)
    dy = make_x(3, 300, torch.float16)
    check(kernels.nm_matmul_dx(dy, values, indices, 2, 8, 8192),
          dy.double() @ unpack_nm(values.float(), indices, 2, 8, 8192).double(), torch.float16, "nm_matmul_dx")


# --------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (3, 8), (7, 8), (4, 16), (1, 16)])
@pytest.mark.parametrize("n_out,k", [(4096, 4096), (37, 208), (300, 11008), (64, 16400)])
def test_cuda_matches_float64(ext, n_out, k, n, m, dtype):
    """Every pattern; K = 16400 spans several x tiles (8192 / MB columns a tile);
    KK % 8 != 0 (3:4, 7:8, 1:16 at K = 208) takes the scalar values path; N off the 8-row blocks."""
    values, indices = make_nm(n_out, k, n, m, dtype)
    bias = torch.randn(n_out, device=DEV).to(dtype)
    for rows in (1, 2, 3, 5, 8):
        x = make_x(rows, k, dtype, seed=rows)
        y = cuda_decode.nm_linear_decode(x, values, indices, n, m, bias if rows % 2 else None)
        assert y.shape == (rows, n_out) and y.dtype == dtype
        check(y, reference(x, values, indices, n, m, bias if rows % 2 else None), dtype, f"cuda {n}:{m} M={rows}")


def test_cuda_every_output_written_and_misaligned_views(ext):
    values, indices = make_nm(13, 4100, 3, 4, torch.float16)  # KK = 3075 (odd): scalar values path
    x = make_x(3, 4100, torch.float16)  # K % 8 != 0: scalar staging path
    y = torch.full((3, 13), float("nan"), dtype=torch.float16, device=DEV)
    ext.sparse_decode(x.data_ptr(), values.data_ptr(), indices.data_ptr(), 0, y.data_ptr(), 3, 4100, 13, 3, 4, 0,
                      torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    check(y, reference(x, values, indices, 3, 4), torch.float16, "raw call")
    values, indices = make_nm(64, 4096, 2, 4, torch.float16)
    vo = torch.empty(values.numel() + 1, dtype=values.dtype, device=DEV)[1:].view_as(values)
    vo.copy_(values)  # 2 bytes off 16-byte alignment: scalar values path
    xo = torch.empty(2 * 4096 + 1, dtype=torch.float16, device=DEV)[1:].view(2, 4096)
    xo.copy_(make_x(2, 4096, torch.float16))
    check(cuda_decode.nm_linear_decode(xo, vo, indices, 2, 4), reference(xo, values, indices, 2, 4), torch.float16,
          "misaligned")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,group", [(2, 4, 128), (1, 4, 32), (3, 4, 64), (2, 8, 64), (7, 8, 32), (4, 16, 128)])
@pytest.mark.parametrize("n_out,k", [(4096, 4096), (37, 208), (300, 11008), (64, 16400)])
def test_cuda_q4_matches_float64(ext, n_out, k, n, m, group, dtype):
    """4-bit kept values: every pattern family and group size; KK off the group size (a padded
    last group: 3:4, 7:8, K = 208), several x tiles (K = 16400), N off the 8-row blocks."""
    qweight, scales, zeros, indices, dequant = make_q4(n_out, k, n, m, group)
    bias = torch.randn(n_out, device=DEV).to(dtype)
    for rows in (1, 2, 3, 5, 8):
        x = make_x(rows, k, dtype, seed=rows)
        b = bias if rows % 2 else None
        y = cuda_decode.nm_linear_decode(x, qweight, indices, n, m, b, qscales=scales, qzeros=zeros, group_size=group)
        assert y.shape == (rows, n_out) and y.dtype == dtype
        check(y, reference(x, dequant, indices, n, m, b), dtype, f"cuda q4 {n}:{m} g{group} M={rows}")


def test_cuda_q4_raw_call_writes_every_output(ext):
    qweight, scales, zeros, indices, dequant = make_q4(13, 4100, 3, 4, 32)  # KK = 3075: padded last group
    x = make_x(3, 4100, torch.bfloat16)
    y = torch.full((3, 13), float("nan"), dtype=torch.bfloat16, device=DEV)
    ext.sparse_decode(x.data_ptr(), qweight.data_ptr(), indices.data_ptr(), 0, y.data_ptr(), 3, 4100, 13, 3, 4, 1,
                      torch.cuda.current_stream().cuda_stream, scales.data_ptr(), zeros.data_ptr(), 32)
    torch.cuda.synchronize()
    check(y, reference(x, dequant, indices, 3, 4), torch.bfloat16, "raw q4 call")
    with pytest.raises(ValueError, match="group_size must be 0"):
        ext.sparse_decode(x.data_ptr(), qweight.data_ptr(), indices.data_ptr(), 0, y.data_ptr(), 3, 4100, 13, 3, 4, 1,
                          0, scales.data_ptr(), zeros.data_ptr(), 16)


def test_op_routes_to_cuda_at_small_m(ext):
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.sparse import ops

    values, indices = make_nm(512, 1024, 2, 8, torch.bfloat16)
    x = make_x(4, 1024, torch.bfloat16)
    assert ops._nm_backend(x, values, 2, 8, "auto") == "cuda"
    with use_backend("cuda"):
        y = ops.nm_linear(x, values, indices, n=2, m=8, in_features=1024)
    check(y, reference(x, values, indices, 2, 8), torch.bfloat16, "op pinned to cuda")
    qweight, scales, zeros, qindices, dequant = make_q4(512, 1024, 2, 8, 128)
    assert ops._nm_backend(x, qweight, 2, 8, "auto", 128) == "cuda"
    with use_backend("cuda"):
        y = ops.nm_linear(x, qweight, qindices, n=2, m=8, in_features=1024, qscales=scales, qzeros=zeros, group_size=128)
    check(y, reference(x, dequant, qindices, 2, 8), torch.bfloat16, "q4 op pinned to cuda")


# --------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("which,rows", [("cuda", 1), ("cuda", 8), ("decode", 1), ("decode", 3), ("tile", 64),
                                        ("expand", 256)])
def test_cuda_graph_capture_and_replay(kernels, which, rows, request):
    if which == "cuda":
        request.getfixturevalue("ext")  # the CUDA module, built if needed
    fns = {"cuda": cuda_decode.nm_linear_decode, "decode": kernels.nm_matmul_decode, "tile": kernels.nm_matmul_tile,
           "expand": kernels.nm_matmul_expand}
    values, indices = make_nm(4096, 4096, 2, 4, torch.float16)
    bias = torch.randn(4096, device=DEV).half()
    x = make_x(rows, 4096, torch.float16)
    graph, y_static = capture_graph(lambda: fns[which](x, values, indices, 2, 4, bias))
    for seed in range(2):  # replay on fresh inputs copied into the captured buffer
        x.copy_(make_x(rows, 4096, torch.float16, seed=10 + seed))
        graph.replay()
        torch.cuda.synchronize()
        check(y_static, reference(x, values, indices, 2, 4, bias), torch.float16, f"graph {which} M={rows}")
