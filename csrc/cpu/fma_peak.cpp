// The fp32 FMA throughput of one capability's vectors on torch's threads: the measured FMA peak of the
// benchmark's roofline (fastrnn/bench/roofline.py, docs/benchmarks.md "The FMA peak"). Compiled once per
// capability with the kernels (kernels_<capability>.cpp includes it), so it runs the instructions that
// capability's kernels run: zmm FMAs (avx512), ymm FMAs (avx2), or at::vec's portable loops (default).
//
// Why measured: the clock in /proc/cpuinfo is a VM's nominal one. On the AMD EPYC Zen 5 of issue 11 the FMA
// loop ran at 3.93 GHz against 2.6 nominal (the formula's peak 1.5x too low); on the Intel Xeon (Sapphire/
// Emerald Rapids class) of 2026-12-02 the formula gave 333 GFLOP/s while torch.mm reached 353 in the same
// run. A roofline below a measured GEMM says nothing.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {  // kernels.h: compiled once per capability

namespace fma_peak_detail {

// Independent accumulators: an FMA's result is ready 4 cycles after it issues (Intel since Skylake, AMD
// Zen 3-5) and two issue a cycle, so 8 chains keep both pipes busy; 10 leave room for a 5-cycle latency and
// fit, with the two constant operands, in the 16 registers AVX2 has.
constexpr int kChains = 10;

template <int... I>
struct Chains {};

using Vec = at::vec::Vectorized<float>;

// FLOPs of one thread's `iterations` rounds: an FMA is two FLOPs a lane.
inline double flops(int64_t iterations) {
  return 2.0 * kChains * Vec::size() * static_cast<double>(iterations);
}

// `iterations` rounds of kChains independent acc = acc * a + b. The fixed point of
// acc * a + b with |a| < 1 keeps every value finite and normal (no denormal slowdown), and the sum is
// stored where the compiler must assume it is read, so no round can be dropped.
template <int... I>
void rounds(int64_t iterations, Chains<I...>) {
  const Vec a(0.999999f), b(1e-6f);
  Vec acc[kChains] = {Vec(static_cast<float>(I))...};
  for (int64_t k = 0; k < iterations; ++k) {
    ((acc[I] = at::vec::fmadd(acc[I], a, b)), ...);  // unrolled: one instruction per chain
  }
  Vec sum = acc[0];
  for (int c = 1; c < kChains; ++c) {
    sum = sum + acc[c];
  }
  alignas(64) float out[Vec::size()];
  sum.store(out);
  float total = 0;
  for (float lane : out) {  // every lane: at::vec's portable copy is plain loops, whose unread lanes could go
    total += lane;
  }
  volatile float sink = total;
  (void)sink;
}

template <int... I>
constexpr Chains<I...> make_chains(std::integer_sequence<int, I...>) {
  return {};
}

}  // namespace fma_peak_detail

// Runs the loop `iterations` rounds on each of torch's intra-op threads at once (at::parallel_for, one
// chunk a thread), each thread timing its own loop; returns the sum over threads of each one's FLOP/s, and
// in `shortest_seconds` the shortest thread's time (the caller, dispatch.cpp, grows `iterations` by it).
// Per thread, not around the parallel region: waking a thread of the pool took more than a millisecond on
// the 2 shared cores of 2026-12-02 (load 5), which the wall clock of the region counted as FMA time
// (0.03 GFLOP/s measured for 2 threads against 236 for one).
inline double fma_loop(int64_t iterations, double* shortest_seconds) {
  namespace d = fma_peak_detail;
  using Clock = std::chrono::steady_clock;
  const int64_t threads = at::get_num_threads();
  std::vector<double> seconds(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const auto start = Clock::now();
      d::rounds(iterations, d::make_chains(std::make_integer_sequence<int, d::kChains>{}));
      seconds[t] = std::chrono::duration<double>(Clock::now() - start).count();
    }
  });
  double rate = 0, shortest = seconds[0];
  for (const double s : seconds) {
    rate += d::flops(iterations) / s;
    shortest = std::min(shortest, s);
  }
  *shortest_seconds = shortest;
  return rate;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastrnn
