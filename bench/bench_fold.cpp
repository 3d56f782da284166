// Sentinel-token folding: eviction of 50% of a Llama-2-7B-shaped fp16 cache (32 layers, 32 kv
// heads, head_dim 128, 4096 tokens) in spans of <= 25 tokens vs a memcpy of the same bytes (one
// contiguous memcpy, and one memcpy per kept run);
// the same in every KV layout (contiguous, cells, paged) against a memcpy of the same runs;
// folding one just-closed 20-token span at the end of a 4096- and a 16384-token cache in every
// layout (time and bytes moved per fold; cells: the host lists the span's cells, and
// kv/fold_span/cells_scan_* lets fold scan every cell for them);
// decode attention over the folded vs the unfolded cache; tokens/s of the reference host.
// CTXCOMP_BENCH_SMOKE=1 shrinks every shape.
#include <cstdlib>
#include <cstring>

#include "../examples/fold_driver.hpp"
#include "../examples/kv_storage.hpp"
#include "bench_common.hpp"

using namespace ctxcomp;

namespace {

using bench::smoke;
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

/// Byte buffers of the baselines and pristine copies, in the memory caches use (KvCache and the
/// example storages hold K/V in HugePageAllocator memory), so both sides of a ratio run on the
/// same kind of pages.
using Bytes = std::vector<std::uint8_t, HugePageAllocator<std::uint8_t>>;

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
  Bytes a(bytes, 1), b(bytes, 2);
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
  Bytes a(regions * region, 1), b(regions * region, 2);
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


// ---- KV layouts (kv/layout.hpp) -------------------------------------------------------------

/// Untouched heap memory (pages fault in when first written), so that a 16384-token cache costs
/// only what a benchmark touches.
struct RawBuffer {
  explicit RawBuffer(std::size_t bytes) : p(std::malloc(bytes)) {
    if (!p) std::abort();
  }
  ~RawBuffer() { std::free(p); }
  RawBuffer(const RawBuffer&) = delete;
  RawBuffer& operator=(const RawBuffer&) = delete;
  template <class T>
  T* as() const noexcept { return static_cast<T*>(p); }
  void* p;
};

/// One layout's cache over RawBuffers: K/V, metadata, and for paged the pool and page table.
struct LayoutCache {
  host::KvLayout layout;
  KvShape shape;
  index_t tokens, page_size, pool_pages;
  RawBuffer keys, values;
  std::vector<std::int64_t> pos;
  std::vector<index_t> idx, free_pages, pages;
  std::vector<std::int32_t> seq;
  PagePool pool;

  LayoutCache(host::KvLayout l, KvShape s, index_t n, index_t page = 16)
      : layout(l), shape(s), tokens(n), page_size(page), pool_pages((n + page - 1) / page + 2),
        keys(elements() * sizeof(fp16)), values(elements() * sizeof(fp16)),
        pos(std::size_t(pool_pages * page), -1), idx(pos.size(), 0), seq(pos.size(), 0) {
    for (index_t p = pool_pages - 1; p >= 0; --p) free_pages.push_back((p * 7919) % pool_pages);  // scattered
    pages.resize(std::size_t(pool_pages));
    pool = {free_pages.data(), index_t(free_pages.size()), pool_pages};
  }
  std::size_t elements() const { return std::size_t(shape.layers * pool_pages * page_size * shape.kv_heads * shape.head_dim); }
  ContiguousKv<fp16> contiguous(index_t size = 0) {
    return {shape, KvBuffers<fp16>::head_major(keys.as<fp16>(), values.as<fp16>(), shape, pool_pages * page_size),
            pool_pages * page_size, pos.data(), idx.data(), size};
  }
  CellKv<fp16> cells() {
    return {shape, KvBuffers<fp16>::token_major(keys.as<fp16>(), values.as<fp16>(), shape, pool_pages * page_size),
            pool_pages * page_size, pos.data(), idx.data(), seq.data(), 0};
  }
  PagedKv<fp16> paged(index_t size = 0) {
    return {shape, PagedBuffers<fp16>::nhd(keys.as<fp16>(), values.as<fp16>(), shape, pool_pages, page_size), &pool,
            pages.data(), pool_pages, pos.data(), idx.data(), size};
  }
  /// Calls f(kv) with the layout's handle.
  template <class F>
  void with(F&& f) {
    if (layout == host::KvLayout::cells) {
      auto kv = cells();
      f(kv);
    } else if (layout == host::KvLayout::paged) {
      auto kv = paged();
      f(kv);
    } else {
      auto kv = contiguous();
      f(kv);
    }
  }
};

/// Appends tokens [0, n) (position = token index = t) and writes rows of tokens [from, n) of
/// every layer and head (the rest stays untouched memory).
template <class Kv>
void append_tokens(Kv& kv, index_t n, index_t from) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  std::vector<index_t> t(static_cast<std::size_t>(n)), slots(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) p[std::size_t(i)] = i, t[std::size_t(i)] = i;
  kv.append(n, p.data(), t.data(), slots.data());
  std::vector<float> row(std::size_t(kv.head_dim()), 0.25f);
  for (index_t l = 0; l < kv.layers(); ++l)
    for (bool v : {false, true})
      for (index_t h = 0; h < kv.kv_heads(); ++h)
        for (index_t i = from; i < n; ++i) store_row(v ? kv.values(l) : kv.keys(l), h, slots[std::size_t(i)], row.data());
}

/// Folding the span that just closed: a cache of `n` tokens whose last 20 are <CL>, 18 inner
/// tokens and <CR>; one fold evicts the 19 and keeps the <CR> (moved down in a compacted
/// layout, left in place in cells). Between iterations (untimed) the 19 come back. Cells: the
/// host lists the span's 20 cells (fold's cell-list overload), or with `scan` fold finds them
/// by scanning every cell's metadata.
void fold_span(benchmark::State& st, host::KvLayout layout, index_t n, bool scan) {
  Shape s = llama7b();
  if (smoke()) n /= 8;
  LayoutCache c(layout, {s.layers, s.kv_heads, s.head_dim}, n);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n), 5), ppos(ids.size());
  ids[std::size_t(n - 20)] = 1, ids[std::size_t(n - 1)] = 2;
  fold::SpanTracker spans(1, 2);
  spans.push(ids.data(), n, ppos.data());
  const std::int32_t last = spans.closed_spans() - 1;
  EvictStats es;
  c.with([&](auto& kv) {
    append_tokens(kv, n, n - 40);
    std::vector<index_t> cells;  // cells: where the span's 20 tokens live (the 19 evicted and <CR>)
    for (index_t i = n - 20; i < n; ++i) cells.push_back(i);
    for (auto _ : st) {
      es = {};
      if constexpr (std::decay_t<decltype(kv)>::has_holes) {
        if (!scan) fold::fold(kv, spans, last, cells.data(), index_t(cells.size()), &es);
        else fold::fold(kv, spans, last, &es);
      } else {
        fold::fold(kv, spans, last, &es);
      }
      st.PauseTiming();
      if constexpr (std::decay_t<decltype(kv)>::has_holes) {
        for (index_t i = 0; i + 1 < index_t(cells.size()); ++i) c.pos[std::size_t(cells[std::size_t(i)])] = cells[std::size_t(i)];
        kv = c.cells();
      } else {
        std::vector<std::int64_t> p(20);
        std::vector<index_t> t(20);
        for (index_t i = 0; i < 20; ++i) p[std::size_t(i)] = n - 20 + i, t[std::size_t(i)] = n - 20 + i;
        kv.truncate(n - 20);
        kv.append(20, p.data(), t.data());
      }
      st.ResumeTiming();
    }
  });
  st.counters["bytes_moved"] = double(es.bytes_moved);
  st.counters["tokens_evicted"] = double(es.tokens);
  st.counters["cache_tokens"] = double(n);
}

/// A 50% batch eviction (spans of 5..25, as folding leaves it) in each layout: contiguous and
/// paged compact in place, cells free cells and then compact() (the optional dense step).
/// Untimed between iterations: the cache is restored from a pristine copy.
void evict_layout(benchmark::State& st, host::KvLayout layout) {
  const Shape s = llama7b();
  const auto drop = half_in_spans(s.tokens);
  LayoutCache c(layout, {s.layers, s.kv_heads, s.head_dim}, s.tokens);
  std::size_t moved = 0;
  c.with([&](auto& kv) {
    append_tokens(kv, s.tokens, 0);
    const std::size_t bytes = c.elements() * sizeof(fp16);
    Bytes k0(c.keys.as<std::uint8_t>(), c.keys.as<std::uint8_t>() + bytes),
        v0(c.values.as<std::uint8_t>(), c.values.as<std::uint8_t>() + bytes);
    const auto pos0 = c.pos;
    const auto idx0 = c.idx;
    const auto pages0 = c.pages;
    const auto free0 = c.free_pages;
    const PagePool pool0 = c.pool;
    auto kv0 = kv;
    for (auto _ : st) {
      const auto es = kv.evict(drop);
      if constexpr (std::decay_t<decltype(kv)>::has_holes) moved = kv.compact().bytes_moved;
      else moved = es.bytes_moved;
      benchmark::DoNotOptimize(c.keys.p);
      st.PauseTiming();
      std::memcpy(c.keys.p, k0.data(), bytes);
      std::memcpy(c.values.p, v0.data(), bytes);
      c.pos = pos0, c.idx = idx0, c.pages = pages0, c.free_pages = free0, c.pool = pool0;
      kv = kv0;
      st.ResumeTiming();
    }
  });
  st.counters["GBps"] = bench::rate(double(moved) * 1e-9);
  st.counters["bytes_moved"] = double(moved);
}

/// The baseline of evict_layout: the same moves (every kept run after the first evicted range,
/// cut where the layout cuts it: at page ends for paged), each a plain memcpy from a copy of the
/// cache to the same offsets of the cache (memcpy may not overlap, so from a second buffer).
void memcpy_same_runs_layout(benchmark::State& st, host::KvLayout layout) {
  const Shape s = llama7b();
  const auto drop = half_in_spans(s.tokens);
  LayoutCache c(layout, {s.layers, s.kv_heads, s.head_dim}, s.tokens);
  std::size_t moved = 0;
  c.with([&](auto& kv) {
    append_tokens(kv, s.tokens, 0);
    const std::size_t bytes = c.elements() * sizeof(fp16);
    Bytes src_k(c.keys.as<std::uint8_t>(), c.keys.as<std::uint8_t>() + bytes),
        src_v(c.values.as<std::uint8_t>(), c.values.as<std::uint8_t>() + bytes);
    // Cells compact over the free cells, i.e. the dropped ranges, in the token-major layout.
    const index_t size = kv.slots();
    for (auto _ : st) {
      moved = 0;
      for (index_t l = 0; l < kv.layers(); ++l)
        for (bool v : {false, true}) {
          const auto dst = v ? kv.values(l) : kv.keys(l);
          const std::ptrdiff_t off = (v ? src_v.data() - c.values.as<std::uint8_t>() : src_k.data() - c.keys.as<std::uint8_t>());
          detail::for_each_moved_run(drop, size, [&](index_t from, index_t to, index_t n) {
            while (n > 0) {
              const index_t m = std::min(dst.run(from, n), dst.run(to, n));
              if (dst.token_stride == dst.head_dim) {  // head-major: one block per head
                for (index_t h = 0; h < dst.heads; ++h)
                  std::memcpy(dst.row(h, to), reinterpret_cast<const std::uint8_t*>(dst.row(h, from)) + off,
                              std::size_t(m * dst.head_dim) * sizeof(fp16));
              } else {  // token-major pages / cells: one block of m tokens x all heads
                std::memcpy(dst.row(0, to), reinterpret_cast<const std::uint8_t*>(dst.row(0, from)) + off,
                            std::size_t(m * dst.heads * dst.head_dim) * sizeof(fp16));
              }
              moved += std::size_t(m * dst.heads * dst.head_dim) * sizeof(fp16);
              from += m, to += m, n -= m;
            }
          });
        }
      benchmark::DoNotOptimize(c.keys.p);
    }
  });
  st.counters["GBps"] = bench::rate(double(moved) * 1e-9);
  st.counters["bytes_moved"] = double(moved);
}

const bool registered = [] {
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  ms(benchmark::RegisterBenchmark("kv/evict/llama7b_4096_fp16", evict));
  ms(benchmark::RegisterBenchmark("memcpy/baseline/evict_llama7b_4096_fp16", memcpy_same_bytes));
  ms(benchmark::RegisterBenchmark("memcpy/baseline_same_runs/evict_llama7b_4096_fp16", memcpy_same_runs));
  auto us = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMicrosecond); };
  for (auto layout : {host::KvLayout::contiguous, host::KvLayout::cells, host::KvLayout::paged}) {
    const std::string name = host::kv_layout_name(layout);
    ms(benchmark::RegisterBenchmark(("kv/evict/" + name + "_4096_fp16").c_str(), evict_layout, layout));
    ms(benchmark::RegisterBenchmark(("memcpy/baseline_same_runs/evict_" + name + "_4096_fp16").c_str(),
                                    memcpy_same_runs_layout, layout));
    for (index_t n : {4096, 16384}) {
      us(benchmark::RegisterBenchmark(("kv/fold_span/" + name + "_" + std::to_string(n) + "_fp16").c_str(), fold_span,
                                      layout, n, false));
      if (layout == host::KvLayout::cells)  // fold finding the span's cells itself
        us(benchmark::RegisterBenchmark(("kv/fold_span/cells_scan_" + std::to_string(n) + "_fp16").c_str(), fold_span,
                                        layout, n, true));
    }
  }
  ms(benchmark::RegisterBenchmark("attention/decode_unfolded/llama7b_4096_fp16", decode, false));
  ms(benchmark::RegisterBenchmark("attention/decode_folded/llama7b_4096_fp16", decode, true));
  ms(benchmark::RegisterBenchmark("host/prefill/tiny_llama_256", host_tokens, true));
  ms(benchmark::RegisterBenchmark("host/decode/tiny_llama_256", host_tokens, false));
  return true;
}();

}  // namespace
