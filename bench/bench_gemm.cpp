// Linear-layer GEMM (y = x W^T, PyTorch weight layout) at the shapes the compressors run:
// 128 digest rows and 640 context + digest rows against 4096 x 4096 and 11008 x 4096 weights.
// ctxcomp's packed GEMM (core/gemm.hpp) against Eigen's GEMM of the same product in the same
// binary, with the fraction of the FMA peak measured by `peak/fma`. gemm/ctxcomp_bf16dot: the bf16
// compute path (bf16 weights, activations rounded to bf16, vdpbf16ps), with its fraction of the
// bf16 pair-dot peak `peak/bf16dot` as well. kernels/...: the decode attention kernels alone and
// the many-row K tile transposition (below).
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

// ---- The decode kernels alone, in cache (core/tile_gemm.hpp) ----
// kernels/tile_gemm_nt/<rows>x<keys>x128_<kv>: scores = Q K^T of `rows` query rows (1: MHA, 4: a
// GQA group of 32/8) against fp32, fp16 or int8 keys (qint8: the integers; attention applies the
// scales outside the kernel), one 64-key tile per call as attention makes them;
// kernels/tile_gemm/<rows>x<keys>x128_<kv>: out += P V over the same tiles. The operands stay in
// L2, so these time the arithmetic that decode from memory has to hide behind its reads (a kernel
// that is load-bound or spills shows here first). Baseline: Eigen's fp32 product of the same
// operands in one call (kernels/eigen_fp32/...).
constexpr index_t kKernelDim = 128, kKernelTile = 64;

/// GFLOPS and peak_fraction of a rows x keys x kKernelDim product per iteration.
void kernel_counters(benchmark::State& st, index_t rows, index_t keys, const bench::LoopClock& clock) {
  const double f = 2.0 * double(rows) * double(keys) * double(kKernelDim);
  st.counters["GFLOPS"] = bench::rate(f * 1e-9);
  st.counters["peak_fraction"] = bench::peak_fraction(f, 1, st, clock);
}

/// qk: scores = Q K^T (tile_gemm_nt); else out += P V (tile_gemm), K / V stored as T.
template <class T>
void decode_kernel(benchmark::State& st, index_t rows, index_t keys, bool qk) {
  const index_t d = kKernelDim;
  const auto a = bench::random_buffer(std::size_t(rows * (qk ? d : keys)), 1);  // Q or P
  const auto bf = bench::random_buffer(std::size_t(keys * d), 2);
  std::vector<T> b(bf.size());  // K or V (qint8: quantised per row, the scale left out as attention leaves it)
  if constexpr (is_quantized_v<T>)
    for (index_t r = 0; r < keys; ++r) kernels::quantize_row(bf.data() + r * d, b.data() + r * d, d);
  else
    std::transform(bf.begin(), bf.end(), b.begin(), [](float x) { return T(x); });
  std::vector<float> c(std::size_t(rows * (qk ? keys : d)));
  bench::LoopClock clock;
  clock.start();
  for (auto _ : st) {
    if (!qk) std::fill(c.begin(), c.end(), 0.f);
    for (index_t j = 0; j < keys; j += kKernelTile) {
      if (qk) kernels::tile_gemm_nt(a.data(), d, b.data() + j * d, d, c.data() + j, keys, rows, kKernelTile, d);
      else kernels::tile_gemm<true>(a.data() + j, keys, b.data() + j * d, d, c.data(), d, rows, d, kKernelTile);
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  kernel_counters(st, rows, keys, clock);
}

/// Baseline: Eigen's fp32 GEMM of the same operands (QK: Q K^T; PV: P V), one call.
void decode_kernel_eigen(benchmark::State& st, index_t rows, index_t keys, bool qk) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const index_t d = kKernelDim;
  const auto a = bench::random_buffer(std::size_t(rows * (qk ? d : keys)), 1);
  const auto b = bench::random_buffer(std::size_t(keys * d), 2);
  const Eigen::Map<const Mat> A(a.data(), rows, qk ? d : keys), B(b.data(), keys, d);
  Mat C(rows, qk ? keys : d);
  bench::LoopClock clock;
  clock.start();
  for (auto _ : st) {
    if (qk) C.noalias() = A * B.transpose();
    else C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  kernel_counters(st, rows, keys, clock);
}

/// The many-row attention's K tile (kKernelTile keys x kKernelDim, stored as T) widened and
/// transposed for the outer-product GEMM, in cache: kernels::widen_transposed over V (the
/// vector kernel: blocks transposed in registers; the scalar twin: one load and one store per
/// element, as the attention's stores were before). GBps counts the fp32 bytes written.
template <class T, class V>
void pack_kernel(benchmark::State& st) {
  const index_t d = kKernelDim, n = kKernelTile;
  const auto f = bench::random_buffer(std::size_t(n * d), 3);
  const std::vector<T> src(f.begin(), f.end());
  std::vector<float> kt(std::size_t(d * n));
  for (auto _ : st) {
    kernels::widen_transposed<V>(src.data(), d, n, d, nullptr, kt.data(), n);
    benchmark::DoNotOptimize(kt.data());
    benchmark::ClobberMemory();
  }
  st.counters["GBps"] = bench::rate(double(n * d) * sizeof(float) * 1e-9);
}

const bool registered = [] {
  const bool s = bench::smoke();
  const Shape shapes[] = {{s ? 32 : 128, s ? 256 : 4096, s ? 256 : 4096},
                          {s ? 32 : 128, s ? 688 : 11008, s ? 256 : 4096},
                          {s ? 80 : 640, s ? 256 : 4096, s ? 256 : 4096}};
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int t : bench::thread_counts()) {
    const std::string sfx = bench::thread_suffix(t);
    ms(benchmark::RegisterBenchmark(("peak/fma" + sfx).c_str(), fma_peak, t));
    ms(benchmark::RegisterBenchmark(("peak/bf16dot" + sfx).c_str(), bf16dot_peak, t));
    for (const Shape& sh : shapes) {
      const std::string name = std::to_string(sh.M) + "x" + std::to_string(sh.N) + "x" + std::to_string(sh.K) + sfx;
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_fp32/" + name).c_str(), linear_ctxcomp<float>, sh, t));
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_bf16/" + name).c_str(), linear_ctxcomp<bf16>, sh, t));
      ms(benchmark::RegisterBenchmark(("gemm/ctxcomp_bf16dot/" + name).c_str(), linear_ctxcomp<bf16, Compute::bf16>, sh, t));
      if (amx::compiled())  // the same with AMX switched off: the AVX512-BF16 vector kernels
        ms(benchmark::RegisterBenchmark(
            ("gemm/ctxcomp_bf16dot_noamx/" + name).c_str(),
            bench::without_amx([sh, t](benchmark::State& st) { linear_ctxcomp<bf16, Compute::bf16>(st, sh, t); })));
      ms(benchmark::RegisterBenchmark(("gemm/eigen_fp32/" + name).c_str(), linear_eigen, sh, t));
    }
  }
  const index_t keys = bench::smoke() ? 256 : 1024;
  for (index_t rows : {index_t(1), index_t(4)}) {
    const std::string shape = std::to_string(rows) + "x" + std::to_string(keys) + "x" + std::to_string(kKernelDim);
    auto us = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMicrosecond); };
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm_nt/" + shape + "_fp32").c_str(), decode_kernel<float>, rows, keys, true));
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm_nt/" + shape + "_fp16").c_str(), decode_kernel<fp16>, rows, keys, true));
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm_nt/" + shape + "_int8").c_str(), decode_kernel<qint8>, rows, keys, true));
    us(benchmark::RegisterBenchmark(("kernels/eigen_fp32/qk_" + shape).c_str(), decode_kernel_eigen, rows, keys, true));
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm/" + shape + "_fp32").c_str(), decode_kernel<float>, rows, keys, false));
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm/" + shape + "_fp16").c_str(), decode_kernel<fp16>, rows, keys, false));
    us(benchmark::RegisterBenchmark(("kernels/tile_gemm/" + shape + "_int8").c_str(), decode_kernel<qint8>, rows, keys, false));
    us(benchmark::RegisterBenchmark(("kernels/eigen_fp32/pv_" + shape).c_str(), decode_kernel_eigen, rows, keys, false));
  }
  const std::string tile = std::to_string(kKernelTile) + "x" + std::to_string(kKernelDim) + "_fp16";
  for (auto* b : {benchmark::RegisterBenchmark(("kernels/widen_transposed/" + tile).c_str(), pack_kernel<fp16, simd::Vec>),
                  benchmark::RegisterBenchmark(("kernels/widen_transposed_scalar/" + tile).c_str(),
                                               pack_kernel<fp16, simd::ScalarVec>)})
    b->UseRealTime()->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
