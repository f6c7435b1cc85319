// Shared by every cell header: the host/device qualifier and the elementwise primitives.
//
// Legend (used by all cells/*.h): T steps, B batch, H hidden units, Hout = proj_size or H,
// G gates per cell (LSTM 4: i,f,g,o; GRU 3: r,z,n; RNN 1). The functions here act on one
// (batch row, hidden unit) element at a time; the callers own the loops, the layout and the GEMMs.
//
// How the math stays in one place: each cell's forward and backward is written once, as a template on
// the value type V. V is `float` or `double` for scalar code (the CUDA kernels, CPU tails) and
// `at::vec::Vectorized<float|double>` for the vectorised CPU loops. The only things that differ per V
// are the primitives of `Math<V>` (exp, tanh, abs, two selects); `Math<float>` and `Math<double>` are
// below, the at::vec ones in csrc/cpu/vec_math.h. fp16/bf16 storage is converted to float by the caller.
//
// No torch headers here: the CUDA sources (csrc/cuda/*.cu) include this with plain nvcc.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced on the host too: the CPU cells call 5 transcendentals per vector; left to gcc 12, sigmoid/tanh
// stayed out-of-line calls (vectors through the stack, the 5 chains run one after another). See docs/cpu.md.
#define FASTRNN_HD inline __attribute__((always_inline))
#else
#define FASTRNN_HD inline
#endif

namespace fastrnn {
namespace cells {

// Elementwise primitives of a value type; specialised per V (see the comment at the top).
template <typename V>
struct Math;

template <>
struct Math<float> {
  // e^-|x|, in (0, 1]: the only exponential the cells need (it cannot overflow)
  static FASTRNN_HD float exp_neg_abs(float x) { return ::expf(-::fabsf(x)); }
  // libm/CUDA tanhf saturate to +-1 for large |x| (no inf/inf), unlike (1-e^-2x)/(1+e^-2x).
  static FASTRNN_HD float tanh(float x) { return ::tanhf(x); }
  static FASTRNN_HD float abs(float x) { return ::fabsf(x); }
  // x >= 0 ? a : b
  static FASTRNN_HD float where_nonneg(float x, float a, float b) { return x >= 0.f ? a : b; }
  // max(x, 0), NaN propagated like torch.relu
  static FASTRNN_HD float relu(float x) { return x < 0.f ? 0.f : x; }
  // h > 0 ? g : 0 (the relu gradient given the relu output h, as torch's threshold_backward)
  static FASTRNN_HD float where_pos(float h, float g) { return h <= 0.f ? 0.f : g; }
};

template <>
struct Math<double> {
  static FASTRNN_HD double exp_neg_abs(double x) { return ::exp(-::fabs(x)); }
  static FASTRNN_HD double tanh(double x) { return ::tanh(x); }
  static FASTRNN_HD double abs(double x) { return ::fabs(x); }
  static FASTRNN_HD double where_nonneg(double x, double a, double b) { return x >= 0. ? a : b; }
  static FASTRNN_HD double relu(double x) { return x < 0. ? 0. : x; }
  static FASTRNN_HD double where_pos(double h, double g) { return h <= 0. ? 0. : g; }
};

// sigmoid(x) = 1 / (1 + e^-x), evaluated through e = e^-|x| in (0, 1] so that nothing overflows
// (e^-x for x = -100 would be 2.7e43, inf in fp32) and small results keep their relative precision:
// x >= 0: 1 / (1 + e); x < 0: e / (1 + e).
template <typename V>
FASTRNN_HD V sigmoid(const V& x) {
  const V e = Math<V>::exp_neg_abs(x);
  const V s = V(1) / (V(1) + e);
  return Math<V>::where_nonneg(x, s, e * s);
}

template <typename V>
FASTRNN_HD V tanh(const V& x) {
  return Math<V>::tanh(x);
}

}  // namespace cells
}  // namespace fastrnn
