// The recurrence skeleton shared by the CPU kernels of every cell (lstm.cpp, gru.cpp, rnn.cpp): input
// checks, the step order and the active-step rule, storage <-> math type conversion, the vectorised
// pointwise loop, the per-step hidden product (HiddenGemm) and the forward and backward loops.
//
// Legend: T steps, B batch, H hidden, Hout = proj_size or H, G gates (LSTM 4, GRU 3, RNN 1),
// N = G*H (columns of one step's hidden GEMM), K its inner size (Hout forward; G*H backward).
// scalar_t: the storage type (float, double, Half, BFloat16); acc_t = at::opmath_type<scalar_t>: the math
// type (float for fp32/fp16/bf16, double for fp64). States, weights and GEMM operands are acc_t.
#pragma once

// Only the ATen headers used (not ATen/ATen.h, which declares every op: ~2x the compile time per file).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "gemm.h"
#include "memory.h"
#include "panel_cache.h"
#include "vec_math.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability

// ---------------------------------------------------------------------------------------------------
// Input checks: every message names the op and the argument.

struct Checker {
  const char* op;

  void tensor(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Tensor& like) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
                " (the dtype of the first argument), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }

  void dims(const at::Tensor& t, const char* name, int64_t ndim) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
  }

  void floating(const at::Tensor& t, const char* name) const {
    const auto s = t.scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                " must be float32, float64, float16 or bfloat16, got ", s);
  }

  // lengths: None or int64 [B] on the CPU with values in [0, T]. Returns the data pointer or nullptr.
  const int64_t* lengths(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) const {
    if (!lengths.has_value()) {
      return nullptr;
    }
    const at::Tensor& l = *lengths;
    TORCH_CHECK(l.device().is_cpu(), op, ": lengths must be on the CPU like the other tensors, got ", l.device());
    TORCH_CHECK(l.scalar_type() == at::kLong, op, ": lengths must be int64, got ", l.scalar_type());
    TORCH_CHECK(l.dim() == 1 && l.size(0) == B, op, ": lengths must have shape [", B, "], got ", l.sizes());
    TORCH_CHECK(l.is_contiguous(), op, ": lengths must be contiguous");
    const int64_t* p = l.const_data_ptr<int64_t>();
    for (const auto b : c10::irange(B)) {
      TORCH_CHECK(p[b] >= 0 && p[b] <= T, op, ": lengths[", b, "] = ", p[b], " is outside [0, T = ", T, "]");
    }
    return p;
  }

  // resets: None or bool [T, B] on the CPU (docs/contract.md). Returns the data pointer or nullptr.
  const bool* resets(const std::optional<at::Tensor>& resets, int64_t T, int64_t B) const {
    if (!resets.has_value()) {
      return nullptr;
    }
    const at::Tensor& r = *resets;
    TORCH_CHECK(r.device().is_cpu(), op, ": resets must be on the CPU like the other tensors, got ", r.device());
    TORCH_CHECK(r.scalar_type() == at::kBool, op, ": resets must be bool, got ", r.scalar_type());
    TORCH_CHECK(r.dim() == 2 && r.size(0) == T && r.size(1) == B, op, ": resets must have shape [", T, ", ", B,
                "], got ", r.sizes());
    TORCH_CHECK(r.is_contiguous(), op, ": resets must be contiguous");
    return r.const_data_ptr<bool>();
  }
};

// ---------------------------------------------------------------------------------------------------
// Step order and the active-step rule (docs/contract.md, "Semantics shared by all cells").

// The time index of the s-th processed step of the forward recurrence.
inline int64_t fwd_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }
// The time index of the s-th processed step of the backward recurrence (the forward order reversed).
inline int64_t bwd_time(int64_t s, int64_t T, bool reverse) { return reverse ? s : T - 1 - s; }

inline bool active(const int64_t* lengths, int64_t t, int64_t b) { return lengths == nullptr || t < lengths[b]; }

// Rows [0, n) hold every row active at step t: 1 + the last active row (all B without lengths). The modules
// pass a PackedSequence's rows sorted by decreasing length, so there n is exactly the rows still running and
// the step product skips the finished ones (their cells carry the state and never read it).
inline int64_t active_rows(const int64_t* lengths, int64_t t, int64_t B) {
  int64_t n = B;
  while (lengths != nullptr && n > 0 && lengths[n - 1] <= t) {
    --n;
  }
  return n;
}

// Whether step t of sequence b starts from a zero state (resets[t, b], [T, B] row-major). Asked only at
// active steps: an inactive step carries the state whatever the mask says.
inline bool resets_at(const bool* resets, int64_t t, int64_t B, int64_t b) {
  return resets != nullptr && resets[t * B + b];
}

// ---------------------------------------------------------------------------------------------------
// Loads and stores of one value V (acc_t, or a Vectorized<acc_t> of consecutive elements) from storage S.

template <typename V, typename S>
inline V load(const S* p) {
  if constexpr (std::is_arithmetic_v<V>) {
    return static_cast<V>(*p);
  } else if constexpr (cells::IsPair<V>::value) {
    using Vec = decltype(V::lo);
    return V(load<Vec>(p), load<Vec>(p + Vec::size()));
  } else if constexpr (std::is_same_v<S, typename V::value_type>) {
    return V::loadu(p);
  } else {
    V out;
    at::vec::load_to_float(p, out);  // fp16/bf16 -> float, V::size() elements
    return out;
  }
}

// The width of a streaming store of V in this copy (store_stream), 0 where it has none.
template <typename V>
constexpr int64_t stream_store_bytes() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return V::size() * 4;
  }
#endif
  return 0;
}

// Orders this thread's streaming stores (store_stream) before its later stores, such as its arrival at a
// barrier, so that the thread that passes the barrier after it reads them (x86: sfence).
inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

template <typename V, typename S>
inline void store(S* p, const V& v) {
  if constexpr (std::is_arithmetic_v<V>) {
    *p = static_cast<S>(v);
  } else if constexpr (cells::IsPair<V>::value) {
    store(p, v.lo);
    store(p + v.lo.size(), v.hi);
  } else if constexpr (std::is_same_v<S, typename V::value_type>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, V::size());
  }
}

// store() with a non-temporal (streaming) store where it can: a whole fp32 vector of the AVX-512 or AVX2 copy at
// an address aligned to its width; a plain store otherwise. For the write-only streams of a large op (the saved
// gates, dgx): tens of MB that no cache keeps until they are read again, so a plain store first reads every line
// in (a read for ownership) and evicts the packed panels of W_hh from L2. The writing thread must call
// stream_fence() before another thread may read what it wrote (blocks_range and for_rows_units do).
template <typename V, typename S>
inline void store_stream(S* p, const V& v) {
  if constexpr (cells::IsPair<V>::value) {
    store_stream(p, v.lo);
    store_stream(p + v.lo.size(), v.hi);
  } else if constexpr (std::is_same_v<S, float> && stream_store_bytes<V>() > 0) {
    if (reinterpret_cast<uintptr_t>(p) % stream_store_bytes<V>() != 0) {
      store(p, v);
      return;
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
    _mm256_stream_ps(p, v);
#endif
  } else {
    store(p, v);
  }
}

// How many op outputs of this copy were written with streaming stores (streamed): torch.ops.fastrnn_cpu.
// streamed_outputs().
inline std::atomic<int64_t>& streamed_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline int64_t streamed_outputs() { return streamed_count().load(); }

// Whether an op writes its fp32 output `out` with store_stream (only outputs nothing reads within the op: the
// forward's saved gates, the backward's dgx): from kStreamMinBytes, where `out` would pass through every cache
// level on its way to memory and be read back from memory anyway. Below, the reader (the backward, the layer's
// GEMMs) finds it in a cache, and streaming lost: module forward+backward, Intel Xeon with AMX, 2 threads, all
// outputs streamed against none, ms, p10: (200,8,128,128) LSTM 6.69 vs 6.12, GRU 5.67 vs 4.99; (100,32,256,256)
// LSTM 34.2 vs 33.8, GRU 26.9 vs 25.5. Above it the forward's saved gates and the backward's dgx: (100,64,512,512)
// LSTM 244 vs 255, GRU 189 vs 205 (the ops alone: LSTM forward with saved gates 518-528 against 589-599 us a
// step, without them 517; backward 526 vs 609; GRU backward 465-482 vs 584-626). FASTRNN_CPU_STREAM=always|never
// forces it either way (tests, benchmarks), read at each call.
// The LSTM and GRU forwards write y with the saved outputs' choice: y is read after the op too (the next layer,
// the weight gradient's GEMM, the GRU's backward), but a plain store of it costs the step a read for ownership
// and L2 room as the saved outputs' did, and streaming it too measured faster. Module forward+backward at
// (100,64,512,512), y plain -> streamed, medians of calls alternated in one process (2026-12-04, Intel Xeon with
// AMX): GRU 245 -> 237, 247 -> 242, 227 -> 221 ms; LSTM 316 -> 307, 311 -> 303. Not the RNN's y, which its
// backward reads at every step (80.0 -> 83.8 there).
// In inference (nothing saved) the LSTM's and GRU's y streams from kStreamMinBytesInference: its only reader is
// after the op (the next layer, the caller), and module forwards, streamed against plain, alternated call by
// call (Intel Xeon with AMX, 2 threads, 2026-12-04, ms p10, never -> always) gained from y = 3.3 MB: GRU / LSTM
// (100,32,256,256) 9.67 -> 9.50 / 13.82 -> 13.56; (100,64,256,256) 20.60 -> 20.06 / 30.45 -> 29.05;
// (100,64,512,512) 68.4 -> 66.7, 70.1 -> 69.5 / 99.0 -> 93.9, 102.3 -> 97.7; 2 layers there (the second layer's
// projection reads y) 139.8 -> 138.5 / 203.0 -> 194.3; (200,64,512,512) 146.7 -> 142.1 / 198.8 -> 193.2; at y =
// 0.8-1.6 MB within noise either way ((200,8,128,128) GRU 1.90 -> 1.97, (100,16,256,256), (100,32,128,128),
// (100,8,512,512)). The RNN's op cannot tell inference from training (its backward reads y), so its y never streams.
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;
constexpr int64_t kStreamMinBytesInference = int64_t{2} << 20;
inline bool streamed(const at::Tensor& out, int64_t min_bytes = kStreamMinBytes) {
  const char* env = std::getenv("FASTRNN_CPU_STREAM");
  const std::string v = env == nullptr ? "" : env;
  TORCH_CHECK(v.empty() || v == "always" || v == "never", "FASTRNN_CPU_STREAM must be always or never, got '", v,
              "'");
  const bool stream = stream_store_bytes<at::vec::Vectorized<float>>() > 0 && out.scalar_type() == at::kFloat &&
                      out.numel() > 0 &&
                      (v.empty() ? static_cast<int64_t>(out.nbytes()) >= min_bytes : v == "always");
  if (stream) {
    streamed_count().fetch_add(1, std::memory_order_relaxed);
  }
  return stream;
}

// store_stream where `stream`, else store.
template <typename V, typename S>
inline void store_maybe_streamed(S* p, const V& v, bool stream) {
  if (stream) {
    store_stream(p, v);
  } else {
    store(p, v);
  }
}

// The values v_0, v_1, ... of unit j into a gate-major row: dst[k * H + j] = v_k (gates, their gradients),
// with store_stream where `stream`.
template <typename S, typename... V>
inline void store_gates(S* dst, int64_t H, int64_t j, bool stream, const V&... v) {
  int64_t k = 0;
  (store_maybe_streamed(dst + (k++) * H + j, v, stream), ...);
}

// Calls fn(V{}, j) for j in [j0, j1): in the AVX-512 copy with V = a Pair of Vectorized<acc_t> on two vectors
// at a time (vec_math.h: two independent chains of the cell math side by side), then V = Vectorized<acc_t> on
// whole vectors, then V = acc_t on the tail, so a cell's pointwise code is one generic lambda. Forward ops, Intel
// Xeon with AMX, AVX-512 copy, 2 threads, us a step, single vectors -> pairs: LSTM B=1, H=128 2.22 -> 2.05, B=8
// 7.67 -> 5.79; RNN B=8, H=128 2.50 -> 2.28; GRU B=32, H=256 (1 thread) 89.1 -> 76.3. The backward cells
// (products of saved gates) within +-4% (LSTM B=8 9.2 -> 9.5-9.6 with or without pairs in its cell: not them).
// Pairs only with 512-bit vectors, whose 32 registers hold both chains: in the AVX2 copy (16 registers) on the
// same Xeon they measured -2% to +4% a step (RNN B=8, H=128 2.68 -> 2.79 us).
template <typename acc_t, typename F>
inline void vec_loop(int64_t j0, int64_t j1, const F& fn) {
  using Vec = at::vec::Vectorized<acc_t>;
  using Two = cells::Pair<Vec>;
  int64_t j = j0;
  if constexpr (Vec::size() * sizeof(acc_t) == 64) {
    for (; j + Two::size() <= j1; j += Two::size()) {
      fn(Two(), j);
    }
  }
  for (; j + Vec::size() <= j1; j += Vec::size()) {
    fn(Vec(), j);
  }
  for (; j < j1; ++j) {
    fn(acc_t(), j);
  }
}

// The pointwise part of a step: fn(b, j0, j1) for every row b in [0, B) and block [j0, j1) of the H
// units, split over torch's intra-op threads when there is enough work. cost: rough cycles per unit.
// A parallel region costs ~1.0-1.4 us (~3000-4000 cycles) to fork and join on this 2-core machine when
// it is idle (an empty at::parallel_for, 20000 calls), and much more when another process holds a core
// (the OpenMP threads spin-wait for each other). A chunk of work is therefore worth a thread of its own
// from about one fork/join's worth of cycles: kMinParallelCycles. Measured on the ops (interleaved runs,
// medians): at B=1, H=128 this grain instead of 24000 takes the LSTM forward from 280 to 237 us and the
// GRU forward from 284 to 255 (the step's W_hh then streams from both cores' L2); B=8 and up and the
// RNN were unchanged; 2000 made the RNN at B=1 slower (77 -> 107 us).
constexpr int64_t kUnitBlock = 64;  // a multiple of every Vectorized size, so only the last block has a tail
constexpr int64_t kMinParallelCycles = 4000;

template <typename F>
inline void for_rows_units(int64_t B, int64_t H, int64_t cost, const F& fn) {
  const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
  const int64_t block_cost = std::max<int64_t>(1, std::min(H, kUnitBlock) * cost);
  const int64_t grain = std::max<int64_t>(1, kMinParallelCycles / block_cost);
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks;
      const int64_t j0 = (i % blocks) * kUnitBlock;
      fn(b, j0, std::min(H, j0 + kUnitBlock));
    }
    stream_fence();  // fn may have used store_stream
  });
}

// Software prefetch of the [T, B, n] streams a cell reads once (forward gx; backward the saved gates, c and
// dy), kPrefetchRows rows ahead of the row the cell works on. Those rows are in no cache (gx of a large layer
// is tens of MB, written by the input projection; the saved gates were written by the forward), and a cell
// touches 2 lines per gate of a row at a 4H stride, a pattern the hardware prefetchers do not follow: the
// LSTM forward cell then waited on its first gx load for ~40% of its time (perf, Intel Xeon family 6 model
// 167, 1 thread, B=64, H=512). Prefetching rows b + 2, + 4 or + 8 measured the same there (1 thread, CPU
// time, fastest of 7: 1651 -> 1447-1453 us a step); prefetching the written streams too (for ownership) was
// slower (1489-1501). The rows of one block of units are handled one after another by one thread (fused
// path) or a few blocks apart (for_rows_units), so 4 rows ahead is a few hundred ns of cell work.
constexpr int64_t kPrefetchRows = 4;

// Prefetches units [j0, j1) of the `count` gate segments (H apart) of row b + kPrefetchRows of one step of
// a [T, B, n] stream (step: its row 0), when that row exists.
template <typename S>
inline void prefetch_row_ahead(const S* step, int64_t b, int64_t B, int64_t n, int64_t count, int64_t H, int64_t j0,
                               int64_t j1) {
  if (b + kPrefetchRows >= B) {
    return;
  }
  const S* p = step + (b + kPrefetchRows) * n;
  for (int64_t k = 0; k < count; ++k) {
    const auto end = reinterpret_cast<uintptr_t>(p + k * H + j1);
    for (auto line = reinterpret_cast<uintptr_t>(p + k * H + j0) & ~uintptr_t(63); line < end; line += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(line));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Buffers.

// acc_t tensor options for scratch buffers.
template <typename acc_t>
inline at::TensorOptions acc_options() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value).device(at::kCPU);
}

// t in the math type, contiguous (no copy when it already is): for read-only operands.
template <typename acc_t>
inline at::Tensor to_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// A fresh contiguous copy of t in the math type: for states the kernel overwrites.
template <typename acc_t>
inline at::Tensor acc_copy(const at::Tensor& t) {
  return t.to(acc_options<acc_t>(), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

// The forwards' optional b_gx [G] (docs/contract.md: added to gx_t in the cell) in the math type, and zeros
// without one, so that every cell adds it the same way (x + 0 is x). The modules pass the input bias here
// instead of into the projection's GEMM, which then skips its pass writing the bias into all of Gx.
template <typename acc_t>
inline at::Tensor input_bias(const std::optional<at::Tensor>& b_gx, int64_t G) {
  return b_gx.has_value() ? to_acc<acc_t>(*b_gx) : at::zeros({G}, acc_options<acc_t>());
}

// Row b of a [B, n] buffer / of step t of a [T, B, n] tensor (int64 offsets: T*B*n can pass 2^31).
template <typename P>
inline P* row(P* base, int64_t b, int64_t n) {
  return base + b * n;
}
template <typename P>
inline P* row(P* base, int64_t t, int64_t B, int64_t b, int64_t n) {
  return base + (t * B + b) * n;
}

// dst[0, n) = src[0, n) converted, vectorised.
template <typename acc_t, typename D, typename S>
inline void copy_row(D* dst, const S* src, int64_t n) {
  vec_loop<acc_t>(0, n, [&](auto v, int64_t j) {
    using V = decltype(v);
    store(dst + j, load<V>(src + j));
  });
}

template <typename acc_t, typename D>
inline void zero_row(D* dst, int64_t n) {
  vec_loop<acc_t>(0, n, [&](auto v, int64_t j) {
    using V = decltype(v);
    store(dst + j, V(0));
  });
}

// The rows b of the [B, n] states (acc_t tensors) that step t enters from a zero state (active at t and
// resets[t, b]) set to 0, so the step's product reads h_{t-1} = 0 and its cell c_{t-1} = 0 there. Only
// such a row is cleared, and step t overwrites it, so the carried state is lost nowhere else. One bool
// read a row and step (on one thread, where the step's threads already meet: forward_loop's `enter`);
// nothing at all without a mask.
template <typename acc_t, typename... States>
void zero_reset_rows(const bool* resets, const int64_t* lengths, int64_t t, int64_t B, States&... states) {
  if (resets == nullptr) {
    return;
  }
  for (const auto b : c10::irange(B)) {
    if (resets[t * B + b] && active(lengths, t, b)) {
      (zero_row<acc_t>(row(states.template data_ptr<acc_t>(), b, states.size(1)), states.size(1)), ...);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The hidden product of one step, C[B, N] = A[B, K] @ R[K, N] in acc_t, R fixed for the whole call
// (W_hh^T forward, W_hh backward, W_hr^T / W_hr with a projection), A and C the caller's buffers, the
// same at every step, so a step allocates nothing.
//
// Two ways, chosen once per call: the packed panels of gemm.h (no dispatch, and the recurrence loops
// below fuse them with the cell update), and a library GEMM: fastrnn_cpu::linear (oneDNN for fp32 where
// torch has it, else MKL; since 2026-12-02: on the Zen 5, 2 threads, it took the LSTM backward at B=64,
// H=512 from 972 to 537 us a step and the RNN forward from 225 to 122 against MKL, B=32, H=256 1.1-1.4x).
// The measurements below (Zen 3) compared the packed path with MKL. Single-threaded on this machine (Zen 3,
// min of 200 runs) the packed tile does 18 GMAC/s at [1,128]x[128,512] where MKL does 9 (its per-call
// overhead) and 42 vs 23 at B=8. From B=32 up, the choice was measured on whole steps (2 threads,
// interleaved runs, us a step, packed with the K-sliced order of by_blocks vs MKL + a separate cell pass):
// products of several gate groups (the LSTM and GRU forward) are faster packed and fused: LSTM B=64,
// H=512 1368 vs 1447, B=32, H=256 208 vs 242; GRU 1016 vs 1140 and 163 vs 204. Products of one group at
// that batch (the RNN forward; every backward, K = G*H) are as fast or faster with MKL: RNN forward
// B=64, H=512 371 vs 341; backward LSTM B=64, H=512 1534 vs 1287, GRU 1325 vs 986, RNN 339 vs 291 and at
// B=32, H=256 82 vs 57. So: packed for several groups, or when A [B, K] fits L1 (small batch, where the
// MKL call's overhead dominates: LSTM backward at B=8, H=128 takes 26 us packed, 37 with MKL).
// A third, for a call of few rows x steps whose W_hh the panel cache does not keep: W_hh read where it lies,
// tile by tile like the packed panels, so also fused with the cell (HiddenGemm): in the forward by dot
// products on its rows (gemm.h dot_rows, "the dot path"), in the backward as panel rows of stride H (the
// packed tile on W_hh itself, "the strided path"). FASTRNN_CPU_GEMM=aten|packed|in_place forces one
// (benchmarks and tests; in_place where W_hh allows it, the packed panels elsewhere).

constexpr int64_t kL1Bytes = 32 * 1024;

enum class GemmPath { kAuto, kAten, kPacked, kInPlace };

inline GemmPath gemm_path_override() {
  const char* env = std::getenv("FASTRNN_CPU_GEMM");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") {
    return GemmPath::kAuto;
  }
  if (v == "aten") {
    return GemmPath::kAten;
  }
  if (v == "in_place") {
    return GemmPath::kInPlace;
  }
  TORCH_CHECK(v == "packed", "FASTRNN_CPU_GEMM must be auto, aten, packed or in_place, got '", v, "'");
  return GemmPath::kPacked;
}

// A barrier for the threads of one OpenMP team: the last to arrive runs `completion` (every other thread
// is then done with what came before and none has gone past) and bumps the generation the others spin on
// (acquire/release: every write before the barrier, the completion's included, is visible after it). After a
// while of spinning a waiter yields its core, so a thread descheduled by another process is not raced
// against forever.
class SpinBarrier {
 public:
  template <typename F>
  void wait(int64_t team, const F& completion) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      completion();
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 4096) {
        std::this_thread::yield();
      }
    }
  }

 private:
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// Rough cycles per multiply-add of a packed tile on one core (~50% of the 16 fp32 FMA lanes a cycle).
constexpr int64_t kMacsPerCycle = 8;

// bf16 weights on the avx512_bf16 dot product (gemm.h): used for bf16 storage when this copy has it
// (AVX-512), the CPU runs it and FASTRNN_CPU_BF16_DOT is not 0 (read at each call, like FASTRNN_CPU_GEMM).
inline bool bf16_dot_allowed() {
#ifdef FASTRNN_BF16_DOT
  const char* env = std::getenv("FASTRNN_CPU_BF16_DOT");
  return bf16_dot_supported() && (env == nullptr || std::string(env) != "0");
#else
  return false;
#endif
}

inline std::atomic<int64_t>& bf16_dot_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

// In the Kernels table (kernels.h): -1 where this copy cannot use the bf16 dot product on this CPU, else how
// many step products of this process were built on it (the tests' proof that the path is taken).
inline int64_t bf16_dot_products() {
#ifdef FASTRNN_BF16_DOT
  if (bf16_dot_supported()) {
    return bf16_dot_count().load();
  }
#endif
  return -1;
}

// The bf16 pair panels on AMX (gemm.h, bf16_amx_rows) instead of the vdpbf16ps tile: where torch's oneDNN
// micro-kernel runs bf16 on AMX and the batch is at least kAmxMinRows. FASTRNN_CPU_BF16_AMX=0 turns it off,
// =1 takes it at any batch (benchmarks and tests); read at each call. Measured (Intel Xeon with AMX, "family 6
// model 167" as its VM reports it, 2 threads, ops, us a step, vdpbf16ps / AMX, fastest of 15, load ~5.8,
// bench/cpu_bf16_steps.py --amx): B=2, H=128 0.68-0.99x (AMX slower: it computes 16 rows whatever the
// batch, and each call costs the kernel lookup); B=4 0.86-1.16x at H=128, 1.15-1.57x at H=256; B=8, H=128
// 0.94-1.33x (LSTM 9.2 -> 6.9 fwd); B=32, H=256 2.8-6x; B=64, H=512 2.2-4.5x (1 thread: LSTM forward
// 1909 -> 618 us, backward 1832 -> 412). One thread: B=1 0.73-1.06x, B=4 1.2-1.7x.
constexpr int64_t kAmxMinRows = 8;

inline bool bf16_amx_allowed(int64_t rows) {
#ifdef FASTRNN_BF16_DOT
  const char* env = std::getenv("FASTRNN_CPU_BF16_AMX");
  const std::string v = env == nullptr ? "" : env;
  TORCH_CHECK(v.empty() || v == "0" || v == "1", "FASTRNN_CPU_BF16_AMX must be 0 or 1, got '", v, "'");
  return bf16_amx_supported() && v != "0" && (v == "1" || rows >= kAmxMinRows);
#else
  return false;
#endif
}

inline std::atomic<int64_t>& bf16_amx_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

// In the Kernels table: -1 where this copy cannot run the bf16 step products on AMX on this CPU, else how
// many step products of this process ran on AMX.
inline int64_t bf16_amx_products() {
#ifdef FASTRNN_BF16_DOT
  if (bf16_amx_supported()) {
    return bf16_amx_count().load();
  }
#endif
  return -1;
}

// How many HiddenGemm constructions of this copy took the library path (fastrnn_cpu::linear) rather than the
// packed panels: the tests' proof of which path a call takes (torch.ops.fastrnn_cpu.library_products()).
inline std::atomic<int64_t>& library_product_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline int64_t library_products() { return library_product_count().load(); }

// The same for the products on W_hh where it lies (the dot and the strided paths):
// torch.ops.fastrnn_cpu.in_place_products().
inline std::atomic<int64_t>& in_place_product_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline int64_t in_place_products() { return in_place_product_count().load(); }

// And of the recurrences (HiddenGemm::run_steps) that split their rows among the threads:
// torch.ops.fastrnn_cpu.row_split_recurrences().
inline std::atomic<int64_t>& row_split_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
inline int64_t row_split_recurrences() { return row_split_count().load(); }

template <typename acc_t>
class HiddenGemm {
 public:
  static constexpr int64_t P = panel_width<acc_t>();

  // A call that makes fewer products than this with a weight the panel cache does not keep (over 1 MB) and
  // that the library GEMM takes where it lies (the forward's W_hh^T) runs the library path: packing is a
  // transpose of the whole weight at every call, and a short call does not earn it back. Measured (Zen 5,
  // AVX-512 copy, ad328ef's kernels, ops alone, FASTRNN_CPU_GEMM=packed / aten alternating, medians, 2
  // threads, us), forward at T = 1 / 4 / 8 / 16: GRU H=512 (W_hh 3 MB) B=1 210/57, 265/194, 320/373,
  // 455/746; B=64 467/362, 1298/1396, 2855/3176, 6089/7205; LSTM H=512 B=8 668/227, 894/755, 1462/1687,
  // 1774/3012; H=1024 (16 MB) B=8 4265/950, 4390/2535, 5795/5576, 7312/11148; over 12 (cell, H, B) rows the
  // library took 0.13-0.93x the packed time at T <= 2, 0.33-1.08x at T = 4, 0.46-1.27x at T = 8 (1 thread:
  // the same picture; docs/cpu.md, "Short calls").
  static constexpr int64_t kMinStepsToPack = 8;

  // A weight the panel cache does not keep, multiplied where it lies (r = W_hh^T, the forward), takes the dot
  // path (gemm.h, dot_rows) for calls of at most kMaxDotRowSteps rows x steps, up to kMaxDotRows rows: packing
  // costs a pass over the weight at every call, which the packed tile's faster steps earn back only over many
  // rows x steps. Forward op, 2 threads, Intel Xeon (family 6 model 167, AVX-512 copy), us, dot / packed /
  // library (GRU H=512: W_hh 3 MB): B=1 T=1 30 / 385 / 47, T=16 248 / 633 / 624, T=64 971 / 1484 / 2483; B=8
  // T=16 920 / 1164 / 1388, T=32 1817 / 1897, T=128 7228 / 6418; B=32 T=8 1679 / 1745 / 2387; B=64 T=4 1654 /
  // 1687 / 1769, T=8 3284 / 2988; B=128 T=1 817 / 1038 / 743. LSTM H=512 (4 MB) B=8 T=32 3093 / 2956, B=16 T=8
  // 1373 / 1579 / 2531; GRU H=300 (1.08 MB) B=8 T=32 895 / 793, B=16 T=8 427 / 446 / 530; LSTM H=1024 (16 MB)
  // B=16 T=8 4753 / 5703 / 8072. The packed tile's steps beat the dot path's from ~160-450 rows x steps.
  // bf16 weights the packed path would multiply as bf16 pairs (avx512_bf16 / AMX: half the bytes, twice the
  // multiply-adds an instruction) only up to kMaxDotRowStepsBf16 (the dot path runs on their fp32 copy). GRU
  // H=512 bf16, same machine, dot / bf16 pairs: B=1 T=32 646 / 758; B=8 T=4 336 / 503, T=8 593 / 577, T=32 1968
  // / 1030; B=32 T=4 939 / 639.
  static constexpr int64_t kMaxDotRowSteps = 256, kMaxDotRowStepsBf16 = 64, kMaxDotRows = 64;
  // The backward's product da W_hh reads W_hh [G*H, H] as it lies as panel rows of stride H (the strided path:
  // the packed tile on W_hh itself, where H is a multiple of the panel width) for calls of at most
  // kMaxStridedSteps steps and one register tile of rows: a panel row is then 128 B every 2 KB (H = 512), which
  // the prefetchers stream at about a third of the packed panels' rate, and rows of another tile would read the
  // same lines again (2 KB apart they share L1 sets). Backward op, Intel Xeon, AVX-512 copy, 2 threads, us,
  // strided / packed: GRU H=512 B=1 T=1 75 / 309, T=16 905 / 604; B=8 T=1 115 / 366, T=16 1585 / 1233; LSTM
  // H=512 B=1 T=1 106 / 441; over GRU and LSTM H=512, B=1-8 (bench/cpu_short_calls.py --ops) T=2 0.64-0.81 of
  // the packed time, T=3 0.84-0.97, T=4 0.89-1.09.
  static constexpr int64_t kMaxStridedSteps = 3;
  static bool strided_wins(int64_t rows, int64_t steps) {
    return rows <= tile_rows<acc_t>() && steps <= kMaxStridedSteps;
  }
  static bool dot_wins(int64_t rows, int64_t steps, bool bf16_pairs) {
    const int64_t most = bf16_pairs ? kMaxDotRowStepsBf16 : kMaxDotRowSteps;
    return rows <= kMaxDotRows && steps <= most / std::max<int64_t>(rows, 1);
  }

  // r: [K, groups * width] in acc_t, any strides; rows: the rows of A and C (the batch); weight: the op's
  // argument r was made from, in the dtype it came in (bf16: the packed path may run on bf16 pairs, see
  // bf16_dot_allowed), whose packed panels are kept across calls (panel_cache.h); undefined: fp32, no cache;
  // steps: how many products this call makes with r (a recurrence's T; small_linear and W_hr: not given).
  HiddenGemm(const at::Tensor& r, int64_t groups, int64_t rows, const at::Tensor& weight = at::Tensor(),
             int64_t steps = INT64_MAX)
      : rows_(rows), groups_(groups), n_(r.size(1)), k_(r.size(0)) {
    const at::ScalarType storage = weight.defined() ? weight.scalar_type() : at::kFloat;
    const GemmPath path = gemm_path_override();
    const int64_t K = r.size(0), bytes = static_cast<int64_t>(sizeof(acc_t));
    // With 512-bit vectors (the AVX-512 copy) the packed path wins at every batch measured, one group
    // included (Zen 5, 2 threads, us a step, packed vs fastrnn_cpu::linear on oneDNN): backward LSTM B=32,
    // H=256 53 vs 96, B=64, H=512 613 vs 913, B=128, H=256 273 vs 273; GRU 50 vs 86, 1017 vs 1201; RNN
    // forward B=32, H=256 15 vs 33, B=128, H=256 54 vs 74. The AVX2 copy on the same CPU still loses at
    // B=64, H=512 (LSTM backward 2124 vs 1113, RNN forward 217 vs 174), hence the rule below for it.
    const bool wide = at::vec::Vectorized<acc_t>::size() * bytes == 64;
    // r = W_hh^T with W_hh contiguous (the forward's) / r = W_hh contiguous (the backward's); not kept packed.
    const bool transposed = r.t().is_contiguous(), uncached = !PanelCache<acc_t>::keeps(weight);
    const bool short_call = steps < kMinStepsToPack && transposed && uncached;
    const bool packed_wins = !short_call && (wide || groups > 1 || rows * K * bytes < kL1Bytes);
    const bool auto_path = path == GemmPath::kAuto;
#ifdef FASTRNN_BF16_DOT
    const bool bf16_pairs = std::is_same_v<acc_t, float> && storage == at::kBFloat16 && bf16_dot_allowed();
#else
    const bool bf16_pairs = false;
#endif
    dot_ = transposed && (path == GemmPath::kInPlace || (auto_path && uncached && dot_wins(rows, steps, bf16_pairs)));
    // (A width that is not a multiple of P would have the last row's last block read past the weight.)
    strided_ = !dot_ && r.is_contiguous() && groups == 1 && r.size(1) % P == 0 && !bf16_pairs &&
               (path == GemmPath::kInPlace || (auto_path && uncached && strided_wins(rows, steps)));
    packed_ = !dot_ && !strided_ &&
              (path == GemmPath::kPacked || path == GemmPath::kInPlace || (auto_path && packed_wins));
    if (dot_ || strided_) {
      w_ = dot_ ? r.t() : r;
      panels_ = Panels<acc_t>(K, groups, r.size(1) / groups);
      in_place_product_count().fetch_add(1, std::memory_order_relaxed);
      return;
    }
#ifdef FASTRNN_BF16_DOT
    if constexpr (std::is_same_v<acc_t, float>) {
      bf16_ = packed_ && bf16_pairs;
      if (bf16_) {
        panels_ = PanelCache<acc_t>::get(weight, cache_layout(r, groups, true),
                                         [&] { return bf16_pair_panels(r, groups); });  // exact: r holds bf16 values
        amx_ = bf16_amx_allowed(rows);
        (amx_ ? bf16_amx_count() : bf16_dot_count()).fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
#endif
    if (packed_) {
      panels_ = PanelCache<acc_t>::get(weight, cache_layout(r, groups, false),
                                       [&] { return Panels<acc_t>(r, groups); });
    } else {
      w_ = r.t().contiguous();  // [N, K]: the weight layout of fastrnn_cpu::linear, made once per call
      library_product_count().fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Whether the product runs tile by tile in by_blocks (the packed panels, the dot or the strided path), so
  // that the recurrence loops can fuse it with the cell; else the library GEMM (product()).
  bool tiled() const { return packed_ || dot_ || strided_; }
  bool bf16() const { return bf16_; }

  // What tells two packings of one weight apart in the cache: the view of it packed (forward: W^T, stride(0)
  // 1; backward: W), the groups and the bf16 pairs.
  static int64_t cache_layout(const at::Tensor& r, int64_t groups, bool bf16_pairs) {
    return groups * 4 + (r.stride(0) == 1 ? 2 : 0) + (bf16_pairs ? 1 : 0);
  }
  int64_t blocks() const { return panels_.blocks; }

  // For every (chunk of <= kChunkRows rows, block of P columns of each group): the product of those rows
  // and columns of every group into tiles[g * kChunkRows * P + m * P + (j - j0)], then
  // fn(m0, mr, j0, j1, tiles, kChunkRows * P) with [m0, m0 + mr) the chunk's rows and [j0, j1) the
  // block's columns within a group. a == nullptr: no product (fn alone). Column blocks are split over the
  // threads; a thread owns its columns for every row and group. cost: rough cycles per (row, column) of
  // fn, to size the parallel grain. Packed path only.
  //
  // Loop order: K is taken in slices of kSliceK, whose kSliceK x P panel slice (16 KB) stays in L1 while
  // the register tiles (4 rows, 8 for fp32 on AVX-512) of up to sub_rows rows multiply it; sub_rows shrinks
  // with the number of groups so that those rows' slice of A stays in L1 across the groups too. On the Intel
  // Xeon (family 6 model 167, 1 thread, LSTM forward B=64, H=512) sub_rows 8-64 and kSliceK 32-512 all
  // measured within noise of each other (1144-1237 us a step). The first version took each 4-row tile
  // through the whole K x P panel of every group in turn, streaming every panel from L2 again for every
  // 4 rows; against it (2 threads, interleaved runs, us a step) this order takes the LSTM forward at
  // B=64, H=512 from 1638 to 1368, at B=32, H=256 from 247 to 208, the RNN forward at B=32, H=256 from
  // 107 to 58 and at B=64, H=512 from 710 to 371.
  static constexpr int64_t kChunkRows = 64;
  static constexpr int64_t kSliceK = 16 * 1024 / (P * static_cast<int64_t>(sizeof(acc_t)));

  // product_rows: the product is needed for rows [0, product_rows) only (fn still sees every row).
  template <typename F>
  void by_blocks(const acc_t* a, int64_t cost, const F& fn, int64_t product_rows = INT64_MAX) const {
    at::parallel_for(0, panels_.blocks, grain(a != nullptr, cost),
                     [&](int64_t begin, int64_t end) { blocks_range(a, product_rows, begin, end, 0, rows_, fn); });
  }

  // A whole recurrence: for s in [0, steps), by_blocks(a_of(s), cost, fn(s, ...), rows_of(s)), then
  // serial(s) on one thread once every thread is done with step s, before step s + 1 starts. a_of(s) ==
  // nullptr: no product at that step. The threads split the column blocks, or the rows (row_split_threads,
  // below). A short step (under kMaxPersistentStepCycles) runs all steps in ONE parallel region, each thread
  // keeping the same column blocks or rows at every step (its panels stay in its own caches) and the threads
  // meeting at a spinning barrier once a step (~0.1 us with 2 threads; the last to arrive runs serial(s)
  // before it lets the others go, where there were two barriers around serial(s) on thread 0) instead of a
  // fork and join (~1.0-1.4 us). Measured (ops, interleaved runs, one region against a region a step): GRU
  // at B=1, H=128 forward 272 vs 416 us, backward 273 vs 409; RNN at B=8, H=128 backward 697 vs 1327; equal
  // within noise at B=1 for LSTM and RNN and at B=8 for the LSTM. At the longer steps of B=32, H=256 the LSTM
  // forward ran 3-15% slower in one region (cause not pinned down; the fork/join is < 1% of such a step), so
  // long steps keep a region a step.
  static constexpr int64_t kMaxPersistentStepCycles = 256 * 1024;

  // Threads that split a recurrence's rows (the batch) among them, each taking every column block of its rows,
  // instead of the column blocks: 0 where the column blocks are split. The rows of a recurrence never meet (row b
  // of a step reads row b of the state), so split by rows a thread reads only the state it wrote itself, where
  // split by columns each thread reads at every step the other threads' shares of the state, just written in
  // their caches, and waits for them at the barrier. Each thread then streams all of W_hh a step instead of its
  // share, so only from kMinSplitRows rows a thread and for a W_hh of at most kMaxSplitBytes (one core's L2 holds
  // it). Ops, Intel Xeon with AMX, AVX-512 copy, 2 threads, us a step, columns / rows, forward and backward: B=8,
  // H=128 RNN 2.22 / 1.75, 2.46 / 1.84; GRU 4.26 / 4.19, 8.21 / 5.04; LSTM 5.67 / 5.67, 9.17 / 5.80; B=32, H=256
  // RNN 19.0 / 15.4, 20.1 / 14.7; GRU 44.5 / 41.5, 61.5 / 45.0; LSTM 59.1 / 56.0, 72.1 / 55.6; B=16, H=64 RNN
  // 1.96 / 1.30, LSTM 4.43 / 3.89, 6.83 / 3.56; B=64, H=512 RNN (W_hh 1 MB) 108 / 98, 121 / 99. Against: 2 rows a
  // thread (B=4, H=128) RNN 1.33 / 1.46, LSTM 3.38 / 4.67 forward; W_hh over 1 MB (B=64, H=512) GRU 327 / 355,
  // LSTM 457 / 504 forward, backward equal. FASTRNN_CPU_SPLIT=rows|columns forces one (rows: from 1 row a thread,
  // any W_hh; benchmarks and tests), read at each call.
  static constexpr int64_t kMinSplitRows = 4;
  static constexpr int64_t kMaxSplitBytes = 1 << 20;
  int64_t row_split_threads() const {
    const char* env = std::getenv("FASTRNN_CPU_SPLIT");
    const std::string v = env == nullptr ? "" : env;
    TORCH_CHECK(v.empty() || v == "rows" || v == "columns", "FASTRNN_CPU_SPLIT must be rows or columns, got '", v,
                "'");
    if (v == "columns" || at::in_parallel_region() ||
        (v.empty() && k_ * n_ * static_cast<int64_t>(sizeof(acc_t)) > kMaxSplitBytes)) {
      return 0;
    }
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), v == "rows" ? rows_ : rows_ / kMinSplitRows);
    return threads >= 2 ? threads : 0;
  }

  // one_region = false: a region a step whatever the step's length (serial is too heavy for one thread).
  template <typename A, typename R, typename F, typename S>
  void run_steps(int64_t steps, int64_t cost, bool one_region, const A& a_of, const R& rows_of, const F& fn,
                 const S& serial) const {
    const int64_t blocks = panels_.blocks, g = grain(true, cost), split = row_split_threads();
    const int64_t threads = split > 0 ? split : std::min<int64_t>(at::get_num_threads(), (blocks + g - 1) / g);
    if (split > 0) {
      row_split_count().fetch_add(1, std::memory_order_relaxed);
    }
    // Step s of the column blocks [begin, end) of rows [row0, row1).
    auto step = [&](int64_t s, int64_t begin, int64_t end, int64_t row0, int64_t row1) {
      blocks_range(a_of(s), rows_of(s), begin, end, row0, row1,
                   [&](int64_t m0, int64_t mr, int64_t j0, int64_t j1, const acc_t* tiles, int64_t gstride) {
                     fn(s, m0, mr, j0, j1, tiles, gstride);
                   });
    };
    // Thread t of n: its rows (split > 0: all column blocks) or its column blocks (all rows). Split by rows,
    // the rows with a product (rows_of(s): a PackedSequence's rows still running) are shared evenly, then the
    // rest (their cells only carry the state): an even split of all rows left the finished rows' thread idle.
    // rnn_fwd at T=100, B=64, H=512 (W_hh 1 MB: split by rows), lengths spread over [50, 100] (3/4 of the rows'
    // steps), Intel Xeon with AMX (AVX-512 copy), 2 threads, ms, with lengths / without: 10.4 / 11.6 at
    // 4347ef3, 9.1-9.5 / 11.3-12.0 at 42e6b98.
    auto share = [&](int64_t s, int64_t t, int64_t n) {
      if (split > 0) {
        const int64_t active = std::clamp<int64_t>(a_of(s) == nullptr ? 0 : rows_of(s), 0, rows_);
        step(s, 0, blocks, active * t / n, active * (t + 1) / n);
        if (active < rows_) {
          const int64_t rest = rows_ - active;
          step(s, 0, blocks, active + rest * t / n, active + rest * (t + 1) / n);
        }
      } else {
        step(s, blocks * t / n, blocks * (t + 1) / n, 0, rows_);
      }
    };
    if (!one_region || blocks * block_cycles(true, cost) > kMaxPersistentStepCycles) {
      for (int64_t s = 0; s < steps; ++s) {
        if (split > 0) {
          at::parallel_for(0, split, 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) {
              share(s, t, split);
            }
          });
        } else {
          by_blocks(a_of(s), cost, [&](auto... args) { fn(s, args...); }, rows_of(s));
        }
        serial(s);
      }
      return;
    }
#ifdef _OPENMP
    if (threads > 1 && !at::in_parallel_region()) {
      SpinBarrier barrier;
#pragma omp parallel num_threads(static_cast<int>(threads))
      {
        // The team may be smaller than asked for (nested regions, OMP_THREAD_LIMIT): split by its real size.
        const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t s = 0; s < steps; ++s) {
          share(s, tid, team);
          barrier.wait(team, [&] { serial(s); });  // on the last thread to finish step s
        }
      }
      return;
    }
#endif
    for (int64_t s = 0; s < steps; ++s) {
      step(s, 0, blocks, 0, rows_);
      serial(s);
    }
  }

  // c = a @ r (a [rows, K], c [rows, N] contiguous).
  void product(const at::Tensor& a, at::Tensor& c) const {
    if (!tiled()) {
      // Through fastrnn_cpu::linear (csrc/cpu/linear.cpp, registered by the op library; found through the
      // dispatcher because this copy is a library of its own): oneDNN for fp32 where torch has it, MKL
      // otherwise. oneDNN against MKL on one step's product, 2 threads, Zen 5 (bench/cpu_gemm.py):
      // [64,512]x[512,2048] 41 vs 6 GFLOP/s p50, [32,256]x[256,1024] 166 vs 102.
      static const auto linear = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("fastrnn_cpu::linear", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                       const std::optional<at::Tensor>&)>();
      c.copy_(linear.call(a, w_, std::nullopt));
      return;
    }
    const int64_t width = panels_.width;
    acc_t* c_p = c.data_ptr<acc_t>();
    by_blocks(a.const_data_ptr<acc_t>(), 0, [&](int64_t m0, int64_t mr, int64_t j0, int64_t j1, const acc_t* tiles,
                                                 int64_t gstride) {
      for (int64_t g = 0; g < groups_; ++g) {
        for (int64_t m = 0; m < mr; ++m) {
          std::copy(tiles + g * gstride + m * P, tiles + g * gstride + m * P + (j1 - j0),
                    c_p + (m0 + m) * n_ + g * width + j0);
        }
      }
    });
  }

 private:
  // Rough cycles of one column block of a step: the product (if any) and fn.
  int64_t block_cycles(bool product, int64_t cost) const {
    return std::max<int64_t>(1, rows_ * P * ((product ? panels_.K * groups_ / kMacsPerCycle : 0) + cost));
  }

  // Column blocks per parallel chunk: a chunk is worth a thread from kMinParallelCycles of work.
  int64_t grain(bool product, int64_t cost) const {
    return std::max<int64_t>(1, kMinParallelCycles / block_cycles(product, cost));
  }

  // by_blocks' work for the column blocks [begin, end) of rows [row0, row1), on the calling thread: the fp32/fp64
  // tile, or on bf16 pairs the avx512_bf16 tile, with a rounded to bf16 first (all of it, once per thread and step:
  // B*K values, e.g. 32K at B=64, K=512, where the whole bf16 step takes 640-800 us on one core:
  // bench/cpu_bf16_steps.py).
  template <typename F>
  void blocks_range(const acc_t* a, int64_t product_rows, int64_t begin, int64_t end, int64_t row0, int64_t row1,
                    const F& fn) const {
    blocks_range_unfenced(a, product_rows, begin, end, row0, row1, fn);
    stream_fence();  // fn may have used store_stream
  }

  template <typename F>
  void blocks_range_unfenced(const acc_t* a, int64_t product_rows, int64_t begin, int64_t end, int64_t row0,
                             int64_t row1, const F& fn) const {
    const int64_t rows = a == nullptr ? 0 : product_rows;  // rows with a product (tiles)
#ifdef FASTRNN_BF16_DOT
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf16_) {
        const int64_t pairs = panels_.K;  // (k_ + 1) / 2
        const uint32_t* a2 = a == nullptr ? nullptr : bf16_pairs(a);
        if (amx_) {
          // One kernel call a (chunk of rows, group, column block), over the whole K: AMX tiles 16 rows.
          tiles(
              rows, begin, end, row0, row1, fn,
              [&](int64_t m, int64_t k0, int64_t kc, const float* slice, int64_t, int64_t mr, float* out,
                  bool accumulate) {
                bf16_amx_rows(a2 + m * pairs + k0, pairs, slice, kc, mr, out, accumulate);
              },
              /*height=*/kChunkRows, /*slice_k=*/panels_.K);
          bf16_amx_release();
          return;
        }
        tiles(rows, begin, end, row0, row1, fn,
              [&](int64_t m, int64_t k0, int64_t kc, const float* slice, int64_t, int64_t mr, float* out,
                  bool accumulate) { bf16_pair_rows(a2 + m * pairs + k0, pairs, slice, kc, mr, out, accumulate); });
        return;
      }
    }
#endif
    if (dot_) {
      // One call a (tile of rows, group, column block), over the whole K: w_'s rows [g * width + j0, + cols).
      tiles(
          rows, begin, end, row0, row1, fn,
          [&](int64_t m, int64_t k0, int64_t kc, const acc_t* w, int64_t cols, int64_t mr, acc_t* out,
              bool accumulate) { dot_rows(a + m * k_ + k0, k_, w, k_, kc, cols, mr, out, accumulate); },
          /*height=*/kDotTileRows, /*slice_k=*/k_);
      return;
    }
    const int64_t ldp = strided_ ? n_ : P;  // the strided path's panels are W_hh's rows
    tiles(rows, begin, end, row0, row1, fn,
          [&](int64_t m, int64_t k0, int64_t kc, const acc_t* slice, int64_t, int64_t mr, acc_t* out,
              bool accumulate) { panel_rows(a + m * k_ + k0, k_, slice, ldp, kc, mr, out, accumulate); });
  }

  // a [rows, K] fp32 -> bf16 rows of (K + 1) / 2 32-bit pairs (an odd K padded with 0), in a buffer of the
  // calling thread.
  const uint32_t* bf16_pairs(const acc_t* a) const {
    thread_local std::vector<uint32_t> buffer;
    const int64_t pairs = (k_ + 1) / 2;
    buffer.resize(rows_ * pairs);
    for (int64_t b = 0; b < rows_; ++b) {
      auto* dst = reinterpret_cast<c10::BFloat16*>(buffer.data() + b * pairs);
      copy_row<acc_t>(dst, a + b * k_, k_);
      if (k_ % 2 != 0) {
        dst[k_] = c10::BFloat16(0.0f);
      }
    }
    return buffer.data();
  }

  // The loop nest of blocks_range over panel rows (a panel row: one k of fp32/fp64, one pair of bf16) for rows
  // [row0, row1), the product for rows [0, product_rows) only (0: no product), fn for every row;
  // tile(m, k0, kc, slice, cols, mr, out, accumulate) multiplies rows [m, m + mr) of A by panel rows [k0, k0 +
  // kc) of the block's `cols` columns, mr <= height (by default the register tile's: 8 for fp32 in the AVX-512
  // copy, gemm.h panel_tile_zmm, else 4, bf16 pairs too), kc <= slice_k; slice points at the panel's row k0,
  // on the dot path at W_hh's row of the block's first column (at k0), on the strided path at W_hh[k0, j0].
  template <typename F, typename Tile>
  void tiles(int64_t product_rows, int64_t begin, int64_t end, int64_t row0, int64_t row1, const F& fn,
             const Tile& tile, int64_t height = 0, int64_t slice_k = kSliceK) const {
    const int64_t K = panels_.K, width = panels_.width;
    const int64_t tile_height = height > 0 ? height : (bf16_ ? 4 : tile_rows<acc_t>());
    const int64_t sub_rows = std::max<int64_t>(tile_height, kChunkRows / groups_ / tile_height * tile_height);
    alignas(64) acc_t buffer[4 * kChunkRows * P];  // [groups <= 4][rows <= kChunkRows][P]: 16 KB
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * P, j1 = std::min(width, j0 + P);
      for (int64_t m0 = row0; m0 < row1; m0 += kChunkRows) {
        const int64_t mr = std::min(kChunkRows, row1 - m0);
        const int64_t mp = std::clamp<int64_t>(product_rows - m0, 0, mr);  // rows of this chunk with a product
        for (int64_t r0 = 0; r0 < mp; r0 += sub_rows) {
          const int64_t r1 = std::min(mp, r0 + sub_rows);
          for (int64_t k0 = 0; k0 < K; k0 += slice_k) {
            const int64_t kc = std::min(slice_k, K - k0);
            for (int64_t g = 0; g < groups_; ++g) {
              const acc_t* slice = dot_       ? w_.const_data_ptr<acc_t>() + (g * width + j0) * K + k0
                                   : strided_ ? w_.const_data_ptr<acc_t>() + k0 * n_ + g * width + j0
                                              : panels_.panel(g, blk) + k0 * P;
              for (int64_t m = r0; m < r1; m += tile_height) {
                const int64_t rows = std::min<int64_t>(tile_height, r1 - m);
                tile(m0 + m, k0, kc, slice, j1 - j0, rows, buffer + (g * kChunkRows + m) * P,
                     /*accumulate=*/k0 > 0);
              }
            }
          }
        }
        fn(m0, mr, j0, j1, static_cast<const acc_t*>(buffer), kChunkRows * P);
      }
    }
  }

  int64_t rows_, groups_, n_, k_;
  bool packed_;
  bool dot_ = false;      // the dot path: W_hh's rows (w_) times A's, panels_ its shape alone
  bool strided_ = false;  // the strided path: W_hh (w_) read as panel rows of stride n_, panels_ its shape alone
  bool bf16_ = false;
  bool amx_ = false;  // bf16_ on AMX
  at::Tensor w_;  // W_hh where it lies: [N, K] for the library and dot paths (r^T), [K, N] for the strided one (r)
  Panels<acc_t> panels_;
};

// ---------------------------------------------------------------------------------------------------
// The recurrence loops, written once for every cell. A cell supplies its pointwise step as a lambda over
// one row b and a block [j0, j1) of units (csrc/cpu/{lstm,gru,rnn}.cpp).
//
// Forward, step t (in processing order): hid = h_{t-1} W_hh^T, then
//   cell(t, b, j0, j1, hid_b, gstride), hid_b[g * gstride + j - j0] = hid[b, g*H + j],
// which reads the state `x` (what the product multiplies: h_{t-1}) and writes the next state; after(t)
// then makes the next state current (a buffer swap, or the projection). With packed weights and
// fuse = true, a step is ONE parallel region: each thread computes its block of units for every gate and
// applies the cell to it straight from L1 (no [B, G*H] buffer, no second region for the gates); so the
// cell must write only its own units of the next state and leave `x` alone (double buffering). When
// after(t) is only a buffer swap (swap_only), short steps run in one parallel region (run_steps) with after
// on one thread between barriers; a heavier after (the projection's product) keeps a region a step, so it
// runs on every thread.
// Otherwise: the product into `hid` [B, G*H] (MKL or packed), then the cell over (b, unit block).
// enter(t) runs on one thread before the product of step t, after(t - 1) and with every thread past step
// t - 1: the resets (zero_reset_rows clears the state rows that start step t from zero), so a reset costs
// no pass of its own and no change to the product or the cell.

template <typename acc_t, typename Enter, typename Cell, typename After>
void forward_loop(const HiddenGemm<acc_t>& gemm, bool fuse, bool swap_only, const at::Tensor& x, at::Tensor& hid,
                  const int64_t* len, int64_t T, int64_t B, int64_t H, bool reverse, int64_t cost, const Enter& enter,
                  const Cell& cell, const After& after) {
  const int64_t GH = hid.size(1);
  if (fuse && gemm.tiled()) {
    auto fused_cell = [&](int64_t s, int64_t m0, int64_t mr, int64_t j0, int64_t j1, const acc_t* tiles,
                          int64_t gstride) {
      for (int64_t m = 0; m < mr; ++m) {
        cell(fwd_time(s, T, reverse), m0 + m, j0, j1, tiles + m * HiddenGemm<acc_t>::P, gstride);
      }
    };
    enter(fwd_time(0, T, reverse));
    gemm.run_steps(
        T, cost, /*one_region=*/swap_only, [&](int64_t) { return x.const_data_ptr<acc_t>(); },  // x: swapped by after
        [&](int64_t s) { return active_rows(len, fwd_time(s, T, reverse), B); }, fused_cell, [&](int64_t s) {
          after(fwd_time(s, T, reverse));
          if (s + 1 < T) {
            enter(fwd_time(s + 1, T, reverse));
          }
        });
    return;
  }
  for (const auto s : c10::irange(T)) {
    const int64_t t = fwd_time(s, T, reverse);
    enter(t);
    gemm.product(x, hid);
    const acc_t* hid_p = hid.const_data_ptr<acc_t>();
    for_rows_units(B, H, cost, [&](int64_t b, int64_t j0, int64_t j1) { cell(t, b, j0, j1, hid_p + b * GH + j0, H); });
    after(t);
  }
}

// Backward, step t (in backward processing order): cell(t, b, j0, j1, da_b) reads the recurrent gradient
// dh [B, Hout] (into h_t) and writes the pre-activation gradients of its units into da_b, row b of `da`
// [B, G*H] (zero at an inactive step); then dh for the step before t is, on the rows active at t,
// da W_hh (+ direct[b], the part that skips W_hh: GRU's dh z, written by the cell), and unchanged on the
// others.
// With packed weights and fuse = true, the product of step t and the cell of the next step share ONE
// parallel region: the thread that computes dh's units [j0, j1) applies the next cell to the same units
// right away (da is double-buffered: the cell writes `da` while the product reads the previous step's).
// before(t) runs first at each step (the projection's dm = dh W_hr); fuse requires that it does nothing.
// Across a reset at t (resets[t, b], active) no gradient reaches the previous state: dh of that row is 0
// instead (the cell zeroes its own carried gradient, LSTM's dc, and reads h_{t-1} / c_{t-1} as 0).

template <typename acc_t, typename Cell, typename Before>
void backward_loop(const HiddenGemm<acc_t>& gemm, bool fuse, at::Tensor& dh, at::Tensor& da, at::Tensor& da_prev,
                   at::Tensor& prod, const at::Tensor& direct, const int64_t* len, const bool* rst, int64_t T,
                   int64_t B, int64_t H, bool reverse, int64_t cost, const Cell& cell, const Before& before) {
  const int64_t K = dh.size(1), GH = da.size(1);  // columns of dh (Hout) and of da (G*H)
  acc_t* dh_p = dh.data_ptr<acc_t>();
  const acc_t* direct_p = direct.defined() ? direct.const_data_ptr<acc_t>() : nullptr;
  // dh[b, j0:j1) = src[0:j1-j0) (+ direct[b, j0:j1)) for a row active at t; 0 across a reset at t.
  auto take = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, const acc_t* src) {
    acc_t* dst = row(dh_p, b, K) + j0;
    if (resets_at(rst, t, B, b)) {
      zero_row<acc_t>(dst, j1 - j0);
      return;
    }
    if (direct_p == nullptr) {
      std::copy(src, src + (j1 - j0), dst);
      return;
    }
    const acc_t* d = row(direct_p, b, K) + j0;
    vec_loop<acc_t>(0, j1 - j0, [&](auto v, int64_t j) {
      using V = decltype(v);
      store(dst + j, load<V>(src + j) + load<V>(d + j));
    });
  };
  if (fuse && gemm.tiled()) {
    // Step s takes the product of step s-1's gradients (da_prev) and runs the cell of step s into da.
    std::swap(da, da_prev);
    acc_t* da_p = da.data_ptr<acc_t>();
    gemm.run_steps(
        T + 1, cost, /*one_region=*/true, [&](int64_t s) { return s > 0 ? da_prev.const_data_ptr<acc_t>() : nullptr; },
        [&](int64_t s) { return s > 0 ? active_rows(len, bwd_time(s - 1, T, reverse), B) : 0; },
        [&](int64_t s, int64_t m0, int64_t mr, int64_t j0, int64_t j1, const acc_t* tiles, int64_t) {
          const int64_t t_done = s > 0 ? bwd_time(s - 1, T, reverse) : 0;  // the step whose product this is
          for (int64_t m = 0; m < mr; ++m) {
            if (s > 0 && active(len, t_done, m0 + m)) {
              take(t_done, m0 + m, j0, j1, tiles + m * HiddenGemm<acc_t>::P);
            }
            if (s < T) {
              cell(bwd_time(s, T, reverse), m0 + m, j0, j1, row(da_p, m0 + m, GH));
            }
          }
        },
        [&](int64_t) {
          std::swap(da, da_prev);
          da_p = da.data_ptr<acc_t>();
        });
    return;
  }
  for (const auto s : c10::irange(T)) {
    const int64_t t = bwd_time(s, T, reverse);
    before(t);
    acc_t* da_p = da.data_ptr<acc_t>();
    for_rows_units(B, H, cost, [&](int64_t b, int64_t j0, int64_t j1) { cell(t, b, j0, j1, row(da_p, b, GH)); });
    gemm.product(da, prod);
    const acc_t* prod_p = prod.const_data_ptr<acc_t>();
    for (const auto b : c10::irange(B)) {
      if (active(len, t, b)) {
        take(t, b, 0, K, row(prod_p, b, K));
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
