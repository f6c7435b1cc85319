// Elman RNN pointwise math (docs/contract.md, "RNN"), one (batch row, hidden unit) element per call.
// Legend: T steps, B batch, H hidden; a = gx_t + h_{t-1} W_hh^T (both biases folded into gx).
// V: float/double, or at::vec::Vectorized<float/double> on the CPU (see common.h).
#pragma once

#include "common.h"

namespace fastrnn {
namespace cells {

// h_t = relu(a) or tanh(a).
template <bool Relu, typename V>
FASTRNN_HD V rnn_fwd_cell(const V& a) {
  if constexpr (Relu) {
    return Math<V>::relu(a);
  } else {
    return tanh(a);
  }
}

// Gradient of the pre-activation given dh (total gradient into h_t) and the output h = h_t:
// relu: dh [h > 0]; tanh: dh (1 - h^2).
template <bool Relu, typename V>
FASTRNN_HD V rnn_bwd_cell(const V& dh, const V& h) {
  if constexpr (Relu) {
    return Math<V>::where_pos(h, dh);
  } else {
    return dh * (V(1) - h * h);
  }
}

}  // namespace cells
}  // namespace fastrnn
