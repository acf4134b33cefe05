// Low-rank decode: y = (x V^T) U^T + bias for small batches (M <= 16).
//
//   x (M, K), V (R, K), U (N, R), bias (N) or null, y (M, N); all row-major contiguous,
//   fp16 or bf16; every product is accumulated in fp32.
//
// Two plain launches on the caller's stream (CUDA-graph capturable, deterministic: every
// sum is taken in a fixed order, no atomics):
//
//   phase 1  part[s, m, r] = sum_{k in chunk s} x[m, k] * V[r, k]        (fp32 workspace)
//   phase 2  y[m, n] = sum_r (sum_s part[s, m, r]) * U[n, r] + bias[n]
//
// Phase 1 splits K into `splits` chunks so that a small rank still gives enough blocks to
// fill the GPU; phase 2 folds the partial sums while it stages T = x V^T in shared memory.
// The split count is capped (splits * MB <= 8) because every phase-2 block re-reads the
// partials: see lowrank_decode_splits().
//
// This file does not include torch: the host entry points take raw device pointers and the
// stream as integers (see module.cpp), so the module builds with nvcc alone.

#include "lowrank_decode.h"
#include "ptx.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lowrank_ops {
namespace {

constexpr int kWarp = 32;
constexpr int kVec = 8;  // halves per 128-bit load

// Phase 1: 4 warps per block; a block sweeps its K chunk in tiles of 4 x 256 columns, one
// 256-column slab per warp, 8 consecutive columns per lane.
constexpr int kP1Warps = 4;
constexpr int kP1Threads = kP1Warps * kWarp;
constexpr int kSlab = kWarp * kVec;           // 256 columns: one warp, one 128-bit load per lane
constexpr int kP1Tile = kP1Warps * kSlab;     // 1024 columns of x staged per step

// Phase 2: 8 warps per block, at most 2 blocks per SM (one wave).
constexpr int kP2Threads = 256;
constexpr int kMaxM = 16;
constexpr int kMaxRank = 1024;

// Rows of V (phase 1) or U (phase 2) that one thread works on at once. Every x / T value
// read from shared memory is reused across these rows, which keeps the shared-memory traffic
// at most 4x (fp16 x) or 8x (fp32 T) the global traffic even at M = 16.
__host__ __device__ constexpr int rows_per_thread(int mb) { return mb <= 4 ? 2 : 4; }

template <typename T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void vec8(const uint4& raw, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 p = __half22float2(h[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void vec8(const uint4& raw, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 p = __bfloat1622float2(h[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};

// Sum over the `width` lanes of an aligned lane group (width a power of two <= 32). Every
// lane of the warp must call it (full mask).
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------------------- phase 1
// Grid (ceil(R / RB), splits). Block (b, s) owns rows [b*RB, b*RB + RB) of V and the K chunk
// [s*chunk, min(K, (s+1)*chunk)), chunk a multiple of kP1Tile.
// Per tile of kP1Tile columns:
//   - each lane first issues its RB loads of V (row r, 8 consecutive columns: 128-bit when
//     VEC, else 8 scalar loads strided by 32 so a warp still reads contiguous 64 bytes),
//   - the block stages x[:, tile] into shared memory as xs[MB][kP1Tile] (rows m >= M and
//     columns past the chunk are zero, so masked V lanes and padded rows add exact zeros),
//   - each lane multiplies its V values by x[m, same columns] for all MB rows.
// acc[MB][RB] lives in registers; at the end a warp-shuffle reduction, then a fixed-order sum
// over the 4 warps in shared memory, gives part[s, m, r].
template <typename T, int MB, bool VEC>
__global__ void __launch_bounds__(kP1Threads)
lowrank_decode_phase1(const T* __restrict__ x, const T* __restrict__ v, float* __restrict__ part,
                      int M, int K, int R, int chunk) {
  constexpr int RB = rows_per_thread(MB);
  __shared__ __align__(16) uint16_t xs_raw[MB * kP1Tile];  // <= 32 KB at MB = 16
  __shared__ float red[kP1Warps][MB * RB];
  T* xs = reinterpret_cast<T*>(xs_raw);

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int r0 = blockIdx.x * RB;
  const int s = blockIdx.y;
  const int k_begin = s * chunk;
  const int k_end = min(K, k_begin + chunk);

  float acc[MB][RB];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int i = 0; i < RB; ++i) acc[m][i] = 0.f;

  for (int kt = k_begin; kt < k_end; kt += kP1Tile) {
    const int col = warp * kSlab + (VEC ? lane * kVec : lane);  // first column within the tile
    // 1) V loads for this lane, issued before the barrier so they overlap the x staging.
    float vf[RB][kVec];
    if constexpr (VEC) {
      uint4 raw[RB];
      const int k = kt + col;  // k_end and k are multiples of 8 on this path
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const int r = r0 + i;
        raw[i] = (r < R && k < k_end)
                     ? __ldg(reinterpret_cast<const uint4*>(v + static_cast<size_t>(r) * K + k))
                     : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < RB; ++i) Cvt<T>::vec8(raw[i], vf[i]);
    } else {
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const int r = r0 + i;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int k = kt + col + j * kWarp;
          vf[i][j] = (r < R && k < k_end) ? Cvt<T>::to_f(v[static_cast<size_t>(r) * K + k]) : 0.f;
        }
      }
    }
    // 2) stage x[:, kt : kt + kP1Tile] (zero-padded) into xs.
    __syncthreads();  // previous tile fully consumed
    if constexpr (VEC) {
      constexpr int kChunks = kP1Tile / kVec;
      for (int idx = threadIdx.x; idx < MB * kChunks; idx += kP1Threads) {
        const int m = idx / kChunks;
        const int c = (idx % kChunks) * kVec;
        const int k = kt + c;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (m < M && k < k_end) val = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k));
        *reinterpret_cast<uint4*>(xs + m * kP1Tile + c) = val;
      }
    } else {
      for (int idx = threadIdx.x; idx < MB * kP1Tile; idx += kP1Threads) {
        const int m = idx / kP1Tile;
        const int c = idx % kP1Tile;
        const int k = kt + c;
        xs[idx] = (m < M && k < k_end) ? x[static_cast<size_t>(m) * K + k] : Cvt<T>::from_f(0.f);
      }
    }
    __syncthreads();
    // 3) FMA: each x value read from shared memory serves RB rows of V.
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float xf[kVec];
      if constexpr (VEC) {
        Cvt<T>::vec8(*reinterpret_cast<const uint4*>(xs + m * kP1Tile + col), xf);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) xf[j] = Cvt<T>::to_f(xs[m * kP1Tile + col + j * kWarp]);
      }
#pragma unroll
      for (int i = 0; i < RB; ++i)
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[m][i] = fmaf(xf[j], vf[i][j], acc[m][i]);
    }
  }

  // Reduce: lanes (shuffle), then warps (shared memory, fixed order).
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      const float t = group_sum(acc[m][i], kWarp);
      if (lane == 0) red[warp][m * RB + i] = t;
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < MB * RB; idx += kP1Threads) {
    const int m = idx / RB;
    const int r = r0 + idx % RB;
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kP1Warps; ++w) t += red[w][idx];
    if (m < M && r < R) part[(static_cast<size_t>(s) * M + m) * R + r] = t;
  }
}

// ------------------------------------------------------------------------------- phase 2
// Grid min(ceil(N / rows per block), SMs x min(2, resident blocks per SM)), grid-stride over rows of U.
// Staging: T[m, r] = sum_s part[s, m, r] (fixed order s = 0..splits-1) into dynamic shared
// memory, MB x Rp floats (Rp = R rounded up to 8; rows m >= M and columns >= R are zero).
// On the VEC path each group of 8 columns is stored as two float4 halves in separate
// planes, ts[m][h][g*4 + e] for r = g*8 + h*4 + e, so that lanes reading consecutive
// groups hit consecutive 16-byte words (no bank conflicts).
// Compute: the warp is cut into teams of `team` lanes (32 for R > 128, fewer for small R so
// lanes are not idle); a team owns RB consecutive rows n of U and sweeps r in steps of
// team * 8, one 128-bit load of U per row per step; then a shuffle reduction inside the team
// and lane 0 of the team writes y[m, n] (+ bias) in the input dtype. Loop bounds are
// warp-uniform so the full-mask shuffles are legal; rows past N are masked.
template <typename T, int MB, bool VEC>
__global__ void __launch_bounds__(kP2Threads, 1)
lowrank_decode_phase2(const float* __restrict__ part, const T* __restrict__ u, const T* __restrict__ bias,
                      T* __restrict__ y, int M, int N, int R, int splits, int team) {
  constexpr int RB = rows_per_thread(MB);
  LOWRANK_OPS_DYNAMIC_SMEM(ts_raw);
  float* ts = reinterpret_cast<float*>(ts_raw);
  const int Rp = (R + kVec - 1) / kVec * kVec;
  const int half_plane = Rp / 2;

  for (int idx = threadIdx.x; idx < MB * Rp; idx += blockDim.x) {
    const int m = idx / Rp;
    const int r = idx % Rp;
    float t = 0.f;
    if (m < M && r < R)
      for (int sp = 0; sp < splits; ++sp) t += part[(static_cast<size_t>(sp) * M + m) * R + r];
    int dst = idx;
    if constexpr (VEC) dst = m * Rp + ((r >> 2) & 1) * half_plane + (r >> 3) * 4 + (r & 3);
    ts[dst] = t;
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int teams_per_warp = kWarp / team;
  const int lt = lane % team;          // lane within its team
  const int team_in_warp = lane / team;
  const int warps_total = gridDim.x * (blockDim.x / kWarp);
  const int rows_per_warp = teams_per_warp * RB;

  for (int wr = (blockIdx.x * (blockDim.x / kWarp) + warp) * rows_per_warp; wr < N;
       wr += warps_total * rows_per_warp) {
    const int n0 = wr + team_in_warp * RB;
    float acc[MB][RB];
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int i = 0; i < RB; ++i) acc[m][i] = 0.f;

    if constexpr (VEC) {
      for (int g = lt; g * kVec < R; g += team) {  // R % 8 == 0 on this path
        float uf[RB][kVec];
        uint4 raw[RB];
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          const int n = n0 + i;
          raw[i] = n < N ? __ldg(reinterpret_cast<const uint4*>(u + static_cast<size_t>(n) * R + g * kVec))
                         : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < RB; ++i) Cvt<T>::vec8(raw[i], uf[i]);
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const float4 lo = *reinterpret_cast<const float4*>(ts + m * Rp + g * 4);
          const float4 hi = *reinterpret_cast<const float4*>(ts + m * Rp + half_plane + g * 4);
          const float tf[kVec] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int i = 0; i < RB; ++i)
#pragma unroll
            for (int j = 0; j < kVec; ++j) acc[m][i] = fmaf(tf[j], uf[i][j], acc[m][i]);
        }
      }
    } else {
      for (int r = lt; r < R; r += team) {
        float uf[RB];
#pragma unroll
        for (int i = 0; i < RB; ++i) {
          const int n = n0 + i;
          uf[i] = n < N ? Cvt<T>::to_f(u[static_cast<size_t>(n) * R + r]) : 0.f;
        }
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const float t = ts[m * Rp + r];
#pragma unroll
          for (int i = 0; i < RB; ++i) acc[m][i] = fmaf(t, uf[i], acc[m][i]);
        }
      }
    }

#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int i = 0; i < RB; ++i) acc[m][i] = group_sum(acc[m][i], team);

    if (lt == 0) {
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const int n = n0 + i;
        if (n < N) {
          const float b = bias != nullptr ? Cvt<T>::to_f(bias[n]) : 0.f;
#pragma unroll
          for (int m = 0; m < MB; ++m)
            if (m < M) y[static_cast<size_t>(m) * N + n] = Cvt<T>::from_f(acc[m][i] + b);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------- host side
int m_bucket(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("lowrank_decode: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

template <typename T, int MB, bool VEC1, bool VEC2>
void launch(const DecodeArgs& a, int splits, int chunk, cudaStream_t stream) {
  constexpr int RB = rows_per_thread(MB);
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* v = reinterpret_cast<const T*>(a.v);
  const T* u = reinterpret_cast<const T*>(a.u);
  const T* bias = reinterpret_cast<const T*>(a.bias);
  T* y = reinterpret_cast<T*>(a.y);
  float* part = reinterpret_cast<float*>(a.workspace);

  dim3 grid1((a.R + RB - 1) / RB, splits);
  const auto kernel1 = lowrank_decode_phase1<T, MB, VEC1>;
  LOWRANK_OPS_LAUNCH(kernel1, grid1, kP1Threads, 0, stream, x, v, part, a.M, a.K, a.R, chunk);
  check(cudaGetLastError(), "phase 1 launch");

  const int groups = (a.R + kVec - 1) / kVec;
  int team = 4;
  while (team < kWarp && team < groups) team *= 2;
  const int rows_per_block = (kP2Threads / team) * RB;
  const int blocks_needed = (a.N + rows_per_block - 1) / rows_per_block;
  const size_t smem = static_cast<size_t>(MB) * groups * kVec * sizeof(float);  // <= 64 KB
  auto kernel2 = lowrank_decode_phase2<T, MB, VEC2>;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel2), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  // At most 2 resident blocks per SM and a single wave: every block re-stages T, so extra
  // blocks cost L2 traffic (the MB = 16 kernels fit only one block per SM by registers).
  int resident = 1;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel2, kP2Threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  resident = std::max(1, std::min(resident, 2));
  const int grid2 = std::max(1, std::min(blocks_needed, resident * std::max(1, a.num_sms)));
  LOWRANK_OPS_LAUNCH(kernel2, grid2, kP2Threads, smem, stream, part, u, bias, y, a.M, a.N, a.R, splits, team);
  check(cudaGetLastError(), "phase 2 launch");
}

// 128-bit paths get one kernel per M bucket (1, 2, 4, 8, 16). The scalar fallbacks (K or R
// not a multiple of 8, or a pointer not 16-byte aligned) are rare, so they only come in
// buckets 4 and 16: fewer instantiations keep the build short.
template <typename T, int MB, bool VEC1, bool VEC2>
void launch_scalar_bucket(const DecodeArgs& a, int splits, int chunk, cudaStream_t stream) {
  if (a.M <= 4) launch<T, 4, VEC1, VEC2>(a, splits, chunk, stream);
  else launch<T, 16, VEC1, VEC2>(a, splits, chunk, stream);
}

template <typename T, int MB>
void dispatch_vec(const DecodeArgs& a, int splits, int chunk, cudaStream_t stream) {
  auto aligned = [](std::uintptr_t p) { return p % 16 == 0; };
  const bool vec1 = a.K % kVec == 0 && aligned(a.x) && aligned(a.v);
  const bool vec2 = a.R % kVec == 0 && aligned(a.u);
  if (vec1 && vec2) launch<T, MB, true, true>(a, splits, chunk, stream);
  else if (vec1) launch_scalar_bucket<T, MB, true, false>(a, splits, chunk, stream);
  else if (vec2) launch_scalar_bucket<T, MB, false, true>(a, splits, chunk, stream);
  else launch_scalar_bucket<T, MB, false, false>(a, splits, chunk, stream);
}

template <typename T>
void dispatch_m(const DecodeArgs& a, int splits, int chunk, cudaStream_t stream) {
  switch (m_bucket(a.M)) {
    case 1: return dispatch_vec<T, 1>(a, splits, chunk, stream);
    case 2: return dispatch_vec<T, 2>(a, splits, chunk, stream);
    case 4: return dispatch_vec<T, 4>(a, splits, chunk, stream);
    case 8: return dispatch_vec<T, 8>(a, splits, chunk, stream);
    default: return dispatch_vec<T, 16>(a, splits, chunk, stream);
  }
}

void check_sizes(int M, int K, int R) {
  if (M < 1 || M > kMaxM) throw std::invalid_argument("lowrank_decode: M must be in [1, 16], got " + std::to_string(M));
  if (K < 1) throw std::invalid_argument("lowrank_decode: K must be >= 1, got " + std::to_string(K));
  if (R < 1 || R > kMaxRank)
    throw std::invalid_argument("lowrank_decode: R must be in [1, 1024], got " + std::to_string(R));
}

}  // namespace

int lowrank_decode_splits(int M, int K, int R, int num_sms) {
  check_sizes(M, K, R);
  const int mb = m_bucket(M);
  const int row_blocks = (R + rows_per_thread(mb) - 1) / rows_per_thread(mb);
  const int tiles = (K + kP1Tile - 1) / kP1Tile;
  const int want = (2 * std::max(1, num_sms) + row_blocks - 1) / row_blocks;  // ~2 blocks per SM
  const int cap = std::max(1, 8 / mb);  // phase 2 re-reads splits*M*R partials per block
  int splits = std::max(1, std::min(want, std::min(tiles, cap)));
  const int tiles_per_split = (tiles + splits - 1) / splits;
  return (tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split
}

void lowrank_decode(const DecodeArgs& a) {
  check_sizes(a.M, a.K, a.R);
  if (a.N < 1) throw std::invalid_argument("lowrank_decode: N must be >= 1, got " + std::to_string(a.N));
  if (a.x == 0 || a.v == 0 || a.u == 0 || a.y == 0 || a.workspace == 0)
    throw std::invalid_argument("lowrank_decode: null pointer for x, v, u, y or workspace");
  const int expect = lowrank_decode_splits(a.M, a.K, a.R, a.num_sms);
  if (a.splits != expect)
    throw std::invalid_argument("lowrank_decode: splits=" + std::to_string(a.splits) + " but lowrank_decode_splits() gives " +
                                std::to_string(expect) + " for these sizes (the workspace is sized from it)");
  const int tiles = (a.K + kP1Tile - 1) / kP1Tile;
  const int chunk = (tiles + a.splits - 1) / a.splits * kP1Tile;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat16: return dispatch_m<__half>(a, a.splits, chunk, stream);
    case kBFloat16: return dispatch_m<__nv_bfloat16>(a, a.splits, chunk, stream);
    default: throw std::invalid_argument("lowrank_decode: dtype code must be 0 (float16) or 1 (bfloat16), got " +
                                         std::to_string(a.dtype));
  }
}

}  // namespace lowrank_ops
