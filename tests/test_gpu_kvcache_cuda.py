"""GPU lane for the CUDA GEAR decode-attention kernel (csrc/gear_decode.cu; pytest -m gpu).

Every case compares the kernel with the float64 reference attention of the same compressed
cache, on fresh random data: 2 and 4 bits, head_dim 128 and 64, ranks 0 / 4 / 8, outliers on and
off, fp16 and int8 factors, group sizes 16-128, fp16 and bf16, q rows per kv head 1-32 (GQA 4:1 and 8:1, q_len 1-4,
two row blocks), a partial tail, no tail, a cache that is only tail, left padding and a fully
masked sequence, one split (the kernel writes the output itself) and many, CUDA-graph replay,
programmatic dependent launches (sm_90) against plain ones.
"""
from __future__ import annotations

import os

import pytest
import torch

import gear_cuda_cases as cases
from gear_cuda_cases import BF16, F16, FORMATS, TOL, assert_matches_reference
from gear_cuda_cases import fmt as _fmt
from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import use_backend
from lowrank_ops.kvcache import attention, attention_reference
from lowrank_ops.kvcache import cuda_decode

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Skip without the CUDA extension; fail instead where it must exist (LOWRANK_OPS_REQUIRE_CUDA_EXT=1,
    set by bench/device_check.sh after its build)."""
    if cuda_ext.load() is None:
        why = f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}"
        if os.environ.get("LOWRANK_OPS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(why)
        pytest.skip(why)


def make_cache(batch, kv_heads, seq, head_dim, dtype, seed, **cfg):
    return cases.make_cache(batch, kv_heads, seq, head_dim, dtype, seed, DEV, **cfg)


def check(q, kv, mask, what, num_splits=None):
    out = cuda_decode.gear_decode(q, kv, mask, q.shape[-1] ** -0.5, num_splits=num_splits)
    return out, assert_matches_reference(out, q, kv, mask, what)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_vs_reference(name, dtype):
    head_dim, cfg = _fmt(name)
    seq = 2048 + 37  # partial tail
    kv = make_cache(2, 4, seq, head_dim, dtype, seed=len(name), **cfg)
    q = torch.randn(2, 16, 1, head_dim, device=DEV, dtype=dtype)
    mask = torch.ones(2, seq, dtype=torch.bool, device=DEV)
    mask[1, :300] = False  # left padding
    check(q, kv, mask, f"{name} {dtype}")
    check(q, kv, None, f"{name} {dtype} no mask")


@pytest.mark.parametrize("q_heads,kv_heads,q_len", [(8, 8, 1), (32, 8, 2), (32, 8, 4), (32, 4, 3), (32, 1, 1)],
                         ids=["M1", "M8", "M16", "M24-two-blocks", "M32-two-blocks"])
def test_rows_per_kv_head(q_heads, kv_heads, q_len):
    head_dim, cfg = _fmt("2b+2%+r4")
    kv = make_cache(1, kv_heads, 1024 + 5, head_dim, F16, seed=q_heads * 10 + q_len, **cfg)
    q = torch.randn(1, q_heads, q_len, head_dim, device=DEV, dtype=F16)
    check(q, kv, None, f"{q_heads}q/{kv_heads}kv q_len {q_len}")


@pytest.mark.parametrize("seq", [64 * 16, 37, 64 + 1, 16], ids=["no-tail", "tail-only", "one-block+1", "tail-16"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_sequence_shapes(seq, dtype):
    head_dim, cfg = _fmt("4b+2%+r4")
    kv = make_cache(3, 2, seq, head_dim, dtype, seed=seq, **cfg)
    q = torch.randn(3, 8, 1, head_dim, device=DEV, dtype=dtype)
    check(q, kv, None, f"seq {seq} {dtype}")


@pytest.mark.parametrize("num_splits", [1, 2, 7, 1000])
def test_split_counts_agree(num_splits):
    head_dim, cfg = _fmt("2b+2%+r4")
    kv = make_cache(2, 8, 4096 + 21, head_dim, F16, seed=5, **cfg)
    q = torch.randn(2, 32, 1, head_dim, device=DEV, dtype=F16)
    out, _ = check(q, kv, None, f"{num_splits} splits", num_splits=num_splits)
    again = cuda_decode.gear_decode(q, kv, None, head_dim ** -0.5, num_splits=num_splits)
    assert torch.equal(out, again), "the kernel is not deterministic"


def test_fully_masked_sequence_gives_zeros():
    head_dim, cfg = _fmt("2b+2%+r4")
    seq = 512 + 9
    kv = make_cache(2, 2, seq, head_dim, F16, seed=11, **cfg)
    q = torch.randn(2, 8, 1, head_dim, device=DEV, dtype=F16)
    mask = torch.ones(2, seq, dtype=torch.bool, device=DEV)
    mask[0] = False
    out = cuda_decode.gear_decode(q, kv, mask, head_dim ** -0.5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64)
    err = ((out[1].double() - ref[1]).norm() / ref[1].norm()).item()
    assert err < TOL[F16]


def test_attention_through_cuda_backend_and_graph_replay():
    head_dim, cfg = _fmt("2b+2%+r4")
    kv = make_cache(1, 8, 8192 + 3, head_dim, F16, seed=3, **cfg)
    q = torch.randn(1, 32, 1, head_dim, device=DEV, dtype=F16)
    from lowrank_ops.kvcache.ops import _attention_backend

    assert cuda_decode.supports(q, kv).preferred and _attention_backend(q, kv) == "cuda"  # eager, small
    with use_backend("cuda"):
        eager = attention(q, kv)
        static_q = q.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured_choice = _attention_backend(static_q, kv)  # what automatic dispatch would take here
            static_out = attention(static_q, kv)
        fresh = torch.randn_like(q)
        static_q.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
    assert captured_choice == "triton"  # under capture the Triton kernel is the faster one
    ref = attention_reference(fresh.double(), kv, None, None, compute_dtype=torch.float64)
    assert ((static_out.double() - ref).norm() / ref.norm()).item() < TOL[F16]
    with use_backend("cuda"):
        assert torch.equal(eager, attention(q, kv))


def test_int8_factors_are_served_pinned_and_left_to_triton_automatically():
    head_dim, cfg = _fmt("2b+2%+r4-i8")
    kv = make_cache(1, 8, 1024 + 3, head_dim, F16, seed=7, **cfg)
    q = torch.randn(1, 32, 1, head_dim, device=DEV, dtype=F16)
    from lowrank_ops.kvcache.ops import _attention_backend

    verdict = cuda_decode.supports(q, kv)
    assert verdict.ok and not verdict.preferred and _attention_backend(q, kv) == "triton"
    with use_backend("cuda"):
        out = attention(q, kv)
    ref = attention_reference(q.double(), kv, None, None, compute_dtype=torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[F16]


def test_a_causal_chunk_goes_to_triton_automatically():
    """Assisted decoding's draft check (7 causal query tokens): the CUDA kernel refuses it, automatic
    dispatch takes Triton, and the result is the causal reference."""
    head_dim, cfg = _fmt("2b+2%+r4")
    kv = make_cache(1, 8, 1024 + 3, head_dim, F16, seed=9, **cfg)
    q = torch.randn(1, 32, 7, head_dim, device=DEV, dtype=F16)
    from lowrank_ops.kvcache.ops import _attention_backend

    assert cuda_decode.supports(q, kv).ok and not cuda_decode.supports(q, kv, causal=True).ok
    assert _attention_backend(q, kv, causal=True) == "triton"
    out = attention(q, kv, causal=True)
    ref = attention_reference(q.double(), kv, None, None, compute_dtype=torch.float64, causal=True)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[F16]


def test_unserved_configuration_is_refused_by_name():
    head_dim, cfg = _fmt("2b+2%+r4")
    cfg["rank"] = 2
    kv = make_cache(1, 2, 256, head_dim, F16, seed=1, **cfg)
    q = torch.randn(1, 8, 1, head_dim, device=DEV, dtype=F16)
    verdict = cuda_decode.supports(q, kv)
    assert not verdict.ok and "rank=2" in verdict.why
    with pytest.raises(ValueError, match="rank=2"):
        cuda_decode.gear_decode(q, kv, None, 0.1)


def _chained_calls(q, kv, calls, dependent_launch):
    """``calls`` decode calls back to back, each one's output (q's shape, written by its combine
    kernel) the next one's q: a split kernel that read q before the combine kernel before it had
    written all of it would make the chain differ from the serialized one."""
    outs = []
    for _ in range(calls):
        q = cuda_decode.launch(q, kv, None, q.shape[-1] ** -0.5, dependent_launch=dependent_launch)
        outs.append(q)
    return torch.stack(outs)


def test_dependent_launches_match_serialized_ones_eager_and_in_a_graph():
    """On sm_90 the split and combine kernels launch with programmatic stream serialization by
    default (griddepcontrol); a chain of dependent calls must give bit for bit what plain launches
    give, eagerly and replayed from a CUDA graph (programmatic edges). Before sm_90 the default is
    plain launches, so both arms agree trivially."""
    index = torch.cuda.current_device()
    assert cuda_ext.dependent_launch(index) == (torch.cuda.get_device_capability(index)[0] >= 9)
    head_dim, cfg = _fmt("2b+2%+r4")
    kv = make_cache(1, 8, 8192 + 3, head_dim, F16, seed=19, **cfg)
    q = torch.randn(1, 32, 1, head_dim, device=DEV, dtype=F16)
    serialized = _chained_calls(q, kv, 8, dependent_launch=False)
    assert torch.equal(_chained_calls(q, kv, 8, dependent_launch=None), serialized)
    static_q = q.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = _chained_calls(static_q, kv, 8, dependent_launch=None)
    fresh = torch.randn_like(q)
    static_q.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, _chained_calls(fresh, kv, 8, dependent_launch=False))
