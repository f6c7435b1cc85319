// Elman RNN recurrence on the CPU: fastrnn::rnn_fwd and fastrnn::rnn_bwd of docs/contract.md.
//
// Legend: T steps, B batch, H hidden; a = gx_t + h_{t-1} W_hh^T (both biases folded into gx).
// The loops are recurrence.h's (forward_loop, backward_loop: the hidden product, fused with the cell
// for small sizes); this file has the pointwise step with the cell of csrc/cells/rnn.h (tanh or relu, a
// template constant).
#include "../cells/rnn.h"
#include "kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy of these kernels per capability (kernels.h)
namespace {

// Rough cycles per unit of the pointwise step (one tanh), to size the parallel grain.
constexpr int64_t kRnnUnitCost = 4;

template <typename scalar_t, bool Relu>
void rnn_fwd_kernel(const at::Tensor& gx, const std::optional<at::Tensor>& b_gx, const at::Tensor& w_hh,
                    const at::Tensor& h0, const int64_t* len, const bool* rst, bool reverse, at::Tensor& y,
                    at::Tensor& h_n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gx.size(0), B = gx.size(1), H = h0.size(1);

  at::Tensor h = acc_copy<acc_t>(h0);                           // [B, H] h_{t-1}: what the product reads
  at::Tensor h_next = at::empty({B, H}, acc_options<acc_t>());  // [B, H] h_t
  at::Tensor hid = at::empty({B, H}, acc_options<acc_t>());     // [B, H] h_{t-1} W_hh^T when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh).t(), 1, B, w_hh, T);
  const at::Tensor bias = input_bias<acc_t>(b_gx, H);

  const scalar_t* gx_p = gx.const_data_ptr<scalar_t>();
  const acc_t* bias_p = bias.const_data_ptr<acc_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  const acc_t* h_p = h.const_data_ptr<acc_t>();  // swapped with next_p by `after`
  acc_t* next_p = h_next.data_ptr<acc_t>();

  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, const acc_t* hid_b, int64_t) {
    prefetch_row_ahead(row(gx_p, t, B, 0, H), b, B, H, 1, H, j0, j1);
    acc_t* next_b = row(next_p, b, H);
    scalar_t* y_b = row(y_p, t, B, b, H);
    if (!active(len, t, b)) {  // state carried, y_t = 0
      copy_row<acc_t>(next_b + j0, row(h_p, b, H) + j0, j1 - j0);
      zero_row<acc_t>(y_b + j0, j1 - j0);
      return;
    }
    const scalar_t* gx_b = row(gx_p, t, B, b, H);
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const V h_new = cells::rnn_fwd_cell<Relu>(load<V>(gx_b + j) + load<V>(bias_p + j) +
                                                  load<V>(hid_b + (j - j0)));
      store(next_b + j, h_new);
      store(y_b + j, h_new);
    });
  };
  auto after = [&](int64_t) {  // h_t becomes the state the next product reads
    std::swap(h, h_next);
    h_p = h.const_data_ptr<acc_t>();
    next_p = h_next.data_ptr<acc_t>();
  };
  auto enter = [&](int64_t t) { zero_reset_rows<acc_t>(rst, len, t, B, h); };  // a reset at t: h_{t-1} = 0
  forward_loop<acc_t>(gemm, /*fuse=*/true, /*swap_only=*/true, h, hid, len, T, B, H, reverse, kRnnUnitCost, enter,
                      cell, after);
  h_n = h.to(h0.scalar_type());
}

template <typename scalar_t, bool Relu>
void rnn_bwd_kernel(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh, const at::Tensor& y,
                    const int64_t* len, const bool* rst, bool reverse, at::Tensor& dgx, at::Tensor& dh0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);

  at::Tensor dh = acc_copy<acc_t>(dh_n);                        // [B, H] recurrent gradient into h_t
  at::Tensor da = at::empty({B, H}, acc_options<acc_t>());      // [B, H] dgx_t in the math type
  at::Tensor da_prev = at::empty({B, H}, acc_options<acc_t>());  // the other buffer when fused
  at::Tensor prod = at::empty({B, H}, acc_options<acc_t>());    // [B, H] da W_hh when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh), 1, B, w_hh, T);

  const scalar_t* dy_p = dy.const_data_ptr<scalar_t>();
  const scalar_t* y_p = y.const_data_ptr<scalar_t>();
  scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
  const acc_t* dh_p = dh.const_data_ptr<acc_t>();

  const bool stream = streamed(dgx);  // written here, read by the layer's GEMMs after the op
  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, acc_t* da_b) {
    prefetch_row_ahead(row(dy_p, t, B, 0, H), b, B, H, 1, H, j0, j1);
    prefetch_row_ahead(row(y_p, t, B, 0, H), b, B, H, 1, H, j0, j1);
    scalar_t* dgx_b = row(dgx_p, t, B, b, H);
    if (!active(len, t, b)) {  // no gradient into this step; dh passes through
      zero_row<acc_t>(dgx_b + j0, j1 - j0);
      zero_row<acc_t>(da_b + j0, j1 - j0);
      return;
    }
    const acc_t* dh_b = row(dh_p, b, H);
    const scalar_t* dy_b = row(dy_p, t, B, b, H);
    const scalar_t* y_b = row(y_p, t, B, b, H);
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const V d = cells::rnn_bwd_cell<Relu>(load<V>(dh_b + j) + load<V>(dy_b + j), load<V>(y_b + j));
      store_maybe_streamed(dgx_b + j, d, stream);
      store(da_b + j, d);
    });
  };
  backward_loop<acc_t>(gemm, /*fuse=*/true, dh, da, da_prev, prod, at::Tensor(), len, rst, T, B, H, reverse,
                       kRnnUnitCost, cell, [](int64_t) {});
  dh0 = dh.to(dh_n.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rnn_fwd(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool relu,
    const std::optional<at::Tensor>& b_gx) {
  const Checker ck{"fastrnn::rnn_fwd"};
  ck.dims(gx, "gx", 3);
  ck.floating(gx, "gx");
  ck.dims(h0, "h0", 2);
  const int64_t T = gx.size(0), B = gx.size(1), H = h0.size(1);
  ck.tensor(gx, "gx [T, B, H]", {T, B, H}, gx);
  ck.tensor(h0, "h0 [B, H]", {B, H}, gx);
  ck.tensor(w_hh, "w_hh [H, H]", {H, H}, gx);
  if (b_gx.has_value()) {
    ck.tensor(*b_gx, "b_gx [H]", {H}, gx);
  }
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor y = empty_output({T, B, H}, gx.options());
  at::Tensor h_n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fastrnn::rnn_fwd", [&] {
    if (relu) {
      rnn_fwd_kernel<scalar_t, true>(gx, b_gx, w_hh, h0, len, rst, reverse, y, h_n);
    } else {
      rnn_fwd_kernel<scalar_t, false>(gx, b_gx, w_hh, h0, len, rst, reverse, y, h_n);
    }
  });
  return {y, h_n};
}

std::tuple<at::Tensor, at::Tensor> rnn_bwd(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh,
                                           const at::Tensor& y, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets,
                                           bool reverse, bool relu) {
  const Checker ck{"fastrnn::rnn_bwd"};
  ck.dims(y, "y", 3);
  ck.floating(y, "y");
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  ck.tensor(y, "y [T, B, H]", {T, B, H}, y);
  ck.tensor(dy, "dy [T, B, H]", {T, B, H}, y);
  ck.tensor(dh_n, "dh_n [B, H]", {B, H}, y);
  ck.tensor(w_hh, "w_hh [H, H]", {H, H}, y);
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor dgx = empty_output({T, B, H}, y.options());
  at::Tensor dh0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastrnn::rnn_bwd", [&] {
    if (relu) {
      rnn_bwd_kernel<scalar_t, true>(dy, dh_n, w_hh, y, len, rst, reverse, dgx, dh0);
    } else {
      rnn_bwd_kernel<scalar_t, false>(dy, dh_n, w_hh, y, len, rst, reverse, dgx, dh0);
    }
  });
  return {dgx, dh0};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
