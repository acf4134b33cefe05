"""Reference lane: the packed quantized-weight format (lowrank_ops.quant.format)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_ops.quant.format import (
    QuantFormat,
    csr_to_dense,
    outliers_to_csr,
    pack_codes,
    pack_group_stats,
    padded_k,
    unpack_codes,
    unpack_group_stats,
)


def _random_codes(n, k_pad, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k_pad), generator=gen, dtype=torch.int64).to(torch.uint8)


def _uniform(n, k, bits, g, *, outliers=0, rank=0, seed=0, quantized_stats=False):
    """A valid uniform-mode format with random codes/scales/zeros (and outliers, low-rank); with
    ``quantized_stats`` the statistics in the second-level form (integer zeros)."""
    gen = torch.Generator().manual_seed(seed)
    k_pad = padded_k(k, g)
    q = _random_codes(n, k_pad, bits, seed)
    q[:, k:] = 0
    qweight, qweight_hi = pack_codes(q, bits)
    fields = dict(
        qweight=qweight, qweight_hi=qweight_hi,
        scales=(torch.rand(n, k_pad // g, generator=gen) * 0.1 + 0.01).half(),
        zeros=(torch.rand(n, k_pad // g, generator=gen) * ((1 << bits) - 1)).half(),
        lut=None, outlier_rowptr=None, outlier_cols=None, outlier_vals=None, lr_u=None, lr_v=None,
        bits=bits, group_size=g, in_features=k, out_features=n,
    )
    if outliers:
        mask = torch.zeros(n * k, dtype=torch.bool)
        mask[torch.randperm(n * k, generator=gen)[:outliers]] = True
        rowptr, cols, vals = outliers_to_csr(mask.reshape(n, k), torch.randn(n, k, generator=gen))
        fields.update(outlier_rowptr=rowptr, outlier_cols=cols, outlier_vals=vals)
    if rank:
        fields.update(lr_u=torch.randn(n, rank, generator=gen).half(), lr_v=torch.randn(rank, k, generator=gen).half())
    if quantized_stats:
        codes, meta = pack_group_stats(fields["scales"], fields["zeros"].float().round())
        fields.update(scales=None, zeros=None, stat_codes=codes, stat_meta=meta)
    return QuantFormat(**fields), q


# ----------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 9), words=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_bit_exact(bits, n, words, seed):
    q = _random_codes(n, 32 * words, bits, seed)
    qweight, qweight_hi = pack_codes(q, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (n, 32 * words * (4 if bits == 4 else 2) // 32)
    assert (qweight_hi is None) == (bits != 3)
    if bits == 3:
        assert qweight_hi.shape == (n, words)
    assert torch.equal(unpack_codes(qweight, qweight_hi, bits, 32 * words), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_layout_matches_spec(bits):
    """Code k of a row sits in word k // E at bit (k % E)·B; 3-bit: low 2 bits + a high-bit plane."""
    q = _random_codes(3, 64, bits, seed=1).to(torch.int64)
    qweight, qweight_hi = pack_codes(q, bits)
    lo_bits = 4 if bits == 4 else 2
    per_word = 32 // lo_bits
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    for k in range(64):
        got = (words[:, k // per_word] >> ((k % per_word) * lo_bits)) & ((1 << lo_bits) - 1)
        assert torch.equal(got, q[:, k] & ((1 << lo_bits) - 1))
        if bits == 3:
            hi = ((qweight_hi.to(torch.int64) & 0xFFFFFFFF)[:, k // 32] >> (k % 32)) & 1
            assert torch.equal(hi, q[:, k] >> 2)


def test_pack_sign_bit():
    """All-ones codes set bit 31: the word is negative as int32 and still round-trips."""
    for bits in (2, 3, 4):
        q = torch.full((2, 32), (1 << bits) - 1, dtype=torch.uint8)
        qweight, qweight_hi = pack_codes(q, bits)
        assert int(qweight[0, 0]) == -1
        assert torch.equal(unpack_codes(qweight, qweight_hi, bits, 32), q)


def test_pack_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 32, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(2, 30, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.full((2, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="q"):
        pack_codes(torch.zeros(2, 32), 4)
    qw, hi = pack_codes(torch.zeros(2, 64, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="qweight_hi"):
        unpack_codes(qw, None, 3, 64)
    with pytest.raises(ValueError, match="qweight"):
        unpack_codes(qw, hi, 3, 32)


# ----------------------------------------------------------------------------- second-level statistics


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), g=st.integers(1, 6), spread=st.floats(1.0, 1e3), seed=st.integers(0, 2**31 - 1))
def test_group_stats_round_up_on_a_log_grid(n, g, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    scales = 1e-3 * spread ** torch.rand(n, g, generator=gen)
    zeros = torch.randint(0, 16, (n, g), generator=gen).float()
    codes, meta = pack_group_stats(scales, zeros)
    assert codes.dtype == torch.uint8 and codes.shape == (n, g)
    assert meta.dtype == torch.float16 and meta.shape == (2, -(-n // 16), g)
    dec_s, dec_z = unpack_group_stats(codes, meta)
    assert torch.equal(dec_z, zeros)  # zero points are exact
    ratio = dec_s / scales
    assert bool((ratio >= 1 - 1e-6).all())  # rounded up: a group's range is never clipped
    # one log step of the block at most: (max/min of the block)^(1/15), plus fp16 rounding of the step
    blocks = torch.cat([scales, scales[-1:].expand(-(-n // 16) * 16 - n, g)]).reshape(-1, 16, g)
    bound = (blocks.amax(1) / blocks.amin(1)) ** (1 / 15) * (1 + 2.0**-9)
    assert bool((ratio <= bound[torch.arange(n) // 16] + 1e-6).all())


def test_group_stats_layout_matches_spec():
    scales = torch.tensor([[0.5], [1.0], [2.0], [4.0]]).expand(4, 3).contiguous()
    zeros = torch.tensor([[0.0], [3.0], [7.0], [15.0]]).expand(4, 3).contiguous()
    codes, meta = pack_group_stats(scales, zeros)
    # log2 lo = -1, step = 3 / 15: codes 0, 5, 10, 15 in the low nibble, zeros in the high one
    assert codes[:, 0].tolist() == [0 | 0 << 4, 5 | 3 << 4, 10 | 7 << 4, 15 | 15 << 4]
    assert float(meta[0, 0, 0]) == -1.0 and float(meta[1, 0, 0]) == pytest.approx(0.2, rel=1e-3)
    torch.testing.assert_close(unpack_group_stats(codes, meta)[0], scales, rtol=2e-3, atol=0)


def test_group_stats_errors():
    ok = torch.ones(4, 2)
    with pytest.raises(ValueError, match="zeros.*integers"):
        pack_group_stats(ok, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="zeros.*integers"):
        pack_group_stats(ok, torch.full((4, 2), 16.0))
    with pytest.raises(ValueError, match="scales.*positive"):
        pack_group_stats(-ok, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="zeros.*shape"):
        pack_group_stats(ok, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="scales"):
        pack_group_stats(ok.numpy(), torch.zeros(4, 2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_stats_format_dense_and_bytes(bits):
    n, k, g = 40, 100, 32  # K_pad = 128, G = 4, 3 blocks of 16 rows
    fmt, q = _uniform(n, k, bits, g, quantized_stats=True)
    assert fmt.quantized_stats and fmt.scales is None
    scales, zeros = unpack_group_stats(fmt.stat_codes, fmt.stat_meta)
    group = torch.arange(k) // g
    expected = (q[:, :k].float() - zeros[:, group]) * scales[:, group]
    assert torch.equal(fmt.dense(), expected)
    code_bytes = n * 128 * bits // 8
    assert fmt.nbytes == code_bytes + n * 4 + 2 * 3 * 4 * 2  # codes + one stat byte per group + meta
    big, _ = _uniform(64, 4096, 3, 32, quantized_stats=True)
    assert big.bits_per_weight == pytest.approx(3 + 8 / 32 + 32 / (16 * 32))  # 3.3125


def test_quantized_stats_state_dict_round_trip():
    fmt, _ = _uniform(20, 70, 3, 64, outliers=4, rank=2, quantized_stats=True)
    meta = json.loads(json.dumps(fmt.config()))
    assert meta["quantized_stats"] is True
    back = QuantFormat.from_state_dict(fmt.to_state_dict(), meta)
    assert set(back.tensors()) == set(fmt.tensors()) and {"stat_codes", "stat_meta"} <= set(fmt.tensors())
    assert torch.equal(back.dense(), fmt.dense())
    with pytest.raises(ValueError, match="missing"):
        QuantFormat.from_state_dict(fmt.to_state_dict(), {**meta, "quantized_stats": False})


def test_quantized_stats_validate_errors():
    fmt, _ = _uniform(20, 64, 4, 32, quantized_stats=True)
    fields = dict(qweight=fmt.qweight, qweight_hi=None, scales=None, zeros=None, lut=None, outlier_rowptr=None,
                  outlier_cols=None, outlier_vals=None, lr_u=None, lr_v=None, bits=4, group_size=32,
                  in_features=64, out_features=20, stat_codes=fmt.stat_codes, stat_meta=fmt.stat_meta)

    def bad(exc, match, **change):
        with pytest.raises(exc, match=match):
            QuantFormat(**{**fields, **change})

    bad(ValueError, "stat_meta", stat_meta=None)
    bad(ValueError, "stat_meta", stat_meta=fmt.stat_meta[:, :1])
    bad(TypeError, "stat_codes", stat_codes=fmt.stat_codes.to(torch.int32))
    bad(ValueError, "scales/zeros", scales=torch.ones(20, 2).half())
    bad(ValueError, "stat_codes/stat_meta", lut=torch.zeros(20, 16).half())


# ----------------------------------------------------------------------------- outliers


def test_csr_round_trip():
    n, k = 7, 70000 - 5000  # columns above 32767 exercise the unsigned read of int16
    mask = torch.rand(n, k) < 1e-3
    mask[3] = False  # an empty row
    residual = torch.randn(n, k)
    rowptr, cols, vals = outliers_to_csr(mask, residual)
    assert rowptr.dtype == torch.int32 and cols.dtype == torch.int16 and vals.dtype == torch.float16
    assert rowptr.shape == (n + 1,) and int(rowptr[-1]) == int(mask.sum()) == vals.numel()
    assert int(rowptr[4] - rowptr[3]) == 0
    assert int(cols.min()) < 0  # some column ≥ 32768 stored with the sign bit set
    expected = torch.where(mask, residual.half().float(), torch.zeros(()))
    assert torch.equal(csr_to_dense(rowptr, cols, vals, (n, k)), expected)


def test_csr_empty():
    rowptr, cols, vals = outliers_to_csr(torch.zeros(4, 10, dtype=torch.bool), torch.randn(4, 10))
    assert torch.equal(rowptr, torch.zeros(5, dtype=torch.int32))
    assert cols.numel() == vals.numel() == 0
    assert torch.equal(csr_to_dense(rowptr, cols, vals, (4, 10)), torch.zeros(4, 10))


def test_csr_errors():
    with pytest.raises(ValueError, match="65535"):
        outliers_to_csr(torch.zeros(1, 65536, dtype=torch.bool), torch.zeros(1, 65536))
    with pytest.raises(ValueError, match="residual"):
        outliers_to_csr(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, 2))


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_dense_matches_manual_dequantization(bits, g):
    n, k = 5, 100
    fmt, q = _uniform(n, k, bits, g, outliers=7, rank=2)
    assert torch.equal(fmt.codes(), q)
    manual = torch.empty(n, k)
    for row in range(n):
        for col in range(k):
            s = float(fmt.scales[row, col // g])
            z = float(fmt.zeros[row, col // g])
            manual[row, col] = (int(q[row, col]) - z) * s
    torch.testing.assert_close(fmt.dequantized(), manual, rtol=1e-6, atol=1e-6)
    sparse = fmt.sparse_dense()
    assert int((sparse != 0).sum()) <= 7
    expected = manual + sparse + fmt.lr_u.float() @ fmt.lr_v.float()
    torch.testing.assert_close(fmt.dense(), expected, rtol=1e-5, atol=1e-5)
    assert fmt.dense(torch.float64).dtype == torch.float64


def test_lut_mode_dense():
    n, k, bits, g = 4, 40, 3, 32
    q = _random_codes(n, 64, bits)
    q[:, k:] = 0
    qweight, hi = pack_codes(q, bits)
    lut = torch.randn(n, 8).half()
    fmt = QuantFormat(qweight, hi, None, None, lut, None, None, None, None, None, bits, g, k, n)
    assert fmt.is_lut
    expected = torch.stack([lut[r].float()[q[r, :k].long()] for r in range(n)])
    assert torch.equal(fmt.dense(), expected)


def test_nbytes_uniform_4bit_g128():
    n, k = 64, 4096
    fmt, _ = _uniform(n, k, 4, 128)
    assert fmt.nbytes == n * k // 2 + 2 * (n * k // 128) * 2
    assert fmt.bits_per_weight == pytest.approx(4.25)


def test_nbytes_3bit_outliers_lowrank():
    n, k, g, nnz, r = 16, 100, 32, 13, 3  # K_pad = 128, G = 4
    fmt, _ = _uniform(n, k, 3, g, outliers=nnz, rank=r)
    expected = (
        n * 128 // 16 * 4  # low planes: 2 bits per code
        + n * 128 // 32 * 4  # high plane: 1 bit per code
        + 2 * n * 4 * 2  # fp16 scales + zeros
        + (n + 1) * 4 + nnz * 2 + nnz * 2  # rowptr int32, cols int16, vals fp16
        + (n * r + r * k) * 2  # fp16 factors
    )
    assert fmt.nbytes == expected
    assert fmt.bits_per_weight == pytest.approx(8 * expected / (n * k))
    assert fmt.nnz == nnz and fmt.rank == r


def test_nbytes_2bit_lut():
    n, k = 8, 256
    q = _random_codes(n, 256, 2)
    qweight, _ = pack_codes(q, 2)
    fmt = QuantFormat(qweight, None, None, None, torch.zeros(n, 4).half(), None, None, None, None, None, 2, 64, k, n)
    assert fmt.nbytes == n * 256 // 4 + n * 4 * 2
    assert fmt.bits_per_weight == pytest.approx(2 + 64 / 256)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_state_dict_round_trip(bits):
    fmt, _ = _uniform(6, 70, bits, 32, outliers=5, rank=2)
    meta = json.loads(json.dumps(fmt.config()))
    back = QuantFormat.from_state_dict(fmt.to_state_dict(), meta)
    assert back.config() == fmt.config()
    for name, t in fmt.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    assert torch.equal(back.dense(), fmt.dense())


def test_from_state_dict_refuses_mismatch():
    fmt, _ = _uniform(6, 70, 3, 32, outliers=5)
    state, meta = fmt.to_state_dict(), fmt.config()
    with pytest.raises(ValueError, match="missing"):
        QuantFormat.from_state_dict({k: v for k, v in state.items() if k != "qweight_hi"}, meta)
    with pytest.raises(ValueError, match="unexpected"):
        QuantFormat.from_state_dict({**state, "lut": torch.zeros(6, 8).half()}, meta)
    with pytest.raises(ValueError, match="format"):
        QuantFormat.from_state_dict(state, {**meta, "format": "lowrank"})
    with pytest.raises(ValueError, match="qweight"):
        QuantFormat.from_state_dict(state, {**meta, "in_features": 200})


def test_validate_errors():
    fmt, _ = _uniform(4, 64, 4, 32, outliers=3, rank=1)
    fields = {**{name: getattr(fmt, name) for name in (
        "qweight", "qweight_hi", "scales", "zeros", "lut", "outlier_rowptr", "outlier_cols", "outlier_vals", "lr_u", "lr_v")},
        "bits": 4, "group_size": 32, "in_features": 64, "out_features": 4}

    def bad(exc, match, **change):
        with pytest.raises(exc, match=match):
            QuantFormat(**{**fields, **change})

    bad(ValueError, "bits", bits=5)
    bad(ValueError, "group_size", group_size=16)
    bad(TypeError, "qweight", qweight=fields["qweight"].float())
    bad(ValueError, "qweight", qweight=fields["qweight"][:, :3])
    bad(ValueError, "qweight_hi", qweight_hi=torch.zeros(4, 2, dtype=torch.int32))
    bad(TypeError, "scales", scales=fields["scales"].float())
    bad(ValueError, "zeros", zeros=None)
    bad(ValueError, "scales", lut=torch.zeros(4, 16).half())
    bad(ValueError, "outlier", outlier_vals=None)
    bad(ValueError, "outlier_rowptr", outlier_rowptr=torch.zeros(5, dtype=torch.int32))
    bad(ValueError, "outlier_cols", outlier_cols=torch.full((3,), 64, dtype=torch.int16))
    bad(ValueError, "lr_v", lr_v=torch.zeros(1, 63).half())
    bad(ValueError, "lr_u", lr_v=None)
    bad(TypeError, "lr_v", lr_v=fields["lr_v"].float())
