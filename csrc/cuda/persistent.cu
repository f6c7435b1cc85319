// The persistent scheme's public entry points (cuda_api.h): checks, then dispatch on dtype and cell to
// the instantiations in persistent_{lstm,gru,rnn}.cu. The scheme itself is described in persistent.cuh.
// Legend: T steps, B batch, H hidden units, Hout = proj_size or H.
#include "persistent.cuh"

namespace fastrnn {
namespace cuda {
namespace {

// The launch must match the plan it was made with (same sizes), since the kernel trusts it.
template <class Params>
bool matches(const Params& p, const PersistentPlan& plan) {
  return plan.ok && p.T >= 1 && p.B >= 1 && p.B <= kPersistentMaxBatch && p.H >= 1 && p.Hout == p.H &&
         plan.units >= 1 && int64_t(plan.blocks) == (p.H + plan.units - 1) / plan.units &&
         plan.batch_tile == persistent::batch_tile(p.B);
}

}  // namespace

cudaError_t persistent_plan(Cell cell, DType dtype, bool backward, int64_t B, int64_t H, int64_t Hout, int device,
                            PersistentPlan* plan) {
  *plan = PersistentPlan{};
  if (cell == Cell::kLSTM && Hout != H) {
    plan->why = "LSTM projections (proj_size) are not supported by the persistent kernel";
    return cudaSuccess;
  }
  if (B < 1 || B > kPersistentMaxBatch) {
    plan->why = "the batch is outside 1..kPersistentMaxBatch";
    return cudaSuccess;
  }
  // Shared memory is at most 227 KiB per block, so the int sizes of the kernel cannot overflow below this.
  if (H < 1 || H > (int64_t{1} << 20)) {
    plan->why = "the hidden size is outside 1..2^20";
    return cudaSuccess;
  }
  FASTRNN_DISPATCH_DTYPE(dtype, FASTRNN_DISPATCH_CELL(cell, persistent::plan_for, backward, B, H, device, plan));
  return cudaErrorInvalidValue;
}

cudaError_t persistent_fwd(const FwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream) {
  if (!matches(p, plan) || workspace == nullptr) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p.dtype, FASTRNN_DISPATCH_CELL(p.cell, persistent::launch_fwd, p, plan, workspace, stream));
  return cudaErrorInvalidValue;
}

cudaError_t persistent_bwd(const BwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream) {
  if (!matches(p, plan) || workspace == nullptr) return cudaErrorInvalidValue;
  FASTRNN_DISPATCH_DTYPE(p.dtype, FASTRNN_DISPATCH_CELL(p.cell, persistent::launch_bwd, p, plan, workspace, stream));
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastrnn
