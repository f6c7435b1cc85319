// The persistent kernels and their plan/launch templates (persistent.cuh has the scheme and the layout).
// Included by persistent_{lstm,gru,rnn}.cu only, each instantiating one unit type.
//
// Legend: T steps, B batch, H hidden units (= Hout), G gates, U units per block, R = G*U rows of W_hh per
// block, BT batch rows per register tile, Bp = B rounded up to BT; t the time index, b the batch row,
// j = j0 + jl the hidden unit (jl local), r = k*U + jl the local row of gate k; T_ the storage type,
// A = acc_t<T_>.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "persistent.cuh"

namespace cg = cooperative_groups;

namespace fastrnn {
namespace cuda {
namespace persistent {

// 8 warps: the dot products give each warp R/8 rows; one block per SM (the grid must be co-resident,
// and more blocks would only add sync participants and partial sums).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__host__ __device__ constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared memory of a block, in bytes; the kernels carve it in this order.
template <class U>
size_t fwd_smem_bytes(int B, int H, int units, int bt) {
  using A = acc_t<typename U::T>;
  const size_t R = size_t(U::G) * units, Bp = round_up(B, bt);
  // w_s [R][H] T_ | h_s [Bp][H] A | g_s [R][Bp] A | c_s [B][U] A
  return align16(R * H * sizeof(typename U::T)) + (Bp * H + R * Bp + size_t(B) * units) * sizeof(A);
}

template <class U>
size_t bwd_smem_bytes(int B, int H, int units, int bt) {
  using A = acc_t<typename U::T>;
  const size_t R = size_t(U::G) * units, Bp = round_up(B, bt);
  const size_t red = size_t(B) * units > size_t(kThreads) ? size_t(B) * units : size_t(kThreads);
  // w_s [R][H] T_ | d_s [R][Bp] A | carry_s [B][U] A | dc_s [B][U] A | red_s [max(threads, B*U)] A
  return align16(R * H * sizeof(typename U::T)) + (R * Bp + 2 * size_t(B) * units + red) * sizeof(A);
}

// w_s[r][kk] = W_hh[k*H + j0 + jl][kk] for the block's rows, zero rows for units past H.
template <class U>
__device__ void load_weights(typename U::T* w_s, const void* w_hh, int64_t H, int units, int64_t j0, int nb) {
  using T_ = typename U::T;
  const T_* w = static_cast<const T_*>(w_hh);
  const int R = U::G * units;
  for (int64_t e = threadIdx.x; e < int64_t(R) * H; e += blockDim.x) {
    const int r = int(e / H);
    const int64_t kk = e - int64_t(r) * H;
    const int k = r / units, jl = r - k * units;
    w_s[e] = jl < nb ? w[(k * H + j0 + jl) * H + kk] : from_acc<T_>(acc_t<T_>(0));
  }
}

// dst[0:n] = src[0:n] (shared <- global), 16-byte vectors when both ends allow it: at B=8, H=1024 this
// is 32 KiB per block per step, and scalar loads would be 4x the L2 requests.
template <typename A>
__device__ void copy_to_shared(A* dst, const A* src, int64_t n) {
  using V = typename std::conditional<sizeof(A) == 4, float4, double2>::type;
  constexpr int kPer = sizeof(V) / sizeof(A);
  const bool vec = n % kPer == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (vec) {
    V* d = reinterpret_cast<V*>(dst);
    const V* s = reinterpret_cast<const V*>(src);
#pragma unroll 4
    for (int64_t e = threadIdx.x; e < n / kPer; e += blockDim.x) d[e] = s[e];
  } else {
#pragma unroll 4
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = src[e];
  }
}

template <class U, int BT>
__global__ void __launch_bounds__(kThreads, 1) persistent_fwd_kernel(FwdParams p, int units, void* workspace) {
  using T_ = typename U::T;
  using A = acc_t<T_>;
  constexpr int G = U::G;
  cg::grid_group grid = cg::this_grid();
  const int64_t T = p.T, H = p.H;
  const int B = int(p.B), R = G * units, Bp = round_up(B, BT);
  const int64_t j0 = int64_t(blockIdx.x) * units;
  const int nb = int(H - j0 < units ? H - j0 : units);  // units of this block (the last may have fewer)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  unsigned char* smem = dynamic_smem();
  T_* w_s = reinterpret_cast<T_*>(smem);
  A* h_s = reinterpret_cast<A*>(smem + align16(size_t(R) * H * sizeof(T_)));  // [Bp][H] h_{t-1}
  A* g_s = h_s + int64_t(Bp) * H;                                               // [R][Bp] recurrent sums
  A* c_s = g_s + R * Bp;                                                        // [B][U] LSTM c
  // [2][B][H] ping-pong h; written and read across blocks within this launch, so it is read with
  // plain loads (never the read-only path: no const __restrict__ on it).
  A* hbuf = static_cast<A*>(workspace);

  load_weights<U>(w_s, p.w_hh, H, units, j0, nb);
  for (int64_t e = int64_t(B) * H + threadIdx.x; e < int64_t(Bp) * H; e += blockDim.x) h_s[e] = A(0);
  for (int e = threadIdx.x; e < B * nb; e += blockDim.x) {
    const int b = e / nb, jl = e - b * nb;
    c_s[b * units + jl] = U::kHasCell ? load<T_>(p.c0, b * H + j0 + jl) : A(0);
  }

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    A* dst = hbuf + ((s + 1) & 1) * int64_t(B) * H;
    // h_{t-1} for every batch row: h0 at the first step, then what all blocks wrote before the sync.
    if (s == 0) {
      for (int64_t e = threadIdx.x; e < int64_t(B) * H; e += blockDim.x) h_s[e] = load<T_>(p.h0, e);
    } else {
      copy_to_shared(h_s, hbuf + (s & 1) * int64_t(B) * H, int64_t(B) * H);
    }
    __syncthreads();

    // g_s[r][b] = w_s[r,:] . h_s[b,:]: a warp per row, lanes stride over H (conflict-free shared loads),
    // BT batch rows per pass so each weight load feeds BT FMAs.
    for (int r = warp; r < R; r += kWarps) {
      const T_* wr = w_s + int64_t(r) * H;
      for (int b0 = 0; b0 < Bp; b0 += BT) {
        A acc[BT];
#pragma unroll
        for (int bb = 0; bb < BT; ++bb) acc[bb] = A(0);
        for (int64_t kk = lane; kk < H; kk += 32) {
          const A wv = to_acc(wr[kk]);
#pragma unroll
          for (int bb = 0; bb < BT; ++bb) acc[bb] += wv * h_s[(b0 + bb) * H + kk];
        }
#pragma unroll
        for (int bb = 0; bb < BT; ++bb) acc[bb] = warp_sum(acc[bb]);
        if (lane == 0) {
#pragma unroll
          for (int bb = 0; bb < BT; ++bb) g_s[r * Bp + b0 + bb] = acc[bb];
        }
      }
    }
    __syncthreads();

    for (int e = threadIdx.x; e < B * nb; e += blockDim.x) {
      const int b = e / nb, jl = e - b * nb;
      const int64_t j = j0 + jl;
      const bool active = is_active(p.lengths, t, b);
      A gh[G];
#pragma unroll
      for (int k = 0; k < G; ++k)
        gh[k] = g_s[(k * units + jl) * Bp + b] + (p.b_hh != nullptr ? load<T_>(p.b_hh, k * H + j) : A(0));
      const A h_prev = h_s[b * H + j];
      A c = c_s[b * units + jl];
      const A out = U::fwd(p, t, b, j, active, gh, h_prev, c);  // h_prev when inactive
      c_s[b * units + jl] = c;
      dst[b * H + j] = out;
      store<T_>(p.y, (t * B + b) * H + j, active ? out : A(0));
      if (s == T - 1) {
        store<T_>(p.h_n, b * H + j, out);
        if (U::kHasCell) store<T_>(p.c_n, b * H + j, c);
      }
    }
    // The next step reads every block's h_t; the last step needs no sync (each block wrote its own
    // h_n, c_n). grid.sync() also orders the global writes and acts as a block barrier for the smem.
    if (s + 1 < T) grid.sync();
  }
}

// Backward: red_s[slice * items + item] = sum of prev[q][b][j0 + jl] over the blocks q = slice, slice + S,
// ..., for item = b * nb + jl and S = the returned number of slices. All threads of the block load at
// once: B*U threads alone would leave most of the 256 idle, each with #blocks loads (132 on an H100) in a
// dependent chain. The caller adds the S slices in slice order, so the sum is deterministic.
template <typename A>
__device__ int sum_partials(A* red_s, const A* prev, int B, int64_t H, int64_t j0, int nb, int64_t blocks) {
  const int items = B * nb;
  const int fit = int(blockDim.x) / items;
  const int slices = fit < 1 ? 1 : (fit > blocks ? int(blocks) : fit);
  for (int e = threadIdx.x; e < items * slices; e += blockDim.x) {
    const int slice = e / items, item = e - slice * items;
    const int b = item / nb, jl = item - b * nb;
    const A* col = prev + int64_t(b) * H + j0 + jl;
    A sum = A(0);
#pragma unroll 8
    for (int64_t q = slice; q < blocks; q += slices) sum += col[q * B * H];
    red_s[e] = sum;
  }
  return slices;
}

template <class U, int BT>
__global__ void __launch_bounds__(kThreads, 1) persistent_bwd_kernel(BwdParams p, int units, void* workspace) {
  using T_ = typename U::T;
  using A = acc_t<T_>;
  constexpr int G = U::G;
  cg::grid_group grid = cg::this_grid();
  const int64_t T = p.T, H = p.H;
  const int B = int(p.B), R = G * units, Bp = round_up(B, BT);
  const int64_t j0 = int64_t(blockIdx.x) * units;
  const int nb = int(H - j0 < units ? H - j0 : units);
  const int64_t blocks = gridDim.x;

  unsigned char* smem = dynamic_smem();
  T_* w_s = reinterpret_cast<T_*>(smem);
  A* d_s = reinterpret_cast<A*>(smem + align16(size_t(R) * H * sizeof(T_)));  // [R][Bp] dg of this step
  A* carry_s = d_s + R * Bp;                                                    // [B][U] dh not through W_hh
  A* dc_s = carry_s + B * units;                                                // [B][U] LSTM dc
  A* red_s = dc_s + B * units;  // [slices][B*nb] partial sums over blocks (sum_partials)
  // [2][blocks][B][H] partial products, ping-pong; cross-block data, plain loads (see the forward).
  A* part = static_cast<A*>(workspace);
  const int64_t part_stride = blocks * B * H;

  load_weights<U>(w_s, p.w_hh, H, units, j0, nb);
  for (int e = threadIdx.x; e < R * Bp; e += blockDim.x) d_s[e] = A(0);  // rows/batch past the end stay 0
  for (int e = threadIdx.x; e < B * nb; e += blockDim.x) {
    const int b = e / nb, jl = e - b * nb;
    carry_s[b * units + jl] = load<T_>(p.dh_n, b * H + j0 + jl);
    dc_s[b * units + jl] = U::kHasCell ? load<T_>(p.dc_n, b * H + j0 + jl) : A(0);
  }
  __syncthreads();

  // dh into h_t of unit (b, j) = item e: the carried part plus every block's partial of the previous
  // step, as summed by sum_partials into `slices` slices (none at the first step).
  auto recurrent_dh = [&](int e, int b, int jl, int slices) {
    A dh = carry_s[b * units + jl];
    for (int sl = 0; sl < slices; ++sl) dh += red_s[sl * B * nb + e];
    return dh;
  };

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? s : T - 1 - s;  // the forward order, reversed
    A* cur = part + (s & 1) * part_stride + int64_t(blockIdx.x) * B * H;
    int slices = 0;
    if (s > 0) {
      slices = sum_partials(red_s, part + ((s + 1) & 1) * part_stride, B, H, j0, nb, blocks);  // from step s-1
      __syncthreads();
    }

    for (int e = threadIdx.x; e < B * nb; e += blockDim.x) {
      const int b = e / nb, jl = e - b * nb;
      const int64_t j = j0 + jl;
      const bool active = is_active(p.lengths, t, b);
      // A reset at the step processed before this one: nothing is carried into h_t, c_t.
      const bool cut = carried_gradient_is_cut(p, t, b);
      const A dh_rec = cut ? A(0) : recurrent_dh(e, b, jl, slices);
      // dy is ignored at inactive steps (it may hold anything there).
      const A dm = active ? dh_rec + load<T_>(p.dy, (t * B + b) * H + j) : A(0);
      A dc = cut ? A(0) : dc_s[b * units + jl];
      A dg[G];
      const A direct = U::bwd(p, t, b, j, active, dm, dc, dg);
      dc_s[b * units + jl] = dc;
      carry_s[b * units + jl] = active ? direct : dh_rec;
#pragma unroll
      for (int k = 0; k < G; ++k) d_s[(k * units + jl) * Bp + b] = dg[k];
    }
    __syncthreads();

    // cur[b][kk] = sum_r d_s[r][b] w_s[r][kk]: a thread per column kk (conflict-free w_s loads; d_s is a
    // broadcast), BT batch rows per pass.
    for (int64_t kk = threadIdx.x; kk < H; kk += blockDim.x) {
      for (int b0 = 0; b0 < Bp; b0 += BT) {
        A acc[BT];
#pragma unroll
        for (int bb = 0; bb < BT; ++bb) acc[bb] = A(0);
        for (int r = 0; r < R; ++r) {
          const A wv = to_acc(w_s[int64_t(r) * H + kk]);
#pragma unroll
          for (int bb = 0; bb < BT; ++bb) acc[bb] += d_s[r * Bp + b0 + bb] * wv;
        }
#pragma unroll
        for (int bb = 0; bb < BT; ++bb)
          if (b0 + bb < B) cur[int64_t(b0 + bb) * H + kk] = acc[bb];
      }
    }
    // Always sync, the last step too: dh0 below sums the other blocks' partials.
    grid.sync();
  }

  const int slices = sum_partials(red_s, part + ((T - 1) & 1) * part_stride, B, H, j0, nb, blocks);
  __syncthreads();
  const int64_t past_end = p.reverse ? T : -1;  // one past the last processed step: the cut of dh0, dc0
  for (int e = threadIdx.x; e < B * nb; e += blockDim.x) {
    const int b = e / nb, jl = e - b * nb;
    const bool cut = carried_gradient_is_cut(p, past_end, b);
    store<T_>(p.dh0, b * H + j0 + jl, cut ? A(0) : recurrent_dh(e, b, jl, slices));
    if (U::kHasCell) store<T_>(p.dc0, b * H + j0 + jl, cut ? A(0) : dc_s[b * units + jl]);
  }
}

template <class U, int BT>
const void* kernel_of(bool backward) {
  return backward ? reinterpret_cast<const void*>(&persistent_bwd_kernel<U, BT>)
                  : reinterpret_cast<const void*>(&persistent_fwd_kernel<U, BT>);
}

template <class U>
const void* kernel_for(bool backward, int bt) {
  switch (bt) {
    case 1:
      return kernel_of<U, 1>(backward);
    case 4:
      return kernel_of<U, 4>(backward);
    default:
      return kernel_of<U, 8>(backward);
  }
}

// What a plan needs to know of one kernel on one device, set up once per (kernel, device) and cached
// (issue 13): the device attributes, the kernel's dynamic shared-memory limit raised once to all the
// device offers (so no launch sets it again, and two host threads cannot race on a smaller value set
// between another thread's set and launch), and the blocks per SM at that limit. The set-up also loads
// the kernel's module (cudaFuncGetAttributes), so that with CUDA's lazy loading a later call inside a
// CUDA-graph capture neither loads a module nor queries anything: plans are then pure host arithmetic.
struct KernelSetup {
  cudaError_t err = cudaSuccess;
  bool cooperative = false;
  int sms = 0;
  int max_dynamic_smem = 0;  // opt-in shared memory per block less the kernel's static shared memory
  int blocks_per_sm = 0;     // resident blocks per SM at max_dynamic_smem (a lower bound for less)
};

inline KernelSetup setup_kernel(const void* kernel, int device) {
  KernelSetup s;
  int coop = 0, optin = 0;
  cudaFuncAttributes attr{};
  cudaError_t& err = s.err;
  err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return s;
  s.cooperative = coop != 0;
  s.max_dynamic_smem = optin - int(attr.sharedSizeBytes);
  // Function attributes belong to the current device's context: bindings.cpp's CUDAGuard made `device`
  // current before planning.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, s.max_dynamic_smem);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&s.blocks_per_sm, kernel, kThreads, s.max_dynamic_smem);
  return s;
}

// The cached set-up of `kernel` on `device` (thread-safe: the first caller sets up under the lock, the
// others wait for it). A failed set-up is not cached, so its error is returned again on the next call.
inline KernelSetup kernel_setup(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelSetup> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const KernelSetup s = setup_kernel(kernel, device);
  if (s.err == cudaSuccess) cache.emplace(key, s);
  return s;
}

template <class U>
cudaError_t plan_for(bool backward, int64_t B, int64_t H, int device, PersistentPlan* plan) {
  const int bt = batch_tile(B);
  const KernelSetup k = kernel_setup(kernel_for<U>(backward, bt), device);
  if (k.err != cudaSuccess) return k.err;
  if (!k.cooperative) {
    plan->why = "the device does not support cooperative launches";
    return cudaSuccess;
  }
  // One block per SM, or one unit per block when H < #SMs.
  const int64_t want = H < k.sms ? H : k.sms;
  const int units = int((H + want - 1) / want);
  const int blocks = int((H + units - 1) / units);
  const size_t smem = backward ? bwd_smem_bytes<U>(int(B), int(H), units, bt) : fwd_smem_bytes<U>(int(B), int(H), units, bt);
  if (smem > size_t(k.max_dynamic_smem)) {
    plan->why = "W_hh does not fit in the shared memory of the SMs";
    return cudaSuccess;
  }
  // blocks <= #SMs, so one resident block per SM is enough; blocks_per_sm was measured with the most
  // shared memory a block can have, and a block with less is resident at least as often.
  if (int64_t(k.blocks_per_sm) * k.sms < blocks) {
    plan->why = "the blocks cannot all be resident at once (occupancy)";
    return cudaSuccess;
  }
  plan->ok = true;
  plan->why = "";
  plan->blocks = blocks;
  plan->units = units;
  plan->batch_tile = bt;
  plan->threads = kThreads;
  plan->smem_bytes = smem;
  plan->workspace_acc = backward ? 2 * int64_t(blocks) * B * H : 2 * B * H;
  return cudaSuccess;
}

template <class U, class Params>
cudaError_t launch(const Params& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream, bool backward) {
  // No attribute is set here: plan_for's set-up raised the kernel's limit once to the device's maximum.
  const void* kernel = kernel_for<U>(backward, plan.batch_tile);
  Params params = p;
  int units = plan.units;
  void* args[] = {&params, &units, &workspace};
  return cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), args, plan.smem_bytes, stream);
}

template <class U>
cudaError_t launch_fwd(const FwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream) {
  return launch<U>(p, plan, workspace, stream, false);
}

template <class U>
cudaError_t launch_bwd(const BwdParams& p, const PersistentPlan& plan, void* workspace, cudaStream_t stream) {
  return launch<U>(p, plan, workspace, stream, true);
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fastrnn

// Explicit instantiations of the entry points for one unit template (LstmUnit, GruUnit, RnnUnit) in
// every storage type.
#define FASTRNN_INSTANTIATE_PERSISTENT_T(UNIT, T_)                                                          \
  template cudaError_t fastrnn::cuda::persistent::plan_for<fastrnn::cuda::UNIT<T_>>(                      \
      bool, int64_t, int64_t, int, fastrnn::cuda::PersistentPlan*);                                        \
  template cudaError_t fastrnn::cuda::persistent::launch_fwd<fastrnn::cuda::UNIT<T_>>(                    \
      const fastrnn::cuda::FwdParams&, const fastrnn::cuda::PersistentPlan&, void*, cudaStream_t);         \
  template cudaError_t fastrnn::cuda::persistent::launch_bwd<fastrnn::cuda::UNIT<T_>>(                    \
      const fastrnn::cuda::BwdParams&, const fastrnn::cuda::PersistentPlan&, void*, cudaStream_t);
#define FASTRNN_INSTANTIATE_PERSISTENT(UNIT)            \
  FASTRNN_INSTANTIATE_PERSISTENT_T(UNIT, float)         \
  FASTRNN_INSTANTIATE_PERSISTENT_T(UNIT, double)        \
  FASTRNN_INSTANTIATE_PERSISTENT_T(UNIT, __half)        \
  FASTRNN_INSTANTIATE_PERSISTENT_T(UNIT, __nv_bfloat16)
