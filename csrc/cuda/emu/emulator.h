// A host emulator of the CUDA features the kernels of csrc/cuda use, so that tests/test_cuda.py can run
// the very same kernel source on a machine without a GPU (compiled by the host C++ compiler, not nvcc).
// It checks what a compile cannot: indexing, masks, the inactive-step rules, the shared-memory carving,
// the ping-pong buffers and the grid-sync protocol of the persistent kernel. It says nothing about
// speed, and little about memory-model subtleties (OS threads and std::barrier are stronger than a GPU's
// weak ordering); a GPU run (`pytest -m gpu`) remains the real test.
//
// Model: all threads of a launch run at once (as a cooperative launch guarantees). Each block is one OS
// thread running its CUDA threads as fibers (ucontext), switched only at barriers: __syncthreads and warp
// shuffles are barriers among the fibers of a block (a shuffle is a 32-lane exchange between two of
// them), grid.sync() is a std::barrier among the blocks' OS threads. Fibers rather than an OS thread
// per CUDA thread because every warp shuffle is a barrier: the emulated persistent tests took 156 s with
// OS threads and 36 s with fibers on the 2-core build machine. A kernel whose threads disagree on a barrier
// (a deadlock on a GPU) aborts with a message. 1-D grids and blocks only (all the kernels use),
// blockDim.x a multiple of 32.
//
// Legend: T steps, B batch, H hidden units (the names of csrc/cuda/cuda_api.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

// The CUDA headers define these as attributes that a host compiler ignores with warnings; here they
// mean nothing (or plain C++).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)

namespace fastrnn_emu {

// A barrier among `expected` fibers of one block: the last to arrive opens it (a new generation).
struct Barrier {
  explicit Barrier(int n) : expected(n) {}
  int expected, count = 0;
  unsigned generation = 0;
};

struct Context {
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim{}, grid_dim{};
};

struct Block;

struct Fiber {
  ucontext_t uc{};
  std::unique_ptr<char[]> stack;  // uninitialised: zero-filling 64 KiB per thread and launch costs more than the kernel
  Context ctx;
  Block* block = nullptr;
  bool done = false;
};

struct Block {
  Block(unsigned threads, size_t smem_bytes) : bar(int(threads)), smem((smem_bytes + 15) / 16 + 1) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(32);
    slots.resize(threads);
  }
  Barrier bar;                 // __syncthreads
  std::vector<Barrier> warps;  // shuffles, one per warp
  std::vector<uint64_t> slots; // shuffle exchange, one per thread
  std::vector<uint4> smem;     // 16-byte aligned, like __align__(16) shared memory
  int grid_count = 0;          // fibers of this block at grid.sync()
  unsigned grid_generation = 0;
  std::barrier<>* grid = nullptr;
  ucontext_t scheduler{};
  bool progress = false;       // something happened in this round of the scheduler
};

inline thread_local Fiber* current = nullptr;

inline void yield() { swapcontext(&current->uc, &current->block->scheduler); }

inline void wait(Barrier& b) {
  Block& blk = *current->block;
  blk.progress = true;
  const unsigned g = b.generation;
  if (++b.count == b.expected) {
    b.count = 0;
    ++b.generation;
    return;
  }
  while (b.generation == g) yield();
}

}  // namespace fastrnn_emu

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::fastrnn_emu::current->ctx.thread_idx)
#define blockIdx (::fastrnn_emu::current->ctx.block_idx)
#define blockDim (::fastrnn_emu::current->ctx.block_dim)
#define gridDim (::fastrnn_emu::current->ctx.grid_dim)

inline void __syncthreads() { fastrnn_emu::wait(fastrnn_emu::current->block->bar); }

template <typename V>
V __shfl_xor_sync(unsigned /*mask: all 32 lanes, as in the kernels*/, V v, int lane_mask) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  fastrnn_emu::Block& blk = *fastrnn_emu::current->block;
  const unsigned tid = threadIdx.x, warp_base = tid / 32 * 32;
  fastrnn_emu::Barrier& bar = blk.warps[tid / 32];
  std::memcpy(&blk.slots[tid], &v, sizeof(V));
  fastrnn_emu::wait(bar);
  V out;
  std::memcpy(&out, &blk.slots[warp_base + ((tid % 32) ^ unsigned(lane_mask))], sizeof(V));
  fastrnn_emu::wait(bar);  // nobody overwrites a slot before every lane has read
  return out;
}

namespace cooperative_groups {
struct grid_group {
  void sync() {
    fastrnn_emu::Block& blk = *fastrnn_emu::current->block;
    blk.progress = true;
    const unsigned g = blk.grid_generation;
    if (++blk.grid_count == int(blk.bar.expected)) {  // the block's last thread: meet the other blocks
      blk.grid_count = 0;
      blk.grid->arrive_and_wait();
      ++blk.grid_generation;
      return;
    }
    while (blk.grid_generation == g) fastrnn_emu::yield();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

namespace fastrnn {
namespace cuda {
inline unsigned char* dynamic_smem() {
  return reinterpret_cast<unsigned char*>(fastrnn_emu::current->block->smem.data());
}
}  // namespace cuda
}  // namespace fastrnn

namespace fastrnn_emu {

// Runs kernel(args...) on grid x block threads, all at once; returns when every thread has finished.
template <typename Kernel, typename... Args>
void launch(unsigned grid, unsigned block, size_t smem_bytes, Kernel kernel, Args... args) {
  if (grid == 0 || block == 0 || block % 32 != 0) throw std::invalid_argument("emulator: bad launch shape");
  std::tuple<Args...> packed(args...);
  std::function<void()> body = [&] { std::apply(kernel, packed); };
  static thread_local std::function<void()>* start = nullptr;
  std::barrier<> grid_bar(grid);

  auto run_block = [&](unsigned b) {
    Block blk(block, smem_bytes);
    blk.grid = &grid_bar;
    start = &body;
    std::vector<Fiber> fibers(block);
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      f.block = &blk;
      f.ctx.thread_idx = make_uint3(t, 0, 0);
      f.ctx.block_idx = make_uint3(b, 0, 0);
      f.ctx.block_dim = dim3(block);
      f.ctx.grid_dim = dim3(grid);
      constexpr size_t kStack = 64 * 1024;  // the kernels' frames are a few hundred bytes
      f.stack.reset(new char[kStack]);
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack.get();
      f.uc.uc_stack.ss_size = kStack;
      f.uc.uc_link = &blk.scheduler;
      makecontext(&f.uc, +[] {
        (*start)();
        current->done = true;
      }, 0);
    }
    for (unsigned live = block; live > 0;) {
      blk.progress = false;
      live = 0;
      for (Fiber& f : fibers) {
        if (f.done) continue;
        current = &f;
        swapcontext(&blk.scheduler, &f.uc);
        if (f.done) blk.progress = true;
        else ++live;
      }
      if (live > 0 && !blk.progress) {
        std::fprintf(stderr, "emulator: block %u deadlocked (threads wait at different barriers)\n", b);
        std::abort();
      }
    }
  };
  std::vector<std::thread> threads;
  for (unsigned b = 0; b < grid; ++b) threads.emplace_back(run_block, b);
  for (std::thread& th : threads) th.join();
}

}  // namespace fastrnn_emu
