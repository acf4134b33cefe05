"""Reference lane: GEAR decode attention (reference backend) against plain float64 softmax
attention on the decompressed K̂/V̂; GQA, ragged key masks, backend dispatch, custom op, errors."""
import math

import pytest
import torch

from lowrank_ops.core.backend import use_backend
from lowrank_ops.kvcache import GEARConfig, attention, compress
from lowrank_ops.kvcache import ops


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cache(b=2, h=2, t=150, d=64, dtype=torch.float16, cfg=None):
    keys = torch.randn(b, h, t, d) + torch.randn(d)
    values = torch.randn(b, h, t, d)
    return compress(keys.to(dtype), values.to(dtype), cfg or GEARConfig(bits=2, rank=4)), keys, values


def float64_attention(q, k, v, mask=None, scale=None):
    """Plain softmax attention in float64; GQA by repeating kv heads; fully masked rows → 0."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.double() @ k.transpose(-1, -2) * scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        keep = torch.ones(k.shape[2], dtype=torch.bool) if mask is None else mask[i]
        if keep.any():
            out[i] = s[i][..., keep].softmax(-1) @ v[i][:, keep]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("q_heads, q_len", [(2, 1), (8, 1), (4, 3)])  # MHA, GQA 4:1, GQA 2:1 with 3 queries
def test_matches_float64_softmax_on_decompressed(dtype, tol, q_heads, q_len):
    kv, _, _ = make_cache(dtype=dtype)
    q = torch.randn(2, q_heads, q_len, 64).to(dtype)
    k_hat, v_hat = kv.decompress(torch.float64)
    out = attention(q, kv)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel(out, float64_attention(q, k_hat, v_hat)) < tol


def test_ragged_key_mask_and_fully_masked_rows():
    kv, _, _ = make_cache(b=3, t=130)
    mask = torch.ones(3, 130, dtype=torch.bool)
    mask[0, :45] = False  # left padding that crosses a block boundary... and
    mask[1, 100:] = False  # right padding in block 1 and the tail
    mask[2] = False  # an all-padding row returns zeros
    q = torch.randn(3, 4, 1, 64).half()
    scale = 0.3
    out = attention(q, kv, key_mask=mask, scale=scale)
    k_hat, v_hat = kv.decompress(torch.float64)
    ref = float64_attention(q, k_hat, v_hat, mask, scale)
    assert rel(out[:2], ref[:2]) < 2e-3
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # masking matches attention over the unpadded sequence alone
    alone = float64_attention(q[:1], k_hat[:1, :, 45:], v_hat[:1, :, 45:], scale=scale)
    assert rel(out[:1], alone) < 2e-3


@pytest.mark.parametrize("new_tokens", [1, 3, 9])  # 9: the chunk's append compresses a block of its own tokens
def test_causal_chunk_is_each_query_over_its_prefix(new_tokens):
    """causal=True: query i of a chunk appended last sees the cache up to its own token, exactly
    as a one-token step over the prefix would (ragged left padding on batch row 1)."""
    kv, _, _ = make_cache(t=120)  # one block + 56 tail tokens (B = 64)
    kv.append(torch.randn(2, 2, new_tokens, 64).half(), torch.randn(2, 2, new_tokens, 64).half())
    assert kv.nblocks == (2 if new_tokens == 9 else 1)
    mask = torch.ones(2, kv.seq_len, dtype=torch.bool)
    mask[1, :11] = False
    q = torch.randn(2, 8, new_tokens, 64).half()
    out = attention(q, kv, key_mask=mask, causal=True)
    k_hat, v_hat = kv.decompress(torch.float64)
    for i in range(new_tokens):
        end = kv.seq_len - new_tokens + i + 1
        one = float64_attention(q[:, :, i:i + 1], k_hat[:, :, :end], v_hat[:, :, :end], mask[:, :end])
        assert rel(out[:, :, i:i + 1], one) < 2e-3, f"query {i}"
    if new_tokens > 1:  # without the causal mask the early queries would read later tokens
        assert rel(attention(q, kv, key_mask=mask)[:, :, :1], out[:, :, :1]) > 1e-2
    else:  # one query token: causal changes nothing
        assert torch.equal(attention(q, kv, key_mask=mask), out)


@pytest.mark.parametrize("q_len", [1, 3])
def test_sinks_are_one_more_softmax_logit_per_query_head(q_len):
    """sinks (gpt-oss): row (query head j, token i) takes softmax over its allowed scores and
    sinks[j], and the sink carries no value; a row with every key masked is 0 (the sink takes it all)."""
    kv, _, _ = make_cache(t=130)
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[0, :45] = False
    mask[1] = False
    q = torch.randn(2, 4, q_len, 64).half()
    sinks = torch.randn(4) * 2
    out = attention(q, kv, key_mask=mask, causal=True, sinks=sinks)
    k_hat, v_hat = kv.decompress(torch.float64)
    want = torch.zeros(q.shape, dtype=torch.float64)
    for j in range(4):
        scores = q[0, j].double() @ k_hat[0, j // 2].T / 8.0  # (q_len, T), kv head j // 2 (GQA 2:1)
        for i in range(q_len):
            keep = mask[0] & (torch.arange(130) <= 130 - q_len + i)
            logits = torch.cat([scores[i][keep], sinks[j].double()[None]])
            want[0, j, i] = logits.softmax(-1)[:-1] @ v_hat[0, j // 2][keep]
    assert rel(out, want) < 2e-3
    assert out[1].abs().max() == 0
    assert rel(attention(q, kv, key_mask=mask, causal=True), want) > 1e-2  # the sinks matter


def test_tail_only_cache_is_exact_attention():
    cfg = GEARConfig(buffer_tokens=128)
    kv, keys, values = make_cache(t=100, dtype=torch.float32, cfg=cfg)
    assert kv.nblocks == 0
    q = torch.randn(2, 4, 1, 64)
    assert rel(attention(q, kv), float64_attention(q, keys, values)) < 1e-6


def test_attention_after_appends_tracks_the_growing_cache():
    kv, keys, values = make_cache(t=60)
    for _ in range(8):  # crosses a block boundary
        k_new, v_new = torch.randn(2, 2, 1, 64).half(), torch.randn(2, 2, 1, 64).half()
        kv.append(k_new, v_new)
        q = torch.randn(2, 2, 1, 64).half()
        k_hat, v_hat = kv.decompress(torch.float64)
        assert rel(attention(q, kv), float64_attention(q, k_hat, v_hat)) < 2e-3
    assert kv.seq_len == 68 and kv.nblocks == 1


def test_backend_dispatch_and_reasons():
    kv, _, _ = make_cache(t=70)
    q = torch.randn(2, 2, 1, 64).half()
    with use_backend("reference"):
        ref = attention(q, kv)
    assert torch.equal(attention(q, kv), ref)  # automatic on CPU: reference
    with use_backend("cuda"), pytest.raises(ValueError, match="needs a CUDA tensor"):
        attention(q, kv)
    support = ops._triton_support(q, 4)
    if not support.ok:  # why is part of the answer: device, module or function missing
        assert "Triton" in support.why or "kvcache_attention" in support.why


def test_a_rank_beyond_the_kernel_leaves_triton_with_the_reason(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(ops.backend, "triton_runs_on", lambda device: True)
    q = torch.randn(1, 2, 1, 64)
    assert ops._triton_support(q, 64).ok
    verdict = ops._triton_support(q, 65)
    assert not verdict.ok and "rank <= 64" in verdict.why


@pytest.mark.parametrize("prefix", [0, 2])
def test_custom_op_fake_and_opcheck(prefix):
    kv, _, _ = make_cache(t=70, cfg=GEARConfig(bits=2, rank=4, prefix_tokens=prefix))
    q = torch.randn(2, 4, 1, 64).half()
    mask = torch.rand(2, 70) > 0.2
    cfg = kv.config
    sinks = torch.randn(4)
    args = (q, list(kv.tensors().values()), mask, 0.125, False, None, cfg.bits, cfg.group_size, cfg.rank,
            float(cfg.outlier_ratio), cfg.buffer_tokens, cfg.factor_bits, cfg.prefix_tokens, kv.tail_len)
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.lowrank_ops.gear_decode_attention.default, args)
        chunk = torch.randn(2, 4, 3, 64).half()
        torch.library.opcheck(torch.ops.lowrank_ops.gear_decode_attention.default,
                              (chunk, *args[1:4], True, sinks, *args[6:]))
        for causal, query, with_sinks in ((False, q, None), (True, chunk, sinks)):
            def run(x, causal=causal, with_sinks=with_sinks):
                return attention(x, kv, key_mask=mask, scale=0.125, causal=causal, sinks=with_sinks)

            compiled = torch.compile(run, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(query), run(query))


def test_bad_inputs():
    kv, _, _ = make_cache(t=70)
    q = torch.randn(2, 4, 1, 64).half()
    with pytest.raises(TypeError, match="kv"):
        attention(q, object())
    with pytest.raises(ValueError, match="q"):
        attention(q[:1], kv)
    with pytest.raises(ValueError, match="q"):
        attention(torch.randn(2, 3, 1, 64).half(), kv)  # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match="q"):
        attention(torch.randn(2, 4, 1, 32).half(), kv)
    with pytest.raises(ValueError, match="q"):
        attention(q[0], kv)
    with pytest.raises(TypeError, match="q"):
        attention(q.long(), kv)
    with pytest.raises(ValueError, match="key_mask"):
        attention(q, kv, key_mask=torch.ones(2, 69, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask"):
        attention(q, kv, key_mask=torch.ones(2, 70))
    with pytest.raises(ValueError, match="scale"):
        attention(q, kv, scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        attention(q, kv, causal=1)
    with pytest.raises(ValueError, match="q_len <= seq_len=70"):
        attention(torch.randn(2, 4, 71, 64).half(), kv, causal=True)
    with pytest.raises(ValueError, match=r"sinks: expected one logit per query head, shape \(4,\)"):
        attention(q, kv, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks"):
        attention(q, kv, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="sinks"):
        attention(q, kv, sinks=torch.zeros(1, 4))
