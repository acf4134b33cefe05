"""Packed-code helpers shared by the Triton kernels that read bit-packed integer codes (the quant
family's weights, the N:M family's 4-bit kept values, the GEAR cache's keys and values).

Layout they all share: codes of BITS bits sit E = 32 / BITS to an int32 word, code e of a word at
bits [e · BITS, (e + 1) · BITS); a matrix row's words are contiguous.

* :func:`load_row_codes` reads a (ROWS × COLS) tile as its (ROWS × COLS / E) words — one vector
  load per row run — and unpacks them on chip with :func:`unpack_words`, whose in-thread joins
  keep a word's E codes in the thread that loaded it: the reshape to a flat column axis moves
  no data, and a tile bound for a dot is stored to shared memory in wide vectors, not one half
  at a time.
* :func:`codes_to_f32` and :func:`codes_to_f16` turn small codes into floats without an integer →
  float convert.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_words(words, BITS: tl.constexpr, E: tl.constexpr, STRIDE: tl.constexpr):
    """Codes at bit offsets i · STRIDE · BITS (i < E) of ``words``, as ``words.shape + (2,) · log2 E``
    (one axis of 2 per bit of i, most significant first; reshaped flat they are in order i).

    codes(E, S) = join(codes(E/2, 2S) of w, codes(E/2, 2S) of w >> S): each join adds an
    in-thread axis, so a thread ends up holding all E codes of every word it loaded.
    """
    if E == 1:
        return words & ((1 << BITS) - 1)
    else:
        return tl.join(unpack_words(words, BITS, E // 2, 2 * STRIDE),
                       unpack_words(words >> (STRIDE * BITS), BITS, E // 2, 2 * STRIDE))


@triton.jit
def load_row_codes(row_ptrs, w0, words_per_row, row_mask, BITS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS × COLS) int32 codes: columns [w0 · E, w0 · E + COLS) of the rows whose word 0 is at
    ``row_ptrs`` (ROWS × 1 int32 pointers), 0 where ``row_mask`` (ROWS × 1) is false or past the
    row's ``words_per_row`` words. COLS is a multiple of E = 32 / BITS."""
    E: tl.constexpr = 32 // BITS
    offs_w = w0 + tl.arange(0, COLS // E)[None, :]
    words = tl.load(row_ptrs + offs_w, mask=row_mask & (offs_w < words_per_row), other=0)
    codes = unpack_words(words.to(tl.uint32, bitcast=True), BITS, E, 1)  # logical shifts
    return tl.reshape(codes, (row_ptrs.shape[0], COLS)).to(tl.int32, bitcast=True)


@triton.jit
def codes_to_f32(code):
    """Small non-negative integer codes (< 2^23) as fp32, exactly: OR the code into the mantissa of
    2^23 (0x4B000000), reinterpret the bits, subtract 2^23 — a LOP3 and an FADD at full rate
    instead of an I2F, which issues at a fraction of the FMA rate."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def codes_to_f16(code):
    """Small non-negative integer codes (< 1024) as fp16, exactly: the fp16 twin of
    :func:`codes_to_f32`, OR into the mantissa of 1024 (0x6400), reinterpret, subtract 1024; pairs
    of them run as f16x2 arithmetic."""
    return (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
