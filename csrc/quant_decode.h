// Host interface of the quantized decode kernel (csrc/quant_decode.cu). Plain C++: no CUDA or
// torch headers, so module.cpp builds with the host compiler alone.
#pragma once

#include <cstdint>

namespace lowrank_ops {

// y = x (W_hat + S)^T + bias for M <= 8 rows, straight from the packed format of
// lowrank_ops/quant/format.py. Pointers are device addresses; optional ones are 0:
//   qweight    int32 (N, K_pad/8) for 4 bits, the 2-bit low plane (N, K_pad/16) for 3 bits
//   qweight_hi int32 (N, K_pad/32), 3 bits only
//   scales, zeros fp16 (N, K_pad/group_size)  (uniform mode)  |  lut fp16 (N, 2^bits) (LUT mode)
//     with quantized_stats = 1 the same two slots hold the second-level form instead:
//     scales -> stat codes uint8 (N, G), zeros -> stat meta fp16 (2, ceil(N/16), G)
//   rowptr int32 (N+1), cols int16 (nnz, unsigned), vals fp16 (nnz)  (CSR outliers, all or none)
//   x (M, K), bias (N), y (M, N) in the dtype given by `dtype` (DTypeCode of lowrank_decode.h)
// qweight must be 16-byte aligned (qweight_hi 4-byte). The low-rank path is not in the kernel.
struct QuantDecodeArgs {
  std::uintptr_t x, qweight, qweight_hi, scales, zeros, lut, rowptr, cols, vals, bias, y;
  int M, K, N;
  int bits;        // 3 or 4
  int group_size;  // 32, 64 or 128
  int dtype;       // DTypeCode
  int quantized_stats;  // 1: second-level statistics in the scales/zeros slots
  std::uintptr_t stream;  // cudaStream_t of the caller (0 = legacy default stream)
};

// One launch on args.stream; throws std::invalid_argument for bad arguments and
// std::runtime_error carrying the CUDA error string when the launch fails.
void quant_decode(const QuantDecodeArgs& args);

}  // namespace lowrank_ops
