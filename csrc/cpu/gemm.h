// The hidden product of one recurrence step for small and medium sizes, C[M, N] = A[M, K] @ R[K, N]
// (acc_t = float or double), on packed weights and straight on raw pointers.
//
// Legend: M rows (the batch B), K inner (Hout forward, G*H backward), N = groups * width columns
// (forward: G gates of H units; backward: 1 group of Hout), P = panel width (2 vectors: 16 floats,
// 8 doubles), MR rows of a register tile.
//
// Why it exists: at B=1, H=128 a step's product is 65K multiply-adds, ~3 us of math, while at::mm_out costs
// ~5-15 us of dispatch and BLAS set-up per call; and the tile of one block of units for every gate can go
// straight into that block's cell update (recurrence.h, the fused step) with no [B, G*H] round trip.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "memory.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability

template <typename acc_t>
constexpr int64_t panel_width() {
  return 2 * at::vec::Vectorized<acc_t>::size();
}

// R [K, N] packed as panels [blocks][groups][K][P], blocks = ceil(width / P), columns past `width` zero.
// A panel is K*P contiguous values (8 KB at K = 128), streamed linearly by the tile. Unpacked, a tile would
// stride through R by N: at N = 512 floats that stride is 2 KB, which maps every row of the panel to the
// same two of the 64 L1 sets, so the panel could never stay in L1. Blocks outermost: a thread owns whole
// blocks (HiddenGemm::tiles takes every group of a block in turn), so at a small batch, where a step is one
// pass over the panels, each thread reads one contiguous stretch instead of one per group; the forward op a
// step at B=1, I=H=128 (Zen 5, AVX-512 copy, 1c4fbfc against 26081ea, 1 / 2 threads, p10 of 3 interleaved
// process pairs, us), LSTM 2.16 / 1.39, 2.31 / 1.54, 1.95 / 1.20 against [groups][blocks]'s 2.20 / 1.65,
// 2.42 / 2.54, 2.06 / 1.28; GRU 1.49-1.54 / 0.97-1.05 against 1.58-1.68 / 1.01-2.05; RNN H=256, LSTM H=256
// and larger batches within noise.
template <typename acc_t>
struct Panels {
  static constexpr int64_t P = panel_width<acc_t>();
  int64_t K = 0, groups = 0, width = 0, blocks = 0;
  at::Tensor data;

  Panels() = default;

  // r: [K, groups * width] in acc_t, any strides (a transposed view of W_hh is fine).
  Panels(const at::Tensor& r, int64_t groups_) : K(r.size(0)), groups(groups_), width(r.size(1) / groups_) {
    blocks = (width + P - 1) / P;
    // From the output cache at 2 MB and more (memory.h): a W_hh the panel cache does not keep (over 1 MB) is
    // packed at every call, into pages that would otherwise fault in again at every call.
    data = empty_output({groups * blocks * K * P}, r.options());
    const acc_t* src = r.const_data_ptr<acc_t>();
    const int64_t s0 = r.stride(0), s1 = r.stride(1);
    acc_t* dst = data.data_ptr<acc_t>();
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        acc_t* p = dst + (blk * groups + g) * K * P;
        const acc_t* col0 = src + (g * width + blk * P) * s1;
        const int64_t valid = std::min(P, width - blk * P);
        int64_t k = 0;
        if (s0 == 1 && valid == P) {
          // The transposed view of W_hh (forward): the panel is the transpose of P rows of W_hh, taken in
          // square blocks of one vector (at::vec's shuffle networks for float: 8 x 8 on AVX2, 16 x 16 on
          // AVX-512). AVX2: packing 4H x H at H = 128 took 16 us instead of 30 element by element. AVX-512
          // with 8 x 8 blocks (a masked 16 x 16 network each) added ~50 us a call at H = 128 (lstm_fwd at
          // T=1, B=1: 66 us against AVX2's 15), more than the AVX-512 step saves over 100 steps.
          constexpr int64_t kBlock = at::vec::Vectorized<acc_t>::size();
          for (; k + kBlock <= K; k += kBlock) {
            for (int64_t j = 0; j < P; j += kBlock) {
              at::vec::transpose_mxn<acc_t, kBlock, kBlock>(col0 + j * s1 + k, s1, p + k * P + j, P);
            }
          }
        }
        for (; k < K; ++k) {
          for (int64_t j = 0; j < valid; ++j) {
            p[k * P + j] = col0[k * s0 + j * s1];
          }
          for (int64_t j = valid; j < P; ++j) {
            p[k * P + j] = acc_t(0);
          }
        }
      }
    }
  }

  // The shape alone, no data: the dot and strided paths (HiddenGemm) read W_hh where it lies, block by block.
  Panels(int64_t K_, int64_t groups_, int64_t width_)
      : K(K_), groups(groups_), width(width_), blocks((width_ + P - 1) / P) {}

  const acc_t* panel(int64_t g, int64_t blk) const { return data.const_data_ptr<acc_t>() + (blk * groups + g) * K * P; }
};

// out[MR][P] = a[MR rows, K] @ panel[K][P], or += with `accumulate` (the later K blocks of a product); ldp:
// the panel's row stride (P packed; W_hh's row length where the backward reads W_hh as it lies, HiddenGemm).
// The accumulators stay in registers: MR x 2 vectors, and for MR <= 2 a second set over odd k, so that
// at least 4 independent FMA chains hide the 4-cycle FMA latency (a single row is then bound by streaming
// the panel from L2, ~1 vector a cycle). The two sets are separate arrays: one [2][MR][2] array indexed
// by the unrolled k made gcc 13 keep it on the stack (a store and reload per FMA: 4x slower at MR = 1).
template <typename acc_t, int MR>
inline void panel_tile(const acc_t* a, int64_t lda, const acc_t* panel, int64_t ldp, int64_t K, acc_t* out,
                       bool accumulate) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  constexpr int64_t P = 2 * VS;
  constexpr bool kSplitK = MR <= 2;
  Vec lo[MR], hi[MR], lo2[MR], hi2[MR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    lo[m] = hi[m] = lo2[m] = hi2[m] = Vec(acc_t(0));
  }
  int64_t k = 0;
  if constexpr (kSplitK) {
    for (; k + 2 <= K; k += 2) {
      const acc_t* p = panel + k * ldp;
      const Vec r0 = Vec::loadu(p), r1 = Vec::loadu(p + VS), r2 = Vec::loadu(p + ldp), r3 = Vec::loadu(p + ldp + VS);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const Vec a0(a[m * lda + k]), a1(a[m * lda + k + 1]);
        lo[m] = at::vec::fmadd(a0, r0, lo[m]);
        hi[m] = at::vec::fmadd(a0, r1, hi[m]);
        lo2[m] = at::vec::fmadd(a1, r2, lo2[m]);
        hi2[m] = at::vec::fmadd(a1, r3, hi2[m]);
      }
    }
  }
  for (; k < K; ++k) {
    const acc_t* p = panel + k * ldp;
    const Vec r0 = Vec::loadu(p), r1 = Vec::loadu(p + VS);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const Vec a0(a[m * lda + k]);
      lo[m] = at::vec::fmadd(a0, r0, lo[m]);
      hi[m] = at::vec::fmadd(a0, r1, hi[m]);
    }
  }
  // `out` is read only here, after the loop: loading it into the accumulators before the loop made gcc 13
  // keep them on the stack (a store per FMA).
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    Vec sum_lo = lo[m] + lo2[m], sum_hi = hi[m] + hi2[m];
    if (accumulate) {
      sum_lo = sum_lo + Vec::loadu(out + m * P);
      sum_hi = sum_hi + Vec::loadu(out + m * P + VS);
    }
    sum_lo.store(out + m * P);
    sum_hi.store(out + m * P + VS);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The tall fp32 tile of the AVX-512 copy: out[MR][32] (+)= a[MR rows, K] @ panel[K][32] for MR in 5..8, with
// 2*MR accumulators (16 of the 32 zmm registers at MR = 8). Per k: 2 panel loads and MR broadcasts feed 2*MR
// FMAs (the 4-row tile: 6 loads to 8 FMAs, and exactly the 8 independent chains that 2 FMAs a cycle at a
// 4-cycle latency need, with no slack). Written on raw __m512: on at::vec::Vectorized arrays gcc 12 stored
// all 16 accumulators to the stack after every k (objdump). Measured on the Intel Xeon (family 6 model 167,
// Sapphire/Emerald Rapids class, 2-core VM; 1 thread, a C copy of both tiles, fastest of 30): panel and A in
// L1 (K = 128, 24 rows) 4 rows 183-184 GFLOP/s, 8 rows 206-217, against 229 for 16 independent FMA chains;
// the whole product of an LSTM step at B=64, H=512 in the loop order of HiddenGemm::tiles 845 -> 762 us;
// the lstm_fwd op there 1746 -> 1625 us a step (CPU time, load 6.4). On the Zen 5 of the previous session
// an 8-row tile of this form measured equal to the 4-row one (B=64, H=512 743-750 vs 741-748 us a step), so
// both CPUs take it.
template <int MR>
inline void panel_tile_zmm(const float* a, int64_t lda, const float* panel, int64_t ldp, int64_t K, float* out,
                           bool accumulate) {
  constexpr int64_t P = 32;
  static_assert(panel_width<float>() == P, "the zmm tile is written for 16-float vectors");
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    lo[m] = hi[m] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* p = panel + k * ldp;
    const __m512 r0 = _mm512_loadu_ps(p), r1 = _mm512_loadu_ps(p + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 a0 = _mm512_set1_ps(a[m * lda + k]);
      lo[m] = _mm512_fmadd_ps(a0, r0, lo[m]);
      hi[m] = _mm512_fmadd_ps(a0, r1, hi[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    if (accumulate) {
      lo[m] = _mm512_add_ps(lo[m], _mm512_loadu_ps(out + m * P));
      hi[m] = _mm512_add_ps(hi[m], _mm512_loadu_ps(out + m * P + 16));
    }
    _mm512_storeu_ps(out + m * P, lo[m]);
    _mm512_storeu_ps(out + m * P + 16, hi[m]);
  }
}
#endif

// The most rows one call of panel_rows takes: 8 for fp32 in the AVX-512 copy (panel_tile_zmm), else 4.
template <typename acc_t>
constexpr int64_t tile_rows() {
#if defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<acc_t, float> ? 8 : 4;
#else
  return 4;
#endif
}

// Rows [m0, m0 + mr) (mr in 1..tile_rows<acc_t>()) of one panel of row stride ldp.
template <typename acc_t>
inline void panel_rows(const acc_t* a, int64_t lda, const acc_t* panel, int64_t ldp, int64_t K, int64_t mr,
                       acc_t* out, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    switch (mr) {
      case 8:
        return panel_tile_zmm<8>(a, lda, panel, ldp, K, out, accumulate);
      case 7:
        return panel_tile_zmm<7>(a, lda, panel, ldp, K, out, accumulate);
      case 6:
        return panel_tile_zmm<6>(a, lda, panel, ldp, K, out, accumulate);
      case 5:
        return panel_tile_zmm<5>(a, lda, panel, ldp, K, out, accumulate);
      default:
        break;
    }
  }
#endif
  switch (mr) {
    case 4:
      panel_tile<acc_t, 4>(a, lda, panel, ldp, K, out, accumulate);
      break;
    case 3:
      panel_tile<acc_t, 3>(a, lda, panel, ldp, K, out, accumulate);
      break;
    case 2:
      panel_tile<acc_t, 2>(a, lda, panel, ldp, K, out, accumulate);
      break;
    default:
      panel_tile<acc_t, 1>(a, lda, panel, ldp, K, out, accumulate);
      break;
  }
}

// ---------------------------------------------------------------------------------------------------
// The product on W where it lies: out[m][j] (+)= sum_k a[m, k] w[j, k] for m < MR, j < cols (<= P), with w
// rows of K contiguous values (W_hh [N, K] as torch holds it, the forward's R = W_hh^T). Dot products:
// JR = 4 rows of w and MR rows of a at a time, one vector of k each, summed across the vector at the end.
// Why: a forward call of a few steps with a W_hh the panel cache does not keep (over 1 MB) would pack it
// first, a transpose of the whole weight at every call (~370 us at 3 MB on the Intel Xeon), or take a
// library GEMV a step (MKL: ~27 us for [1,512]x[512,1536] plus ~12 us of dispatch, its own OpenMP region
// and a copy a step). Here a step streams W_hh once (MR rows of a share each load of w) inside the fused
// step of the recurrence (HiddenGemm's dot path, recurrence.h). The sums across a vector cost ~log2(VS)
// shuffles per (m, j): at K = 512, 32 FMAs per sum, so this is for large K and few rows.
// Up to MR = 4 rows of a share each load of w (w streams from L2 or L3: the limit at few rows), by JR = 4
// rows of w: MR x JR accumulators + JR loads of w + one of a, 21 of AVX-512's 32 registers. AVX2 and the
// default copy have 16, so JR = 2 there from MR = 3 (11 live); at MR <= 2 JR = 4 keeps 4-8 independent
// FMA chains (AVX2 copy on the Intel Xeon, GRU H=512 B=1 forward op: 28 us at T=1 with JR = 4, 33.5 with 2).
constexpr int kDotTileRows = 4;

template <typename acc_t, int MR>
constexpr int dot_tile_cols() {
  return at::vec::Vectorized<acc_t>::size() * static_cast<int>(sizeof(acc_t)) == 64 || MR <= 2 ? 4 : 2;
}

template <typename acc_t, int MR, int JR>
inline void dot_block(const acc_t* a, int64_t lda, const acc_t* w, int64_t ldw, int64_t K, acc_t* out,
                      int64_t ldo, bool accumulate) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  // One array per row of w: a 2-D array of Vectorized made gcc keep the accumulators on the stack
  // (panel_tile's note).
  Vec s0[MR], s1[MR], s2[MR], s3[MR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    s0[m] = s1[m] = s2[m] = s3[m] = Vec(acc_t(0));
  }
  // Forced inline: as a call (gcc 12 made one a k) the w vectors and the sums went through memory.
  auto madd = [&](const Vec* wv, int64_t k, int64_t count) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const Vec av = Vec::loadu(a + m * lda + k, count);
      s0[m] = at::vec::fmadd(av, wv[0], s0[m]);
      if constexpr (JR > 1) {
        s1[m] = at::vec::fmadd(av, wv[1], s1[m]);
      }
      if constexpr (JR > 2) {
        s2[m] = at::vec::fmadd(av, wv[2], s2[m]);
        s3[m] = at::vec::fmadd(av, wv[3], s3[m]);
      }
    }
  };
  int64_t k = 0;
  for (; k + VS <= K; k += VS) {
    Vec wv[JR];
#pragma GCC unroll 4
    for (int j = 0; j < JR; ++j) {
      wv[j] = Vec::loadu(w + j * ldw + k);
    }
    madd(wv, k, VS);
  }
  if (k < K) {  // the tail of K: partial loads fill the rest of the vector with zeros
    Vec wv[JR];
#pragma GCC unroll 4
    for (int j = 0; j < JR; ++j) {
      wv[j] = Vec::loadu(w + j * ldw + k, K - k);
    }
    madd(wv, k, K - k);
  }
  const auto plus = [](Vec x, Vec y) { return x + y; };
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const Vec* sums[4] = {&s0[m], &s1[m], &s2[m], &s3[m]};
#pragma GCC unroll 4
    for (int j = 0; j < JR; ++j) {
      const acc_t sum = at::vec::vec_reduce_all<acc_t>(plus, *sums[j]);
      out[m * ldo + j] = accumulate ? out[m * ldo + j] + sum : sum;
    }
  }
}

// Rows [0, mr) (mr in 1..kDotTileRows) of a by `cols` rows of w into out[m * P + j].
template <typename acc_t, int MR>
inline void dot_rows_mr(const acc_t* a, int64_t lda, const acc_t* w, int64_t ldw, int64_t K, int64_t cols,
                        acc_t* out, bool accumulate) {
  constexpr int64_t P = panel_width<acc_t>();
  constexpr int JR = dot_tile_cols<acc_t, MR>();
  int64_t j = 0;
  for (; j + JR <= cols; j += JR) {
    dot_block<acc_t, MR, JR>(a, lda, w + j * ldw, ldw, K, out + j, P, accumulate);
  }
  for (; j < cols; ++j) {
    dot_block<acc_t, MR, 1>(a, lda, w + j * ldw, ldw, K, out + j, P, accumulate);
  }
}

template <typename acc_t>
inline void dot_rows(const acc_t* a, int64_t lda, const acc_t* w, int64_t ldw, int64_t K, int64_t cols,
                     int64_t mr, acc_t* out, bool accumulate) {
  static_assert(kDotTileRows == 4, "dot_rows takes 1 to 4 rows");
  if (mr == 4) {
    return dot_rows_mr<acc_t, 4>(a, lda, w, ldw, K, cols, out, accumulate);
  }
  if (mr == 3) {
    return dot_rows_mr<acc_t, 3>(a, lda, w, ldw, K, cols, out, accumulate);
  }
  if (mr == 2) {
    return dot_rows_mr<acc_t, 2>(a, lda, w, ldw, K, cols, out, accumulate);
  }
  dot_rows_mr<acc_t, 1>(a, lda, w, ldw, K, cols, out, accumulate);
}

// ---------------------------------------------------------------------------------------------------
// bf16 weights with the avx512_bf16 dot product (AVX-512 copy only, and only on a CPU that has it).
//
// vdpbf16ps multiplies pairs of bf16 and adds both products to one fp32 lane: acc[j] += a[k] w[k][j] +
// a[k+1] w[k+1][j]. So the panel holds the weights as bf16 PAIRS along K: [groups][blocks][K/2][P][2],
// which is exactly a Panels<float> (same code, same layout) of the 32-bit pairs: W [N, K] in bf16 viewed as
// [N, K/2] 32-bit words (bits moved, never converted). A panel of K rows is half the bytes of the fp32 one,
// and one instruction does 32 multiply-adds instead of 16. The operand a (the state h_{t-1} or the
// gradient da, fp32 in the kernels) is rounded to bf16 a step (the caller: HiddenGemm), the sums stay fp32.
// Why only bf16 storage: the weights are then bf16 already (packing them loses nothing); an fp32 or fp16
// weight rounded to bf16 would lose 16 or 3 mantissa bits. No instruction of this runs unless
// bf16_dot_supported() (CPUID, at run time): the AVX-512 library itself requires only F/BW/VL/DQ.
#if defined(CPU_CAPABILITY_AVX512)
#define FASTRNN_BF16_DOT 1

// Whether this CPU (and OS) runs avx512_bf16 (the AVX-512 state itself is checked before this copy loads).
inline bool bf16_dot_supported() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

// Two fp32 values that are exact in bf16 (their low 16 bits are 0) as one 32-bit word of bf16 pairs: the
// first in the low half (vdpbf16ps's even element). Integer ops only; gcc vectorises the loops below.
inline uint32_t bf16_pair_word(const float* lo, const float* hi) {
  uint32_t a, b;
  std::memcpy(&a, lo, 4);
  std::memcpy(&b, hi, 4);
  return (a >> 16) | (b & 0xFFFF0000u);
}

// R [K, N] fp32 whose values are exact in bf16 (HiddenGemm: bf16 weights widened by to_acc) -> the pair
// panels, K padded to even with zeros. Forward R is the transposed view of W_hh [N, K] (stride(0) == 1): its
// pairs are adjacent in W_hh's rows, so the words are built as [N, K/2] and Panels' square-block transpose
// packs them. Backward R is W_hh [K, N] itself: rows k and k+1 pair up into [K/2, N]. (Interleaving with
// torch copies instead cost 2x the fp32 path's packing a call: LSTM backward, 1 thread, B=1, H=128 63 us
// against 20, B=64, H=512 1382 against 1000.)
inline Panels<float> bf16_pair_panels(const at::Tensor& r, int64_t groups) {
  TORCH_CHECK(r.scalar_type() == at::kFloat, "bf16_pair_panels: fp32 operand expected");
  const int64_t K = r.size(0), N = r.size(1), KP = (K + 1) / 2;
  const at::Tensor rc = r.stride(0) == 1 || r.stride(1) == 1 ? r : r.contiguous();
  const float* src = rc.const_data_ptr<float>();
  const int64_t s0 = rc.stride(0), s1 = rc.stride(1);
  const float zero = 0.0f;
  if (s0 == 1) {
    at::Tensor words = at::empty({N, KP}, r.options());
    auto* w = reinterpret_cast<uint32_t*>(words.data_ptr<float>());
    for (int64_t n = 0; n < N; ++n) {
      const float* col = src + n * s1;
      for (int64_t kp = 0; kp < K / 2; ++kp) {
        w[n * KP + kp] = bf16_pair_word(col + 2 * kp, col + 2 * kp + 1);
      }
      if (K % 2 != 0) {
        w[n * KP + KP - 1] = bf16_pair_word(col + K - 1, &zero);
      }
    }
    return Panels<float>(words.t(), groups);  // [KP, N] words, strides (1, KP)
  }
  at::Tensor words = at::empty({KP, N}, r.options());
  auto* w = reinterpret_cast<uint32_t*>(words.data_ptr<float>());
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    const float* lo = src + 2 * kp * s0;
    for (int64_t n = 0; n < N; ++n) {
      w[kp * N + n] = bf16_pair_word(lo + n, lo + s0 + n);
    }
  }
  if (K % 2 != 0) {
    const float* lo = src + (K - 1) * s0;
    for (int64_t n = 0; n < N; ++n) {
      w[(KP - 1) * N + n] = bf16_pair_word(lo + n, &zero);
    }
  }
  return Panels<float>(words, groups);  // [KP, N] words, contiguous
}

// out[MR][P] (+)= a[MR rows, 2*KP] @ pair panel[KP][P][2]: panel_tile's loop on bf16 pairs. a: bf16 rows
// as 32-bit pairs (row stride lda pairs). Accumulators in fp32, the same split over odd pairs for MR <= 2.
template <int MR>
__attribute__((target("avx512bf16"))) void bf16_pair_tile(const uint32_t* a, int64_t lda, const float* panel,
                                                          int64_t KP, float* out, bool accumulate) {
  constexpr int64_t P = 32;
  static_assert(panel_width<float>() == P, "the pair tile is written for 16-float vectors");
  constexpr bool kSplitK = MR <= 2;
  __m512 lo[MR], hi[MR], lo2[MR], hi2[MR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    lo[m] = hi[m] = lo2[m] = hi2[m] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  if constexpr (kSplitK) {
    for (; k + 2 <= KP; k += 2) {
      const float* p = panel + k * P;
      const __m512bh r0 = (__m512bh)_mm512_loadu_ps(p), r1 = (__m512bh)_mm512_loadu_ps(p + 16),
                     r2 = (__m512bh)_mm512_loadu_ps(p + P), r3 = (__m512bh)_mm512_loadu_ps(p + P + 16);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m512bh a0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m * lda + k]));
        const __m512bh a1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m * lda + k + 1]));
        lo[m] = _mm512_dpbf16_ps(lo[m], a0, r0);
        hi[m] = _mm512_dpbf16_ps(hi[m], a0, r1);
        lo2[m] = _mm512_dpbf16_ps(lo2[m], a1, r2);
        hi2[m] = _mm512_dpbf16_ps(hi2[m], a1, r3);
      }
    }
  }
  for (; k < KP; ++k) {
    const float* p = panel + k * P;
    const __m512bh r0 = (__m512bh)_mm512_loadu_ps(p), r1 = (__m512bh)_mm512_loadu_ps(p + 16);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512bh a0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m * lda + k]));
      lo[m] = _mm512_dpbf16_ps(lo[m], a0, r0);
      hi[m] = _mm512_dpbf16_ps(hi[m], a0, r1);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    __m512 sum_lo = _mm512_add_ps(lo[m], lo2[m]), sum_hi = _mm512_add_ps(hi[m], hi2[m]);
    if (accumulate) {
      sum_lo = _mm512_add_ps(sum_lo, _mm512_loadu_ps(out + m * P));
      sum_hi = _mm512_add_ps(sum_hi, _mm512_loadu_ps(out + m * P + 16));
    }
    _mm512_storeu_ps(out + m * P, sum_lo);
    _mm512_storeu_ps(out + m * P + 16, sum_hi);
  }
}

// Rows [m0, m0 + mr) (mr in 1..4) of one pair panel, as panel_rows.
inline void bf16_pair_rows(const uint32_t* a, int64_t lda, const float* panel, int64_t KP, int64_t mr, float* out,
                           bool accumulate) {
  switch (mr) {
    case 4:
      bf16_pair_tile<4>(a, lda, panel, KP, out, accumulate);
      break;
    case 3:
      bf16_pair_tile<3>(a, lda, panel, KP, out, accumulate);
      break;
    case 2:
      bf16_pair_tile<2>(a, lda, panel, KP, out, accumulate);
      break;
    default:
      bf16_pair_tile<1>(a, lda, panel, KP, out, accumulate);
      break;
  }
}

// ---------------------------------------------------------------------------------------------------
// The same pair panels on AMX (tdpbf16ps: a 16 x 16 fp32 tile += 16 x 32 bf16 by 32 x 16 bf16), through
// torch's oneDNN micro-kernel (at::native::cpublas::brgemm, bf16 x bf16 -> fp32 sums, the kernel
// JIT-compiled by oneDNN for the running CPU, which also asks the OS for the AMX state). A pair panel
// [KP][P][2] is exactly the "VNNI" B layout that kernel takes (ld_b = P), so the packing is shared with the
// avx512_bf16 tile. Used only where torch reports that its micro-kernel runs bf16 on AMX
// (cpublas::could_pack(bf16): oneDNN's ISA >= avx512_core_amx); elsewhere the kernel would run oneDNN's
// avx512_core_bf16 code or a scalar fallback, which the vdpbf16ps tile beats. Not cached here: could_pack
// also says false while the user turns oneDNN off (torch.backends.mkldnn.enabled = False), where the
// micro-kernel would refuse the call (its ISA check is cached inside, so this costs a flag and a static).
inline bool bf16_amx_supported() {
  return bf16_dot_supported() && at::native::cpublas::could_pack(at::kBFloat16);
}

// out[mr][P] (+)= a[mr rows, 2*KP] @ pair panel[KP][P][2] on AMX, any mr (the kernel tiles it by 16);
// a: bf16 rows as 32-bit pairs (row stride lda pairs). The caller releases the tile state
// (bf16_amx_release) when its thread is done with a step's products.
inline void bf16_amx_rows(const uint32_t* a, int64_t lda, const float* panel, int64_t KP, int64_t mr, float* out,
                          bool accumulate) {
  constexpr int64_t P = panel_width<float>();
  at::native::cpublas::brgemm(mr, P, 2 * KP, 2 * lda, P, P, accumulate, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(panel), out, /*is_vnni=*/true);
}

inline void bf16_amx_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
#endif  // CPU_CAPABILITY_AVX512

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
