// Attention core: fused tiled kernel vs a naive Eigen attention that materialises the score
// matrix (Q K^T, mask, softmax, P V), head_dim 128, 32 query heads over 8 kv heads.
// GFLOPS counts useful work: 4 * head_dim flops per visible (query, key) pair, over all heads.
#include <cstring>

#include "bench_common.hpp"

using namespace ctxcomp;

namespace {

constexpr index_t kHeads = 32, kKvHeads = 8, kDim = 128;

struct Case {
  const char* name;
  index_t q_len, kv_len;
  bool cross;  // IC-Former-like: Cross mask with the queries as the trailing tokens
};
const Case kCases[] = {{"cross_128x640", 128, 640, true},
                       {"causal_512", 512, 512, false},
                       {"causal_2048", 2048, 2048, false},
                       {"causal_8192", 8192, 8192, false},
                       {"decode_4096", 1, 4096, false}};

struct Data {
  std::vector<float> q, k, v, out;
  explicit Data(const Case& c)
      : q(random_buffer(std::size_t(kHeads * c.q_len * kDim), 1)),
        k(random_buffer(std::size_t(kKvHeads * c.kv_len * kDim), 2)),
        v(random_buffer(std::size_t(kKvHeads * c.kv_len * kDim), 3)),
        out(q.size()) {}
  static std::vector<float> random_buffer(std::size_t n, unsigned s) { return bench::random_buffer(n, s); }
};

template <class F>
void with_mask(const Case& c, F&& f) {
  if (c.cross) f(CrossWithCausalTail(c.kv_len - c.q_len));
  else f(Causal(c.kv_len - c.q_len));
}

void set_counters(benchmark::State& st, const Case& c) {
  with_mask(c, [&](const auto& mask) {
    const double pairs = double(count_visible(mask, c.q_len, c.kv_len));
    st.counters["GFLOPS"] = bench::rate(pairs * 4.0 * kDim * kHeads * 1e-9);
    if (c.q_len == 1) st.counters["GBps"] = bench::rate(2.0 * kKvHeads * c.kv_len * kDim * sizeof(float) * 1e-9);
  });
}

void fused(benchmark::State& st, Case c, int threads) {
  Data d(c);
  Workspace ws;
  with_mask(c, [&](const auto& mask) {
    bench::with_executor(threads, [&](const auto& exec) {
      for (auto _ : st) {
        attention(HeadsView<const float>::contiguous(d.q.data(), kHeads, c.q_len, kDim),
                  HeadsView<const float>::contiguous(d.k.data(), kKvHeads, c.kv_len, kDim),
                  HeadsView<const float>::contiguous(d.v.data(), kKvHeads, c.kv_len, kDim), mask,
                  HeadsView<float>::contiguous(d.out.data(), kHeads, c.q_len, kDim), {}, ws, exec);
        benchmark::DoNotOptimize(d.out.data());
      }
    });
  });
  set_counters(st, c);
}

// The baseline: what a straightforward Eigen implementation does, one head at a time.
void naive(benchmark::State& st, Case c) {
  Data d(c);
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  M s(c.q_len, c.kv_len);
  const float scale = 1.f / std::sqrt(float(kDim));
  with_mask(c, [&](const auto& mask) {
    for (auto _ : st) {
      for (index_t h = 0; h < kHeads; ++h) {
        const index_t kh = h / (kHeads / kKvHeads);
        Eigen::Map<const M> q(d.q.data() + h * c.q_len * kDim, c.q_len, kDim);
        Eigen::Map<const M> k(d.k.data() + kh * c.kv_len * kDim, c.kv_len, kDim);
        Eigen::Map<const M> v(d.v.data() + kh * c.kv_len * kDim, c.kv_len, kDim);
        Eigen::Map<M> o(d.out.data() + h * c.q_len * kDim, c.q_len, kDim);
        s.noalias() = (q * k.transpose()) * scale;
        for (index_t i = 0; i < c.q_len; ++i)
          for (index_t j = 0; j < c.kv_len; ++j)
            if (!mask.visible(i, j)) s(i, j) = -std::numeric_limits<float>::infinity();
        s = (s.colwise() - s.rowwise().maxCoeff()).array().exp().matrix();
        s = s.array().colwise() / s.rowwise().sum().array();
        o.noalias() = s * v;
      }
      benchmark::DoNotOptimize(d.out.data());
    }
  });
  set_counters(st, c);
}

// memcpy of the bytes a decode step reads (K and V), the bandwidth reference for decode.
void memcpy_baseline(benchmark::State& st, index_t kv_len, int threads) {
  const std::size_t n = std::size_t(2 * kKvHeads * kv_len * kDim);
  std::vector<float> src = bench::random_buffer(n, 4), dst(n);
  const index_t chunks = 64;
  const std::size_t per = n / chunks;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) {
      exec.parallel_for(chunks, [&](index_t i, index_t) {
        std::memcpy(dst.data() + i * per, src.data() + i * per, per * sizeof(float));
      });
      benchmark::DoNotOptimize(dst.data());
    }
  });
  st.counters["GBps"] = bench::rate(double(n) * sizeof(float) * 1e-9);
}

const bool registered = [] {
  for (const Case& c : kCases) {
    const std::string name = c.name;
    benchmark::RegisterBenchmark(("attention/fused/" + name).c_str(), fused, c, 1)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("attention/fused/" + name + "_t2").c_str(), fused, c, 2)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("attention/naive/" + name).c_str(), naive, c)->UseRealTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("memcpy/baseline/decode_4096", memcpy_baseline, index_t(4096), 1)->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("memcpy/baseline/decode_4096_t2", memcpy_baseline, index_t(4096), 2)->UseRealTime()->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
