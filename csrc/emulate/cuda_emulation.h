// CPU emulation of the CUDA subset this project's kernels use, so a kernel's own source runs on
// host tensors in the test lanes (no GPU on the CI machines). Force-included (-include) before a
// .cu file compiled as C++ with -DLOWRANK_OPS_EMULATE; csrc/ptx.cuh routes every inline-PTX
// wrapper here under that flag. The runtime (cuda_emulation.cpp) runs a launch's blocks one after
// another; a block's threads are fibers (ucontext) switched only at a warp collective (shuffle,
// vote, __syncwarp, mma, ldmatrix) or a block barrier, where every live lane of the warp (thread
// of the block) must arrive at the same kind of collective or the launch fails with the reason.
// Static shared memory is the kernel's thread-local static locals, dynamic shared memory a
// buffer per launch (one block at a time per OS thread). cp.async copies are deferred: by default
// they land at the cp.async.wait_group that retires their group (so a read before the wait sees
// stale data), or at issue (LOWRANK_OPS_EMULATE_COPIES=issue: so a copy into a buffer other lanes
// still read overwrites it); LOWRANK_OPS_EMULATE_ORDER=reverse runs lanes in reverse between
// collectives. Tests run kernels under every combination: each exposes a different class of
// missing synchronization.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

// the CUDA headers define these as attributes for a host compiler; here they mean plain C++
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time per OS thread (launches from several threads run side by side): a
// kernel's thread-local static locals are its shared memory
#define __shared__ static thread_local

namespace lowrank_ops {
namespace emu {

constexpr int kWarpSize = 32;
constexpr int kExchangeWords = 16;  // per lane and collective (an mma passes 10)

enum class Collective : int { kShuffle, kVote, kSyncWarp, kMma, kLdmatrix, kMovmatrix };

uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();

// Every live lane of the caller's warp deposits n words; returns the (32 x kExchangeWords) table
// of all lanes' words once the last one has arrived.
const uint32_t (*warp_exchange(Collective kind, const uint32_t* words, int n))[kExchangeWords];
void sync_threads();
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int newest_pending);

// Runs body once per thread of every block (blocks in order, x fastest), synchronously, with
// smem_bytes of dynamic shared memory, filled with 0xA5 bytes before every block (reads of
// shared memory the kernel never wrote come out as garbage, as on a GPU).
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
unsigned char* dynamic_shared_memory();

inline uint32_t float_word(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float word_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace emu
}  // namespace lowrank_ops

#define threadIdx (::lowrank_ops::emu::thread_index())
#define blockIdx (::lowrank_ops::emu::block_index())
#define blockDim (::lowrank_ops::emu::block_dim())
#define gridDim (::lowrank_ops::emu::grid_dim())

// kernel<<<grid, block, smem, stream>>>(args...) (csrc/ptx.cuh: LOWRANK_OPS_LAUNCH)
#define LOWRANK_OPS_EMULATED_LAUNCH(kernel, grid, block, smem_bytes, ...) \
  ::lowrank_ops::emu::launch(dim3(grid), dim3(block), smem_bytes, [&] { kernel(__VA_ARGS__); })

// ------------------------------------------------------------------ CUDA intrinsics on the host
// the value of lane `source` (a shuffle of the whole warp; widths below 32 are not emulated)
template <typename T>
inline T __shfl_sync(unsigned, T v, int source) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t w;
  std::memcpy(&w, &v, 4);
  const auto all = ::lowrank_ops::emu::warp_exchange(::lowrank_ops::emu::Collective::kShuffle, &w, 1);
  const uint32_t got = all[source % 32][0];
  T out;
  std::memcpy(&out, &got, 4);
  return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return __shfl_sync(mask, v, int(threadIdx.x % 32) ^ lane_mask);
}
inline int __any_sync(unsigned, int predicate) {
  const uint32_t w = predicate != 0;
  const auto all = ::lowrank_ops::emu::warp_exchange(::lowrank_ops::emu::Collective::kVote, &w, 1);
  for (int lane = 0; lane < 32; ++lane)
    if (all[lane][0]) return 1;
  return 0;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::lowrank_ops::emu::warp_exchange(::lowrank_ops::emu::Collective::kSyncWarp, nullptr, 0);
}
inline void __syncthreads() { ::lowrank_ops::emu::sync_threads(); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = uint64_t(x) | (uint64_t(y) << 32);
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= unsigned((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return out;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// half2 fma, one rounding (the exact product and sum in double, rounded once to fp16)
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  const double lo = double(__low2float(a)) * __low2float(b) + __low2float(c);
  const double hi = double(__high2float(a)) * __high2float(b) + __high2float(c);
  return __halves2half2(__double2half(lo), __double2half(hi));
}
// CUDA's integer min / max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) { return ::lowrank_ops::emu::word_float(u); }
inline float __int_as_float(int i) { return ::lowrank_ops::emu::word_float(unsigned(i)); }
inline unsigned __float_as_uint(float f) { return ::lowrank_ops::emu::float_word(f); }
inline int __ffs(int x) { return __builtin_ffs(x); }
