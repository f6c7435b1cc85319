// The elementwise primitives of csrc/cells/common.h for at::vec::Vectorized<float|double>, so that the
// cell functions of csrc/cells/*.h run unchanged on whole vectors in the CPU kernels. With these the cell
// math exists once: the same template is instantiated for float, double, Vectorized<float> and
// Vectorized<double> (and by nvcc for float/double).
// Legend: T steps, B batch, H hidden (the shapes are the caller's; everything here is elementwise).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../cells/common.h"

#include <type_traits>

namespace fastrnn {
namespace cells {
inline namespace CPU_CAPABILITY {  // V's width depends on the capability (kernels.h)

// Forced inline: the cell calls 5 of these per vector (3 sigmoid, 2 tanh, each an exp_neg_abs), and as
// out-of-line calls gcc 12 passed every vector through the stack and ran the 5 chains one after the other
// (perf, Zen 5, LSTM forward op at B=8, H=128: the cell was half of a step, exp_neg_abs alone 21%).
#define FASTRNN_VEC_INLINE inline __attribute__((always_inline))

template <typename S>
struct VecMath {
  using V = at::vec::Vectorized<S>;
  // e^-|x| in (0, 1]. fp32: inline, ~15 instructions, instead of a call to Sleef's expf (0.7 ns an
  // element): -|x| = n ln2 + r with n = round(-|x| log2 e) in [-126, 0] and |r| <= ln2/2, e^r by its
  // Taylor series to r^7 (truncation < 6e-9 relative), 2^n put into the exponent bits; below
  // ln(FLT_MIN) = -87.34 (e^x under the smallest normal float) the result is 0. 0.5 ns an element, within
  // 2 ulp (tests/test_native.py sweeps sigmoid and tanh, which use it). fp64: Sleef's exp (1 ulp).
  FASTRNN_VEC_INLINE static V exp_neg_abs(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      const V y = V(0.f) - x.abs();
      const V ln_min = V(-87.3365448f);
      const V yc = at::vec::maximum(y, ln_min);
      const V n = (yc * V(1.44269504f)).round();
      V r = at::vec::fmadd(n, V(-0.693359375f), yc);  // ln 2 in two parts (Cody and Waite): n * 0.693359375
      r = at::vec::fmadd(n, V(2.12194440e-4f), r);     // is exact, so r keeps its low bits
      V p = V(1.f / 5040.f);
      p = at::vec::fmadd(p, r, V(1.f / 720.f));
      p = at::vec::fmadd(p, r, V(1.f / 120.f));
      p = at::vec::fmadd(p, r, V(1.f / 24.f));
      p = at::vec::fmadd(p, r, V(1.f / 6.f));
      p = at::vec::fmadd(p, r, V(0.5f));
      p = at::vec::fmadd(p, r, V(1.f));
      p = at::vec::fmadd(p, r, V(1.f));
      using I = at::vec::Vectorized<int32_t>;
      const I bits = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
      return V::blendv(p * at::vec::cast<float>(bits), V(0.f), y < ln_min);
    } else {
      return (V(0) - x.abs()).exp();
    }
  }
  // fp64: Sleef's tanh (1 ulp). fp32: Sleef's tanhf costs 2.6 ns an element on this Zen 3, and the LSTM
  // cell has two, so fp32 uses exp_neg_abs: with e = e^-2|x| in (0, 1], |tanh x| = (1-e)/(1+e) never
  // overflows (no inf/inf) and is within ~1.5 ulp for |x| >= 1/4 (e <= 0.61: no cancellation in 1-e);
  // below 1/4 the odd Taylor series to x^11 (next term < 1e-8 relative) keeps small values exact
  // relative to themselves. tests/test_native.py sweeps it against fp64 tanh.
  FASTRNN_VEC_INLINE static V tanh(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      const V ax = x.abs();
      const V e = exp_neg_abs(V(2.f) * x);
      const V far = (V(1.f) - e) / (V(1.f) + e);
      const V x2 = x * x;
      V p = V(-1382.f / 155925.f);
      p = at::vec::fmadd(p, x2, V(62.f / 2835.f));
      p = at::vec::fmadd(p, x2, V(-17.f / 315.f));
      p = at::vec::fmadd(p, x2, V(2.f / 15.f));
      p = at::vec::fmadd(p, x2, V(-1.f / 3.f));
      const V near = at::vec::fmadd(p * x2, ax, ax);
      const V mag = V::blendv(far, near, ax < V(0.25f));
      return V::blendv(mag, V(0.f) - mag, x < V(0.f));
    } else {
      return x.tanh();
    }
  }
  FASTRNN_VEC_INLINE static V abs(const V& x) { return x.abs(); }
  FASTRNN_VEC_INLINE static V where_nonneg(const V& x, const V& a, const V& b) { return V::blendv(b, a, x >= V(0)); }
  // x < 0 ? 0 : x, lane-wise like Math<float>::relu (a NaN lane compares false and stays NaN)
  FASTRNN_VEC_INLINE static V relu(const V& x) { return V::blendv(x, V(0), x < V(0)); }
  FASTRNN_VEC_INLINE static V where_pos(const V& h, const V& g) { return V::blendv(g, V(0), h <= V(0)); }
};

}  // namespace CPU_CAPABILITY

template <>
struct Math<at::vec::Vectorized<float>> : VecMath<float> {};
template <>
struct Math<at::vec::Vectorized<double>> : VecMath<double> {};

}  // namespace cells
}  // namespace fastrnn
