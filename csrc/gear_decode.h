// Host interface of the GEAR decode-attention kernel (csrc/gear_decode.cu). Plain C++: no CUDA
// or torch headers, so module.cpp builds with the host compiler alone.
#pragma once

#include <cstdint>

namespace lowrank_ops {

// out = softmax(scale q K_hat^T + mask) V_hat over a GEAR-compressed cache, read in its
// compressed form (the layout of lowrank_ops/kvcache/format.py). Pointers are device addresses;
// optional ones are 0: the four outlier tensors when n_out = 0, the six factor tensors when
// rank = 0 (the two scales also for fp16 factors), key_mask when there is none. All tensors contiguous:
//   q, out            (batch, q_heads, q_len, head_dim) in `dtype`; rows of one kv head contiguous
//   key/value_codes   int32 (batch, kv_heads, T, head_dim * bits / 32), T = nblocks * buffer_tokens
//   key_scale/_zero   fp16 (batch, kv_heads, T / group_size, head_dim)
//   value_scale/_zero fp16 (batch, kv_heads, T, head_dim / group_size)
//   *_out_idx uint8 / *_out_val fp16 (batch, kv_heads, T, n_out)
//   *_lr_a (batch, kv_heads, T, rank), *_lr_b (batch, kv_heads, nblocks, head_dim, rank): fp16
//     (factor_bits 16) or int8 (8) with *_lr_scale fp32 (batch, kv_heads, nblocks, rank), A's
//     column scales, and B = B_int8 / 127
//   tail_keys/_values (batch, kv_heads, buffer_tokens, head_dim) in `dtype`, tail_len valid rows
//   prefix_keys/_values (batch, kv_heads, prefix_len, head_dim) in `dtype`: the cache's first
//     prefix_len <= 16 tokens, uncompressed (0 when prefix_len = 0); the combine kernel attends them
//   key_mask uint8 (batch, prefix_len + T + tail_len), nonzero = attend
//   part_m, part_l fp32 (batch * kv_heads * splits * M), part_acc fp32 (... * M, head_dim)
// M = (q_heads / kv_heads) * q_len rows per kv head.
struct GearDecodeArgs {
  std::uintptr_t q, key_codes, key_scale, key_zero, key_out_idx, key_out_val, key_lr_a, key_lr_b, key_lr_scale;
  std::uintptr_t value_codes, value_scale, value_zero, value_out_idx, value_out_val, value_lr_a, value_lr_b,
      value_lr_scale;
  std::uintptr_t tail_keys, tail_values, key_mask, part_m, part_l, part_acc, out;
  std::uintptr_t prefix_keys, prefix_values;
  int batch_kv_heads;  // batch * kv_heads
  int kv_heads;
  int M;               // q rows per kv head
  int nblocks, buffer_tokens, tail_len;
  int prefix_len;      // uncompressed tokens before the blocks (their positions come first)
  int bits, group_size, head_dim, n_out, rank;
  int factor_bits;     // 16: fp16 factors; 8: int8 factors with column scales
  int splits;          // sequence splits (grid x); 1 without a prefix = the split kernel writes `out` itself
  int steps_per_split; // 16-token steps per split: splits = ceil(steps / steps_per_split)
  float qk_scale;      // score scale * log2(e)
  int dtype;           // DTypeCode (lowrank_decode.h) of q, out and the tail
  std::uintptr_t stream;
  int dependent_launch;  // 1: both kernels launched with programmatic stream serialization (sm_90+)
};

// True when the kernel serves this (bits, head_dim, rank, group_size, buffer_tokens, M).
bool gear_decode_supported(int bits, int head_dim, int rank, int group_size, int buffer_tokens, int M);

// One launch (splits = 1, no prefix) or two (split partials, then their combine) on args.stream; throws
// std::invalid_argument for unsupported arguments and std::runtime_error on a CUDA error.
void gear_decode(const GearDecodeArgs& args);

}  // namespace lowrank_ops
