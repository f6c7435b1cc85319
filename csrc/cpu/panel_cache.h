// Packed W_hh panels kept across calls (HiddenGemm, recurrence.h): a small layer called again and again with
// the same weights (inference, RL rollouts of T = 1 step, the forward of an evaluation loop) repacks nothing.
// The same for W_ih where the input projection runs on the panels (small_linear.cpp; in inference: a weight
// changed between calls is packed again, as W_hh in training).
//
// Why: packing W_hh into panels costs about as much as several steps of a small layer (Intel Xeon AVX-512,
// 1 thread: ~15 us of the ~23 us a call of the LSTM forward op at B=1, H=128 has before its first step,
// docs/cpu.md "Small layers"), every call.
//
// The invalidation rule never trusts the version counter alone: a parameter written through `.data`
// (`target.data.copy_(...)`, the soft target update of RL code), through numpy or DLPack keeps its version,
// and a freed weight's address can come back for another tensor. So panels are reused only when the weight's
// bytes equal a copy taken when the panels were built (one memcmp, split over the threads from 256 KB,
// bytes_equal: 256 KB at H = 128, read from L2, a few us against ~15 us of packing). The version counter only
// decides when that copy is worth taking: the copy is made on the second call that sees the same (address,
// shape, dtype, layout, version), i.e. for weights that stay put; a weight changed between calls (training: the optimizer's in-place step bumps the version)
// never gets a copy, so training pays one lookup a call and holds no memory here.
//
// Bounds: weights of at most kMaxBytes (above that packing is a small share of a call, and a memcmp from L3
// would cost about what packing does), kMaxEntries entries (least recently used evicted): at most
// 8 x (1 MB copy + 1 MB panels). FASTRNN_CPU_WEIGHT_CACHE=0 turns it off (read at each call).
// One cache per capability library and math type (each copy packs to its own vector width).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clone.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "gemm.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability

inline bool panel_cache_enabled() {
  const char* env = std::getenv("FASTRNN_CPU_WEIGHT_CACHE");
  return env == nullptr || std::string(env) != "0";
}

// How many HiddenGemm constructions of this process took their panels from the cache (the tests' proof that
// it is used; torch.ops.fastrnn_cpu.panel_cache_hits()).
inline std::atomic<int64_t>& panel_cache_hit_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline int64_t panel_cache_hits() { return panel_cache_hit_count().load(); }

// Whether the n bytes at a and b are equal: the cache's check of a weight against its copy. From
// kParallelCompareBytes each of torch's threads compares its share (the two reads come from L2 or L3, where one
// core's stream is the limit). Module forward, 2 threads, B = 1, medians of 600 calls alternated with the
// serial memcmp (Zen 5, AVX-512 copy, e94b6bc's code with the split switchable, 2026-12-03, us): GRU H=256
// T=2 (W_ih and W_hh 768 KB each) 92 -> 75, RNN H=512 T=2 (1 MB each) 113 -> 90, LSTM H=256 T=4 127-140 ->
// 111-121, LSTM (50,1,64,128) (W_hh 256 KB) 139-140 -> 134-136; from 64 KB the weights of 64-192 KB gained
// 0-1.5 us of 40-90, hence the threshold.
inline bool bytes_equal(const void* a, const void* b, size_t n) {
  constexpr size_t kParallelCompareBytes = 256 * 1024, kChunk = 64 * 1024;
  if (n < kParallelCompareBytes || at::get_num_threads() == 1 || at::in_parallel_region()) {
    return std::memcmp(a, b, n) == 0;
  }
  std::atomic<bool> equal{true};
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  at::parallel_for(0, static_cast<int64_t>((n + kChunk - 1) / kChunk), 1, [&](int64_t begin, int64_t end) {
    const size_t lo = begin * kChunk, hi = std::min(n, static_cast<size_t>(end) * kChunk);
    if (equal.load(std::memory_order_relaxed) && std::memcmp(pa + lo, pb + lo, hi - lo) != 0) {
      equal.store(false, std::memory_order_relaxed);
    }
  });
  return equal.load();
}

template <typename acc_t>
class PanelCache {
 public:
  static constexpr int64_t kMaxBytes = 1 << 20;
  static constexpr size_t kMaxEntries = 8;

  // Whether the panels of `weight` can be kept across calls (else get() packs at every call).
  static bool keeps(const at::Tensor& weight) {
    return weight.defined() && weight.is_contiguous() && weight.nbytes() <= static_cast<size_t>(kMaxBytes) &&
           weight.nbytes() > 0 && panel_cache_enabled();
  }

  // The panels of `weight` (the op's w_hh argument, contiguous, in its storage dtype) packed by pack();
  // layout: what distinguishes two packings of the same weight (groups, forward/backward, bf16 pairs).
  template <typename Pack>
  static Panels<acc_t> get(const at::Tensor& weight, int64_t layout, const Pack& pack) {
    if (!keeps(weight)) {
      return pack();
    }
    static PanelCache cache;
    return cache.lookup(weight, layout, pack);
  }

 private:
  struct Entry {
    const void* data;
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
    int64_t layout;
    int64_t version;
    uint64_t last_use;
    at::Tensor copy;  // the weight's bytes when `panels` were built; undefined: no panels kept
    Panels<acc_t> panels;
  };

  static int64_t version_of(const at::Tensor& w) {
    return w.is_inference() ? -1 : static_cast<int64_t>(w._version());  // inference tensors have no counter
  }

  template <typename Pack>
  Panels<acc_t> lookup(const at::Tensor& weight, int64_t layout, const Pack& pack) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const void* data = weight.const_data_ptr();
    const int64_t version = version_of(weight);
    ++clock_;
    Entry* entry = nullptr;
    for (Entry& e : entries_) {
      if (e.data == data && e.layout == layout && e.dtype == weight.scalar_type() && weight.sizes() == e.sizes) {
        entry = &e;
        break;
      }
    }
    if (entry != nullptr && entry->copy.defined() &&
        bytes_equal(entry->copy.const_data_ptr(), data, weight.nbytes())) {
      entry->last_use = clock_;
      panel_cache_hit_count().fetch_add(1, std::memory_order_relaxed);
      return entry->panels;
    }
    if (entry == nullptr) {
      if (entries_.size() >= kMaxEntries) {
        auto oldest = entries_.begin();
        for (auto it = entries_.begin(); it != entries_.end(); ++it) {
          oldest = it->last_use < oldest->last_use ? it : oldest;
        }
        entries_.erase(oldest);
      }
      entries_.push_back(Entry{data, weight.sizes().vec(), weight.scalar_type(), layout, version, clock_, {}, {}});
      entry = &entries_.back();
      return pack();
    }
    // Seen before but not reusable: keep a copy (and the panels) only if the version says the weight stays.
    Panels<acc_t> panels = pack();
    const bool steady = entry->version == version;
    entry->version = version;
    entry->last_use = clock_;
    entry->copy = steady ? weight.clone() : at::Tensor();
    entry->panels = steady ? panels : Panels<acc_t>();
    return panels;
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
