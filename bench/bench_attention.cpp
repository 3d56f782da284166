// Attention core: fused tiled kernel vs a naive Eigen attention that materialises the score
// matrix (Q K^T, mask, softmax, P V), head_dim 128, 32 query heads over 8 kv heads.
// GFLOPS counts useful work: 4 * head_dim flops per visible (query, key) pair, over all heads.
// Caches as engines keep them: attention/fused/<case>_<kv> over fp16, bf16 and int8 (qint8) K/V
// for decode_4096 (32/8 heads), decode_mha_4096 (32/32, Llama-2-7B), decode_kv1_4096 (32/1) and
// causal_2048, beside memread/baseline/<case>_<kv>: one vector pass summing the same K/V bytes
// (a decode step only reads), so GBps / memread GBps is the share of the memory speed reached.
// Both cycle through 128 MB of layer copies, so the bytes come from memory, not from L3.
// attention/fused/decode_4096_fp16_hugepages: the same decode with K/V from HugePageAllocator
// (KvCache's memory: 2 MB pages where the OS offers them), beside the standard allocator's;
// attention/paged/decode_4096_fp16_hugepages: the paged decode with its pools on 2 MB pages,
// beside it (what of the paged gap the TLB makes).
// attention/fused_bf16/<case>: the bf16 compute path (bf16 K/V, Compute::bf16) for causal_2048,
// causal_8192 and cross_128x640, beside attention/fused/<case> (fp32), with its share of the bf16
// pair-dot peak (peak/bf16dot).
// attention/paged/<case>_fp16: the same fp16 K/V in a pool of 16-token pages (HND; _nhd: NHD;
// decode_4096_fp16_p64: HND pages of 64), read through shuffled page tables, beside
// attention/fused/<case>_fp16.
// memread/paged/decode_4096_fp16 (_p64): the same pools read page by page through those tables,
// the read ceiling of a paged decode (what the page order alone costs a plain read).
// attention/fused/decode_4096_{fp16,int8}_cached (and attention/paged/decode_4096_fp16_cached):
// decode over one layer copy that stays in the last-level cache, the compute floor of the step
// (int8: what its time target can reach; paged: its page-table overhead without memory).
// attention/cells/decode_4096_fp16: a llama.cpp-style cell cache, half its 8192 cells freed in spans of 5-25,
// beside the same live cells compacted (_compacted) and attention/fused/decode_4096_fp16.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>

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

/// The bf16 compute path: bf16 K/V (the same random values rounded), Compute::bf16.
void fused_bf16(benchmark::State& st, Case c, int threads) {
  Data d(c);
  std::vector<bf16> k(d.k.size()), v(d.v.size());
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = bf16(d.k[i]), v[i] = bf16(d.v[i]);
  Workspace ws;
  AttentionOptions opt;
  opt.compute = Compute::bf16;
  bench::LoopClock clock;
  with_mask(c, [&](const auto& mask) {
    bench::with_executor(threads, [&](const auto& exec) {
      clock.start();
      for (auto _ : st) {
        attention(HeadsView<const float>::contiguous(d.q.data(), kHeads, c.q_len, kDim),
                  HeadsView<const bf16>::contiguous(k.data(), kKvHeads, c.kv_len, kDim),
                  HeadsView<const bf16>::contiguous(v.data(), kKvHeads, c.kv_len, kDim), mask,
                  HeadsView<float>::contiguous(d.out.data(), kHeads, c.q_len, kDim), opt, ws, exec);
        benchmark::DoNotOptimize(d.out.data());
      }
    });
    const double flops = double(count_visible(mask, c.q_len, c.kv_len)) * 4.0 * kDim * kHeads;
    st.counters["bf16dot_peak_fraction"] = bench::bf16dot_peak_fraction(flops, threads, st, clock);
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

// ---- typed caches ----------------------------------------------------------------------------
struct TypedCase {
  const char* name;
  index_t kv_heads, q_len, kv_len;
  bool cached = false;  // decode over one layer copy, which stays in the last-level cache
};
const TypedCase kTypedCases[] = {{"decode_4096", 8, 1, 4096},
                                 {"decode_mha_4096", 32, 1, 4096},
                                 {"decode_kv1_4096", 1, 1, 4096},
                                 {"causal_2048", 8, 2048, 2048}};

/// Decode benchmarks cycle through this many bytes of K/V (whole copies of a layer's cache), so
/// each step reads its layer from memory as a real decode over 32 layers does, not from a
/// last-level cache that happens to hold one small layer.
/// Bytes of K/V a decode benchmark cycles through (layer copies), well past the last-level cache
/// (smoke runs: a quarter).
double decode_footprint() { return bench::smoke() ? 32e6 : 128e6; }
index_t layer_copies(const TypedCase& c, double layer_bytes) {
  return c.q_len == 1 && !c.cached ? std::max<index_t>(1, index_t(std::ceil(decode_footprint() / layer_bytes))) : 1;
}

/// K/V of a case in storage type T (qint8: quantised per row, scales beside), `copies` layers,
/// in memory from Alloc (HugePageAllocator: as KvCache holds its K/V).
template <class T, class Alloc = std::allocator<T>>
struct TypedKv {
  index_t heads, tokens, copies;
  std::vector<T, Alloc> k, v;
  std::vector<float> ks, vs;
  explicit TypedKv(const TypedCase& c)
      : heads(c.kv_heads), tokens(c.kv_len), copies(layer_copies(c, bytes_of(c))),
        k(std::size_t(copies * c.kv_heads * c.kv_len * kDim)), v(k.size()), ks(std::size_t(copies * c.kv_heads * c.kv_len)),
        vs(ks.size()) {
    const std::size_t layer = std::size_t(heads * tokens * kDim), rows = std::size_t(heads * tokens);
    const auto kf = bench::random_buffer(layer, 2), vf = bench::random_buffer(layer, 3);
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < tokens; ++t) {
        store_row(view(0, k.data(), ks.data()), h, t, kf.data() + (h * tokens + t) * kDim);
        store_row(view(0, v.data(), vs.data()), h, t, vf.data() + (h * tokens + t) * kDim);
      }
    for (index_t l = 1; l < copies; ++l) {
      std::copy(k.begin(), k.begin() + std::ptrdiff_t(layer), k.begin() + std::ptrdiff_t(l * layer));
      std::copy(v.begin(), v.begin() + std::ptrdiff_t(layer), v.begin() + std::ptrdiff_t(l * layer));
      std::copy(ks.begin(), ks.begin() + std::ptrdiff_t(rows), ks.begin() + std::ptrdiff_t(l * rows));
      std::copy(vs.begin(), vs.begin() + std::ptrdiff_t(rows), vs.begin() + std::ptrdiff_t(l * rows));
    }
  }
  /// Layer copy `l` of the buffer x (scales sc).
  template <class E, class S>
  HeadsView<E> view(index_t l, E* x, S* sc) const {
    auto r = HeadsView<E>::contiguous(x + l * heads * tokens * kDim, heads, tokens, kDim);
    if constexpr (is_quantized_v<T>) r.scales = sc + l * heads * tokens, r.scale_head_stride = tokens, r.scale_token_stride = 1;
    return r;
  }
  /// Bytes a pass over one layer's K and V reads (scales included).
  static double bytes_of(const TypedCase& c) {
    const double rows = 2.0 * double(c.kv_heads * c.kv_len);
    return rows * double(kDim) * sizeof(T) + (is_quantized_v<T> ? rows * sizeof(float) : 0.0);
  }
};

template <class T, class Alloc = std::allocator<T>>
void fused_typed(benchmark::State& st, TypedCase c, int threads) {
  const TypedKv<T, Alloc> kv(c);
  const auto q = bench::random_buffer(std::size_t(kHeads * c.q_len * kDim), 1);
  std::vector<float> out(q.size());
  Workspace ws;
  const Causal mask(c.kv_len - c.q_len);
  index_t layer = 0;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) {
      attention(HeadsView<const float>::contiguous(q.data(), kHeads, c.q_len, kDim),
                kv.view(layer, kv.k.data(), kv.ks.data()), kv.view(layer, kv.v.data(), kv.vs.data()), mask,
                HeadsView<float>::contiguous(out.data(), kHeads, c.q_len, kDim), {}, ws, exec);
      layer = (layer + 1) % kv.copies;
      benchmark::DoNotOptimize(out.data());
    }
  });
  const double pairs = double(count_visible(mask, c.q_len, c.kv_len));
  st.counters["GFLOPS"] = bench::rate(pairs * 4.0 * kDim * kHeads * 1e-9);
  if (c.q_len == 1) st.counters["GBps"] = bench::rate(TypedKv<T>::bytes_of(c) * 1e-9);
}

/// Reads `bytes` once per iteration with vector loads (as floats) and sums them, cycling through
/// `copies` such blocks like the decode benchmark it stands beside: the read-bandwidth reference.
/// Sum of the floats p[0, n) by vector loads into four accumulators, then the tail. With Hint,
/// each step also asks for the matching lines from `next` on into L1 (reading one block while
/// the next is on its way).
template <bool Hint>
float read_sum(const float* p, std::size_t n, const char* next) {
  using V = simd::Vec;
  constexpr std::size_t step = 4 * std::size_t(V::width);
  typename V::type a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  std::size_t j = 0;
  for (; j + step <= n; j += step) {
    if constexpr (Hint)
      for (std::size_t b = 0; b < step * sizeof(float); b += 64) simd::prefetch<simd::PrefetchTo::l1>(next + j * sizeof(float) + b);
    a0 = a0 + V::load(p + j), a1 = a1 + V::load(p + j + V::width);
    a2 = a2 + V::load(p + j + 2 * V::width), a3 = a3 + V::load(p + j + 3 * V::width);
  }
  float s = V::reduce_add((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += p[j];
  return s;
}

void memread(benchmark::State& st, double bytes, index_t copies, int threads) {
  const std::size_t n = std::size_t(bytes / sizeof(float)) / 64 * 64;
  const std::vector<float> src = bench::random_buffer(n * std::size_t(copies), 4);
  const index_t chunks = 64;
  const std::size_t per = n / chunks;
  float sums[64] = {};
  index_t layer = 0;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) {
      exec.parallel_for(chunks, [&](index_t i, index_t) {
        sums[i] = read_sum<false>(src.data() + std::size_t(layer) * n + i * per, per, nullptr);
      });
      layer = (layer + 1) % copies;
      benchmark::DoNotOptimize(sums);
    }
  });
  st.counters["GBps"] = bench::rate(double(n) * sizeof(float) * 1e-9);
}

/// The same K/V in a page pool of `page_size`-token pages, HND ([page][head][slot][dim]) or NHD,
/// each layer copy with its own shuffled page table (a fragmented pool, as an engine's allocator
/// leaves it).
template <class T, class Alloc = std::allocator<T>>
struct PagedKv {
  index_t heads, tokens, page_size, pages, copies;
  bool hnd;
  std::vector<T, Alloc> k, v;
  std::vector<index_t> tables;  // [copies x pages]
  PagedKv(const TypedCase& c, index_t ps, bool hnd_layout)
      : heads(c.kv_heads), tokens(c.kv_len), page_size(ps), pages((c.kv_len + ps - 1) / ps),
        copies(layer_copies(c, TypedKv<T>::bytes_of(c))), hnd(hnd_layout),
        k(std::size_t(copies * pages * ps * c.kv_heads * kDim)), v(k.size()), tables(std::size_t(copies * pages)) {
    std::iota(tables.begin(), tables.end(), index_t(0));
    std::shuffle(tables.begin(), tables.end(), std::mt19937(7));
    const std::size_t layer = std::size_t(heads * tokens * kDim);
    const auto kf = bench::random_buffer(layer, 2), vf = bench::random_buffer(layer, 3);
    for (index_t l = 0; l < copies; ++l)
      for (index_t h = 0; h < heads; ++h)
        for (index_t t = 0; t < tokens; ++t) {
          store_row(view(l, k.data()), h, t, kf.data() + (h * tokens + t) * kDim);
          store_row(view(l, v.data()), h, t, vf.data() + (h * tokens + t) * kDim);
        }
  }
  /// Layer copy `l` of pool x.
  template <class E>
  PagedHeadsView<E> view(index_t l, E* x) const {
    const index_t* table = tables.data() + l * pages;
    return hnd ? PagedHeadsView<E>::hnd(x, copies * pages, page_size, heads, kDim, table, tokens)
               : PagedHeadsView<E>::nhd(x, copies * pages, page_size, heads, kDim, table, tokens);
  }
};

template <class T, class Alloc = std::allocator<T>>
void paged_typed(benchmark::State& st, TypedCase c, index_t page_size, bool hnd) {
  const PagedKv<T, Alloc> kv(c, page_size, hnd);
  const auto q = bench::random_buffer(std::size_t(kHeads * c.q_len * kDim), 1);
  std::vector<float> out(q.size());
  Workspace ws;
  const Causal mask(c.kv_len - c.q_len);
  index_t layer = 0;
  for (auto _ : st) {
    attention(HeadsView<const float>::contiguous(q.data(), kHeads, c.q_len, kDim), kv.view(layer, kv.k.data()),
              kv.view(layer, kv.v.data()), mask, HeadsView<float>::contiguous(out.data(), kHeads, c.q_len, kDim), {}, ws);
    layer = (layer + 1) % kv.copies;
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(count_visible(mask, c.q_len, c.kv_len));
  st.counters["GFLOPS"] = bench::rate(pairs * 4.0 * kDim * kHeads * 1e-9);
  if (c.q_len == 1) st.counters["GBps"] = bench::rate(TypedKv<T>::bytes_of(c) * 1e-9);
  st.counters["page_size"] = double(page_size);
}

/// Reads the K and V pools of attention/paged/<case>_fp16 once per iteration, whole pages in the
/// order of the same shuffled page tables (a K page, then its V page), with vector loads summed,
/// each step asking for the matching lines of the next page into L1, as paged decode asks for
/// the pages one tile on. The read ceiling of a paged decode, beside memread/baseline.
void memread_paged(benchmark::State& st, TypedCase c, index_t page_size) {
  const PagedKv<fp16> kv(c, page_size, true);
  const std::size_t n = std::size_t(page_size * c.kv_heads * kDim) * sizeof(fp16) / sizeof(float);  // floats a page
  float sum = 0.f;
  index_t layer = 0;
  for (auto _ : st) {
    const index_t* table = kv.tables.data() + layer * kv.pages;
    for (index_t i = 0; i < kv.pages; ++i)
      for (const fp16* pool : {kv.k.data(), kv.v.data()}) {
        const auto page = [&](index_t j) { return reinterpret_cast<const float*>(pool) + std::size_t(table[j]) * n; };
        sum += read_sum<true>(page(i), n, reinterpret_cast<const char*>(page(std::min(i + 1, kv.pages - 1))));
      }
    layer = (layer + 1) % kv.copies;
    benchmark::DoNotOptimize(sum);
  }
  st.counters["GBps"] = bench::rate(TypedKv<fp16>::bytes_of(c) * 1e-9);
  st.counters["page_size"] = double(page_size);
}

/// A llama.cpp-style cell cache of 2 x 4096 cells, token-major [cells x kv_heads*head_dim] fp16,
/// from which half the cells were freed in spans of 5-25 (as folding leaves it): one decode step
/// of sequence 0 under CellCausal (`compacted`: the same live cells moved together, Causal).
/// Cycles through layer copies like the other decode benchmarks.
void cells_decode(benchmark::State& st, bool compacted) {
  const index_t kv = 8, cells_n = 8192, row = kv * kDim;
  std::vector<std::int64_t> pos(static_cast<std::size_t>(cells_n), 0);
  std::iota(pos.begin(), pos.end(), std::int64_t(0));
  std::mt19937 g(5);
  const CellMeta meta{pos.data(), nullptr, cells_n};
  for (index_t c = 0, freed = 0; c < cells_n && freed < cells_n / 2;) {
    const index_t keep = 5 + index_t(g() % 21), drop = std::min<index_t>(5 + index_t(g() % 21), cells_n / 2 - freed);
    c += keep;
    if (c >= cells_n) break;
    const index_t e = std::min(cells_n, c + drop);
    cells::free_range(meta, c, e);
    freed += e - c, c = e;
  }
  std::vector<index_t> live;
  for (index_t c = 0; c < cells_n; ++c)
    if (pos[std::size_t(c)] >= 0) live.push_back(c);
  const index_t n = compacted ? index_t(live.size()) : cells_n;
  std::vector<std::int64_t> cpos(live.size());
  for (std::size_t i = 0; i < live.size(); ++i) cpos[i] = pos[std::size_t(live[i])];
  const index_t copies = std::max<index_t>(1, index_t(decode_footprint() / (2.0 * double(n * row) * sizeof(fp16))));
  std::vector<fp16> k(std::size_t(copies * n * row)), v(k.size());
  const auto src = bench::random_buffer(std::size_t(cells_n * row), 2);
  for (index_t l = 0; l < copies; ++l)
    for (index_t t = 0; t < n; ++t)
      for (index_t i = 0; i < row; ++i) {
        const float x = src[std::size_t((compacted ? live[std::size_t(t)] : t) * row + i)];
        k[std::size_t((l * n + t) * row + i)] = fp16(x), v[std::size_t((l * n + t) * row + i)] = fp16(0.5f * x);
      }
  const auto q = bench::random_buffer(std::size_t(kHeads * kDim), 1);
  std::vector<float> out(q.size());
  const std::int64_t qpos = cells_n;
  const CellCausal mask{compacted ? CellMeta{cpos.data(), nullptr, n} : meta, &qpos, 1, 0};
  Workspace ws;
  index_t layer = 0;
  for (auto _ : st) {
    attention(HeadsView<const float>::contiguous(q.data(), kHeads, 1, kDim),
              HeadsView<const fp16>::token_major(k.data() + layer * n * row, n, kv, kDim),
              HeadsView<const fp16>::token_major(v.data() + layer * n * row, n, kv, kDim), mask,
              HeadsView<float>::contiguous(out.data(), kHeads, 1, kDim), {}, ws);
    layer = (layer + 1) % copies;
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["live_cells"] = double(live.size());
  st.counters["cells"] = double(n);
  // Bytes of the live cells' K and V (what a compacted cache would read).
  st.counters["live_GBps"] = bench::rate(2.0 * double(live.size() * row) * sizeof(fp16) * 1e-9);
}

template <class T>
void register_typed(const char* kv_name) {
  for (const TypedCase& c : kTypedCases) {
    const std::string base = std::string(c.name) + "_" + kv_name;
    for (int t : bench::thread_counts()) {
      const std::string ts = bench::thread_suffix(t);
      benchmark::RegisterBenchmark(("attention/fused/" + base + ts).c_str(), fused_typed<T>, c, t)
          ->UseRealTime()->Unit(benchmark::kMillisecond);
      if (c.q_len == 1)
        benchmark::RegisterBenchmark(("memread/baseline/" + base + ts).c_str(), memread, TypedKv<T>::bytes_of(c),
                                     layer_copies(c, TypedKv<T>::bytes_of(c)), t)
            ->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  }
}

const bool registered = [] {
  for (Case c : kCases) {
    const std::string name = c.name;
    if (bench::smoke() && c.kv_len > 4096) c.q_len /= 4, c.kv_len /= 4;  // causal_8192 runs at 2048 in a smoke run
    for (int t : bench::thread_counts())
      benchmark::RegisterBenchmark(("attention/fused/" + name + bench::thread_suffix(t)).c_str(), fused, c, t)
          ->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("attention/naive/" + name).c_str(), naive, c)->UseRealTime()->Unit(benchmark::kMillisecond);
    if (!c.cross && c.q_len == 1) continue;
    if (name == "causal_512") continue;
    for (int t : bench::thread_counts()) {
      benchmark::RegisterBenchmark(("attention/fused_bf16/" + name + bench::thread_suffix(t)).c_str(), fused_bf16, c, t)
          ->UseRealTime()->Unit(benchmark::kMillisecond);
      if (amx::compiled())  // the same with AMX switched off: the AVX512-BF16 vector kernels
        benchmark::RegisterBenchmark(("attention/fused_bf16_noamx/" + name + bench::thread_suffix(t)).c_str(),
                                     bench::without_amx([c, t](benchmark::State& st) { fused_bf16(st, c, t); }))
            ->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  }
  for (int t : bench::thread_counts())
    benchmark::RegisterBenchmark(("memcpy/baseline/decode_4096" + bench::thread_suffix(t)).c_str(), memcpy_baseline,
                                 index_t(4096), t)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
  register_typed<fp16>("fp16");
  // The same decode with K/V on 2 MB pages where the OS offers them (KvCache's allocator).
  benchmark::RegisterBenchmark("attention/fused/decode_4096_fp16_hugepages", fused_typed<fp16, HugePageAllocator<fp16>>,
                               kTypedCases[0], 1)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  register_typed<bf16>("bf16");
  register_typed<qint8>("int8");
  benchmark::RegisterBenchmark("attention/cells/decode_4096_fp16", cells_decode, false)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("attention/cells/decode_4096_fp16_compacted", cells_decode, true)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  // Paged caches (page size 16, HND; _nhd: the NHD order; _p64: HND pages of 64) beside
  // attention/fused/<case>_fp16.
  for (const TypedCase& c : kTypedCases) {
    const std::string n = c.name;
    if (n != "decode_4096" && n != "causal_2048") continue;
    benchmark::RegisterBenchmark(("attention/paged/" + n + "_fp16").c_str(), paged_typed<fp16>, c, index_t(16), true)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("attention/paged/" + n + "_fp16_nhd").c_str(), paged_typed<fp16>, c, index_t(16), false)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
    if (n != "decode_4096") continue;
    // larger HND pages: a whole page per head and run
    benchmark::RegisterBenchmark(("attention/paged/" + n + "_fp16_p64").c_str(), paged_typed<fp16>, c, index_t(64), true)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const index_t ps : {index_t(16), index_t(64)})
      benchmark::RegisterBenchmark(("memread/paged/" + n + "_fp16" + (ps == 16 ? "" : "_p64")).c_str(), memread_paged, c, ps)
          ->UseRealTime()->Unit(benchmark::kMillisecond);
  }
  // Decode over one layer copy that stays in the last-level cache (32 MB here): the compute floor
  // of the step, beside the same decode from memory.
  TypedCase cached = kTypedCases[0];
  cached.cached = true;
  benchmark::RegisterBenchmark("attention/fused/decode_4096_fp16_cached", fused_typed<fp16>, cached, 1)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("attention/fused/decode_4096_int8_cached", fused_typed<qint8>, cached, 1)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("attention/paged/decode_4096_fp16_cached", paged_typed<fp16>, cached, index_t(16), true)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("attention/paged/decode_4096_fp16_hugepages", paged_typed<fp16, HugePageAllocator<fp16>>,
                               kTypedCases[0], index_t(16), true)
      ->UseRealTime()->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
