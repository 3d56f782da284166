// Helpers shared by the benchmarks: random buffers and the thread-count executors.
#pragma once
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include <ctxcomp/ctxcomp.hpp>

namespace ctxcomp::bench {

inline std::vector<float> random_buffer(std::size_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// Runs f with a serial executor (threads == 1) or an OpenMP team of `threads`.
template <class F>
void with_executor(int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1) return f(OpenMPExecutor(threads));
#endif
  (void)threads;
  f(SerialExecutor{});
}

inline benchmark::Counter rate(double per_iteration) {
  return benchmark::Counter(per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

/// Runs `iters` steps of 16 independent vector FMA chains in registers (enough to cover the FMA
/// latency on every port) and returns the FLOPs done. Inputs come through DoNotOptimize so the
/// compiler can neither fold nor drop the chains; without -ffast-math it cannot merge them.
inline constexpr int kFmaChains = 16;
inline double fma_chains(index_t iters) {
  using V = simd::Vec;
  constexpr int chains = kFmaChains;
  float a0 = 0.999999f, b0 = 1e-7f, c0 = 1e-3f;
  benchmark::DoNotOptimize(a0), benchmark::DoNotOptimize(b0), benchmark::DoNotOptimize(c0);
  typename V::type acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = V::broadcast(c0 * float(c + 1));
  const auto a = V::broadcast(a0), b = V::broadcast(b0);
  for (index_t i = 0; i < iters; ++i)
    for (int c = 0; c < chains; ++c) acc[c] = V::fma(acc[c], a, b);
  auto sum = acc[0];
  for (int c = 1; c < chains; ++c) sum = sum + acc[c];
  float out = V::reduce_add(sum);
  benchmark::DoNotOptimize(out);
  return 2.0 * double(iters) * chains * V::width;
}

/// fp32 FMA GFLOP/s of one core, measured once per process: median of 7 runs of ~10 ms of
/// `fma_chains`. Benchmarks report their fraction of it (`peak_fraction`).
inline double fma_peak_gflops_per_core() {
  static const double peak = [] {
    std::vector<double> runs;
    for (int r = 0; r < 7; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const double flops = fma_chains(4'000'000 / simd::Vec::width);
      runs.push_back(flops / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e-9);
    }
    std::nth_element(runs.begin(), runs.begin() + 3, runs.end());
    return runs[3];
  }();
  return peak;
}

/// Fraction of the measured FMA peak of `threads` cores reached by `flops` per iteration,
/// as a counter (shown per second because it is a rate; the value is the fraction).
inline benchmark::Counter peak_fraction(double flops, int threads) {
  return rate(flops / (fma_peak_gflops_per_core() * 1e9 * threads));
}

}  // namespace ctxcomp::bench
