// The elementwise primitives of csrc/cells/common.h for at::vec::Vectorized<float|double>, so that the
// cell functions of csrc/cells/*.h run unchanged on whole vectors in the CPU kernels. With these the cell
// math exists once: the same template is instantiated for float, double, Vectorized<float> and
// Vectorized<double> (and by nvcc for float/double).
// Legend: T steps, B batch, H hidden (the shapes are the caller's; everything here is elementwise).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../cells/common.h"

namespace fastrnn {
namespace cells {

template <typename S>
struct VecMath {
  using V = at::vec::Vectorized<S>;
  // Sleef's exp/tanh (u10: within 1 ulp); Vectorized::tanh saturates to +-1, no inf/inf.
  static V exp(const V& x) { return x.exp(); }
  static V tanh(const V& x) { return x.tanh(); }
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
