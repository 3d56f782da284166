// Sentinel-token folding: eviction of 50% of a Llama-2-7B-shaped fp16 cache (32 layers, 32 kv
// heads, head_dim 128, 4096 tokens) in spans of <= 25 tokens vs a memcpy of the same bytes (one
// contiguous memcpy, and one memcpy per kept run);
// decode attention over the folded vs the unfolded cache; tokens/s of the reference host.
// CTXCOMP_BENCH_SMOKE=1 shrinks every shape.
#include <cstdlib>
#include <cstring>

#include "../examples/fold_driver.hpp"
#include "bench_common.hpp"

using namespace ctxcomp;

namespace {

bool smoke() { return std::getenv("CTXCOMP_BENCH_SMOKE") != nullptr; }
struct Shape {
  index_t layers, kv_heads, head_dim, tokens;
};
Shape llama7b() { return smoke() ? Shape{4, 8, 128, 1024} : Shape{32, 32, 128, 4096}; }

/// Spans of 5..25 tokens covering about half of [0, n), at seeded random places.
std::vector<TokenRange> half_in_spans(index_t n) {
  std::vector<TokenRange> r;
  std::uint32_t s = 12345;
  index_t t = 0;
  while (t < n) {
    s = s * 1664525u + 1013904223u;
    const index_t len = 5 + index_t((s >> 8) % 21);
    s = s * 1664525u + 1013904223u;
    const index_t gap = std::max<index_t>(1, len + index_t((s >> 8) % 5) - 2);
    if (t + gap + len > n) break;
    r.push_back({t + gap, t + gap + len});
    t += gap + len;
  }
  return r;
}

KvCache<fp16> filled_cache(const Shape& s) {
  KvCache<fp16> c(s.layers, s.kv_heads, s.head_dim, s.tokens);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(s.tokens));
  std::vector<index_t> idx(static_cast<std::size_t>(s.tokens));
  for (index_t i = 0; i < s.tokens; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  c.append(s.tokens, pos.data(), idx.data());
  for (index_t l = 0; l < s.layers; ++l)
    for (auto v : {c.keys(l), c.values(l)})
      for (index_t h = 0; h < v.heads; ++h)
        for (index_t t = 0; t < v.tokens; ++t)
          for (index_t i = 0; i < v.head_dim; ++i) v(h, t, i) = fp16(float((t * 31 + i * 7 + h) % 97) / 97.f - 0.5f);
  return c;
}

/// Bytes a compacting eviction moves: every kept token after the first evicted one, K and V.
std::size_t moved_bytes(const Shape& s, const std::vector<TokenRange>& drop) {
  index_t kept_after = 0;
  for (std::size_t i = 0; i < drop.size(); ++i) {
    const index_t next = i + 1 < drop.size() ? drop[i + 1].begin : s.tokens;
    kept_after += next - drop[i].end;
  }
  return std::size_t(2 * s.layers * s.kv_heads * kept_after * s.head_dim) * sizeof(fp16);
}

void evict(benchmark::State& st) {
  const Shape s = llama7b();
  const auto drop = half_in_spans(s.tokens);
  static KvCache<fp16> pristine = filled_cache(s);
  static KvCache<fp16> work = filled_cache(s);
  index_t dropped = 0;
  for (const auto& r : drop) dropped += r.end - r.begin;
  for (auto _ : st) {
    st.PauseTiming();
    work = pristine;  // same capacity: a plain copy, no reallocation
    st.ResumeTiming();
    work.evict(drop);
    benchmark::DoNotOptimize(work.keys(0).data);
  }
  st.counters["GBps"] = bench::rate(double(moved_bytes(s, drop)) * 1e-9);
  st.counters["evicted_fraction"] = double(dropped) / double(s.tokens);
}

void memcpy_same_bytes(benchmark::State& st) {
  const Shape s = llama7b();
  const std::size_t bytes = moved_bytes(s, half_in_spans(s.tokens));
  std::vector<std::uint8_t> a(bytes, 1), b(bytes, 2);
  for (auto _ : st) {
    std::memcpy(b.data(), a.data(), bytes);
    benchmark::DoNotOptimize(b.data());
  }
  st.counters["GBps"] = bench::rate(double(bytes) * 1e-9);
}

/// Second baseline: the same kept runs, each copied by one plain memcpy from a cache-shaped
/// source to the same offsets of a separate cache-shaped buffer (memcpy may not overlap, so
/// not in place). It reads the same scattered runs as the eviction; the contiguous memcpy
/// above reads one sequential block.
void memcpy_same_runs(benchmark::State& st) {
  const Shape s = llama7b();
  const auto drop = half_in_spans(s.tokens);
  const std::size_t row = std::size_t(s.head_dim) * sizeof(fp16), region = std::size_t(s.tokens) * row;
  const std::size_t regions = std::size_t(2 * s.layers * s.kv_heads);
  std::vector<std::uint8_t> a(regions * region, 1), b(regions * region, 2);
  for (auto _ : st) {
    for (std::size_t g = 0; g < regions; ++g) {
      const std::uint8_t* src_base = a.data() + g * region;
      std::uint8_t* dst_base = b.data() + g * region;
      index_t dst = 0, src = 0;
      auto run = [&](index_t from, index_t to, index_t n) {
        if (from != to) std::memcpy(dst_base + std::size_t(to) * row, src_base + std::size_t(from) * row, std::size_t(n) * row);
      };
      for (const auto& r : drop) {
        if (r.begin > src) run(src, dst, r.begin - src);
        dst += r.begin - src;
        src = r.end;
      }
      if (s.tokens > src) run(src, dst, s.tokens - src);
    }
    benchmark::DoNotOptimize(b.data());
  }
  st.counters["GBps"] = bench::rate(double(moved_bytes(s, drop)) * 1e-9);
}

/// Decode attention of one layer: 32 query heads, one token, over the unfolded cache (sentinel
/// mask hides the spans) or the folded one (spans evicted).
void decode(benchmark::State& st, bool folded) {
  Shape s = llama7b();
  s.layers = 1;
  auto cache = filled_cache(s);
  const auto drop = half_in_spans(s.tokens);
  // Roles: each dropped range is a span's <CL> + inner tokens; the token after it is its <CR>.
  std::vector<std::int64_t> ids(static_cast<std::size_t>(s.tokens), 5);
  for (const auto& r : drop) {
    ids[std::size_t(r.begin)] = 1;
    if (r.end < s.tokens) ids[std::size_t(r.end)] = 2;
  }
  fold::SpanTracker spans(1, 2);
  std::vector<std::int64_t> pos(ids.size());
  spans.push(ids.data(), s.tokens, pos.data());
  if (folded) fold::fold(cache, spans);
  // The query is the last stream token, whose own K/V is already cached (a decode step).
  const index_t heads = s.kv_heads, q_tok = s.tokens - 1;
  std::vector<float> q = bench::random_buffer(std::size_t(heads * s.head_dim), 3), out(q.size());
  Workspace ws;
  const auto mask = SentinelSpans{spans.roles().data(), spans.size(), q_tok, cache.token_index()};
  for (auto _ : st) {
    attention(HeadsView<const float>::contiguous(q.data(), heads, 1, s.head_dim), HeadsView<const fp16>(cache.keys(0)),
              HeadsView<const fp16>(cache.values(0)), mask, HeadsView<float>::contiguous(out.data(), heads, 1, s.head_dim), {},
              ws);
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["cache_tokens"] = double(cache.size());
  st.counters["kept_fraction"] = double(cache.size()) / double(s.tokens);
  st.counters["GBps"] = bench::rate(double(cache.size()) * 2 * double(s.kv_heads * s.head_dim) * sizeof(fp16) * 1e-9);
}

/// Reference host on the fixtures' tiny Llama (hidden 64, 2 layers): prefill and decode tokens/s.
void host_tokens(benchmark::State& st, bool prefill) {
  static const auto model = host::LlamaModel<float>::load(std::string(CTXCOMP_FIXTURES_DIR) + "/models/llama");
  host::LlamaHost<float> h(model);
  const index_t n = 256, d = model.config.hidden;
  auto cache = h.make_cache(n + 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n)), pos(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[std::size_t(i)] = i % 120, pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  std::vector<float> x(std::size_t(n * d));
  for (auto _ : st) {
    cache.clear();
    if (prefill) {
      h.embed(ids.data(), n, matrix_view(x.data(), n, d));
      h.forward(matrix_view(x.data(), n, d), pos.data(), idx.data(), Causal(0), cache);
    } else {
      for (index_t i = 0; i < n; ++i) {
        h.embed(&ids[std::size_t(i)], 1, matrix_view(x.data(), 1, d));
        h.forward(matrix_view(x.data(), 1, d), &pos[std::size_t(i)], &idx[std::size_t(i)], Causal(i), cache);
      }
    }
    benchmark::DoNotOptimize(x.data());
  }
  st.counters["tokens_per_s"] = bench::rate(double(n));
}

const bool registered = [] {
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  ms(benchmark::RegisterBenchmark("kv/evict/llama7b_4096_fp16", evict));
  ms(benchmark::RegisterBenchmark("memcpy/baseline/evict_llama7b_4096_fp16", memcpy_same_bytes));
  ms(benchmark::RegisterBenchmark("memcpy/baseline_same_runs/evict_llama7b_4096_fp16", memcpy_same_runs));
  ms(benchmark::RegisterBenchmark("attention/decode_unfolded/llama7b_4096_fp16", decode, false));
  ms(benchmark::RegisterBenchmark("attention/decode_folded/llama7b_4096_fp16", decode, true));
  ms(benchmark::RegisterBenchmark("host/prefill/tiny_llama_256", host_tokens, true));
  ms(benchmark::RegisterBenchmark("host/decode/tiny_llama_256", host_tokens, false));
  return true;
}();

}  // namespace
