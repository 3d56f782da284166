// Helpers shared by the benchmarks: random buffers and the thread-count executors.
#pragma once
#include <benchmark/benchmark.h>

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

}  // namespace ctxcomp::bench
