"""Interpreter lane: the packed-code helpers every code-reading Triton kernel shares
(``kernels/_codes.py``), on their own, against a numpy unpacking of the same words.

A tiny kernel loads a (ROWS × COLS) tile of codes with ``load_row_codes`` from rows of random
int32 words (every bit pattern, sign bit included) at a word offset, with rows masked off and
the tile running past the row's last word, and stores the codes, their ``codes_to_f32`` and
``codes_to_f16`` values and (2- and 4-bit) the fp16 codes of ``row_codes_f16``, which forms them
two at a time; all must match exactly.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernel_lane import DEVICE, MARKS  # noqa: E402

pytestmark = MARKS

from lowrank_ops.kernels._codes import codes_to_f16, codes_to_f32, load_row_codes, row_codes_f16  # noqa: E402


@triton.jit
def _probe_kernel(words_ptr, codes_ptr, values_ptr, halves_ptr, pairs_ptr, W, w0, words_per_row, n_rows,
                  BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    codes = load_row_codes(words_ptr + rows * W, w0, words_per_row, rows < n_rows, BITS, COLS)
    cols = tl.arange(0, COLS)[None, :]
    tl.store(codes_ptr + rows * COLS + cols, codes)
    tl.store(values_ptr + rows * COLS + cols, codes_to_f32(codes))
    tl.store(halves_ptr + rows * COLS + cols, codes_to_f16(codes))
    if BITS != 1:
        tl.store(pairs_ptr + rows * COLS + cols, row_codes_f16(words_ptr + rows * W, w0, words_per_row, rows < n_rows,
                                                               BITS, COLS))


def _numpy_codes(words: np.ndarray, bits: int, w0: int, words_per_row: int, n_rows: int, cols: int) -> np.ndarray:
    per_word = 32 // bits
    out = np.zeros((words.shape[0], cols), dtype=np.int64)
    u = words.astype(np.int64) & 0xFFFFFFFF
    for r in range(n_rows):
        for c in range(cols):
            w = w0 + c // per_word
            if w < words_per_row:
                out[r, c] = (u[r, w] >> ((c % per_word) * bits)) & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("bits,cols,w0,words_per_row", [
    (4, 64, 1, 9),    # 8 words a row from word 1; the last row word is 8
    (4, 32, 6, 9),    # runs 1 word past the row (w0 + 4 > 9): zeros there
    (2, 64, 2, 5),    # 16 codes a word; the second word is past the row
    (1, 64, 0, 2),    # the 1-bit plane of 3-bit codes: 32 codes a word
    (2, 128, 0, 8),   # a whole 128-channel GEAR row
])
def test_load_row_codes_and_magic_floats(bits, cols, w0, words_per_row):
    rows, n_rows, W = 8, 6, 12  # rows 6, 7 masked off
    gen = torch.Generator().manual_seed(bits * 1000 + cols + w0)
    words = torch.randint(-2**31, 2**31, (rows, W), generator=gen, dtype=torch.int64).to(torch.int32)
    codes = torch.full((rows, cols), -7, dtype=torch.int32)
    values = torch.full((rows, cols), float("nan"), dtype=torch.float32)
    halves = torch.full((rows, cols), float("nan"), dtype=torch.float16)
    pairs = halves.clone()
    d_words, d_codes, d_values, d_halves, d_pairs = (t.to(DEVICE) for t in (words, codes, values, halves, pairs))
    _probe_kernel[(1,)](d_words, d_codes, d_values, d_halves, d_pairs, W, w0, words_per_row, n_rows, BITS=bits,
                        ROWS=rows, COLS=cols)
    expected = _numpy_codes(words.numpy(), bits, w0, words_per_row, n_rows, cols)
    np.testing.assert_array_equal(d_codes.cpu().numpy(), expected)
    np.testing.assert_array_equal(d_values.cpu().numpy(), expected.astype(np.float32))
    np.testing.assert_array_equal(d_halves.cpu().numpy(), expected.astype(np.float16))
    if bits != 1:
        np.testing.assert_array_equal(d_pairs.cpu().numpy(), expected.astype(np.float16))
    assert expected[:n_rows].max() == (1 << bits) - 1  # the draw reaches the largest code
