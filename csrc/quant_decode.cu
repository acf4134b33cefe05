// Quantized decode: y = x (W_hat + S)^T + bias for small batches (M <= 8), read straight from
// the packed format of lowrank_ops/quant/format.py (2-, 3- or 4-bit codes, uniform scale/zero --
// fp16, or the SpQR-style second-level form -- or per-row LUT, optional CSR outliers S). fp16 or bf16 x / bias / y; fp32 accumulation. The
// low-rank path (x V^T) U^T is not fused: the Python wrapper adds it with the low-rank op.
//
// Design (one launch on the caller's stream; CUDA-graph capturable; deterministic, no atomics):
//
// * One warp per output row n, 8 warps (8 rows) per 256-thread block, grid ceil(N / 8): at
//   N = 4096 that is 512 blocks, ~4 per SM on a 132-SM H100, so batch 1 keeps every SM busy
//   without a split-K second pass.
// * K is swept in tiles of kTile columns (2048 for MB <= 4, 1024 for MB = 8). Per tile the
//   block stages x[:, tile] (zero past K, rows >= M zero) into shared memory converted to fp32
//   once (MB x kTile x 4 B <= 32 KB), so the 8 warps of the block share one copy of x and no
//   lane converts x again per weight (that was one HADD2.F32 per code and row). The layout is
//   permuted so that the lanes of a warp, each reading the same 4 columns of its own unit,
//   hit consecutive 16-byte words (no bank conflicts): column c of the tile -> unit u = c / 32,
//   chunk q = (c % 32) / 8, half h = (c % 8) / 4, element e = c % 4 is stored at
//   q * (kTile / 4) + h * (kTile / 8) + u * 4 + e.
// * A "unit" is 32 consecutive codes (never straddles a group since group_size >= 32, so one
//   scale/zero per unit). Lane l owns units l and l + 32 of each tile (l only at MB = 8); per unit it reads whole
//   int32 words, coalesced along K: 4-bit = one 16-byte load (4 words x 8 codes), 2-bit = one
//   8-byte load (2 words x 16 codes), 3-bit = one
//   8-byte load of the 2-bit plane (2 words x 16 codes) + one 4-byte word of the 1-bit plane.
//   The weight loads of a tile are issued before the barrier that stages x, so they overlap.
// * Decoding is shifts and masks. Uniform codes become floats with the magic-exponent trick:
//   __int_as_float(0x4B000000 | q) is the fp32 number 2^23 + q exactly (q < 2^23 sits in the
//   mantissa of 2^23), so one FADD of -2^23 replaces an I2F conversion (I2F runs at quarter
//   rate on sm_80/sm_90), and the mask and the OR are one LOP3 (written as PTX: ptxas left them
//   as two); then w = fma(q, s, -z*s). With second-level statistics
//   the lane decodes its unit's (s, z) from one stat byte (scale code | zero << 4) and the
//   block's fp16 (log2_lo, log2_step) pair: s = exp2(lo + code * step), once per 32 codes. (The fp16 analogue is
//   0x6400 | q = 1024 + q as a half; fp32 keeps the whole chain in fp32 so no fp16 rounding
//   of (q - z) * s happens before accumulation.) LUT codes index a per-warp copy of the
//   row's 2^bits-entry LUT (fp32) in shared memory: 16 floats in 16 distinct banks, so any
//   pattern of codes is conflict-free (equal codes broadcast).
// * Each decoded weight is reused for the MB rows of x (fp32 FMAs into acc[MB]).
// * The row's CSR outliers are walked by the same warp (lane-strided over rowptr[n] ..
//   rowptr[n+1], x read from global/L2 at the outlier columns) into the same accumulators after
//   the K sweep. Their row pointers and each lane's first two (column, value) pairs are loaded
//   before the sweep, so the three dependent loads do not trail it (64 outliers a row: 1 % of
//   K = 6400). Then a warp-shuffle (xor) reduction, and lane m writes y[m, n] (+ bias).
//
// This file does not include torch: the host entry point takes raw device pointers and the
// stream as integers (see module.cpp).

#include "quant_decode.h"
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
constexpr int kWarps = 8;                    // rows per block
constexpr int kThreads = kWarps * kWarp;
constexpr int kUnit = 32;                    // codes per lane per step
constexpr int kMaxM = 8;
// Units per lane per tile, and the tile (columns of x staged as fp32: MB x kTile x 4 B <= 32 KB)
template <int MB> __host__ __device__ constexpr int units_per_lane() { return MB >= 8 ? 1 : 2; }
template <int MB> __host__ __device__ constexpr int tile_cols() { return kWarp * kUnit * units_per_lane<MB>(); }
constexpr int kStatRows = 16;                // rows sharing one second-level (log2_lo, log2_step) pair
constexpr int kPrefetchOutliers = 2;         // CSR entries per lane loaded before the K sweep

template <typename T> struct QCvt;
template <> struct QCvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float2 pair(uint32_t raw) {
    return __half22float2(*reinterpret_cast<const __half2*>(&raw));
  }
};
template <> struct QCvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float2 pair(uint32_t raw) {
    // bf16 -> fp32 is a 16-bit left shift of the bits
    return make_float2(__uint_as_float(raw << 16), __uint_as_float(raw & 0xFFFF0000u));
  }
};

// Exact fp32 value of the code (word >> shift) & mask (see the design note: 2^23 + q, minus 2^23):
// one LOP3 computes (w & mask) | 0x4B000000 (truth table 0xEA = (a & b) | c), one FADD removes 2^23.
__device__ __forceinline__ float magic_code(uint32_t shifted, uint32_t mask) {
  return __uint_as_float(ptx::lop3_and_or(shifted, mask, 0x4B000000u)) - 8388608.f;
}

// Per unit: the 32 codes as 4 chunks of 8, chunk-wise decode into 8 floats (code(): the integer,
// for LUT indexing; uniform(): the dequantized weights).
template <int BITS> struct Unit;
template <> struct Unit<4> {
  uint4 w;  // 4 words x 8 codes
  __device__ __forceinline__ void load(const int* __restrict__ qw, const int* __restrict__, int n, int words_lo,
                                       int, int u) {
    w = __ldg(reinterpret_cast<const uint4*>(qw + static_cast<size_t>(n) * words_lo + u * 4));
  }
  __device__ __forceinline__ void zero() { w = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ uint32_t word(int chunk) const {
    return chunk == 0 ? w.x : chunk == 1 ? w.y : chunk == 2 ? w.z : w.w;
  }
  __device__ __forceinline__ uint32_t code(int chunk, int e) const { return (word(chunk) >> (4 * e)) & 0xFu; }
  // The chunk's 8 uniform weights q * s + nzs. Codes 0..4 sit at bits 4e <= 16, inside the 23-bit
  // mantissa where they are: (word & 0xF << 4e) | 0x4B000000 is 2^23 + q * 16^e, so they need no
  // shift, and s16[e] = s / 16^e (a power-of-two scaling, exact) undoes the 16^e in the same FMA:
  // bit for bit the value of fma(q, s, nzs). Codes 5..7 take one shift by 20 between them.
  __device__ __forceinline__ void uniform(int chunk, const float (&s16)[5], float nzs, float (&out)[8]) const {
    const uint32_t low = word(chunk), high = low >> 20;
#pragma unroll
    for (int e = 0; e < 5; ++e) out[e] = fmaf(magic_code(low, 0xFu << (4 * e)), s16[e], nzs);
#pragma unroll
    for (int e = 5; e < 8; ++e) out[e] = fmaf(magic_code(high, 0xFu << (4 * (e - 5))), s16[e - 5], nzs);
  }
};
template <> struct Unit<2> {
  unsigned long long w;  // 2 words x 16 two-bit codes, as one 64-bit value (code j at bit 2j)
  __device__ __forceinline__ void load(const int* __restrict__ qw, const int* __restrict__, int n, int words_lo,
                                       int, int u) {
    w = __ldg(reinterpret_cast<const unsigned long long*>(qw + static_cast<size_t>(n) * words_lo + u * 2));
  }
  __device__ __forceinline__ void zero() { w = 0ull; }
  __device__ __forceinline__ uint32_t code(int chunk, int e) const {
    return static_cast<uint32_t>(w >> (2 * (chunk * 8 + e))) & 3u;
  }
  __device__ __forceinline__ void uniform(int chunk, const float (&s16)[5], float nzs, float (&out)[8]) const {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = fmaf(magic_code(static_cast<uint32_t>(w >> (2 * (chunk * 8 + e))), 3u), s16[0], nzs);
  }
};
template <> struct Unit<3> {
  uint2 lo;     // 2 words x 16 two-bit codes (low plane)
  uint32_t hi;  // 32 one-bit codes (high plane)
  __device__ __forceinline__ void load(const int* __restrict__ qw, const int* __restrict__ qh, int n, int words_lo,
                                       int words_hi, int u) {
    lo = __ldg(reinterpret_cast<const uint2*>(qw + static_cast<size_t>(n) * words_lo + u * 2));
    hi = static_cast<uint32_t>(__ldg(qh + static_cast<size_t>(n) * words_hi + u));
  }
  __device__ __forceinline__ void zero() { lo = make_uint2(0u, 0u); hi = 0u; }
  __device__ __forceinline__ uint32_t code(int chunk, int e) const {
    const int j = chunk * 8 + e;  // 0..31 within the unit
    const uint32_t word = chunk < 2 ? lo.x : lo.y;
    return ((word >> (2 * (j & 15))) & 3u) | (((hi >> j) & 1u) << 2);
  }
  __device__ __forceinline__ void uniform(int chunk, const float (&s16)[5], float nzs, float (&out)[8]) const {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = fmaf(magic_code(code(chunk, e), 7u), s16[0], nzs);
  }
};

template <typename T, int BITS, int MB>
__global__ void __launch_bounds__(kThreads)
quant_decode_kernel(const T* __restrict__ x, const int* __restrict__ qweight, const int* __restrict__ qweight_hi,
                    const __half* __restrict__ scales, const __half* __restrict__ zeros,
                    const uint8_t* __restrict__ stat_codes, const __half* __restrict__ stat_meta,
                    const __half* __restrict__ lut, const int* __restrict__ rowptr,
                    const uint16_t* __restrict__ cols, const __half* __restrict__ vals,
                    const T* __restrict__ bias, T* __restrict__ y, int M, int K, int N, int group_size,
                    bool x_vec) {
  constexpr int kUnitsPerLane = units_per_lane<MB>();
  constexpr int kTile = tile_cols<MB>();
  __shared__ __align__(16) float xs[MB * kTile];
  __shared__ float lut_s[kWarps][1 << BITS];

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarps + warp;
  const bool row_ok = n < N;  // warp-uniform; rows past N still join the barriers
  const int k_pad = (K + group_size - 1) / group_size * group_size;
  const int units = k_pad / kUnit;
  const int words_lo = BITS == 4 ? k_pad / 8 : k_pad / 16;
  const int words_hi = k_pad / 32;
  const int groups = k_pad / group_size;
  const int unit_shift = __ffs(group_size / kUnit) - 1;  // unit -> group: u >> unit_shift
  const bool use_lut = lut != nullptr;
  const bool stats_q = stat_codes != nullptr;  // second-level statistics (scales/zeros unused)
  const size_t meta_plane = static_cast<size_t>((N + kStatRows - 1) / kStatRows) * groups;

  if (use_lut && row_ok && lane < (1 << BITS))
    lut_s[warp][lane] = __half2float(lut[static_cast<size_t>(n) * (1 << BITS) + lane]);
  __syncwarp();

  // The row's first kPrefetchOutliers x 32 CSR outliers (lane-strided), loaded now so their
  // dependent loads (row pointers, then columns and values) complete during the K sweep
  // instead of after it; at 1 % outliers and K <= 6400 that is all of them.
  int e_first = 0, e_end = 0;
  int out_col[kPrefetchOutliers];
  float out_val[kPrefetchOutliers];
#pragma unroll
  for (int i = 0; i < kPrefetchOutliers; ++i) {
    out_col[i] = 0;
    out_val[i] = 0.f;
  }
  if (rowptr != nullptr && row_ok) {
    e_first = rowptr[n] + lane;
    e_end = rowptr[n + 1];
#pragma unroll
    for (int i = 0; i < kPrefetchOutliers; ++i) {
      const int e = e_first + i * kWarp;
      if (e < e_end) {
        out_col[i] = cols[e];  // unsigned 16-bit column
        out_val[i] = __half2float(vals[e]);
      }
    }
  }

  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;

  for (int kt = 0; kt < k_pad; kt += kTile) {
    // 1) this lane's weight words for the tile (before the barrier, so they overlap staging)
    Unit<BITS> wq[kUnitsPerLane];
    float s[kUnitsPerLane], nzs[kUnitsPerLane];
#pragma unroll
    for (int i = 0; i < kUnitsPerLane; ++i) {
      const int u = kt / kUnit + lane + i * kWarp;
      s[i] = 0.f;
      nzs[i] = 0.f;
      if (row_ok && u < units) {
        wq[i].load(qweight, qweight_hi, n, words_lo, words_hi, u);
        if (stats_q) {
          const int g = u >> unit_shift;
          const uint32_t code = stat_codes[static_cast<size_t>(n) * groups + g];
          const size_t mi = static_cast<size_t>(n / kStatRows) * groups + g;
          s[i] = exp2f(fmaf(static_cast<float>(code & 15u), __half2float(stat_meta[meta_plane + mi]),
                            __half2float(stat_meta[mi])));
          nzs[i] = -static_cast<float>(code >> 4) * s[i];
        } else if (!use_lut) {
          const size_t gi = static_cast<size_t>(n) * groups + (u >> unit_shift);
          s[i] = __half2float(scales[gi]);
          nzs[i] = -__half2float(zeros[gi]) * s[i];
        }
      } else {
        wq[i].zero();
      }
    }
    // 2) stage x[:, kt : kt + kTile] (zero-padded, permuted layout) into shared memory
    __syncthreads();  // previous tile consumed
    if (x_vec) {  // K % 8 == 0 and x 16-byte aligned: 8 columns per 128-bit load
      constexpr int kChunks = kTile / 8;
      for (int idx = threadIdx.x; idx < MB * kChunks; idx += kThreads) {
        const int m = idx / kChunks;
        const int c = (idx % kChunks) * 8;
        const int k = kt + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (m < M && k < K) v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k));
        const float2 p0 = QCvt<T>::pair(v.x), p1 = QCvt<T>::pair(v.y);
        const float2 p2 = QCvt<T>::pair(v.z), p3 = QCvt<T>::pair(v.w);
        float* dst = xs + m * kTile + ((c % kUnit) / 8) * (kTile / 4) + (c / kUnit) * 4;
        *reinterpret_cast<float4*>(dst) = make_float4(p0.x, p0.y, p1.x, p1.y);
        *reinterpret_cast<float4*>(dst + kTile / 8) = make_float4(p2.x, p2.y, p3.x, p3.y);
      }
    } else {
      for (int idx = threadIdx.x; idx < MB * kTile; idx += kThreads) {
        const int m = idx / kTile;
        const int c = idx % kTile;
        const int k = kt + c;
        const float v = m < M && k < K ? QCvt<T>::to_f(x[static_cast<size_t>(m) * K + k]) : 0.f;
        xs[m * kTile + ((c % kUnit) / 8) * (kTile / 4) + ((c % 8) / 4) * (kTile / 8) + (c / kUnit) * 4 + (c % 4)] = v;
      }
    }
    __syncthreads();
    if (!row_ok) continue;
    // 3) decode 8 codes at a time, FMA against MB rows of x
#pragma unroll
    for (int i = 0; i < kUnitsPerLane; ++i) {
      const int ut = lane + i * kWarp;  // unit within the tile
      if (kt / kUnit + ut >= units) break;
      float s16[5];  // s / 16^k (Unit<4>::uniform); 2- and 3-bit units read s16[0] only
      s16[0] = s[i];
#pragma unroll
      for (int k = 1; k < 5; ++k) s16[k] = s16[k - 1] * 0.0625f;
#pragma unroll
      for (int chunk = 0; chunk < 4; ++chunk) {
        float w[8];
        if (use_lut) {
#pragma unroll
          for (int e = 0; e < 8; ++e) w[e] = lut_s[warp][wq[i].code(chunk, e)];
        } else {
          wq[i].uniform(chunk, s16, nzs[i], w);
        }
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const float* xr = xs + m * kTile + chunk * (kTile / 4) + ut * 4;
          const float4 x_lo = *reinterpret_cast<const float4*>(xr);
          const float4 x_hi = *reinterpret_cast<const float4*>(xr + kTile / 8);
          float a = acc[m];
          a = fmaf(x_lo.x, w[0], a); a = fmaf(x_lo.y, w[1], a);
          a = fmaf(x_lo.z, w[2], a); a = fmaf(x_lo.w, w[3], a);
          a = fmaf(x_hi.x, w[4], a); a = fmaf(x_hi.y, w[5], a);
          a = fmaf(x_hi.z, w[6], a); a = fmaf(x_hi.w, w[7], a);
          acc[m] = a;
        }
      }
    }
  }
  if (!row_ok) return;  // no barriers past this point

  // 4) the row's CSR outliers, lane-strided, into the same accumulators (prefetched ones first,
  //    then any beyond them, in the same entry order)
  auto add_outlier = [&](int col, float v) {
#pragma unroll
    for (int m = 0; m < MB; ++m)
      if (m < M) acc[m] = fmaf(v, QCvt<T>::to_f(x[static_cast<size_t>(m) * K + col]), acc[m]);
  };
#pragma unroll
  for (int i = 0; i < kPrefetchOutliers; ++i)
    if (e_first + i * kWarp < e_end) add_outlier(out_col[i], out_val[i]);
  for (int e = e_first + kPrefetchOutliers * kWarp; e < e_end; e += kWarp) add_outlier(cols[e], __half2float(vals[e]));

  // 5) warp reduction (fixed order), lane m writes y[m, n]
  const float b = bias != nullptr ? QCvt<T>::to_f(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    float t = acc[m];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
    if (lane == m && m < M) y[static_cast<size_t>(m) * N + n] = QCvt<T>::from_f(t + b);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("quant_decode: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

template <typename T, int BITS, int MB>
void launch(const QuantDecodeArgs& a, cudaStream_t stream) {
  const bool x_vec = a.K % 8 == 0 && a.x % 16 == 0;
  const int grid = (a.N + kWarps - 1) / kWarps;
  // the two statistics slots hold fp16 scales/zeros, or stat codes (uint8) / stat meta (fp16)
  const std::uintptr_t scales = a.quantized_stats ? 0 : a.scales, zeros = a.quantized_stats ? 0 : a.zeros;
  const std::uintptr_t stat_codes = a.quantized_stats ? a.scales : 0, stat_meta = a.quantized_stats ? a.zeros : 0;
  const auto kernel = quant_decode_kernel<T, BITS, MB>;
  LOWRANK_OPS_LAUNCH(
      kernel, grid, kThreads, 0, stream, reinterpret_cast<const T*>(a.x), reinterpret_cast<const int*>(a.qweight),
      reinterpret_cast<const int*>(a.qweight_hi), reinterpret_cast<const __half*>(scales),
      reinterpret_cast<const __half*>(zeros), reinterpret_cast<const uint8_t*>(stat_codes),
      reinterpret_cast<const __half*>(stat_meta), reinterpret_cast<const __half*>(a.lut),
      reinterpret_cast<const int*>(a.rowptr), reinterpret_cast<const uint16_t*>(a.cols),
      reinterpret_cast<const __half*>(a.vals), reinterpret_cast<const T*>(a.bias), reinterpret_cast<T*>(a.y), a.M,
      a.K, a.N, a.group_size, x_vec);
  check(cudaGetLastError(), "kernel launch");
}

template <typename T, int BITS>
void dispatch_m(const QuantDecodeArgs& a, cudaStream_t stream) {
  if (a.M <= 1) return launch<T, BITS, 1>(a, stream);
  if (a.M <= 2) return launch<T, BITS, 2>(a, stream);
  if (a.M <= 4) return launch<T, BITS, 4>(a, stream);
  return launch<T, BITS, 8>(a, stream);
}

template <typename T>
void dispatch_bits(const QuantDecodeArgs& a, cudaStream_t stream) {
  if (a.bits == 4) return dispatch_m<T, 4>(a, stream);
  if (a.bits == 2) return dispatch_m<T, 2>(a, stream);
  return dispatch_m<T, 3>(a, stream);
}

void fail(const std::string& msg) { throw std::invalid_argument("quant_decode: " + msg); }

}  // namespace

void quant_decode(const QuantDecodeArgs& a) {
  if (a.M < 1 || a.M > kMaxM) fail("M must be in [1, 8], got " + std::to_string(a.M));
  if (a.K < 1) fail("K must be >= 1, got " + std::to_string(a.K));
  if (a.N < 1) fail("N must be >= 1, got " + std::to_string(a.N));
  if (a.bits < 2 || a.bits > 4) fail("bits must be 2, 3 or 4, got " + std::to_string(a.bits));
  if (a.group_size != 32 && a.group_size != 64 && a.group_size != 128)
    fail("group_size must be 32, 64 or 128, got " + std::to_string(a.group_size));
  if (a.x == 0 || a.qweight == 0 || a.y == 0) fail("null pointer for x, qweight or y");
  if (a.bits == 3 && a.qweight_hi == 0) fail("null pointer for qweight_hi (required for bits=3)");
  const bool has_lut = a.lut != 0;
  if (has_lut && (a.scales != 0 || a.zeros != 0)) fail("pass either lut or scales and zeros, not both");
  if (!has_lut && (a.scales == 0 || a.zeros == 0)) fail("null pointer for scales or zeros (uniform mode)");
  if (a.quantized_stats != 0 && a.quantized_stats != 1) fail("quantized_stats must be 0 or 1");
  if (has_lut && a.quantized_stats) fail("quantized_stats=1 needs uniform mode (no lut)");
  const int outl = (a.rowptr != 0) + (a.cols != 0) + (a.vals != 0);
  if (outl != 0 && outl != 3) fail("rowptr, cols and vals go together (all or none)");
  if (outl == 3 && a.K > 65535) fail("outlier columns are 16-bit, K must be <= 65535, got " + std::to_string(a.K));
  if (a.qweight % 16 != 0 || a.qweight_hi % 4 != 0)
    fail("qweight must be 16-byte aligned and qweight_hi 4-byte aligned");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat16: return dispatch_bits<__half>(a, stream);
    case kBFloat16: return dispatch_bits<__nv_bfloat16>(a, stream);
    default: fail("dtype code must be 0 (float16) or 1 (bfloat16), got " + std::to_string(a.dtype));
  }
}

}  // namespace lowrank_ops
