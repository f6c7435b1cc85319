// Large op outputs on transparent huge pages.
//
// A fresh allocation of tens of MB (glibc maps it anew at every call) faults in 4 KB at a time at its first
// touch, which comes next, in the op's kernel. With the ops' own outputs advised, the cpu backend's forward+
// backward at (100,64,512,512) went from 0.94 to 1.07 of torch.nn's speed for the LSTM (medians of 16
// alternating processes each; faster in 15 of the 16 pairs) and from 1.61 to 1.86-1.99 for the GRU (AMD EPYC
// Zen 5, 2 threads, 2026-12-02; docs/cpu.md, "Memory"). torch's own switch for its allocations, THP_MEM_ALLOC_ENABLE=1, works only when set
// before torch starts. FASTRNN_HUGE_PAGES=0 turns the advice off (read once).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {
namespace cpu {

// at::empty, with the whole 2 MB pages inside it advised MADV_HUGEPAGE (Linux; THP in "madvise" or "always"
// mode backs them with huge pages at the first touch, "never" ignores the advice; the advice is a hint, and
// its failure changes nothing).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool off = [] {
    const char* env = std::getenv("FASTRNN_HUGE_PAGES");
    return env != nullptr && std::string(env) == "0";
  }();
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (!off && start != 0 && end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace fastrnn
