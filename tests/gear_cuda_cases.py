"""What the gpu lane and the emulation lane of the CUDA GEAR kernel (csrc/gear_decode.cu) share:
the formats every case runs through, random caches, and the check against the float64
reference attention of the same compressed cache."""
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.kvcache import GEARConfig, attention_reference, compress

F16, BF16 = torch.float16, torch.bfloat16
TOL = {F16: 3e-3, BF16: 2e-2}

# (bits, rank, outlier_ratio, group_size, buffer_tokens, head_dim, factor_bits)
FORMATS = {
    "2b+2%+r4": (2, 4, 0.02, 32, 64, 128, 16),
    "4b+2%+r4": (4, 4, 0.02, 32, 64, 128, 16),
    "2b": (2, 0, 0.0, 32, 64, 128, 16),
    "4b+r8": (4, 8, 0.0, 64, 128, 128, 16),
    "2b+5%+r4-g16-b48": (2, 4, 0.05, 16, 48, 128, 16),
    "2b+2%+r4-d64": (2, 4, 0.02, 32, 64, 64, 16),
    "4b+3%-g64-d64": (4, 0, 0.03, 64, 64, 64, 16),
    "2b+r8-g128": (2, 8, 0.0, 128, 128, 128, 16),
    # int8 factors (the default storage)
    "2b+2%+r4-i8": (2, 4, 0.02, 32, 64, 128, 8),
    "4b+r8-i8": (4, 8, 0.0, 64, 128, 128, 8),
    "2b+2%+r8-d64-i8": (2, 8, 0.02, 32, 64, 64, 8),
    # the most outliers per vector the CUDA kernel stages (8 = round(6.25 % of 128)): every round
    # of its value-outlier placement and a partial pass of its unrolled key-outlier loop
    "2b+6.25%+r4-i8": (2, 4, 0.0625, 32, 64, 128, 8),
}


def fmt(name):
    """(head_dim, GEARConfig keyword arguments) of a FORMATS entry."""
    bits, rank, ratio, group, buf, head_dim, factor_bits = FORMATS[name]
    return head_dim, dict(bits=bits, rank=rank, outlier_ratio=ratio, group_size=group, buffer_tokens=buf,
                          factor_bits=factor_bits)


def make_cache(batch, kv_heads, seq, head_dim, dtype, seed, device, **cfg):
    """A cache compressed (reference backend) from random keys with per-channel offsets and values."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keys = torch.randn(batch, kv_heads, seq, head_dim, device=device, generator=gen) + \
        2 * torch.randn(head_dim, device=device, generator=gen)
    values = torch.randn(batch, kv_heads, seq, head_dim, device=device, generator=gen)
    with use_backend("reference"):
        return compress(keys.to(dtype), values.to(dtype), GEARConfig(**cfg))


def assert_matches_reference(out, q, kv, mask, what):
    """``out`` has q's shape and dtype, no NaN, and is within TOL of the float64 reference."""
    ref = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), f"{what}: NaN in the output"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[q.dtype], f"{what}: relative error {err:.3g} >= {TOL[q.dtype]:g}"
    return ref
