// The one pybind11 module of the project, lowrank_ops._C. It takes device pointers, sizes,
// dtype codes and the CUDA stream as Python ints and never includes torch headers; the Python
// wrappers (lowrank_ops/*/cuda_*.py) check tensors before calling in. Each kernel family
// declares its host entry points in a header next to its .cu file and is bound here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "gear_decode.h"
#include "lowrank_decode.h"
#include "quant_decode.h"
#include "sparse_decode.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowrank_ops CUDA kernels (raw device pointers, no torch C++ API)";
  m.attr("DTYPE_FLOAT16") = static_cast<int>(lowrank_ops::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(lowrank_ops::kBFloat16);

  m.def("lowrank_decode_splits", &lowrank_ops::lowrank_decode_splits, py::arg("M"), py::arg("K"), py::arg("R"),
        py::arg("num_sms"),
        "Number of K splits of phase 1; the fp32 workspace holds splits * M * R floats.");

  m.def(
      "lowrank_decode",
      [](std::uintptr_t x, std::uintptr_t v, std::uintptr_t u, std::uintptr_t bias, std::uintptr_t y,
         std::uintptr_t workspace, int M, int K, int N, int R, int splits, int num_sms, int dtype,
         std::uintptr_t stream) {
        lowrank_ops::DecodeArgs a{x, v, u, bias, y, workspace, M, K, N, R, splits, num_sms, dtype, stream};
        py::gil_scoped_release release;  // launches only; errors come back as C++ exceptions
        lowrank_ops::lowrank_decode(a);
      },
      py::arg("x"), py::arg("v"), py::arg("u"), py::arg("bias"), py::arg("y"), py::arg("workspace"), py::arg("M"),
      py::arg("K"), py::arg("N"), py::arg("R"), py::arg("splits"), py::arg("num_sms"), py::arg("dtype"),
      py::arg("stream"),
      "y = (x V^T) U^T + bias for M <= 16 rows (two launches on `stream`). All pointers are device addresses "
      "as ints (bias 0 = none); tensors row-major contiguous; workspace = splits * M * R float32.");

  m.def(
      "quant_decode",
      [](std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t qweight_hi, std::uintptr_t scales,
         std::uintptr_t zeros, std::uintptr_t lut, std::uintptr_t rowptr, std::uintptr_t cols, std::uintptr_t vals,
         std::uintptr_t bias, std::uintptr_t y, int M, int K, int N, int bits, int group_size, int dtype,
         int quantized_stats, std::uintptr_t stream) {
        lowrank_ops::QuantDecodeArgs a{x, qweight, qweight_hi, scales, zeros, lut, rowptr, cols, vals, bias, y,
                                       M, K, N, bits, group_size, dtype, quantized_stats, stream};
        py::gil_scoped_release release;  // one launch; errors come back as C++ exceptions
        lowrank_ops::quant_decode(a);
      },
      py::arg("x"), py::arg("qweight"), py::arg("qweight_hi"), py::arg("scales"), py::arg("zeros"), py::arg("lut"),
      py::arg("rowptr"), py::arg("cols"), py::arg("vals"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("K"),
      py::arg("N"), py::arg("bits"), py::arg("group_size"), py::arg("dtype"), py::arg("quantized_stats"),
      py::arg("stream"),
      "y = x (W_hat + S)^T + bias for M <= 8 rows from the packed 2/3/4-bit format (one launch on `stream`). "
      "Pointers are device addresses as ints (0 = absent: qweight_hi unless bits=3, scales/zeros or lut, the "
      "three outlier tensors, bias); x/bias/y in `dtype`, the format tensors as in lowrank_ops/quant/format.py; "
      "quantized_stats=1: the scales/zeros slots hold the second-level stat codes / stat meta.");

  m.def(
      "sparse_decode",
      [](std::uintptr_t x, std::uintptr_t values, std::uintptr_t indices, std::uintptr_t bias, std::uintptr_t y, int M,
         int K, int N, int nm_n, int nm_m, int dtype, std::uintptr_t stream, std::uintptr_t scales,
         std::uintptr_t zeros, int group_size) {
        lowrank_ops::SparseDecodeArgs a{x,    values, indices, bias,   y,     M,     K,         N,
                                        nm_n, nm_m,   dtype,   stream, scales, zeros, group_size};
        py::gil_scoped_release release;  // one launch; errors come back as C++ exceptions
        lowrank_ops::sparse_decode(a);
      },
      py::arg("x"), py::arg("values"), py::arg("indices"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("K"),
      py::arg("N"), py::arg("nm_n"), py::arg("nm_m"), py::arg("dtype"), py::arg("stream"), py::arg("scales") = 0,
      py::arg("zeros") = 0, py::arg("group_size") = 0,
      "y = x W_nm^T + bias for M <= 8 rows from the packed N:M format (one launch on `stream`). Pointers are "
      "device addresses as ints (bias 0 = none); x/values/bias/y in `dtype`, indices int32 as in "
      "lowrank_ops/sparse/format.py. 4-bit kept values: group_size 32/64/128, values = int32 codes "
      "(N, KK_pad/8), scales/zeros fp16 (N, KK_pad/group_size); group_size 0 (default) = dense values.");

  m.def(
      "gear_decode",
      [](std::uintptr_t q, std::uintptr_t key_codes, std::uintptr_t key_scale, std::uintptr_t key_zero,
         std::uintptr_t key_out_idx, std::uintptr_t key_out_val, std::uintptr_t key_lr_a, std::uintptr_t key_lr_b,
         std::uintptr_t key_lr_scale, std::uintptr_t value_codes, std::uintptr_t value_scale,
         std::uintptr_t value_zero, std::uintptr_t value_out_idx, std::uintptr_t value_out_val,
         std::uintptr_t value_lr_a, std::uintptr_t value_lr_b, std::uintptr_t value_lr_scale,
         std::uintptr_t tail_keys, std::uintptr_t tail_values, std::uintptr_t key_mask, std::uintptr_t part_m,
         std::uintptr_t part_l, std::uintptr_t part_acc, std::uintptr_t out, std::uintptr_t prefix_keys,
         std::uintptr_t prefix_values, int batch_kv_heads, int kv_heads, int M, int nblocks, int buffer_tokens,
         int tail_len, int prefix_len, int bits, int group_size, int head_dim, int n_out, int rank, int factor_bits,
         int splits, int steps_per_split, float qk_scale, int dtype, std::uintptr_t stream, bool dependent_launch) {
        lowrank_ops::GearDecodeArgs a{q,           key_codes,     key_scale,      key_zero,      key_out_idx,
                                      key_out_val, key_lr_a,      key_lr_b,       key_lr_scale,  value_codes,
                                      value_scale, value_zero,    value_out_idx,  value_out_val, value_lr_a,
                                      value_lr_b,  value_lr_scale, tail_keys,     tail_values,   key_mask,
                                      part_m,      part_l,        part_acc,       out,           prefix_keys,
                                      prefix_values, batch_kv_heads, kv_heads,    M,             nblocks,
                                      buffer_tokens, tail_len,    prefix_len,     bits,          group_size,
                                      head_dim,    n_out,         rank,           factor_bits,   splits,
                                      steps_per_split, qk_scale,  dtype,          stream,        dependent_launch};
        py::gil_scoped_release release;  // launches only; errors come back as C++ exceptions
        lowrank_ops::gear_decode(a);
      },
      "GEAR decode attention over the compressed cache (one or two launches on `stream`): 26 device addresses "
      "as ints in the order of lowrank_ops/kvcache/cuda_decode.py (0 = absent), then the sizes, the settings, "
      "qk_scale = scale * log2(e), the dtype code, the stream, and whether to launch with programmatic stream "
      "serialization (sm_90+: the kernels may start while the stream's previous kernel finishes). Layout: "
      "csrc/gear_decode.h.");
}
