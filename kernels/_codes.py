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
  float convert; :func:`row_codes_f16` loads 2- or 4-bit codes straight to fp16, two per
  instruction. :func:`word_codes` and :func:`word_codes_f16` are the same after the load, for
  kernels that load a tile's words one tile ahead of their use.
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
    return word_codes(tl.load(row_ptrs + offs_w, mask=row_mask & (offs_w < words_per_row), other=0), BITS, COLS)


@triton.jit
def word_codes(words, BITS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS × COLS) int32 codes of (ROWS × COLS / E) loaded words: :func:`load_row_codes` after its
    load, for a caller that loads the words ahead of their use."""
    E: tl.constexpr = 32 // BITS
    codes = unpack_words(words.to(tl.uint32, bitcast=True), BITS, E, 1)  # logical shifts
    return tl.reshape(codes, (words.shape[0], COLS)).to(tl.int32, bitcast=True)


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


@triton.jit
def _magic_pairs(words, BITS: tl.constexpr, E2: tl.constexpr, STRIDE: tl.constexpr):
    """Pair words of codes k and k + E2 (k < E2, bit offsets k · STRIDE · BITS and 16 more): each
    one OR'd into the mantissas of the fp16 pair (1024, 1024); as ``words.shape + (2,) · log2 E2``,
    most significant bit of k first (the recursion of :func:`unpack_words`)."""
    if E2 == 1:
        return (words & (((1 << BITS) - 1) * 0x10001)) | 0x64006400
    else:
        return tl.join(_magic_pairs(words, BITS, E2 // 2, 2 * STRIDE),
                       _magic_pairs(words >> (STRIDE * BITS), BITS, E2 // 2, 2 * STRIDE))


@triton.jit
def row_codes_f16(row_ptrs, w0, words_per_row, row_mask, BITS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS × COLS) fp16 codes, the fp16 twin of :func:`load_row_codes` for 2- and 4-bit codes
    (16 bits per word hold E / 2 of them): one AND+OR (a LOP3) and one shift per two codes, the
    pair (code k, code k + E/2 of a word) made fp16 pair (1024 + code) by that OR, read as two
    halves and put in column order in the thread that loaded the word; 1024 subtracted as f16x2."""
    E: tl.constexpr = 32 // BITS
    offs_w = w0 + tl.arange(0, COLS // E)[None, :]
    return word_codes_f16(tl.load(row_ptrs + offs_w, mask=row_mask & (offs_w < words_per_row), other=0), BITS, COLS)


@triton.jit
def word_codes_f16(words, BITS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS × COLS) fp16 codes of (ROWS × COLS / E) loaded words: :func:`row_codes_f16` after its load."""
    E: tl.constexpr = 32 // BITS
    pairs = _magic_pairs(words.to(tl.uint32, bitcast=True), BITS, E // 2, 1)
    halves = tl.join((pairs & 0xFFFF).to(tl.int16), (pairs >> 16).to(tl.int16)).to(tl.float16, bitcast=True)
    ROWS: tl.constexpr = words.shape[0]
    # axes (rows, words, k bits..., half): half h of pair k is code k + h · E/2, so the half axis
    # goes before the k axes for column order
    halves = tl.reshape(halves, (ROWS, COLS // E, E // 2, 2))
    codes = tl.reshape(tl.permute(halves, (0, 1, 3, 2)), (ROWS, COLS))
    return codes - 1024.0
