// A register-blocked GEMM for the small hidden products of one recurrence step, C[M, N] (+)= A[M, K] @ R[K, N]
// (row-major, acc_t = float or double), called straight on raw pointers.
//
// Legend: M rows (the batch B), N columns (G*H forward, Hout backward), K inner (Hout forward, G*H
// backward); MR x NV: a tile of MR rows and NV vectors of columns held in registers.
//
// Why it exists: at B=1, H=128 a step's product is 65K multiply-adds, ~2 us of math, while at::mm_out costs
// ~5-15 us of dispatch and BLAS set-up per call (measured in docs/cpu.md); StepGemm (recurrence.h) picks
// this kernel below a size threshold and at::mm_out (MKL) above it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fastrnn {
namespace cpu {

// One MR x (NV vectors) tile over the whole K: the accumulators stay in registers (MR * NV <= 8 of the 16
// AVX2 registers), each k loads NV vectors of R once and broadcasts MR values of A.
template <typename acc_t, int MR, int NV>
inline void gemm_tile(const acc_t* a, int64_t lda, const acc_t* r, int64_t ldr, acc_t* c, int64_t ldc, int64_t K,
                      bool accumulate) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = accumulate ? Vec::loadu(c + m * ldc + v * VS) : Vec(acc_t(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* r_k = r + k * ldr;
    Vec rv[NV];
    for (int v = 0; v < NV; ++v) {
      rv[v] = Vec::loadu(r_k + v * VS);
    }
    for (int m = 0; m < MR; ++m) {
      const Vec a_mk(a[m * lda + k]);
      for (int v = 0; v < NV; ++v) {
        acc[m][v] = at::vec::fmadd(a_mk, rv[v], acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      acc[m][v].store(c + m * ldc + v * VS);
    }
  }
}

// Columns [n0, n0 + n) (n < one vector) of MR rows, one scalar at a time: the ragged right edge.
template <typename acc_t, int MR>
inline void gemm_edge(const acc_t* a, int64_t lda, const acc_t* r, int64_t ldr, acc_t* c, int64_t ldc, int64_t K,
                      int64_t n, bool accumulate) {
  for (int m = 0; m < MR; ++m) {
    for (int64_t j = 0; j < n; ++j) {
      acc_t s = accumulate ? c[m * ldc + j] : acc_t(0);
      for (int64_t k = 0; k < K; ++k) {
        s += a[m * lda + k] * r[k * ldr + j];
      }
      c[m * ldc + j] = s;
    }
  }
}

// All M rows of the NV-vector-wide column panel at R + n, C + n: rows 4 at a time, then the last 1-3.
// Rows are the inner loop so that the panel of R (K x NV vectors, 8 KB at K = 128, NV = 2) stays in L1.
template <typename acc_t, int NV>
inline void gemm_panel(const acc_t* a, int64_t lda, const acc_t* r, int64_t ldr, acc_t* c, int64_t ldc, int64_t M,
                       int64_t K, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    gemm_tile<acc_t, 4, NV>(a + m * lda, lda, r, ldr, c + m * ldc, ldc, K, accumulate);
  }
  switch (M - m) {
    case 3:
      gemm_tile<acc_t, 3, NV>(a + m * lda, lda, r, ldr, c + m * ldc, ldc, K, accumulate);
      break;
    case 2:
      gemm_tile<acc_t, 2, NV>(a + m * lda, lda, r, ldr, c + m * ldc, ldc, K, accumulate);
      break;
    case 1:
      gemm_tile<acc_t, 1, NV>(a + m * lda, lda, r, ldr, c + m * ldc, ldc, K, accumulate);
      break;
    default:
      break;
  }
}

// Columns [n0, n1) of C for all M rows, on the calling thread: panels of NV = 2 vectors (4 x 2 tiles,
// 8 accumulators), or NV = 4 for a single row (bound by loading R, one vector per multiply-add, so four
// independent chains suffice), then single vectors, then the scalar edge.
template <typename acc_t>
inline void gemm_columns(const acc_t* a, int64_t lda, const acc_t* r, int64_t ldr, acc_t* c, int64_t ldc,
                         int64_t M, int64_t K, int64_t n0, int64_t n1, bool accumulate) {
  constexpr int64_t VS = at::vec::Vectorized<acc_t>::size();
  int64_t n = n0;
  if (M == 1) {
    for (; n + 4 * VS <= n1; n += 4 * VS) {
      gemm_tile<acc_t, 1, 4>(a, lda, r + n, ldr, c + n, ldc, K, accumulate);
    }
  }
  for (; n + 2 * VS <= n1; n += 2 * VS) {
    gemm_panel<acc_t, 2>(a, lda, r + n, ldr, c + n, ldc, M, K, accumulate);
  }
  for (; n + VS <= n1; n += VS) {
    gemm_panel<acc_t, 1>(a, lda, r + n, ldr, c + n, ldc, M, K, accumulate);
  }
  if (n < n1) {
    for (int64_t m = 0; m < M; ++m) {
      gemm_edge<acc_t, 1>(a + m * lda, lda, r + n, ldr, c + m * ldc + n, ldc, K, n1 - n, accumulate);
    }
  }
}

}  // namespace cpu
}  // namespace fastrnn
