// The pointwise kernels of the step scheme (step.cu has the scheme and the launchers): per step and per
// (batch row, hidden unit), one unit update of units.cuh around the GEMM output of bindings.cpp.
//
// Legend: T steps, B batch, H hidden units, Hout = proj_size or H, G gates, GH = G*H; t the time index,
// b the batch row, j the hidden unit; T_ the storage type, A = acc_t<T_> (docs/cuda.md).
#pragma once

#include "units.cuh"

namespace fastrnn {
namespace cuda {
namespace step {

// 256 threads: the kernels are memory bound (a few loads and stores per element); 256 keeps 8 warps per
// block to hide latency and any B*H >= 256 fills whole blocks.
constexpr int kThreads = 256;

template <class U>
__global__ void __launch_bounds__(kThreads) step_fwd_kernel(FwdParams p, StepFwdWork w, int64_t t) {
  using T_ = typename U::T;
  using A = acc_t<T_>;
  const int64_t H = p.H, n = p.B * H, GH = U::G * H;
  const bool proj = w.m != nullptr;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const bool active = is_active(p.lengths, t, b);
    A gh[U::G];
#pragma unroll
    for (int k = 0; k < U::G; ++k) gh[k] = active ? load<T_>(w.gh, b * GH + k * H + j) : A(0);
    const A h_prev = proj ? A(0) : load<T_>(w.h, idx);
    A c = U::kHasCell ? static_cast<const A*>(w.c)[idx] : A(0);
    const A out = U::fwd(p, t, b, j, active, gh, h_prev, c);
    if (U::kHasCell) static_cast<A*>(w.c)[idx] = c;
    if (proj) {
      store<T_>(w.m, idx, active ? out : A(0));
    } else {
      if (active) store<T_>(w.h, idx, out);
      store<T_>(p.y, t * n + idx, active ? out : A(0));
    }
  }
}

template <typename T_>
__global__ void __launch_bounds__(kThreads) proj_fwd_select_kernel(FwdParams p, const T_* hp, T_* h, int64_t t) {
  const int64_t n = p.B * p.Hout;
  T_* y = static_cast<T_*>(p.y) + t * n;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    if (is_active(p.lengths, t, idx / p.Hout)) {
      h[idx] = hp[idx];
      y[idx] = hp[idx];
    } else {
      y[idx] = from_acc<T_>(acc_t<T_>(0));
    }
  }
}

template <class U>
__global__ void __launch_bounds__(kThreads) step_bwd_kernel(BwdParams p, StepBwdWork w, int64_t t) {
  using T_ = typename U::T;
  using A = acc_t<T_>;
  const int64_t H = p.H, n = p.B * H;
  const bool proj = w.dm != nullptr;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const bool active = is_active(p.lengths, t, b);
    // A reset at the step processed before this one: nothing is carried into h_t, c_t (the GEMM of
    // that step added dg W_hh to dh regardless; it is dropped here).
    const bool cut = carried_gradient_is_cut(p, t, b);
    // dy is ignored at inactive steps (it may hold anything there).
    A dh_rec = A(0), dm;
    if (proj) {
      dm = load<T_>(w.dm, idx);  // dh_t W_hr; proj_bwd_gather already did the carry (and cut) of dh
    } else {
      dh_rec = cut ? A(0) : load<T_>(w.dh, idx);
      dm = active ? dh_rec + load<T_>(p.dy, t * n + idx) : A(0);
    }
    A dc = U::kHasCell && !cut ? static_cast<const A*>(w.dc)[idx] : A(0);
    A dg[U::G];
    const A direct = U::bwd(p, t, b, j, active, dm, dc, dg);
    if (U::kHasCell) static_cast<A*>(w.dc)[idx] = dc;
    // inactive: dh passes through unchanged (as 0 after a cut)
    if (!proj && (active || cut)) store<T_>(w.dh, idx, active ? direct : dh_rec);
  }
}

template <typename T_>
__global__ void __launch_bounds__(kThreads) proj_bwd_gather_kernel(BwdParams p, T_* dh, T_* dht, int64_t t) {
  using A = acc_t<T_>;
  const int64_t n = p.B * p.Hout;
  const T_* dy = static_cast<const T_*>(p.dy) + t * n;
  T_* out = dht + t * n;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / p.Hout;
    const bool cut = carried_gradient_is_cut(p, t, b);  // as in step_bwd_kernel
    if (is_active(p.lengths, t, b)) {
      out[idx] = from_acc<T_>((cut ? A(0) : to_acc(dh[idx])) + to_acc(dy[idx]));
      dh[idx] = from_acc<T_>(A(0));
    } else {
      out[idx] = from_acc<T_>(A(0));
      if (cut) dh[idx] = from_acc<T_>(A(0));
    }
  }
}

// dh0 = dh, dc0 = dc, except 0 for the rows whose last processed step reset: the cut that a next step
// would have made (carried_gradient_is_cut at one past the last processed step). Only with resets;
// without, bindings copy.
template <typename T_>
__global__ void __launch_bounds__(kThreads) step_bwd_finish_kernel(BwdParams p, const T_* dh, const acc_t<T_>* dc) {
  using A = acc_t<T_>;
  const int64_t past_end = p.reverse ? p.T : -1;
  const int64_t n_h = p.B * p.Hout, n_c = dc != nullptr ? p.B * p.H : 0, n = n_h > n_c ? n_h : n_c;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    if (idx < n_h) {
      const bool cut = carried_gradient_is_cut(p, past_end, idx / p.Hout);
      static_cast<T_*>(p.dh0)[idx] = cut ? from_acc<T_>(A(0)) : dh[idx];
    }
    if (idx < n_c) store<T_>(p.dc0, idx, carried_gradient_is_cut(p, past_end, idx / p.H) ? A(0) : dc[idx]);
  }
}

}  // namespace step
}  // namespace cuda
}  // namespace fastrnn
