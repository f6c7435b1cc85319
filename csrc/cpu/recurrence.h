// The recurrence skeleton shared by the CPU kernels of every cell (lstm.cpp, gru.cpp, rnn.cpp): input
// checks, the step order and the active-step rule, storage <-> math type conversion, the vectorised
// pointwise loop and the per-step hidden GEMM into preallocated buffers.
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
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "vec_math.h"

namespace fastrnn {
namespace cpu {

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
};

// ---------------------------------------------------------------------------------------------------
// Step order and the active-step rule (docs/contract.md, "Semantics shared by all cells").

// The time index of the s-th processed step of the forward recurrence.
inline int64_t fwd_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }
// The time index of the s-th processed step of the backward recurrence (the forward order reversed).
inline int64_t bwd_time(int64_t s, int64_t T, bool reverse) { return reverse ? s : T - 1 - s; }

inline bool active(const int64_t* lengths, int64_t t, int64_t b) { return lengths == nullptr || t < lengths[b]; }

// ---------------------------------------------------------------------------------------------------
// Loads and stores of one value V (acc_t, or a Vectorized<acc_t> of consecutive elements) from storage S.

template <typename V, typename S>
inline V load(const S* p) {
  if constexpr (std::is_arithmetic_v<V>) {
    return static_cast<V>(*p);
  } else if constexpr (std::is_same_v<S, typename V::value_type>) {
    return V::loadu(p);
  } else {
    V out;
    at::vec::load_to_float(p, out);  // fp16/bf16 -> float, V::size() elements
    return out;
  }
}

template <typename V, typename S>
inline void store(S* p, const V& v) {
  if constexpr (std::is_arithmetic_v<V>) {
    *p = static_cast<S>(v);
  } else if constexpr (std::is_same_v<S, typename V::value_type>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, V::size());
  }
}

// Calls fn(V{}, j) for j in [j0, j1): with V = Vectorized<acc_t> on whole vectors, then V = acc_t on the
// tail, so a cell's pointwise code is one generic lambda.
template <typename acc_t, typename F>
inline void vec_loop(int64_t j0, int64_t j1, const F& fn) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t j = j0;
  for (; j + Vec::size() <= j1; j += Vec::size()) {
    fn(Vec(), j);
  }
  for (; j < j1; ++j) {
    fn(acc_t(), j);
  }
}

// The pointwise part of a step: fn(b, j0, j1) for every row b in [0, B) and block [j0, j1) of the H
// units, split over torch's intra-op threads when there is enough work. cost: rough cycles per unit.
// A parallel region costs ~2-5 us to fork and join on this 2-core machine, so a step smaller than
// kMinParallelCycles (~10 us of work) stays on one thread.
constexpr int64_t kUnitBlock = 64;  // a multiple of every Vectorized size, so only the last block has a tail
constexpr int64_t kMinParallelCycles = 24000;

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
  });
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

// ---------------------------------------------------------------------------------------------------
// The hidden GEMM of one step, C[M, N] (=|+=) A[M, K] @ R[K, N], all acc_t, into preallocated buffers.
// R is fixed for the whole call (W_hh^T forward, W_hh backward); A and C are the caller's state/scratch
// tensors, the same at every step, so a step allocates nothing.
//
// Two ways, chosen once per call by size: at::mm_out/addmm_out (MKL; best once a product is large enough
// to hide its ~5-15 us of per-call overhead) and gemm.h's register-blocked kernel straight on the pointers
// (no dispatch at all; R is made contiguous once per call for it). kSmallGemmMacs is where the two cross
// (measured on 2 threads, docs/cpu.md). FASTRNN_CPU_GEMM=aten|small forces one (benchmarks and tests).

constexpr int64_t kSmallGemmMacs = int64_t(1) << 20;

enum class GemmPath { kAuto, kAten, kSmall };

inline GemmPath gemm_path_override() {
  const char* env = std::getenv("FASTRNN_CPU_GEMM");
  if (env == nullptr || std::string(env) == "auto" || std::string(env).empty()) {
    return GemmPath::kAuto;
  }
  if (std::string(env) == "aten") {
    return GemmPath::kAten;
  }
  TORCH_CHECK(std::string(env) == "small", "FASTRNN_CPU_GEMM must be auto, aten or small, got '", env, "'");
  return GemmPath::kSmall;
}

template <typename acc_t>
class StepGemm {
 public:
  // r: [K, N] in the math type, any strides (a transposed view of W_hh is fine); m: the rows of A and C.
  StepGemm(const at::Tensor& r, int64_t m) : m_(m), k_(r.size(0)), n_(r.size(1)) {
    const GemmPath path = gemm_path_override();
    small_ = path == GemmPath::kSmall || (path == GemmPath::kAuto && m_ * k_ * n_ <= kSmallGemmMacs);
    r_ = small_ ? r.contiguous() : r;
  }

  // c = a @ r
  void operator()(const at::Tensor& a, at::Tensor& c) const { run(a, c, false); }
  // c += a @ r
  void accumulate(const at::Tensor& a, at::Tensor& c) const { run(a, c, true); }

 private:
  void run(const at::Tensor& a, at::Tensor& c, bool accumulate) const {
    if (!small_) {
      if (accumulate) {
        at::addmm_out(c, c, a, r_);
      } else {
        at::mm_out(c, a, r_);
      }
      return;
    }
    // a [M, K] and c [M, N] are the kernels' contiguous buffers. Columns are split over the threads in
    // chunks of 64 (a multiple of every tile width); a chunk is M*K*64 multiply-adds, and a parallel region
    // is only worth it above kMinParallelCycles of work (~8 multiply-adds a cycle on one core).
    constexpr int64_t chunk = 64;
    const acc_t* a_p = a.const_data_ptr<acc_t>();
    const acc_t* r_p = r_.const_data_ptr<acc_t>();
    acc_t* c_p = c.data_ptr<acc_t>();
    const int64_t chunks = (n_ + chunk - 1) / chunk;
    const int64_t grain = std::max<int64_t>(1, kMinParallelCycles * 8 / std::max<int64_t>(1, m_ * k_ * chunk));
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      gemm_columns(a_p, k_, r_p, n_, c_p, n_, m_, k_, begin * chunk, std::min(n_, end * chunk), accumulate);
    });
  }

  int64_t m_, k_, n_;
  bool small_;
  at::Tensor r_;
};

// After a step whose new state (or recurrent gradient) went to `fresh`: the rows active at step t take it,
// the others keep `state`. Without lengths every row is active and the buffers are just swapped.
template <typename acc_t>
inline void take_active_rows(at::Tensor& state, at::Tensor& fresh, const int64_t* len, int64_t t) {
  if (len == nullptr) {
    std::swap(state, fresh);
    return;
  }
  const int64_t B = state.size(0), n = state.size(1);
  const acc_t* src = fresh.const_data_ptr<acc_t>();
  acc_t* dst = state.data_ptr<acc_t>();
  for (const auto b : c10::irange(B)) {
    if (active(len, t, b)) {
      copy_row<acc_t>(row(dst, b, n), row(src, b, n), n);
    }
  }
}

}  // namespace cpu
}  // namespace fastrnn
