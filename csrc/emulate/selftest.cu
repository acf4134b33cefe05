// Unit kernels for the CPU emulation itself (built only under -DLOWRANK_OPS_EMULATE, as the module
// lowrank_ops_emulation._selftest; tests/test_cuda_emulation_selftest.py): each exercises one
// primitive the kernels rely on, so the emulation's fragment layouts, collectives, barriers and
// cp.async timing are checked against the PTX semantics directly, not only through whole kernels.
// Pointers are host addresses as ints; one warp (or two, for the barrier) per launch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "ptx.cuh"

namespace {

using lowrank_ops::ptx::cp_async;
using lowrank_ops::ptx::cp_async_commit;
using lowrank_ops::ptx::cp_async_wait;

constexpr unsigned kFull = 0xffffffffu;

uint32_t pair(const uint16_t* p, int lo, int hi) { return uint32_t(p[lo]) | (uint32_t(p[hi]) << 16); }

// C (rows x 8, row-major fp32; rows 8 or 16) += A (the top `rows` of 16 x 16, row-major) B (16 x 8,
// row-major), the fragments gathered as the PTX m16n8k16 layout names them (lane (g, t): A[g][2t..],
// A[g + 8][2t..], B[2t..][g]): rows 8 through the top-rows wrappers, 16 through the whole mma
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, float* c, bool bf16, int rows) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const auto a_pair = [&](int row, int k) { return pair(a, row * 16 + k, row * 16 + k + 1); };
  const uint32_t frag[4] = {a_pair(g, 2 * t), a_pair(g + 8, 2 * t), a_pair(g, 2 * t + 8), a_pair(g + 8, 2 * t + 8)};
  const uint32_t b0 = pair(b, 2 * t * 8 + g, (2 * t + 1) * 8 + g);
  const uint32_t b1 = pair(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], 0.f, 0.f};
  if (rows == 16) {
    acc[2] = c[(g + 8) * 8 + 2 * t];
    acc[3] = c[(g + 8) * 8 + 2 * t + 1];
    if (bf16) {
      lowrank_ops::ptx::mma16_bf16(acc, frag, b0, b1);
    } else {
      lowrank_ops::ptx::mma16_f16(acc, frag, b0, b1);
    }
    c[(g + 8) * 8 + 2 * t] = acc[2];
    c[(g + 8) * 8 + 2 * t + 1] = acc[3];
  } else {
    float top[2] = {acc[0], acc[1]};
    if (bf16) {
      lowrank_ops::ptx::mma_bf16(top, frag[0], frag[2], b0, b1);
    } else {
      lowrank_ops::ptx::mma_f16(top, frag[0], frag[2], b0, b1);
    }
    acc[0] = top[0];
    acc[1] = top[1];
  }
  c[g * 8 + 2 * t] = acc[0];
  c[g * 8 + 2 * t + 1] = acc[1];
}

// an 8 x 8 b16 matrix (row-major) through movmatrix .trans: lane (g, t) passes {M[g][2t], M[g][2t+1]}
__global__ void movmatrix_kernel(const uint16_t* m, uint32_t* out) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  out[lane] = lowrank_ops::ptx::movmatrix_trans(pair(m, g * 8 + 2 * t, g * 8 + 2 * t + 1));
}

// four 8 x 8 b16 matrices (32 rows of 8) through ldmatrix .x4 .trans; lane l names row l
__global__ void ldmatrix_kernel(const uint16_t* m, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const int lane = threadIdx.x;
  for (int j = 0; j < 8; ++j) tile[lane][j] = m[lane * 8 + j];
  __syncwarp();
  uint32_t r[4];
  lowrank_ops::ptx::ldmatrix_x4_trans(&tile[lane][0], r);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// out[l] = the value of lane l ^ 5 (10 * lane); out[32 + l] = any(lane == 31); out[64 + l] = any(false)
__global__ void shuffle_vote_kernel(int* out) {
  const int lane = threadIdx.x;
  out[lane] = __shfl_xor_sync(kFull, lane * 10, 5);
  out[32 + lane] = __any_sync(kFull, lane == 31);
  out[64 + lane] = __any_sync(kFull, 0);
}

// Two cp.async groups of 16 bytes per lane into a zeroed buffer, read back at three points: after
// the copies are issued (snapshot 0), after wait_group<1> (snapshot 1: the first group has landed)
// and after wait_group<0> (snapshot 2); each lane reads its right neighbour's bytes between two
// __syncwarp. out: 3 snapshots x 2 groups x 32 lanes x 4 words.
__global__ void copy_kernel(const uint32_t* src, uint32_t* out) {
  __shared__ __align__(16) uint32_t buf[2][32 * 4];
  const int lane = threadIdx.x, right = (lane + 1) % 32;
  for (int grp = 0; grp < 2; ++grp)
    for (int i = 0; i < 4; ++i) buf[grp][lane * 4 + i] = 0u;
  __syncwarp();
  for (int grp = 0; grp < 2; ++grp) {
    cp_async<16>(&buf[grp][lane * 4], src + grp * 128 + lane * 4);
    cp_async_commit();
  }
  const auto snapshot = [&](int k) {  // between two __syncwarp: no lane waits while another reads
    __syncwarp();
    for (int grp = 0; grp < 2; ++grp)
      for (int i = 0; i < 4; ++i) out[((k * 2 + grp) * 32 + lane) * 4 + i] = buf[grp][right * 4 + i];
    __syncwarp();
  };
  snapshot(0);
  cp_async_wait<1>();
  snapshot(1);
  cp_async_wait<0>();
  snapshot(2);
}

// two warps: warp 0 writes, a block barrier, warp 1 reads (out[i] = 3 i + 1)
__global__ void barrier_kernel(int* out) {
  __shared__ int shared[32];
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 32) shared[lane] = 3 * lane + 1;
  __syncthreads();
  if (threadIdx.x >= 32) out[lane] = shared[lane];
}

// half the warp waits at __syncwarp, the other half at a shuffle: undefined on a GPU, an error here
__global__ void divergent_kernel(int* out) {
  const int lane = threadIdx.x;
  if (lane < 16) {
    __syncwarp();
  } else {
    out[lane] = __shfl_xor_sync(kFull, lane, 1);
  }
}

template <typename T>
T* as(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_selftest, m) {
  m.doc() = "unit kernels for the CPU emulation of csrc/ (host addresses as ints)";
  m.def("mma", [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, bool bf16, int rows) {
    LOWRANK_OPS_LAUNCH(mma_kernel, 1, 32, 0, 0, as<const uint16_t>(a), as<const uint16_t>(b), as<float>(c), bf16, rows);
  });
  m.def("movmatrix", [](std::uintptr_t m, std::uintptr_t out) {
    LOWRANK_OPS_LAUNCH(movmatrix_kernel, 1, 32, 0, 0, as<const uint16_t>(m), as<uint32_t>(out));
  });
  m.def("ldmatrix", [](std::uintptr_t mats, std::uintptr_t out) {
    LOWRANK_OPS_LAUNCH(ldmatrix_kernel, 1, 32, 0, 0, as<const uint16_t>(mats), as<uint32_t>(out));
  });
  m.def("shuffle_vote", [](std::uintptr_t out) { LOWRANK_OPS_LAUNCH(shuffle_vote_kernel, 1, 32, 0, 0, as<int>(out)); });
  m.def("copy", [](std::uintptr_t src, std::uintptr_t out) {
    LOWRANK_OPS_LAUNCH(copy_kernel, 1, 32, 0, 0, as<const uint32_t>(src), as<uint32_t>(out));
  });
  m.def("barrier", [](std::uintptr_t out) { LOWRANK_OPS_LAUNCH(barrier_kernel, 1, 64, 0, 0, as<int>(out)); });
  m.def("divergent", [](std::uintptr_t out) { LOWRANK_OPS_LAUNCH(divergent_kernel, 1, 32, 0, 0, as<int>(out)); });
}
