// fastrnn_cpu::pad_rows: a PackedSequence's rows [N, F] -> padded, time-major [T, B, F] with zeros past each
// length, into the output cache (memory.h): what torch's _pad_packed_sequence computes, but into memory that is
// already mapped. The layer code pads a projection Gx of tens of MB this way (fastrnn/autograd.py, padded): a
// fresh allocation past glibc's largest mmap threshold (32 MB) faults its pages in at every call, which cost
// more than the projection over the N packed rows instead of T * B saves (GRU (100,64,512,512) inference 67.3
// ms padding x first against 70.4 projecting first with torch's pad; docs/cpu.md, "Packed input").
// Every step's rows are one contiguous run in both layouts: a copy and a zero fill a step, the steps split
// over the threads. Any dtype (bytes are copied). Its gradient is the gather back (native.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "memory.h"

namespace fastrnn {
namespace cpu {
namespace {

at::Tensor pad_rows(const at::Tensor& rows, const at::Tensor& batch_sizes) {
  TORCH_CHECK(rows.dim() == 2 && rows.device().is_cpu(),
              "fastrnn_cpu::pad_rows: rows [N, F] on the CPU expected, got ", rows.sizes(), " on ", rows.device());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong,
              "fastrnn_cpu::pad_rows: batch_sizes must be a 1-D int64 CPU tensor");
  const at::Tensor sizes = batch_sizes.contiguous();
  const int64_t* bs = sizes.const_data_ptr<int64_t>();
  const int64_t T = sizes.numel(), B = T > 0 ? bs[0] : 0;
  std::vector<int64_t> start(T + 1, 0);  // the first packed row of each step
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(bs[t] >= 0 && bs[t] <= B && (t == 0 || bs[t] <= bs[t - 1]),
                "fastrnn_cpu::pad_rows: batch_sizes must be non-increasing, got ", batch_sizes);
    start[t + 1] = start[t] + bs[t];
  }
  TORCH_CHECK(start[T] == rows.size(0), "fastrnn_cpu::pad_rows: batch_sizes sum to ", start[T], ", rows has ",
              rows.size(0));
  const at::Tensor src = rows.contiguous();
  at::Tensor out = empty_output({T, B, rows.size(1)}, rows.options());
  const int64_t row_bytes = rows.size(1) * static_cast<int64_t>(rows.element_size());
  if (T == 0 || B == 0 || row_bytes == 0) {
    return out;
  }
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  // A grain of about 256 KB of output a task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, B * row_bytes));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      char* step = d + t * B * row_bytes;
      std::memcpy(step, s + start[t] * row_bytes, static_cast<size_t>(bs[t] * row_bytes));
      std::memset(step + bs[t] * row_bytes, 0, static_cast<size_t>((B - bs[t]) * row_bytes));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) { m.def("pad_rows(Tensor rows, Tensor batch_sizes) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) { m.impl("pad_rows", &pad_rows); }

}  // namespace cpu
}  // namespace fastrnn
