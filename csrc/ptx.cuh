// The inline-PTX wrappers of the kernels, each with its CPU emulation beside it
// (-DLOWRANK_OPS_EMULATE, csrc/emulate/cuda_emulation.h): the emulation lane runs a kernel's own
// source on the host, so everything below must mean the same in both branches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

// kernel<<<grid, block, smem_bytes, stream>>>(args...): `kernel` names one function (no template
// commas); LOWRANK_OPS_DYNAMIC_SMEM(name) declares the launch's dynamic shared memory as
// `unsigned char name[]`, 16-byte aligned
#ifdef LOWRANK_OPS_EMULATE
#define LOWRANK_OPS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  LOWRANK_OPS_EMULATED_LAUNCH(kernel, grid, block, smem_bytes, __VA_ARGS__)
#define LOWRANK_OPS_DYNAMIC_SMEM(name) unsigned char* const name = ::lowrank_ops::emu::dynamic_shared_memory()
#else
#define LOWRANK_OPS_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#define LOWRANK_OPS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// The same launch as a cudaError_t expression, with programmatic stream serialization where
// `overlap` is true (sm_90 and later): the kernel's CTAs may start while the stream's previous
// kernel finishes, so the kernel calls ptx::wait_for_prior_grids() before it touches global memory.
// The emulation runs launches one after another and ignores `overlap`.
#ifdef LOWRANK_OPS_EMULATE
#define LOWRANK_OPS_LAUNCH_DEPENDENT(overlap, kernel, grid, block, smem_bytes, stream, ...) \
  ((void)(overlap), LOWRANK_OPS_EMULATED_LAUNCH(kernel, grid, block, smem_bytes, __VA_ARGS__), cudaSuccess)
#else
#define LOWRANK_OPS_LAUNCH_DEPENDENT(overlap, kernel, grid, block, smem_bytes, stream, ...) \
  ::lowrank_ops::ptx::launch_dependent(overlap, kernel, grid, block, smem_bytes, stream, __VA_ARGS__)
#endif

namespace lowrank_ops {
namespace ptx {

#ifndef LOWRANK_OPS_EMULATE
// LOWRANK_OPS_LAUNCH_DEPENDENT outside the emulation: cudaLaunchKernelEx, with the programmatic
// stream serialization attribute where `overlap` is true
template <typename... Params, typename... Args>
inline cudaError_t launch_dependent(bool overlap, void (*kernel)(Params...), dim3 grid, dim3 block,
                                    size_t smem_bytes, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}
#endif

// Programmatic dependent launch (griddepcontrol, sm_90 and later; no-ops before, and in the
// emulation, whose launches run one after another). wait_for_prior_grids returns once the grids
// this one depends on have completed and their memory is visible (at once for a plain launch);
// allow_dependent_grids lets a grid launched after this one with programmatic serialization start
// its CTAs once every CTA of this grid has called it (they wait in their own wait_for_prior_grids).
__device__ __forceinline__ void wait_for_prior_grids() {
#if !defined(LOWRANK_OPS_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_grids() {
#if !defined(LOWRANK_OPS_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// (a & b) | c in one instruction
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef LOWRANK_OPS_EMULATE
  return (a & b) | c;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#endif
}

// 2^x, ex2.approx.ftz (ex2(-inf) = +0)
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef LOWRANK_OPS_EMULATE
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// cp.async of BYTES (4, 8 or 16, both addresses aligned to it) into shared memory, L1-cached for 4
// and 8 bytes (.ca), L2 only for 16 (.cg); groups as in PTX: commit closes one, wait<N> returns
// when at most the newest N are still in flight.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef LOWRANK_OPS_EMULATE
  emu::cp_async(smem, gmem, BYTES);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(gmem), "n"(BYTES) : "memory");
  }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef LOWRANK_OPS_EMULATE
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LOWRANK_OPS_EMULATE
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// ldmatrix .x4 .trans: lane l names row l % 8 of 8x8 b16 matrix l / 8; lane (g, t) (g = l / 4,
// t = l % 4) gets {M_i[2t][g], M_i[2t + 1][g]} of matrix i in r[i]
__device__ __forceinline__ void ldmatrix_x4_trans(const void* smem, uint32_t (&r)[4]) {
#ifdef LOWRANK_OPS_EMULATE
  const uint64_t mine = reinterpret_cast<uintptr_t>(smem);
  const uint32_t words[2] = {uint32_t(mine), uint32_t(mine >> 32)};
  const auto all = emu::warp_exchange(emu::Collective::kLdmatrix, words, 2);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const auto row = [&](int k) {
      const uint32_t* w = all[8 * i + k];
      return reinterpret_cast<const uint16_t*>(uintptr_t(w[0]) | (uintptr_t(w[1]) << 32));
    };
    r[i] = uint32_t(row(2 * t)[g]) | (uint32_t(row(2 * t + 1)[g]) << 16);
  }
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// hint: bring the 128-byte line holding `p` into L2 (no register, no wait)
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef LOWRANK_OPS_EMULATE
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// movmatrix .trans: an 8 x 8 b16 matrix held as lane (g, t) = {M[g][2t], M[g][2t + 1]} comes back
// transposed in the same layout: {M[2t][g], M[2t + 1][g]}
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t m) {
#ifdef LOWRANK_OPS_EMULATE
  const auto all = emu::warp_exchange(emu::Collective::kMovmatrix, &m, 1);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const auto entry = [&](int row, int col) {  // M[row][col]: lane (row, col / 2), half col % 2
    return uint32_t(uint16_t(all[4 * row + col / 2][0] >> (16 * (col % 2))));
  };
  return entry(2 * t, g) | (entry(2 * t + 1, g) << 16);
#else
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(m));
  return d;
#endif
}

#ifdef LOWRANK_OPS_EMULATE
// m16n8k16 row.col, fp32 accumulate, from every lane's fragments: lane (g, t) holds A rows g (a[0]:
// k 2t, 2t+1; a[2]: k 2t+8, 2t+9) and g + 8 (a[1], a[3]), B column g (b0: k 2t, 2t+1; b1: k 2t+8,
// 2t+9) and C[g][2t, 2t+1] (c[0], c[1]), C[g + 8][2t, 2t+1] (c[2], c[3]); `rows` 8 or 16 of C kept
inline float emulated_input(uint32_t pair, int hi, bool bf16) {
  const uint16_t bits = uint16_t(pair >> (16 * hi));
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
}
inline void emulated_mma(float* c, int rows, const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const auto all = emu::warp_exchange(emu::Collective::kMma, mine, 6);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int half = 0; half < rows / 8; ++half)
    for (int col = 0; col < 2; ++col) {
      const int n = 2 * t + col;  // output column; B column n lives in lanes 4n .. 4n + 3
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) {
        const uint32_t* ar = all[4 * g + (k % 8) / 2];  // A[g + 8 half][k]: lane (g, (k % 8) / 2)
        const uint32_t* br = all[4 * n + (k % 8) / 2];  // B[k][n]: lane (n, (k % 8) / 2), b0 (k < 8) or b1
        sum += double(emulated_input(ar[half + 2 * (k / 8)], k % 2, bf16)) * emulated_input(br[4 + k / 8], k % 2, bf16);
      }
      c[2 * half + col] = float(double(c[2 * half + col]) + sum);
    }
}
#endif

// m16n8k16 mma (fp32 accumulate, in place) for a CTA that keeps the top 8 q rows: lane (g, t)
// passes the A registers of row g (a_lo: k 2t, 2t+1; a_hi: k 2t+8, 2t+9) and the B registers
// (b0: k 2t, 2t+1 of column g; b1: k 2t+8, 2t+9) and gets c[0], c[1] = C[g][2t, 2t+1]; the
// instruction's bottom 8 rows are zero in, discarded out (no registers held).
#define LOWRANK_OPS_MMA(NAME, TYPE)                                                                            \
  __device__ __forceinline__ void NAME(float (&c)[2], uint32_t a_lo, uint32_t a_hi, uint32_t b0, uint32_t b1) { \
    asm("{\n .reg .f32 d2, d3, fz;\n .reg .b32 az;\n mov.b32 az, 0;\n mov.f32 fz, 0f00000000;\n"              \
        " mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                                \
        ".f32 {%0,%1,d2,d3}, {%2,az,%3,az}, {%4,%5}, {%0,%1,fz,fz};\n}"                                        \
        : "+f"(c[0]), "+f"(c[1])                                                                               \
        : "r"(a_lo), "r"(a_hi), "r"(b0), "r"(b1));                                                             \
  }
// The whole m16n8k16 mma (fp32 accumulate, in place): lane (g, t) passes A rows g and g + 8
// (a[0], a[2]: row g, k 2t.. and 2t+8..; a[1], a[3]: row g + 8), B as above, and keeps
// c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g + 8][2t, 2t+1].
#define LOWRANK_OPS_MMA16(NAME, TYPE)                                                                          \
  __device__ __forceinline__ void NAME(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {       \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                                 \
        ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                                          \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                       \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                                      \
  }
#ifdef LOWRANK_OPS_EMULATE
__device__ __forceinline__ void mma_f16(float (&c)[2], uint32_t a_lo, uint32_t a_hi, uint32_t b0, uint32_t b1) {
  emulated_mma(c, 8, {a_lo, 0u, a_hi, 0u}, b0, b1, false);
}
__device__ __forceinline__ void mma_bf16(float (&c)[2], uint32_t a_lo, uint32_t a_hi, uint32_t b0, uint32_t b1) {
  emulated_mma(c, 8, {a_lo, 0u, a_hi, 0u}, b0, b1, true);
}
__device__ __forceinline__ void mma16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulated_mma(c, 16, a, b0, b1, false);
}
__device__ __forceinline__ void mma16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulated_mma(c, 16, a, b0, b1, true);
}
#else
LOWRANK_OPS_MMA(mma_f16, "f16")
LOWRANK_OPS_MMA(mma_bf16, "bf16")
LOWRANK_OPS_MMA16(mma16_f16, "f16")
LOWRANK_OPS_MMA16(mma16_bf16, "bf16")
#endif
#undef LOWRANK_OPS_MMA
#undef LOWRANK_OPS_MMA16

}  // namespace ptx
}  // namespace lowrank_ops
