"""Interpreter lane: the fused GEAR quantization kernel against ``compress.quantize_reference``.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or
on a CUDA device. Every output buffer is poisoned first (NaN / out-of-range integers), so an
unwritten element shows up. Under the interpreter the kernel is bit-exact (codes, scales,
zeros, outlier indices and values, residual). Compiled, it divides with IEEE rounding
(``div_rn``) as torch does, but may fuse ``x − (q − z)·s`` into an FMA: residuals and outlier
values may differ in the last bit, and a code may differ by one at a rounding tie.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, MARKS, ON_CUDA, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import kvcache_compress as kernels  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, compress  # noqa: E402
from lowrank_ops.kvcache.compress import ABS_SCALE_FLOOR, CLIP_STEPS, REL_SCALE_FLOOR, quantize_reference  # noqa: E402
from lowrank_ops.kvcache.format import TENSOR_FIELDS, unpack_last  # noqa: E402



@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


def data(b, h, t, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen) * (0.2 + 2 * torch.rand(d, generator=gen)) + torch.randn(d, generator=gen)
    values = torch.randn(b, h, t, d, generator=gen)
    keys[0, 0, 1, 3] = 40.0  # a heavy outlier
    return keys.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE)


def assert_same(kind, got, ref, bits):
    assert set(got) == set(ref)
    if ON_CUDA:
        diff = (unpack_last(got["codes"], bits).int() - unpack_last(ref["codes"], bits).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, kind
        torch.testing.assert_close(got["scale"], ref["scale"], rtol=1e-3, atol=0)
        torch.testing.assert_close(got["zero"], ref["zero"], rtol=1e-3, atol=1e-3)
        assert (got["out_idx"] == ref["out_idx"]).float().mean() > 0.999, kind
        torch.testing.assert_close(got["residual"], ref["residual"], rtol=0, atol=float(ref["scale"].float().max()))
        return
    for name in ("codes", "scale", "zero", "out_idx", "out_val", "residual"):
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape, (kind, name)
        assert torch.equal(got[name], ref[name]), (kind, name)


# (bits, dtype, head_dim, group, outlier ratio, b, h, tokens): both bit widths and dtypes,
# head dims off a power of two (48, 80: padded and masked channels), 0 / 1 / 3 / 8 outliers,
# one value group spanning the whole head (d = g = 64), several key groups per sequence.
CASES = [
    (2, torch.float16, 128, 32, 0.02, 1, 2, 64),
    (4, torch.bfloat16, 64, 64, 0.0, 2, 1, 64),
    (2, torch.float32, 48, 16, 0.02, 1, 1, 48),
    (4, torch.float16, 80, 16, 0.1, 1, 1, 16),
    (2, torch.bfloat16, 64, 32, 0.05, 1, 3, 32),
]


@pytest.mark.parametrize("clip, rule", [(True, "farthest"), (False, "extremes"), (True, "extremes")])
@pytest.mark.parametrize("bits, dtype, d, g, ratio, b, h, t", CASES)
def test_kernel_matches_reference(bits, dtype, d, g, ratio, b, h, t, clip, rule):
    cfg = GEARConfig(bits=bits, group_size=g, outlier_ratio=ratio, buffer_tokens=max(g, 16) * (t // g), rank=0,
                     clip_search=clip, outlier_rule=rule)
    keys, values = data(b, h, t, d, dtype, seed=bits * 1000 + d)
    n_out = cfg.outliers_per_vector(d)
    got_k, got_v = kernels.gear_quantize(keys, values, bits, g, n_out, clip, rule)
    assert_same("key", got_k, quantize_reference(keys, cfg, "key"), bits)
    assert_same("value", got_v, quantize_reference(values, cfg, "value"), bits)


@pytest.mark.parametrize("rank", [0, 4])
def test_pinned_triton_compress_equals_reference_compress(rank):
    """Rank 0: the backends quantize the same inputs, so (interpreted) every field is equal. Rank 4:
    the joint fit's Triton program rounds unlike torch's matmuls, so the factors agree to rounding
    and the quantizer's inputs (the data less the first low-rank term) differ in the last bits,
    which can move a group's clipped range to the next ratio: the caches are compared decompressed."""
    cfg = GEARConfig(bits=2, group_size=32, rank=rank, outlier_ratio=0.02, buffer_tokens=32)
    keys, values = data(1, 2, 70, 64, torch.float16, seed=7)
    with use_backend("triton"):
        kv = compress(keys, values, cfg)
        kv.append(keys[:, :, :3], values[:, :, :3])
    with use_backend("reference"):
        ref = compress(keys, values, cfg)
        ref.append(keys[:, :, :3], values[:, :, :3])
    for name in TENSOR_FIELDS:
        a, b = getattr(kv, name), getattr(ref, name)
        if name.startswith("tail"):
            a, b = a[:, :, : kv.tail_len], b[:, :, : ref.tail_len]
        if "lr" in name:
            torch.testing.assert_close(a.float(), b.float(), atol=1.0 if a.dtype == torch.int8 else 2e-3, rtol=1e-3,
                                       msg=name)
        elif rank == 0 and not ON_CUDA:  # on a GPU, fp32 roundings may differ: see the decompressed caches below
            assert torch.equal(a, b), name
    for a, b in zip(kv.decompress(torch.float32), ref.decompress(torch.float32)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_scale_floors_and_clip_steps_agree_with_the_reference():
    assert kernels.REL_SCALE_FLOOR.value == REL_SCALE_FLOOR
    assert kernels.ABS_SCALE_FLOOR.value == ABS_SCALE_FLOOR
    assert kernels.CLIP_STEPS.value == CLIP_STEPS


def test_compile_cases_are_listed():
    names = [case.name for case in kernels.COMPILE_CASES]
    assert len(names) == len(set(names)) == 3


# --------------------------------------------------------------------------- gpu lane
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, d, g, ratio", [(2, 128, 32, 0.02), (4, 64, 32, 0.05)])
def test_gpu_kernel_at_real_shapes(dtype, bits, d, g, ratio):
    """Compiled kernel (Triton on the H100) vs the torch reference at decode-sized shapes; then the
    whole compress() on CUDA (automatic backend: triton) against the reference backend."""
    cfg = GEARConfig(bits=bits, group_size=g, outlier_ratio=ratio, buffer_tokens=64, rank=4)
    keys, values = data(4, 8, 320, d, dtype, seed=d + bits)
    n_out = cfg.outliers_per_vector(d)
    got_k, got_v = kernels.gear_quantize(keys, values, bits, g, n_out)
    assert_same("key", got_k, quantize_reference(keys, cfg, "key"), bits)
    assert_same("value", got_v, quantize_reference(values, cfg, "value"), bits)
    kv = compress(keys, values, cfg)
    with use_backend("reference"):
        ref = compress(keys, values, cfg)
    for a, b in zip(kv.decompress(torch.float32), ref.decompress(torch.float32)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
