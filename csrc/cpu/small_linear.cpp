// fastrnn_cpu::small_linear: y [M, N] = x [M, K] W^T + bias in fp32 for input projections with a small weight
// (W_ih <= 1 MB; the layer's whole T*B rows at once), on the packed panels of the step products (recurrence.h,
// HiddenGemm: W packed once and kept across calls by panel_cache.h, the bias added as each tile is stored).
//
// Why: below ~10 MFLOP the library GEMMs are mostly per-call cost. LSTM (50,1,64,128), [50,64]x[64,512]:
// F.linear (MKL's AVX2 code on AMD CPUs) 24-27 us at 2 threads and 35 at 1, oneDNN 51, this 14, against a
// 66-70 us recurrence; and up to W = 1 MB the packed tile also beat oneDNN on large products, e.g.
// [3200,256]x[256,1024] 4.4 against 5.2 ms (Zen 5, 2 threads; docs/cpu.md, "The input projection on the packed
// panels"). autograd.packed_projection decides when it is used; its gradient is linear's (native.py).
#include "kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per capability (kernels.h)

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "fastrnn_cpu::small_linear: x [M, K] and w [N, K] expected, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  w.device().is_cpu(),
              "fastrnn_cpu::small_linear: fp32 CPU tensors expected");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.size(0) &&
                                    bias->scalar_type() == at::kFloat && bias->device().is_cpu()),
              "fastrnn_cpu::small_linear: bias [N] fp32 expected");
  const int64_t M = x.size(0), N = w.size(0);
  const at::Tensor a = x.contiguous(), weight = w.contiguous();
  at::Tensor y = empty_output({M, N}, x.options());
  if (M == 0 || N == 0) {
    return y;
  }
  const HiddenGemm<float> gemm(weight.t(), /*groups=*/1, M, weight);
  if (!gemm.tiled()) {  // the AVX2 / default copies' rule for large A: the library GEMM
    gemm.product(a, y);
    return bias.has_value() ? y.add_(*bias) : y;
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* b_p = bias.has_value() ? b.const_data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  gemm.by_blocks(a.const_data_ptr<float>(), /*cost=*/0,
                 [&](int64_t m0, int64_t mr, int64_t j0, int64_t j1, const float* tiles, int64_t) {
                   for (int64_t m = 0; m < mr; ++m) {
                     const float* tile = tiles + m * HiddenGemm<float>::P;
                     float* out = row(y_p, m0 + m, N) + j0;
                     if (b_p == nullptr) {
                       copy_row<float>(out, tile, j1 - j0);
                       continue;
                     }
                     vec_loop<float>(0, j1 - j0, [&](auto v, int64_t j) {
                       using V = decltype(v);
                       store(out + j, load<V>(tile + j) + load<V>(b_p + j0 + j));
                     });
                   }
                 });
  return y;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
