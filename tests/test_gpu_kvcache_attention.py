"""GPU lane for the GEAR decode-attention kernel (pytest -m gpu; collected and skipped without CUDA).

Real decode shapes: 4k context (+ a partial tail), 32 query heads over 8 kv heads (GQA 4:1),
head_dim 128, batch 2 with a left-padded sequence, q_len 1 and 4, a causal 7-token draft check, and
attention sinks (gpt-oss);
2 and 4 bits with outliers
and low rank (and plain 2-bit), fp16 and bf16 (GEAR's default in both). Checked against the float64 reference attention of
the same compressed cache, through the kernel and through ``attention()`` with the triton backend
pinned, and under CUDA-graph capture and replay (new q values copied into the captured input).

Caches are compressed once per configuration (module cache) with the reference compressor, so a
failure here is the attention kernel's, not the compressor's.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.kvcache import GEARConfig, attention, attention_reference, compress

pytestmark = pytest.mark.gpu

DEV = "cuda"
F16, BF16 = torch.float16, torch.bfloat16
TOL = {F16: 3e-3, BF16: 2e-2}
BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 32, 8, 128
SEQ = 4096 + 37
CONFIGS = {
    "2b+2%+r4": dict(bits=2, rank=4, outlier_ratio=0.02),
    "4b+2%+r2": dict(bits=4, rank=2, outlier_ratio=0.02, factor_bits=16),
    "2b": dict(bits=2, rank=0, outlier_ratio=0.0),
}


@functools.lru_cache(maxsize=None)
def cache_of(name: str, dtype: torch.dtype):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(sum(map(ord, name)))
    keys = torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, device=DEV, generator=gen) + \
        2 * torch.randn(HEAD_DIM, device=DEV, generator=gen)
    values = torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, device=DEV, generator=gen)
    with use_backend("reference"):
        return compress(keys.to(dtype), values.to(dtype), GEARConfig(group_size=32, buffer_tokens=64, **CONFIGS[name]))


def key_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=DEV)
    mask[1, :1000] = False  # left padding
    return mask


def reference(q, kv, mask):
    return attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64)


def assert_close(out, ref, dtype, what):
    assert not out.isnan().any(), f"{what}: NaN in the output"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g}"


# every (config, dtype) is one Triton compile + autotune: GEAR's default config in both dtypes,
# the others in one each
CASES = [("2b+2%+r4", F16), ("2b+2%+r4", BF16), ("4b+2%+r2", F16), ("2b", BF16)]


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d).split('.')[-1]}" for n, d in CASES])
def test_kernel_vs_reference(name, dtype, q_len):
    from lowrank_ops.kernels.kvcache_attention import gear_decode_attention

    kv = cache_of(name, dtype)
    q = torch.randn(BATCH, Q_HEADS, q_len, HEAD_DIM, device=DEV, dtype=dtype)
    mask = key_mask()
    out = gear_decode_attention(q, kv, mask, None)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference(q, kv, mask), dtype, f"{name} {dtype} q_len={q_len}")


@pytest.mark.parametrize("row", range(8))
def test_every_autotune_row(row):
    """Each autotune row of the split kernel pinned (its warps, stages, register cap, split count
    and whether it loads ahead; the autotuner times them all but a miscompiled row would only show when chosen) gives
    the reference result for GEAR's default configuration."""
    from lowrank_ops.kernels import kvcache_attention as kernels

    assert len(kernels._SPLIT_TABLE) == 8
    kv = cache_of("2b+2%+r4", F16)
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, device=DEV, dtype=F16)
    mask = key_mask()
    with kernels.pin_split_row(row) as config:
        out = kernels.gear_decode_attention(q, kv, mask, None)
        assert kernels.last_split_config() == str(config)
    assert_close(out, reference(q, kv, mask), F16, f"autotune row {row}: {config}")


def test_attention_op_triton():
    kv = cache_of("2b+2%+r4", F16)
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, device=DEV, dtype=F16)
    mask = key_mask()
    with use_backend("triton"):
        out = attention(q, kv, key_mask=mask)
    assert_close(out, reference(q, kv, mask), F16, "attention(triton)")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_causal_draft_check(dtype):
    """A 7-token draft check (the cache's newest tokens as queries, causal among them) through
    attention() with automatic dispatch: the causal reference, left padding included."""
    kv = cache_of("2b+2%+r4", dtype)
    q = torch.randn(BATCH, Q_HEADS, 7, HEAD_DIM, device=DEV, dtype=dtype)
    mask = key_mask()
    out = attention(q, kv, key_mask=mask, causal=True)
    ref = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=True)
    assert_close(out, ref, dtype, f"causal draft check {dtype}")
    assert (reference(q, kv, mask)[:, :, 0] - ref[:, :, 0]).abs().max() > 1e-3  # the causal mask mattered


@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_sinks(q_len):
    """gpt-oss's attention sinks through attention() with automatic dispatch (Triton: the CUDA
    kernel has none): the float64 reference with sinks, which differs from the sinkless output."""
    kv = cache_of("2b+2%+r4", BF16)
    q = torch.randn(BATCH, Q_HEADS, q_len, HEAD_DIM, device=DEV, dtype=BF16)
    sinks = 8 + 2 * torch.randn(Q_HEADS, device=DEV)  # e^8 ~ the softmax sum of ~3000 keys: a sink that counts
    mask = key_mask()
    out = attention(q, kv, key_mask=mask, causal=True, sinks=sinks)
    ref = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=True, sinks=sinks)
    assert_close(out, ref, BF16, f"sinks, q_len {q_len}")
    plain = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=True)
    assert ((ref - plain).norm() / ref.norm()).item() > 0.1  # the sinks mattered


def test_cuda_graph_capture_and_replay():
    from lowrank_ops.kernels.kvcache_attention import gear_decode_attention

    kv = cache_of("2b+2%+r4", F16)
    mask = key_mask()
    q = torch.randn(BATCH, Q_HEADS, 1, HEAD_DIM, device=DEV, dtype=F16)
    gear_decode_attention(q, kv, mask, None)  # autotune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gear_decode_attention(q, kv, mask, None)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference(q, kv, mask), F16, "graph replay")
