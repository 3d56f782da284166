// IC-Former at the published scale (hidden 4096, 32 heads of 128, intermediate 11008, 3 layers,
// 128 digests, 512-token chunks; random weights): time per chunk with fp32 and bf16 weights,
// cost vs context length (chunked), and the baseline it replaces: one causal self-attention
// layer of a Llama-2-7B-shaped model over n + 128 tokens (ICAE-style).
// CTXCOMP_BENCH_SMOKE=1 shrinks every shape (CI runs them to keep them runnable).
#include <cstdlib>
#include <fstream>
#include <string>

#include "synthetic_llama.hpp"

using namespace ctxcomp;
using bench::fill;
using bench::smoke;

namespace {


digest::IcformerConfig published_config() {
  digest::IcformerConfig c;
  const bool s = smoke();
  c.hidden = s ? 256 : 4096;
  c.heads = c.kv_heads = s ? 4 : 32;
  c.head_dim = 128 / (s ? 2 : 1);
  c.intermediate = s ? 688 : 11008;
  c.layers = 3;
  c.num_digests = s ? 16 : 128;
  return c;
}
index_t chunk_len() { return smoke() ? 64 : 512; }

template <class T>
struct RandomIcformer {
  digest::IcformerConfig cfg = published_config();
  std::vector<std::vector<T>> storage;
  digest::IcformerWeights<T> weights;

  const T* add(std::size_t n, float scale, float offset = 0.f) {
    storage.emplace_back(n);
    fill(storage.back(), std::uint32_t(storage.size()), scale);
    if (offset != 0.f)
      for (auto& x : storage.back()) x = from_float<T>(to_float(x) + offset);
    return storage.back().data();
  }
  RandomIcformer() {
    const index_t d = cfg.hidden, qd = cfg.heads * cfg.head_dim, kd = cfg.kv_heads * cfg.head_dim, in = cfg.intermediate;
    storage.reserve(std::size_t(cfg.layers * 12 + 2));
    auto wv = [&](index_t o, index_t i) { return WeightView<T>{add(std::size_t(o * i), 0.02f), o, i}; };
    for (index_t l = 0; l < cfg.layers; ++l) {
      digest::IcformerLayerWeights<T> w;
      w.query_norm = add(std::size_t(d), 0.1f, 1.f);
      w.context_norm = add(std::size_t(d), 0.1f, 1.f);
      w.post_attention_norm = add(std::size_t(d), 0.1f, 1.f);
      w.q = wv(qd, d), w.k = wv(kd, d), w.v = wv(kd, d), w.o = wv(d, qd);
      w.mlp = {wv(in, d), wv(in, d), wv(d, in)};
      weights.layers.push_back(w);
    }
    weights.final_norm = add(std::size_t(d), 0.1f, 1.f);
  }
  std::size_t weight_bytes() const {
    std::size_t b = 0;
    for (const auto& s : storage) b += s.size() * sizeof(T);
    return b;
  }
};

/// Useful FLOPs of compressing one chunk of n tokens into k digests (multiply-add = 2).
double icformer_flops(const digest::IcformerConfig& c, index_t n) {
  const double k = double(c.num_digests), d = double(c.hidden), qd = double(c.heads * c.head_dim),
               kd = double(c.kv_heads * c.head_dim), in = double(c.intermediate);
  double f = 0;
  for (index_t l = 0; l < c.layers; ++l) {
    const double rows = c.is_cross(l) ? double(n) + k : k;
    f += 2 * k * d * qd + 2 * 2 * rows * d * kd + 2 * k * qd * d;  // q, k+v, o
    f += 4 * double(c.head_dim) * double(c.heads) * (k * (rows - k) + k * (k + 1) / 2);  // attention
    f += 3 * 2 * k * d * in;                                                         // SwiGLU
  }
  return f;
}

template <class T>
RandomIcformer<T>& model() {
  static RandomIcformer<T> m;
  return m;
}

template <class T>
void chunk(benchmark::State& st, int threads, Compute compute) {
  auto& m = model<T>();
  const index_t n = chunk_len(), k = m.cfg.num_digests, d = m.cfg.hidden;
  digest::IcformerOptions opt;
  opt.compute = compute;
  digest::IcformerEncoder<T> enc(m.cfg, m.weights, opt);
  std::vector<float> ctx(std::size_t(n * d)), dig(std::size_t(k * d)), out(dig.size());
  fill(ctx, 7, 1.f);
  fill(dig, 8, 1.f);
  bench::LoopClock clock;
  bench::with_executor(threads, [&](const auto& exec) {
    auto run = [&] {
      enc.compress(matrix_view<const float>(ctx.data(), n, d), matrix_view<const float>(dig.data(), k, d),
                   matrix_view(out.data(), k, d), exec);
    };
    run();  // steady state, as in a host that keeps its encoder: workspaces are sized and touched
    clock.start();
    for (auto _ : st) {
      run();
      benchmark::DoNotOptimize(out.data());
    }
  });
  const double f = icformer_flops(m.cfg, n);
  st.counters["GFLOPS"] = bench::rate(f * 1e-9);
  st.counters["peak_fraction"] = bench::peak_fraction(f, threads, st, clock);
  if (compute == Compute::bf16) st.counters["bf16dot_peak_fraction"] = bench::bf16dot_peak_fraction(f, threads, st, clock);
  st.counters["weight_MB"] = double(m.weight_bytes()) / 1e6;
  st.counters["tokens_per_s"] = bench::rate(double(n));
}

/// Peak resident set of this process in MB since the last reset_peak_rss() (Linux: VmHWM, reset
/// through /proc/self/clear_refs); 0 where unavailable.
double peak_rss_mb() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // kB
  return 0;
}
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

void context_length(benchmark::State& st, index_t n, int threads) {
  auto& m = model<float>();
  const index_t k = m.cfg.num_digests, d = m.cfg.hidden, max_len = chunk_len();
  digest::IcformerEncoder<float> enc(m.cfg, m.weights);
  const auto ch = digest::Chunking::of(n, max_len);
  std::vector<float> ctx(std::size_t(n * d)), dig(std::size_t(k * d)), out(std::size_t(ch.count * k * d));
  fill(ctx, 9, 1.f);
  fill(dig, 8, 1.f);
  bench::with_executor(threads, [&](const auto& exec) {
    // Steady state first (workspaces sized and touched by one chunk), as in a host that keeps
    // its encoder; otherwise the single-chunk case alone would carry the first call's page faults.
    enc.compress(matrix_view<const float>(ctx.data(), max_len, d), matrix_view<const float>(dig.data(), k, d),
                 matrix_view(out.data(), k, d), exec);
    reset_peak_rss();
    for (auto _ : st) {
      enc.compress_chunked(matrix_view<const float>(ctx.data(), n, d), matrix_view<const float>(dig.data(), k, d), max_len,
                           matrix_view(out.data(), ch.count * k, d), exec);
      benchmark::DoNotOptimize(out.data());
    }
  });
  // Memory: the peak resident set while compressing, and what it holds beyond the weights, the
  // context and the digests out (all linear in n or fixed); the rest is the encoder's per-chunk
  // workspace, which must not grow with n.
  const double peak = peak_rss_mb();
  const double held = double(m.weight_bytes() + (ctx.size() + dig.size() + out.size()) * sizeof(float)) / (1 << 20);
  st.counters["peak_rss_MB"] = peak;
  st.counters["rss_beyond_data_MB"] = peak - held;
  st.counters["tokens_per_s"] = bench::rate(double(n));
  st.counters["us_per_token"] = benchmark::Counter(double(n) * 1e-6, benchmark::Counter::kIsIterationInvariantRate |
                                                                        benchmark::Counter::kInvert);
  st.counters["chunks"] = double(ch.count);
}

/// One Llama-2-7B-shaped decoder layer (causal self-attention + SwiGLU) over n + k tokens,
/// through the reference host: what ICAE-style compression runs per layer.
void llama_layer_baseline(benchmark::State& st, int threads) {
  const bench::SyntheticLlama<float> llama(1);
  const auto& c = llama.model.config;
  const index_t d = c.hidden;
  host::LlamaHost<float> h(llama.model);
  const index_t n = chunk_len() + published_config().num_digests;
  auto cache = h.make_cache(n);
  std::vector<float> x(std::size_t(n * d)), x0(x.size());
  fill(x0, 11, 1.f);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  bench::with_executor(threads, [&](const auto& exec) {
    // Steady state, as for the encoder: one untimed pass sizes and touches the host's workspaces.
    x = x0;
    h.forward(matrix_view(x.data(), n, d), pos.data(), idx.data(), Causal(0), cache, exec);
    for (auto _ : st) {
      st.PauseTiming();
      x = x0;
      cache.clear();
      st.ResumeTiming();
      h.forward(matrix_view(x.data(), n, d), pos.data(), idx.data(), Causal(0), cache, exec);
      benchmark::DoNotOptimize(x.data());
    }
  });
  const double fn = double(n);
  const double f = llama.layer_flops(fn, fn * (fn + 1) / 2);
  st.counters["GFLOPS"] = bench::rate(f * 1e-9);
  // FLOP ratio IC-Former (all layers, one chunk) / this baseline extrapolated to 32 layers.
  st.counters["icformer_flop_ratio_32_layers"] = icformer_flops(published_config(), chunk_len()) / (32 * f);
  st.counters["icformer_flop_ratio_per_layer"] = icformer_flops(published_config(), chunk_len()) / published_config().layers / f;
}

const bool registered = [] {
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int t : bench::thread_counts()) {
    const std::string ts = bench::thread_suffix(t);
    ms(benchmark::RegisterBenchmark(("icformer/fp32/chunk512" + ts).c_str(), chunk<float>, t, Compute::fp32));
    ms(benchmark::RegisterBenchmark(("icformer/bf16/chunk512" + ts).c_str(), chunk<bf16>, t, Compute::fp32));
    // The bf16 compute path: bf16 weights (read in place), bf16 operands, fp32 accumulation.
    ms(benchmark::RegisterBenchmark(("icformer/bf16dot/chunk512" + ts).c_str(), chunk<bf16>, t, Compute::bf16));
    if (amx::compiled())  // the same with AMX switched off: the AVX512-BF16 vector kernels
      ms(benchmark::RegisterBenchmark(("icformer/bf16dot_noamx/chunk512" + ts).c_str(),
                                      bench::without_amx([t](benchmark::State& st) { chunk<bf16>(st, t, Compute::bf16); })));
  }
  // Context-length scaling on each multi-thread count (none at one thread).
  for (int t : bench::thread_counts())
    for (index_t n : {512, 2048, 8192, 32768, 131072})
      if (t > 1)
        ms(benchmark::RegisterBenchmark(("icformer/fp32/n" + std::to_string(n) + bench::thread_suffix(t)).c_str(),
                                        context_length, smoke() ? n / 8 : n, t));
  for (int t : bench::thread_counts())
    ms(benchmark::RegisterBenchmark(("icformer/llama7b_layer_baseline/n640" + bench::thread_suffix(t)).c_str(),
                                    llama_layer_baseline, t));
  return true;
}();

}  // namespace
