// Device-side helpers shared by the CUDA kernels: storage <-> math type conversion, the dtype switch,
// warp sums, the activity rule of variable lengths and its companion for episode resets.
//
// Legend: T steps, B batch, H hidden units, G gates, GH = G*H; T_ is the storage type (float, double,
// __half, __nv_bfloat16) and A = acc_t<T_> the math type (double for double, float otherwise).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_api.h"

namespace fastrnn {
namespace cuda {

template <typename T_>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T_>
using acc_t = typename Acc<T_>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T_>
__device__ __forceinline__ T_ from_acc(acc_t<T_> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Typed element access through the untyped pointers of the params structs.
template <typename T_>
__device__ __forceinline__ acc_t<T_> load(const void* base, int64_t i) {
  return to_acc(static_cast<const T_*>(base)[i]);
}
template <typename T_>
__device__ __forceinline__ void store(void* base, int64_t i, acc_t<T_> v) {
  static_cast<T_*>(base)[i] = from_acc<T_>(v);
}

// Sequence b is active at step t iff t < lengths[b] (docs/contract.md); lengths are only compared,
// never used as an index, so out-of-range values cannot cause an out-of-bounds access.
__device__ __forceinline__ bool is_active(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

// Its companion for episode resets (docs/contract.md): step t of sequence b starts from a zero state iff
// it is active and resets[t, b]; inactive steps ignore the mask. One byte per (t, b), read beside the
// lengths test, nothing when resets is null (the resets=None path pays one pointer test per row).
// resets_at is the mask alone, for code that runs at active steps only (units.cuh).
template <class Params>
__device__ __forceinline__ bool resets_at(const Params& p, int64_t t, int64_t b) {
  return p.resets != nullptr && p.resets[t * p.B + b] != 0;
}
template <class Params>
__device__ __forceinline__ bool starts_from_zero(const Params& p, int64_t t, int64_t b) {
  return resets_at(p, t, b) && is_active(p.lengths, t, b);
}

// In backward, whether the gradient carried into step t of sequence b (from the step processed just
// before it: t + 1, or t - 1 for a reverse op) is cut, because that step started from a zero state.
// Both schemes cut the carried dh (and LSTM dc) when they read it, not where the reset is: the step
// scheme's GEMM adds dg_t W_hh to every row after the pointwise kernel, and reading it as 0 one step
// later leaves that GEMM's operands, and so the resets=None bits, untouched. t may be one past the last
// processed step (-1, or T for a reverse op): the cut of dh0 / dc0.
template <class Params>
__device__ __forceinline__ bool carried_gradient_is_cut(const Params& p, int64_t t, int64_t b) {
  if (p.resets == nullptr) return false;
  const int64_t t_before = p.reverse ? t - 1 : t + 1;
  return t_before >= 0 && t_before < p.T && starts_from_zero(p, t_before, b);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

#if defined(__CUDACC__)
// The block's dynamic shared memory (sized at launch), carved by each kernel into typed arrays. Behind a
// function so that the host emulator of the tests (csrc/cuda/emu/emulator.h, compiled without nvcc)
// can give every emulated block its own.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fastrnn_dynamic_smem[];
  return fastrnn_dynamic_smem;
}
#endif

// Runs the statement with `scalar_t` bound to the storage type of `dtype`; an unknown dtype returns
// cudaErrorInvalidValue from the enclosing launcher.
#define FASTRNN_DISPATCH_DTYPE(dtype, ...)               \
  switch (dtype) {                                       \
    case ::fastrnn::cuda::DType::kFloat32: {             \
      using scalar_t = float;                            \
      __VA_ARGS__;                                       \
    } break;                                             \
    case ::fastrnn::cuda::DType::kFloat64: {             \
      using scalar_t = double;                           \
      __VA_ARGS__;                                       \
    } break;                                             \
    case ::fastrnn::cuda::DType::kFloat16: {             \
      using scalar_t = __half;                           \
      __VA_ARGS__;                                       \
    } break;                                             \
    case ::fastrnn::cuda::DType::kBFloat16: {            \
      using scalar_t = __nv_bfloat16;                    \
      __VA_ARGS__;                                       \
    } break;                                             \
    default:                                             \
      return cudaErrorInvalidValue;                      \
  }

// Blocks for a grid-stride loop over n elements: enough to fill the device, capped below the 2^31-1
// limit of gridDim.x (the loop covers the rest).
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace cuda
}  // namespace fastrnn
