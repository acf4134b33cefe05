"""Reference lane: the packed N:M sparse format (lowrank_ops.sparse.format)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_ops.quant.compress import quantize
from lowrank_ops.sparse.format import (
    NMFormat,
    check_nm_mask,
    from_semi_structured,
    from_semi_structured_cutlass,
    kept_columns,
    nm_mask_from_scores,
    nm_mask_of_dense,
    pack_nm,
    pack_positions,
    to_semi_structured,
    to_semi_structured_cutlass,
    unpack_nm,
    unpack_positions,
)

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8), (3, 16), (1, 16), (15, 16)]


def _random_mask(rows, k, n, m, gen):
    """A random N:M mask (not tied to any weight)."""
    return nm_mask_from_scores(torch.rand(rows, k, generator=gen), n, m)


def _packed(rows, k, n, m, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=gen).to(dtype)
    mask = _random_mask(rows, k, n, m, gen)
    return w, mask, *pack_nm(w, mask, n, m)


def _slow_positions(indices, m, kept):
    """Independent reader of the bit layout: one position at a time, exactly as the contract says."""
    bits = {4: 2, 8: 3, 16: 4}[m]
    per_word = 32 // bits
    out = torch.empty(indices.shape[0], kept, dtype=torch.int64)
    for r in range(indices.shape[0]):
        for j in range(kept):
            word = int(indices[r, j // per_word]) & 0xFFFFFFFF
            out[r, j] = (word >> ((j % per_word) * bits)) & (m - 1)
    return out


# ----------------------------------------------------------------------------- packing


@settings(max_examples=80, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), rows=st.integers(1, 7), groups=st.integers(1, 12),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_bit_exact(pattern, rows, groups, dtype, seed):
    n, m = pattern
    k = groups * m
    w, mask, values, indices = _packed(rows, k, n, m, dtype, seed)
    kept = groups * n
    per_word = {4: 16, 8: 10, 16: 8}[m]
    assert values.shape == (rows, kept) and values.dtype == dtype and values.is_contiguous()
    assert indices.shape == (rows, -(-kept // per_word)) and indices.dtype == torch.int32
    assert torch.equal(unpack_nm(values, indices, n, m, k), w * mask)
    # the layout, read position by position: kept columns of each group, increasing
    pos = _slow_positions(indices, m, kept)
    cols = pos + torch.arange(kept) // n * m
    assert torch.equal(cols, kept_columns(indices, n, m, k))
    assert torch.equal(torch.gather(w, 1, cols), values)
    assert bool(mask.gather(1, cols).all())
    if n > 1:
        assert bool((pos.reshape(rows, groups, n).diff(dim=-1) > 0).all())
    # unused bits are zero: repacking the positions gives the same words
    assert torch.equal(pack_positions(pos, m), indices)
    assert torch.equal(unpack_positions(indices, n, m, kept), pos)


def test_full_words_use_bit_31():
    """A 1:4 row of 16 kept values at position 3 fills all 32 bits: the word reads negative."""
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 3::4] = True
    values, indices = pack_nm(torch.ones(1, 64), mask, 1, 4)
    assert indices.shape == (1, 1) and int(indices[0, 0]) == -1
    assert torch.equal(unpack_nm(values, indices, 1, 4, 64), mask.float())
    # 8 positions of 15 at M=16 and 10 positions of 7 at M=8 (top two bits unused)
    mask8 = torch.zeros(1, 80, dtype=torch.bool)
    mask8[0, 7::8] = True
    assert int(pack_nm(torch.ones(1, 80), mask8, 1, 8)[1][0, 0]) == 2**30 - 1


def test_mask_from_scores_top_n_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0]])
    assert nm_mask_from_scores(scores, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(ValueError, match="scores: expected no NaN"):
        nm_mask_from_scores(torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]), 2, 4)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(2, 8, dtype=torch.bool), 2, 4), None, None),
        ((torch.ones(2, 8, dtype=torch.bool), 4, 4), ValueError, "n: expected 1 <= n < m=4"),
        ((torch.ones(2, 8, dtype=torch.bool), 0, 4), ValueError, "n: expected 1 <= n"),
        ((torch.ones(2, 12, dtype=torch.bool), 2, 6), ValueError, r"m: expected one of \[4, 8, 16\]"),
        ((torch.ones(2, 10, dtype=torch.bool), 2, 4), ValueError, "mask.shape.1.: expected a multiple of m=4"),
        ((torch.ones(2, 8), 2, 4), TypeError, "mask: expected dtype"),
        ((torch.tensor([[True, True, False, False, True, True, True, False]]), 2, 4), ValueError,
         "exactly 2 kept entries .* got 3 in row 0, columns 4..7"),
        ((torch.ones(2, 8, dtype=torch.bool), 2.0, 4), TypeError, "n: expected an int"),
    ],
)
def test_check_nm_mask(args, error, match):
    mask, n, m = args
    if error is None:
        mask = nm_mask_from_scores(torch.rand(mask.shape), n, m)
        assert check_nm_mask(mask, n, m) is mask
        return
    with pytest.raises(error, match=match):
        check_nm_mask(mask, n, m)


def test_pack_bad_inputs():
    w = torch.randn(4, 16)
    mask = nm_mask_from_scores(w.abs(), 2, 4)
    with pytest.raises(ValueError, match="mask: expected shape"):
        pack_nm(w[:2], mask, 2, 4)
    with pytest.raises(ValueError, match="mask: expected exactly 2"):
        pack_nm(w, nm_mask_from_scores(w.abs(), 1, 4), 2, 4)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        pack_nm(w.int(), mask, 2, 4)
    values, indices = pack_nm(w, mask, 2, 4)
    with pytest.raises(ValueError, match="values: expected size 8 at dim 1"):
        unpack_nm(values[:, :6], indices, 2, 4, 16)
    with pytest.raises(ValueError, match="in_features: expected a multiple of m=4"):
        unpack_nm(values, indices, 2, 4, 18)
    with pytest.raises(TypeError, match="indices: expected dtype"):
        unpack_nm(values, indices.long(), 2, 4, 16)


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("n,m,k,dtype,bpw", [
    (2, 4, 256, torch.float16, 9.0), (1, 4, 256, torch.float16, 4.5), (2, 8, 320, torch.float16, 4.8),
    (4, 8, 320, torch.bfloat16, 8 + 4 * 3.2 / 8), (3, 16, 256, torch.float32, 6.0 + 3 * 4 / 16),
])
def test_bytes_and_bits_per_weight(n, m, k, dtype, bpw):
    rows = 6
    _, _, values, indices = _packed(rows, k, n, m, dtype)
    fmt = NMFormat(values, indices, n, m, k, bias=torch.zeros(rows, dtype=dtype))
    kept = k // m * n
    per_word = 32 // {4: 2, 8: 3, 16: 4}[m]
    words = -(-kept // per_word)
    assert fmt.nbytes == rows * kept * values.element_size() + rows * words * 4
    assert fmt.bias_nbytes == rows * values.element_size()
    assert fmt.bits_per_weight == pytest.approx(8 * fmt.nbytes / (rows * k))
    assert fmt.bits_per_weight == pytest.approx(bpw)


def test_format_dense_mask_lowrank_and_quantized_bytes():
    n, m, k, rows = 2, 8, 96, 5
    w, mask, values, indices = _packed(rows, k, n, m, torch.float32)
    u, v = torch.randn(rows, 3), torch.randn(3, k)
    fmt = NMFormat(values, indices, n, m, k, lr_u=u, lr_v=v)
    assert torch.equal(fmt.mask(), mask)
    torch.testing.assert_close(fmt.dense(), w * mask + u @ v)
    assert fmt.nbytes == values.nbytes + indices.nbytes + u.nbytes + v.nbytes and fmt.rank == 3
    q = quantize(values, bits=4, group_size=32, method="rtn")
    qfmt = NMFormat(None, indices, n, m, k, qvalues=q)
    assert qfmt.nbytes == indices.nbytes + q.nbytes  # codes + fp16 scales + fp16 zeros
    assert qfmt.bits_per_weight == pytest.approx(8 * (indices.nbytes + rows * 32 // 2 + 2 * rows * 2) / (rows * k))
    torch.testing.assert_close(qfmt.sparse_dense(), unpack_nm(q.dense(), indices, n, m, k))
    assert bool((qfmt.sparse_dense()[~mask] == 0).all())


@pytest.mark.parametrize("quantized,rank,bias", [(False, 0, False), (False, 2, True), (True, 0, True), (True, 3, False)])
def test_state_dict_round_trip(quantized, rank, bias):
    n, m, k, rows = 3, 16, 64, 7
    _, _, values, indices = _packed(rows, k, n, m, torch.float16)
    extra = dict(bias=torch.randn(rows).half() if bias else None,
                 lr_u=torch.randn(rows, rank).half() if rank else None, lr_v=torch.randn(rank, k).half() if rank else None)
    if quantized:
        fmt = NMFormat(None, indices, n, m, k, qvalues=quantize(values.float(), bits=4, group_size=32, method="rtn"), **extra)
    else:
        fmt = NMFormat(values, indices, n, m, k, **extra)
    meta = json.loads(json.dumps(fmt.config()))
    back = NMFormat.from_state_dict({k2: t.clone() for k2, t in fmt.to_state_dict().items()}, meta)
    assert back.config() == fmt.config()
    assert back.to_state_dict().keys() == fmt.to_state_dict().keys()
    for name, t in fmt.to_state_dict().items():
        assert torch.equal(back.to_state_dict()[name], t), name
    assert torch.equal(back.dense(), fmt.dense())
    state = fmt.to_state_dict()
    with pytest.raises(ValueError, match="state: expected tensors"):
        NMFormat.from_state_dict({**state, "extra": torch.zeros(1)}, meta)
    with pytest.raises(ValueError, match="missing \\['indices'\\]"):
        NMFormat.from_state_dict({k2: t for k2, t in state.items() if k2 != "indices"}, meta)
    with pytest.raises(ValueError, match="metadata: expected format 'nm'"):
        NMFormat.from_state_dict(state, {**meta, "format": "quant"})
    with pytest.raises(ValueError, match="metadata: expected keys"):
        NMFormat.from_state_dict(state, {"format": "nm"})


def test_validate_rejects_corrupt_formats():
    n, m, k, rows = 2, 4, 32, 3
    _, _, values, indices = _packed(rows, k, n, m, torch.float16)
    with pytest.raises(ValueError, match="values/qvalues: expected exactly one"):
        NMFormat(None, indices, n, m, k)
    with pytest.raises(ValueError, match="values: expected size 16 at dim 1"):
        NMFormat(values[:, :8].contiguous(), indices, n, m, k)
    with pytest.raises(ValueError, match="values: expected a row-major contiguous"):
        NMFormat(torch.randn(16, rows).half().t(), indices, n, m, k)
    with pytest.raises(TypeError, match="values: expected dtype"):
        NMFormat(values.double(), indices, n, m, k)
    with pytest.raises(ValueError, match="strictly increasing"):
        NMFormat(values, torch.zeros_like(indices), n, m, k)
    spare = pack_nm(torch.ones(rows, 16), nm_mask_from_scores(torch.rand(rows, 16), 1, 4), 1, 4)[1]
    with pytest.raises(ValueError, match="unused bit"):  # 1:4 with 4 groups: bits 8..31 must be 0
        NMFormat(torch.ones(rows, 4), spare | (1 << 20), 1, 4, 16)
    with pytest.raises(ValueError, match="bias: expected size 3"):
        NMFormat(values, indices, n, m, k, bias=torch.zeros(5).half())
    with pytest.raises(ValueError, match="lr_u/lr_v: expected both"):
        NMFormat(values, indices, n, m, k, lr_u=torch.zeros(rows, 2).half())
    with pytest.raises(ValueError, match="n: expected 1 <= n < m"):
        NMFormat(values, indices, 4, 4, k)
    with pytest.raises(ValueError, match="in_features: expected a multiple of m=4"):
        NMFormat(values, indices, n, m, 30)
    for q in (quantize(values.float(), bits=3, group_size=32, method="rtn"),
              quantize(values.float(), bits=4, group_size=32, method="rtn", quantize_stats=True)):
        with pytest.raises(ValueError, match="qvalues: expected a plain 4-bit"):
            NMFormat(None, indices, n, m, k, qvalues=q)


# ----------------------------------------------------------------------------- torch 2:4 interop


def test_mask_of_dense():
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 3.0, 0.0]])
    assert nm_mask_of_dense(w, 2, 4).tolist() == [[True, True, False, False, True, False, True, False]]
    with pytest.raises(ValueError, match="at most 2 nonzeros .* got 3 in row 0, columns 0..3"):
        nm_mask_of_dense(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 4)


def test_semi_structured_from_dense_cpu():
    w, mask, values, indices = _packed(32, 64, 2, 4, torch.float16)
    values[0, :3] = 0  # zero kept values: positions may move, the dense weight may not
    v2, i2 = from_semi_structured(unpack_nm(values, indices, 2, 4, 64))
    assert torch.equal(unpack_nm(v2, i2, 2, 4, 64), unpack_nm(values, indices, 2, 4, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_layout_round_trip_cpu(dtype):
    _, _, values, indices = _packed(64, 128, 2, 4, dtype)
    packed, meta = to_semi_structured_cutlass(values, indices, 128)
    assert torch.equal(packed, values)  # CUTLASS's kept values are exactly ours (no zero kept value here)
    assert meta.shape == (64, 128 // 16)
    v2, i2 = from_semi_structured_cutlass(packed, meta)
    assert torch.equal(v2, values) and torch.equal(i2, indices)
    with pytest.raises(ValueError, match="multiple of \\(32, 64\\)"):
        to_semi_structured_cutlass(values[:20].contiguous(), indices[:20].contiguous(), 128)


def test_to_semi_structured_needs_cuda():
    _, _, values, indices = _packed(32, 64, 2, 4, torch.float16)
    with pytest.raises(ValueError, match="CUDA-only"):
        to_semi_structured(values, indices, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_round_trip_gpu(dtype):
    _, _, values, indices = _packed(64, 128, 2, 4, dtype)
    values, indices = values.cuda(), indices.cuda()
    semi = to_semi_structured(values, indices, 128)
    assert isinstance(semi, torch.sparse.SparseSemiStructuredTensor)
    dense = unpack_nm(values, indices, 2, 4, 128)
    assert torch.equal(semi.to_dense(), dense)
    v2, i2 = from_semi_structured(semi)
    assert torch.equal(v2, values) and torch.equal(i2, indices)
