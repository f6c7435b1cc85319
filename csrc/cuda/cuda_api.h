// The plain-CUDA interface of the recurrence kernels: params structs of pointers and sizes, and the
// launchers that bindings.cpp calls. No torch headers, and nothing here needs nvcc, so the same header is
// read by nvcc (the .cu files) and by the host compiler (bindings.cpp).
//
// Legend: T steps, B batch, H hidden units, Hout = proj_size or H, G gates per cell (LSTM 4: i,f,g,o;
// GRU 3: r,z,n; RNN 1), GH = G*H. All tensors are contiguous and time-major, as docs/contract.md says.
// "dtype" is the storage type of every tensor (fp32, fp64, fp16, bf16); "acc" is the type the math runs
// in: double for fp64, float otherwise. Indices into [T,B,*] tensors are int64 (T*B*GH passes 2^31 at
// e.g. T=1024, B=64, GH=4*8192).
//
// Two schemes (docs/cuda.md):
//  - step: per step, bindings.cpp issues the recurrent GEMM through ATen (cuBLAS) and then one fused
//    pointwise kernel (step_fwd / step_bwd), the cuDNN/haste scheme;
//  - persistent: one cooperative launch for all T steps, W_hh resident in shared memory, a grid-wide
//    sync between steps (persistent_fwd / persistent_bwd), when persistent_plan says it fits.
// Every launcher returns the cudaError_t of its launch (cudaSuccess also when there was nothing to do).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastrnn {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Cell : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

inline int gates_of(Cell cell) { return cell == Cell::kLSTM ? 4 : cell == Cell::kGRU ? 3 : 1; }

// Everything one forward op reads and writes (the op's inputs and outputs, no workspace).
struct FwdParams {
  Cell cell;
  DType dtype;
  int64_t T, B, H, Hout;
  bool reverse;
  const int64_t* lengths;  // [B] or null (all sequences have length T); values are only compared
  const uint8_t* resets;   // [T,B] bool (one byte, 0 or 1) or null: step t of b starts from a zero state
  const void* gx;          // [T,B,GH]
  const void* w_hh;        // [GH,Hout]        read by the persistent kernel only
  const void* b_hh;        // [3H] GRU or null read by the persistent kernel, and by the step kernel at a
                           // reset (otherwise the step GEMM adds it)
  const void* h0;          // [B,Hout]
  const void* c0;          // [B,H] LSTM
  void* y;                 // [T,B,Hout]
  void* h_n;               // [B,Hout]         written by the persistent kernel (step: bindings copy)
  void* c_n;               // [B,H] LSTM       written by the persistent kernel (step: bindings copy)
  void* saved;             // LSTM gates [T,B,4H] (i,f,g,o) / GRU [T,B,4H] (r,z,n,ghn); null if !save
  void* cs;                // LSTM [T,B,H] c after each step; null if !save
};

// Everything one backward op reads and writes.
struct BwdParams {
  Cell cell;
  DType dtype;
  int64_t T, B, H, Hout;
  bool reverse;
  const int64_t* lengths;  // [B] or null
  const uint8_t* resets;   // [T,B] bool or null: no gradient crosses into the state before step t of b
  const void* dy;          // [T,B,Hout]
  const void* dh_n;        // [B,Hout]         read by the persistent kernel (step: bindings copy)
  const void* dc_n;        // [B,H] LSTM       read by the persistent kernel (step: bindings copy)
  const void* w_hh;        // [GH,Hout]        persistent kernel only
  const void* h0;          // [B,H] GRU
  const void* c0;          // [B,H] LSTM
  const void* y;           // [T,B,H] GRU, RNN
  const void* saved;       // LSTM gates / GRU (r,z,n,ghn), [T,B,4H]
  const void* cs;          // LSTM [T,B,H]
  void* dgx;               // [T,B,GH]
  void* dgh;               // [T,B,3H] GRU
  void* dh0;               // [B,Hout]         written by the persistent kernel
  void* dc0;               // [B,H] LSTM       written by the persistent kernel
  void* m;                 // [T,B,H] LSTM with projection, step scheme: m_t = o tanh(c_t) out (0 where
                           // inactive), for dw_hr = sum_t dh_t^T m_t as one GEMM; null otherwise
};

// ---- step scheme (csrc/cuda/step.cu) ----

// Workspace of the forward step kernel.
struct StepFwdWork {
  const void* gh;  // [B,GH] dtype: h_{t-1} W_hh^T (+ b_hh for GRU), this step's GEMM output
  void* h;         // [B,H] dtype: the state, read and updated in place (the next GEMM's input); unused
                   // with a projection (the select kernel updates h [B,Hout] then)
  void* c;         // [B,H] acc: the LSTM cell state, in place
  void* m;         // [B,H] dtype: LSTM with projection, m_t out (0 where inactive); null otherwise
};

// One forward step at time index t: gates, state update, y[t] (without projection), saved[t], cs[t].
cudaError_t step_fwd(const FwdParams& p, const StepFwdWork& w, int64_t t, cudaStream_t stream);

// LSTM projection, after hp = m_t W_hr^T: y[t] = active ? hp : 0; h = active ? hp : h. [B,Hout].
cudaError_t proj_fwd_select(const FwdParams& p, const void* hp, void* h, int64_t t, cudaStream_t stream);

// Workspace of the backward step kernel.
struct StepBwdWork {
  void* dh;        // [B,H] dtype: the recurrent dh into h_t, in place; on exit the part of dh_{t-1}
                   // that does not go through W_hh (bindings then add dgh_t W_hh by addmm). Unused
                   // with a projection (proj_bwd_gather does that role).
  void* dc;        // [B,H] acc: LSTM recurrent dc, in place
  const void* dm;  // [B,H] dtype: LSTM with projection, dh_t W_hr (GEMM output); null otherwise
};

// One backward step at time index t: dgx[t] (and dgh[t]), the recurrent state gradients.
cudaError_t step_bwd(const BwdParams& p, const StepBwdWork& w, int64_t t, cudaStream_t stream);

// The end of a backward with resets, in place of copying dh, dc into dh0, dc0: the same copy (dc rounded
// to the storage type), but 0 for the sequences whose last processed step reset (no gradient crosses a
// reset, docs/contract.md; the per-step GEMM added dg W_hh to those rows regardless). dh [B,Hout] dtype,
// dc [B,H] acc (LSTM; null otherwise).
cudaError_t step_bwd_finish(const BwdParams& p, const void* dh, const void* dc, cudaStream_t stream);

// LSTM projection, before the dm GEMM, over [B,Hout]: dht[t] = active ? dy[t] + dh : 0, and dh = active ?
// 0 : dh (the carry; bindings then add dgx_t W_hh). dht [T,B,Hout] also feeds dw_hr = dht^T m.
cudaError_t proj_bwd_gather(const BwdParams& p, void* dh, void* dht, int64_t t, cudaStream_t stream);

// ---- persistent scheme (csrc/cuda/persistent_*.cu) ----

// How a persistent launch is laid out; `ok` false (with `why`) means use the step scheme.
struct PersistentPlan {
  bool ok = false;
  const char* why = "not planned";
  int blocks = 0;             // grid size: block k owns hidden units [k*units, min(H, (k+1)*units))
  int units = 0;              // hidden units per block
  int batch_tile = 0;         // batch rows per register tile of the recurrent dot products
  int threads = 0;            // threads per block
  size_t smem_bytes = 0;      // dynamic shared memory per block
  int64_t workspace_acc = 0;  // acc elements of global workspace the launch needs
};

// The largest batch the persistent kernel is considered for. Beyond it the step GEMM runs on tensor
// cores at a useful size while the persistent dot products are CUDA-core FMAs (not yet measured on a
// GPU: a first guess after FlashRNN/Persistent-RNN, which target batch <= 16..32).
constexpr int64_t kPersistentMaxBatch = 16;

// Plans a persistent launch on `device` (cooperative launch support, shared memory, and co-residency
// of every block, checked with cudaOccupancyMaxActiveBlocksPerMultiprocessor). LSTM with a projection
// is not supported (plan.ok = false). Returns the error of a failing CUDA query (plan.ok false then).
cudaError_t persistent_plan(Cell cell, DType dtype, bool backward, int64_t B, int64_t H, int64_t Hout, int device,
                            PersistentPlan* plan);

// workspace: plan.workspace_acc elements of acc, any content. Requires plan.ok.
cudaError_t persistent_fwd(const FwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream);
cudaError_t persistent_bwd(const BwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrnn
