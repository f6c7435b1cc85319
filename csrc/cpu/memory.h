// Large op outputs: kept for reuse between calls, on transparent huge pages.
//
// A fresh allocation of tens of MB (glibc maps it anew at every call and unmaps it at the free) faults in at
// its first touch, which comes next, in the op's kernel: every call of a layer pays for its outputs' pages
// again. Two remedies, both measured on the AMD EPYC Zen 5 (2 threads; docs/cpu.md, "Memory"):
//   - huge pages: advised MADV_HUGEPAGE, a 2 MB page faults in at once. The cpu backend's forward+backward at
//     (100,64,512,512) went from 0.94 to 1.07 of torch.nn's speed for the LSTM, 1.61 to 1.86-1.99 for the GRU
//     (medians of 16 alternating processes, 2026-12-02). FASTRNN_HUGE_PAGES=0 turns the advice off.
//   - the output cache (output_cache.cpp): an output of 2 MB or more is a block of the process's cache of
//     freed outputs, so the next call of the same layer writes into memory that is already mapped, and a
//     block is advised once, when it is made. On a VM whose balloon hands freed memory to its host, the
//     mean forward+backward at (100,64,512,512) went from 305-328 to 232-280 ms (LSTM), 247-315 to 185-199
//     (GRU), 90-93 to 60-75 (RNN) (2026-12-03, bfa4c05). FASTRNN_CPU_OUTPUT_CACHE_MB bounds what it keeps (0:
//     nothing).
// torch's own switch for its allocations, THP_MEM_ALLOC_ENABLE=1, works only when set before torch starts.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {
namespace cpu {

constexpr size_t kHugePageBytes = size_t{2} << 20;

// Whether large outputs are advised onto huge pages (FASTRNN_HUGE_PAGES=0: no; read once per library).
inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* env = std::getenv("FASTRNN_HUGE_PAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  return wanted;
}

// Advises the whole 2 MB pages inside [data, data + bytes) MADV_HUGEPAGE (Linux; THP in "madvise" or "always"
// mode backs them with huge pages at the first touch, "never" ignores the advice; the advice is a hint, and
// its failure changes nothing).
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePageBytes - 1);
  if (huge_pages_wanted() && start != 0 && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
}

// The output cache this library allocates large outputs from, or nullptr for none. Each library has its own
// slot: the op library (fastrnn._C) fills its own with the cache (output_cache.cpp) and hands the same cache to
// each capability's copy when it loads it (Kernels::set_output_allocator), so one process has one cache.
inline c10::Allocator*& output_allocator() {
  static c10::Allocator* allocator = nullptr;
  return allocator;
}

// at::empty for an op's output: from the output cache from 2 MB on (its blocks are advised onto huge pages
// when made), else at::empty with its whole 2 MB pages advised.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHugePageBytes && output_allocator() != nullptr && options.device().is_cpu() &&
      options.layout() == at::kStrided) {
    return at::detail::empty_generic(sizes, output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace cpu
}  // namespace fastrnn
