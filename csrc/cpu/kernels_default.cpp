// The CPU kernels (lstm.cpp, gru.cpp, rnn.cpp, small_linear.cpp) compiled for the default capability: one translation unit, built
// with -DCPU_CAPABILITY=DEFAULT and the flags none (portable) (fastrnn/_build_cpu.py,
// CMakeLists.txt). kernels.h explains the scheme; dispatch.cpp chooses a copy at run time.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(__AVX__)
#error "kernels_default.cpp must be compiled without ISA flags (fastrnn/_build_cpu.py, CMakeLists.txt)"
#endif
#if !defined(CPU_CAPABILITY)
#error "CPU_CAPABILITY must be defined (-DCPU_CAPABILITY=DEFAULT)"
#endif

#include "gru.cpp"
#include "lstm.cpp"
#include "rnn.cpp"
#include "small_linear.cpp"
#include "fma_peak.cpp"  // the FMA-peak loop of this capability (the benchmark's measured FMA peak)

FASTRNN_DEFINE_CPU_KERNELS(default)
