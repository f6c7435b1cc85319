// The big GEMMs of a layer on the CPU (input projection x W_ih^T + b; backward's dx = dgx W_ih and
// dW_ih = dgx^T x) through the fastest path torch offers here, as custom ops that torch.compile treats as
// opaque: fastrnn_cpu::linear and fastrnn_cpu::mm.
//
// Paths, fp32 (docs/benchmarks.md, "The big GEMMs", bench/cpu_gemm.py): torch.mm / F.linear call MKL, which
// on AMD CPUs runs its AVX2 code whatever the CPU has; oneDNN's matmul (torch's mkldnn::_linear_pointwise)
// JIT-compiles for the running ISA. On the Zen 5 of 2026-12-02 (2 threads, AVX-512) oneDNN was faster in
// all eight products measured, 1.1x-2.1x on the p50 (e.g. [6400,512]x[512,2048]: 38 vs 18 GFLOP/s, both
// under a load average of 12). Calling the mkldnn op from Python inside a compiled graph fails (Inductor
// lowers it only with a frozen weight), hence these ops. The mkldnn op is found through the dispatcher at
// run time, so a torch without it (no MKLDNN) links and falls back to at::addmm / at::mm.
// On Intel CPUs MKL runs its AVX-512 code and is the faster one: on a Xeon with AVX-512 and AMX (2 threads,
// 2026-12-02, bench/cpu_gemm.py, p50) MKL led oneDNN in all eight products, e.g. dgx^T x [2048,6400]x[6400,
// 512] 329 vs 195 GFLOP/s and [6400,512]x[512,2048] 286 vs 273. So oneDNN on every CPU but Intel's (MKL's
// own vendor test), MKL there. FASTRNN_CPU_BLAS=mkl|onednn forces a path (benchmarks); the choice never
// depends on timing, so results are the same run to run. ISA-neutral source (oneDNN does its own dispatch): compiled into fastrnn._C.
//
// Legend: x [M, K], w [N, K], bias [N], a [M, K], b [K, N].
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "memory.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

namespace fastrnn {
namespace cpu {
namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                   std::optional<c10::string_view>);

// The oneDNN linear op of this torch, if it has one with this signature (typed() checks it; a torch whose
// signature differs falls back to MKL rather than failing).
std::optional<c10::TypedOperatorHandle<LinearPointwise>> onednn_linear() {
  static const auto handle = []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    const auto op = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      return std::nullopt;
    }
    try {
      return op->typed<LinearPointwise>();
    } catch (const c10::Error&) {
      return std::nullopt;
    }
  }();
  return handle;
}

// torch's oneDNN matmul into a result the caller allocates: at::native::mkldnn_matmul(a, b, result, beta, alpha),
// result = beta result + alpha a @ b, which libtorch_cpu exports (its header, ATen/native/mkldnn/Matmul.h, is not
// installed). Unlike the linear op it takes a transposed operand without a copy and writes into our tensor, so the
// output can be advised onto huge pages before its first touch (memory.h): at the LSTM's input projection
// [6400,512]x[512,2048] (52 MB out, mapped anew each call) the linear op took 46-52 ms, this 40 with the bias and
// 36 without (Zen 5, 2 threads; docs/cpu.md, "The big GEMMs"). Looked up by name at run time, so a torch without it or
// with another signature still loads (and takes the linear op); used only if a 2 x 2 fp32 product through it
// comes out right, since it refuses fp32 on some torch versions and, on x86, on CPUs without AVX-512 BW/VL/DQ
// or AVX-NE-CONVERT. FASTRNN_CPU_ONEDNN_MATMUL=0 (read at each call, as FASTRNN_CPU_BLAS) takes the linear op
// instead: the path of the CPUs and torch versions without it, kept testable everywhere.
using Matmul = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

Matmul* onednn_matmul() {
  static Matmul* const matmul = []() -> Matmul* {
    constexpr const char* kSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";
    void* symbol = dlsym(RTLD_DEFAULT, kSymbol);
    if (symbol == nullptr) {
      if (void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
        symbol = dlsym(torch_cpu, kSymbol);
        dlclose(torch_cpu);
      }
    }
    auto* fn = reinterpret_cast<Matmul*>(symbol);
    if (fn == nullptr) {
      return nullptr;
    }
    try {
      const at::Tensor a = at::full({2, 2}, 1.5f), out = at::full({2, 2}, 1.0f);
      fn(a, a.t(), out, 1.0f, 1.0f);
      const float* c = out.const_data_ptr<float>();
      return std::all_of(c, c + 4, [](float v) { return v == 5.5f; }) ? fn : nullptr;  // 1 + 2 * 1.5 * 1.5
    } catch (const std::exception&) {
      return nullptr;
    }
  }();
  const char* env = std::getenv("FASTRNN_CPU_ONEDNN_MATMUL");
  return env != nullptr && std::string(env) == "0" ? nullptr : matmul;
}

// "intel", "amd" or "other": the CPU's vendor, which MKL's code path and some of backend="auto"'s measured
// rules (fastrnn/modules.py) depend on.
std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  static const std::string vendor = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other";
  }();
  return vendor;
#else
  return "other";
#endif
}

// Whether MKL runs its widest code on this CPU: it checks the vendor, and on other vendors' CPUs takes its
// AVX2 path whatever they support.
bool mkl_at_full_width() { return cpu_vendor() == "intel"; }

bool use_onednn(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  const char* env = std::getenv("FASTRNN_CPU_BLAS");
  const std::string choice = env == nullptr ? "" : env;
  TORCH_CHECK(choice.empty() || choice == "onednn" || choice == "mkl",
              "FASTRNN_CPU_BLAS must be onednn or mkl, got '", choice, "'");
  const bool onednn_wins = choice == "onednn" || (choice.empty() && !mkl_at_full_width());
  // oneDNN's linear takes fp32/bf16/fp16; fp32 is the measured case. Empty operands: at::addmm's rules.
  return onednn_wins && onednn_linear().has_value() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && (!bias.has_value() || bias->scalar_type() == at::kFloat) &&
         x.numel() > 0 && w.numel() > 0;
}

// a @ b (+ bias) through oneDNN's matmul into a fresh output on huge pages. The bias is written into the output
// first and added by the matmul (beta = 1): mkldnn_matmul takes no bias of its own.
at::Tensor onednn_product(Matmul* matmul, const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias) {
  at::Tensor out = empty_output({a.size(0), b.size(1)}, a.options());
  if (bias.has_value()) {
    out.copy_(bias->expand_as(out));
  }
  matmul(a, b, out, bias.has_value() ? 1.0f : 0.0f, 1.0f);
  return out;
}

// x @ w^T (+ bias), as torch.nn.functional.linear on 2-D input.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "fastrnn_cpu::linear: input ", x.sizes(),
              " and weight ", w.sizes(), " do not match (x [M, K], w [N, K])");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.size(0)),
              "fastrnn_cpu::linear: bias must have shape [", w.size(0), "], got ", bias->sizes());
  if (use_onednn(x, w, bias)) {
    if (Matmul* matmul = onednn_matmul()) {
      return onednn_product(matmul, x, w.t(), bias);
    }
    return onednn_linear()->call(x, w, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  // MKL's product into our own output too: from 2 MB one of the output cache's blocks, already mapped, where
  // torch's allocation past 32 MB is mapped anew and faults in at every call (fastrnn/autograd.py, native_gemm).
  at::Tensor out = empty_output({x.size(0), w.size(0)}, x.options());
  return bias.has_value() ? at::addmm_out(out, *bias, x, w.t()) : at::mm_out(out, x, w.t());
}

// a @ b, as torch.mm (a contiguous result). torch's oneDNN linear copies its input to a contiguous one first
// (the weight it reads through its strides), and that copy of a transposed view is slow at large leading
// dimensions: the weight gradients' dgx^T x, a = dgx^T [2048, 6400], spent 34 ms in it beside 38 in the
// product (Zen 5, 2 threads). So on the oneDNN path, where a is such a view, the product runs as (b^T a^T)^T
// when that copies fewer elements (b^T, if not contiguous, and the [M, N] result): 37.6-38.9 ms for that dW
// against 65.6-69.8 (docs/cpu.md, "The big GEMMs"). MKL takes either operand transposed without a copy.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "fastrnn_cpu::mm: shapes ", a.sizes(),
              " and ", b.sizes(), " cannot be multiplied");
  const at::Tensor bt = b.t();
  if (use_onednn(a, bt, std::nullopt)) {
    if (Matmul* matmul = onednn_matmul()) {
      return onednn_product(matmul, a, b, std::nullopt);
    }
    const int64_t copied = a.is_contiguous() ? 0 : a.numel();
    const int64_t copied_swapped = (bt.is_contiguous() ? 0 : b.numel()) + a.size(0) * b.size(1);
    if (copied_swapped < copied) {
      return linear(bt, a, std::nullopt).t().contiguous();
    }
  }
  return linear(a, bt, std::nullopt);
}

// "onednn" or "mkl": the path fp32 products take here.
std::string blas() {
  const auto x = at::empty({1, 1}, at::kFloat);
  return use_onednn(x, x, std::nullopt) ? "onednn" : "mkl";
}

// Whether the oneDNN path runs mkldnn_matmul into our own output (else torch's linear op).
bool onednn_matmul_used() { return onednn_matmul() != nullptr; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("mm(Tensor a, Tensor b) -> Tensor");
  m.def("blas() -> str", &blas);
  m.def("onednn_matmul() -> bool", &onednn_matmul_used);
  m.def("cpu_vendor() -> str", &cpu_vendor);
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("mm", &mm);
}

}  // namespace cpu
}  // namespace fastrnn
