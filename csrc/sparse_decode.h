// Host interface of the N:M sparse decode kernel (csrc/sparse_decode.cu). Plain C++: no CUDA or
// torch headers, so module.cpp builds with the host compiler alone.
#pragma once

#include <cstdint>

namespace lowrank_ops {

// y = x W_nm^T + bias for M <= 8 rows, straight from the packed format of
// lowrank_ops/sparse/format.py. Pointers are device addresses; bias is 0 when absent:
//   values  (N, KK) in `dtype`, KK = K / nm_m * nm_n kept values per row, row-major
//   indices int32 (N, ceil(KK / (32 / log2(nm_m)))) packed in-group positions, row-major
//   x (M, K), bias (N), y (M, N) in `dtype` (DTypeCode of lowrank_decode.h)
// nm_m in {4, 8, 16}, 1 <= nm_n < nm_m, K a multiple of nm_m. indices must be 4-byte aligned;
// values and x take 128-bit loads when aligned (16 bytes, KK resp. K a multiple of 8), else scalar.
//
// 4-bit kept values (group_size in {32, 64, 128}; 0 = the dense values above): `values` is then
// the codes, int32 (N, KK_pad / 8) with KK_pad = ceil(KK / group_size) * group_size, code j of a
// row at bit 4 * (j % 8) of word j / 8, and scales / zeros are fp16 (N, KK_pad / group_size):
// kept value j = (q_j - zeros[r, j / group_size]) * scales[r, j / group_size]. Codes must be
// 4-byte aligned, scales / zeros 2-byte aligned; both are 0 with dense values.
struct SparseDecodeArgs {
  std::uintptr_t x, values, indices, bias, y;
  int M, K, N;
  int nm_n, nm_m;
  int dtype;              // DTypeCode
  std::uintptr_t stream;  // cudaStream_t of the caller (0 = legacy default stream)
  std::uintptr_t scales = 0, zeros = 0;  // 4-bit kept values only
  int group_size = 0;                    // 0: dense values; 32, 64 or 128: 4-bit codes
};

// One launch on args.stream; throws std::invalid_argument for bad arguments and
// std::runtime_error carrying the CUDA error string when the launch fails.
void sparse_decode(const SparseDecodeArgs& args);

}  // namespace lowrank_ops
