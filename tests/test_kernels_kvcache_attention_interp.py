"""Interpreter lane: the GEAR decode-attention kernel against the float64 reference attention of
the same compressed cache (``attention_reference`` on ``decompress(float64)``).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or on
a CUDA device. Every launcher allocation is NaN-filled first, so an unwritten workspace or output
element shows up. Caches come from ``compress`` on fresh random keys/values (batch 2, ragged key
masks with right and left padding). The (bits × rank × outliers) product is covered in full;
tail (empty / partial), GQA (4:1 / 1:1), head_dim (64 / 128, plus 80: padded channels), q_len
(1 / 2 / 3 / 17: several row blocks), dtype (fp16 / fp32, one bf16) and the split count are
sampled across it with co-prime periods so every value meets every path; key groups of 32 tokens
in 32-token blocks (one group per tile), 16 in 32-token blocks and 32 in 64-token blocks (tiles
spanning two groups), 16 in 48-token blocks (three tiles per block), and 128 (two tiles per
group); int8 and fp16 factors.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, MARKS, assert_close, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import kvcache_attention as kernels  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, attention, attention_reference, compress  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # softmax over thousands of dequantized keys
BATCH, KV_HEADS = 2, 2


# --------------------------------------------------------------------------- helpers
def make_cache(*, bits, rank, ratio, nblocks, tail, head_dim, dtype, buffer_tokens=32, group_size=32, factor_bits=8,
               prefix=0):
    """compress() of random (BATCH, KV_HEADS, prefix + nblocks·B + tail, head_dim) keys/values (keys
    with a per-channel offset and a few large entries, as real keys have)."""
    cfg = GEARConfig(bits=bits, rank=rank, outlier_ratio=ratio, buffer_tokens=buffer_tokens, group_size=group_size,
                     factor_bits=factor_bits, prefix_tokens=prefix)
    seq = prefix + nblocks * buffer_tokens + tail
    keys = torch.randn(BATCH, KV_HEADS, seq, head_dim) + torch.randn(head_dim) * 2
    keys[..., 3] *= 8
    values = torch.randn(BATCH, KV_HEADS, seq, head_dim)
    return compress(keys.to(dtype=dtype, device=DEVICE), values.to(dtype=dtype, device=DEVICE), cfg)


def ragged_mask(seq):
    """Batch row 0 right-padded (last 5 masked), row 1 left-padded (first 7 masked)."""
    mask = torch.ones(BATCH, seq, dtype=torch.bool)
    mask[0, max(seq - 5, 1):] = False
    mask[1, : min(7, seq - 1)] = False
    return mask.to(DEVICE)


def reference(q, kv, mask, scale):
    return attention_reference(q.double(), kv, mask, scale, compute_dtype=torch.float64)




@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


# --------------------------------------------------------------------------- kernel, direct
def _cases():
    out = []
    for i, (bits, rank, ratio) in enumerate(itertools.product((2, 4), (0, 4), (0.0, 0.02))):
        out.append(dict(
            bits=bits, rank=rank, ratio=ratio, nblocks=(2, 3, 1)[i % 3], tail=(0, 5, 19)[i % 3] if i % 4 else 0,
            head_dim=(64, 128)[i % 2], groups=(4, 1)[(i // 2) % 2], q_len=(1, 2, 3)[i % 3],
            dtype=(torch.float16, torch.float32)[(i // 3) % 2], splits=(None, 2, 1, 5)[i % 4],
            factor_bits=(8, 16)[(i // 4) % 2],
        ))
    # row blocks (4 heads × 17 tokens = 68 rows > 64); padded channels (80 → 128) with group 16
    # (tiles of 16 tokens), bf16; group 128 in blocks of 128 (two 64-token tiles per key group)
    out.append(dict(bits=4, rank=4, ratio=0.02, nblocks=2, tail=3, head_dim=64, groups=4, q_len=17,
                    dtype=torch.float16, splits=3, factor_bits=16))
    out.append(dict(bits=2, rank=4, ratio=0.05, nblocks=2, tail=7, head_dim=80, groups=2, q_len=1,
                    dtype=torch.bfloat16, splits=None, group_size=16))
    out.append(dict(bits=4, rank=2, ratio=0.02, nblocks=1, tail=70, head_dim=128, groups=1, q_len=1,
                    dtype=torch.float16, splits=None, group_size=128, buffer_tokens=128))
    # the default GEAR layout (G = 32, B = 64): 64-token tiles spanning two key groups
    out.append(dict(bits=2, rank=4, ratio=0.02, nblocks=3, tail=9, head_dim=128, groups=4, q_len=1,
                    dtype=torch.float16, splits=2, group_size=32, buffer_tokens=64))
    # a block that is not a power of two (B = 48, G = 16): 16-token tiles, three per block
    out.append(dict(bits=4, rank=2, ratio=0.02, nblocks=2, tail=20, head_dim=64, groups=2, q_len=2,
                    dtype=torch.float16, splits=None, group_size=16, buffer_tokens=48))
    return out


CASES = _cases()


def _id(c):
    return "{bits}b-r{rank}-o{ratio}-nb{nblocks}-t{tail}-d{head_dim}-g{groups}-q{q_len}-{d}-s{splits}-G{G}-f{f}".format(
        **c, d=str(c["dtype"]).split(".")[-1], G=c.get("group_size", 32), f=c.get("factor_bits", 8))


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_gear_decode_attention(case, poisoned):
    dtype, head_dim = case["dtype"], case["head_dim"]
    sizes = {k: case[k] for k in ("group_size", "buffer_tokens", "factor_bits") if k in case}
    kv = make_cache(bits=case["bits"], rank=case["rank"], ratio=case["ratio"], nblocks=case["nblocks"],
                    tail=case["tail"], head_dim=head_dim, dtype=dtype, **sizes)
    assert kv.tail_len == case["tail"] and kv.nblocks == case["nblocks"]
    q = torch.randn(BATCH, KV_HEADS * case["groups"], case["q_len"], head_dim).to(dtype=dtype, device=DEVICE)
    mask = ragged_mask(kv.seq_len)
    scale = 0.7 * head_dim**-0.5
    out = kernels.gear_decode_attention(q, kv, mask, scale, num_splits=case["splits"])
    assert poisoned, "the launcher allocated nothing through kernels._empty: poisoning is not in effect"
    assert out.dtype == dtype
    assert_close(out, reference(q, kv, mask, scale), dtype, _id(case), TOL)


def test_outliers_in_adjacent_channels():
    """fp16 tiles add outliers two channels at a time: here every token's four outliers sit in two
    channel pairs (6, 7 largest; 10, 11 smallest), so each pair holds two of them."""
    cfg = GEARConfig(bits=2, rank=0, outlier_ratio=0.0625, buffer_tokens=32, group_size=32)
    assert cfg.outliers_per_vector(64) == 4
    keys, values = torch.randn(2, BATCH, KV_HEADS, 2 * 32 + 3, 64).unbind(0)
    for x in (keys, values):
        x[..., 6:8] += 40.0 + torch.rand(x.shape[:-1] + (2,))
        x[..., 10:12] -= 40.0 + torch.rand(x.shape[:-1] + (2,))
    kv = compress(keys.half().to(DEVICE), values.half().to(DEVICE), cfg)
    assert set(kv.tensors()["value_out_idx"].unique().tolist()) == {6, 7, 10, 11}
    q = torch.randn(BATCH, KV_HEADS * 2, 1, 64).half().to(DEVICE)
    out = kernels.gear_decode_attention(q, kv, None, 0.1, num_splits=2)
    assert_close(out, reference(q, kv, None, 0.1), torch.float16, "adjacent outliers", TOL)


def test_bf16_query_beyond_fp16_range():
    """bf16 q meets the compressed tiles in fp16, scaled by a power of two per row: a query past
    fp16's range gives the reference's attention, not inf/NaN."""
    kv = make_cache(bits=4, rank=2, ratio=0.02, nblocks=2, tail=3, head_dim=64, dtype=torch.bfloat16)
    q = torch.randn(BATCH, KV_HEADS, 1, 64)
    q[..., 0] = 2e5 * torch.sign(q[..., 0])
    q = q.to(dtype=torch.bfloat16, device=DEVICE)
    out = kernels.gear_decode_attention(q, kv, None, 1.0, num_splits=2)
    assert out.isfinite().all()
    assert_close(out, reference(q, kv, None, 1.0), torch.bfloat16, "huge bf16 q", TOL)


def test_no_mask_default_scale_and_split_counts():
    """key_mask None, scale None (head_dim ** -0.5); every split count gives the same result,
    counts beyond the number of units are clamped."""
    kv = make_cache(bits=4, rank=4, ratio=0.02, nblocks=3, tail=9, head_dim=64, dtype=torch.float32)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64, device=DEVICE)
    ref = reference(q, kv, None, None)
    for splits in (None, 2, 50):
        out = kernels.gear_decode_attention(q, kv, None, None, num_splits=splits)
        assert_close(out, ref, torch.float32, f"splits={splits}", TOL)


def test_one_long_split_and_the_recorded_autotune_row():
    """One split walking every block gives the reference result too, and the launch records the
    autotune row it ran with."""
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=6, tail=3, head_dim=64, dtype=torch.float16)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    out = kernels.gear_decode_attention(q, kv, None, None, num_splits=1)
    assert_close(out, reference(q, kv, None, None), torch.float16, "one long split", TOL)
    row = kernels.last_split_config()
    assert row is not None and "num_warps: 4" in row and "maxnreg: None" in row, row


@pytest.mark.parametrize("factor_bits", [8, 16])
@pytest.mark.parametrize("rank", [1, 3, 5, 16, 20])
def test_factor_ranks_below_and_above_the_dot_width(rank, factor_bits):
    """Ranks that are not powers of two, below the dot's minimum width 16 (int8 factors are
    converted compact and padded after: _spread_columns) and above it."""
    kv = make_cache(bits=2, rank=rank, ratio=0.02, nblocks=2, tail=5, head_dim=64, dtype=torch.float16,
                    factor_bits=factor_bits)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    out = kernels.gear_decode_attention(q, kv, None, None, num_splits=2)
    assert_close(out, reference(q, kv, None, None), torch.float16, f"rank {rank}, {factor_bits}-bit factors", TOL)


@pytest.mark.parametrize("row", range(len(kernels._SPLIT_TABLE)))
def test_every_autotune_row(row):
    """Each autotune row pinned (here its split count: one wave at its programs per SM) gives the
    reference result and is the row the launch reports; the table and choices come back after."""
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=9, tail=5, head_dim=64, dtype=torch.float16)
    q = torch.randn(1, 4 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    kv1 = compress(*[x[:1] for x in kv.decompress(torch.float32)], kv.config)  # batch 1: many splits
    before = list(kernels._gear_split_kernel.configs)
    with kernels.pin_split_row(row) as config:
        out = kernels.gear_decode_attention(q, kv1, None, None)
        assert kernels.last_split_config() == str(config)
    assert_close(out, reference(q, kv1, None, None), torch.float16, f"row {row}", TOL)
    assert kernels._gear_split_kernel.configs == before


@pytest.mark.parametrize("units", [1, 2, 5, 9, 10, 33, 129, 200])
@pytest.mark.parametrize("columns", [1, 3, 8, 128, 1000])
@pytest.mark.parametrize("programs_per_sm", [1, 2, 3, 4])
def test_split_count_fills_one_wave(units, columns, programs_per_sm):
    """The split count of an autotune row: (splits × columns) within one wave of its programs per
    SM (unless one split per column already exceeds it), every split holding at least one unit
    when the kernel deals cdiv(units, splits) to each, at most MAX_SPLITS."""
    sms = kernels._sm_count(torch.device(DEVICE))
    splits = kernels._split_count(units, columns, programs_per_sm, torch.device(DEVICE))
    assert 1 <= splits <= min(units, kernels.MAX_SPLITS)
    assert splits == 1 or splits * columns <= programs_per_sm * sms
    per_split = -(-units // splits)
    assert (splits - 1) * per_split < units  # the last split is not empty


def test_fully_masked_row_is_zero_and_others_unharmed():
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=2, tail=4, head_dim=64, dtype=torch.float16)
    q = torch.randn(BATCH, KV_HEADS, 2, 64).to(dtype=torch.float16, device=DEVICE)
    mask = ragged_mask(kv.seq_len)
    mask[0] = False
    out = kernels.gear_decode_attention(q, kv, mask, None, num_splits=3)
    assert not out.isnan().any()
    assert (out[0] == 0).all(), "a row with every key masked must be 0"
    assert_close(out[1], reference(q, kv, mask, None)[1], torch.float16, "unmasked batch row", TOL)


def test_tail_only_cache():
    """No compressed block yet: the tail alone, exact, so plain attention over the raw keys/values
    is the reference."""
    cfg = GEARConfig(bits=2, rank=2, outlier_ratio=0.02, buffer_tokens=32, group_size=32, prefix_tokens=0)
    k, v = torch.randn(2, BATCH, KV_HEADS, 11, 64, device=DEVICE)
    kv = compress(k, v, cfg)
    assert (kv.nblocks, kv.tail_len) == (0, 11)
    q = torch.randn(BATCH, 2 * KV_HEADS, 2, 64, device=DEVICE)
    mask = ragged_mask(11)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 64**-0.5
    probs = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    ref = probs @ v.double().repeat_interleave(2, 1)
    assert_close(kernels.gear_decode_attention(q, kv, mask, None), ref, torch.float32, "tail only", TOL)


def test_after_append_matches_reference():
    """A cache grown by append (tail filled, one new block compressed) is read correctly."""
    kv = make_cache(bits=4, rank=4, ratio=0.02, nblocks=1, tail=30, head_dim=64, dtype=torch.float16)
    new = torch.randn(2, BATCH, KV_HEADS, 5, 64).to(dtype=torch.float16, device=DEVICE)
    kv.append(new[0], new[1])
    assert (kv.nblocks, kv.tail_len) == (2, 3)
    q = torch.randn(BATCH, 4 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    mask = ragged_mask(kv.seq_len)
    out = kernels.gear_decode_attention(q, kv, mask, None)
    assert_close(out, reference(q, kv, mask, None), torch.float16, "append", TOL)


# q_len 3 in the tail; 9 (a block compressed from the chunk's own tokens); 17 tokens × GQA 4 = 68
# rows: two row blocks, the second's rows starting mid-chunk
@pytest.mark.parametrize("new_tokens, groups, splits", [(3, 4, 2), (9, 2, None), (17, 4, 3)])
def test_causal_chunk(new_tokens, groups, splits):
    kv = make_cache(bits=2, rank=4, ratio=0.05, nblocks=2, tail=27, head_dim=64, dtype=torch.float16)
    new = torch.randn(2, BATCH, KV_HEADS, new_tokens, 64).to(dtype=torch.float16, device=DEVICE)
    kv.append(new[0], new[1])
    q = torch.randn(BATCH, groups * KV_HEADS, new_tokens, 64).to(dtype=torch.float16, device=DEVICE)
    mask = ragged_mask(kv.seq_len)
    mask[0, -5:] = True  # right padding would mask the chunk's own tokens
    out = kernels.gear_decode_attention(q, kv, mask, None, causal=True, num_splits=splits)
    want = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=True)
    assert_close(out, want, torch.float16, f"causal chunk of {new_tokens}", TOL)
    assert (reference(q, kv, mask, None)[:, :, 0] - want[:, :, 0]).abs().max() > 0.05  # the mask matters here


# one decode step over 3 splits with GQA 4 (sinks of four heads per kv head); a causal chunk of 5
# tokens over one split at GQA 2 (rows g · 5 + i take head g's sink); bf16
@pytest.mark.parametrize("q_len, groups, splits, dtype", [(1, 4, 3, torch.float16), (5, 2, 1, torch.bfloat16)])
def test_attention_sinks(q_len, groups, splits, dtype):
    """gpt-oss's sinks join each row's softmax sum in the combine kernel: the reference's result,
    a fully masked row 0, and far from the sinkless output."""
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=3, tail=6, head_dim=64, dtype=dtype)
    q = torch.randn(BATCH, groups * KV_HEADS, q_len, 64).to(dtype=dtype, device=DEVICE)
    sinks = (torch.randn(groups * KV_HEADS) * 2).to(DEVICE)
    mask = ragged_mask(kv.seq_len)
    mask[0] = False
    out = kernels.gear_decode_attention(q, kv, mask, None, causal=q_len > 1, sinks=sinks, num_splits=splits)
    want = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=q_len > 1, sinks=sinks)
    assert_close(out[1], want[1], dtype, "sinks", TOL)
    assert (out[0] == 0).all()
    assert (want[1] - reference(q, kv, mask, None)[1]).abs().max() > 0.05  # the sinks matter here


# a decode step over 2 splits at GQA 4 (row 1's left padding masks the whole prefix); a causal
# chunk of 5 over one split with sinks, bf16; a causal chunk reaching into the prefix (its first
# query, position 1, sees positions 0 and 1 only); the prefix alone (no block, no tail: one split
# that reads nothing); 16 prefix tokens (the combine kernel's whole tile), fp32
@pytest.mark.parametrize("prefix, nblocks, tail, q_len, groups, splits, dtype, sinks", [
    (3, 2, 6, 1, 4, 2, torch.float16, False), (4, 2, 9, 5, 2, 1, torch.bfloat16, True),
    (4, 0, 2, 5, 2, None, torch.float16, False), (5, 0, 0, 1, 2, None, torch.float16, False),
    (16, 1, 1, 1, 1, 3, torch.float32, False),
])
def test_uncompressed_prefix(prefix, nblocks, tail, q_len, groups, splits, dtype, sinks):
    """The cache's first tokens kept exactly are attended in the combine kernel: the reference's
    result (key mask, causal order, sinks), and they carry weight (large keys, as a sink token's)."""
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=nblocks, tail=tail, head_dim=64, dtype=dtype, prefix=prefix)
    assert (kv.prefix_len, kv.nblocks, kv.tail_len) == (prefix, nblocks, tail)
    kv.prefix_keys[:, :, 0] *= 6
    q = torch.randn(BATCH, groups * KV_HEADS, q_len, 64).to(dtype=dtype, device=DEVICE)
    sink_logits = (torch.randn(groups * KV_HEADS) * 2).to(DEVICE) if sinks else None
    mask = ragged_mask(kv.seq_len)
    mask[0, -5:] = True  # right padding would mask a causal chunk's own tokens
    out = kernels.gear_decode_attention(q, kv, mask, None, causal=q_len > 1, sinks=sink_logits, num_splits=splits)
    want = attention_reference(q.double(), kv, mask, None, compute_dtype=torch.float64, causal=q_len > 1,
                               sinks=sink_logits)
    assert_close(out, want, dtype, f"prefix {prefix}", TOL)
    if nblocks:
        no_prefix = mask.clone()
        no_prefix[:, :prefix] = False
        without = attention_reference(q.double(), kv, no_prefix, None, compute_dtype=torch.float64,
                                      causal=q_len > 1, sinks=sink_logits)
        assert (want[0] - without[0]).abs().max() > 0.05  # the prefix matters here


def test_prefix_fills_across_appends():
    """Tokens appended one update at a time fill the prefix first, then the tail and blocks: the
    cache equals one compressed at once, and the kernel reads it."""
    cfg = GEARConfig(bits=2, rank=4, outlier_ratio=0.02, buffer_tokens=32, group_size=32, prefix_tokens=4)
    k, v = torch.randn(2, BATCH, KV_HEADS, 75, 64).to(dtype=torch.float16, device=DEVICE)
    grown = compress(k[:, :, :2], v[:, :, :2], cfg)
    for start, stop in ((2, 3), (3, 40), (40, 75)):
        grown.append(k[:, :, start:stop], v[:, :, start:stop])
    once = compress(k, v, cfg)
    assert (grown.prefix_len, grown.nblocks, grown.tail_len) == (once.prefix_len, once.nblocks, once.tail_len) == (4, 2, 7)
    assert torch.equal(grown.prefix_keys, k[:, :, :4]) and torch.equal(grown.key_codes, once.key_codes)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    assert_close(kernels.gear_decode_attention(q, grown, None, None), reference(q, once, None, None), torch.float16,
                 "grown", TOL)


# --------------------------------------------------------------------------- public op, triton pinned
def test_attention_op_uses_kernel(monkeypatch):
    calls = []
    real = kernels.gear_decode_attention
    monkeypatch.setattr(kernels, "gear_decode_attention", lambda *a, **k: calls.append((len(a), k)) or real(*a, **k))
    kv = make_cache(bits=2, rank=4, ratio=0.02, nblocks=2, tail=6, head_dim=64, dtype=torch.float16)
    q = torch.randn(BATCH, 4 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    chunk_q = torch.randn(BATCH, 2 * KV_HEADS, 2, 64).to(dtype=torch.float16, device=DEVICE)
    mask = ragged_mask(kv.seq_len)
    sinks = torch.randn(2 * KV_HEADS, device=DEVICE)
    with use_backend("triton"):
        out = attention(q, kv, key_mask=mask)
        chunk = attention(chunk_q, kv, key_mask=mask, causal=True, sinks=sinks)
    assert [(n, k["causal"], k["sinks"] is not None) for n, k in calls] == [(4, False, False), (4, True, True)], \
        "the triton backend did not call gear_decode_attention(q, kv, key_mask, scale, causal=, sinks=)"
    assert_close(out, reference(q, kv, mask, None), torch.float16, "attention(triton)", TOL)
    want = attention_reference(chunk_q.double(), kv, mask, None, compute_dtype=torch.float64, causal=True, sinks=sinks)
    assert_close(chunk, want, torch.float16, "attention(triton, causal, sinks)", TOL)


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    kv = make_cache(bits=4, rank=0, ratio=0.0, nblocks=1, tail=2, head_dim=64, dtype=torch.float16)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        kernels.gear_decode_attention(q[0], kv, None, None)
    with pytest.raises(TypeError, match="q: expected dtype"):
        kernels.gear_decode_attention(q.int(), kv, None, None)
    with pytest.raises(ValueError, match="q: .*head_dim"):
        kernels.gear_decode_attention(q[..., :32], kv, None, None)
    with pytest.raises(ValueError, match="q: .*multiple of the cache's kv_heads"):
        kernels.gear_decode_attention(q[:, :3], kv, None, None)
    with pytest.raises(ValueError, match="q: .*batch"):
        kernels.gear_decode_attention(q[:1], kv, None, None)
    mask = torch.ones(BATCH, kv.seq_len, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match="key_mask: expected dtype"):
        kernels.gear_decode_attention(q, kv, mask.int(), None)
    with pytest.raises(ValueError, match="key_mask: .*cached tokens"):
        kernels.gear_decode_attention(q, kv, mask[:, 1:], None)
    with pytest.raises(ValueError, match="sinks: .*q_heads"):
        kernels.gear_decode_attention(q, kv, None, None, sinks=torch.zeros(3, device=DEVICE))


def test_int8_basis_scale_matches_the_format():
    from lowrank_ops.kvcache.format import INT8_BASIS_SCALE

    assert kernels.INT8_BASIS_SCALE.value == INT8_BASIS_SCALE


def test_rank_limit():
    cfg = GEARConfig(bits=4, rank=kernels.KV_MAX_RANK + 1, outlier_ratio=0.0, buffer_tokens=128, group_size=32)
    x = torch.randn(1, 1, 128, 128, device=DEVICE)
    kv = compress(x, x, cfg)
    with pytest.raises(ValueError, match="rank"):
        kernels.gear_decode_attention(torch.randn(1, 1, 1, 128, device=DEVICE), kv, None, None)


@pytest.mark.parametrize("outliers", [0.0, 0.05], ids=["no-outliers", "outliers"])
def test_tile_tokens_override(outliers):
    """tile_tokens (bench/kernel_profile.py's A/B): 16- and 32-token tiles of 64-token blocks give
    the reference's attention (at G = 32 both fold the key scale into q, with or without key
    outliers); a size that does not divide B is refused."""
    kv = make_cache(bits=2, rank=2, ratio=outliers, nblocks=2, tail=5, head_dim=64, dtype=torch.float16,
                    buffer_tokens=64)
    q = torch.randn(BATCH, 2 * KV_HEADS, 1, 64).to(dtype=torch.float16, device=DEVICE)
    ref = reference(q, kv, None, None)
    for tokens in (16, 32):
        out = kernels.gear_decode_attention(q, kv, None, None, num_splits=2, tile_tokens=tokens)
        assert_close(out, ref, torch.float16, f"tile_tokens={tokens}", TOL)
    with pytest.raises(ValueError, match="tile_tokens"):
        kernels.gear_decode_attention(q, kv, None, None, tile_tokens=24)
