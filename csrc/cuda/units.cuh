// One step of one hidden unit, per cell: what both CUDA schemes (step.cu, persistent.cuh) do at
// (t, b, j) around the cell math of csrc/cells/*.h. The schemes differ only in where the recurrent sums
// gh come from (a cuBLAS GEMM output, or shared-memory dot products) and where the state lives (global
// buffers, or shared memory); the loads of gx/saved tensors, the writes of outputs and the rules for
// inactive steps (docs/contract.md) are here, once.
//
// Legend: T steps, B batch, H hidden units, G gates, GH = G*H; t the time index of the step, b the batch
// row, j the hidden unit; T_ the storage type, A = acc_t<T_> the math type.
//
// Each unit type provides:
//   G                      gates per unit
//   kHasCell               whether the unit carries a private state besides h (LSTM's c)
//   fwd(p, t, b, j, active, gh[G], h_prev, c) -> the step output (m_t, = h_t without projection);
//       h_prev when inactive. gh: h_{t-1} W_hh^T (+ b_hh) of the G gate rows of unit j. c in/out.
//       Writes saved[t] / cs[t] (zeros / the carried c when inactive, as the contract says).
//   bwd(p, t, b, j, active, dm, dc, dg[G]) -> the part of dh_{t-1} that does not go through W_hh (GRU:
//       dh z; 0 otherwise). dm: total gradient into the step output. dc in/out (LSTM). Writes dgx[t]
//       (and dgh[t]), zeros when inactive; dg out = the rows that multiply W_hh for dh_{t-1} (dgx for
//       LSTM/RNN, dgh for GRU), zeros when inactive.
// Episode resets (docs/contract.md) live here too, for the step itself: at an active step that starts
// from a zero state (starts_from_zero; resets_at here, at active steps only), fwd takes h_{t-1} = 0 (so
// gh = b_hh for GRU, 0 otherwise) and c_{t-1} = 0, and bwd reads c_{t-1} / h_{t-1} as 0. The cut of the
// gradient carried across the reset (dh, dc into step t-1) is the schemes' (carried_gradient_is_cut,
// where they read it): bwd returns direct, dc and dg as if there were no reset.
#pragma once

#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"
#include "common.cuh"

namespace fastrnn {
namespace cuda {

template <typename T_>
struct LstmUnit {
  using T = T_;
  using A = acc_t<T_>;
  static constexpr int G = 4;
  static constexpr bool kHasCell = true;

  __device__ static A fwd(const FwdParams& p, int64_t t, int64_t b, int64_t j, bool active, const A (&gh)[G],
                          A h_prev, A& c) {
    const int64_t H = p.H, GH = G * H, row = t * p.B + b;  // row of [T,B,*]
    if (!active) {
      if (p.saved != nullptr) {
#pragma unroll
        for (int k = 0; k < G; ++k) store<T_>(p.saved, row * GH + k * H + j, A(0));
      }
      if (p.cs != nullptr) store<T_>(p.cs, row * H + j, c);
      return h_prev;
    }
    const bool fresh = resets_at(p, t, b);  // h_{t-1} = 0 and c_{t-1} = 0
    A a[G];
#pragma unroll
    for (int k = 0; k < G; ++k) a[k] = load<T_>(p.gx, row * GH + k * H + j) + (fresh ? A(0) : gh[k]);
    A i, f, g, o, c_new, m;
    cells::lstm_fwd_cell(a[0], a[1], a[2], a[3], fresh ? A(0) : c, i, f, g, o, c_new, m);
    c = c_new;
    if (p.saved != nullptr) {
      store<T_>(p.saved, row * GH + j, i);
      store<T_>(p.saved, row * GH + H + j, f);
      store<T_>(p.saved, row * GH + 2 * H + j, g);
      store<T_>(p.saved, row * GH + 3 * H + j, o);
    }
    if (p.cs != nullptr) store<T_>(p.cs, row * H + j, c_new);
    return m;
  }

  __device__ static A bwd(const BwdParams& p, int64_t t, int64_t b, int64_t j, bool active, A dm, A& dc,
                          A (&dg)[G]) {
    const int64_t H = p.H, GH = G * H, row = t * p.B + b;
    if (!active) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        store<T_>(p.dgx, row * GH + k * H + j, A(0));
        dg[k] = A(0);
      }
      if (p.m != nullptr) store<T_>(p.m, row * H + j, A(0));
      return A(0);
    }
    const A i = load<T_>(p.saved, row * GH + j);
    const A f = load<T_>(p.saved, row * GH + H + j);
    const A g = load<T_>(p.saved, row * GH + 2 * H + j);
    const A o = load<T_>(p.saved, row * GH + 3 * H + j);
    const A c = load<T_>(p.cs, row * H + j);
    // c_{t-1}: cs of the previously processed index (which holds the carried c if that step was
    // inactive), or c0 at the sequence's first processed step; 0 where the step starts from zero.
    const int64_t tp = p.reverse ? t + 1 : t - 1;
    const A c_prev = resets_at(p, t, b)       ? A(0)
                     : (tp >= 0 && tp < p.T) ? load<T_>(p.cs, (tp * p.B + b) * H + j)
                                             : load<T_>(p.c0, b * H + j);
    A dc_prev;
    cells::lstm_bwd_cell(dm, dc, i, f, g, o, c, c_prev, dg[0], dg[1], dg[2], dg[3], dc_prev);
    dc = dc_prev;
#pragma unroll
    for (int k = 0; k < G; ++k) store<T_>(p.dgx, row * GH + k * H + j, dg[k]);
    if (p.m != nullptr) store<T_>(p.m, row * H + j, o * cells::tanh(c));
    return A(0);
  }
};

template <typename T_>
struct GruUnit {
  using T = T_;
  using A = acc_t<T_>;
  static constexpr int G = 3;
  static constexpr bool kHasCell = false;

  __device__ static A fwd(const FwdParams& p, int64_t t, int64_t b, int64_t j, bool active, const A (&gh)[G],
                          A h_prev, A&) {
    const int64_t H = p.H, GH = G * H, row = t * p.B + b;
    const int64_t SH = 4 * H;  // saved row: r, z, n, ghn
    if (!active) {
      if (p.saved != nullptr) {
#pragma unroll
        for (int k = 0; k < 4; ++k) store<T_>(p.saved, row * SH + k * H + j, A(0));
      }
      return h_prev;
    }
    const A gxr = load<T_>(p.gx, row * GH + j);
    const A gxz = load<T_>(p.gx, row * GH + H + j);
    const A gxn = load<T_>(p.gx, row * GH + 2 * H + j);
    // From a zero state (a reset), h_{t-1} = 0 and its recurrent sums are b_hh alone.
    const bool fresh = resets_at(p, t, b);
    A ghs[G];
#pragma unroll
    for (int k = 0; k < G; ++k) ghs[k] = !fresh ? gh[k] : p.b_hh != nullptr ? load<T_>(p.b_hh, k * H + j) : A(0);
    A r, z, n, h;
    cells::gru_fwd_cell(gxr, gxz, gxn, ghs[0], ghs[1], ghs[2], fresh ? A(0) : h_prev, r, z, n, h);
    if (p.saved != nullptr) {
      store<T_>(p.saved, row * SH + j, r);
      store<T_>(p.saved, row * SH + H + j, z);
      store<T_>(p.saved, row * SH + 2 * H + j, n);
      store<T_>(p.saved, row * SH + 3 * H + j, ghs[2]);
    }
    return h;
  }

  __device__ static A bwd(const BwdParams& p, int64_t t, int64_t b, int64_t j, bool active, A dm, A&,
                          A (&dg)[G]) {
    const int64_t H = p.H, GH = G * H, row = t * p.B + b, SH = 4 * H;
    if (!active) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        store<T_>(p.dgx, row * GH + k * H + j, A(0));
        store<T_>(p.dgh, row * GH + k * H + j, A(0));
        dg[k] = A(0);
      }
      return A(0);
    }
    const A r = load<T_>(p.saved, row * SH + j);
    const A z = load<T_>(p.saved, row * SH + H + j);
    const A n = load<T_>(p.saved, row * SH + 2 * H + j);
    const A ghn = load<T_>(p.saved, row * SH + 3 * H + j);
    // h_{t-1} from y and h0 (docs/contract.md, gru_bwd): forward y[t-1] if t >= 1; reverse y[t+1] if
    // t+1 < min(T, lengths[b]); else h0; 0 where the step starts from zero.
    const int64_t tp = p.reverse ? t + 1 : t - 1;
    const bool from_y = p.reverse ? (tp < p.T && is_active(p.lengths, tp, b)) : tp >= 0;
    const A h_prev = resets_at(p, t, b) ? A(0)
                     : from_y                  ? load<T_>(p.y, (tp * p.B + b) * H + j)
                                               : load<T_>(p.h0, b * H + j);
    A dar, daz, dan, dghn, direct;
    cells::gru_bwd_cell(dm, r, z, n, ghn, h_prev, dar, daz, dan, dghn, direct);
    store<T_>(p.dgx, row * GH + j, dar);
    store<T_>(p.dgx, row * GH + H + j, daz);
    store<T_>(p.dgx, row * GH + 2 * H + j, dan);
    store<T_>(p.dgh, row * GH + j, dar);
    store<T_>(p.dgh, row * GH + H + j, daz);
    store<T_>(p.dgh, row * GH + 2 * H + j, dghn);
    dg[0] = dar;
    dg[1] = daz;
    dg[2] = dghn;
    return direct;
  }
};

// tanh or relu, chosen at run time from p.cell: one kernel for both nonlinearities halves the RNN
// instantiations, and the branch is uniform over the whole grid.
template <typename T_>
struct RnnUnit {
  using T = T_;
  using A = acc_t<T_>;
  static constexpr int G = 1;
  static constexpr bool kHasCell = false;

  __device__ static A fwd(const FwdParams& p, int64_t t, int64_t b, int64_t j, bool active, const A (&gh)[G],
                          A h_prev, A&) {
    if (!active) return h_prev;
    const bool fresh = resets_at(p, t, b);  // h_{t-1} = 0
    const A a = load<T_>(p.gx, (t * p.B + b) * p.H + j) + (fresh ? A(0) : gh[0]);
    return p.cell == Cell::kRNNRelu ? cells::rnn_fwd_cell<true>(a) : cells::rnn_fwd_cell<false>(a);
  }

  __device__ static A bwd(const BwdParams& p, int64_t t, int64_t b, int64_t j, bool active, A dm, A&,
                          A (&dg)[G]) {
    const int64_t i = (t * p.B + b) * p.H + j;
    if (!active) {
      store<T_>(p.dgx, i, A(0));
      dg[0] = A(0);
      return A(0);
    }
    const A h = load<T_>(p.y, i);  // h_t = y_t at an active step
    dg[0] = p.cell == Cell::kRNNRelu ? cells::rnn_bwd_cell<true>(dm, h) : cells::rnn_bwd_cell<false>(dm, h);
    store<T_>(p.dgx, i, dg[0]);
    return A(0);
  }
};

// Returns F<Unit<scalar_t>>(args...) for the unit type of `cell` (inside FASTRNN_DISPATCH_DTYPE, which
// binds scalar_t); an unknown cell returns cudaErrorInvalidValue.
#define FASTRNN_DISPATCH_CELL(cell, F, ...)                  \
  switch (cell) {                                            \
    case ::fastrnn::cuda::Cell::kLSTM:                       \
      return F<::fastrnn::cuda::LstmUnit<scalar_t>>(__VA_ARGS__); \
    case ::fastrnn::cuda::Cell::kGRU:                        \
      return F<::fastrnn::cuda::GruUnit<scalar_t>>(__VA_ARGS__);  \
    case ::fastrnn::cuda::Cell::kRNNTanh:                    \
    case ::fastrnn::cuda::Cell::kRNNRelu:                    \
      return F<::fastrnn::cuda::RnnUnit<scalar_t>>(__VA_ARGS__);  \
    default:                                                 \
      return cudaErrorInvalidValue;                          \
  }

}  // namespace cuda
}  // namespace fastrnn
