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

template <typename S>
struct VecMath {
  using V = at::vec::Vectorized<S>;
  // Sleef's exp (u10: within 1 ulp).
  static V exp(const V& x) { return x.exp(); }
  // fp64: Sleef's tanh (1 ulp). fp32: Sleef's tanhf costs 2.6 ns an element on this Zen 3 against 0.7 for
  // expf, and the LSTM cell has two, so fp32 uses exp: with e = e^-2|x| in (0, 1], |tanh x| = (1-e)/(1+e)
  // never overflows (no inf/inf) and is within ~1.5 ulp for |x| >= 1/4 (e <= 0.61: no cancellation in
  // 1-e); below 1/4 the odd Taylor series to x^11 (next term < 1e-8 relative) keeps small values exact
  // relative to themselves. 1.2 ns an element; tests/test_native.py sweeps it against fp64 tanh.
  static V tanh(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      const V ax = x.abs();
      const V e = (V(-2.f) * ax).exp();
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
  static V abs(const V& x) { return x.abs(); }
  static V where_nonneg(const V& x, const V& a, const V& b) { return V::blendv(b, a, x >= V(0)); }
  // x < 0 ? 0 : x, lane-wise like Math<float>::relu (a NaN lane compares false and stays NaN)
  static V relu(const V& x) { return V::blendv(x, V(0), x < V(0)); }
  static V where_pos(const V& h, const V& g) { return V::blendv(g, V(0), h <= V(0)); }
};

template <>
struct Math<at::vec::Vectorized<float>> : VecMath<float> {};
template <>
struct Math<at::vec::Vectorized<double>> : VecMath<double> {};

}  // namespace cells
}  // namespace fastrnn
