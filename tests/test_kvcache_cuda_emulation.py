"""Emulation lane for the CUDA GEAR decode-attention kernel: csrc/gear_decode.cu itself, built
with the host compiler against csrc/emulate/ (lowrank_ops/core/cuda_emulation.py) and run on CPU
tensors, against the float64 reference attention of the same compressed cache.

The kernel streams every warp's 16-token steps through a ring of cp.async step slots. The
emulation makes the ring's synchronization observable: copies land at the wait that retires
them (a read before the wait sees stale data) or at issue (a copy into a slot that other lanes
still read overwrites it), and lanes run in either order between collectives. The hazard tests
run one split, so each warp runs many steps and reuses every slot several times.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gear_cuda_cases import BF16, F16, FORMATS, TOL, assert_matches_reference, fmt, make_cache
from emulation_lane import MARKS
from lowrank_ops.core import cuda_emulation
from lowrank_ops.kvcache import attention_reference, cuda_decode

pytestmark = MARKS

@pytest.fixture(scope="module")
def module():
    return cuda_emulation.target()


def run(target, q, kv, mask=None, num_splits=None):
    return cuda_decode.launch(q, kv, mask, q.shape[-1] ** -0.5, num_splits, target=target)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_vs_reference(module, name, dtype):
    head_dim, cfg = fmt(name)
    seq = 512 + 37  # partial tail
    kv = make_cache(2, 2, seq, head_dim, dtype, seed=len(name), device="cpu", **cfg)
    q = torch.randn(2, 8, 1, head_dim, dtype=dtype)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[1, :100] = False  # left padding
    assert_matches_reference(run(module, q, kv, mask, num_splits=2), q, kv, mask, f"{name} {dtype}")
    assert_matches_reference(run(module, q, kv), q, kv, None, f"{name} {dtype}, default splits, no mask")


MODES = list(itertools.product(["wait", "issue"], ["forward", "reverse"]))


@pytest.mark.parametrize("copies,order", MODES, ids=[f"copies-at-{c}-{o}" for c, o in MODES])
@pytest.mark.parametrize("name", ["2b+2%+r4", "2b+2%+r4-i8", "4b+r8", "2b+5%+r4-g16-b48"])
def test_ring_synchronization_under_every_emulated_timing(module, monkeypatch, copies, order, name):
    monkeypatch.setenv(cuda_emulation.COPIES_ENV, copies)
    monkeypatch.setenv(cuda_emulation.ORDER_ENV, order)
    head_dim, cfg = fmt(name)
    seq = 1024 + 21  # one split: each warp runs 16 steps, every slot reused
    kv = make_cache(1, 1, seq, head_dim, F16, seed=2, device="cpu", **cfg)
    q = torch.randn(1, 4, 1, head_dim, dtype=F16)
    mask = torch.rand(1, seq) > 0.1
    assert_matches_reference(run(module, q, kv, mask, num_splits=1), q, kv, mask, f"{name} {copies} {order}")


@pytest.mark.parametrize("q_heads,kv_heads,q_len", [(2, 2, 1), (16, 2, 1), (8, 1, 3), (24, 1, 1)],
                         ids=["M1", "M8", "M24-two-blocks", "M24-gqa"])
def test_rows_per_kv_head(module, q_heads, kv_heads, q_len):
    head_dim, cfg = fmt("2b+2%+r4")
    kv = make_cache(1, kv_heads, 256 + 5, head_dim, F16, seed=q_heads + q_len, device="cpu", **cfg)
    q = torch.randn(1, q_heads, q_len, head_dim, dtype=F16)
    assert_matches_reference(run(module, q, kv), q, kv, None, f"{q_heads}q/{kv_heads}kv q_len {q_len}")


@pytest.mark.parametrize("seq", [64 * 6, 37, 64 + 1, 16], ids=["no-tail", "tail-only", "one-block+1", "tail-16"])
def test_sequence_shapes(module, seq):
    head_dim, cfg = fmt("4b+2%+r4")
    kv = make_cache(2, 2, seq, head_dim, F16, seed=seq, device="cpu", **cfg)
    q = torch.randn(2, 8, 1, head_dim, dtype=F16)
    assert_matches_reference(run(module, q, kv), q, kv, None, f"seq {seq}")


@pytest.mark.parametrize("num_splits", [1, 3, 1000])
def test_split_counts_agree_and_repeat_exactly(module, num_splits):
    head_dim, cfg = fmt("2b+2%+r4")
    kv = make_cache(1, 2, 640 + 9, head_dim, F16, seed=5, device="cpu", **cfg)
    q = torch.randn(1, 8, 1, head_dim, dtype=F16)
    out = run(module, q, kv, num_splits=num_splits)
    assert_matches_reference(out, q, kv, None, f"{num_splits} splits")
    assert torch.equal(out, run(module, q, kv, num_splits=num_splits)), "the kernel is not deterministic"


def test_dependent_launch_flag_reaches_the_kernels(module):
    """The binding takes the flag (sm_90's programmatic launches); the emulation runs launches in
    order, so the result is the plain launches' bit for bit."""
    head_dim, cfg = fmt("2b+2%+r4")
    kv = make_cache(1, 2, 640 + 9, head_dim, F16, seed=5, device="cpu", **cfg)
    q = torch.randn(1, 8, 1, head_dim, dtype=F16)
    runs = [cuda_decode.launch(q, kv, None, head_dim ** -0.5, 5, target=module, dependent_launch=flag)
            for flag in (True, False)]
    assert torch.equal(*runs)


def test_combine_batches_and_clamped_splits(module):
    """head_dim 64, 69 splits (one step each): the combine kernel's warp 0 takes splits 0, 8, .., 64
    in three batches of four, the last holding one real split and three clamped repeats of split
    68 that must weigh nothing."""
    head_dim, cfg = fmt("2b+2%+r4-d64")
    kv = make_cache(1, 1, 64 * 17 + 5, head_dim, F16, seed=13, device="cpu", **cfg)
    q = torch.randn(1, 4, 1, head_dim, dtype=F16)
    assert_matches_reference(run(module, q, kv, num_splits=1000), q, kv, None, "69 splits")


def test_fully_masked_splits_weigh_nothing_in_the_combine(module):
    """Left padding over whole splits: their partials have max -inf and sum 0, and the combine's
    online rescale starts from such splits in some warps and meets them midway in others."""
    head_dim, cfg = fmt("2b+2%+r4")
    seq = 64 * 9 + 7
    kv = make_cache(2, 2, seq, head_dim, F16, seed=17, device="cpu", **cfg)
    q = torch.randn(2, 8, 1, head_dim, dtype=F16)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[0, : 16 * 13] = False  # splits 0-12 of 37 masked whole
    mask[1, 16 * 20 : 16 * 30] = False  # splits 20-29
    assert_matches_reference(run(module, q, kv, mask, num_splits=1000), q, kv, mask, "masked splits")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 4]), head_dim=st.sampled_from([64, 128]), rank=st.sampled_from([0, 4, 8]),
       factor_bits=st.sampled_from([8, 16]), group=st.sampled_from([16, 32, 64]),
       groups_per_block=st.sampled_from([1, 2, 3]),
       outliers=st.integers(0, 4), q_per_kv=st.sampled_from([1, 4, 8]), q_len=st.integers(1, 2),
       seq=st.integers(1, 700), num_splits=st.sampled_from([None, 1, 2, 5]), seed=st.integers(0, 2**16),
       prefix=st.sampled_from([0, 0, 1, 16]))
def test_random_configurations(module, bits, head_dim, rank, factor_bits, group, groups_per_block, outliers, q_per_kv,
                               q_len, seq, num_splits, seed, prefix):
    """The ring's edge cases together: blocks of one step (B = 16) to several groups, a warp's run
    starting mid-group and mid-block, runs shorter than the ring, tails of any length, caches that
    are only tail (or only prefix), uncompressed prefixes, and 1-16 q rows per kv head."""
    buffer_tokens = group * groups_per_block
    if buffer_tokens % 16 or group > head_dim:
        return  # the format's own limits (B a multiple of 16, G at most head_dim)
    cfg = dict(bits=bits, rank=rank, outlier_ratio=outliers / head_dim, group_size=group, buffer_tokens=buffer_tokens,
               factor_bits=factor_bits, prefix_tokens=prefix)
    kv = make_cache(1, 2, seq, head_dim, F16, seed=seed, device="cpu", **cfg)
    q = torch.randn(1, 2 * q_per_kv, q_len, head_dim, dtype=F16)
    assert_matches_reference(run(module, q, kv, num_splits=num_splits), q, kv, None, f"{cfg} seq {seq}")


# one split (the combine kernel then runs for the prefix alone), row 1's left padding masking the
# whole prefix; 16 prefix tokens (two per combine warp) over 3 splits, bf16, head_dim 64; a prefix
# and a tail only; a cache that is all prefix (no step: an empty split)
@pytest.mark.parametrize("name, prefix, seq, splits, dtype", [
    ("2b+2%+r4-i8", 3, 512 + 37, 1, F16), ("2b+2%+r4-d64", 16, 300, 3, BF16), ("4b+r8", 2, 2 + 21, None, F16),
    ("2b+2%+r4-i8", 8, 5, None, F16),
])
def test_uncompressed_prefix(module, name, prefix, seq, splits, dtype):
    head_dim, cfg = fmt(name)
    kv = make_cache(2, 2, seq, head_dim, dtype, seed=prefix, device="cpu", prefix_tokens=prefix, **cfg)
    assert kv.prefix_len == min(prefix, seq)
    kv.prefix_keys[:, :, 0] *= 6  # a sink token's large key: the prefix carries weight
    q = torch.randn(2, 8, 1, head_dim, dtype=dtype)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[1, : min(10, seq - 1)] = False  # left padding over the prefix
    ref = assert_matches_reference(run(module, q, kv, mask, num_splits=splits), q, kv, mask, f"{name} prefix {prefix}")
    assert_matches_reference(run(module, q, kv, None, num_splits=splits), q, kv, None, f"{name} prefix {prefix}, no mask")
    if seq > prefix:
        no_prefix = mask.clone()
        no_prefix[:, :prefix] = False
        without = attention_reference(q.double(), kv, no_prefix, None, compute_dtype=torch.float64)
        assert (ref[0] - without[0]).abs().max() > 0.05  # the prefix matters here


def test_fully_masked_sequence_gives_zeros(module):
    head_dim, cfg = fmt("2b+2%+r4")
    seq = 256 + 9
    kv = make_cache(2, 2, seq, head_dim, F16, seed=11, device="cpu", **cfg)
    q = torch.randn(2, 8, 1, head_dim, dtype=F16)
    mask = torch.ones(2, seq, dtype=torch.bool)
    mask[0] = False
    out = run(module, q, kv, mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64)
    assert ((out[1].double() - ref[1]).norm() / ref[1].norm()).item() < TOL[F16]
