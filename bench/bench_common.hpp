// Helpers shared by the benchmarks: random buffers and the thread-count executors.
#pragma once
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
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

/// Whether this is a smoke run (CTXCOMP_BENCH_SMOKE set, as CI's): shapes are shrunk so that
/// every benchmark runs once, quickly; the names stay, the figures mean nothing.
inline bool smoke() { return std::getenv("CTXCOMP_BENCH_SMOKE") != nullptr; }

/// The thread counts of the multi-threaded benchmarks, from the environment variable
/// CTXCOMP_BENCH_THREADS: a comma-separated list of positive counts such as `1,2,8,16` (default
/// `1,2`), so the same benchmark names run on a machine of any size. A malformed list stops the
/// binary with a message naming it (before any benchmark runs).
inline const std::vector<int>& thread_counts() {
  static const std::vector<int> counts = [] {
    const char* env = std::getenv("CTXCOMP_BENCH_THREADS");
    if (env == nullptr || *env == '\0') return std::vector<int>{1, 2};
    std::vector<int> c;
    const std::string text = env;
    std::size_t pos = 0;
    while (pos <= text.size()) {
      const std::size_t end = std::min(text.find(',', pos), text.size());
      const std::string item = text.substr(pos, end - pos);
      char* stop = nullptr;
      const long t = item.empty() ? 0 : std::strtol(item.c_str(), &stop, 10);
      if (item.empty() || *stop != '\0' || t < 1 || t > 4096) {
        std::fprintf(stderr,
                     "ctxcomp_bench: CTXCOMP_BENCH_THREADS=\"%s\": \"%s\" is not a thread count; expected a "
                     "comma-separated list of counts from 1 to 4096, such as 1,2,8,16\n",
                     env, item.c_str());
        std::exit(2);
      }
      if (std::find(c.begin(), c.end(), int(t)) == c.end()) c.push_back(int(t));
      pos = end + 1;
    }
    return c;
  }();
  return counts;
}

/// The name suffix of a benchmark run on `threads` threads: none for one, `_t<threads>` else
/// (`attention/fused/causal_2048_t16`).
inline std::string thread_suffix(int threads) { return threads == 1 ? "" : "_t" + std::to_string(threads); }

/// A benchmark body that runs `body` with the AMX kernels switched off (amx::set_enabled), for
/// the `*_noamx` twins registered beside the bf16 benchmarks in AMX builds: the AVX512-BF16
/// vector kernels in the same binary, so the AMX ratio comes from one run.
template <class Body>
auto without_amx(Body body) {
  return [body](benchmark::State& st) {
    const bool was = amx::set_enabled(false);
    body(st);
    amx::set_enabled(was);
  };
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

/// fp32 FMA GFLOP/s of one core, measured once per process: the best of 9 runs of about 25 ms
/// of `fma_chains` (a peak: noise from a shared machine only lowers a run, so the maximum of
/// runs long enough to ramp the clock up is the figure that holds). Benchmarks report their
/// fraction of it (`peak_fraction`).
inline double fma_peak_gflops_per_core() {
  static const double peak = [] {
    double best = 0;
    for (int r = 0; r < 9; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const double flops = fma_chains(96'000'000 / simd::Vec::width);
      best = std::max(best, flops / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e-9);
    }
    return best;
  }();
  return peak;
}

/// `kFmaChains` independent bf16 pair-dot chains (simd::Bf16Dot: vdpbf16ps where the target has
/// it), the bf16 compute path's peak: 4 flops per lane per instruction. Returns the flops done.
inline double bf16dot_chains(index_t iters) {
  using V = simd::Vec;
  using D = simd::Bf16Dot<V>;
  constexpr int chains = kFmaChains;
  alignas(64) bf16 a0[2 * V::width], b0[2];
  for (int i = 0; i < 2 * V::width; ++i) a0[i] = bf16(1e-3f * float(i + 1));
  b0[0] = b0[1] = bf16(1e-7f);
  benchmark::DoNotOptimize(a0), benchmark::DoNotOptimize(b0);
  typename V::type acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = V::broadcast(1e-3f * float(c + 1));
  const auto a = D::load(a0);
  const auto b = D::broadcast(b0);
  for (index_t i = 0; i < iters; ++i)
    for (int c = 0; c < chains; ++c) acc[c] = D::dot(acc[c], a, b);
  auto sum = acc[0];
  for (int c = 1; c < chains; ++c) sum = sum + acc[c];
  float out = V::reduce_add(sum);
  benchmark::DoNotOptimize(out);
  return 4.0 * double(iters) * chains * V::width;
}

/// Per-core bf16 pair-dot peak in GFLOP/s (the maximum of repeated `bf16dot_chains` runs, as
/// fma_peak_gflops_per_core).
inline double bf16dot_peak_gflops_per_core() {
  static const double peak = [] {
    double best = 0;
    for (int r = 0; r < 9; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      const double flops = bf16dot_chains(96'000'000 / simd::Vec::width);
      best = std::max(best, flops / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e-9);
    }
    return best;
  }();
  return peak;
}

/// Wall-clock time of a benchmark's timed loop (Google Benchmark does not hand its own to the
/// benchmark): start() right before `for (auto _ : st)`, seconds() after it.
struct LoopClock {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void start() { t0 = std::chrono::steady_clock::now(); }
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

/// Fraction of the measured FMA peak of `threads` cores reached by `flops` per iteration over
/// the loop `clock` timed: a plain number (not a rate).
inline benchmark::Counter peak_fraction(double flops, int threads, const benchmark::State& st, const LoopClock& clock) {
  const double achieved = flops * double(st.iterations()) / clock.seconds();
  return benchmark::Counter(achieved / (fma_peak_gflops_per_core() * 1e9 * threads));
}

/// As peak_fraction, against the bf16 pair-dot peak (`peak/bf16dot`).
inline benchmark::Counter bf16dot_peak_fraction(double flops, int threads, const benchmark::State& st,
                                                const LoopClock& clock) {
  const double achieved = flops * double(st.iterations()) / clock.seconds();
  return benchmark::Counter(achieved / (bf16dot_peak_gflops_per_core() * 1e9 * threads));
}

}  // namespace ctxcomp::bench
