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

// Two vectors as one value: the cells run on pairs where a block of units has two vectors or more
// (recurrence.h, vec_loop), so that every operation of the math below is issued for two independent vectors
// back to back. One vector's cell is a chain of dependent operations (an exponential's polynomial, a divide,
// then the next gate's exponential: ~200 cycles for the LSTM's), and gcc emits one vector's chain after the
// other, so the out-of-order window of a core held little besides one chain (perf: the cell was ~26% of an
// LSTM step at B = 1 and half the product's time for a GRU at B = 32, Intel Xeon, 1 thread). Bit for bit the
// same results as two single vectors.
template <typename Vec>
struct Pair {
  using value_type = typename Vec::value_type;
  Vec lo, hi;
  static constexpr int size() { return 2 * Vec::size(); }
  FASTRNN_VEC_INLINE Pair() = default;
  FASTRNN_VEC_INLINE Pair(const Vec& l, const Vec& h) : lo(l), hi(h) {}
  FASTRNN_VEC_INLINE explicit Pair(value_type v) : lo(v), hi(v) {}
  FASTRNN_VEC_INLINE Pair abs() const { return {lo.abs(), hi.abs()}; }
  FASTRNN_VEC_INLINE Pair round() const { return {lo.round(), hi.round()}; }
  FASTRNN_VEC_INLINE Pair exp() const { return {lo.exp(), hi.exp()}; }
  FASTRNN_VEC_INLINE Pair tanh() const { return {lo.tanh(), hi.tanh()}; }
  FASTRNN_VEC_INLINE static Pair blendv(const Pair& a, const Pair& b, const Pair& mask) {
    return {Vec::blendv(a.lo, b.lo, mask.lo), Vec::blendv(a.hi, b.hi, mask.hi)};
  }
};

template <typename T>
struct IsPair : std::false_type {};
template <typename Vec>
struct IsPair<Pair<Vec>> : std::true_type {};

#define FASTRNN_PAIR_BINARY(op)                                                             \
  template <typename Vec>                                                                   \
  FASTRNN_VEC_INLINE Pair<Vec> operator op(const Pair<Vec>& a, const Pair<Vec>& b) {        \
    return {a.lo op b.lo, a.hi op b.hi};                                                    \
  }
FASTRNN_PAIR_BINARY(+)
FASTRNN_PAIR_BINARY(-)
FASTRNN_PAIR_BINARY(*)
FASTRNN_PAIR_BINARY(/)
FASTRNN_PAIR_BINARY(<)
FASTRNN_PAIR_BINARY(<=)
FASTRNN_PAIR_BINARY(>=)
#undef FASTRNN_PAIR_BINARY

// The at::vec free functions VecMath uses, for single vectors and pairs alike.
template <typename Vec>
FASTRNN_VEC_INLINE Vec vfmadd(const Vec& a, const Vec& b, const Vec& c) {
  return at::vec::fmadd(a, b, c);
}
template <typename Vec>
FASTRNN_VEC_INLINE Pair<Vec> vfmadd(const Pair<Vec>& a, const Pair<Vec>& b, const Pair<Vec>& c) {
  return {at::vec::fmadd(a.lo, b.lo, c.lo), at::vec::fmadd(a.hi, b.hi, c.hi)};
}
template <typename Vec>
FASTRNN_VEC_INLINE Vec vmaximum(const Vec& a, const Vec& b) {
  return at::vec::maximum(a, b);
}
template <typename Vec>
FASTRNN_VEC_INLINE Pair<Vec> vmaximum(const Pair<Vec>& a, const Pair<Vec>& b) {
  return {at::vec::maximum(a.lo, b.lo), at::vec::maximum(a.hi, b.hi)};
}
// 2^n for whole-numbered float lanes n in [-126, 0], by the exponent bits.
FASTRNN_VEC_INLINE at::vec::Vectorized<float> exp2_of_int(const at::vec::Vectorized<float>& n) {
  using I = at::vec::Vectorized<int32_t>;
  return at::vec::cast<float>((at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23));
}
FASTRNN_VEC_INLINE Pair<at::vec::Vectorized<float>> exp2_of_int(const Pair<at::vec::Vectorized<float>>& n) {
  return {exp2_of_int(n.lo), exp2_of_int(n.hi)};
}

// V: at::vec::Vectorized<S> or a Pair of them.
template <typename V>
struct VecMath {
  using S = typename V::value_type;
  // e^-|x| in (0, 1]. fp32: inline, ~15 instructions, instead of a call to Sleef's expf (0.7 ns an
  // element): -|x| = n ln2 + r with n = round(-|x| log2 e) in [-126, 0] and |r| <= ln2/2, e^r by its
  // Taylor series to r^7 (truncation < 6e-9 relative), 2^n put into the exponent bits; below
  // ln(FLT_MIN) = -87.34 (e^x under the smallest normal float) the result is 0. 0.5 ns an element, within
  // 2 ulp (tests/test_native.py sweeps sigmoid and tanh, which use it). fp64: Sleef's exp (1 ulp).
  FASTRNN_VEC_INLINE static V exp_neg_abs(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      const V y = V(0.f) - x.abs();
      const V ln_min = V(-87.3365448f);
      const V yc = vmaximum(y, ln_min);
      const V n = (yc * V(1.44269504f)).round();
      V r = vfmadd(n, V(-0.693359375f), yc);  // ln 2 in two parts (Cody and Waite): n * 0.693359375
      r = vfmadd(n, V(2.12194440e-4f), r);     // is exact, so r keeps its low bits
      V p = V(1.f / 5040.f);
      p = vfmadd(p, r, V(1.f / 720.f));
      p = vfmadd(p, r, V(1.f / 120.f));
      p = vfmadd(p, r, V(1.f / 24.f));
      p = vfmadd(p, r, V(1.f / 6.f));
      p = vfmadd(p, r, V(0.5f));
      p = vfmadd(p, r, V(1.f));
      p = vfmadd(p, r, V(1.f));
      return V::blendv(p * exp2_of_int(n), V(0.f), y < ln_min);
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
      p = vfmadd(p, x2, V(62.f / 2835.f));
      p = vfmadd(p, x2, V(-17.f / 315.f));
      p = vfmadd(p, x2, V(2.f / 15.f));
      p = vfmadd(p, x2, V(-1.f / 3.f));
      const V near = vfmadd(p * x2, ax, ax);
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

template <typename S>
struct Math<at::vec::Vectorized<S>> : VecMath<at::vec::Vectorized<S>> {};
template <typename S>
struct Math<Pair<at::vec::Vectorized<S>>> : VecMath<Pair<at::vec::Vectorized<S>>> {};

}  // namespace cells
}  // namespace fastrnn
