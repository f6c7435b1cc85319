// The recurrence op schemas of docs/contract.md, declared once for every device. The CPU kernels
// register in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastrnn, CPU, m)), the CUDA ones in
// csrc/cuda/bindings.cpp; the fake (meta) kernels are registered from Python
// (fastrnn/backends/native.py -> schemas.register_fakes). These strings must equal
// fastrnn/backends/schemas.py's SCHEMAS (tests/test_native.py checks it).
// Legend: T steps, B batch, H hidden, Hout = proj_size or H, G gates (LSTM 4, GRU 3, RNN 1).
#include <torch/library.h>

TORCH_LIBRARY(fastrnn, m) {
  m.def(
      "lstm_fwd(Tensor gx, Tensor w_hh, Tensor h0, Tensor c0, Tensor? w_hr, Tensor? lengths, Tensor? resets, "
      "bool reverse, bool save, Tensor? b_gx=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_bwd(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor c0, Tensor? w_hr, Tensor gates, "
      "Tensor cs, Tensor? lengths, Tensor? resets, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_fwd(Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, Tensor? resets, bool reverse, "
      "bool save, Tensor? b_gx=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_bwd(Tensor dy, Tensor dh_n, Tensor w_hh, Tensor y, Tensor h0, Tensor saved, Tensor? lengths, "
      "Tensor? resets, bool reverse) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rnn_fwd(Tensor gx, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor? resets, bool reverse, bool relu, "
      "Tensor? b_gx=None) -> (Tensor, Tensor)");
  m.def(
      "rnn_bwd(Tensor dy, Tensor dh_n, Tensor w_hh, Tensor y, Tensor? lengths, Tensor? resets, bool reverse, "
      "bool relu) -> (Tensor, Tensor)");
}

// `import fastrnn._C` loads this library (and with it the registrations above). The module itself is
// empty: every entry point is a torch.ops.fastrnn op. Only the setuptools build defines
// FASTRNN_PYTHON_MODULE; the CMake build makes a plain library for torch.ops.load_library.
#ifdef FASTRNN_PYTHON_MODULE
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
