// at::empty for the big [T, B, *] tensors of a layer (Gx, y, the saved activations, dGx, dGh, dx), with a
// hint that lets Linux back them with 2 MB pages.
//
// Why: each of these is a fresh allocation of 10-60 MB at T=100, B=64, H=512; glibc hands allocations that
// big out as fresh mmap'd memory, so the first write to every 4 KB page faults and the kernel zeroes it.
// On the Xeon of 2026-12-02 (2 threads, load ~4) writing 52 MB into fresh memory took 20-26 ms against 3-8
// into touched memory; with MADV_HUGEPAGE on the fresh block 12.5 ms (one fault per 2 MB). The hint is
// advice only (a kernel with THP "never" ignores it; with "always" it changes nothing), takes effect only
// on the 2 MB-aligned interior of the block, and changes no result. Machines with THP set to "madvise" (the
// common default) gain. FASTRNN_CPU_HUGEPAGES=0 turns it off (benchmarks); the choice is a fixed rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {
namespace cpu {

// Below this a block spans at most one whole 2 MB page: the hint would buy little.
constexpr int64_t kHugePageHintBytes = int64_t{4} << 20;

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  const char* env = std::getenv("FASTRNN_CPU_HUGEPAGES");
  if (bytes >= kHugePageHintBytes && !(env != nullptr && std::strcmp(env, "0") == 0)) {
    constexpr uintptr_t kPage = uintptr_t{1} << 21;
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (start + kPage - 1) & ~(kPage - 1);
    const uintptr_t end = (start + static_cast<uintptr_t>(bytes)) & ~(kPage - 1);
    if (end > begin) {
      madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: a failure changes nothing
    }
  }
#endif
  return t;
}

}  // namespace cpu
}  // namespace fastrnn
