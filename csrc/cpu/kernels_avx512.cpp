// The CPU kernels (lstm.cpp, gru.cpp, rnn.cpp, small_linear.cpp) compiled for the avx512 capability: one translation unit, built
// with -DCPU_CAPABILITY=AVX512 and the flags -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq (fastrnn/_build_cpu.py,
// CMakeLists.txt). kernels.h explains the scheme; dispatch.cpp chooses a copy at run time.
#if !defined(CPU_CAPABILITY_AVX512) || !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error "kernels_avx512.cpp must be compiled with -DCPU_CAPABILITY_AVX512 and the AVX-512 F/BW/VL/DQ flags (fastrnn/_build_cpu.py)"
#endif
#if !defined(CPU_CAPABILITY)
#error "CPU_CAPABILITY must be defined (-DCPU_CAPABILITY=AVX512)"
#endif

#include "gru.cpp"
#include "lstm.cpp"
#include "rnn.cpp"
#include "small_linear.cpp"
#include "fma_peak.cpp"  // the FMA-peak loop of this capability (the benchmark's measured FMA peak)

FASTRNN_DEFINE_CPU_KERNELS(avx512)
