// Linear-layer GEMM (y = x W^T, PyTorch weight layout) at the shapes the compressors run:
// 128 digest rows and 640 context + digest rows against 4096 x 4096 and 11008 x 4096 weights.
// ctxcomp's packed GEMM (core/gemm.hpp) against Eigen's GEMM of the same product in the same
// binary, with the fraction of the FMA peak measured by `peak/fma`. gemm/ctxcomp_bf16dot: the bf16
// compute path (bf16 weights, activations rounded to bf16, vdpbf16ps), with its fraction of the
// bf16 pair-dot peak `peak/bf16dot` as well.
#include "bench_common.hpp"
#include "synthetic_llama.hpp"

using namespace ctxcomp;

namespace {

struct Shape {
  index_t M, N, K;
};

template <class T, Compute C = Compute::fp32>
void linear_ctxcomp(benchmark::State& st, Shape s, int threads) {
  auto x = bench::random_buffer(std::size_t(s.M * s.K), 1);
  std::vector<T> w(std::size_t(s.N * s.K));
  bench::fill(w, 2, 0.02f);
  std::vector<float> y(std::size_t(s.M * s.N));
  Workspace ws;
  bench::LoopClock clock;
  bench::with_executor(threads, [&](const auto& exec) {
    clock.start();
    for (auto _ : st) {
      linear(matrix_view<const float>(x.data(), s.M, s.K), WeightView<T>{w.data(), s.N, s.K},
             matrix_view(y.data(), s.M, s.N), ws, exec, C);
      benchmark::DoNotOptimize(y.data());
    }
  });
  const double f = 2.0 * double(s.M) * double(s.N) * double(s.K);
  st.counters["GFLOPS"] = bench::rate(f * 1e-9);
  st.counters["peak_fraction"] = bench::peak_fraction(f, threads, st, clock);
  if (C == Compute::bf16) st.counters["bf16dot_peak_fraction"] = bench::bf16dot_peak_fraction(f, threads, st, clock);
}

/// Baseline: Eigen's GEMM on the same operands, split as the library's linear layer was before
/// core/gemm.hpp (blocks of 128 output features spread over the same executor).
void linear_eigen(benchmark::State& st, Shape s, int threads) {
  auto x = bench::random_buffer(std::size_t(s.M * s.K), 1);
  std::vector<float> w(std::size_t(s.N * s.K));
  bench::fill(w, 2, 0.02f);
  std::vector<float> y(std::size_t(s.M * s.N));
  auto xv = matrix_view<const float>(x.data(), s.M, s.K);
  auto wv = matrix_view<const float>(w.data(), s.N, s.K);
  auto yv = matrix_view(y.data(), s.M, s.N);
  bench::LoopClock clock;
  bench::with_executor(threads, [&](const auto& exec) {
    const index_t blocks = (s.N + 127) / 128;
    clock.start();
    for (auto _ : st) {
      exec.parallel_for(blocks, [&](index_t b, index_t) {
        const index_t o0 = b * 128, n = std::min<index_t>(128, s.N - o0);
        yv.middleCols(o0, n).noalias() = xv * wv.middleRows(o0, n).transpose();
      });
      benchmark::DoNotOptimize(y.data());
    }
  });
  const double f = 2.0 * double(s.M) * double(s.N) * double(s.K);
  st.counters["GFLOPS"] = bench::rate(f * 1e-9);
  st.counters["peak_fraction"] = bench::peak_fraction(f, threads, st, clock);
}

/// The FMA peak itself on `threads` cores (one fma_chains run per core), beside the per-core
/// figure every peak_fraction divides by.
void fma_peak(benchmark::State& st, int threads) {
  const index_t iters = 2'000'000 / simd::Vec::width;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) exec.parallel_for(threads, [&](index_t, index_t) { bench::fma_chains(iters); });
  });
  const double flops = 2.0 * double(iters) * bench::kFmaChains * simd::Vec::width * threads;
  st.counters["GFLOPS"] = bench::rate(flops * 1e-9);
  st.counters["per_core_peak_GFLOPS"] = bench::fma_peak_gflops_per_core();
}

/// The bf16 pair-dot peak (vdpbf16ps chains) on `threads` cores, as fma_peak.
void bf16dot_peak(benchmark::State& st, int threads) {
  const index_t iters = 2'000'000 / simd::Vec::width;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) exec.parallel_for(threads, [&](index_t, index_t) { bench::bf16dot_chains(iters); });
  });
  const double flops = 4.0 * double(iters) * bench::kFmaChains * simd::Vec::width * threads;
  st.counters["GFLOPS"] = bench::rate(flops * 1e-9);
  st.counters["per_core_peak_GFLOPS"] = bench::bf16dot_peak_gflops_per_core();
  st.counters["native"] = simd::Bf16Dot<simd::Vec>::native ? 1 : 0;
}

const bool registered = [] {
  const bool s = bench::smoke();
  const Shape shapes[] = {{s ? 32 : 128, s ? 256 : 4096, s ? 256 : 4096},
                          {s ? 32 : 128, s ? 688 : 11008, s ? 256 : 4096},
                          {s ? 80 : 640, s ? 256 : 4096, s ? 256 : 4096}};
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int t : {1, 2}) {
    const std::string sfx = t == 1 ? "" : "_t2";
    ms(benchmark::RegisterBenchmark(("peak/fma" + sfx).c_str(), fma_peak, t));
    ms(benchmark::RegisterBenchmark(("peak/bf16dot" + sfx).c_str(), bf16dot_peak, t));
    for (const Shape& sh : shapes) {
      const std::string name = std::to_string(sh.M) + "x" + std::to_string(sh.N) + "x" + std::to_string(sh.K) + sfx;
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_fp32/" + name).c_str(), linear_ctxcomp<float>, sh, t));
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_bf16/" + name).c_str(), linear_ctxcomp<bf16>, sh, t));
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_bf16dot/" + name).c_str(), linear_ctxcomp<bf16, Compute::bf16>, sh, t));
      ms(benchmark::RegisterBenchmark(("gemm/eigen_fp32/" + name).c_str(), linear_eigen, sh, t));
    }
  }
  return true;
}();

}  // namespace
