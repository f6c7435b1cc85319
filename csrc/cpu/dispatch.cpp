// Runtime ISA dispatch of the CPU kernels (kernels.h explains the per-capability copies): registers the
// six ops for the CPU dispatch key once, each calling the active copy's table, and the fastrnn_cpu ops
// that say which copy runs and switch it.
//
// Choice (first use, i.e. when `import fastrnn` loads the extension; or set_capability):
//   1. what the CPU and the OS support: avx512 = AVX-512 F/BW/VL/DQ (the set ATen's AVX512 capability
//      asks for) + AVX2/FMA/F16C; avx2 = AVX2 + FMA + F16C; default otherwise. __builtin_cpu_supports
//      reads CPUID and, for AVX/AVX-512, XCR0 (whether the OS saves those registers).
//   2. lowered, never raised, by FASTRNN_CPU_CAPABILITY if set, else by ATEN_CPU_CAPABILITY (the
//      variable that lowers torch's own kernels): "default", "avx2" or "avx512".
//   3. the best copy at or below that which is built and loads (a missing or stale library -> the next
//      one down, with a warning; default is always there, linked in).
//
// Compiled without ISA flags (it runs before the choice), like the default copy it links with.
#include <torch/library.h>

#include <dirent.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

extern "C" const fastrnn::cpu::Kernels* FASTRNN_CPU_KERNELS_ENTRY(default)();

namespace fastrnn {
namespace cpu {
namespace {

// Capabilities from lowest to highest; the index orders them.
const char* const kCapabilities[] = {"default", "avx2", "avx512"};
constexpr int kNumCapabilities = 3;

int capability_index(const std::string& name) {
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (name == kCapabilities[i]) {
      return i;
    }
  }
  return -1;
}

// The highest capability this CPU (and OS) can run.
int cpu_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // F16C has no __builtin_cpu_supports name in older gcc; every AVX2 CPU so far has it (Haswell, Zen 1+).
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? 2 : avx2 ? 1 : 0;
#else
  return 0;
#endif
}

// The limit set by FASTRNN_CPU_CAPABILITY, else by ATEN_CPU_CAPABILITY; kNumCapabilities - 1 when unset.
// A wrong FASTRNN_CPU_CAPABILITY is an error; an ATEN_CPU_CAPABILITY value of another architecture
// (zvector, vsx, sve256) means nothing here and is ignored.
int env_limit() {
  if (const char* ours = std::getenv("FASTRNN_CPU_CAPABILITY"); ours != nullptr && *ours != '\0') {
    const int i = capability_index(ours);
    TORCH_CHECK(i >= 0, "FASTRNN_CPU_CAPABILITY must be default, avx2 or avx512, got '", ours, "'");
    return i;
  }
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY"); aten != nullptr && capability_index(aten) >= 0) {
    return capability_index(aten);
  }
  return kNumCapabilities - 1;
}

// The directory of this library (the capability libraries are built next to it).
std::string own_directory() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&FASTRNN_CPU_KERNELS_ENTRY(default)), &info) == 0 || info.dli_fname == nullptr) {
    return ".";
  }
  const std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// The library of one capability next to this one: setuptools names it _C_<name>.<python tag>.so,
// CMake libfastrnn_cpu_<name>.so. Empty if there is none.
std::string find_library(const std::string& dir, const std::string& name) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return "";
  }
  const std::string setuptools_prefix = "_C_" + name + ".", cmake_name = "libfastrnn_cpu_" + name + ".so";
  std::string found;
  while (const dirent* e = readdir(d)) {
    const std::string f = e->d_name;
    const bool so = f.size() > 3 && f.compare(f.size() - 3, 3, ".so") == 0;
    if (so && (f.rfind(setuptools_prefix, 0) == 0 || f == cmake_name)) {
      found = dir + "/" + f;
      break;
    }
  }
  closedir(d);
  return found;
}

// The table of capability i, or nullptr (with a warning saying why) if its library is missing or stale.
const Kernels* load(int i) {
  if (i == 0) {
    return FASTRNN_CPU_KERNELS_ENTRY(default)();
  }
  const std::string name = kCapabilities[i];
  const std::string path = find_library(own_directory(), name);
  if (path.empty()) {
    TORCH_WARN("fastrnn: the ", name, " CPU kernels are not built (no _C_", name, "*.so next to the op library); ",
               "using a lower capability");
    return nullptr;
  }
  // RTLD_LOCAL: its symbols (all hidden but the entry) never interpose on anything else.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    TORCH_WARN("fastrnn: cannot load ", path, ": ", dlerror(), "; using a lower capability");
    return nullptr;
  }
  const std::string entry = "fastrnn_cpu_kernels_" + name;
  using Entry = const Kernels* (*)();
  auto fn = reinterpret_cast<Entry>(dlsym(handle, entry.c_str()));
  const Kernels* k = fn == nullptr ? nullptr : fn();
  if (k == nullptr || k->abi != kKernelsAbi || k->size != static_cast<int64_t>(sizeof(Kernels))) {
    TORCH_WARN("fastrnn: ", path, " is from another build (rebuild the extension); using a lower capability");
    return nullptr;  // the handle stays open: harmless, and a table from it may never be used
  }
  k->set_output_allocator(output_allocator());  // this library's output cache (output_cache.cpp)
  return k;
}

std::mutex load_mutex;
const Kernels* loaded[kNumCapabilities] = {};
std::atomic<const Kernels*> active_table{nullptr};

// The best loadable copy at or below `limit`.
const Kernels* best_at_or_below(int limit) {
  std::lock_guard<std::mutex> guard(load_mutex);
  for (int i = limit; i > 0; --i) {
    if (loaded[i] == nullptr) {
      loaded[i] = load(i);
    }
    if (loaded[i] != nullptr) {
      return loaded[i];
    }
  }
  return FASTRNN_CPU_KERNELS_ENTRY(default)();
}

const Kernels& active() {
  const Kernels* k = active_table.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = best_at_or_below(std::min(cpu_supported(), env_limit()));
    active_table.store(k, std::memory_order_release);
  }
  return *k;
}

// ---- the fastrnn_cpu ops -------------------------------------------------------------------------------

std::string capability() { return active().capability; }

// Makes `name` the active capability (tests and benchmarks run every path this way in one process).
// Refused if the CPU cannot run it or it is not built; returns the capability now active.
std::string set_capability(const std::string& name) {
  const int i = capability_index(name);
  TORCH_CHECK(i >= 0, "fastrnn_cpu::set_capability: the capability must be default, avx2 or avx512, got '", name, "'");
  TORCH_CHECK(i <= cpu_supported(), "fastrnn_cpu::set_capability: this CPU cannot run ", name,
              " (it supports up to ", kCapabilities[cpu_supported()], ")");
  const Kernels* k = best_at_or_below(i);
  TORCH_CHECK(capability_index(k->capability) == i, "fastrnn_cpu::set_capability: the ", name,
              " kernels are not built or did not load (see the warning)");
  active_table.store(k, std::memory_order_release);
  return k->capability;
}

// What this machine can run, lowest first (whether or not each is built).
std::vector<std::string> supported() {
  std::vector<std::string> out;
  for (int i = 0; i <= cpu_supported(); ++i) {
    out.emplace_back(kCapabilities[i]);
  }
  return out;
}

// Floats in one at::vec vector of the active copy: 8 (default, avx2) or 16 (avx512).
int64_t vector_floats() { return active().vector_floats; }

// -1 where the active copy cannot run bf16 weights on avx512_bf16 on this CPU, else how many step products
// of this process ran on it (docs/cpu.md, "bf16 and fp16").
int64_t bf16_dot_products() { return active().bf16_dot_products(); }

// Whether this CPU (and OS) runs avx512_fp16: there torch's fp16 matmul is oneDNN's on it, summing in fp32,
// and the layer code keeps its fp16 GEMMs on it (fastrnn/autograd.py, native_gemm).
bool has_avx512_fp16() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_supported() == 2 && __builtin_cpu_supports("avx512fp16");
#else
  return false;
#endif
}

// -1 where the active copy cannot run the bf16 step products on AMX on this CPU, else how many step products
// of this process ran on AMX.
int64_t bf16_amx_products() { return active().bf16_amx_products(); }

// The fp32 FMA throughput of the active copy on torch's threads, in FLOP/s: the best of repeated runs of its
// FMA loop (fma_peak.cpp, each thread timing itself) over about `seconds` in all, each run grown until every
// thread's loop takes >= 1 ms (far above the clock's resolution). The best run, since a descheduled thread
// only ever slows one down. The benchmark's measured FMA peak (fastrnn/bench/roofline.py).
double fma_peak(double seconds) {
  using Clock = std::chrono::steady_clock;
  const Kernels& k = active();
  const auto start = Clock::now();
  int64_t iterations = 1024;
  double best = 0;
  while (best == 0 || std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
    double shortest = 0;
    const double rate = k.fma_loop(iterations, &shortest);
    if (shortest < 1e-3) {
      iterations *= 2;
      continue;
    }
    best = std::max(best, rate);
  }
  return best;
}

// How many step products of the active copy took W_hh's packed panels from its cache (panel_cache.h).
int64_t panel_cache_hits() { return active().panel_cache_hits(); }

// How many step products of the active copy went through the library GEMM, not the packed panels (recurrence.h).
int64_t library_products() { return active().library_products(); }
int64_t in_place_products() { return active().in_place_products(); }
int64_t row_split_recurrences() { return active().row_split_recurrences(); }
int64_t streamed_outputs() { return active().streamed_outputs(); }

// y = x W^T + bias for a small fp32 projection on the active copy's packed panels (small_linear.cpp).
at::Tensor active_small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return active().small_linear(x, w, bias);
}

// ---- the six ops, for the CPU dispatch key ------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> active_lstm_fwd(
    const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool save,
    const std::optional<at::Tensor>& b_gx) {
  return active().lstm_fwd(gx, w_hh, h0, c0, w_hr, lengths, resets, reverse, save, b_gx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> active_lstm_bwd(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& w_hr, const at::Tensor& gates, const at::Tensor& cs,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  return active().lstm_bwd(dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, lengths, resets, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> active_gru_fwd(const at::Tensor& gx, const at::Tensor& w_hh,
                                                       const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse,
                                                       bool save, const std::optional<at::Tensor>& b_gx) {
  return active().gru_fwd(gx, w_hh, b_hh, h0, lengths, resets, reverse, save, b_gx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> active_gru_bwd(const at::Tensor& dy, const at::Tensor& dh_n,
                                                       const at::Tensor& w_hh, const at::Tensor& y,
                                                       const at::Tensor& h0, const at::Tensor& saved,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  return active().gru_bwd(dy, dh_n, w_hh, y, h0, saved, lengths, resets, reverse);
}

std::tuple<at::Tensor, at::Tensor> active_rnn_fwd(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool relu,
    const std::optional<at::Tensor>& b_gx) {
  return active().rnn_fwd(gx, w_hh, h0, lengths, resets, reverse, relu, b_gx);
}

std::tuple<at::Tensor, at::Tensor> active_rnn_bwd(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh,
                                           const at::Tensor& y, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets,
                                           bool reverse, bool relu) {
  return active().rnn_bwd(dy, dh_n, w_hh, y, lengths, resets, reverse, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("lstm_fwd", &active_lstm_fwd);
  m.impl("lstm_bwd", &active_lstm_bwd);
  m.impl("gru_fwd", &active_gru_fwd);
  m.impl("gru_bwd", &active_gru_bwd);
  m.impl("rnn_fwd", &active_rnn_fwd);
  m.impl("rnn_bwd", &active_rnn_bwd);
}

// Not part of the recurrence contract (docs/contract.md): the ISA path of the CPU kernels.
TORCH_LIBRARY(fastrnn_cpu, m) {
  m.def("capability() -> str", &capability);
  m.def("set_capability(str name) -> str", &set_capability);
  m.def("supported() -> str[]", &supported);
  m.def("vector_floats() -> int", &vector_floats);
  m.def("bf16_dot_products() -> int", &bf16_dot_products);
  m.def("bf16_amx_products() -> int", &bf16_amx_products);
  m.def("has_avx512_fp16() -> bool", &has_avx512_fp16);
  m.def("fma_peak(float seconds) -> float", &fma_peak);
  m.def("panel_cache_hits() -> int", &panel_cache_hits);
  m.def("library_products() -> int", &library_products);
  m.def("in_place_products() -> int", &in_place_products);
  m.def("row_split_recurrences() -> int", &row_split_recurrences);
  m.def("streamed_outputs() -> int", &streamed_outputs);
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("small_linear", &active_small_linear);
}

}  // namespace cpu
}  // namespace fastrnn
