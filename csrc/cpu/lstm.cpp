// LSTM recurrence on the CPU: fastrnn::lstm_fwd and fastrnn::lstm_bwd of docs/contract.md.
//
// Legend: T steps, B batch, H hidden, Hout = proj_size or H, G = 4H (gates i, f, g, o, gate-major).
// The loops are recurrence.h's (forward_loop, backward_loop: the hidden product, fused with the cell
// for small sizes); this file has the LSTM's pointwise step: add gx_t, apply the cell of
// csrc/cells/lstm.h on whole vectors, write the state, y_t and the saved gates/c. With a projection, one
// more product per step (m_t W_hr^T forward, dh_t W_hr backward); dW_hr is one GEMM over all T*B rows.
#include "../cells/lstm.h"
#include "kernels.h"
#include "recurrence.h"

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy of these kernels per capability (kernels.h)
namespace {

// Rough cycles per unit of the pointwise step (5 transcendentals per unit forward, a vector of 8 units at
// ~20 cycles each), used only to size the parallel grain (recurrence.h).
constexpr int64_t kLstmUnitCost = 12;

template <typename scalar_t>
void lstm_fwd_kernel(const at::Tensor& gx, const std::optional<at::Tensor>& b_gx, const at::Tensor& w_hh,
                     const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& w_hr,
                     const int64_t* len, const bool* rst, bool reverse, bool save, at::Tensor& y, at::Tensor& h_n,
                     at::Tensor& c_n, at::Tensor& gates, at::Tensor& cs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gx.size(0), B = gx.size(1), H = c0.size(1), Hout = h0.size(1), G = 4 * H;
  const bool proj = w_hr.has_value();

  at::Tensor h = acc_copy<acc_t>(h0);                         // [B, Hout] h_{t-1}: what the product reads
  at::Tensor h_next = at::empty({B, Hout}, acc_options<acc_t>());  // [B, Hout] h_t (projection: m W_hr^T)
  at::Tensor c = acc_copy<acc_t>(c0);                         // [B, H], updated in place (unit-local)
  at::Tensor hid = at::empty({B, G}, acc_options<acc_t>());   // [B, 4H] h_{t-1} W_hh^T when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh).t(), 4, B, w_hh, T);
  // With a projection the cell writes m_t to `m` (zeroed: rows of inactive sequences go through the
  // projection unused and must not hold garbage NaNs/denormals), then h_t = m_t W_hr^T.
  at::Tensor m = proj ? at::zeros({B, H}, acc_options<acc_t>()) : at::Tensor();
  std::optional<HiddenGemm<acc_t>> proj_gemm;
  if (proj) {
    proj_gemm.emplace(to_acc<acc_t>(*w_hr).t(), 1, B);
  }

  const at::Tensor bias = input_bias<acc_t>(b_gx, G);  // [4H] b_gx in the math type

  const scalar_t* gx_p = gx.const_data_ptr<scalar_t>();
  const acc_t* bias_p = bias.const_data_ptr<acc_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  scalar_t* gates_p = save ? gates.data_ptr<scalar_t>() : nullptr;
  scalar_t* cs_p = save ? cs.data_ptr<scalar_t>() : nullptr;
  acc_t* c_p = c.data_ptr<acc_t>();
  const acc_t* h_p = h.const_data_ptr<acc_t>();                   // swapped with out_p by `after`
  acc_t* out_p = proj ? m.data_ptr<acc_t>() : h_next.data_ptr<acc_t>();  // where the cell writes m_t

  // The saved gates and c_t, written here and read by the backward, and with them y; in
  // inference y alone, from a smaller size (recurrence.h, streamed).
  const bool stream = save ? streamed(gates) : !proj && streamed(y, kStreamMinBytesInference);
  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, const acc_t* hid_b, int64_t gs) {
    prefetch_row_ahead(row(gx_p, t, B, 0, G), b, B, G, 4, H, j0, j1);
    const scalar_t* gx_b = row(gx_p, t, B, b, G);
    acc_t* c_b = row(c_p, b, H);
    acc_t* out_b = row(out_p, b, H);
    scalar_t* y_b = row(y_p, t, B, b, Hout);
    scalar_t* gates_b = save ? row(gates_p, t, B, b, G) : nullptr;
    scalar_t* cs_b = save ? row(cs_p, t, B, b, H) : nullptr;
    if (!active(len, t, b)) {  // state carried: y_t = 0, gates 0, cs_t = the carried c
      if (!proj) {
        copy_row<acc_t>(out_b + j0, row(h_p, b, Hout) + j0, j1 - j0);
        zero_row<acc_t>(y_b + j0, j1 - j0);
      }
      if (save) {
        for (int64_t k = 0; k < 4; ++k) {
          zero_row<acc_t>(gates_b + k * H + j0, j1 - j0);
        }
        copy_row<acc_t>(cs_b + j0, c_b + j0, j1 - j0);
      }
      return;
    }
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const acc_t* a = hid_b + (j - j0);
      V i, f, g, o, c_new, m_new;
      // (gx_t + b_gx) + h_{t-1} W_hh^T: the sum's order of a bias added to gx beforehand.
      auto pre = [&](int64_t k) {
        return load<V>(gx_b + k * H + j) + load<V>(bias_p + k * H + j) + load<V>(a + k * gs);
      };
      cells::lstm_fwd_cell(pre(0), pre(1), pre(2), pre(3), load<V>(c_b + j), i, f, g, o, c_new, m_new);
      store(c_b + j, c_new);
      store(out_b + j, m_new);
      if (!proj) {
        store_maybe_streamed(y_b + j, m_new, stream);
      }
      if (save) {
        store_gates(gates_b, H, j, stream, i, f, g, o);
        store_maybe_streamed(cs_b + j, c_new, stream);
      }
    });
  };
  auto after = [&](int64_t t) {
    if (!proj) {  // h_t becomes the state the next product reads
      std::swap(h, h_next);
      h_p = h.const_data_ptr<acc_t>();
      out_p = h_next.data_ptr<acc_t>();
      return;
    }
    // h_t = m_t W_hr^T on the active rows (the others keep h_{t-1}); y_t = h_t there, 0 elsewhere.
    proj_gemm->product(m, h_next);
    const acc_t* src = h_next.const_data_ptr<acc_t>();
    acc_t* dst = h.data_ptr<acc_t>();
    for (const auto b : c10::irange(B)) {
      scalar_t* y_b = row(y_p, t, B, b, Hout);
      if (active(len, t, b)) {
        copy_row<acc_t>(row(dst, b, Hout), row(src, b, Hout), Hout);
        copy_row<acc_t>(y_b, row(src, b, Hout), Hout);
      } else {
        zero_row<acc_t>(y_b, Hout);
      }
    }
  };
  // A reset at t: h_{t-1} (the projected h with proj_size) and c_{t-1} of the row are 0.
  auto enter = [&](int64_t t) { zero_reset_rows<acc_t>(rst, len, t, B, h, c); };
  // The cell writes m_t / h_t to out_p, never to the state h the product reads: fusing is safe.
  forward_loop<acc_t>(gemm, /*fuse=*/true, /*swap_only=*/!proj, h, hid, len, T, B, H, reverse, kLstmUnitCost, enter,
                      cell, after);
  h_n = h.to(h0.scalar_type());
  c_n = c.to(c0.scalar_type());
}

template <typename scalar_t>
void lstm_bwd_kernel(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
                     const at::Tensor& c0, const std::optional<at::Tensor>& w_hr, const at::Tensor& gates,
                     const at::Tensor& cs, const int64_t* len, const bool* rst, bool reverse, at::Tensor& dgx,
                     at::Tensor& dh0,
                     at::Tensor& dc0, at::Tensor& dw_hr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gates.size(0), B = gates.size(1), H = c0.size(1), Hout = dh_n.size(1), G = 4 * H;
  const bool proj = w_hr.has_value();

  at::Tensor dh = acc_copy<acc_t>(dh_n);  // [B, Hout] recurrent gradient into h_t (from step t+1)
  at::Tensor dc = acc_copy<acc_t>(dc_n);  // [B, H] recurrent gradient into c_t
  at::Tensor da = at::empty({B, G}, acc_options<acc_t>());        // [B, 4H] dgx_t in the math type
  at::Tensor da_prev = at::empty({B, G}, acc_options<acc_t>());   // the other buffer when fused
  at::Tensor prod = at::empty({B, Hout}, acc_options<acc_t>());   // [B, Hout] da W_hh when not fused
  const HiddenGemm<acc_t> gemm(to_acc<acc_t>(w_hh), 1, B, w_hh, T);
  // Projection: dh_t (= dh + dy_t) is kept for every step in dh_all, dm = dh_t W_hr per step, and
  // dW_hr = sum_t dh_t^T m_t is one GEMM at the end with m_t = o tanh(c_t) gathered in m_all.
  at::Tensor dh_all, m_all, dht, dm;
  std::optional<HiddenGemm<acc_t>> proj_gemm;
  if (proj) {
    dh_all = empty_output({T, B, Hout}, acc_options<acc_t>());
    m_all = empty_output({T, B, H}, acc_options<acc_t>());
    dht = at::empty({B, Hout}, acc_options<acc_t>());
    dm = at::empty({B, H}, acc_options<acc_t>());
    proj_gemm.emplace(to_acc<acc_t>(*w_hr), 1, B);
  }

  // c_{t-1} of a step that starts from zero (resets): a zero row, read in place of cs / c0.
  const at::Tensor zeros = rst != nullptr ? at::zeros({H}, c0.options()) : at::Tensor();
  const scalar_t* zeros_p = rst != nullptr ? zeros.const_data_ptr<scalar_t>() : nullptr;

  const scalar_t* dy_p = dy.const_data_ptr<scalar_t>();
  const scalar_t* c0_p = c0.const_data_ptr<scalar_t>();
  const scalar_t* gates_p = gates.const_data_ptr<scalar_t>();
  const scalar_t* cs_p = cs.const_data_ptr<scalar_t>();
  scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
  const acc_t* dh_p = dh.const_data_ptr<acc_t>();
  acc_t* dc_p = dc.data_ptr<acc_t>();
  acc_t* m_all_p = proj ? m_all.data_ptr<acc_t>() : nullptr;
  const acc_t* dm_p = proj ? dm.const_data_ptr<acc_t>() : nullptr;

  auto before = [&](int64_t t) {
    if (!proj) {
      return;
    }
    acc_t* dht_p = dht.data_ptr<acc_t>();
    acc_t* dh_all_p = dh_all.data_ptr<acc_t>();
    for (const auto b : c10::irange(B)) {
      acc_t* dht_b = row(dht_p, b, Hout);
      if (active(len, t, b)) {
        const acc_t* dh_b = row(dh_p, b, Hout);
        const scalar_t* dy_b = row(dy_p, t, B, b, Hout);
        vec_loop<acc_t>(0, Hout, [&](auto v, int64_t j) {
          using V = decltype(v);
          store(dht_b + j, load<V>(dh_b + j) + load<V>(dy_b + j));
        });
      } else {
        zero_row<acc_t>(dht_b, Hout);
      }
      copy_row<acc_t>(row(dh_all_p, t, B, b, Hout), dht_b, Hout);
    }
    proj_gemm->product(dht, dm);
  };
  const bool stream = streamed(dgx);  // written here, read by the layer's GEMMs after the op
  auto cell = [&](int64_t t, int64_t b, int64_t j0, int64_t j1, acc_t* da_b) {
    scalar_t* dgx_b = row(dgx_p, t, B, b, G);
    acc_t* m_b = proj ? row(m_all_p, t, B, b, H) : nullptr;
    if (!active(len, t, b)) {  // no gradient into this step; dh and dc pass through unchanged
      for (int64_t k = 0; k < 4; ++k) {
        zero_row<acc_t>(dgx_b + k * H + j0, j1 - j0);
        zero_row<acc_t>(da_b + k * H + j0, j1 - j0);
      }
      if (proj) {
        zero_row<acc_t>(m_b + j0, j1 - j0);
      }
      return;
    }
    const int64_t tp = reverse ? t + 1 : t - 1;  // the step before t in forward order
    prefetch_row_ahead(row(gates_p, t, B, 0, G), b, B, G, 4, H, j0, j1);
    prefetch_row_ahead(row(cs_p, t, B, 0, H), b, B, H, 1, H, j0, j1);
    if (tp >= 0 && tp < T) {
      prefetch_row_ahead(row(cs_p, tp, B, 0, H), b, B, H, 1, H, j0, j1);
    }
    prefetch_row_ahead(row(dy_p, t, B, 0, Hout), b, B, Hout, 1, Hout, j0, j1);
    const bool cut = resets_at(rst, t, B, b);     // step t started from zero: c_{t-1} = 0, no dc across
    const scalar_t* gates_b = row(gates_p, t, B, b, G);
    const scalar_t* c_b = row(cs_p, t, B, b, H);
    const scalar_t* c_prev_b = cut ? zeros_p : tp < 0 || tp >= T ? row(c0_p, b, H) : row(cs_p, tp, B, b, H);
    const scalar_t* dy_b = row(dy_p, t, B, b, Hout);
    const acc_t* dh_b = row(dh_p, b, Hout);
    const acc_t* dm_b = proj ? row(dm_p, b, H) : nullptr;
    acc_t* dc_b = row(dc_p, b, H);
    vec_loop<acc_t>(j0, j1, [&](auto v, int64_t j) {
      using V = decltype(v);
      const V dm_j = proj ? load<V>(dm_b + j) : load<V>(dh_b + j) + load<V>(dy_b + j);
      const V i = load<V>(gates_b + j), f = load<V>(gates_b + H + j), g = load<V>(gates_b + 2 * H + j),
              o = load<V>(gates_b + 3 * H + j), c_t = load<V>(c_b + j);
      V dai, daf, dag, dao, dc_prev;
      cells::lstm_bwd_cell(dm_j, load<V>(dc_b + j), i, f, g, o, c_t, load<V>(c_prev_b + j), dai, daf, dag, dao,
                           dc_prev);
      store(dc_b + j, dc_prev);
      store_gates(dgx_b, H, j, stream, dai, daf, dag, dao);
      store_gates(da_b, H, j, false, dai, daf, dag, dao);
      if (proj) {
        store(m_b + j, o * cells::tanh(c_t));
      }
    });
    if (cut) {
      zero_row<acc_t>(dc_b + j0, j1 - j0);
    }
  };
  // With a projection the cell needs dm = dh_t W_hr of the whole row first (before): not fusable.
  backward_loop<acc_t>(gemm, /*fuse=*/!proj, dh, da, da_prev, prod, at::Tensor(), len, rst, T, B, H, reverse,
                       kLstmUnitCost, cell, before);
  dh0 = dh.to(dh_n.scalar_type());
  dc0 = dc.to(dc_n.scalar_type());
  dw_hr = proj ? at::mm(dh_all.view({T * B, Hout}).t(), m_all.view({T * B, H})).to(w_hr->scalar_type())
               : at::empty({0}, dy.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd(
    const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool save,
    const std::optional<at::Tensor>& b_gx) {
  const Checker ck{"fastrnn::lstm_fwd"};
  ck.dims(gx, "gx", 3);
  ck.floating(gx, "gx");
  ck.dims(h0, "h0", 2);
  ck.dims(c0, "c0", 2);
  const int64_t T = gx.size(0), B = gx.size(1), H = c0.size(1), Hout = h0.size(1);
  ck.tensor(gx, "gx [T, B, 4H]", {T, B, 4 * H}, gx);
  ck.tensor(h0, "h0 [B, Hout]", {B, Hout}, gx);
  ck.tensor(c0, "c0 [B, H]", {B, H}, gx);
  ck.tensor(w_hh, "w_hh [4H, Hout]", {4 * H, Hout}, gx);
  if (w_hr.has_value()) {
    ck.tensor(*w_hr, "w_hr [Hout, H]", {Hout, H}, gx);
  } else {
    TORCH_CHECK(Hout == H, ck.op, ": without w_hr, h0 [B, Hout] must have Hout = H = ", H, ", got ", Hout);
  }
  if (b_gx.has_value()) {
    ck.tensor(*b_gx, "b_gx [4H]", {4 * H}, gx);
  }
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor y = empty_output({T, B, Hout}, gx.options());
  at::Tensor gates = save ? empty_output({T, B, 4 * H}, gx.options()) : at::empty({0}, gx.options());
  at::Tensor cs = save ? empty_output({T, B, H}, gx.options()) : at::empty({0}, gx.options());
  at::Tensor h_n, c_n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "fastrnn::lstm_fwd", [&] {
    lstm_fwd_kernel<scalar_t>(gx, b_gx, w_hh, h0, c0, w_hr, len, rst, reverse, save, y, h_n, c_n, gates, cs);
  });
  return {y, h_n, c_n, gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bwd(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& w_hr, const at::Tensor& gates, const at::Tensor& cs,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  const Checker ck{"fastrnn::lstm_bwd"};
  ck.dims(gates, "gates", 3);
  ck.floating(gates, "gates");
  ck.dims(dh_n, "dh_n", 2);
  ck.dims(c0, "c0", 2);
  const int64_t T = gates.size(0), B = gates.size(1), H = c0.size(1), Hout = dh_n.size(1);
  ck.tensor(gates, "gates [T, B, 4H]", {T, B, 4 * H}, gates);
  ck.tensor(cs, "cs [T, B, H]", {T, B, H}, gates);
  ck.tensor(dy, "dy [T, B, Hout]", {T, B, Hout}, gates);
  ck.tensor(dh_n, "dh_n [B, Hout]", {B, Hout}, gates);
  ck.tensor(dc_n, "dc_n [B, H]", {B, H}, gates);
  ck.tensor(c0, "c0 [B, H]", {B, H}, gates);
  ck.tensor(w_hh, "w_hh [4H, Hout]", {4 * H, Hout}, gates);
  if (w_hr.has_value()) {
    ck.tensor(*w_hr, "w_hr [Hout, H]", {Hout, H}, gates);
  } else {
    TORCH_CHECK(Hout == H, ck.op, ": without w_hr, dh_n [B, Hout] must have Hout = H = ", H, ", got ", Hout);
  }
  const int64_t* len = ck.lengths(lengths, T, B);
  const bool* rst = ck.resets(resets, T, B);

  at::Tensor dgx = empty_output({T, B, 4 * H}, gates.options());
  at::Tensor dh0, dc0, dw_hr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "fastrnn::lstm_bwd", [&] {
    lstm_bwd_kernel<scalar_t>(dy, dh_n, dc_n, w_hh, c0, w_hr, gates, cs, len, rst, reverse, dgx, dh0, dc0, dw_hr);
  });
  return {dgx, dh0, dc0, dw_hr};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
