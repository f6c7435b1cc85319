// GRU pointwise math (docs/contract.md, "GRU"), one (batch row, hidden unit) element per call.
// Legend: T steps, B batch, H hidden; gate order r, z, n (PyTorch's); gh = h_{t-1} W_hh^T + b_hh.
// V: float/double, or at::vec::Vectorized<float/double> on the CPU (see common.h).
#pragma once

#include "common.h"

namespace fastrnn {
namespace cells {

// Forward of one step. Out: r, z, n and h_t. b_hn stays inside r * ghn (PyTorch, not the paper).
template <typename V>
FASTRNN_HD void gru_fwd_cell(const V& gxr, const V& gxz, const V& gxn, const V& ghr, const V& ghz, const V& ghn,
                             const V& h_prev, V& r, V& z, V& n, V& h) {
  r = sigmoid(gxr + ghr);
  z = sigmoid(gxz + ghz);
  n = tanh(gxn + r * ghn);
  h = n + z * (h_prev - n);  // = (1 - z) n + z h_{t-1}, one multiply fewer
}

// Backward of one step. dh: total gradient into h_t (dy_t + recurrent). r, z, n, ghn: saved forward
// values; h_prev = h_{t-1}. Out: dgx_t = (dar, daz, dan), the n part of dgh_t (dghn = dan r; its r and z
// parts equal dar and daz), and dh_prev_direct = dh z, the part of dh_{t-1} that skips W_hh.
template <typename V>
FASTRNN_HD void gru_bwd_cell(const V& dh, const V& r, const V& z, const V& n, const V& ghn, const V& h_prev, V& dar,
                             V& daz, V& dan, V& dghn, V& dh_prev_direct) {
  const V one(1);
  const V dn = dh * (one - z);
  const V dz = dh * (h_prev - n);
  dan = dn * (one - n * n);
  dar = dan * ghn * r * (one - r);
  daz = dz * z * (one - z);
  dghn = dan * r;
  dh_prev_direct = dh * z;
}

}  // namespace cells
}  // namespace fastrnn
