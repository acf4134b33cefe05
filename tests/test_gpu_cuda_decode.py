"""GPU lane: the hand-written CUDA decode kernel (csrc/lowrank_decode.cu) against plain torch.

Uses the installed ``lowrank_ops._C`` when it loads, else builds csrc/ for this GPU into the
cache (needs nvcc). Error measure: ‖out − ref‖ / ‖ref‖ against a float64 reference of the same
fp16/bf16 inputs.
"""
import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.lowrank import cuda_decode

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
DTYPES = [torch.float16, torch.bfloat16]
# (K, N, R): aligned and odd sizes; R up to 1024 (> 48 KB of shared memory at M = 16); K long
# enough for several phase-1 splits; tiny shapes with masked tails everywhere.
SHAPES = [
    (4096, 4096, 64),
    (4104, 1030, 1024),
    (1000, 777, 33),
    (7, 5, 3),
    (8192, 11, 8),
    (333, 4096, 255),
    (2048, 96, 1000),
    (1, 1, 1),
]


def _make(m, k, n, r, dtype, bias, offset=0, dev="cuda"):
    x = torch.randn(m * k + offset, dtype=dtype, device=dev)[offset:].view(m, k)
    v = (torch.randn(r, k, device=dev) / k**0.5).to(dtype)
    u = (torch.randn(n, r, device=dev) / r**0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=dev) if bias else None
    return x, v, u, b


def _ref(x, v, u, b):
    y = (x.double() @ v.double().t()) @ u.double().t()
    return y + b.double() if b is not None else y


def _rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed element)"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _launch_poisoned(ext, x, v, u, b):
    """Call _C directly with NaN-filled y and workspace: every element must be written."""
    m, k = x.shape
    n, r = u.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = ext.lowrank_decode_splits(m, k, r, sms)
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    ws = torch.full((splits * m * r,), float("nan"), dtype=torch.float32, device=x.device)
    code = {torch.float16: ext.DTYPE_FLOAT16, torch.bfloat16: ext.DTYPE_BFLOAT16}[x.dtype]
    ext.lowrank_decode(
        x.data_ptr(), v.data_ptr(), u.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), ws.data_ptr(),
        m, k, n, r, splits, sms, code, torch.cuda.current_stream().cuda_stream,
    )
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%d-N%d-R%d" % s)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_all_m(ext, dtype, bias, shape):
    k, n, r = shape
    for m in range(1, 17):
        x, v, u, b = _make(m, k, n, r, dtype, bias)
        ref = _ref(x, v, u, b)
        out = cuda_decode.lowrank_decode(x, v, u, b)
        assert out.shape == (m, n) and out.dtype == dtype
        assert _rel_err(out, ref) < TOL[dtype], (m, shape)
        poisoned = _launch_poisoned(ext, x, v, u, b)
        torch.cuda.synchronize()
        assert _rel_err(poisoned, ref) < TOL[dtype], ("poisoned", m, shape)
        assert torch.equal(out, poisoned), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_unaligned_pointers_take_the_scalar_path(ext, dtype, m):
    k, n, r = 1024, 300, 64
    x, v, u, b = _make(m, k, n, r, dtype, True, offset=1)  # x two bytes past 16-byte alignment
    u_off = torch.empty(n * r + 3, dtype=dtype, device="cuda")[3:].view(n, r)
    u_off.copy_(u)
    assert cuda_decode.vector_paths(x, v, u_off) == (False, False)
    out = cuda_decode.lowrank_decode(x, v, u_off, b)
    assert _rel_err(out, _ref(x, v, u, b)) < TOL[dtype]


def test_through_the_op_with_cuda_pinned(ext):
    from lowrank_ops.lowrank.ops import lowrank_linear

    x, v, u, b = _make(4, 512, 384, 32, torch.float16, True)
    with use_backend("cuda"):
        out = lowrank_linear(x, v, u, b)
    assert _rel_err(out, _ref(x, v, u, b)) < TOL[torch.float16]
    assert cuda_decode.supports(x, 32).ok


def test_side_stream(ext):
    x, v, u, b = _make(2, 2048, 1024, 128, torch.bfloat16, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = cuda_decode.lowrank_decode(x, v, u, b)
    torch.cuda.current_stream().wait_stream(s)
    assert _rel_err(out, _ref(x, v, u, b)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m,r", [(1, 64), (16, 1024)])
def test_cuda_graph_capture(ext, m, r):
    dtype = torch.float16
    x, v, u, b = _make(m, 2048, 1536, r, dtype, True)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        for _ in range(2):
            cuda_decode.lowrank_decode(static_x, v, u, b)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cuda_decode.lowrank_decode(static_x, v, u, b)
    for _ in range(3):
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(static_y, _ref(new_x, v, u, b)) < TOL[dtype]


def test_cuda_graph_capture_through_the_op(ext):
    from lowrank_ops.lowrank.ops import lowrank_linear

    x, v, u, b = _make(1, 1024, 512, 48, torch.bfloat16, False)
    static_x = x.clone()
    with use_backend("cuda"):
        lowrank_linear(static_x, v, u, b)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = lowrank_linear(static_x, v, u, b)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(static_y, _ref(new_x, v, u, b)) < TOL[torch.bfloat16]
