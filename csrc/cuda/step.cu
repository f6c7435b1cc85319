// The step scheme (cuDNN/haste): per time step, bindings.cpp issues the recurrent GEMM through ATen
// (cuBLAS) into a preallocated buffer and then launches one fused pointwise kernel from this file, which
// applies the gates of every (batch row, hidden unit) and updates the state in place. Backward mirrors
// it: the pointwise kernel writes dgx[t] (and dgh[t]) and leaves in `dh` the part of dh_{t-1} that skips
// W_hh; bindings then accumulate dgh_t W_hh into `dh` with one addmm. Nothing is accumulated with
// atomics, so results are deterministic.
//
// Legend: T steps, B batch, H hidden units, Hout = proj_size or H, G gates, GH = G*H; t the time index,
// b the batch row, j the hidden unit; T_ the storage type, A = acc_t<T_> (docs/cuda.md).
#include "step_kernels.cuh"

namespace fastrnn {
namespace cuda {
namespace {

using step::kThreads;

template <class U>
cudaError_t launch_step_fwd(const FwdParams& p, const StepFwdWork& w, int64_t t, cudaStream_t stream) {
  step::step_fwd_kernel<U><<<grid_for(p.B * p.H, kThreads), kThreads, 0, stream>>>(p, w, t);
  return cudaGetLastError();
}

template <class U>
cudaError_t launch_step_bwd(const BwdParams& p, const StepBwdWork& w, int64_t t, cudaStream_t stream) {
  step::step_bwd_kernel<U><<<grid_for(p.B * p.H, kThreads), kThreads, 0, stream>>>(p, w, t);
  return cudaGetLastError();
}

bool valid_step(int64_t t, int64_t T) { return t >= 0 && t < T; }

}  // namespace

cudaError_t step_fwd(const FwdParams& p, const StepFwdWork& w, int64_t t, cudaStream_t stream) {
  if (!valid_step(t, p.T) || p.B < 0 || p.H < 0) return cudaErrorInvalidValue;
  if (p.B * p.H == 0) return cudaSuccess;
  FASTRNN_DISPATCH_DTYPE(p.dtype, FASTRNN_DISPATCH_CELL(p.cell, launch_step_fwd, p, w, t, stream));
  return cudaErrorInvalidValue;
}

cudaError_t step_bwd(const BwdParams& p, const StepBwdWork& w, int64_t t, cudaStream_t stream) {
  if (!valid_step(t, p.T) || p.B < 0 || p.H < 0) return cudaErrorInvalidValue;
  if (p.B * p.H == 0) return cudaSuccess;
  FASTRNN_DISPATCH_DTYPE(p.dtype, FASTRNN_DISPATCH_CELL(p.cell, launch_step_bwd, p, w, t, stream));
  return cudaErrorInvalidValue;
}

cudaError_t proj_fwd_select(const FwdParams& p, const void* hp, void* h, int64_t t, cudaStream_t stream) {
  if (!valid_step(t, p.T) || p.B < 0 || p.Hout < 0) return cudaErrorInvalidValue;
  const int64_t n = p.B * p.Hout;
  if (n == 0) return cudaSuccess;
  FASTRNN_DISPATCH_DTYPE(p.dtype, {
    step::proj_fwd_select_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        p, static_cast<const scalar_t*>(hp), static_cast<scalar_t*>(h), t);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

cudaError_t step_bwd_finish(const BwdParams& p, const void* dh, const void* dc, cudaStream_t stream) {
  if (p.B < 0 || p.H < 0 || p.Hout < 0) return cudaErrorInvalidValue;
  const int64_t n = p.B * (p.Hout > p.H ? p.Hout : p.H);
  if (n == 0) return cudaSuccess;
  FASTRNN_DISPATCH_DTYPE(p.dtype, {
    step::step_bwd_finish_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        p, static_cast<const scalar_t*>(dh), static_cast<const acc_t<scalar_t>*>(dc));
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

cudaError_t proj_bwd_gather(const BwdParams& p, void* dh, void* dht, int64_t t, cudaStream_t stream) {
  if (!valid_step(t, p.T) || p.B < 0 || p.Hout < 0) return cudaErrorInvalidValue;
  const int64_t n = p.B * p.Hout;
  if (n == 0) return cudaSuccess;
  FASTRNN_DISPATCH_DTYPE(p.dtype, {
    step::proj_bwd_gather_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        p, static_cast<scalar_t*>(dh), static_cast<scalar_t*>(dht), t);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastrnn
