// The output cache: the blocks of memory that the CPU ops' large outputs (2 MB and more: y, the saved gates,
// dgx, gx, dx; memory.h, empty_output) are made in, kept when their tensors die so that the next call of the
// same layer reuses them instead of mapping and faulting in fresh pages (docs/cpu.md, "Memory").
//
// A block is a multiple of 2 MB, aligned to 2 MB and advised onto huge pages once, when it is made. An output
// takes the smallest free block that holds it and is less than twice its size (the sizes of a training loop
// repeat exactly; a varying sequence length still finds a block; of equal ones the most recently freed), else a
// new one, made after the free blocks it outgrows (under its size, at least half of it) went back to the system.
// A freed block joins the free list; while the free blocks exceed the capacity, the longest-unused ones go back
// to the system. Blocks in use are not counted: the cache never holds more than the capacity beyond what
// live tensors use.
//
// Capacity: FASTRNN_CPU_OUTPUT_CACHE_MB (read at the first large output), default the smaller of 1 GB and an
// eighth of physical memory; 0 keeps nothing (each output is then made and freed as before the cache).
// fastrnn_cpu::empty_output_cache frees the free blocks (fastrnn.empty_cache()).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "memory.h"

namespace fastrnn {
namespace cpu {
namespace {

struct Block {
  void* data;
  size_t bytes;
};

class OutputCache;
OutputCache& the_output_cache();

size_t capacity_from_environment() {
  const char* env = std::getenv("FASTRNN_CPU_OUTPUT_CACHE_MB");
  if (env == nullptr || *env == '\0') {
    const long pages = sysconf(_SC_PHYS_PAGES), page_bytes = sysconf(_SC_PAGESIZE);
    const size_t physical = pages > 0 && page_bytes > 0 ? size_t(pages) * size_t(page_bytes) : 0;
    return std::min(size_t{1} << 30, physical / 8);
  }
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "FASTRNN_CPU_OUTPUT_CACHE_MB must be a whole number of MB (0: no output cache), got '", env, "'");
  return size_t(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = std::max(kHugePageBytes, (n + kHugePageBytes - 1) & ~(kHugePageBytes - 1));
    void* data = take(bytes);
    if (data == nullptr) {
      if (posix_memalign(&data, kHugePageBytes, bytes) != 0) {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "fastrnn: cannot allocate ", bytes, " bytes for an op's output");
      }
      advise_huge_pages(data, bytes);
    }
    // What torch's CPU allocator tells the profiler (the benchmark's peak memory counts outputs in use).
    c10::profiledCPUMemoryReporter().New(data, bytes);
    return {data, new Block{data, bytes}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // {hits, blocks made, free bytes kept, capacity}.
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {hits_, made_, int64_t(free_bytes_), int64_t(capacity())};
  }

  // fork() while another thread holds the mutex (a tensor dying on it) would leave the child's copy locked for
  // good: the forking thread holds it across the fork instead (pthread_atfork), and both sides release it.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

  // Frees every free block; returns their bytes.
  int64_t empty() {
    std::lock_guard<std::mutex> guard(mutex_);
    const size_t bytes = free_bytes_;
    shrink_to(0);
    return int64_t(bytes);
  }

 private:
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    c10::profiledCPUMemoryReporter().Delete(block->data);
    the_output_cache().give_back(*block);
    delete block;
  }

  size_t capacity() {  // under mutex_
    if (!capacity_known_) {
      capacity_ = capacity_from_environment();
      capacity_known_ = true;
    }
    return capacity_;
  }

  // The smallest free block of [bytes, 2 * bytes), the most recently freed of equal ones (the likeliest to be
  // still in the caches), taken off the free list; nullptr if none.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    capacity();  // a bad FASTRNN_CPU_OUTPUT_CACHE_MB is reported at the first large output
    auto best = free_.rend();
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes >= bytes && it->bytes < 2 * bytes && (best == free_.rend() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best == free_.rend()) {
      // A miss outgrows the free blocks of its size class (under it, at least half its size): they go back to the
      // system now, so that the new block is made of their pages, freed a moment ago. Kept, they would make a
      // sequence length that grows hold a block of every length seen, and the new block come from pages the
      // system has not had for long: on a VM that hands free pages to its host, a host fault each (a growing
      // T at (T,64,512,512) fwd+bwd kept 540 MB and had calls of 385-493 ms, 250-350 ms of them in page faults:
      // AMD EPYC Zen 5 guest, AVX-512 copy, 2 threads, 3cb4a98; docs/cpu.md, "A sequence length that varies").
      for (auto it = free_.begin(); it != free_.end();) {
        if (it->bytes < bytes && 2 * it->bytes >= bytes) {
          it = release_block(it);
        } else {
          ++it;
        }
      }
      ++made_;
      return nullptr;
    }
    void* data = best->data;
    free_bytes_ -= best->bytes;
    free_.erase(std::next(best).base());
    ++hits_;
    return data;
  }

  void give_back(const Block& block) {
    std::lock_guard<std::mutex> guard(mutex_);
    free_.push_back(block);
    free_bytes_ += block.bytes;
    shrink_to(capacity());
  }

  void shrink_to(size_t limit) {  // under mutex_; the longest-unused blocks first
    while (free_bytes_ > limit) {
      release_block(free_.begin());
    }
  }

  // Gives a free block back to the system (under mutex_); returns the next one.
  std::list<Block>::iterator release_block(std::list<Block>::iterator it) {
    std::free(it->data);
    free_bytes_ -= it->bytes;
    return free_.erase(it);
  }

  std::mutex mutex_;
  std::list<Block> free_;  // in the order they were freed
  size_t free_bytes_ = 0;
  size_t capacity_ = 0;
  bool capacity_known_ = false;
  int64_t hits_ = 0;
  int64_t made_ = 0;
};

// Never destroyed: a tensor may die during static destruction, after this library's statics are gone.
OutputCache& the_output_cache() {
  static OutputCache* cache = [] {
    auto* made = new OutputCache();
    pthread_atfork([] { the_output_cache().lock_for_fork(); }, [] { the_output_cache().unlock_after_fork(); },
                   [] { the_output_cache().unlock_after_fork(); });
    return made;
  }();
  return *cache;
}

std::vector<int64_t> output_cache_stats() { return the_output_cache().stats(); }
int64_t empty_output_cache() { return the_output_cache().empty(); }

// This library's own outputs (linear.cpp and the default copy) come from the cache from the start; dispatch.cpp
// hands it to each capability's copy it loads.
[[maybe_unused]] const bool installed = (output_allocator() = &the_output_cache(), true);

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) {
  m.def("output_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_output_cache() -> int", &empty_output_cache);
}

}  // namespace cpu
}  // namespace fastrnn
