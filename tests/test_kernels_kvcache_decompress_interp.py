"""Interpreter lane: GEAR's decompression kernel (kernels/kvcache_decompress.py) against the
format's float64 reconstruction (``GEARKV.decompress_reference(float64)``).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or
on a CUDA device. Outputs are poisoned first. The kernel computes in fp32 and rounds once, so
every entry must be within one rounding of the output dtype of the exact value (plus 1e-6 of
the tensor's largest entry for the fp32 arithmetic): a looser bound than bit equality with the
torch reference (which rounds after every step in the output dtype), a far tighter one than a
norm. Formats: 2 and 4 bits, key groups of 16-128 tokens, blocks of 32-128 tokens, outliers,
fp16 and int8 factors of rank 1-8, head_dim 64, 80 (padded channels) and 128, input tails in
fp16, bf16 and fp32, written as fp16, bf16 and fp32; caches with no block, no tail, no token, and
one with an uncompressed prefix.
"""
import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, MARKS, ON_CUDA, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import kvcache_decompress as kernels  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, compress  # noqa: E402

OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# one rounding of each output dtype, relative: half an ulp; bf16 a whole one, because the
# interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest)
ROUNDING = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


def make_cache(cfg, seq, head_dim, dtype, batch=2, heads=3, seed=0):
    """compress() of keys with per-channel offsets and one large channel, and plain values."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, seq, head_dim, generator=gen) + 2 * torch.randn(head_dim, generator=gen)
    keys[..., 3] *= 8
    values = torch.randn(batch, heads, seq, head_dim, generator=gen)
    return compress(keys.to(dtype=dtype, device=DEVICE), values.to(dtype=dtype, device=DEVICE), cfg)


def assert_rounded_once(got, exact, dtype, what):
    assert got.dtype == dtype and got.shape == exact.shape, what
    got, exact = got.double().cpu(), exact.cpu()
    assert not got.isnan().any(), f"{what}: {int(got.isnan().sum())} unwritten (poisoned) entries"
    slack = 1e-6 * exact.abs().max().item()
    excess = ((got - exact).abs() - ROUNDING[dtype] * exact.abs()).max().item()
    assert excess <= slack, f"{what}: an entry is {excess:.3g} beyond one {dtype} rounding of the exact value"


FORMATS = [  # (GEARConfig options, head_dim, blocks, tail, input dtype)
    (dict(), 128, 3, 17, torch.float16),  # the default: 2 bits, G 32, B 64, 2 %, int8 rank 4
    (dict(prefix_tokens=3), 128, 2, 9, torch.float16),  # an uncompressed prefix before the blocks
    (dict(bits=4, group_size=16, buffer_tokens=48, rank=8, factor_bits=16, outlier_ratio=0.05), 80, 2, 5,
     torch.bfloat16),  # padded channels, 16-token tiles
    (dict(group_size=128, buffer_tokens=128, rank=1, outlier_ratio=0.1), 128, 1, 0, torch.float16),
    (dict(bits=4, rank=0, outlier_ratio=0.0, buffer_tokens=32), 64, 2, 31, torch.float32),
    (dict(group_size=16, rank=3, outlier_ratio=0.03), 64, 0, 40, torch.bfloat16),  # tail only
]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("options, head_dim, blocks, tail, dtype", FORMATS)
def test_kernel_matches_the_exact_reconstruction(options, head_dim, blocks, tail, dtype, out_dtype, poisoned):
    cfg = GEARConfig(**options)
    kv = make_cache(cfg, cfg.prefix_tokens + blocks * cfg.buffer_tokens + tail, head_dim, dtype, seed=head_dim + tail)
    assert (kv.prefix_len, kv.nblocks, kv.tail_len) == (cfg.prefix_tokens, blocks, tail)
    got = kernels.gear_decompress(kv, out_dtype)
    shape = (2, 3, kv.seq_len, head_dim)
    assert poisoned == [shape, shape]
    for name, g, exact in zip(("keys", "values"), got, kv.decompress_reference(torch.float64)):
        assert_rounded_once(g, exact, out_dtype, name)


def test_an_emptied_cache_launches_nothing(poisoned):
    kv = make_cache(GEARConfig(), 70, 64, torch.float16).keep_blocks(0)  # a rollback to the prefix token
    k, v = kernels.gear_decompress(kv, torch.float16)
    assert k.shape == v.shape == (2, 3, 1, 64)
    assert torch.equal(k, kv.prefix_keys) and torch.equal(v, kv.prefix_values)
    kv = make_cache(GEARConfig(prefix_tokens=0), 70, 64, torch.float16).keep_blocks(0)  # a rollback to no token
    k, v = kernels.gear_decompress(kv, torch.float16)
    assert k.shape == v.shape == (2, 3, 0, 64)


def test_decompress_dispatch(monkeypatch):
    """Pinned triton, ``GEARKV.decompress`` runs the kernel; automatic on CPU, the reference;
    dtypes the kernel cannot write and the CUDA backend are refused by name."""
    kv = make_cache(GEARConfig(), 80, 64, torch.float16)
    calls = []
    real = kernels.gear_decompress
    monkeypatch.setattr(kernels, "gear_decompress", lambda kv, dtype: calls.append(dtype) or real(kv, dtype))
    with use_backend("triton"):
        got = kv.decompress()
        with pytest.raises(ValueError, match="gear_decompress.*float64"):
            kv.decompress(torch.float64)
    assert calls == [torch.float16]
    want = kv.decompress_reference(torch.float64)
    for g, w in zip(got, want):
        assert_rounded_once(g, w, torch.float16, "pinned")
    with use_backend("cuda"), pytest.raises(ValueError, match="no CUDA .* kernel for GEAR decompression"):
        kv.decompress()
    kv.decompress(torch.float32)
    assert calls == [torch.float16] + ([torch.float32] if ON_CUDA else [])  # CPU: automatic is the reference
    with pytest.raises(ValueError, match="dtype"):
        kernels.gear_decompress(kv, torch.int8)


def test_compile_cases_are_listed():
    names = [case.name for case in kernels.COMPILE_CASES]
    assert len(names) == len(set(names)) == 4


# --------------------------------------------------------------------------- gpu lane
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decompress_at_decode_shapes(dtype):
    """The compiled kernel at a decode-sized cache (automatic dispatch on CUDA takes it): within one
    rounding of the exact reconstruction, and its peak memory is the two outputs (the torch
    reference's temporaries take several times that)."""
    kv = make_cache(GEARConfig(), 4096 + 37, 128, dtype, batch=4, heads=8, seed=7)
    out_bytes = 2 * kv.batch * kv.kv_heads * kv.seq_len * kv.head_dim * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = kv.decompress()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= out_bytes * 1.01
    for name, g, exact in zip(("keys", "values"), got, kv.decompress_reference(torch.float64)):
        assert_rounded_once(g, exact, dtype, name)
