// N:M sparse decode: y = x W_nm^T + bias for small batches (M <= 8), read straight from the
// packed format of lowrank_ops/sparse/format.py (kept values + bit-packed in-group positions,
// any n:m with m in {4, 8, 16}). fp16 or bf16 x / values / bias / y; fp32 accumulation. The kept
// values are dense (in x's dtype) or 4-bit codes with fp16 group scales / zeros (template Q4).
//
// Design (one launch on the caller's stream; CUDA-graph capturable; deterministic, no atomics):
//
// * One warp per output row r, 8 warps (8 rows) per 256-thread block, grid ceil(N / 8): at
//   N = 4096 that is 512 blocks, ~4 per SM on a 132-SM H100, so batch 1 fills the GPU without
//   a split-K pass.
// * K is swept in column tiles of kCols = 8192 / MB (x converted to fp32: 32 KB for any MB, plus
//   padding; at batch 1 an 8192-wide x is one tile). Per tile the block stages x[:, tile] into
//   shared memory (128-bit loads when K % 8 == 0 and x is 16-byte aligned; rows >= M zero), so
//   the 8 warps of the block share one copy of x and the gathers below never touch global memory.
// * Bank conflicts: at one instant the 32 lanes gather columns about S = 8 m / n apart (their
//   chunks' spans: 16 for 2:4, 32 for 1:4, 2:8, 4:16). Unpadded fp32 rows would put those on
//   2 (S = 16) or 1 (S = 32) bank(s): 16- to 32-way conflicts. One pad word per 32 columns
//   (column c at c + c / 32) spreads them over distinct banks.
// * Tiles hold whole groups (kCols is a multiple of 16), so tile t owns the contiguous kept
//   range j in [t0 / m * n, t1 / m * n) of every row. Lanes take chunks of 8 consecutive kept
//   values, 32 chunks per warp step: one 128-bit load of values per chunk (when KK % 8 == 0
//   and values are 16-byte aligned, else 8 scalar loads), coalesced along the row. A chunk's
//   positions sit in one index word (m = 4: 16 per word, m = 16: 8 per word; chunks start at
//   multiples of 8) or two (m = 8: 10 per word, the word pair is loaded once per chunk);
//   neighbouring lanes share words, served by L1. Index rows are not 16-byte aligned in general
//   (W = ceil(KK / 10) for m = 8), hence 32-bit word loads.
// * 4-bit kept values (Q4): codes packed 8 per int32 word along KK, so a chunk (8 values from a
//   multiple of 8) is exactly one 32-bit code word, and with group_size in {32, 64, 128} (a
//   multiple of 8) one fp16 scale / zero pair: per chunk one coalesced word load (128 bytes per
//   warp step, a quarter of the bytes of fp16 values) plus two 2-byte loads that 4-16
//   neighbouring lanes share. Codes become floats with the magic-exponent trick (0x4B000000 | q is 2^23 + q
//   exactly), then w = (q - zero) * scale as in the format. The group is j8 >> log2(group_size).
// * Positions are unpacked with shifts and masks while group and slot are stepped
//   incrementally (no division by the runtime n per value); column = group * m + position.
//   Each decoded value is reused for the MB rows of x (fp32 FMAs into acc[MB]).
// * After the K sweep: warp-shuffle (xor) reduction in a fixed order, lane mi writes y[mi, r]
//   (+ bias).
//
// This file does not include torch: the host entry point takes raw device pointers and the
// stream as integers (see module.cpp).

#include "sparse_decode.h"
#include "lowrank_decode.h"  // DTypeCode
#include "ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lowrank_ops {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;  // output rows per block
constexpr int kThreads = kWarps * kWarp;
constexpr int kChunk = 8;                // kept values per lane per step (one 128-bit load of fp16/bf16)
constexpr int kStageFloats = 8192;       // fp32 elements of x staged per tile (32 KB + padding)
constexpr int kMaxM = 8;

template <typename T> struct SCvt;
template <> struct SCvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float2 pair(uint32_t raw) {
    return __half22float2(*reinterpret_cast<const __half2*>(&raw));
  }
};
template <> struct SCvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float2 pair(uint32_t raw) {
    // bf16 -> fp32 is a 16-bit left shift of the bits
    return make_float2(__uint_as_float(raw << 16), __uint_as_float(raw & 0xFFFF0000u));
  }
};

// Shared-memory slot of tile column c: one pad word after every 32 columns (see the design note).
__device__ __forceinline__ int padded(int c) { return c + (c >> 5); }

// values: (N, KK) of T, or with Q4 the (N, KK_pad / 8) code words with scales / zeros fp16
// (N, KK_pad / group_size) and qshift = log2(group_size) (scales, zeros, qshift unused without Q4).
template <typename T, int NM_M, int MB, bool Q4>
__global__ void __launch_bounds__(kThreads)
sparse_decode_kernel(const T* __restrict__ x, const void* __restrict__ values, const uint32_t* __restrict__ indices,
                     const __half* __restrict__ scales, const __half* __restrict__ zeros, int qshift,
                     const T* __restrict__ bias, T* __restrict__ y, int M, int K, int N, int nm_n, bool vec_values,
                     bool vec_x) {
  constexpr int kBits = NM_M == 4 ? 2 : NM_M == 8 ? 3 : 4;
  constexpr int kPerWord = 32 / kBits;
  constexpr int kCols = kStageFloats / MB;  // columns of x per tile (a multiple of 16: whole groups)
  constexpr int kRow = kCols + kCols / 32;  // padded row length in shared memory
  // A tile holds a multiple of 8 groups, so every tile's first kept index (and every chunk) is a
  // multiple of 8: for m = 4 / 16 a chunk's 8 positions then sit in one index word.
  static_assert(kCols % (kChunk * NM_M) == 0, "x tile must hold a multiple of 8 groups");
  __shared__ float xs[MB * kRow];

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int r = blockIdx.x * kWarps + warp;
  const bool row_ok = r < N;  // warp-uniform; rows past N still join the barriers
  const int kk = K / NM_M * nm_n;
  const int words = (kk + kPerWord - 1) / kPerWord;
  const size_t row = row_ok ? r : 0;
  const T* __restrict__ vrow = static_cast<const T*>(values) + row * kk;  // dense values
  const int qgroups = Q4 ? (kk + (1 << qshift) - 1) >> qshift : 0;       // KK_pad / group_size
  const uint32_t* __restrict__ qrow = static_cast<const uint32_t*>(values) + row * (qgroups << qshift) / 8;
  const __half* __restrict__ srow = scales + row * qgroups;
  const __half* __restrict__ zrow = zeros + row * qgroups;
  const uint32_t* __restrict__ irow = indices + row * words;

  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;

  for (int t0 = 0; t0 < K; t0 += kCols) {
    const int cols = min(kCols, K - t0);
    // 1) stage x[:, t0 : t0 + cols] (rows >= M zero) into shared memory
    __syncthreads();  // previous tile consumed
    if (vec_x) {  // K % 8 == 0 and x 16-byte aligned: 8 columns per 128-bit load
      const int chunks = cols / 8;
      for (int idx = threadIdx.x; idx < MB * chunks; idx += kThreads) {
        const int m = idx / chunks;
        const int c = (idx % chunks) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (m < M) v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + t0 + c));
        const float2 p0 = SCvt<T>::pair(v.x), p1 = SCvt<T>::pair(v.y);
        const float2 p2 = SCvt<T>::pair(v.z), p3 = SCvt<T>::pair(v.w);
        float* dst = xs + m * kRow + padded(c);  // c % 8 == 0: the 8 columns share one pad block
        dst[0] = p0.x; dst[1] = p0.y; dst[2] = p1.x; dst[3] = p1.y;
        dst[4] = p2.x; dst[5] = p2.y; dst[6] = p3.x; dst[7] = p3.y;
      }
    } else {
      for (int idx = threadIdx.x; idx < MB * cols; idx += kThreads) {
        const int m = idx / cols;
        const int c = idx % cols;
        xs[m * kRow + padded(c)] = m < M ? SCvt<T>::to_f(x[static_cast<size_t>(m) * K + t0 + c]) : 0.f;
      }
    }
    __syncthreads();
    if (!row_ok) continue;

    // 2) this tile's kept values, 8 per lane per step
    const int j_begin = t0 / NM_M * nm_n;
    const int j_end = (t0 + cols) / NM_M * nm_n;
    for (int j8 = j_begin + lane * kChunk; j8 < j_end; j8 += kWarp * kChunk) {
      float v[kChunk];
      if constexpr (Q4) {  // one code word and one scale / zero pair per chunk (see the design note)
        const uint32_t codes = __ldg(qrow + j8 / 8);
        const float s = __half2float(__ldg(srow + (j8 >> qshift)));
        const float z = __half2float(__ldg(zrow + (j8 >> qshift)));
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          const float q = __uint_as_float(0x4B000000u | ((codes >> (4 * e)) & 0xFu)) - 8388608.f;
          v[e] = (q - z) * s;  // codes past KK are 0 padding, skipped below
        }
      } else if (vec_values && j8 + kChunk <= j_end) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(vrow + j8));
        const float2 p0 = SCvt<T>::pair(raw.x), p1 = SCvt<T>::pair(raw.y);
        const float2 p2 = SCvt<T>::pair(raw.z), p3 = SCvt<T>::pair(raw.w);
        v[0] = p0.x; v[1] = p0.y; v[2] = p1.x; v[3] = p1.y;
        v[4] = p2.x; v[5] = p2.y; v[6] = p3.x; v[7] = p3.y;
      } else {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) v[e] = j8 + e < j_end ? SCvt<T>::to_f(vrow[j8 + e]) : 0.f;
      }
      // the chunk's positions: word w0 from bit off0 on, spilling into word w0 + 1 (m = 8 only)
      const int w0 = j8 / kPerWord;
      const int off0 = (j8 - w0 * kPerWord) * kBits;
      const uint32_t word0 = __ldg(irow + w0);
      const uint32_t word1 = (kPerWord % kChunk != 0 && off0 + kChunk * kBits > kPerWord * kBits && w0 + 1 < words)
                                 ? __ldg(irow + w0 + 1) : 0u;
      int group = j8 / nm_n;
      int slot = j8 - group * nm_n;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const int off = off0 + e * kBits;  // bit offset counted from word0's bit 0
        const uint32_t pos = off < kPerWord * kBits ? (word0 >> off) & (NM_M - 1)
                                                    : (word1 >> (off - kPerWord * kBits)) & (NM_M - 1);
        if (j8 + e < j_end) {
          const int col = group * NM_M + static_cast<int>(pos) - t0;
#pragma unroll
          for (int m = 0; m < MB; ++m) acc[m] = fmaf(v[e], xs[m * kRow + padded(col)], acc[m]);
        }
        if (++slot == nm_n) {
          slot = 0;
          ++group;
        }
      }
    }
  }
  if (!row_ok) return;  // no barriers past this point

  // 3) warp reduction (fixed order), lane m writes y[m, r]
  const float b = bias != nullptr ? SCvt<T>::to_f(bias[r]) : 0.f;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    float t = acc[m];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (lane == m && m < M) y[static_cast<size_t>(m) * N + r] = SCvt<T>::from_f(t + b);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sparse_decode: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

template <typename T, int NM_M, int MB>
void launch(const SparseDecodeArgs& a, cudaStream_t stream) {
  const bool q4 = a.group_size != 0;
  const int kk = a.K / a.nm_m * a.nm_n;
  const bool vec_values = !q4 && kk % 8 == 0 && a.values % 16 == 0;
  const bool vec_x = a.K % 8 == 0 && a.x % 16 == 0;
  const int qshift = a.group_size == 32 ? 5 : a.group_size == 64 ? 6 : a.group_size == 128 ? 7 : 0;
  const int grid = (a.N + kWarps - 1) / kWarps;
  auto kernel = q4 ? sparse_decode_kernel<T, NM_M, MB, true> : sparse_decode_kernel<T, NM_M, MB, false>;
  LOWRANK_OPS_LAUNCH(
      kernel, grid, kThreads, 0, stream, reinterpret_cast<const T*>(a.x), reinterpret_cast<const void*>(a.values),
      reinterpret_cast<const uint32_t*>(a.indices), reinterpret_cast<const __half*>(a.scales),
      reinterpret_cast<const __half*>(a.zeros), qshift, reinterpret_cast<const T*>(a.bias), reinterpret_cast<T*>(a.y),
      a.M, a.K, a.N, a.nm_n, vec_values, vec_x);
  check(cudaGetLastError(), "kernel launch");
}

template <typename T, int NM_M>
void dispatch_m(const SparseDecodeArgs& a, cudaStream_t stream) {
  if (a.M <= 1) return launch<T, NM_M, 1>(a, stream);
  if (a.M <= 2) return launch<T, NM_M, 2>(a, stream);
  if (a.M <= 4) return launch<T, NM_M, 4>(a, stream);
  return launch<T, NM_M, 8>(a, stream);
}

template <typename T>
void dispatch_group(const SparseDecodeArgs& a, cudaStream_t stream) {
  if (a.nm_m == 4) return dispatch_m<T, 4>(a, stream);
  if (a.nm_m == 8) return dispatch_m<T, 8>(a, stream);
  return dispatch_m<T, 16>(a, stream);
}

void fail(const std::string& msg) { throw std::invalid_argument("sparse_decode: " + msg); }

}  // namespace

void sparse_decode(const SparseDecodeArgs& a) {
  if (a.M < 1 || a.M > kMaxM) fail("M must be in [1, 8], got " + std::to_string(a.M));
  if (a.nm_m != 4 && a.nm_m != 8 && a.nm_m != 16) fail("nm_m must be 4, 8 or 16, got " + std::to_string(a.nm_m));
  if (a.nm_n < 1 || a.nm_n >= a.nm_m)
    fail("nm_n must be in [1, nm_m - 1], got " + std::to_string(a.nm_n) + ":" + std::to_string(a.nm_m));
  if (a.K < 1 || a.K % a.nm_m != 0) fail("K must be a positive multiple of nm_m, got " + std::to_string(a.K));
  if (a.N < 1) fail("N must be >= 1, got " + std::to_string(a.N));
  if (a.x == 0 || a.values == 0 || a.indices == 0 || a.y == 0) fail("null pointer for x, values, indices or y");
  if (a.indices % 4 != 0) fail("indices must be 4-byte aligned");
  if (a.group_size != 0) {
    if (a.group_size != 32 && a.group_size != 64 && a.group_size != 128)
      fail("group_size must be 0 (dense values), 32, 64 or 128 (4-bit values), got " + std::to_string(a.group_size));
    if (a.scales == 0 || a.zeros == 0) fail("null pointer for scales or zeros (4-bit values need both)");
    if (a.values % 4 != 0) fail("4-bit codes (values) must be 4-byte aligned");
    if (a.scales % 2 != 0 || a.zeros % 2 != 0) fail("scales and zeros must be 2-byte aligned");
  } else if (a.scales != 0 || a.zeros != 0) {
    fail("scales and zeros are for 4-bit values only; group_size is 0 (dense values)");
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat16: return dispatch_group<__half>(a, stream);
    case kBFloat16: return dispatch_group<__nv_bfloat16>(a, stream);
    default: fail("dtype code must be 0 (float16) or 1 (bfloat16), got " + std::to_string(a.dtype));
  }
}

}  // namespace lowrank_ops
