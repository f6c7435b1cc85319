// The CPU kernels of one instruction-set capability, as a table of the six ops, and how a capability's
// code is kept apart from the others (docs/cpu.md, "ISA dispatch").
//
// Legend: a capability is the instruction set a copy of the kernels is compiled for, ATen's names:
//   default  portable x86-64 (SSE2) or any other CPU; at::vec emulates 256-bit vectors in plain loops
//   avx2     AVX2 + FMA + F16C; at::vec on 256-bit registers (8 floats)
//   avx512   AVX-512 F/BW/VL/DQ on top of avx2; at::vec on 512-bit registers (16 floats)
//
// One source, several copies: lstm.cpp, gru.cpp, rnn.cpp and small_linear.cpp (with recurrence.h, gemm.h,
// vec_math.h) are compiled once per capability by kernels_<capability>.cpp, with that capability's compiler flags and
// -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (plus CPU_CAPABILITY_AVX2/AVX512, which select at::vec's
// implementation, as in ATen's own build). Everything those files define sits in
// `namespace fastrnn::cpu::CPU_CAPABILITY` (and at::vec in `at::vec::CPU_CAPABILITY`), so no two copies
// share a symbol. The vector width is a compile-time parameter of that one source (Vectorized<float>::size()).
// fma_peak.cpp, the benchmark's FMA-peak loop, is compiled into each copy the same way.
//
// The default copy is linked into the op library itself (fastrnn._C / libfastrnn_ops.so), which is
// compiled with no ISA flag at all. The avx2 and avx512 copies are separate shared libraries
// (fastrnn/_C_avx2*.so, _C_avx512*.so; CMake: libfastrnn_cpu_avx2.so, ...) built with
// -fvisibility=hidden that export only their table function; dispatch.cpp loads the best one the CPU
// supports with dlopen(RTLD_LOCAL) when the kernels are first needed. So no AVX-512 instruction can run
// on a CPU without it: not an inline function's copy picked by the linker (the copies live in another
// library, and hidden), not a static initialiser (that library is never loaded there).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "memory.h"

namespace fastrnn {
namespace cpu {

using LstmFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool,
    const std::optional<at::Tensor>&);
using LstmBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool);
using GruFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&,
                                                                  const std::optional<at::Tensor>&, bool, bool,
                                                                  const std::optional<at::Tensor>&);
using GruBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const std::optional<at::Tensor>&,
                                                                  const std::optional<at::Tensor>&, bool);
using RnnFwd = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, bool, bool,
                                                      const std::optional<at::Tensor>&);
using RnnBwd = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const std::optional<at::Tensor>&,
                                                      const std::optional<at::Tensor>&, bool, bool);
using SmallLinear = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

// Bumped whenever Kernels or an op's signature changes: a stale capability library left next to a
// rebuilt op library is then refused (with a warning) instead of being called with the wrong layout.
constexpr int64_t kKernelsAbi = 13;  // 2: the bf16 dot-product counter; 3: the resets argument; 4: the AMX counter;
                                    // 5: fma_loop; 6: panel cache hits; 7: small_linear; 8: set_output_allocator;
                                    // 9: library_products; 10: in_place_products; 11: row_split_recurrences;
                                    // 12: streamed_outputs; 13: the forwards' b_gx

struct Kernels {
  int64_t abi;
  int64_t size;            // sizeof(Kernels) where the table was compiled
  const char* capability;  // "default", "avx2", "avx512"
  int64_t vector_floats;   // at::vec::Vectorized<float>::size() in that copy
  LstmFwd lstm_fwd;
  LstmBwd lstm_bwd;
  GruFwd gru_fwd;
  GruBwd gru_bwd;
  RnnFwd rnn_fwd;
  RnnBwd rnn_bwd;
  // -1 where this copy cannot run bf16 weights on the avx512_bf16 dot product on this CPU, else how many step
  // products of this process ran on it (recurrence.h, bf16_dot_products).
  int64_t (*bf16_dot_products)();
  // The same for the bf16 step products on AMX (recurrence.h, bf16_amx_products).
  int64_t (*bf16_amx_products)();
  // The fp32 FMA loop of this copy's vectors on each of torch's threads (fma_peak.cpp): returns their summed
  // FLOP/s and the shortest thread's seconds; dispatch.cpp's fma_peak repeats it for the benchmark.
  double (*fma_loop)(int64_t iterations, double* shortest_seconds);
  // How many HiddenGemm constructions of this copy took their packed panels (W_hh; W_ih in small_linear) from its
  // cache (panel_cache.h).
  int64_t (*panel_cache_hits)();
  // fastrnn_cpu::small_linear (small_linear.cpp): a small input projection on the packed panels.
  SmallLinear small_linear;
  // Makes this copy's large outputs come from `allocator` (memory.h, output_allocator): the op library hands
  // every copy it loads its one output cache (output_cache.cpp).
  void (*set_output_allocator)(c10::Allocator* allocator);
  // How many step products (HiddenGemm constructions) of this copy went through the library GEMM instead of the
  // packed panels (recurrence.h, library_products).
  int64_t (*library_products)();
  // How many read W_hh where it lies, on the dot or the strided path (recurrence.h, in_place_products).
  int64_t (*in_place_products)();
  // How many recurrences split their rows among the threads (recurrence.h, row_split_recurrences).
  int64_t (*row_split_recurrences)();
  // How many op outputs were written with streaming stores (recurrence.h, streamed_outputs).
  int64_t (*streamed_outputs)();
};

// The six ops of one copy (lstm.cpp, gru.cpp, rnn.cpp) and small_linear (small_linear.cpp), in the namespace of
// the capability being compiled.
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd(
    const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool save,
    const std::optional<at::Tensor>& b_gx);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bwd(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& w_hr, const at::Tensor& gates, const at::Tensor& cs,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_fwd(const at::Tensor& gx, const at::Tensor& w_hh,
                                                       const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse,
                                                       bool save, const std::optional<at::Tensor>& b_gx);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_bwd(const at::Tensor& dy, const at::Tensor& dh_n,
                                                       const at::Tensor& w_hh, const at::Tensor& y,
                                                       const at::Tensor& h0, const at::Tensor& saved,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse);
std::tuple<at::Tensor, at::Tensor> rnn_fwd(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool relu,
    const std::optional<at::Tensor>& b_gx);
std::tuple<at::Tensor, at::Tensor> rnn_bwd(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh,
                                           const at::Tensor& y, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets,
                                           bool reverse, bool relu);
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
inline void set_output_allocator(c10::Allocator* allocator) { output_allocator() = allocator; }
}  // namespace CPU_CAPABILITY
#endif

}  // namespace cpu
}  // namespace fastrnn

// The one symbol a capability's copy exports: extern "C" const Kernels* fastrnn_cpu_kernels_<name>().
#define FASTRNN_CPU_KERNELS_ENTRY(name) fastrnn_cpu_kernels_##name
#define FASTRNN_DEFINE_CPU_KERNELS(name)                                                                       \
  extern "C" __attribute__((visibility("default"))) const fastrnn::cpu::Kernels* FASTRNN_CPU_KERNELS_ENTRY(  \
      name)() {                                                                                                \
    namespace k = fastrnn::cpu::CPU_CAPABILITY;                                                                \
    static const fastrnn::cpu::Kernels table{fastrnn::cpu::kKernelsAbi,                                        \
                                             static_cast<int64_t>(sizeof(fastrnn::cpu::Kernels)),              \
                                             #name,                                                            \
                                             at::vec::Vectorized<float>::size(),                               \
                                             &k::lstm_fwd,                                                     \
                                             &k::lstm_bwd,                                                     \
                                             &k::gru_fwd,                                                      \
                                             &k::gru_bwd,                                                      \
                                             &k::rnn_fwd,                                                      \
                                             &k::rnn_bwd,                                                      \
                                             &k::bf16_dot_products,                                            \
                                             &k::bf16_amx_products,                                            \
                                             &k::fma_loop,                                                     \
                                             &k::panel_cache_hits,                                             \
                                             &k::small_linear,                                                 \
                                             &k::set_output_allocator,                                         \
                                             &k::library_products,                                             \
                                             &k::in_place_products,                                            \
                                             &k::row_split_recurrences,                                        \
                                             &k::streamed_outputs};                                            \
    return &table;                                                                                             \
  }
