// The six recurrence ops of docs/contract.md for CUDA tensors: TORCH_LIBRARY_IMPL(fastrnn, CUDA, m).
// Here live the tensor checks, the device guard, the current stream, the dtype mapping, the workspace,
// the per-step GEMMs (ATen -> cuBLAS, into preallocated buffers) and the choice of scheme; the kernels
// are plain CUDA behind csrc/cuda/cuda_api.h.
//
// Legend: T steps, B batch, H hidden units, Hout = proj_size or H, G gates (LSTM 4, GRU 3, RNN 1),
// GH = G*H; "acc" is float (double for fp64 tensors).
//
// Scheme (docs/cuda.md): the persistent kernel when persistent_plan says it fits (small batch, W_hh fits
// in the SMs' shared memory, every block co-resident), else the per-step scheme. FASTRNN_CUDA_SCHEME=
// auto|step|persistent overrides it for tests and benchmarks ("persistent" raises if it does not fit).
// Nothing here synchronises with the host, so the ops can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "cuda_api.h"

namespace fastrnn {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(),
                  " (expected float32, float64, float16 or bfloat16)");
  }
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Checks every tensor of one op call against the first one (`ref`): defined, same CUDA device, same
// dtype, the expected shape. Returns the tensor contiguous (the kernels index it densely).
struct Checker {
  const char* op;
  at::Tensor ref;
  const char* ref_name;

  Checker(const char* op_, const at::Tensor& ref_, const char* ref_name_, int64_t dim)
      : op(op_), ref(ref_), ref_name(ref_name_) {
    TORCH_CHECK(ref.defined(), op, ": ", ref_name, " is undefined");
    TORCH_CHECK(ref.is_cuda(), op, ": ", ref_name, " must be a CUDA tensor, got ", ref.device());
    TORCH_CHECK(ref.dim() == dim, op, ": ", ref_name, " must have ", dim, " dimensions, got shape ", ref.sizes());
    dtype_of(ref, op);
  }

  at::Tensor operator()(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                ref.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                ref_name, " has ", ref.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), ", expected ", shape);
    return t.contiguous();
  }

  at::Tensor optional(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) const {
    return t.has_value() && t->defined() ? (*this)(*t, name, shape) : at::Tensor();
  }

  // lengths: int64 [B] on the same device; its values need no check (the kernels only compare them).
  at::Tensor lengths(const std::optional<at::Tensor>& t, int64_t B) const {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": lengths must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->device() == ref.device(), op, ": lengths is on ", t->device(), " but ", ref_name, " is on ",
                ref.device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, ": lengths must have shape [", B, "], got ", t->sizes());
    return t->contiguous();
  }

  // resets: bool [T, B] on the same device (docs/contract.md); read in the kernels, one byte per (t, b).
  at::Tensor resets(const std::optional<at::Tensor>& t, int64_t T, int64_t B) const {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->scalar_type() == at::kBool, op, ": resets must be bool, got ", t->scalar_type());
    TORCH_CHECK(t->device() == ref.device(), op, ": resets is on ", t->device(), " but ", ref_name, " is on ",
                ref.device());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == B, op, ": resets must have shape [", T, ", ", B,
                "], got ", t->sizes());
    return t->contiguous();
  }

  // A size of `ref` that must be a multiple of `gates`, divided by it.
  int64_t per_gate(int64_t size, int64_t gates, const char* what) const {
    TORCH_CHECK(size % gates == 0, op, ": ", ref_name, ".size(2) = ", size, " must be ", gates, " * ", what);
    return size / gates;
  }
};

template <typename Ptr = const void>
Ptr* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

enum class Scheme { kAuto, kStep, kPersistent };

Scheme scheme_from_env() {
  const char* s = std::getenv("FASTRNN_CUDA_SCHEME");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Scheme::kAuto;
  if (std::strcmp(s, "step") == 0) return Scheme::kStep;
  if (std::strcmp(s, "persistent") == 0) return Scheme::kPersistent;
  TORCH_CHECK(false, "FASTRNN_CUDA_SCHEME must be auto, step or persistent, got '", s, "'");
}

// The persistent plan to use, or a plan with ok = false for the step scheme.
PersistentPlan choose_scheme(Cell cell, DType dtype, bool backward, int64_t B, int64_t H, int64_t Hout,
                             const at::Tensor& ref, const char* op) {
  PersistentPlan plan;
  const Scheme scheme = scheme_from_env();
  if (scheme == Scheme::kStep) return plan;
  C10_CUDA_CHECK(persistent_plan(cell, dtype, backward, B, H, Hout, ref.get_device(), &plan));
  TORCH_CHECK(plan.ok || scheme != Scheme::kPersistent, op,
              ": FASTRNN_CUDA_SCHEME=persistent, but the persistent kernel does not apply here: ", plan.why);
  return plan;
}

at::Tensor workspace(const PersistentPlan& plan, const at::Tensor& like) {
  return at::empty({plan.workspace_acc}, like.options().dtype(acc_type(like)));
}

// ---- one recurrence, any cell ----

// The tensors of a forward op (undefined where the cell or the call has none).
struct FwdTensors {
  at::Tensor gx, w_hh, b_hh, h0, c0, w_hr, lengths, resets;
  at::Tensor y, h_n, c_n, saved, cs;
};

void run_forward(FwdParams p, const FwdTensors& x, const char* op) {
  const int64_t T = p.T, B = p.B, H = p.H;
  if (T == 0 || B == 0 || H == 0) {  // nothing to compute, and no grid may be launched empty
    x.y.zero_();
    x.h_n.copy_(x.h0);
    if (x.c_n.defined()) x.c_n.copy_(x.c0);
    if (x.saved.defined()) x.saved.zero_();
    if (x.cs.defined()) x.cs.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PersistentPlan plan = choose_scheme(p.cell, p.dtype, false, B, H, p.Hout, x.gx, op);
  if (plan.ok) {
    const at::Tensor ws = workspace(plan, x.gx);
    C10_CUDA_CHECK(persistent_fwd(p, plan, ws.data_ptr(), stream));
    return;
  }
  // Step scheme: gh = h_{t-1} W_hh^T (+ b_hh) by cuBLAS, then the pointwise kernel.
  const int64_t GH = gates_of(p.cell) * H;
  const bool proj = x.w_hr.defined();
  at::Tensor h = x.h0.clone();                                                          // [B,Hout] dtype
  at::Tensor c = x.c0.defined() ? x.c0.to(acc_type(x.gx), false, true) : at::Tensor();  // [B,H] acc
  at::Tensor gh = at::empty({B, GH}, x.gx.options());
  at::Tensor m = proj ? at::empty({B, H}, x.gx.options()) : at::Tensor();
  at::Tensor hp = proj ? at::empty({B, p.Hout}, x.gx.options()) : at::Tensor();
  const at::Tensor w_hh_t = x.w_hh.t(), w_hr_t = proj ? x.w_hr.t() : at::Tensor();
  StepFwdWork w{gh.data_ptr(), h.data_ptr(), ptr<void>(c), ptr<void>(m)};
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    if (x.b_hh.defined()) {
      at::addmm_out(gh, x.b_hh, h, w_hh_t);
    } else {
      at::mm_out(gh, h, w_hh_t);
    }
    C10_CUDA_CHECK(step_fwd(p, w, t, stream));
    if (proj) {
      at::mm_out(hp, m, w_hr_t);
      C10_CUDA_CHECK(proj_fwd_select(p, hp.data_ptr(), h.data_ptr(), t, stream));
    }
  }
  x.h_n.copy_(h);
  if (x.c_n.defined()) x.c_n.copy_(c);
}

// The tensors of a backward op.
struct BwdTensors {
  at::Tensor dy, dh_n, dc_n, w_hh, h0, c0, w_hr, y, saved, cs, lengths, resets;
  at::Tensor dgx, dgh, dh0, dc0, dw_hr;
};

void run_backward(BwdParams p, const BwdTensors& x, const char* op) {
  const int64_t T = p.T, B = p.B, H = p.H;
  if (T == 0 || B == 0 || H == 0) {
    x.dgx.zero_();
    if (x.dgh.defined()) x.dgh.zero_();
    x.dh0.copy_(x.dh_n);
    if (x.dc0.defined()) x.dc0.copy_(x.dc_n);
    if (x.dw_hr.defined()) x.dw_hr.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PersistentPlan plan = choose_scheme(p.cell, p.dtype, true, B, H, p.Hout, x.dy, op);
  if (plan.ok) {
    const at::Tensor ws = workspace(plan, x.dy);
    C10_CUDA_CHECK(persistent_bwd(p, plan, ws.data_ptr(), stream));
    return;
  }
  // Step scheme: the pointwise kernel leaves in dh the part of dh_{t-1} that skips W_hh, then
  // dh += dg_t W_hh by cuBLAS (dg = dgh for GRU, dgx otherwise).
  const bool proj = x.w_hr.defined();
  at::Tensor dh = x.dh_n.clone();                                                          // [B,Hout] dtype
  at::Tensor dc = x.dc_n.defined() ? x.dc_n.to(acc_type(x.dy), false, true) : at::Tensor();  // [B,H] acc
  const at::Tensor dg = x.dgh.defined() ? x.dgh : x.dgx;
  at::Tensor dht, dm, m;
  if (proj) {
    dht = at::empty({T, B, p.Hout}, x.dy.options());  // dh_t (0 where inactive), for dm and dw_hr
    dm = at::empty({B, H}, x.dy.options());
    m = at::empty({T, B, H}, x.dy.options());
    p.m = m.data_ptr();
  }
  StepBwdWork w{dh.data_ptr(), ptr<void>(dc), ptr<const void>(dm)};
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? s : T - 1 - s;  // the forward order, reversed
    if (proj) {
      C10_CUDA_CHECK(proj_bwd_gather(p, dh.data_ptr(), dht.data_ptr(), t, stream));
      at::mm_out(dm, dht.select(0, t), x.w_hr);
    }
    C10_CUDA_CHECK(step_bwd(p, w, t, stream));
    dh.addmm_(dg.select(0, t), x.w_hh);
  }
  if (p.resets != nullptr) {
    // The GEMM above added dg W_hh to the rows whose last processed step reset; no gradient crosses it.
    C10_CUDA_CHECK(step_bwd_finish(p, dh.data_ptr(), ptr(dc), stream));
  } else {
    x.dh0.copy_(dh);
    if (x.dc0.defined()) x.dc0.copy_(dc);
  }
  // dw_hr = sum_t dh_t^T m_t as one GEMM over all T*B rows (deterministic, no per-step accumulation).
  if (proj) {
    at::Tensor dw_hr = x.dw_hr;
    at::mm_out(dw_hr, dht.view({T * B, p.Hout}).t(), m.view({T * B, H}));
  }
}

FwdParams fwd_params(Cell cell, const FwdTensors& x, bool reverse, const char* op) {
  FwdParams p{};
  p.cell = cell;
  p.dtype = dtype_of(x.gx, op);
  p.T = x.gx.size(0);
  p.B = x.gx.size(1);
  p.H = x.gx.size(2) / gates_of(cell);
  p.Hout = x.h0.size(1);
  p.reverse = reverse;
  p.lengths = x.lengths.defined() ? x.lengths.data_ptr<int64_t>() : nullptr;
  p.resets = x.resets.defined() ? static_cast<const uint8_t*>(x.resets.data_ptr()) : nullptr;
  p.gx = ptr(x.gx);
  p.w_hh = ptr(x.w_hh);
  p.b_hh = ptr(x.b_hh);
  p.h0 = ptr(x.h0);
  p.c0 = ptr(x.c0);
  p.y = ptr<void>(x.y);
  p.h_n = ptr<void>(x.h_n);
  p.c_n = ptr<void>(x.c_n);
  p.saved = x.saved.defined() && x.saved.numel() > 0 ? ptr<void>(x.saved) : nullptr;
  p.cs = x.cs.defined() && x.cs.numel() > 0 ? ptr<void>(x.cs) : nullptr;
  return p;
}

BwdParams bwd_params(Cell cell, const BwdTensors& x, bool reverse, const char* op) {
  BwdParams p{};
  p.cell = cell;
  p.dtype = dtype_of(x.dy, op);
  p.T = x.dy.size(0);
  p.B = x.dy.size(1);
  p.H = x.dgx.size(2) / gates_of(cell);
  p.Hout = x.dy.size(2);
  p.reverse = reverse;
  p.lengths = x.lengths.defined() ? x.lengths.data_ptr<int64_t>() : nullptr;
  p.resets = x.resets.defined() ? static_cast<const uint8_t*>(x.resets.data_ptr()) : nullptr;
  p.dy = ptr(x.dy);
  p.dh_n = ptr(x.dh_n);
  p.dc_n = ptr(x.dc_n);
  p.w_hh = ptr(x.w_hh);
  p.h0 = ptr(x.h0);
  p.c0 = ptr(x.c0);
  p.y = ptr(x.y);
  p.saved = ptr(x.saved);
  p.cs = ptr(x.cs);
  p.dgx = ptr<void>(x.dgx);
  p.dgh = ptr<void>(x.dgh);
  p.dh0 = ptr<void>(x.dh0);
  p.dc0 = ptr<void>(x.dc0);
  p.m = nullptr;
  return p;
}

at::Tensor saved_or_empty(bool save, const at::Tensor& like, at::IntArrayRef shape) {
  return save ? at::empty(shape, like.options()) : at::empty({0}, like.options());
}

// gx with the op's optional b_gx [G*H] added (docs/contract.md): one pass over gx before the kernels. The
// modules hand the input bias to the op only on the cpu backend, whose kernels add it in the cell
// (fastrnn/autograd.py, split_input_bias); on CUDA it stays in the projection's GEMM, so this keeps the contract.
at::Tensor with_input_bias(const at::Tensor& gx, const at::Tensor& b_gx) {
  return b_gx.defined() ? gx + b_gx : gx;
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd(
    const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool save, const std::optional<at::Tensor>& b_gx) {
  const char* op = "fastrnn::lstm_fwd (CUDA)";
  const Checker chk(op, gx, "gx", 3);
  TORCH_CHECK(c0.dim() == 2 && h0.dim() == 2, op, ": h0 and c0 must be [B, Hout] and [B, H], got ", h0.sizes(),
              " and ", c0.sizes());
  const int64_t T = gx.size(0), B = gx.size(1), H = chk.per_gate(gx.size(2), 4, "H"), Hout = h0.size(1);
  TORCH_CHECK(H == c0.size(1), op, ": gx.size(2) = ", gx.size(2), " but c0 has H = ", c0.size(1));
  FwdTensors x;
  x.gx = chk(gx, "gx", {T, B, 4 * H});
  x.w_hr = chk.optional(w_hr, "w_hr", {Hout, H});
  TORCH_CHECK(x.w_hr.defined() || Hout == H, op, ": h0 has ", Hout, " columns but H = ", H, " and w_hr is None");
  x.w_hh = chk(w_hh, "w_hh", {4 * H, Hout});
  x.h0 = chk(h0, "h0", {B, Hout});
  x.c0 = chk(c0, "c0", {B, H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const at::Tensor bias = chk.optional(b_gx, "b_gx", {4 * H});
  const c10::cuda::CUDAGuard guard(gx.device());
  x.gx = with_input_bias(x.gx, bias);
  x.y = at::empty({T, B, Hout}, gx.options());
  x.h_n = at::empty({B, Hout}, gx.options());
  x.c_n = at::empty({B, H}, gx.options());
  x.saved = saved_or_empty(save, gx, {T, B, 4 * H});
  x.cs = saved_or_empty(save, gx, {T, B, H});
  run_forward(fwd_params(Cell::kLSTM, x, reverse, op), x, op);
  return {x.y, x.h_n, x.c_n, x.saved, x.cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bwd(
    const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const std::optional<at::Tensor>& w_hr, const at::Tensor& gates, const at::Tensor& cs,
    const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  const char* op = "fastrnn::lstm_bwd (CUDA)";
  const Checker chk(op, dy, "dy", 3);
  TORCH_CHECK(gates.dim() == 3, op, ": gates must be [T, B, 4H], got ", gates.sizes());
  const int64_t T = dy.size(0), B = dy.size(1), Hout = dy.size(2);
  TORCH_CHECK(gates.size(2) % 4 == 0, op, ": gates.size(2) = ", gates.size(2), " must be 4 * H");
  const int64_t H = gates.size(2) / 4;
  BwdTensors x;
  x.dy = chk(dy, "dy", {T, B, Hout});
  x.saved = chk(gates, "gates", {T, B, 4 * H});
  x.w_hr = chk.optional(w_hr, "w_hr", {Hout, H});
  TORCH_CHECK(x.w_hr.defined() || Hout == H, op, ": dy has ", Hout, " columns but H = ", H, " and w_hr is None");
  x.dh_n = chk(dh_n, "dh_n", {B, Hout});
  x.dc_n = chk(dc_n, "dc_n", {B, H});
  x.w_hh = chk(w_hh, "w_hh", {4 * H, Hout});
  x.c0 = chk(c0, "c0", {B, H});
  x.cs = chk(cs, "cs", {T, B, H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const c10::cuda::CUDAGuard guard(dy.device());
  x.dgx = at::empty({T, B, 4 * H}, dy.options());
  x.dh0 = at::empty({B, Hout}, dy.options());
  x.dc0 = at::empty({B, H}, dy.options());
  x.dw_hr = x.w_hr.defined() ? at::empty({Hout, H}, dy.options()) : at::empty({0}, dy.options());
  run_backward(bwd_params(Cell::kLSTM, x, reverse, op), x, op);
  return {x.dgx, x.dh0, x.dc0, x.dw_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_fwd(const at::Tensor& gx, const at::Tensor& w_hh,
                                                       const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse,
                                                       bool save, const std::optional<at::Tensor>& b_gx) {
  const char* op = "fastrnn::gru_fwd (CUDA)";
  const Checker chk(op, gx, "gx", 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = chk.per_gate(gx.size(2), 3, "H");
  FwdTensors x;
  x.gx = chk(gx, "gx", {T, B, 3 * H});
  x.w_hh = chk(w_hh, "w_hh", {3 * H, H});
  x.b_hh = chk.optional(b_hh, "b_hh", {3 * H});
  x.h0 = chk(h0, "h0", {B, H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const at::Tensor bias = chk.optional(b_gx, "b_gx", {3 * H});
  const c10::cuda::CUDAGuard guard(gx.device());
  x.gx = with_input_bias(x.gx, bias);
  x.y = at::empty({T, B, H}, gx.options());
  x.h_n = at::empty({B, H}, gx.options());
  x.saved = saved_or_empty(save, gx, {T, B, 4 * H});
  run_forward(fwd_params(Cell::kGRU, x, reverse, op), x, op);
  return {x.y, x.h_n, x.saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_bwd(const at::Tensor& dy, const at::Tensor& dh_n,
                                                       const at::Tensor& w_hh, const at::Tensor& y,
                                                       const at::Tensor& h0, const at::Tensor& saved,
                                                       const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse) {
  const char* op = "fastrnn::gru_bwd (CUDA)";
  const Checker chk(op, dy, "dy", 3);
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  BwdTensors x;
  x.dy = chk(dy, "dy", {T, B, H});
  x.dh_n = chk(dh_n, "dh_n", {B, H});
  x.w_hh = chk(w_hh, "w_hh", {3 * H, H});
  x.y = chk(y, "y", {T, B, H});
  x.h0 = chk(h0, "h0", {B, H});
  x.saved = chk(saved, "saved", {T, B, 4 * H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const c10::cuda::CUDAGuard guard(dy.device());
  x.dgx = at::empty({T, B, 3 * H}, dy.options());
  x.dgh = at::empty({T, B, 3 * H}, dy.options());
  x.dh0 = at::empty({B, H}, dy.options());
  run_backward(bwd_params(Cell::kGRU, x, reverse, op), x, op);
  return {x.dgx, x.dgh, x.dh0};
}

std::tuple<at::Tensor, at::Tensor> rnn_fwd(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& h0,
                                           const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets, bool reverse, bool relu,
    const std::optional<at::Tensor>& b_gx) {
  const char* op = "fastrnn::rnn_fwd (CUDA)";
  const Checker chk(op, gx, "gx", 3);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2);
  FwdTensors x;
  x.gx = chk(gx, "gx", {T, B, H});
  x.w_hh = chk(w_hh, "w_hh", {H, H});
  x.h0 = chk(h0, "h0", {B, H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const at::Tensor bias = chk.optional(b_gx, "b_gx", {H});
  const c10::cuda::CUDAGuard guard(gx.device());
  x.gx = with_input_bias(x.gx, bias);
  x.y = at::empty({T, B, H}, gx.options());
  x.h_n = at::empty({B, H}, gx.options());
  run_forward(fwd_params(relu ? Cell::kRNNRelu : Cell::kRNNTanh, x, reverse, op), x, op);
  return {x.y, x.h_n};
}

std::tuple<at::Tensor, at::Tensor> rnn_bwd(const at::Tensor& dy, const at::Tensor& dh_n, const at::Tensor& w_hh,
                                           const at::Tensor& y, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& resets,
                                           bool reverse, bool relu) {
  const char* op = "fastrnn::rnn_bwd (CUDA)";
  const Checker chk(op, dy, "dy", 3);
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  BwdTensors x;
  x.dy = chk(dy, "dy", {T, B, H});
  x.dh_n = chk(dh_n, "dh_n", {B, H});
  x.w_hh = chk(w_hh, "w_hh", {H, H});
  x.y = chk(y, "y", {T, B, H});
  x.lengths = chk.lengths(lengths, B);
  x.resets = chk.resets(resets, T, B);
  const c10::cuda::CUDAGuard guard(dy.device());
  x.dgx = at::empty({T, B, H}, dy.options());
  x.dh0 = at::empty({B, H}, dy.options());
  run_backward(bwd_params(relu ? Cell::kRNNRelu : Cell::kRNNTanh, x, reverse, op), x, op);
  return {x.dgx, x.dh0};
}

}  // namespace
}  // namespace cuda
}  // namespace fastrnn

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("lstm_fwd", TORCH_FN(fastrnn::cuda::lstm_fwd));
  m.impl("lstm_bwd", TORCH_FN(fastrnn::cuda::lstm_bwd));
  m.impl("gru_fwd", TORCH_FN(fastrnn::cuda::gru_fwd));
  m.impl("gru_bwd", TORCH_FN(fastrnn::cuda::gru_bwd));
  m.impl("rnn_fwd", TORCH_FN(fastrnn::cuda::rnn_fwd));
  m.impl("rnn_bwd", TORCH_FN(fastrnn::cuda::rnn_bwd));
}
