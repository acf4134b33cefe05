"""Reference lane: the CUDA quant decode wrapper's verdicts and input checks, on CPU tensors (no GPU),
and the kernel's shared-memory staging layout and in-place 4-bit magic floats, restated in torch."""
import pytest
import torch

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support, use_backend
from lowrank_ops.quant import cuda_decode
from lowrank_ops.quant.cuda_decode import CUDA_QUANT_MAX_M
from lowrank_ops.quant.format import outliers_to_csr, pack_codes, pack_group_stats, padded_k
from lowrank_ops.quant.ops import quant_linear

HALF = torch.float16


def make_packed(m=2, k=100, n=12, bits=4, g=32, lut=False, outliers=True, bias=True, dtype=HALF, device="cpu",
                seed=0, qstats=False):
    """x plus the packed-format tensors as a kwargs dict for quant_decode / quant_linear; with
    ``qstats`` the statistics slots hold the second-level form (stat codes, stat meta)."""
    gen = torch.Generator().manual_seed(seed)
    k_pad = padded_k(k, g)
    q = torch.randint(0, 1 << bits, (n, k_pad), generator=gen)
    q[:, k:] = 0
    qweight, qweight_hi = pack_codes(q, bits)
    t = dict(qweight=qweight, qweight_hi=qweight_hi)
    if lut:
        t["lut"] = torch.randn(n, 1 << bits, generator=gen).to(HALF)
    else:
        t["scales"] = (torch.rand(n, k_pad // g, generator=gen) * 0.02 + 0.005).to(HALF)
        t["zeros"] = (torch.rand(n, k_pad // g, generator=gen) * (1 << bits)).to(HALF)
        if qstats:
            # zeros drawn below 2^bits can round up to 2^bits in fp16: clamp to the top code
            t["scales"], t["zeros"] = pack_group_stats(t["scales"], t["zeros"].float().floor().clamp(max=(1 << bits) - 1))
    if outliers:
        mask = torch.rand(n, k, generator=gen) < 0.02
        mask[0] = False  # a row without outliers
        rowptr, cols, vals = outliers_to_csr(mask, torch.randn(n, k, generator=gen))
        t.update(outlier_rowptr=rowptr, outlier_cols=cols, outlier_vals=vals)
    if bias:
        t["bias"] = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x.to(device), {key: val.to(device) for key, val in t.items() if val is not None}


# --------------------------------------------------------------------------- supports()
def test_supports_cpu_tensor_is_refused_with_reason():
    verdict = cuda_decode.supports(torch.randn(1, 64, dtype=HALF), 4)
    assert isinstance(verdict, Support) and not verdict.ok
    assert "CUDA tensor" in verdict.why and "cpu" in verdict.why


def test_supports_never_raises_and_is_cheap_on_cpu(monkeypatch):
    def boom():
        raise AssertionError("supports() must not look for the extension for a CPU tensor")

    monkeypatch.setattr(cuda_ext, "available", boom)
    for x, bits in [
        (torch.randn(3, 5), 4),
        (torch.randn(2, 3, 4, dtype=HALF), 4),
        (torch.empty(0, 8, dtype=HALF), 3),
        (torch.randn(1, 8, dtype=torch.bfloat16), None),
        (torch.empty(1, 8, dtype=HALF, device="meta"), 4),
        ("not a tensor", 4),
    ]:
        verdict = cuda_decode.supports(x, bits, False)
        assert not verdict.ok and verdict.why


@pytest.mark.parametrize(
    "dtype,shape,bits,g,ok,fragment",
    [
        (torch.float16, (1, 64), 4, 128, True, ""),
        (torch.bfloat16, (CUDA_QUANT_MAX_M, 7), 3, 32, True, ""),
        (torch.float16, (CUDA_QUANT_MAX_M + 1, 64), 4, 128, False, "rows"),
        (torch.float32, (1, 64), 4, 128, False, "dtype"),
        (torch.float16, (1, 64), 5, 128, False, "bits"),
        (torch.float16, (1, 64), True, 128, False, "bits"),
        (torch.float16, (1, 64), 4, 16, False, "group_size"),
        (torch.float16, (64,), 4, 128, False, "2-D"),
        (torch.float16, (1, 0), 4, 128, False, "K = 0"),
    ],
)
def test_shape_support_verdicts(dtype, shape, bits, g, ok, fragment):
    verdict = cuda_decode.shape_support(dtype, shape, bits, g)
    assert verdict.ok == ok and fragment in verdict.why


def test_pinned_cuda_backend_on_cpu_says_why():
    x, t = make_packed()
    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend 'cuda'.*CUDA tensor"):
        quant_linear(x, **t, bits=4, group_size=32, in_features=x.shape[1])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("lut,qstats", [(False, False), (True, False), (False, True)])
def test_valid_cpu_call_fails_only_on_device(bits, lut, qstats):
    x, t = make_packed(bits=bits, lut=lut, qstats=qstats)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        cuda_decode.quant_decode(x, **t, bits=bits, group_size=32)


def _drop(t, *keys):
    return {k: v for k, v in t.items() if k not in keys}


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda x, t: (x.float(), t), TypeError, "x: expected dtype"),
        (lambda x, t: (x[None], t), ValueError, "x: expected 2 dimensions"),
        (lambda x, t: (x.t().contiguous().t(), t), ValueError, "x: expected a contiguous"),
        (lambda x, t: (x.repeat(5, 1), t), ValueError, "x: expected 1..8 rows"),
        (lambda x, t: (x, {**t, "qweight": t["qweight"][:, :-1].contiguous()}), ValueError, "qweight: expected shape"),
        (lambda x, t: (x, {**t, "qweight": t["qweight"].to(torch.int64)}), TypeError, "qweight: expected dtype"),
        (lambda x, t: (x, {**t, "qweight_hi": t["qweight"]}), ValueError, "qweight_hi: only used for bits=3"),
        (lambda x, t: (x, {**t, "lut": torch.zeros(12, 16, dtype=HALF)}), ValueError, "lut: LUT mode takes no"),
        (lambda x, t: (x, _drop(t, "zeros")), ValueError, "scales: uniform mode needs both"),
        (lambda x, t: (x, {**t, "scales": t["scales"].float()}), TypeError, "scales: expected dtype"),
        (lambda x, t: (x, {**t, "zeros": t["zeros"][:, :1].contiguous()}), ValueError, "zeros: expected shape"),
        (lambda x, t: (x, _drop(t, "outlier_vals")), ValueError, "go together"),
        (lambda x, t: (x, {**t, "outlier_rowptr": t["outlier_rowptr"][:-1].contiguous()}), ValueError,
         "outlier_rowptr: expected shape"),
        (lambda x, t: (x, {**t, "outlier_cols": t["outlier_cols"].to(torch.int32)}), TypeError,
         "outlier_cols: expected dtype"),
        (lambda x, t: (x, {**t, "outlier_vals": t["outlier_vals"][:-1].contiguous()}), ValueError,
         "outlier_vals: expected shape"),
        (lambda x, t: (x, {**t, "bias": t["bias"].to(torch.bfloat16)}), TypeError, "bias: expected dtype"),
        (lambda x, t: (x, {**t, "bias": t["bias"][:-1].contiguous()}), ValueError, "bias: expected shape"),
        (lambda x, t: (x, {**t, "lr_u": torch.zeros(12, 2, dtype=HALF)}), ValueError, "lr_u: lr_u and lr_v"),
    ],
)
def test_check_inputs_names_the_argument(mutate, exc, pattern):
    x, t = make_packed(bits=4)
    x, t = mutate(x, t)
    with pytest.raises(exc, match=pattern):
        cuda_decode.quant_decode(x, **t, bits=4, group_size=32)


def test_bits3_requires_the_high_plane():
    x, t = make_packed(bits=3)
    with pytest.raises(ValueError, match="qweight_hi: required for bits=3"):
        cuda_decode.quant_decode(x, **_drop(t, "qweight_hi"), bits=3, group_size=32)
    with pytest.raises(ValueError, match="bits: expected one of"):
        cuda_decode.quant_decode(x, **t, bits=5, group_size=32)


def test_reference_backend_still_serves_cpu():
    from lowrank_ops.quant.ops import quant_linear_reference

    x, t = make_packed(bits=3, lut=True)
    y = quant_linear(x, **t, bits=3, group_size=32, in_features=x.shape[1])
    full = {k: t.get(k) for k in ("qweight", "qweight_hi", "scales", "zeros", "lut", "outlier_rowptr", "outlier_cols",
                                  "outlier_vals", "lr_u", "lr_v", "bias")}
    ref = quant_linear_reference(x, *full.values(), bits=3, group_size=32, in_features=x.shape[1])
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda t: {**t, "zeros": t["zeros"][:, :1].contiguous()}, ValueError, "stat_meta: expected shape"),
        (lambda t: {**t, "zeros": t["zeros"].float()}, TypeError, "stat_meta: expected dtype"),
        (lambda t: {**t, "scales": t["scales"][:, :1].contiguous()}, ValueError, "stat_codes: expected shape"),
    ],
)
def test_check_inputs_names_the_second_level_statistics(mutate, exc, pattern):
    x, t = make_packed(bits=3, n=20, qstats=True)
    with pytest.raises(exc, match=pattern):
        cuda_decode.quant_decode(x, **mutate(t), bits=3, group_size=32)


# --------------------------------------------------------------------------- emulation of the kernel's index math
# csrc/quant_decode.cu stages x[:, tile] in shared memory as fp32, column c of the tile at
#   (c % 32 / 8) * (kTile / 4) + (c % 8 / 4) * (kTile / 8) + (c / 32) * 4 + c % 4
# (the 128-bit path writes 8 columns as two float4 at that address and + kTile / 8), and lane
# unit u reads columns u * 32 + chunk * 8 + e at chunk * (kTile / 4) + (e / 4) * (kTile / 8) + u * 4 + e % 4.
# These formulas are restated here from the kernel; they must be one permutation, read back as written.
@pytest.mark.parametrize("k_tile", [2048, 1024])  # MB <= 4 and MB = 8
def test_staging_layout_is_a_conflict_free_permutation(k_tile):
    cols = torch.arange(k_tile)
    scalar = (cols % 32 // 8) * (k_tile // 4) + (cols % 8 // 4) * (k_tile // 8) + (cols // 32) * 4 + cols % 4
    chunk_start = cols - cols % 8  # the 128-bit path: 8 columns from a multiple of 8
    vec = ((chunk_start % 32) // 8) * (k_tile // 4) + (chunk_start // 32) * 4 + (cols % 8 // 4) * (k_tile // 8) + cols % 4
    unit, chunk, e = cols // 32, cols % 32 // 8, cols % 8
    read = chunk * (k_tile // 4) + (e // 4) * (k_tile // 8) + unit * 4 + e % 4
    assert torch.equal(scalar, vec) and torch.equal(scalar, read)
    assert torch.equal(scalar.sort().values, cols)  # a permutation of the tile
    # a warp's float4 reads (lanes = units 0..31 of one chunk and half) are 32 consecutive 16-byte words
    for chunk_i in range(4):
        for half in range(2):
            starts = chunk_i * (k_tile // 4) + half * (k_tile // 8) + torch.arange(32) * 4
            assert torch.equal(starts, starts[0] + torch.arange(0, 128, 4))


def test_in_place_four_bit_codes_are_exact_magic_floats():
    """Unit<4>::uniform: codes 0..4 of a word are read where they sit, (w & 0xF << 4e) | 0x4B000000
    = 2^23 + q * 16^e exactly; codes 5..7 the same after one shift by 20."""
    words = torch.randint(-2**31, 2**31, (4096,), dtype=torch.int64) & 0xFFFFFFFF
    for e in range(8):
        src, pos = (words, e) if e < 5 else (words >> 20, e - 5)
        bits = ((src & (0xF << (4 * pos))) | 0x4B000000).to(torch.int32)  # values < 2^31: no wrap
        value = bits.view(torch.float32).double() - 2.0**23
        assert torch.equal(value, (((words >> (4 * e)) & 0xF) * 16**pos).double())
