"""Reference lane: the CUDA N:M decode wrapper's verdicts and input checks on CPU tensors (no GPU),
dense and 4-bit kept values, and a Python emulation of the kernel's indexing (tiles, 8-value
chunks, word pair, incremental group/slot; for 4-bit values one code word and one scale/zero per
chunk) checked against ``format.unpack_nm`` and the quant reference. (That every csrc/ kernel
builds without register spills is checked by test_csrc_build.py.)"""

import pytest
import torch

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support
from lowrank_ops.quant.compress import quantize_rtn
from lowrank_ops.quant.ops import dequantize_reference
from lowrank_ops.sparse import cuda_decode
from lowrank_ops.sparse.cuda_decode import CUDA_SPARSE_MAX_M
from lowrank_ops.sparse.format import index_bits, nm_mask_from_scores, pack_nm, positions_per_word, unpack_nm

HALF = torch.float16


def make_packed(rows=2, k=96, n_out=12, n=2, m=4, bias=True, dtype=HALF, seed=0):
    """x plus (values, indices, bias) of a random N:M weight packed by the format module."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=gen)
    values, indices = pack_nm(w, nm_mask_from_scores(torch.rand(n_out, k, generator=gen), n, m), n, m)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    return torch.randn(rows, k, generator=gen).to(dtype), values.to(dtype), indices, b


def make_q4(group=32, **kwargs):
    """make_packed with the kept values as 4-bit codes: (x, qweight, scales, zeros, indices, bias)."""
    x, values, indices, b = make_packed(**kwargs)
    q = quantize_rtn(values.float(), bits=4, group_size=group)
    return x, q.qweight, q.scales, q.zeros, indices, b


# --------------------------------------------------------------------------- supports()
def test_supports_cpu_tensor_is_refused_with_reason():
    x, values, _, _ = make_packed()
    verdict = cuda_decode.supports(x, values, 2, 4)
    assert isinstance(verdict, Support) and not verdict.ok
    assert "CUDA tensor" in verdict.why and "cpu" in verdict.why


def test_supports_never_raises_and_is_cheap_on_cpu(monkeypatch):
    def boom():
        raise AssertionError("supports() must not look for the extension for a CPU tensor")

    monkeypatch.setattr(cuda_ext, "available", boom)
    values = torch.zeros(4, 8, dtype=HALF)
    for x, v, n, m in [
        (torch.randn(3, 16), values.float(), 2, 4),
        (torch.randn(2, 3, 16, dtype=HALF), values, 2, 4),
        (torch.empty(1, 16, dtype=HALF, device="meta"), values, 2, 4),
        ("not a tensor", values, 2, 4),
        (torch.randn(1, 16, dtype=HALF), "values", 2, 4),
        (torch.randn(1, 16, dtype=HALF), values, None, 4),
    ]:
        verdict = cuda_decode.supports(x, v, n, m)
        assert not verdict.ok and verdict.why


@pytest.mark.parametrize(
    "dtype,shape,n,m,ok,fragment",
    [
        (torch.float16, (1, 64), 2, 4, True, ""),
        (torch.bfloat16, (CUDA_SPARSE_MAX_M, 80), 3, 8, True, ""),
        (torch.float16, (3, 48), 15, 16, True, ""),
        (torch.float16, (CUDA_SPARSE_MAX_M + 1, 64), 2, 4, False, "rows"),
        (torch.float32, (1, 64), 2, 4, False, "dtype"),
        (torch.float16, (1, 64), 4, 4, False, "pattern"),
        (torch.float16, (1, 64), 2, 6, False, "pattern"),
        (torch.float16, (1, 64), True, 4, False, "pattern"),
        (torch.float16, (1, 60), 2, 8, False, "multiple of m"),
        (torch.float16, (64,), 2, 4, False, "2-D"),
        (torch.float16, (1, 0), 2, 4, False, "K = 0"),
    ],
)
def test_shape_support_verdicts(dtype, shape, n, m, ok, fragment):
    verdict = cuda_decode.shape_support(dtype, shape, n, m)
    assert verdict.ok == ok and fragment in verdict.why, verdict


@pytest.mark.parametrize("group,ok", [(32, True), (64, True), (128, True), (16, False), (True, False), ("32", False)])
def test_shape_support_group_sizes(group, ok):
    verdict = cuda_decode.shape_support(torch.bfloat16, (3, 64), 2, 4, group)
    assert verdict.ok == ok and (ok or "group_size" in verdict.why), verdict


def test_supports_q4_wants_int32_codes():
    x, values, _, _ = make_packed()
    verdict = cuda_decode.supports(x, values, 2, 4, 32)  # CPU: refused for the device first
    assert not verdict.ok and "CUDA tensor" in verdict.why
    meta = torch.empty(1, 96, dtype=HALF, device="meta")
    assert "CUDA tensor" in cuda_decode.supports(meta, values, 2, 4, 32).why


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_valid_cpu_call_fails_only_on_device(n, m, bias):
    x, values, indices, b = make_packed(n=n, m=m, k=96 if m != 16 else 112, bias=bias)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        cuda_decode.nm_linear_decode(x, values, indices, n, m, b)


@pytest.mark.parametrize("n,m,group", [(2, 4, 32), (1, 4, 128), (2, 8, 64), (4, 16, 32)])
def test_valid_q4_cpu_call_fails_only_on_device(n, m, group):
    x, qweight, scales, zeros, indices, b = make_q4(group, n=n, m=m, k=96 if m != 16 else 112)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        cuda_decode.nm_linear_decode(x, qweight, indices, n, m, b, qscales=scales, qzeros=zeros, group_size=group)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda q, s, z, g: (q.float(), s, z, g), TypeError, "values: expected dtype torch.int32"),
        (lambda q, s, z, g: (q[:, :-1].contiguous(), s, z, g), ValueError, r"values: expected shape \(12, 8\)"),
        (lambda q, s, z, g: (q.t().contiguous().t(), s, z, g), ValueError, "values: expected a contiguous"),
        (lambda q, s, z, g: (q, s.float(), z, g), TypeError, "qscales: expected dtype torch.float16"),
        (lambda q, s, z, g: (q, s, z[:, :1].contiguous(), g), ValueError, r"qzeros: expected shape \(12, 2\)"),
        (lambda q, s, z, g: (q, None, z, g), TypeError, "qscales: expected a torch.Tensor"),
        (lambda q, s, z, g: (q, s, z, 48), ValueError, r"group_size: expected one of \(32, 64, 128\), got 48"),
        (lambda q, s, z, g: (q, s, z, True), ValueError, "group_size: expected one of"),
        (lambda q, s, z, g: (q, s, z, None), ValueError, "group_size: expected 32, 64 or 128 with qscales"),
        (lambda q, s, z, g: (q, s, z, 64), ValueError, r"qscales: expected shape \(12, 1\)"),  # one group of 64
    ],
)
def test_check_q4_inputs_names_the_argument(mutate, exc, pattern):
    """KK = 48 kept values in groups of 32: codes (12, 8) int32, scales/zeros (12, 2) fp16."""
    x, qweight, scales, zeros, indices, bias = make_q4(32)
    qweight, scales, zeros, group = mutate(qweight, scales, zeros, 32)
    with pytest.raises(exc, match=pattern):
        cuda_decode.nm_linear_decode(x, qweight, indices, 2, 4, bias, qscales=scales, qzeros=zeros, group_size=group)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda x, v, i, b: (x.float(), v, i, b), TypeError, "x: expected dtype"),
        (lambda x, v, i, b: (x[None], v, i, b), ValueError, "x: expected 2 dimensions"),
        (lambda x, v, i, b: (x.t().contiguous().t(), v, i, b), ValueError, "x: expected a contiguous"),
        (lambda x, v, i, b: (x.repeat(5, 1), v, i, b), ValueError, "x: expected 1..8 rows"),
        (lambda x, v, i, b: (x[:, :-2].contiguous(), v, i, b), ValueError, "x: expected K a positive multiple"),
        (lambda x, v, i, b: (x, v[0], i, b), ValueError, "values: expected a 2-D"),
        (lambda x, v, i, b: (x, v.to(torch.bfloat16), i, b), TypeError, "values: expected dtype"),
        (lambda x, v, i, b: (x, v[:, :-1].contiguous(), i, b), ValueError, "values: expected shape"),
        (lambda x, v, i, b: (x, v.t().contiguous().t(), i, b), ValueError, "values: expected a contiguous"),
        (lambda x, v, i, b: (x, v, i.to(torch.int64), b), TypeError, "indices: expected dtype"),
        (lambda x, v, i, b: (x, v, i[:-1].contiguous(), b), ValueError, "indices: expected shape"),
        (lambda x, v, i, b: (x, v, "indices", b), TypeError, "indices: expected a torch.Tensor"),
        (lambda x, v, i, b: (x, v, i, b.float()), TypeError, "bias: expected dtype"),
        (lambda x, v, i, b: (x, v, i, b[:-1].contiguous()), ValueError, "bias: expected shape"),
    ],
)
def test_check_inputs_names_the_argument(mutate, exc, pattern):
    x, values, indices, bias = make_packed(k=96)
    x, values, indices, bias = mutate(x, values, indices, bias)
    with pytest.raises(exc, match=pattern):
        cuda_decode.nm_linear_decode(x, values, indices, 2, 4, bias)


def test_bad_pattern_is_refused():
    x, values, indices, bias = make_packed()
    with pytest.raises(ValueError, match="m"):
        cuda_decode.nm_linear_decode(x, values, indices, 2, 5, bias)
    with pytest.raises(ValueError, match="n"):
        cuda_decode.nm_linear_decode(x, values, indices, 0, 4, bias)


# --------------------------------------------------------------------------- indexing emulation
def emulate_kernel_columns(indices: torch.Tensor, n: int, m: int, k: int, cols_per_tile: int) -> torch.Tensor:
    """(N, KK) column of every kept value as csrc/sparse_decode.cu computes it: x tiles of
    ``cols_per_tile`` columns, chunks of 8 values from each tile's first kept index, positions
    from word w0 at bit off0 on (spilling into word w0 + 1), group/slot stepped per value, the
    column relative to the tile plus the tile start. Unvisited entries stay -1."""
    assert cols_per_tile % (8 * m) == 0, "the kernel's tiles hold a multiple of 8 groups (chunks start word-aligned)"
    bits, per_word = index_bits(m), positions_per_word(m)
    kk, words = k // m * n, indices.shape[1]
    out = torch.full((indices.shape[0], kk), -1, dtype=torch.int64)
    for r in range(indices.shape[0]):
        row = [int(w) & 0xFFFFFFFF for w in indices[r]]
        for t0 in range(0, k, cols_per_tile):
            cols = min(cols_per_tile, k - t0)
            j_begin, j_end = t0 // m * n, (t0 + cols) // m * n
            for j8 in range(j_begin, j_end, 8):  # one chunk per lane (lanes stride by 32 chunks)
                w0 = j8 // per_word
                off0 = (j8 - w0 * per_word) * bits
                spill = per_word % 8 != 0 and off0 + 8 * bits > per_word * bits and w0 + 1 < words
                word0, word1 = row[w0], row[w0 + 1] if spill else 0
                group, slot = j8 // n, j8 - (j8 // n) * n
                for e in range(8):
                    off = off0 + e * bits
                    pos = (word0 >> off) & (m - 1) if off < per_word * bits else (word1 >> (off - per_word * bits)) & (m - 1)
                    if j8 + e < j_end:
                        col = group * m + pos - t0
                        assert 0 <= col < cols, (r, j8 + e, col)
                        assert out[r, j8 + e] == -1, "a kept value visited twice"
                        out[r, j8 + e] = col + t0
                    slot += 1
                    if slot == n:
                        slot, group = 0, group + 1
    return out


@pytest.mark.parametrize("n,m,k,tile", [(2, 4, 96, 32), (1, 4, 160, 64), (3, 4, 100, 32), (2, 8, 200, 64),
                                         (3, 8, 200, 64), (7, 8, 136, 64), (4, 16, 400, 128), (5, 16, 272, 128)])
def test_kernel_indexing_emulation_matches_unpack(n, m, k, tile):
    """Every kept value visited once, at the column unpack_nm puts it (tile sizes shrunk from the
    kernel's 8192 / MB, keeping its invariant that a tile holds a multiple of 8 groups, so several
    tiles, word spills and partial chunks all occur)."""
    assert tile % (8 * m) == 0
    _, values, indices, _ = make_packed(n_out=5, k=k, n=n, m=m, bias=False, dtype=torch.float32)
    cols = emulate_kernel_columns(indices, n, m, k, tile)
    assert (cols >= 0).all(), "some kept values were never visited"
    dense = torch.zeros(5, k).scatter_(1, cols, values)
    assert torch.equal(dense, unpack_nm(values, indices, n, m, k))


def emulate_q4_chunks(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, kept: int,
                      group: int) -> torch.Tensor:
    """(N, KK) kept values as csrc/sparse_decode.cu dequantizes 4-bit codes: per chunk of 8 values
    (j8 a multiple of 8) one code word ``qrow[j8 / 8]`` of a row of (KK_pad / 8) words, one
    scale/zero at group ``j8 >> log2(group)`` of a row of KK_pad / group entries, code e at bit
    4·e turned into a float by the magic exponent (0x4B000000 | q, minus 2^23), (q − z)·s in fp32."""
    qshift = {32: 5, 64: 6, 128: 7}[group]
    qgroups = (kept + (1 << qshift) - 1) >> qshift
    words = qgroups * group // 8
    flat_q = qweight.reshape(-1)
    flat_s, flat_z = scales.float().reshape(-1), zeros.float().reshape(-1)
    out = torch.empty(qweight.shape[0], kept)
    for r in range(qweight.shape[0]):
        for j8 in range(0, kept, 8):
            codes = int(flat_q[r * words + j8 // 8]) & 0xFFFFFFFF
            s, z = flat_s[r * qgroups + (j8 >> qshift)], flat_z[r * qgroups + (j8 >> qshift)]
            for e in range(min(8, kept - j8)):
                magic = torch.tensor([0x4B000000 | ((codes >> (4 * e)) & 0xF)], dtype=torch.int32).view(torch.float32)
                q = magic - 8388608.0
                out[r, j8 + e] = ((q - z) * s).item()
    return out


@pytest.mark.parametrize("n,m,k,group", [(2, 4, 96, 32), (3, 8, 200, 64), (1, 4, 520, 128), (5, 16, 272, 32)])
def test_kernel_q4_decoding_emulation_matches_reference(n, m, k, group):
    """The kernel's 4-bit chunk decoding (KK off the group size: padded last group) gives the
    quant family's dequantized values exactly."""
    _, qweight, scales, zeros, _, _ = make_q4(group, n_out=5, k=k, n=n, m=m, bias=False)
    kept = k // m * n
    ref = dequantize_reference(qweight, None, scales, zeros, None, None, None, None, None, None,
                               bits=4, group_size=group, in_features=kept)
    assert torch.equal(emulate_q4_chunks(qweight, scales, zeros, kept, group), ref)
