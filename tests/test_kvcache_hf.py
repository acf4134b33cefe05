"""GEARCache in transformers (lowrank_ops/kvcache/hf.py): tiny randomly initialized Llama /
Mistral / Qwen2 models (hidden 128, 2 layers, 4 query / 2 KV heads, head_dim 64, vocab 256,
float32, CPU, reference backend) generate with GEARCache and the "gear" attention; so do two
hybrids (Qwen2 with a sliding-window layer, Gemma 3), whose window layers stay uncompressed.

Oracle: the same model with ``DynamicCache`` and SDPA. Lossless settings (nothing compressed,
or 4-bit with rank = block size, where the low-rank part reconstructs the residual exactly)
must give the same tokens and logits to float precision; 2-bit settings are held to a measured
logits error bound (see ``test_two_bit_logits_stay_close``).
"""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, ops  # noqa: E402
from lowrank_ops.kvcache.format import GEARKV  # noqa: E402
from lowrank_ops.kvcache import hf  # noqa: E402
from lowrank_ops.kvcache.hf import (  # noqa: E402
    CHUNK_MAX_ROWS,
    GEAR_ATTENTION,
    ROLLBACK_TOKENS,
    GEARCache,
    GEARLayer,
    decode_key_mask,
    gear_attention_forward,
    is_causal_over,
)

SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=512)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}
# hybrid models: full-attention layers compressed, sliding-window layers (window 24 < the prompt)
# kept by transformers' DynamicSlidingWindowLayer
HYBRIDS = {
    "qwen2-hybrid": (Qwen2Config, Qwen2ForCausalLM,
                     {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 24}),
}
PROMPT, PAD, NEW = 70, 9, 12  # prompt tokens, left padding of row 1, generated tokens

# Nothing compressed: the whole sequence stays in the (fp32) tail.
UNCOMPRESSED = GEARConfig(bits=2, buffer_tokens=128)
# 4-bit, rank = block size 16: the rank-16 factors of a 16 x 64 residual block are exact, so the
# reconstruction is the input to fp16 storage precision (A, B and outlier values are fp16). GEAR's
# residual fit: its factors hold only the quantization error, whose fp16 rounding is tiny (the
# default joint fit's factors hold the data itself: see test_lossless_joint_fit_is_fp16_exact).
LOSSLESS_4BIT = GEARConfig(bits=4, rank=16, group_size=16, buffer_tokens=16, factor_bits=16, lowrank_fit="residual")
GEAR_2BIT = GEARConfig(bits=2, group_size=32, rank=4, outlier_ratio=0.02, buffer_tokens=32)  # the paper's setting, B = 32
KIVI_2BIT = GEARConfig(bits=2, group_size=32, rank=0, outlier_ratio=0.0, buffer_tokens=32)  # quantization only (clip search on)


@pytest.fixture(autouse=True)
def _one_thread_reference():
    """Reference backend, one thread (the CPU is shared; tiny ops are faster single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend("reference"), torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def make_model(family: str, **overrides):
    config_cls, model_cls, extra = {**FAMILIES, **HYBRIDS}[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SIZES, **extra, **overrides})).eval()


def prompt(batch: int = 2, length: int = PROMPT, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and a left-padded attention mask (row 1 starts ``pad`` tokens late)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SIZES["vocab_size"], (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


def generate(model, cache, ids, mask, new: int = NEW, **kw) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, **kw)


def dynamic_tokens(model, ids, mask, **kw) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    return generate(model, DynamicCache(config=model.config), ids, mask, **kw)


def gear_cache(model, config: GEARConfig) -> GEARCache:
    model.set_attn_implementation(GEAR_ATTENTION)
    return GEARCache(config, model_config=model.config)


def forced_logits(model, cache, ids, mask, new_ids) -> torch.Tensor:
    """Teacher-forced next-token logits (batch, 1 + n, vocab): the prompt, then ``new_ids`` one at a
    time (the same tokens whatever the cache, so errors do not compound through sampling)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache)
    logits = [out.logits[:, -1]]
    for i in range(new_ids.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=new_ids[:, i:i + 1], attention_mask=mask, position_ids=pos, cache=cache)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-(row, step) ‖a − b‖ / ‖b‖ over the vocabulary."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def _new_ids(n: int = NEW) -> torch.Tensor:
    return torch.randint(1, SIZES["vocab_size"], (2, n), generator=torch.Generator().manual_seed(2))


# ----------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lossless_generate_matches_dynamic_cache(family):
    model = make_model(family)
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask)
    cache = gear_cache(model, LOSSLESS_4BIT)
    assert torch.equal(generate(model, cache, ids, mask), expected)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last token is never fed back
    kv = cache.layers[0].kv  # the default prefix: the first token
    assert (kv.prefix_len, kv.nblocks, kv.tail_len) == (1, (PROMPT + NEW - 2) // 16, (PROMPT + NEW - 2) % 16)


def test_lossless_generate_with_an_uncompressed_prefix_matches_dynamic_cache():
    """The first 3 tokens kept uncompressed (attended in the combine step) and the blocks after
    them: greedy tokens as DynamicCache's, with a left-padded row whose prefix is padding."""
    model = make_model("llama")
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask)
    cache = gear_cache(model, dataclasses.replace(LOSSLESS_4BIT, prefix_tokens=3))
    assert torch.equal(generate(model, cache, ids, mask), expected)
    kv = cache.layers[0].kv
    seen = PROMPT + NEW - 1
    assert (kv.prefix_len, kv.nblocks, kv.tail_len) == (3, (seen - 3) // 16, (seen - 3) % 16)


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_hybrid_models_compress_their_full_attention_layers_only(family):
    """Sliding-window layers stay transformers' own (uncompressed, at most the window); the
    full-attention layers are GEAR layers read by the gear attention; lossless settings give
    DynamicCache's tokens; the memory report counts both kinds."""
    model = make_model(family)
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask)
    cache = gear_cache(model, LOSSLESS_4BIT)
    kinds = {kind: type(layer) for kind, layer in zip(model.config.layer_types, cache.layers)}
    assert kinds == {"full_attention": GEARLayer, "sliding_attention": DynamicSlidingWindowLayer}
    assert torch.equal(generate(model, cache, ids, mask), expected)
    window = next(layer for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer))
    assert window.keys.shape[2] < PROMPT  # the window layer really drops old tokens
    report = cache.memory_report()
    assert report["uncompressed_nbytes"] == window.keys.nbytes + window.values.nbytes > 0
    assert report["nbytes"] == sum(kv.nbytes for kv in cache.layer_caches()) + report["uncompressed_nbytes"]
    assert report["layers"] == 1 and report["seq_len"] == PROMPT + NEW - 1


def gpt_oss_model(sink_scale: float = 2.0):
    """A tiny gpt-oss (4 experts, a sliding-window layer of 24 then a full-attention layer) with
    random attention sinks of spread ``sink_scale``."""
    torch.manual_seed(0)
    config = GptOssConfig(**{**SIZES, "max_position_embeddings": 131072}, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=24, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.sinks.normal_(0.0, sink_scale)
    return model


@pytest.mark.parametrize("chunked", [False, True])
def test_gpt_oss_attention_sinks_reach_the_compressed_attention(chunked, monkeypatch):
    """gpt-oss's sinks go into the GEAR decode attention and the prefill's dense attention: lossless
    settings give the eager DynamicCache logits, and every decode step of the full-attention layer
    passed its sinks; the sinks change those logits (so the check can fail)."""
    dense_calls = []
    real_dense = ops.softmax_attention
    monkeypatch.setattr(ops, "softmax_attention", lambda q, *a: dense_calls.append(q.shape[2]) or real_dense(q, *a))
    if chunked:  # the prefill's sink attention 7 query tokens at a time (batch 2 x 4 heads x 70 keys)
        monkeypatch.setattr(hf, "SINK_SCORE_ENTRIES", 2 * 4 * 7 * PROMPT)
    model = gpt_oss_model()
    ids, mask = prompt()
    new_ids = _new_ids(6)
    model.set_attn_implementation("eager")
    expected = forced_logits(model, DynamicCache(config=model.config), ids, mask, new_ids)
    seen = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: seen.append(k["sinks"] is not None) or real(*a, **k))
    cache = gear_cache(model, LOSSLESS_4BIT)
    got = forced_logits(model, cache, ids, mask, new_ids)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, GEARLayer]
    assert seen == [True] * 6  # one decode step of the one GEAR layer per new token
    prefill = [n for n in dense_calls if n > 1]  # both layers' prefill; decode steps of the window layer take 1
    assert prefill == ([7] * 10 * 2 if chunked else [PROMPT] * 2)
    assert rel_err(got, expected).max() < 1e-4
    no_sinks = gpt_oss_model(sink_scale=0.0)
    for layer in no_sinks.model.layers:
        layer.self_attn.sinks.fill_(-1e4)  # no sink: plain softmax
    no_sinks.set_attn_implementation("eager")
    plain = forced_logits(no_sinks, DynamicCache(config=no_sinks.config), ids, mask, new_ids)
    assert rel_err(plain, expected).max() > 1e-2


def test_attention_math_the_gear_attention_lacks_is_refused():
    model = make_model("llama")
    q = torch.randn(1, 4, 1, 64)
    k = torch.randn(1, 2, 3, 64)
    with pytest.raises(ValueError, match="softcap: the 'gear' attention .* has no"):
        gear_attention_forward(model.model.layers[0].self_attn, q, k, k, None, softcap=50.0)
    with pytest.raises(ValueError, match="dropout: .* inference-only"):
        gear_attention_forward(model.model.layers[0].self_attn, q, k, k, None, dropout=0.1, s_aux=torch.zeros(4))


def test_uncompressed_generate_matches_dynamic_cache():
    model = make_model("llama")
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask)
    cache = gear_cache(model, UNCOMPRESSED)
    assert torch.equal(generate(model, cache, ids, mask), expected)
    assert all(kv.nblocks == 0 for kv in cache.layer_caches())
    # the "gear" attention without a GEARCache is plain SDPA
    assert torch.equal(generate(model, DynamicCache(config=model.config), ids, mask), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lossless_logits_match_dynamic_cache(family):
    model = make_model(family)
    ids, mask = prompt()
    new = _new_ids()
    model.set_attn_implementation("sdpa")
    ref = forced_logits(model, DynamicCache(config=model.config), ids, mask, new)
    got = forced_logits(model, gear_cache(model, LOSSLESS_4BIT), ids, mask, new)
    # fp16 storage of the factors / outliers: ~1e-5 measured; fp32 all the way would be ~1e-7
    assert rel_err(got, ref).max() < 1e-4


def test_lossless_joint_fit_is_fp16_exact():
    """At full rank the joint fit's factors carry the keys and values themselves, so their fp16
    rounding is that of an fp16 cache: 1.7e-4 to 1.8e-4 measured (llama, qwen2) against 7.3e-6 above."""
    model = make_model("llama")
    ids, mask = prompt()
    new = _new_ids()
    model.set_attn_implementation("sdpa")
    ref = forced_logits(model, DynamicCache(config=model.config), ids, mask, new)
    got = forced_logits(model, gear_cache(model, dataclasses.replace(LOSSLESS_4BIT, lowrank_fit="joint")), ids, mask, new)
    assert rel_err(got, ref).max() < 5e-4


# ----------------------------------------------------------------------------- lossy
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_bit_logits_stay_close(family):
    """2-bit GEAR (r = 4, 2 % outliers) on teacher-forced decode steps of a left-padded batch.

    Measured (seed 0, this model size, with the clip search): max relative logits error 0.067
    (Llama, Mistral), 0.060 (Qwen2); quantization alone (2-bit, same groups and clip search)
    0.132 / 0.151, with KIVI's min-max ranges 0.139 / 0.143 (before the clip search and the
    outlier rule, GEAR measured 0.114 / 0.141). A random tiny model's logits are near-flat, so
    relative errors are large next to a trained model's; the bound 0.25 leaves ~3.7x headroom
    over the worst measured case while still failing on a broken mask, a wrong block order or a
    lost outlier/low-rank term (each pushed the error above 0.5 here).
    The low-rank + outlier terms must also beat quantization alone (mean error)."""
    model = make_model(family)
    ids, mask = prompt()
    new = _new_ids()
    model.set_attn_implementation("sdpa")
    ref = forced_logits(model, DynamicCache(config=model.config), ids, mask, new)
    gear_cache_ = gear_cache(model, GEAR_2BIT)
    gear = rel_err(forced_logits(model, gear_cache_, ids, mask, new), ref)
    kivi = rel_err(forced_logits(model, gear_cache(model, KIVI_2BIT), ids, mask, new), ref)
    assert torch.isfinite(gear).all()
    assert gear.max() < 0.25, gear.max()
    assert gear.mean() < kivi.mean(), (gear.mean(), kivi.mean())
    assert 1e-3 < gear.max()  # it really is compressed: not the exact cache
    report = gear_cache_.memory_report()
    assert report["layers"] == 2 and report["seq_len"] == PROMPT + NEW
    assert all(kv.nblocks == (PROMPT + NEW) // 32 for kv in gear_cache_.layer_caches())


def test_two_bit_generate_runs_and_stays_finite():
    model = make_model("qwen2")
    ids, mask = prompt()
    cache = gear_cache(model, GEAR_2BIT)
    out = generate(model, cache, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, PROMPT + NEW)
    assert all(torch.isfinite(step).all() for step in out.logits)


# ----------------------------------------------------------------------------- the decode path
def test_decode_steps_call_the_compressed_attention(monkeypatch):
    """Every decode step of every layer goes through kvcache.attention on the GEARKV, and update()
    hands back only the new token (never a dequantized cache)."""
    model = make_model("llama")
    ids, mask = prompt()
    calls, returned = [], []
    real_attention, real_update = ops.attention, GEARLayer.update

    def spy_attention(q, kv, **kw):
        calls.append((tuple(q.shape), kv.seq_len, None if kw.get("key_mask") is None else kw["key_mask"].clone()))
        return real_attention(q, kv, **kw)

    def spy_update(self, k, v, *args, **kw):
        out = real_update(self, k, v, *args, **kw)
        returned.append(out[0].shape[2])
        return out

    monkeypatch.setattr(ops, "attention", spy_attention)
    monkeypatch.setattr(GEARLayer, "update", spy_update)
    cache = gear_cache(model, GEAR_2BIT)
    generate(model, cache, ids, mask)
    layers = SIZES["num_hidden_layers"]
    assert len(calls) == layers * (NEW - 1)
    assert returned == [PROMPT] * layers + [1] * (layers * (NEW - 1))
    for i, (q_shape, seq_len, key_mask) in enumerate(calls):
        assert q_shape == (2, 4, 1, 64) and seq_len == PROMPT + 1 + i // layers
        # left padding reaches the attention as the key mask: row 1's first PAD tokens are out
        assert key_mask is not None and key_mask.shape == (2, seq_len)
        assert key_mask[0].all() and not key_mask[1, :PAD].any() and key_mask[1, PAD:].all()


def test_cache_holds_compressed_blocks_below_dense_bytes():
    model = make_model("mistral")
    ids, mask = prompt(length=192)
    cache = gear_cache(model, GEAR_2BIT)
    generate(model, cache, ids, mask, new=3)
    kvs = cache.layer_caches()
    assert len(kvs) == 2 and all((kv.prefix_len, kv.nblocks, kv.tail_len) == (1, 6, 1) for kv in kvs)
    report = cache.memory_report()
    assert report["nbytes"] == cache.nbytes == sum(kv.nbytes for kv in kvs)
    assert report["rollback_nbytes"] == 0  # the last update (one token) went to the tail: nothing kept
    assert report["dense_nbytes"] == 2 * report["fp16_nbytes"]  # fp32 model
    assert report["nbytes"] < report["fp16_nbytes"] < report["dense_nbytes"]
    tail = sum(kv.tail_keys.nbytes + kv.tail_values.nbytes + kv.prefix_keys.nbytes + kv.prefix_values.nbytes
               for kv in kvs)
    blocks_bits = 8 * (cache.nbytes - tail) / sum(2 * kv.batch * kv.kv_heads * kv.compressed_len * kv.head_dim for kv in kvs)
    # per K (and per V) entry: 2 (codes) + 1 (fp16 scale + zero per 32 entries) + 24 / 64 (one outlier:
    # uint8 index + fp16 value per 64-vector) + 4 * 8 / 64 (int8 A row) + 64 * 4 * 8 / (32 * 64) (int8 B per
    # block) + 4 * 32 / (32 * 64) (fp32 column scales per block)
    assert blocks_bits == pytest.approx(2 + 1 + 0.375 + 0.5 + 1 + 0.0625)


# 2 heads per kv head: 3 tokens are 6 rows, 40 tokens 80 rows (two programs), both through the
# causal attention; 130 tokens are 260 rows > CHUNK_MAX_ROWS, decompressed once
@pytest.mark.parametrize("n, through_attention", [(3, True), (40, True), (130, False)])
def test_several_new_tokens_after_prefill(n, through_attention, monkeypatch):
    """A chunk of n tokens after the prefill (assisted decoding, chunked prefill) is causal among
    itself, on left-padded rows; it matches DynamicCache."""
    model = make_model("llama")
    ids, mask = prompt()
    new = _new_ids(n)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    chunk_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    chunk_pos = pos[:, -1:] + torch.arange(1, n + 1)

    def run(cache):
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache)
        return model(input_ids=new, attention_mask=chunk_mask, position_ids=chunk_pos, cache=cache).logits

    model.set_attn_implementation("sdpa")
    ref = run(DynamicCache(config=model.config))
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(k["causal"]) or real(*a, **k))
    got = run(gear_cache(model, LOSSLESS_4BIT))
    assert calls == ([True] * SIZES["num_hidden_layers"] if through_attention else [])
    assert rel_err(got, ref).max() < 1e-4


def test_chunk_rows_are_four_triton_programs():
    kernels = pytest.importorskip("lowrank_ops.kernels.kvcache_attention")
    assert CHUNK_MAX_ROWS == 4 * kernels._MAX_BLOCK_M


def test_only_a_key_mask_and_causal_chunk_mask_takes_the_causal_attention():
    key_mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    causal = key_mask[:, None, None, :] & ops.causal_allowed(3, 6, key_mask.device)
    assert is_causal_over(causal, key_mask, 3, 6)
    additive = torch.zeros(2, 1, 3, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert is_causal_over(additive, key_mask, 3, 6) and is_causal_over(None, None, 3, 6)
    tree = causal.clone()
    tree[:, :, 2, 4] = False  # draft token 2 branches off token 0, not token 1
    assert not is_causal_over(tree, key_mask, 3, 6)
    assert not is_causal_over(causal | True, key_mask, 3, 6)  # no causal order among the new tokens


def test_beam_search_reorders_the_compressed_cache_exactly():
    model = make_model("llama")
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask, new=6, num_beams=2)
    cache = gear_cache(model, LOSSLESS_4BIT)
    assert torch.equal(generate(model, cache, ids, mask, new=6, num_beams=2), expected)
    assert cache.layers[0].kv.batch == 4  # batch x beams


def test_layer_batch_operations_and_crop():
    from lowrank_ops.kvcache import compress

    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(3, 2, 40, 64, generator=gen) for _ in range(2))
    layer = GEARLayer(GEARConfig(bits=4, group_size=32, buffer_tokens=32))
    layer.update(k, v)
    ref_k, ref_v = compress(k, v, layer.config).decompress()
    assert layer.get_seq_length() == 40 and layer.get_mask_sizes(1) == (41, 0)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    got_k, got_v = layer.kv.decompress()
    assert torch.equal(got_k, ref_k[[2, 0, 1]]) and torch.equal(got_v, ref_v[[2, 0, 1]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.kv.decompress()[0], ref_k[[2, 2, 0, 0, 1, 1]])
    layer.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(layer.kv.decompress()[1], ref_v[[2, 1]])
    layer.crop(-5)  # within the 8-token tail
    assert layer.get_seq_length() == 35 and torch.equal(layer.kv.decompress()[0], ref_k[[2, 1], :, :35])
    layer.crop(-4)  # into the block the prefill compressed: rebuilt from the prefill's raw tokens
    assert layer.get_seq_length() == 31 and layer.kv.nblocks == 0
    assert torch.equal(layer.kv.decompress()[0], k[[2, 1], :, :31])
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(3)
    layer.reset()
    assert layer.kv is None and layer.get_seq_length() == 0 and not layer.is_initialized


def _update(layer, k, v):
    layer.update(k, v, kwargs={})
    layer.awaiting_attention = False  # as the "gear" attention does


@pytest.mark.parametrize("config", [GEAR_2BIT, LOSSLESS_4BIT], ids=["2bit-r4", "lossless-4bit"])
def test_crop_takes_back_compressed_tokens_of_the_last_update(config):
    """Blocks compressed from an update's tokens are rebuilt from the tokens that stay: the same
    cache as appending only those (B = 32 or 16; a prefill of 45 tokens, a 19-token step that fills
    a block, a 1-token step, then a 35-token chunk that fills one or two blocks)."""
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 2, 100, 64, generator=gen) for _ in range(2))
    layer = GEARLayer(config)
    layer.update(k[:, :, :45], v[:, :, :45])
    for start, end in [(45, 64), (64, 65), (65, 100)]:
        _update(layer, k[:, :, start:end], v[:, :, start:end])
    assert layer.kv.nblocks == 100 // config.buffer_tokens
    layer.crop(-33)  # keeps 2 of the chunk: back before its first block boundary
    layer.crop(-1)  # and one more token of it
    assert layer.get_seq_length() == 66
    ref = GEARLayer(config)
    ref.update(k[:, :, :45], v[:, :, :45])
    for start, end in [(45, 64), (64, 65), (65, 66)]:
        _update(ref, k[:, :, start:end], v[:, :, start:end])
    assert layer.kv.nblocks == ref.kv.nblocks == 66 // config.buffer_tokens
    for got, want in zip(layer.kv.decompress(), ref.kv.decompress()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="up to 1 newest tokens of the last update"):
        layer.crop(-3)  # the tail's 2, or one more of the chunk's 35 (34 are gone)
    _update(layer, k[:, :, 66:67], v[:, :, 66:67])  # a step within the tail: crop is the tail's alone
    assert layer.rollback is None
    with pytest.raises(ValueError, match="up to 0 newest"):
        layer.crop(-(layer.kv.tail_len + 1))


def test_crop_after_an_uncompressed_prefix_and_never_into_it():
    """With 4 prefix tokens, crop() rebuilds blocks after the prefix as appending only the kept
    tokens would; the prefix itself cannot be taken back."""
    config = dataclasses.replace(GEAR_2BIT, buffer_tokens=16, group_size=16, prefix_tokens=4)
    gen = torch.Generator().manual_seed(6)
    k, v = (torch.randn(1, 2, 60, 64, generator=gen) for _ in range(2))
    layer = GEARLayer(config)
    layer.update(k[:, :, :10], v[:, :, :10])  # 4 prefix tokens, 6 in the tail
    _update(layer, k[:, :, 10:60], v[:, :, 10:60])  # three blocks and a tail of 8
    layer.crop(-30)
    ref = GEARLayer(config)
    ref.update(k[:, :, :10], v[:, :, :10])
    _update(ref, k[:, :, 10:30], v[:, :, 10:30])
    assert (layer.kv.prefix_len, layer.kv.nblocks, layer.kv.tail_len) == (ref.kv.prefix_len, ref.kv.nblocks,
                                                                        ref.kv.tail_len) == (4, 1, 10)
    for got, want in zip(layer.kv.decompress(), ref.kv.decompress()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    short = GEARLayer(config)
    short.update(k[:, :, :3], v[:, :, :3])  # the prompt fits the prefix
    assert short.rollback is None and short.kv.prefix_len == 3
    with pytest.raises(ValueError, match="tokens_to_remove"):
        short.crop(-1)


def test_rollback_keeps_only_the_newest_raw_tokens():
    """The record of a long prefill holds raw tokens from the block of its newest ROLLBACK_TOKENS
    on, not the prompt."""
    config = GEARConfig(bits=2, buffer_tokens=32, group_size=32)
    k = torch.randn(1, 2, 300, 64)
    cache = GEARCache(config)
    cache.update(k, k, 0)
    layer = cache.layers[0]
    undo = layer.rollback
    first = (300 - 1 - ROLLBACK_TOKENS) // 32  # after the prefix token
    assert (undo.blocks, undo.keys.shape[2], undo.undoable) == (first, 300 - 1 - first * 32, ROLLBACK_TOKENS)
    assert undo.keys.untyped_storage().nbytes() == undo.keys.nbytes  # a copy, not a view of the prompt
    assert cache.memory_report()["rollback_nbytes"] == 2 * undo.keys.nbytes  # counted on top of nbytes
    layer.crop(-ROLLBACK_TOKENS)
    assert layer.get_seq_length() == 300 - ROLLBACK_TOKENS
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(-(layer.kv.tail_len + 1))


@pytest.mark.parametrize("assistant", ["draft_model", "prompt_lookup"])
def test_assisted_decoding_matches_greedy(assistant):
    """transformers' assisted generation: a draft model (or n-gram lookup in a periodic prompt)
    proposes tokens, the GEAR-cached target checks them in one causal chunk and crops the rejected
    ones (out of compressed blocks too); lossless settings give greedy decoding's tokens."""
    model = make_model("llama")
    if assistant == "draft_model":
        draft = make_model("llama", num_hidden_layers=1)
        draft.generation_config.num_assistant_tokens = 6  # chunks of 7: the draft's 6 and the last accepted token
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0  # a random draft is never confident
        ids, mask = prompt(batch=1)
        how = {"assistant_model": draft}
    else:
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11] * 10])
        mask = torch.ones_like(ids)
        how = {"prompt_lookup_num_tokens": 6}
    expected = dynamic_tokens(model, ids, mask, new=24)
    calls, rebuilt = [], []
    real, keep = ops.attention, GEARKV.keep_blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "attention", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
        mp.setattr(GEARKV, "keep_blocks", lambda self, n: rebuilt.append(n) or keep(self, n))
        cache = gear_cache(model, LOSSLESS_4BIT)
        got = generate(model, cache, ids, mask, new=24, **how)
    assert torch.equal(got, expected)
    assert max(calls) == 7 and rebuilt, "no 7-token chunk was checked, or no crop reached a compressed block"


def test_decode_key_mask_from_transformers_masks():
    bool_mask = torch.tensor([[True, True, True], [False, True, True]])[:, None, None, :]
    assert torch.equal(decode_key_mask(bool_mask, 3), bool_mask[:, 0, 0])
    additive = torch.zeros(2, 1, 1, 3).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(decode_key_mask(additive, 3), bool_mask[:, 0, 0])
    assert decode_key_mask(None, 3) is None
    with pytest.raises(ValueError, match="attention_mask"):
        decode_key_mask(bool_mask, 4)


# ----------------------------------------------------------------------------- refusals
def test_wrong_attention_implementation_is_refused():
    model = make_model("llama")
    ids, mask = prompt()
    cache = GEARCache(GEAR_2BIT, model_config=model.config)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        generate(model, cache, ids, mask, new=2)


def test_without_model_config_an_unconsumed_decode_step_is_refused():
    model = make_model("llama")
    ids, _ = prompt(batch=1)
    model.set_attn_implementation("sdpa")  # the decode steps never reach the gear attention
    with pytest.raises(ValueError, match="not attended by the 'gear'"):
        generate(model, GEARCache(GEAR_2BIT), ids, torch.ones_like(ids), new=4)


def test_decode_update_without_attention_kwargs_is_refused():
    layer = GEARLayer(GEAR_2BIT)
    k = torch.randn(1, 2, 5, 64)
    layer.update(k, k)
    with pytest.raises(ValueError, match="kwargs=kwargs"):
        layer.update(k[:, :, :1], k[:, :, :1])


def test_bad_construction_is_refused():
    with pytest.raises(TypeError, match="config"):
        GEARCache({"bits": 2})
    with pytest.raises(TypeError, match="model_config"):
        GEARCache(GEAR_2BIT, model_config={"num_hidden_layers": 2})
    sliding = make_model("mistral", sliding_window=32).config
    with pytest.raises(ValueError, match=r"no full-attention layer to compress, only \['sliding_attention'\]"):
        GEARCache(GEAR_2BIT, model_config=sliding)
    linear = make_model("llama").config
    linear.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"found layer types \['linear_attention'\]"):
        GEARCache(GEAR_2BIT, model_config=linear)


def test_default_config_and_lazy_layers():
    model = make_model("llama")
    ids, mask = prompt()
    model.set_attn_implementation(GEAR_ATTENTION)
    cache = GEARCache()  # GEARConfig() defaults, layers made on first use
    with warnings.catch_warnings():  # transformers 5.x renames past_key_values -> cache (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)
    assert cache.config == GEARConfig() and len(cache.layers) == 2
    assert cache.get_seq_length() == PROMPT + 1 and cache.layers[0].kv.nblocks == 1


def test_importing_lowrank_ops_does_not_import_transformers():
    code = "import sys, lowrank_ops, lowrank_ops.kvcache; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_gear_cache_resolves_lazily_from_the_package():
    import lowrank_ops

    assert lowrank_ops.GEARCache is GEARCache


# ----------------------------------------------------------------------------- per-layer settings
def test_layer_configs_set_each_layer_or_keep_it_uncompressed():
    """Layer 0 lossless 4-bit, layer 1 (as -1) uncompressed: DynamicCache's tokens; the report
    counts the uncompressed layer's tensors as they are."""
    model = make_model("llama")
    ids, mask = prompt()
    expected = dynamic_tokens(model, ids, mask)
    model.set_attn_implementation(GEAR_ATTENTION)
    cache = GEARCache(GEAR_2BIT, model_config=model.config, layer_configs={0: LOSSLESS_4BIT, -1: None})
    assert torch.equal(generate(model, cache, ids, mask), expected)
    assert isinstance(cache.layers[0], GEARLayer) and cache.layers[0].kv.config == LOSSLESS_4BIT
    assert type(cache.layers[1]) is DynamicLayer and cache.layers[1].keys.shape[2] == PROMPT + NEW - 1
    report = cache.memory_report()
    assert report["layers"] == 1
    assert report["uncompressed_nbytes"] == cache.layers[1].keys.nbytes + cache.layers[1].values.nbytes
    assert report["nbytes"] == cache.layers[0].kv.nbytes + report["uncompressed_nbytes"]


def test_layer_configs_refusals():
    config = make_model("llama").config
    with pytest.raises(ValueError, match="need model_config"):
        GEARCache(GEAR_2BIT, layer_configs={0: None})
    with pytest.raises(TypeError, match="layer_configs: expected a mapping"):
        GEARCache(GEAR_2BIT, model_config=config, layer_configs=[None])
    with pytest.raises(ValueError, match=r"expected layer indices in \[-2, 2\), got 2"):
        GEARCache(GEAR_2BIT, model_config=config, layer_configs={2: None})
    with pytest.raises(ValueError, match="layer 0 is given twice"):
        GEARCache(GEAR_2BIT, model_config=config, layer_configs={0: None, -2: GEAR_2BIT})
    with pytest.raises(TypeError, match=r"layer_configs\[1\]: expected a GEARConfig or None, got dict"):
        GEARCache(GEAR_2BIT, model_config=config, layer_configs={1: {"bits": 4}})
    with pytest.raises(ValueError, match="leaves no layer compressed"):
        GEARCache(GEAR_2BIT, model_config=config, layer_configs={0: None, 1: None})
    with pytest.raises(ValueError, match="layer 0 is a sliding_attention layer"):
        GEARCache(GEAR_2BIT, model_config=make_model("gemma3").config, layer_configs={0: GEAR_2BIT})


# ----------------------------------------------------------------------------- quality on the user's text
def test_cache_quality_is_exact_for_lossless_settings_and_measures_2bit_loss():
    from lowrank_ops.kvcache.hf_quality import cache_quality

    model = make_model("llama")
    ids, _ = prompt(batch=2, pad=0)
    lossless = cache_quality(model, ids, LOSSLESS_4BIT, prefill=40)
    assert lossless.tokens == 2 * (PROMPT - 40)
    assert lossless.perplexity_gear == pytest.approx(lossless.perplexity_dense, rel=1e-5)
    assert abs(lossless.kl) < 1e-7 and lossless.top1_agreement == 1.0
    lossy = cache_quality(model, ids, GEAR_2BIT, prefill=40)
    assert lossy.perplexity_dense == lossless.perplexity_dense
    assert lossy.kl > 1e3 * max(abs(lossless.kl), 1e-12) and lossy.ratio_vs_fp16 < lossless.ratio_vs_fp16
    # per-layer settings reach the cache: the second layer uncompressed loses less than both at 2 bits
    mixed = cache_quality(model, ids, GEAR_2BIT, prefill=40, layer_configs={1: None})
    assert 0 < mixed.kl < lossy.kl
    assert model.config._attn_implementation == "sdpa"  # restored


def test_cache_quality_refusals_leave_the_model_as_it_was(monkeypatch):
    from lowrank_ops.kvcache.hf_quality import cache_quality

    model = make_model("llama")
    ids, _ = prompt(batch=1, pad=0)
    with pytest.raises(ValueError, match="prefill"):
        cache_quality(model, ids, GEAR_2BIT, prefill=PROMPT)
    with pytest.raises(TypeError, match="input_ids"):
        cache_quality(model, ids.float(), GEAR_2BIT, prefill=10)
    with pytest.raises(TypeError, match="model"):
        cache_quality(torch.nn.Linear(2, 2), ids, GEAR_2BIT, prefill=10)
    with pytest.raises(ValueError, match="layer_configs"):
        cache_quality(model, ids, GEAR_2BIT, prefill=10, layer_configs={5: None})
    assert model.config._attn_implementation == "sdpa"

    def fail(*args, **kwargs):
        raise RuntimeError("a decode step failed")

    monkeypatch.setattr(ops, "attention", fail)  # a failure while the model runs the "gear" attention
    with pytest.raises(RuntimeError, match="a decode step failed"):
        cache_quality(model, ids, GEAR_2BIT, prefill=10)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- a prompt prefilled once, reused
PREFIX = 50  # prompt tokens prefilled into the reused cache (past the hybrids' 24-token window)


def prefilled(model, config: GEARConfig, ids, mask, layer_configs=None) -> GEARCache:
    """A cache holding the prompt's first PREFIX tokens (one forward, as a server prefills a shared
    document once), with the positions generate() gives them."""
    model.set_attn_implementation(GEAR_ATTENTION)
    cache = GEARCache(config, model_config=model.config, layer_configs=layer_configs)
    pos = (mask[:, :PREFIX].cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids[:, :PREFIX], attention_mask=mask[:, :PREFIX], position_ids=pos, cache=cache)
    return cache


def test_a_prefilled_prompt_reused_matches_fresh_generation_under_lossless_settings():
    """Two requests share a prefix: each continues from a copy of the prefilled cache (its suffix
    a multi-token step through the compressed cache) and gets DynamicCache's tokens from scratch."""
    model = make_model("llama")
    ids, mask = prompt()
    cache = prefilled(model, LOSSLESS_4BIT, ids, mask)
    other = ids.clone()
    other[:, PREFIX:] = torch.randint(1, SIZES["vocab_size"], (2, PROMPT - PREFIX), generator=torch.Generator().manual_seed(4))
    for request in (ids, other):
        expected = dynamic_tokens(model, request, mask)
        model.set_attn_implementation(GEAR_ATTENTION)
        assert torch.equal(generate(model, copy.deepcopy(cache), request, mask), expected)
    assert cache.get_seq_length() == PREFIX  # the copies grew, the shared prefix did not


def test_one_document_prefilled_once_answers_a_batch_of_questions():
    """A batch-1 document cache repeated over the batch (batch_repeat_interleave), questions of
    different lengths padded between the document and themselves (a key mask with a hole): lossless
    settings give what DynamicCache gives on the same steps."""
    model = make_model("llama")
    doc, _ = prompt(batch=1, length=PREFIX)
    gen = torch.Generator().manual_seed(6)
    questions = torch.randint(1, SIZES["vocab_size"], (2, 20), generator=gen)
    q_mask = torch.ones_like(questions)
    q_mask[0, :7], questions[0, :7] = 0, 0  # the shorter question, left-padded
    ids = torch.cat([doc.expand(2, -1), questions], dim=1)
    mask = torch.cat([torch.ones(2, PREFIX, dtype=torch.long), q_mask], dim=1)

    def answer(cache):
        model(input_ids=doc, cache=cache)
        cache.batch_repeat_interleave(2)
        return generate(model, cache, ids, mask)

    model.set_attn_implementation("sdpa")
    expected = answer(DynamicCache(config=model.config))
    assert torch.equal(answer(gear_cache(model, LOSSLESS_4BIT)), expected)


def _layer_device(layer) -> str:
    return (layer.kv.device if isinstance(layer, GEARLayer) else layer.keys.device).type


@pytest.mark.parametrize("family, layer_configs", [
    ("llama", None), ("gemma3", None), ("llama", {0: dataclasses.replace(GEAR_2BIT, bits=4), 1: None})],
    ids=["llama", "gemma3", "llama-per-layer"])
def test_a_saved_cache_continues_exactly_as_the_one_it_was_saved_from(family, layer_configs, tmp_path):
    """Bit-exact under lossy 2-bit settings: the file is the cache's state (compressed blocks, tail,
    a hybrid's window layer, per-layer settings and uncompressed layers)."""
    model = make_model(family)
    ids, mask = prompt()
    cache = prefilled(model, GEAR_2BIT, ids, mask, layer_configs)
    path = cache.save(tmp_path / "prompt.safetensors")
    loaded = GEARCache.load(path, model_config=model.config)
    if layer_configs is not None:  # without model_config the file alone gives the same layers
        bare = GEARCache.load(path)
        assert [type(layer) for layer in bare.layers] == [GEARLayer, DynamicLayer]
        assert bare.layers[0].kv.config.bits == 4 and bare.nbytes == cache.nbytes
    # one device per layer (a model split over devices): each layer's state goes to its own
    split = GEARCache.load(path, model_config=model.config, device=["cpu", "meta"])
    assert [_layer_device(layer) for layer in split.layers] == ["cpu", "meta"]
    assert loaded.get_seq_length() == PREFIX and loaded.nbytes == cache.nbytes
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in cache.layers]
    expected = generate(model, cache, ids, mask, output_logits=True, return_dict_in_generate=True)
    got = generate(model, loaded, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))


def test_a_loaded_cache_crops_its_tail_only(tmp_path):
    model = make_model("llama")
    ids, mask = prompt()
    loaded = GEARCache.load(prefilled(model, GEAR_2BIT, ids, mask).save(tmp_path / "p.safetensors"))
    assert len(loaded.layers) == 2 and all(isinstance(layer, GEARLayer) for layer in loaded.layers)
    tail = loaded.layers[0].kv.tail_len  # 50 tokens, blocks of 32: 18 in the tail
    loaded.crop(-tail)
    assert loaded.get_seq_length() == PREFIX - tail
    with pytest.raises(ValueError, match="tokens_to_remove"):
        loaded.crop(-1)  # into a compressed block: the raw tokens crop() would need are not saved


def test_saving_and_loading_refusals(tmp_path):
    model = make_model("llama")
    ids, mask = prompt()
    cache = prefilled(model, GEAR_2BIT, ids, mask)
    path = cache.save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="kv heads"):
        GEARCache.load(path, model_config=make_model("llama", num_key_value_heads=1).config)
    with pytest.raises(ValueError, match=r"one device per layer \(2\), got 1"):
        GEARCache.load(path, model_config=model.config, device=["cpu"])
    with pytest.raises(TypeError, match=r"device\[1\]: expected a str, a torch.device or None, got int"):
        GEARCache.load(path, model_config=model.config, device=["cpu", 0])
    with pytest.raises(ValueError, match="has 3 cache layers, the file 2"):
        GEARCache.load(path, model_config=make_model("llama", num_hidden_layers=3).config)
    with pytest.raises(ValueError, match=r"layer 0 is a sliding-window \(24 tokens\) layer, the file's a full-attention one"):
        GEARCache.load(path, model_config=make_model("gemma3").config)
    gemma = make_model("gemma3")
    hybrid = prefilled(gemma, GEAR_2BIT, ids, mask).save(tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="model_config"):
        GEARCache.load(hybrid)
    cache.layers[1].awaiting_attention = True
    with pytest.raises(ValueError, match="between its decode update and its attention"):
        cache.save(tmp_path / "mid-step.safetensors")
    assert not (tmp_path / "mid-step.safetensors").exists()


# ----------------------------------------------------------------------------- gpu lane
@pytest.mark.gpu
@pytest.mark.parametrize("config", [LOSSLESS_4BIT, GEAR_2BIT], ids=["lossless-4bit", "2bit-r4"])
def test_gpu_fp16_decode_runs_the_triton_kernel(config, monkeypatch):
    """fp16 model on CUDA, Triton backend: every decode step of every layer launches the GEAR
    kernel, and the logits follow DynamicCache + SDPA (lossless: fp16 rounding only; 2-bit: the
    CPU bound)."""
    from lowrank_ops.kernels import kvcache_attention as kernels

    calls = []
    original = kernels.gear_decode_attention

    def spy(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(kernels, "gear_decode_attention", spy)
    model = make_model("llama").to("cuda", torch.float16)
    ids, mask = (t.cuda() for t in prompt())
    new = _new_ids().cuda()
    model.set_attn_implementation("sdpa")
    ref = forced_logits(model, DynamicCache(config=model.config), ids, mask, new).float()
    with use_backend("triton"):
        got = forced_logits(model, gear_cache(model, config), ids, mask, new).float()
    assert len(calls) == SIZES["num_hidden_layers"] * NEW
    err = rel_err(got, ref)
    assert torch.isfinite(err).all() and err.max() < (2e-2 if config is LOSSLESS_4BIT else 0.25), err.max()
