// C entry points over the emulated kernels (emulator.h), loaded with ctypes by tests/test_cuda.py: the
// kernels of step_kernels.cuh and persistent_kernels.cuh, compiled by the host C++ compiler and run on
// CPU threads. Each entry point mirrors one launcher of csrc/cuda (step.cu, persistent_kernels.cuh) but
// lets the test pick the grid: a few blocks for the step kernels' grid-stride loops, and the units per
// block of the persistent kernels (a partly filled last block, several blocks, one block).
//
// Legend: T steps, B batch, H hidden units, U units per block, BT the batch tile (cuda_api.h,
// persistent_kernels.cuh).
#include "emulator.h"

#include "../persistent_kernels.cuh"
#include "../step_kernels.cuh"

namespace fastrnn {
namespace cuda {
namespace {

template <class U>
cudaError_t run_step_fwd(const FwdParams& p, const StepFwdWork& w, int64_t t, unsigned blocks) {
  fastrnn_emu::launch(blocks, step::kThreads, 0, step::step_fwd_kernel<U>, p, w, t);
  return cudaSuccess;
}

template <class U>
cudaError_t run_step_bwd(const BwdParams& p, const StepBwdWork& w, int64_t t, unsigned blocks) {
  fastrnn_emu::launch(blocks, step::kThreads, 0, step::step_bwd_kernel<U>, p, w, t);
  return cudaSuccess;
}

// The persistent kernels for the plan's batch tile (persistent::batch_tile), as kernel_for picks them.
template <class U>
cudaError_t run_persistent_fwd(const FwdParams& p, int units, void* workspace) {
  const int bt = persistent::batch_tile(p.B);
  const size_t smem = persistent::fwd_smem_bytes<U>(int(p.B), int(p.H), units, bt);
  const unsigned blocks = unsigned((p.H + units - 1) / units);
  const unsigned threads = persistent::kThreads;
  if (bt == 1) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_fwd_kernel<U, 1>, p, units, workspace);
  if (bt == 4) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_fwd_kernel<U, 4>, p, units, workspace);
  if (bt == 8) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_fwd_kernel<U, 8>, p, units, workspace);
  return cudaSuccess;
}

template <class U>
cudaError_t run_persistent_bwd(const BwdParams& p, int units, void* workspace) {
  const int bt = persistent::batch_tile(p.B);
  const size_t smem = persistent::bwd_smem_bytes<U>(int(p.B), int(p.H), units, bt);
  const unsigned blocks = unsigned((p.H + units - 1) / units);
  const unsigned threads = persistent::kThreads;
  if (bt == 1) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_bwd_kernel<U, 1>, p, units, workspace);
  if (bt == 4) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_bwd_kernel<U, 4>, p, units, workspace);
  if (bt == 8) fastrnn_emu::launch(blocks, threads, smem, persistent::persistent_bwd_kernel<U, 8>, p, units, workspace);
  return cudaSuccess;
}

template <class Params>
bool persistent_ok(const Params& p, int units) {
  return p.T >= 1 && p.B >= 1 && p.B <= kPersistentMaxBatch && p.H >= 1 && p.Hout == p.H && units >= 1;
}

}  // namespace
}  // namespace cuda
}  // namespace fastrnn

using namespace fastrnn::cuda;

extern "C" {

// sizeof of the params structs, so that the ctypes mirrors in the test can check their layout.
size_t emu_sizeof(int which) {
  switch (which) {
    case 0:
      return sizeof(FwdParams);
    case 1:
      return sizeof(BwdParams);
    case 2:
      return sizeof(StepFwdWork);
    case 3:
      return sizeof(StepBwdWork);
    default:
      return 0;
  }
}

int emu_step_fwd(const FwdParams* p, const StepFwdWork* w, int64_t t, unsigned blocks) {
  if (t < 0 || t >= p->T || p->B * p->H == 0) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, FASTRNN_DISPATCH_CELL(p->cell, run_step_fwd, *p, *w, t, blocks));
  return cudaErrorInvalidValue;
}

int emu_step_bwd(const BwdParams* p, const StepBwdWork* w, int64_t t, unsigned blocks) {
  if (t < 0 || t >= p->T || p->B * p->H == 0) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, FASTRNN_DISPATCH_CELL(p->cell, run_step_bwd, *p, *w, t, blocks));
  return cudaErrorInvalidValue;
}

int emu_proj_fwd_select(const FwdParams* p, void* hp, void* h, int64_t t, unsigned blocks) {
  if (t < 0 || t >= p->T || p->B * p->Hout == 0) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, {
    fastrnn_emu::launch(blocks, step::kThreads, 0, step::proj_fwd_select_kernel<scalar_t>, *p,
                        static_cast<const scalar_t*>(hp), static_cast<scalar_t*>(h), t);
    return cudaSuccess;
  });
  return cudaErrorInvalidValue;
}

int emu_proj_bwd_gather(const BwdParams* p, void* dh, void* dht, int64_t t, unsigned blocks) {
  if (t < 0 || t >= p->T || p->B * p->Hout == 0) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, {
    fastrnn_emu::launch(blocks, step::kThreads, 0, step::proj_bwd_gather_kernel<scalar_t>, *p,
                        static_cast<scalar_t*>(dh), static_cast<scalar_t*>(dht), t);
    return cudaSuccess;
  });
  return cudaErrorInvalidValue;
}

// dh [B,Hout] dtype, dc [B,H] acc or null (step.cu's step_bwd_finish).
int emu_step_bwd_finish(const BwdParams* p, void* dh, void* dc, unsigned blocks) {
  if (p->B * (p->Hout > p->H ? p->Hout : p->H) == 0) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, {
    fastrnn_emu::launch(blocks, step::kThreads, 0, step::step_bwd_finish_kernel<scalar_t>, *p,
                        static_cast<const scalar_t*>(dh), static_cast<const acc_t<scalar_t>*>(dc));
    return cudaSuccess;
  });
  return cudaErrorInvalidValue;
}

// workspace: acc elements, 2*B*H (forward) or 2*blocks*B*H (backward), blocks = ceil(H / units).
int emu_persistent_fwd(const FwdParams* p, int units, void* workspace) {
  if (!persistent_ok(*p, units)) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, FASTRNN_DISPATCH_CELL(p->cell, run_persistent_fwd, *p, units, workspace));
  return cudaErrorInvalidValue;
}

int emu_persistent_bwd(const BwdParams* p, int units, void* workspace) {
  if (!persistent_ok(*p, units)) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p->dtype, FASTRNN_DISPATCH_CELL(p->cell, run_persistent_bwd, *p, units, workspace));
  return cudaErrorInvalidValue;
}

}  // extern "C"
