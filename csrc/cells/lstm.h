// LSTM pointwise math (docs/contract.md, "LSTM"), one (batch row, hidden unit) element per call.
// Legend: T steps, B batch, H hidden, Hout = proj_size or H; gate order i, f, g, o (PyTorch's).
// V: float/double, or at::vec::Vectorized<float/double> on the CPU (see common.h).
#pragma once

#include "common.h"

namespace fastrnn {
namespace cells {

// Forward of one step. a* = gx_t + h_{t-1} W_hh^T for the four gates of this unit.
// Out: post-activation gates, c_t, and m_t = o tanh(c_t) (h_t = m_t, or m_t W_hr^T with a projection).
template <typename V>
FASTRNN_HD void lstm_fwd_cell(const V& ai, const V& af, const V& ag, const V& ao, const V& c_prev, V& i, V& f,
                              V& g, V& o, V& c, V& m) {
  i = sigmoid(ai);
  f = sigmoid(af);
  g = tanh(ag);
  o = sigmoid(ao);
  c = f * c_prev + i * g;
  m = o * tanh(c);
}

// Backward of one step. dm: gradient into m_t (dh_t, or dh_t W_hr with a projection); dc_next: the
// recurrent gradient into c_t from step t+1. i, f, g, o, c: the saved forward values of this step,
// c_prev = c_{t-1}. Out: gradients of the pre-activations a (= dgx_t) and dc_{t-1}'s recurrent part.
template <typename V>
FASTRNN_HD void lstm_bwd_cell(const V& dm, const V& dc_next, const V& i, const V& f, const V& g, const V& o,
                              const V& c, const V& c_prev, V& dai, V& daf, V& dag, V& dao, V& dc_prev) {
  const V one(1);
  const V tc = tanh(c);  // recomputed: saving tanh(c_t) would cost another [T,B,H] tensor
  const V dc = dc_next + dm * o * (one - tc * tc);
  dai = dc * g * i * (one - i);
  daf = dc * c_prev * f * (one - f);
  dag = dc * i * (one - g * g);
  dao = dm * tc * o * (one - o);
  dc_prev = dc * f;
}

}  // namespace cells
}  // namespace fastrnn
