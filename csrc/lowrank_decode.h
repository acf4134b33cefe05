// Host interface of the low-rank decode kernels (csrc/lowrank_decode.cu). Plain C++: no
// CUDA or torch headers, so module.cpp builds with the host compiler alone.
#pragma once

#include <cstdint>

namespace lowrank_ops {

enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1 };

// y = (x V^T) U^T + bias. Pointers are device addresses (bias may be 0); all tensors
// row-major contiguous in one dtype; workspace holds splits * M * R floats.
struct DecodeArgs {
  std::uintptr_t x, v, u, bias, y, workspace;
  int M, K, N, R;
  int splits;   // must equal lowrank_decode_splits(M, K, R, num_sms)
  int num_sms;  // multiprocessor count of the device (sizes the grids)
  int dtype;    // DTypeCode
  std::uintptr_t stream;  // cudaStream_t of the caller (0 = legacy default stream)
};

// Number of K splits of phase 1 (the fp32 workspace is splits * M * R floats).
int lowrank_decode_splits(int M, int K, int R, int num_sms);

// Two launches on args.stream; throws std::invalid_argument for bad sizes and
// std::runtime_error carrying the CUDA error string when a launch fails.
void lowrank_decode(const DecodeArgs& args);

}  // namespace lowrank_ops
