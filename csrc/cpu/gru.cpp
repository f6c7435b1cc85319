// GRU recurrence on the CPU: fastrnn::gru_fwd and fastrnn::gru_bwd of docs/contract.md.
//
// Legend: T steps, B batch, H hidden, G = 3H (gates r, z, n, gate-major); gh = h_{t-1} W_hh^T + b_hh.
// The loops are recurrence.h's (forward_loop, backward_loop: the hidden product, fused with the cell
// for small sizes); this file has the GRU's pointwise step with the cell of csrc/cells/gru.h. Backward,
// the cell also writes dh z, the part of dh_{t-1} that skips W_hh, which the loop adds to dgh_t W_hh.
#include "../cells/gru.h"
#include "kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy of these kernels per capability (kernels.h)
namespace {

// Rough cycles per unit of the pointwise step (3 transcendentals), to size the parallel grain.
constexpr int64_t kGruUnitCost = 8;

template <typename scalar_t>
void gru_fwd_kernel(const at::Tensor& gx, const std::optional<at::Tensor>& b_gx, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_hh, const at::Tensor& h0, const int64_t* len, const bool* rst,
                    bool reverse, bool save, at::Tensor& y, at::Tensor& h_n, at::Tensor& saved) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gx.size(0), B = gx.size(1), H = h0.size(1), G = 3 * H;

  at::Tensor h = acc_copy<acc_t>(h0);                             // [B, H] h_{t-1}: what the product reads
  at::Tensor h_next = at::empty({B, H}, acc_options<acc_t>());    // [B, H] h_t
  at::Tensor hid = at::empty({B, G}, acc_options<acc_t>());       // [B, 3H] h_{t-1} W_hh^T when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh).t(), 3, B, w_hh, T);
  const at::Tensor bias = b_hh.has_value() ? to_acc<acc_t>(*b_hh) : at::Tensor();
  const at::Tensor in_bias = input_bias<acc_t>(b_gx, G);

  const scalar_t* gx_p = gx.const_data_ptr<scalar_t>();
  const acc_t* in_bias_p = in_bias.const_data_ptr<acc_t>();
  const acc_t* bias_p = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y_p = y.data_ptr<scalar_t>();
  scalar_t* saved_p = save ? saved.data_ptr<scalar_t>() : nullptr;
  const acc_t* h_p = h.const_data_ptr<acc_t>();  // swapped with next_p by `after`
  acc_t* next_p = h_next.data_ptr<acc_t>();

  // The saved values, written here and read by the backward, and with them y; in
  // inference y alone, from a smaller size (recurrence.h, streamed).
  const bool stream = save ? streamed(saved) : streamed(y, kStreamMinBytesInference);
  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, const acc_t* hid_b, int64_t gs) {
    prefetch_row_ahead(row(gx_p, t, B, 0, G), b, B, G, 3, H, j0, j1);
    const acc_t* h_b = row(h_p, b, H);
    acc_t* next_b = row(next_p, b, H);
    scalar_t* y_b = row(y_p, t, B, b, H);
    scalar_t* saved_b = save ? row(saved_p, t, B, b, 4 * H) : nullptr;
    if (!active(len, t, b)) {  // state carried: y_t = 0, saved 0
      copy_row<acc_t>(next_b + j0, h_b + j0, j1 - j0);
      zero_row<acc_t>(y_b + j0, j1 - j0);
      if (save) {
        for (int64_t k = 0; k < 4; ++k) {
          zero_row<acc_t>(saved_b + k * H + j0, j1 - j0);
        }
      }
      return;
    }
    const scalar_t* gx_b = row(gx_p, t, B, b, G);
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const acc_t* a = hid_b + (j - j0);
      V ghr = load<V>(a), ghz = load<V>(a + gs), ghn = load<V>(a + 2 * gs);
      if (bias_p != nullptr) {
        ghr = ghr + load<V>(bias_p + j);
        ghz = ghz + load<V>(bias_p + H + j);
        ghn = ghn + load<V>(bias_p + 2 * H + j);
      }
      V r, z, n, h_new;
      auto in = [&](int64_t k) { return load<V>(gx_b + k * H + j) + load<V>(in_bias_p + k * H + j); };
      cells::gru_fwd_cell(in(0), in(1), in(2), ghr, ghz, ghn, load<V>(h_b + j), r, z, n, h_new);
      store(next_b + j, h_new);
      store_maybe_streamed(y_b + j, h_new, stream);
      if (save) {
        store_gates(saved_b, H, j, stream, r, z, n, ghn);
      }
    });
  };
  auto after = [&](int64_t) {  // h_t becomes the state the next product reads
    std::swap(h, h_next);
    h_p = h.const_data_ptr<acc_t>();
    next_p = h_next.data_ptr<acc_t>();
  };
  auto enter = [&](int64_t t) { zero_reset_rows<acc_t>(rst, len, t, B, h); };  // a reset at t: h_{t-1} = 0
  forward_loop<acc_t>(gemm, /*fuse=*/true, /*swap_only=*/true, h, hid, len, T, B, H, reverse, kGruUnitCost, enter,
                      cell, after);
  h_n = h.to(h0.scalar_type());
}

template <typename scalar_t>
void gru_bwd_kernel(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh, const at::Tensor& y,
                    const at::Tensor& h0, const at::Tensor& saved, const int64_t* len, const bool* rst, bool reverse,
                    at::Tensor& dgx, at::Tensor& dgh, at::Tensor& dh0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2), G = 3 * H;

  at::Tensor dh = acc_copy<acc_t>(dh_n);                         // [B, H] recurrent gradient into h_t
  at::Tensor direct = at::empty({B, H}, acc_options<acc_t>());   // [B, H] dh z: the part skipping W_hh
  at::Tensor da = at::empty({B, G}, acc_options<acc_t>());       // [B, 3H] dgh_t in the math type
  at::Tensor da_prev = at::empty({B, G}, acc_options<acc_t>());  // the other buffer when fused
  at::Tensor prod = at::empty({B, H}, acc_options<acc_t>());     // [B, H] dgh_t W_hh when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh), 1, B, w_hh, T);

  // h_{t-1} of a step that starts from zero (resets): a zero row, read in place of y / h0.
  const at::Tensor zeros = rst != nullptr ? at::zeros({H}, y.options()) : at::Tensor();
  const scalar_t* zeros_p = rst != nullptr ? zeros.const_data_ptr<scalar_t>() : nullptr;

  const scalar_t* dy_p = dy.const_data_ptr<scalar_t>();
  const scalar_t* y_p = y.const_data_ptr<scalar_t>();
  const scalar_t* h0_p = h0.const_data_ptr<scalar_t>();
  const scalar_t* saved_p = saved.const_data_ptr<scalar_t>();
  scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
  scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
  const acc_t* dh_p = dh.const_data_ptr<acc_t>();
  acc_t* direct_p = direct.data_ptr<acc_t>();

  const bool stream = streamed(dgx);  // dgx and dgh: written here, read by the layer's GEMMs after the op
  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, acc_t* da_b) {
    scalar_t* dgx_b = row(dgx_p, t, B, b, G);
    scalar_t* dgh_b = row(dgh_p, t, B, b, G);
    if (!active(len, t, b)) {  // no gradient into this step; dh passes through
      for (int64_t k = 0; k < 3; ++k) {
        zero_row<acc_t>(dgx_b + k * H + j0, j1 - j0);
        zero_row<acc_t>(dgh_b + k * H + j0, j1 - j0);
        zero_row<acc_t>(da_b + k * H + j0, j1 - j0);
      }
      return;
    }
    // h_{t-1} from the outputs (contract): forward y[t-1] (active whenever t is); reverse y[t+1] while
    // t+1 is inside the sequence; h0 at the sequence's first step; 0 where step t started from zero.
    const int64_t tp = reverse ? t + 1 : t - 1;
    const bool from_y = reverse ? (tp < T && (len == nullptr || tp < len[b])) : tp >= 0;
    const scalar_t* h_prev_b =
        resets_at(rst, t, B, b) ? zeros_p : from_y ? row(y_p, tp, B, b, H) : row(h0_p, b, H);
    prefetch_row_ahead(row(saved_p, t, B, 0, 4 * H), b, B, 4 * H, 4, H, j0, j1);
    prefetch_row_ahead(row(dy_p, t, B, 0, H), b, B, H, 1, H, j0, j1);
    if (from_y) {
      prefetch_row_ahead(row(y_p, tp, B, 0, H), b, B, H, 1, H, j0, j1);
    }
    const scalar_t* saved_b = row(saved_p, t, B, b, 4 * H);
    const scalar_t* dy_b = row(dy_p, t, B, b, H);
    const acc_t* dh_b = row(dh_p, b, H);
    acc_t* direct_b = row(direct_p, b, H);
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const V r = load<V>(saved_b + j), z = load<V>(saved_b + H + j), n = load<V>(saved_b + 2 * H + j),
              ghn = load<V>(saved_b + 3 * H + j);
      V dar, daz, dan, dghn, dh_direct;
      cells::gru_bwd_cell(load<V>(dh_b + j) + load<V>(dy_b + j), r, z, n, ghn, load<V>(h_prev_b + j), dar, daz,
                          dan, dghn, dh_direct);
      store_gates(dgx_b, H, j, stream, dar, daz, dan);
      store_gates(dgh_b, H, j, stream, dar, daz, dghn);
      store_gates(da_b, H, j, false, dar, daz, dghn);
      store(direct_b + j, dh_direct);
    });
  };
  backward_loop<acc_t>(gemm, /*fuse=*/true, dh, da, da_prev, prod, direct, len, rst, T, B, H, reverse,
                       kGruUnitCost, cell, [](int64_t) {});
  dh0 = dh.to(dh_n.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_fwd(const at::Tensor& gx, const at::Tensor& w_hh,
                                                       const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse,
                                                       bool save, const std::optional<at::Tensor>& b_gx) {
  const Checker ck{"fastrnn::gru_fwd"};
  ck.dims(gx, "gx", 3);
  ck.floating(gx, "gx");
  ck.dims(h0, "h0", 2);
  const int64_t T = gx.size(0), B = gx.size(1), H = h0.size(1);
  ck.tensor(gx, "gx [T, B, 3H]", {T, B, 3 * H}, gx);
  ck.tensor(h0, "h0 [B, H]", {B, H}, gx);
  ck.tensor(w_hh, "w_hh [3H, H]", {3 * H, H}, gx);
  if (b_hh.has_value()) {
    ck.tensor(*b_hh, "b_hh [3H]", {3 * H}, gx);
  }
  if (b_gx.has_value()) {
    ck.tensor(*b_gx, "b_gx [3H]", {3 * H}, gx);
  }
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor y = empty_output({T, B, H}, gx.options());
  at::Tensor saved = save ? empty_output({T, B, 4 * H}, gx.options()) : at::empty({0}, gx.options());
  at::Tensor h_n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fastrnn::gru_fwd", [&] {
    gru_fwd_kernel<scalar_t>(gx, b_gx, w_hh, b_hh, h0, len, rst, reverse, save, y, h_n, saved);
  });
  return {y, h_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_bwd(const at::Tensor& dy, const at::Tensor& dh_n,
                                                       const at::Tensor& w_hh, const at::Tensor& y,
                                                       const at::Tensor& h0, const at::Tensor& saved,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  const Checker ck{"fastrnn::gru_bwd"};
  ck.dims(y, "y", 3);
  ck.floating(y, "y");
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  ck.tensor(y, "y [T, B, H]", {T, B, H}, y);
  ck.tensor(dy, "dy [T, B, H]", {T, B, H}, y);
  ck.tensor(dh_n, "dh_n [B, H]", {B, H}, y);
  ck.tensor(h0, "h0 [B, H]", {B, H}, y);
  ck.tensor(saved, "saved [T, B, 4H]", {T, B, 4 * H}, y);
  ck.tensor(w_hh, "w_hh [3H, H]", {3 * H, H}, y);
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor dgx = empty_output({T, B, 3 * H}, y.options());
  at::Tensor dgh = empty_output({T, B, 3 * H}, y.options());
  at::Tensor dh0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastrnn::gru_bwd", [&] {
    gru_bwd_kernel<scalar_t>(dy, dh_n, w_hh, y, h0, saved, len, rst, reverse, dgx, dgh, dh0);
  });
  return {dgx, dgh, dh0};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
