// GEAR decode attention on tensor cores, reading the compressed cache as stored
// (lowrank_ops/kvcache/format.py): out = softmax(scale q K_hat^T + mask) V_hat with
//   x_hat_t = (code_t - zero) * scale + outliers_t + A_t B_j^T   (token t of block j)
// plus the uncompressed tail. fp16 or bf16 q; every product accumulates in fp32.
//
// Work split (flash-decoding): grid (splits, ceil(M / 8), batch * kv_heads), 4 warps per CTA.
// The sequence is cut into 16-token steps (compressed steps, then the tail's); a CTA owns a
// contiguous run of steps and each warp a contiguous quarter of it, its compressed steps in one
// loop and the tail's in a second. A warp keeps the running max / sum / output of 8 q rows (of
// the M = q heads per kv head x q_len) in registers; the CTA merges its 4 warps through shared
// memory and writes one fp32 partial per split, and a second kernel merges the splits (skipped
// when there is one). On sm_90 both launch with programmatic stream serialization: a kernel's CTAs
// are placed while the kernel before it finishes and wait for it (griddepcontrol) before they
// touch global memory. At most 75 KB of shared memory per CTA and 168 registers per thread on
// sm_90: three CTAs per SM; on sm_80 as many as shared memory holds.
//
// Transposed tiles: every m16n8k16 mma of the step loop has the 8 q rows as its N (= 8), and
// tokens (scores) or channels (output) as its M (= 16), so no half of an mma is padding and the
// accumulators are whole C fragments: S^T = K Q^T, O^T = V^T P^T. Lane (g, t) (g = lane / 4,
// t = lane % 4) holds scores of tokens g and g + 8 for q rows 2t, 2t + 1, and output channels of
// its run for the same two rows.
//
// Loads: every warp streams its steps through a private ring of kStages step slots in shared
// memory (StepSlot): the step's key and value codes, value scales/zeros, outliers, low-rank A
// rows, and the key group's scales/zeros where the step starts one, all by cp.async issued
// kStages - 1 steps ahead (four slots, three for 4-bit codes at head_dim 128), so two or three
// steps' bytes per warp are in flight while it computes. No barrier between warps: a warp's lanes
// sync with __syncwarp around the ring. The B factors of a block are prefetched into L2 when its
// first step is staged. The loop divides nothing: key groups by a shift (G is a power of two),
// blocks by counting steps; the copies are unrolled and predicated.
//
// Per 16-token step a warp issues:
// * scores S^T = C Q'^T: the A operand (m = 16 tokens, k = channels) is built from the packed
//   codes in registers (read from the step slot), never through ldmatrix. Lane (g, t) reads
//   words [t * D/128 * bits, ...) of tokens g and g + 8 -- D/4 contiguous channels -- and each
//   16-bit half of a word gives code pairs (channel c, channel c + E/2) of the same slot: one
//   LOP3 puts both codes into the mantissas of two fp16 magic numbers 2^(10 - k) (k = the code's
//   bit position, so no shift is needed for the low 8 bits of a half and one shift for the high
//   8) and one HSUB2 leaves the exact codes. The mma's k order is therefore a permutation of the
//   channels, and the B operand Q'^T is formed in the same permutation: q is kept in shared
//   memory in fp16 in that order (SharedState::q_pairs), and once per key group one HMUL2 per
//   pair makes Q' = q * key scale (per channel), so the K tile is the bare codes; the zero enters
//   as one bias per row, sum_d Q'_d zero_d (an mma of the zeros as every A row). The mask bits of
//   step i + 1 are loaded while step i computes.
//   Keys' outliers add q[idx] * val to their token's scores: one HFMA2 per outlier on the lane's
//   row pair (q in fp16 row pairs per channel, SharedState::q_rows), summed per token in fp16;
//   the low-rank term is one more k-step: A = the step's A_k rows, B = (q B_kj)^T (rank space,
//   formed once per block by a transposed mma chain, see Warp::key_lowrank).
// * online softmax in base 2 on the score fragments (shuffles across the 8 lanes of a row),
//   rescaling O only when a row's max moved;
// * O^T += V^T P^T: P^T, the B operand (k = 16 tokens, n = 8 rows), is the score fragment
//   packed to fp16 pairs and transposed by one movmatrix per 8 tokens. The A operand (m = 16
//   channels, k = 16 tokens) pairs two tokens of one channel, so lane (g, t) byte-permutes the
//   same half-word of tokens 2t and 2t + 1 (and 2t + 8, 2t + 9) into one word and decodes its
//   slots as above. Lane g covers the channel run [g D/8, (g+1) D/8), one value group
//   (group_size >= 16 divides it); output tile m's rows g and g + 8 are run channels 2m, 2m + 1
//   (Warp::channel), and the dequantization is one HFMA2 with the two tokens' (scale,
//   -zero * scale). Values' outliers form a sparse fp16 tile in shared memory (a token's
//   channels are distinct: plain stores) that goes through the same mma via ldmatrix.trans,
//   then is cleared (each lane keeps the tile offsets of the entries it placed). The low-rank
//   term accumulates P A_v as a C fragment (an mma over the top 8 of 16 rows) and adds
//   B_vj (P A_v)^T once per block (one mma per output tile: that C fragment is the B operand).
// * factors are fp16, or int8 (template flag I8): Â (and the values' B̂) enter the mma as exact
//   fp16 integers (int8_spread_half2: a magic number, no I2F); A's per-(block, rank column) fp32 scales
//   and B's 1/127 multiply the rank-space operands instead (q B_kj, formed in fp32 from B̂, and
//   P A_v). The fp16 path is the int8 one's `else` branches.
// * tail steps: the same mma chain on the raw fp16/bf16 tail (natural channel order).
// Rows whose keys are all masked give 0. Deterministic: no atomics.
//
// This file does not include torch: the host entry point takes raw device pointers and the
// stream as integers (see module.cpp).

#include "gear_decode.h"
#include "lowrank_decode.h"  // DTypeCode
#include "ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace lowrank_ops {
namespace {

using ptx::cp_async;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::fast_exp2;
using ptx::ldmatrix_x4_trans;
using ptx::lop3_and_or;
using ptx::mma16_bf16;
using ptx::mma16_f16;
using ptx::mma_f16;
using ptx::movmatrix_trans;
using ptx::prefetch_l2;

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kStep = 16;  // tokens per warp step: two n8 score tiles = one k16 tile of P V
constexpr int kRows = 8;   // q rows per CTA (lane (g, t) holds row g); more rows -> more row blocks
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxOutliers = 8;  // outliers per vector the kernel stages (round(s * head_dim))
constexpr int kOutliersPerLane = kMaxOutliers * kStep / kWarp;  // a step's value outliers a lane places (even)
constexpr int kMinGroup = 16;  // smallest group size served (value scales per token <= D / 16)

// ----------------------------------------------------------------------------- small helpers
// f16x2 arithmetic on packed words (the fragments are uint32 registers)
__device__ __forceinline__ __half2 as_half2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
__device__ __forceinline__ uint32_t as_word(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) { return as_word(__hsub2(as_half2(a), as_half2(b))); }
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) { return as_word(__hmul2(as_half2(a), as_half2(b))); }
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  return as_word(__hfma2(as_half2(a), as_half2(b), as_half2(c)));
}
constexpr float kInt8BasisScale = 1.f / 127.f;  // int8 B = B̂ / 127 (format.py INT8_BASIS_SCALE)
// int8 values as exact fp16 pairs, no I2F: the word [b0, 0, b1, 0] (bytes) becomes {b0, b1}, each byte
// in the mantissa of 1024 + 128 with its sign bit flipped (one xor with 0x64806480), minus 1152
__device__ __forceinline__ uint32_t int8_spread_half2(uint32_t x) { return hsub2(x ^ 0x64806480u, 0x64806480u); }
// {byte 0, byte 1} of x
__device__ __forceinline__ uint32_t int8x2_half2(uint32_t x) { return int8_spread_half2(__byte_perm(x, 0u, 0x4140)); }
// {lo, hi}, two zero-extended bytes (byte loads): one byte permute puts them in bytes 0 and 2
__device__ __forceinline__ uint32_t int8_pair_half2(uint32_t lo, uint32_t hi) {
  return int8_spread_half2(__byte_perm(lo, hi, 0x5410));
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// q, the tail and the output are fp16 or bf16 (a runtime flag: one kernel serves both).
__device__ __forceinline__ float load_as_float(const uint16_t* p, long i, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(p[i])) : __half2float(__ushort_as_half(p[i]));
}
__device__ __forceinline__ uint16_t float_bits(float v, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, bool bf16) {
  return uint32_t(float_bits(lo, bf16)) | (uint32_t(float_bits(hi, bf16)) << 16);
}
__device__ __forceinline__ void mma16_raw(bool bf16, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (bf16) {
    mma16_bf16(c, a, b0, b1);
  } else {
    mma16_f16(c, a, b0, b1);
  }
}

// ----------------------------------------------------------------------------- code layout
// Codes of BITS bits, E = 32 / BITS per int32 word, code d of a token in word d / E at bit
// (d % E) * BITS; a 16-bit half holds E/2 codes ("slots"). Slot p of both halves of a word is
// the pair (channel word*E + p, channel word*E + E/2 + p).
template <int BITS, int D>
struct Layout {
  static constexpr int kE = 32 / BITS;
  static constexpr int kHalf = kE / 2;            // slots per half
  static constexpr int kDirect = 8 / BITS;        // slots in the low 8 bits of a half
  static constexpr int kWords = D * BITS / 32;    // words per token row
  static constexpr int kKeyWords = kWords / 4;    // words per lane of a key row (D/4 channels)
  static constexpr int kKSteps = D / 16;          // k16 steps of the score mma
  static constexpr int kNT = D / 8;               // n8 tiles of the output = channels per lane's run
  static constexpr int kRunHalves = kNT / kHalf;  // 16-bit halves of a value run: 1, 2 or 4
  static constexpr int kRunWords = kRunHalves >= 2 ? kRunHalves / 2 : 1;
  static_assert(kKeyWords >= 1 && kKSteps * 2 == kKeyWords * kHalf, "key pairs per lane = 2 per k-step");

  // Both codes of slot `slot` of word w as the fp16 pair {low half's, high half's} (exact).
  static __device__ __forceinline__ uint32_t pair(uint32_t w, int slot) {
    const int k = BITS * (slot % kDirect);
    const uint32_t mask = ((1u << BITS) - 1u) << k;
    const uint32_t magic = (25u - k) << 10;  // fp16 2^(10 - k): its mantissa holds code << k exactly
    const uint32_t src = slot < kDirect ? w : (w >> 8);
    return hsub2(lop3_and_or(src, mask | (mask << 16), magic | (magic << 16)), magic | (magic << 16));
  }
  // Key pair i (0 .. D/8 - 1) of lane t, half hi (0: low, 1: high) is channel t * D/4 + key_offset(i, hi).
  static __device__ __forceinline__ constexpr int key_offset(int i, int hi) {
    return (i / kHalf) * kE + hi * kHalf + i % kHalf;
  }
};

// ----------------------------------------------------------------------------- kernel state
// q * qk_scale * 2^-row_exp (rows >= M zero) in fp16 twice: each row in the key pairs' order, the
// B operand of the scores (times the key scales) and the A operand of q B_k; and row pairs per
// channel, for the key outliers' gather
template <int BITS, int D>
struct SharedState {
  using L = Layout<BITS, D>;
  uint32_t q_pairs[kRows][D / 2];  // [row][t D/8 + i]: {q[row][t D/4 + key_offset(i, 0)], ...(i, 1)]}
  uint32_t q_rows[kRows / 2][D];   // [t][c]: {q[2t][c], q[2t + 1][c]}
  float row_scale[kRows];          // 2^row_exp

  // q row r's channel c (fp16 bits) into both arrays
  __device__ __forceinline__ void store_q(int r, int c, __half v) {
    constexpr int kCh = D / 4;  // lane t's key channels [t kCh, (t+1) kCh)
    const int o = c % kCh, word = o / L::kE, slot = o % L::kE;
    const int pair = (c / kCh) * (D / 8) + word * L::kHalf + slot % L::kHalf;  // inverse of key_offset
    reinterpret_cast<__half*>(q_pairs[r])[2 * pair + slot / L::kHalf] = v;
    reinterpret_cast<__half*>(q_rows[r / 2])[2 * c + r % 2] = v;
  }
  union {
    // per warp while the steps run: the values' outliers of the step as a sparse fp16 tile (16 tokens
    // x D, zero elsewhere; column (c % (D/8)) * 8 + c / (D/8) holds channel c, so output tile m is
    // columns 16m..16m+15, rows g and g + 8 of its A operand 8 apart; rows padded by 8 halves:
    // conflict-free ldmatrix)
    __half vout[kWarps][kStep][D + 8];
    float oacc[kWarps][kRows][D];  // after the steps: the warps' outputs, for the merge
  };
  float wm[kWarps][kRows], wl[kWarps][kRows];
};

struct Ptrs {
  const uint32_t *kc, *vc;
  const __half *ks, *kz, *vs, *vz;
  const uint8_t *koi, *voi;
  const __half *kov, *vov, *ka, *kb, *va, *vb;    // fp16 factors
  const int8_t *ka8, *kb8, *va8, *vb8;            // int8 factors ...
  const float *kas, *vas;                          // ... and A's column scales per block
  const uint8_t* mask;

  // the A and B arrays in the factor storage of an instantiation (int8_t or __half)
  template <typename Factor>
  __device__ __forceinline__ void factors(const Factor*& a_k, const Factor*& a_v, const Factor*& b_k,
                                          const Factor*& b_v) const {
    if constexpr (std::is_same_v<Factor, int8_t>) {
      a_k = ka8, a_v = va8, b_k = kb8, b_v = vb8;
    } else {
      a_k = ka, a_v = va, b_k = kb, b_v = vb;
    }
  }
};

__device__ __forceinline__ uint32_t pack_bits(__half lo, __half hi) {
  return uint32_t(__half_as_ushort(lo)) | (uint32_t(__half_as_ushort(hi)) << 16);
}
// N consecutive 4-byte words (N = 1, 2 or 4; src aligned to 4 N bytes) in one load
template <typename T, int N>
__device__ __forceinline__ void load_words(const T* src, T (&w)[N]) {
  static_assert(sizeof(T) == 4 && (N == 1 || N == 2 || N == 4), "one 4-, 8- or 16-byte load of 4-byte words");
  if constexpr (N == 4) {
    *reinterpret_cast<uint4*>(w) = *reinterpret_cast<const uint4*>(src);
  } else if constexpr (N == 2) {
    *reinterpret_cast<uint2*>(w) = *reinterpret_cast<const uint2*>(src);
  } else {
    w[0] = src[0];
  }
}

// `bytes` (a multiple of 16, at most sizeof(dst); both addresses 16-byte aligned) from global
// memory into the shared-memory array dst by the warp's lanes: one 16-byte cp.async per lane and
// 512-byte round, the rounds unrolled to the array's size and predicated (no loop)
template <typename T, size_t N>
__device__ __forceinline__ void copy_to_shared(T (&dst)[N], const void* src, int bytes, int lane) {
  constexpr int kRoundBytes = 16 * kWarp;
#pragma unroll
  for (int r = 0; r < int((sizeof(dst) + kRoundBytes - 1) / kRoundBytes); ++r) {
    const int i = 16 * lane + kRoundBytes * r;
    if (i < bytes) cp_async<16>(reinterpret_cast<char*>(dst) + i, static_cast<const char*>(src) + i);
  }
}

// One compressed 16-token step's inputs in shared memory, as stored (token-major), filled by
// cp.async kStages - 1 steps before the step runs. Every array is a multiple of 16 bytes.
template <int BITS, int D, int RANK, bool I8>
struct alignas(16) StepSlot {
  using L = Layout<BITS, D>;
  using Factor = std::conditional_t<I8, int8_t, __half>;
  // (token, rank) entries of an A array; 16 unused bytes at rank 0
  static constexpr int kRankEntries = RANK > 0 ? kStep * RANK : 16 / int(sizeof(Factor));
  uint32_t key[kStep * L::kWords];                                     // codes
  uint32_t value[kStep * L::kWords];
  __half value_scale[kStep * D / kMinGroup], value_zero[kStep * D / kMinGroup];  // D / G per token
  uint8_t key_out_idx[kStep * kMaxOutliers], value_out_idx[kStep * kMaxOutliers];  // n_out per token, token-major
  __half key_out_val[kStep * kMaxOutliers], value_out_val[kStep * kMaxOutliers];
  Factor key_a[kRankEntries], value_a[kRankEntries];
  __half key_scale[D], key_zero[D];  // the key group's, staged where the step starts one (or the warp's run)

  // the key-mask bits of the lane's two score rows (bit h: token 8h + g) of the step at tok0
  static __device__ __forceinline__ uint32_t keep_bits(const uint8_t* mask, long tok0, int g) {
    if (!mask) return 0x3u;
    return (mask[tok0 + g] ? 0x1u : 0u) | (mask[tok0 + 8 + g] ? 0x2u : 0u);
  }
};

// How a warp stages a step's small arrays (value scales/zeros, outliers, A rows): every 16-byte
// chunk of them, for all steps at once, dealt to (round, lane) when the CTA starts, so staging a
// step is kRounds predicated cp.async of one shared-memory entry each instead of a copy per array
// with its own address arithmetic. Chunk (r, lane) copies 16 bytes from src + step * step_bytes
// into the step's slot at offset dst; meta = dst | step_bytes << 16, 0 for no chunk.
template <int BITS, int D, int RANK, bool I8>
struct CopyPlan {
  using Slot = StepSlot<BITS, D, RANK, I8>;
  static constexpr int kArrays = 8;
  static constexpr int kMaxChunks =
      int(2 * sizeof(Slot::value_scale) + 2 * sizeof(Slot::key_out_idx) + 2 * sizeof(Slot::key_out_val) +
          (RANK > 0 ? 2 * sizeof(Slot::key_a) : 0)) / 16;  // the arrays come in (key, value) or (scale, zero) pairs
  static constexpr int kRounds = (kMaxChunks + kWarp - 1) / kWarp;
  const char* src[kRounds][kWarp];
  uint32_t meta[kRounds][kWarp];

  // one array of a step: its data for step st at base + st * step_bytes, into the slot at dst
  struct Piece {
    const void* base;
    int step_bytes, dst;
  };
  // entries i = thread, thread + threads, ... of the plan (every thread of the CTA, then a barrier);
  // the pieces are walked unrolled, so they stay in registers (no local memory)
  __device__ __forceinline__ void build(const Piece (&pieces)[kArrays], int thread, int threads) {
    for (int i = thread; i < kRounds * kWarp; i += threads) {
      const char* chunk_src = nullptr;
      uint32_t chunk_meta = 0u;
      int chunk = i;  // the entry's chunk among those of pieces[a], pieces[a + 1], ...
#pragma unroll
      for (int a = 0; a < kArrays; ++a) {
        const int count = pieces[a].step_bytes / 16;
        if (chunk >= 0 && chunk < count) {
          chunk_src = static_cast<const char*>(pieces[a].base) + 16 * chunk;
          chunk_meta = uint32_t(pieces[a].dst + 16 * chunk) | uint32_t(pieces[a].step_bytes) << 16;
        }
        chunk -= count;
      }
      src[i / kWarp][i % kWarp] = chunk_src;
      meta[i / kWarp][i % kWarp] = chunk_meta;
    }
  }
  // the lane's chunks of step st into its slot
  __device__ __forceinline__ void stage(Slot& slot, int st, int lane) const {
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const uint32_t m = meta[r][lane];
      if (m != 0u) cp_async<16>(reinterpret_cast<char*>(&slot) + (m & 0xffffu), src[r][lane] + long(st) * (m >> 16));
    }
  }
};

// Value codes and (scale, zero) of one lane for a step, read from its slot: lane (g, t) takes
// value rows 2t, 2t+1, 2t+8, 2t+9 (its channel run [g D/8, (g+1) D/8), one value group).
template <int BITS, int D>
struct ValueFrame {
  using L = Layout<BITS, D>;
  uint32_t vw[2][2][L::kRunWords];  // [token pair][token of the pair][word]
  uint32_t v_scale[2], v_zero[2];    // fp16 {token a, token b} per pair

  template <typename Slot>
  __device__ __forceinline__ void load(const Slot& slot, int g, int t, int group_log2) {  // group size 2^group_log2
    const int word0 = L::kRunHalves >= 2 ? g * L::kRunHalves / 2 : g / 2;
    const int groups = D >> group_log2, vgrp = (g * L::kNT) >> group_log2;  // shifts: no division per step
#pragma unroll
    for (int pr = 0; pr < 2; ++pr) {
      const int tok = 8 * pr + 2 * t;
      load_words(slot.value + tok * L::kWords + word0, vw[pr][0]);
      load_words(slot.value + (tok + 1) * L::kWords + word0, vw[pr][1]);
      v_scale[pr] = pack_bits(slot.value_scale[tok * groups + vgrp], slot.value_scale[(tok + 1) * groups + vgrp]);
      v_zero[pr] = pack_bits(slot.value_zero[tok * groups + vgrp], slot.value_zero[(tok + 1) * groups + vgrp]);
    }
  }
};

template <int BITS, int D, int RANK, bool I8>
struct Warp {
  using L = Layout<BITS, D>;
  static constexpr int kTiles = L::kNT / 2;  // 16-channel output tiles (the mma's M) of O^T
  // channel of output tile m's row g + 8h: lane g's run [g D/8, (g+1) D/8), two channels per tile
  static __device__ __forceinline__ constexpr int channel(int g, int m, int h) { return g * L::kNT + 2 * m + h; }

  // ---- per key group: the B operand Q'^T, Q' = q * key scale (fp16, permuted; lane (g, t) holds q row
  // g), and the zero bias of the lane's rows 2t, 2t+1
  static __device__ __forceinline__ void key_group(const SharedState<BITS, D>& sh, const __half* ks, const __half* kz,
                                                   int t, uint32_t (&aq)[L::kKSteps][2], float (&bias)[2], int g) {
    // the lane's contiguous channels [t D/4, (t+1) D/4), one word's E channels at a time (few live registers)
    constexpr int kCh = D / 4;
    const uint32_t* q = sh.q_pairs[g] + t * (D / 8);  // q row g in pair order
    uint32_t zb[L::kKSteps][2];  // the zeros in aq's channel order, as A rows (the same in every row)
#pragma unroll
    for (int w = 0; w < L::kKeyWords; ++w) {
      __half s[L::kE], z[L::kE];
#pragma unroll
      for (int i = 0; i < L::kE; i += 8) {
        *reinterpret_cast<uint4*>(&s[i]) = *reinterpret_cast<const uint4*>(ks + t * kCh + w * L::kE + i);
        *reinterpret_cast<uint4*>(&z[i]) = *reinterpret_cast<const uint4*>(kz + t * kCh + w * L::kE + i);
      }
#pragma unroll
      for (int i = w * L::kHalf; i < (w + 1) * L::kHalf; ++i) {  // pair i: k-step i / 2, low (even) or high k
        const int lo = L::key_offset(i, 0), hi = L::key_offset(i, 1);  // channel offsets in the lane's range
        const int slo = lo - w * L::kE, shi = hi - w * L::kE;           // ... in this word's E channels
        // [0]: k 2t, 2t+1 of the k-step; [1]: k 2t+8, 2t+9
        aq[i / 2][i % 2] = hmul2(q[i], pack_bits(s[slo], s[shi]));
        zb[i / 2][i % 2] = pack_bits(z[slo], z[shi]);
      }
    }
    // bias[c] = sum_d Q'_d zero_d of row 2t + c: the zeros as every A row (a token of zeros), so the
    // mma sums over the quad's channels as it does for the codes
    float zc[2][4] = {};  // even and odd k-steps: two mma chains
#pragma unroll
    for (int ks_ = 0; ks_ < L::kKSteps; ++ks_)
      mma16_f16(zc[ks_ % 2], {zb[ks_][0], zb[ks_][0], zb[ks_][1], zb[ks_][1]}, aq[ks_][0], aq[ks_][1]);
    bias[0] = zc[0][0] + zc[1][0];
    bias[1] = zc[0][1] + zc[1][1];
  }

  // ---- per block: the B operand (k = rank) of the scores' low-rank k-step, {qB[g][2t], qB[g][2t+1]}
  // with qB = q' B_kj, by one m16n8k16 chain over the channels in the key pairs' order, transposed:
  // A = B_kj^T (top rows: row g = rank g, zero past the rank; int8 B̂ as exact fp16 integers, times
  // A's column scales / 127 after), B = q'^T (the lane's q_pairs words as they are), so the C
  // fragment holds (qB)^T[g][2t, 2t+1], and one movmatrix turns it into the operand. A lane reads
  // its 4 D/16 entries of B_kj as independent L2 loads (one round trip; the block's B was
  // prefetched when its first step was staged).
  static __device__ __forceinline__ uint32_t key_lowrank(const SharedState<BITS, D>& sh, const Ptrs& p, int blk,
                                                         int t, int g) {
    if constexpr (RANK > 0) {
      using Factor = typename StepSlot<BITS, D, RANK, I8>::Factor;
      const Factor *a_k, *a_v, *b_k, *b_v;
      p.factors(a_k, a_v, b_k, b_v);
      const Factor* b = b_k + long(blk) * D * RANK + g;  // column g: B[c][g] at b[c * RANK]
      const bool live = g < RANK;
      const auto pair = [&](int i) -> uint32_t {  // rank g at the channels of key pair i of lane t
        if (!live) return 0u;
        const int c0 = t * (D / 4) + L::key_offset(i, 0), c1 = t * (D / 4) + L::key_offset(i, 1);
        if constexpr (I8) {
          return int8_pair_half2(uint8_t(b[c0 * RANK]), uint8_t(b[c1 * RANK]));
        } else {
          return pack_bits(b[c0 * RANK], b[c1 * RANK]);
        }
      };
      uint32_t bt[L::kKSteps][2];
#pragma unroll
      for (int ks_ = 0; ks_ < L::kKSteps; ++ks_) {
        bt[ks_][0] = pair(2 * ks_);
        bt[ks_][1] = pair(2 * ks_ + 1);
      }
      const uint32_t* q = sh.q_pairs[g] + t * (D / 8);
      float c[2] = {0.f, 0.f};  // (qB)^T[g][2t], (qB)^T[g][2t + 1]
#pragma unroll
      for (int ks_ = 0; ks_ < L::kKSteps; ++ks_) mma_f16(c, bt[ks_][0], bt[ks_][1], q[2 * ks_], q[2 * ks_ + 1]);
      if constexpr (I8) {  // A's scale of rank column g and B's 1/127
        if (live) {
          const float sc = p.kas[long(blk) * RANK + g] * kInt8BasisScale;
          c[0] *= sc;
          c[1] *= sc;
        }
      }
      return movmatrix_trans(pack_half2(c[0], c[1]));
    } else {
      return 0u;
    }
  }

  // ---- per block end: O^T += B_vj (P A_v)^T, one mma per output tile m: A = B_vj rows ch(m, 0),
  // ch(m, 1) (k = rank 2t, 2t+1; zero past the rank), B = (P A_v)^T, whose k = rank, n = row g
  // operand is P A_v's C fragment {PA[g][2t], PA[g][2t+1]}
  static __device__ __forceinline__ void flush_value_lowrank(const Ptrs& p, int blk, int t, int g, float (&pa)[2],
                                                             float (&o)[kTiles][4]) {
    if constexpr (RANK > 0) {
      const bool live = 2 * t < RANK;
      uint32_t b0;
      const auto basis = [&](int ch) -> uint32_t {  // {B_vj[ch][2t], B_vj[ch][2t + 1]}
        if constexpr (I8) {  // B̂ as exact fp16 integers (B = B̂ / 127: the 1/127 is on the B operand)
          const int8_t* b = p.vb8 + long(blk) * D * RANK + ch * RANK + 2 * t;
          return live ? int8x2_half2(*reinterpret_cast<const uint16_t*>(b)) : 0u;
        } else {
          return live ? *reinterpret_cast<const uint32_t*>(p.vb + long(blk) * D * RANK + ch * RANK + 2 * t) : 0u;
        }
      };
      if constexpr (I8) {  // A's scales and B's 1/127 on P A_v's columns 2t, 2t+1 (pa is 0 past the rank)
        const float* sc = p.vas + long(blk) * RANK;
        b0 = live ? pack_half2(pa[0] * sc[2 * t] * kInt8BasisScale, pa[1] * sc[2 * t + 1] * kInt8BasisScale) : 0u;
      } else {
        b0 = pack_half2(pa[0], pa[1]);
      }
#pragma unroll
      for (int m = 0; m < kTiles; ++m)
        mma16_f16(o[m], {basis(channel(g, m, 0)), basis(channel(g, m, 1)), 0u, 0u}, b0, 0u);
      pa[0] = pa[1] = 0.f;
    }
  }

  // ---- online softmax over the step's transposed scores s[2h + c] (token 8h + g, row 2t + c):
  // scores -> probabilities in place, the running max m[c] of row 2t + c (over the 8 lanes of column
  // t: shuffles across g) and the lane's partial sum l[c]; alpha[c] rescales what was accumulated
  // before. Returns whether any row's max moved (then O needs the rescale).
  static __device__ __forceinline__ bool softmax(float (&s)[4], float (&m)[2], float (&l)[2], float (&alpha)[2]) {
    bool moved = false;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float mx = fmaxf(s[c], s[2 + c]);
#pragma unroll
      for (int off = 4; off < kWarp; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
      const float m_new = fmaxf(m[c], mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      alpha[c] = fast_exp2(m[c] - m_safe);
      moved |= m_new != m[c];
      s[c] = fast_exp2(s[c] - m_safe);
      s[2 + c] = fast_exp2(s[2 + c] - m_safe);
      l[c] = l[c] * alpha[c] + s[c] + s[2 + c];
      m[c] = m_new;
    }
    return __any_sync(kFull, moved);
  }
};

// ----------------------------------------------------------------------------- merging partials
// A softmax partial of one output entry: its running max (base 2), sum of weights and weighted sum.
struct Partial {
  float max, sum, acc;
  __device__ __forceinline__ float value() const { return sum > 0.f ? acc / sum : 0.f; }  // 0: no keys
};
// N partials of one output entry (max m[i * ml_stride], sum l[i * ml_stride], weighted sum
// acc[i * acc_stride], in shared memory) as one: each weighted 2^(m_i - max) (0 for a partial
// with no keys, max -inf)
template <int N>
__device__ __forceinline__ Partial merge_partials(const float* m, const float* l, const float* acc, int ml_stride,
                                                  int acc_stride) {
  Partial out{-INFINITY, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < N; ++i) out.max = fmaxf(out.max, m[i * ml_stride]);
  const float m_safe = out.max == -INFINITY ? 0.f : out.max;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float wt = fast_exp2(m[i * ml_stride] - m_safe);
    out.acc += wt * acc[i * acc_stride];
    out.sum += wt * l[i * ml_stride];
  }
  return out;
}

// ----------------------------------------------------------------------------- split kernel
// dynamic shared memory of the split kernel: the state, the copy plan, then each warp's ring of
// step slots: four (steps i + 1 .. i + 3 load while step i computes) where a CTA stays within
// kSmemPerCta, else three
constexpr size_t kSmemPerCta = 75 * 1024;  // three CTAs per SM on sm_90 (228 KB), two on sm_80 (164 KB)
constexpr size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }
template <int BITS, int D>
constexpr size_t kPlanOffset = round16(sizeof(SharedState<BITS, D>));
template <int BITS, int D, int RANK, bool I8>
constexpr size_t kRingOffset = kPlanOffset<BITS, D> + round16(sizeof(CopyPlan<BITS, D, RANK, I8>));
template <int BITS, int D, int RANK, bool I8>
constexpr int kStageCount =
    kRingOffset<BITS, D, RANK, I8> + 4 * kWarps * sizeof(StepSlot<BITS, D, RANK, I8>) <= kSmemPerCta ? 4 : 3;
template <int BITS, int D, int RANK, bool I8>
constexpr size_t kSplitSmemBytes =
    kRingOffset<BITS, D, RANK, I8> + kStageCount<BITS, D, RANK, I8> * kWarps * sizeof(StepSlot<BITS, D, RANK, I8>);

// Registers for as many CTAs per SM as shared memory holds (a CTA's dynamic shared memory plus the
// 1 KB the driver reserves per CTA, of 228 KB per SM on sm_90, 164 KB on sm_80), at most three
// (<= 168 registers per thread; no instantiation spills there). So on sm_80, where the head_dim-128
// instantiations fit two CTAs by shared memory, they may take up to 255 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr size_t kSmemPerSm = 164 * 1024;
#else
constexpr size_t kSmemPerSm = 228 * 1024;
#endif
constexpr int kMaxCtasPerSm = 3;
template <int BITS, int D, int RANK, bool I8>
constexpr int kCtasBySmem = int(kSmemPerSm / (kSplitSmemBytes<BITS, D, RANK, I8> + 1024));
template <int BITS, int D, int RANK, bool I8>
constexpr int kMinCtasPerSm =
    kCtasBySmem<BITS, D, RANK, I8> < kMaxCtasPerSm ? kCtasBySmem<BITS, D, RANK, I8> : kMaxCtasPerSm;

template <int BITS, int D, int RANK, bool I8>
__global__ void __launch_bounds__(kThreads, (kMinCtasPerSm<BITS, D, RANK, I8>)) gear_split_kernel(GearDecodeArgs a) {
  using L = Layout<BITS, D>;
  using W = Warp<BITS, D, RANK, I8>;
  using Slot = StepSlot<BITS, D, RANK, I8>;
  using Factor = typename Slot::Factor;
  constexpr int kStages = kStageCount<BITS, D, RANK, I8>;
  LOWRANK_OPS_DYNAMIC_SMEM(smem);
  using State = SharedState<BITS, D>;
  State& sh = *reinterpret_cast<State*>(smem);
  // a programmatic launch may start while the stream's previous kernel finishes: nothing in global
  // memory is touched before it has; the combine kernel's CTAs may then be placed as SMs free up
  ptx::wait_for_prior_grids();
  ptx::allow_dependent_grids();

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane / 4, t = lane % 4;
  const int split = blockIdx.x, row0 = blockIdx.y * kRows;
  const long bh = blockIdx.z;
  const int M = a.M, B = a.buffer_tokens, G = a.group_size, n_out = a.n_out;
  const int rows_here = min(kRows, M - row0);
  const long Tc = long(a.nblocks) * B;
  const int csteps = int(Tc / kStep);
  const int all_steps = csteps + (a.tail_len + kStep - 1) / kStep;
  const long seq_len = Tc + a.tail_len;

  // (batch, kv head) slabs
  Ptrs p{};  // null until set
  p.kc = reinterpret_cast<const uint32_t*>(a.key_codes) + bh * Tc * L::kWords;
  p.vc = reinterpret_cast<const uint32_t*>(a.value_codes) + bh * Tc * L::kWords;
  p.ks = reinterpret_cast<const __half*>(a.key_scale) + bh * (Tc / G) * D;
  p.kz = reinterpret_cast<const __half*>(a.key_zero) + bh * (Tc / G) * D;
  p.vs = reinterpret_cast<const __half*>(a.value_scale) + bh * Tc * (D / G);
  p.vz = reinterpret_cast<const __half*>(a.value_zero) + bh * Tc * (D / G);
  p.koi = reinterpret_cast<const uint8_t*>(a.key_out_idx) + bh * Tc * n_out;
  p.voi = reinterpret_cast<const uint8_t*>(a.value_out_idx) + bh * Tc * n_out;
  p.kov = reinterpret_cast<const __half*>(a.key_out_val) + bh * Tc * n_out;
  p.vov = reinterpret_cast<const __half*>(a.value_out_val) + bh * Tc * n_out;
  if constexpr (I8) {  // the other storage's pointers stay null (its offsets would leave the buffers)
    p.ka8 = reinterpret_cast<const int8_t*>(a.key_lr_a) + bh * Tc * RANK;
    p.va8 = reinterpret_cast<const int8_t*>(a.value_lr_a) + bh * Tc * RANK;
    p.kb8 = reinterpret_cast<const int8_t*>(a.key_lr_b) + bh * a.nblocks * D * RANK;
    p.vb8 = reinterpret_cast<const int8_t*>(a.value_lr_b) + bh * a.nblocks * D * RANK;
    p.kas = reinterpret_cast<const float*>(a.key_lr_scale) + bh * a.nblocks * RANK;
    p.vas = reinterpret_cast<const float*>(a.value_lr_scale) + bh * a.nblocks * RANK;
  } else {
    p.ka = reinterpret_cast<const __half*>(a.key_lr_a) + bh * Tc * RANK;
    p.va = reinterpret_cast<const __half*>(a.value_lr_a) + bh * Tc * RANK;
    p.kb = reinterpret_cast<const __half*>(a.key_lr_b) + bh * a.nblocks * D * RANK;
    p.vb = reinterpret_cast<const __half*>(a.value_lr_b) + bh * a.nblocks * D * RANK;
  }
  // the key mask's rows span the prefix too (positions 0 .. prefix_len - 1, attended by the combine kernel)
  p.mask = a.key_mask ? reinterpret_cast<const uint8_t*>(a.key_mask) + (bh / a.kv_heads) * (a.prefix_len + seq_len) +
                            a.prefix_len
                      : nullptr;
  const bool bf16 = a.dtype == kBFloat16;
  const uint16_t* q = reinterpret_cast<const uint16_t*>(a.q) + (bh * M + row0) * D;
  const uint16_t* tk = reinterpret_cast<const uint16_t*>(a.tail_keys) + bh * B * D;
  const uint16_t* tv = reinterpret_cast<const uint16_t*>(a.tail_values) + bh * B * D;

  // this warp's steps
  const int first = split * a.steps_per_split;
  const int count = min(a.steps_per_split, all_steps - first);
  const int per_warp = (count + kWarps - 1) / kWarps;
  const int s_begin = first + min(count, warp * per_warp);
  const int s_end = first + min(count, (warp + 1) * per_warp);

  // this warp's ring: step st runs from slot st % kStages, staged kStages - 1 steps before
  Slot* const ring = reinterpret_cast<Slot*>(smem + kRingOffset<BITS, D, RANK, I8>) + warp * kStages;
  const int c_end = min(s_end, csteps);  // the warp's compressed steps are [s_begin, c_end)
  // key groups and blocks of a step without a division per step: G is a power of two (>= 16), so
  // step >> group_shift is its key group; staging and the loop visit consecutive steps, so a block
  // is entered where a step reaches the previous block's end, and it is the next block (one
  // division for the first block a warp enters)
  const int group_shift = __ffs(G / kStep) - 1, group_log2 = __ffs(G) - 1;
  const int steps_per_block = B / kStep;
  const auto entered_block = [&](int step, int previous) { return previous < 0 ? step / steps_per_block : previous + 1; };
  int stage_block = -1, stage_block_end = -1;  // the block of the last staged step, the first step past it
  using Plan = CopyPlan<BITS, D, RANK, I8>;
  Plan& plan = *reinterpret_cast<Plan*>(smem + kPlanOffset<BITS, D>);
  const Factor *ka, *va, *kb, *vb;
  p.factors(ka, va, kb, vb);
  {
    const int vgroups = D / G, a_bytes = RANK > 0 ? kStep * RANK * int(sizeof(Factor)) : 0;
    const typename Plan::Piece pieces[Plan::kArrays] = {
        {p.vs, 2 * kStep * vgroups, int(offsetof(Slot, value_scale))},
        {p.vz, 2 * kStep * vgroups, int(offsetof(Slot, value_zero))},
        {p.koi, kStep * n_out, int(offsetof(Slot, key_out_idx))},  // 16 n_out bytes: a multiple of 16
        {p.voi, kStep * n_out, int(offsetof(Slot, value_out_idx))},
        {p.kov, 2 * kStep * n_out, int(offsetof(Slot, key_out_val))},
        {p.vov, 2 * kStep * n_out, int(offsetof(Slot, value_out_val))},
        {ka, a_bytes, int(offsetof(Slot, key_a))},
        {va, a_bytes, int(offsetof(Slot, value_a))}};
    plan.build(pieces, threadIdx.x, kThreads);
  }
  __syncthreads();  // the plan is the CTA's
  const auto stage_step = [&](int st) {
    Slot& slot = ring[st % kStages];
    const long tok0 = long(st) * kStep;
    copy_to_shared(slot.key, p.kc + tok0 * L::kWords, sizeof(slot.key), lane);
    copy_to_shared(slot.value, p.vc + tok0 * L::kWords, sizeof(slot.value), lane);
    plan.stage(slot, st, lane);
    if (st == s_begin || (st & ((1 << group_shift) - 1)) == 0) {  // where the loop below enters a key group
      const long group_entries = long(st >> group_shift) * D;
      copy_to_shared(slot.key_scale, p.ks + group_entries, 2 * D, lane);
      copy_to_shared(slot.key_zero, p.kz + group_entries, 2 * D, lane);
    }
    if constexpr (RANK > 0) {
      if (st >= stage_block_end) {  // the block's B factors, read when the loop enters it: into L2
        stage_block = entered_block(st, stage_block);
        stage_block_end = (stage_block + 1) * steps_per_block;
        const long blk_entries = long(stage_block) * D * RANK;
        for (int i = 128 * lane; i < D * RANK * int(sizeof(Factor)); i += 128 * kWarp) {
          prefetch_l2(reinterpret_cast<const char*>(kb + blk_entries) + i);
          prefetch_l2(reinterpret_cast<const char*>(vb + blk_entries) + i);
        }
      }
    }
  };
  // the first steps' slots and mask bits fly while q is set up; one commit group per step (empty
  // past the warp's compressed steps), so waiting for step i is always wait_group<kStages - 1>
  for (int i = 0; i < kStages - 1; ++i) {
    if (s_begin + i < c_end) stage_step(s_begin + i);
    cp_async_commit();
  }
  uint32_t keep_next = s_begin < c_end ? Slot::keep_bits(p.mask, long(s_begin) * kStep, g) : 0x3u;

  // q rows -> fp32, scaled by qk_scale and a power of two per row that brings its largest
  // entry to (1/2, 1] (fp16 operands for any bf16 q; q * key scale cannot overflow)
  for (int r = warp; r < kRows; r += kWarps) {
    float v[D / kWarp];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < D / kWarp; ++i) {
      v[i] = r < rows_here ? load_as_float(q, r * D + lane + kWarp * i, bf16) * a.qk_scale : 0.f;
      amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, off));
    const float e = ceilf(log2f(fmaxf(amax, 1e-30f)));
    const float down = exp2f(-e);
#pragma unroll
    for (int i = 0; i < D / kWarp; ++i) sh.store_q(r, lane + kWarp * i, __float2half_rn(v[i] * down));
    if (lane == 0) sh.row_scale[r] = exp2f(e);
  }
  __half(&vout)[kStep][D + 8] = sh.vout[warp];
  static_assert(offsetof(State, vout) % 16 == 0 && sizeof(vout) % 16 == 0, "zeroed 16 bytes at a time");
  uint4* const vout_words = reinterpret_cast<uint4*>(&vout[0][0]);
  for (int i = lane; i < int(sizeof(vout) / 16); i += kWarp) vout_words[i] = uint4{0u, 0u, 0u, 0u};
  __syncthreads();

  constexpr int kTiles = W::kTiles;
  float o[kTiles][4];  // O^T: o[m][2h + c] = O[row 2t + c][channel(g, m, h)]
#pragma unroll
  for (int m = 0; m < kTiles; ++m) o[m][0] = o[m][1] = o[m][2] = o[m][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, bias[2] = {0.f, 0.f};  // rows 2t, 2t + 1
  const float row_scale[2] = {sh.row_scale[2 * t], sh.row_scale[2 * t + 1]};
  uint32_t aq[L::kKSteps][2];
  uint32_t a_qb = 0u;           // {qB[g][2t], qB[g][2t+1]}: B operand of the scores' low-rank k-step
  float pa[2] = {0.f, 0.f};     // C fragment of P A_v (rows g, rank 2t, 2t+1) since the block began
  int cur_group = -1, cur_block = -1, block_end = -1;  // block_end: first step past cur_block
  ValueFrame<BITS, D> vf;

  // masked tokens (and tail positions past the end) -> -inf, then the online softmax; O and P A_v
  // rescaled where a row's max moved
  const auto softmax_step = [&](float (&s)[4], uint32_t keep) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (!((keep >> (i / 2)) & 1u)) s[i] = -INFINITY;
    float alpha[2];
    if (W::softmax(s, m_run, l_run, alpha)) {
#pragma unroll
      for (int m = 0; m < kTiles; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[m][i] *= alpha[i % 2];
      if constexpr (RANK > 0) {  // P A_v holds row g: its alpha from lane (0, g / 2)
        const float a0 = __shfl_sync(kFull, alpha[0], g / 2), a1 = __shfl_sync(kFull, alpha[1], g / 2);
        const float alpha_g = g % 2 ? a1 : a0;
        pa[0] *= alpha_g;
        pa[1] *= alpha_g;
      }
    }
  };
  // O^T += V^T P^T: P^T is the B operand (k = tokens 2t, 2t+1 / 8+2t, 9+2t, n = row g), the
  // transpose of the scores' C fragment, one movmatrix per 8 tokens
  const auto p_operand = [&](const float (&s)[4], int h, bool in_bf16) {
    return movmatrix_trans(pack_pair(s[2 * h], s[2 * h + 1], in_bf16));
  };

  // the warp's compressed steps, then (in the last split) the tail's: two loops, so neither carries
  // the other's branches and O stays in the registers its mma chains use
  for (int step = s_begin; step < c_end; ++step) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};  // S^T: s[2h + c] = score of token 8h + g, row 2t + c
    const long tok0 = long(step) * kStep;  // sequence position of the step's first token
    uint32_t a_ka[2] = {0u, 0u}, b_va[2] = {0u, 0u};  // low-rank operands (RANK > 0)
    const Slot& slot = ring[step % kStages];
    __syncwarp();  // every lane is done with step - 1's slot, which step + kStages - 1 takes
    if (step + kStages - 1 < c_end) stage_step(step + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this lane's copies for this step have landed ...
    __syncwarp();                  // ... and so have every lane's
    const uint32_t keep = keep_next;  // bit h: token 8h + g attends
    if (step + 1 < c_end) keep_next = Slot::keep_bits(p.mask, tok0 + kStep, g);
    vf.load(slot, g, t, group_log2);
    // low-rank rows: A rows of the scores' rank k-step {A_k[8h + g][2t], A_k[8h + g][2t+1]}, and
    // the B operand of P A_v: {A_v[2t][g], A_v[2t+1][g]} and tokens 2t+8, 2t+9 (rank index g < RANK)
    if constexpr (RANK > 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tok_k = 8 * h + g, tok_v = 8 * h + 2 * t;  // rows of the step
        if constexpr (I8) {  // Â as exact fp16 integers (its scales are on the rank-space side)
          if (2 * t < RANK)
            a_ka[h] = int8x2_half2(*reinterpret_cast<const uint16_t*>(slot.key_a + tok_k * RANK + 2 * t));
          if (g < RANK)
            b_va[h] = int8_pair_half2(uint8_t(slot.value_a[tok_v * RANK + g]),
                                      uint8_t(slot.value_a[(tok_v + 1) * RANK + g]));
        } else {
          if (2 * t < RANK) a_ka[h] = *reinterpret_cast<const uint32_t*>(slot.key_a + tok_k * RANK + 2 * t);
          if (g < RANK) b_va[h] = pack_bits(slot.value_a[tok_v * RANK + g], slot.value_a[(tok_v + 1) * RANK + g]);
        }
      }
    }
    if (step >= block_end) {  // the step enters a block
      const int blk = entered_block(step, cur_block);
      if (cur_block >= 0) W::flush_value_lowrank(p, cur_block, t, g, pa, o);
      a_qb = W::key_lowrank(sh, p, blk, t, g);
      cur_block = blk;
      block_end = (blk + 1) * steps_per_block;
    }
    const int grp = step >> group_shift;
    if (grp != cur_group) {
      W::key_group(sh, slot.key_scale, slot.key_zero, t, aq, bias, g);
      cur_group = grp;
    }
    // S^T = codes Q'^T: A rows g and g + 8 are key tokens tok0 + g, tok0 + 8 + g (the lane's D/4
    // channels of each), B = Q'^T; even and odd k-steps in two accumulators (two mma chains of
    // half the latency, summed below)
    uint32_t kw[2][L::kKeyWords];
#pragma unroll
    for (int h = 0; h < 2; ++h) load_words(slot.key + (8 * h + g) * L::kWords + t * L::kKeyWords, kw[h]);
    float s_odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks_ = 0; ks_ < L::kKSteps; ++ks_) {
      const int i0 = 2 * ks_, i1 = 2 * ks_ + 1;  // code pairs of k 2t, 2t+1 and 2t+8, 2t+9
      mma16_f16(ks_ % 2 ? s_odd : s,
                {L::pair(kw[0][i0 / L::kHalf], i0 % L::kHalf), L::pair(kw[1][i0 / L::kHalf], i0 % L::kHalf),
                 L::pair(kw[0][i1 / L::kHalf], i1 % L::kHalf), L::pair(kw[1][i1 / L::kHalf], i1 % L::kHalf)},
                aq[ks_][0], aq[ks_][1]);
    }
    if constexpr (RANK > 0) mma16_f16(s_odd, {a_ka[0], a_ka[1], 0u, 0u}, a_qb, 0u);  // + A_k (q B_kj)^T, k = rank
    // - zero bias + outliers: q[idx] * val of the lane's two tokens' outliers against both its rows,
    // one HFMA2 per outlier on the row pair {2t, 2t + 1}, summed per token in fp16 (|q| <= 1 after the
    // row prescale: no product exceeds its fp16 value), then back to qk_scale units
    uint32_t add[2] = {0u, 0u};  // fp16 {row 2t, row 2t + 1} of token 8h + g
#pragma unroll 3  // round(2 % of 128) = 3 outliers per vector (the default) in one pass of independent loads
    for (int j = 0; j < n_out; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int e = (8 * h + g) * n_out + j;
        const __half val = slot.key_out_val[e];
        add[h] = hfma2(sh.q_rows[t][slot.key_out_idx[e]], pack_bits(val, val), add[h]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 a = as_half2(add[i / 2]);
      const float outliers = i % 2 ? __high2float(a) : __low2float(a);
      s[i] = (s[i] + s_odd[i] - bias[i % 2] + outliers) * row_scale[i % 2];
    }
    softmax_step(s, keep);
    const uint32_t p_lo = p_operand(s, 0, false), p_hi = p_operand(s, 1, false);
    // value rows (2t, 2t+1) and (2t+8, 2t+9): the same half-word of both tokens of a pair in
    // one word, then each slot is one channel of the lane's run for both tokens
    uint32_t comb[2][L::kRunHalves], v_scale[2], v_nzs[2];
#pragma unroll
    for (int pr = 0; pr < 2; ++pr) {
#pragma unroll
      for (int hh = 0; hh < L::kRunHalves; ++hh) {
        const int pos = L::kRunHalves >= 2 ? hh % 2 : g % 2;
        const int wi = L::kRunHalves >= 2 ? hh / 2 : 0;
        comb[pr][hh] = __byte_perm(vf.vw[pr][0][wi], vf.vw[pr][1][wi], 0x5410 + pos * 0x2222);
      }
      v_scale[pr] = vf.v_scale[pr];
      v_nzs[pr] = hmul2(vf.v_zero[pr], v_scale[pr]) ^ 0x80008000u;  // -zero * scale
    }
    // run channel j of token pair pr, dequantized: {V[2t + 8pr][ch], V[2t + 8pr + 1][ch]}
    const auto dequant = [&](int pr, int j) {
      return hfma2(L::pair(comb[pr][j / L::kHalf], j % L::kHalf), v_scale[pr], v_nzs[pr]);
    };
#pragma unroll
    for (int m = 0; m < kTiles; ++m)  // A rows g, g + 8 = run channels 2m, 2m + 1
      mma16_f16(o[m], {dequant(0, 2 * m), dequant(0, 2 * m + 1), dequant(1, 2 * m), dequant(1, 2 * m + 1)}, p_lo,
                p_hi);
    if constexpr (RANK > 0) mma_f16(pa, p_lo, p_hi, b_va[0], b_va[1]);  // P A_v
    if (n_out > 0) {  // O^T += Vout^T P^T: the values' outliers as a sparse tile through the same mma
      // lane: token lane % 16, outliers j = lane / 16 + 2i (a token's channels are distinct); each
      // entry's tile offset (< 2^16) stays in a half register until the entry is cleared
      const int otok = lane % kStep;
      uint32_t entries[kOutliersPerLane / 2] = {};
#pragma unroll
      for (int i = 0; i < kOutliersPerLane; ++i) {
        const int j = lane / kStep + 2 * i;
        if (j < n_out) {
          const int c = slot.value_out_idx[otok * n_out + j];
          const uint32_t entry = otok * (D + 8) + (c % L::kNT) * 8 + c / L::kNT;
          (&vout[0][0])[entry] = slot.value_out_val[otok * n_out + j];
          entries[i / 2] |= entry << (16 * (i % 2));
        }
      }
      __syncwarp();
      // ldmatrix .trans: lane gives row lane % 8 of matrix mat = lane / 8: tokens 8 (mat / 2) + row,
      // tile m's columns of channels channel(., m, mat % 2), so r = the A operand of tile m
      const int mat = lane / 8;
#pragma unroll
      for (int m = 0; m < kTiles; ++m) {
        uint32_t r[4];
        ldmatrix_x4_trans(&vout[lane % 8 + 8 * (mat / 2)][16 * m + 8 * (mat % 2)], r);
        mma16_f16(o[m], r, p_lo, p_hi);
      }
      __syncwarp();
#pragma unroll
      for (int i = 0; i < kOutliersPerLane; ++i)
        if (lane / kStep + 2 * i < n_out)
          (&vout[0][0])[(entries[i / 2] >> (16 * (i % 2))) & 0xffffu] = __half();
    }
  }
  if (cur_block >= 0) W::flush_value_lowrank(p, cur_block, t, g, pa, o);
  for (int step = max(s_begin, csteps); step < s_end; ++step) {  // tail steps: O^T += V^T P^T on the raw tail
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    const long tok0 = long(step) * kStep;
    uint32_t keep = 0x3u;  // bit h: token 8h + g attends
    // S^T: the raw tail keys (natural channel order) against raw q, in q's dtype
    const int base = int(tok0 - Tc);
    const bool live = g < rows_here;
#pragma unroll
    for (int ks_ = 0; ks_ < L::kKSteps; ++ks_) {
      const int c0 = 16 * ks_ + 2 * t;
      uint32_t a_k[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // rows g, g + 8 (i % 2) at k 2t.. and 2t+8.. (i / 2)
        const int tok = base + 8 * (i % 2) + g;
        a_k[i] = tok < a.tail_len ? *reinterpret_cast<const uint32_t*>(tk + tok * D + c0 + 8 * (i / 2)) : 0u;
      }
      const uint32_t b0 = live ? *reinterpret_cast<const uint32_t*>(q + g * D + c0) : 0u;
      const uint32_t b1 = live ? *reinterpret_cast<const uint32_t*>(q + g * D + c0 + 8) : 0u;
      mma16_raw(bf16, s, a_k, b0, b1);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] *= a.qk_scale;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long pos = tok0 + 8 * h + g;
      if (pos >= seq_len || (p.mask && !p.mask[pos])) keep &= ~(1u << h);
    }
    softmax_step(s, keep);
    const uint32_t p_lo = p_operand(s, 0, bf16), p_hi = p_operand(s, 1, bf16);
#pragma unroll
    for (int m = 0; m < kTiles; ++m) {
      uint32_t a_v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // rows g, g + 8 (channels h = i % 2) at tokens 2t.. and 2t+8.. (i / 2)
        const int ch = W::channel(g, m, i % 2), ta = base + 8 * (i / 2) + 2 * t, tb = ta + 1;
        const uint32_t lo = ta < a.tail_len ? tv[ta * D + ch] : 0u;
        const uint32_t hi = tb < a.tail_len ? tv[tb * D + ch] : 0u;
        a_v[i] = lo | (hi << 16);
      }
      mma16_raw(bf16, o[m], a_v, p_lo, p_hi);
    }
  }

  // the warp's partial: l summed over the 8 lanes of a column, O into shared memory (over the
  // outlier tiles: all warps must be past their steps)
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int off = 4; off < kWarp; off <<= 1) l_run[c] += __shfl_xor_sync(kFull, l_run[c], off);
  __syncthreads();
#pragma unroll
  for (int m = 0; m < kTiles; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i) sh.oacc[warp][2 * t + i % 2][W::channel(g, m, i / 2)] = o[m][i];
  if (g == 0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      sh.wm[warp][2 * t + c] = m_run[c];
      sh.wl[warp][2 * t + c] = l_run[c];
    }
  }
  __syncthreads();

  // merge the CTA's warps; one split and no prefix: the final output, else this split's partial
  const bool final_out = gridDim.x == 1 && a.prefix_len == 0;
  const long part_row0 = (bh * gridDim.x + split) * M + row0;
  for (int i = threadIdx.x; i < rows_here * D; i += kThreads) {
    const int r = i / D, c = i % D;
    const Partial merged = merge_partials<kWarps>(&sh.wm[0][r], &sh.wl[0][r], &sh.oacc[0][r][c], kRows, kRows * D);
    if (final_out) {
      uint16_t* out = reinterpret_cast<uint16_t*>(a.out) + (bh * M + row0 + r) * D;
      out[c] = float_bits(merged.value(), bf16);
    } else {
      reinterpret_cast<float*>(a.part_acc)[(part_row0 + r) * D + c] = merged.acc;
      if (c == 0) {
        reinterpret_cast<float*>(a.part_m)[part_row0 + r] = merged.max;
        reinterpret_cast<float*>(a.part_l)[part_row0 + r] = merged.sum;
      }
    }
  }
}

// ----------------------------------------------------------------------------- combine kernel
constexpr int kMaxSplits = 1024;  // lowrank_ops/kvcache/cuda_decode.py MAX_SPLITS
constexpr int kCombineWarps = 8;
constexpr int kCombineBatch = 4;  // splits whose loads a combine warp issues together
constexpr int kMaxPrefix = 16;    // lowrank_ops/kvcache/config.py MAX_PREFIX_TOKENS

// Grid (M, batch * kv_heads), 8 warps: one q row's split partials (fp32, L2-resident, written by
// the split kernel just before) merged. Warp w merges splits w, w + 8, w + 16, ... by an online
// rescale, lane l holding channels [l D/32, (l+1) D/32) (one 16- or 8-byte load per split; the
// split's max and sum are the same address for every lane: one broadcast load each). A warp
// loads four of its splits at a time, then folds them in (ptxas issues two splits' loads before
// the first fold: about two L2 round trips per four splits a warp takes, two in all for up to 32
// splits, where a split at a time took one each); then the 8 warps' partials merge through shared
// memory. The cache's uncompressed prefix (prefix_len <= 16 tokens, (batch * kv_heads, prefix_len,
// D) in q's dtype; the split kernel does not read it) is attended here first: warp w takes prefix
// tokens w and w + 8, each lane its D/32 channels of q and of the token's key (a dot reduced over
// the warp by five shuffles), and folds the token in as a one-key partial (max = its score, sum 1,
// acc = its value row) unless the key mask drops it. 0 for a row with no keys.
template <int D>
__global__ void __launch_bounds__(kCombineWarps * kWarp)
    gear_combine_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l,
                        const float* __restrict__ part_acc, uint16_t* __restrict__ out, int M, int splits, bool bf16,
                        const uint16_t* __restrict__ q, const uint16_t* __restrict__ prefix_keys,
                        const uint16_t* __restrict__ prefix_values, const uint8_t* __restrict__ key_mask,
                        int prefix_len, long mask_row_len, int kv_heads, float qk_scale) {
  constexpr int kPerLane = D / kWarp;
  __shared__ float wm[kCombineWarps], wl[kCombineWarps];
  __shared__ __align__(16) float wacc[kCombineWarps][D];
  ptx::wait_for_prior_grids();  // the split kernel's partials (a programmatic launch may start early)
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int row = blockIdx.x;
  const long bh = blockIdx.y;
  const long base = bh * splits * M + row;  // partial of split s: base + s * M
  float mx = -INFINITY, sum = 0.f, acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  float q_lane[kPerLane];  // this lane's channels of the row's q, for the prefix's scores
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    q_lane[i] = prefix_len ? load_as_float(q, (bh * M + row) * D + lane * kPerLane + i, bf16) : 0.f;
  for (int j = warp; j < prefix_len; j += kCombineWarps) {
    const long key = (bh * prefix_len + j) * D + lane * kPerLane;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dot += q_lane[i] * load_as_float(prefix_keys, key + i, bf16);
#pragma unroll
    for (int off = 1; off < kWarp; off <<= 1) dot += __shfl_xor_sync(kFull, dot, off);
    if (key_mask && !key_mask[(bh / kv_heads) * mask_row_len + j]) continue;
    const float score = dot * qk_scale, m_new = fmaxf(mx, score);
    const float keep = fast_exp2(mx - m_new), wt = fast_exp2(score - m_new);
    sum = sum * keep + wt;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * keep + wt * load_as_float(prefix_values, key + i, bf16);
    mx = m_new;
  }
  for (int s0 = warp; s0 < splits; s0 += kCombineBatch * kCombineWarps) {
    // a batch's loads, unconditional (past the last split: the last split again, weighted 0), all issued first
    float ms[kCombineBatch], ls[kCombineBatch], x[kCombineBatch][kPerLane];
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      const long r = base + long(min(s0 + b * kCombineWarps, splits - 1)) * M;
      ms[b] = part_m[r];
      ls[b] = part_l[r];
      load_words(part_acc + r * D + lane * kPerLane, x[b]);
    }
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      if (s0 + b * kCombineWarps >= splits) ms[b] = -INFINITY;
      const float m_new = fmaxf(mx, ms[b]);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float keep = fast_exp2(mx - m_safe), wt = fast_exp2(ms[b] - m_safe);
      sum = sum * keep + wt * ls[b];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] = acc[i] * keep + wt * x[b][i];
      mx = m_new;
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) wacc[warp][lane * kPerLane + i] = acc[i];
  if (lane == 0) {
    wm[warp] = mx;
    wl[warp] = sum;
  }
  __syncthreads();
  const int c = threadIdx.x;
  if (c < D) {
    const Partial merged = merge_partials<kCombineWarps>(wm, wl, &wacc[0][c], 1, D);
    out[(bh * M + row) * D + c] = float_bits(merged.value(), bf16);
  }
}

// ----------------------------------------------------------------------------- host side
void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("gear_decode: ") + what + ": " + cudaGetErrorString(err));
}

template <int BITS, int D, int RANK, bool I8>
void launch(const GearDecodeArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  dim3 grid(a.splits, (a.M + kRows - 1) / kRows, a.batch_kv_heads);
  const auto split_kernel = gear_split_kernel<BITS, D, RANK, I8>;
  constexpr size_t smem = kSplitSmemBytes<BITS, D, RANK, I8>;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  static std::atomic<uint64_t> opted_in{0};  // bit d: device d allows this instantiation > 48 KB
  if (device >= 64 || !((opted_in.load() >> device) & 1u)) {
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(split_kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    // all of L1 that can be shared memory: three CTAs' rings on sm_90
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(split_kernel),
                                    cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared),
               "cudaFuncSetAttribute(PreferredSharedMemoryCarveout)");
    if (device < 64) opted_in.fetch_or(uint64_t(1) << device);
  }
  const bool overlap = a.dependent_launch != 0;
  check_cuda(LOWRANK_OPS_LAUNCH_DEPENDENT(overlap, split_kernel, grid, kThreads, smem, stream, a), "split kernel launch");
  if (a.splits > 1 || a.prefix_len > 0) {
    const auto combine_kernel = gear_combine_kernel<D>;
    check_cuda(LOWRANK_OPS_LAUNCH_DEPENDENT(overlap, combine_kernel, dim3(a.M, a.batch_kv_heads),
                                            kCombineWarps * kWarp, 0, stream, reinterpret_cast<const float*>(a.part_m),
                                            reinterpret_cast<const float*>(a.part_l),
                                            reinterpret_cast<const float*>(a.part_acc),
                                            reinterpret_cast<uint16_t*>(a.out), a.M, a.splits, a.dtype == kBFloat16,
                                            reinterpret_cast<const uint16_t*>(a.q),
                                            reinterpret_cast<const uint16_t*>(a.prefix_keys),
                                            reinterpret_cast<const uint16_t*>(a.prefix_values),
                                            reinterpret_cast<const uint8_t*>(a.key_mask), a.prefix_len,
                                            long(a.prefix_len) + long(a.nblocks) * a.buffer_tokens + a.tail_len,
                                            a.kv_heads, a.qk_scale),
               "combine kernel launch");
  }
}

template <int BITS, int D>
void dispatch_rank(const GearDecodeArgs& a) {
  const bool i8 = a.factor_bits == 8;
  switch (a.rank) {
    case 0: return launch<BITS, D, 0, false>(a);
    case 4: return i8 ? launch<BITS, D, 4, true>(a) : launch<BITS, D, 4, false>(a);
    case 8: return i8 ? launch<BITS, D, 8, true>(a) : launch<BITS, D, 8, false>(a);
    default: throw std::invalid_argument("gear_decode: rank must be 0, 4 or 8, got " + std::to_string(a.rank));
  }
}


}  // namespace

bool gear_decode_supported(int bits, int head_dim, int rank, int group_size, int buffer_tokens, int M) {
  const bool rank_ok = rank == 0 || rank == 4 || rank == 8;
  const bool group_ok = group_size >= 16 && group_size <= 128 && (group_size & (group_size - 1)) == 0;
  return (bits == 2 || bits == 4) && (head_dim == 64 || head_dim == 128) && rank_ok && group_ok &&
         group_size <= head_dim && buffer_tokens % group_size == 0 && M >= 1;
}

void gear_decode(const GearDecodeArgs& a) {
  if (!gear_decode_supported(a.bits, a.head_dim, a.rank, a.group_size, a.buffer_tokens, a.M))
    throw std::invalid_argument("gear_decode: unsupported configuration (see gear_decode_supported)");
  if (a.n_out < 0 || a.n_out > kMaxOutliers || a.splits < 1 || a.splits > kMaxSplits || a.steps_per_split < 1 ||
      a.batch_kv_heads < 1 || a.kv_heads < 1 || a.tail_len < 0 || a.tail_len >= a.buffer_tokens || a.nblocks < 0 ||
      a.prefix_len < 0 || a.prefix_len > kMaxPrefix)
    throw std::invalid_argument("gear_decode: bad sizes");
  const bool blocks = a.nblocks > 0;  // the compressed tensors are empty (null) without blocks
  if ((blocks && a.n_out > 0 && (!a.key_out_idx || !a.key_out_val || !a.value_out_idx || !a.value_out_val)) ||
      (blocks && a.rank > 0 && (!a.key_lr_a || !a.key_lr_b || !a.value_lr_a || !a.value_lr_b)) || !a.q || !a.out ||
      !a.tail_keys || !a.tail_values || (blocks && (!a.key_codes || !a.value_codes || !a.key_scale || !a.key_zero ||
                                                    !a.value_scale || !a.value_zero)) ||
      ((a.splits > 1 || a.prefix_len > 0) && (!a.part_m || !a.part_l || !a.part_acc)) ||
      (a.prefix_len > 0 && (!a.prefix_keys || !a.prefix_values)))
    throw std::invalid_argument("gear_decode: a required pointer is null");
  if (a.dtype != kFloat16 && a.dtype != kBFloat16)
    throw std::invalid_argument("gear_decode: dtype must be float16 or bfloat16");
  if (a.factor_bits != 8 && a.factor_bits != 16)
    throw std::invalid_argument("gear_decode: factor_bits must be 8 (int8 factors) or 16 (fp16)");
  if (blocks && a.rank > 0 && a.factor_bits == 8 && (!a.key_lr_scale || !a.value_lr_scale))
    throw std::invalid_argument("gear_decode: int8 factors need key_lr_scale and value_lr_scale (a null pointer)");
  if (a.bits == 2 && a.head_dim == 128) return dispatch_rank<2, 128>(a);
  if (a.bits == 2 && a.head_dim == 64) return dispatch_rank<2, 64>(a);
  if (a.bits == 4 && a.head_dim == 128) return dispatch_rank<4, 128>(a);
  return dispatch_rank<4, 64>(a);
}

}  // namespace lowrank_ops
