// The persistent scheme (after Baidu's Persistent RNNs and FlashRNN's fused kernel): one cooperative
// launch runs all T steps; each block keeps its slice of W_hh in shared memory for the whole sequence,
// and a grid-wide sync separates the steps. It replaces T cuBLAS GEMMs + T pointwise launches (each step
// re-reading all of W_hh from L2/HBM) by on-chip dot products, which pays at small batch, where a step
// GEMM is latency bound. docs/cuda.md has the layout and the limits.
//
// Legend: T steps, B batch, H hidden units (= Hout: no projection here), G gates, GH = G*H; U units per
// block ("units" of the plan), R = G*U rows of W_hh per block, BT batch rows per register tile, Bp = B
// rounded up to BT; t the time index, b the batch row, j = j0 + jl the hidden unit (jl local), r = k*U +
// jl the local row of gate k of unit jl; T_ the storage type, A = acc_t<T_>.
//
// Ownership: block q owns units j in [q*U, min(H, (q+1)*U)) and with them the rows {k*H + j} of W_hh
// (all G gates of its units, so the pointwise cell update is block-local).
//  forward  step: load h_{t-1} [B,H] (written by all blocks) into smem; gh[r][b] = w_s[r,:] . h[b,:] for
//           the block's R rows; the unit update (units.cuh) for its (b, j); write h_t to a global
//           ping-pong buffer; grid sync.
//  backward step: dh_rec[b,j] = carry[b,j] + sum over blocks q' of P_q'[b,j] (the partial products of the
//           previous step, summed in a fixed order: deterministic); the unit backward for its (b, j),
//           which gives dg [R,B]; P_q[b,:] = sum_r dg[r,b] w_s[r,:] (this block's partial of dg W_hh)
//           to a global ping-pong buffer; grid sync.
// No atomics anywhere; one grid sync per step.
//
// Files: this header declares the per-cell entry points; persistent_kernels.cuh defines the kernels and
// the plan/launch templates; persistent_{lstm,gru,rnn}.cu instantiate them, one cell per file, so a
// parallel build compiles the 3 cells x 4 dtypes x 3 batch tiles x 2 directions kernels three ways at once
// (one file with all of them took 56 s of nvcc for sm_80 + sm_90); persistent.cu dispatches.
#pragma once

#include "units.cuh"

namespace fastrnn {
namespace cuda {
namespace persistent {

// The batch tile: 1 for B = 1, 4 for B <= 4, else 8 (B up to kPersistentMaxBatch = 16 takes two passes).
// Wider tiles would waste FMAs on padding at the small batches this kernel is for; a tile of 2 was left
// out to keep nvcc time down (each tile is 24 more kernels), at the cost of 2 padded rows at B = 2.
inline int batch_tile(int64_t B) { return B <= 1 ? 1 : B <= 4 ? 4 : 8; }

// Defined in persistent_kernels.cuh, instantiated per unit type in persistent_<cell>.cu.
template <class U>
cudaError_t plan_for(bool backward, int64_t B, int64_t H, int device, PersistentPlan* plan);
template <class U>
cudaError_t launch_fwd(const FwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream);
template <class U>
cudaError_t launch_bwd(const BwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace persistent
}  // namespace cuda
}  // namespace fastrnn
