// The CPU kernels (lstm.cpp, gru.cpp, rnn.cpp, small_linear.cpp) compiled for the avx2 capability: one translation unit, built
// with -DCPU_CAPABILITY=AVX2 and the flags -mavx2 -mfma -mf16c (fastrnn/_build_cpu.py,
// CMakeLists.txt). kernels.h explains the scheme; dispatch.cpp chooses a copy at run time.
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__) || !defined(__FMA__) || defined(__AVX512F__)
#error "kernels_avx2.cpp must be compiled with -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c (fastrnn/_build_cpu.py)"
#endif
#if !defined(CPU_CAPABILITY)
#error "CPU_CAPABILITY must be defined (-DCPU_CAPABILITY=AVX2)"
#endif

#include "gru.cpp"
#include "lstm.cpp"
#include "rnn.cpp"
#include "small_linear.cpp"
#include "fma_peak.cpp"  // the FMA-peak loop of this capability (the benchmark's measured FMA peak)

FASTRNN_DEFINE_CPU_KERNELS(avx2)
