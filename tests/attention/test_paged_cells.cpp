// Engine-owned caches. Paged K/V (kv/paged.hpp): attention over a page pool gives the same bits as over a contiguous
// copy of the same keys and values (every storage type, NHD and HND, page sizes that do and do
// not divide the tile, decode and prefill, every mask, fp32 and bf16 compute, 1 and 2 threads);
// page tables and views with bad contents are refused by name and leave the output untouched.
// Cells with holes (kv/cells.hpp): attention under CellCausal against the reference and against
// the compacted live cells; free cells reused first; short metadata refused.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_attention_paged_cells {

using namespace ctxcomp;
using Catch::Matchers::Contains;

namespace {
/// The same K/V three times: contiguous [kv_heads x tokens x head_dim], token-major [tokens x
/// kv_heads x head_dim] (llama.cpp's cells) and in a shuffled page pool.
template <class T>
struct TwoCaches {
  index_t heads, tokens, d, page_size, pool_pages;
  std::vector<T> kc, vc, kt, vt, kp, vp;
  std::vector<float> ksc, vsc, kts, vts, kps, vps;
  std::vector<index_t> table;
  bool hnd;

  TwoCaches(index_t kv_heads, index_t n, index_t head_dim, index_t ps, bool hnd_layout, unsigned seed)
      : heads(kv_heads), tokens(n), d(head_dim), page_size(ps), hnd(hnd_layout) {
    const index_t pages = (n + ps - 1) / ps;
    pool_pages = pages + 3;
    table.resize(std::size_t(pages));
    std::iota(table.begin(), table.end(), index_t(2));  // pages 0, 1 and the last stay unused
    std::mt19937 g(seed);
    std::shuffle(table.begin(), table.end(), g);
    kc.resize(std::size_t(heads * n * d)), vc.resize(kc.size());
    ksc.resize(std::size_t(heads * n)), vsc.resize(ksc.size());
    kt.resize(kc.size()), vt.resize(kc.size()), kts.resize(ksc.size()), vts.resize(ksc.size());
    kp.resize(std::size_t(pool_pages * ps * heads * d)), vp.resize(kp.size());
    kps.resize(std::size_t(pool_pages * ps * heads)), vps.resize(kps.size());
    const auto kf = test::random_vector(kc.size(), seed + 1, -2.f, 2.f), vf = test::random_vector(vc.size(), seed + 2);
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < n; ++t) {
        const float* kr = kf.data() + (h * n + t) * d;
        const float* vr = vf.data() + (h * n + t) * d;
        store_row(contiguous(false), h, t, kr), store_row(contiguous(true), h, t, vr);
        store_row(token_major(false), h, t, kr), store_row(token_major(true), h, t, vr);
        store_row(paged(false), h, t, kr), store_row(paged(true), h, t, vr);
      }
  }
  HeadsView<T> contiguous(bool value) {
    auto r = HeadsView<T>::contiguous(value ? vc.data() : kc.data(), heads, tokens, d);
    if constexpr (is_quantized_v<T>) r.scales = value ? vsc.data() : ksc.data(), r.scale_head_stride = tokens, r.scale_token_stride = 1;
    return r;
  }
  HeadsView<T> token_major(bool value) {
    HeadsView<T> r{value ? vt.data() : kt.data(), heads, tokens, d, d, heads * d};
    if constexpr (is_quantized_v<T>) r.scales = value ? vts.data() : kts.data(), r.scale_head_stride = 1, r.scale_token_stride = heads;
    return r;
  }
  PagedHeadsView<T> paged(bool value) {
    T* pool = value ? vp.data() : kp.data();
    float* sc = is_quantized_v<T> ? (value ? vps.data() : kps.data()) : nullptr;
    return hnd ? PagedHeadsView<T>::hnd(pool, pool_pages, page_size, heads, d, table.data(), tokens, sc)
               : PagedHeadsView<T>::nhd(pool, pool_pages, page_size, heads, d, table.data(), tokens, sc);
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class T, class Mask>
void check_paged(index_t d, index_t ql, index_t kvl, index_t ps, bool hnd, const Mask& mask, Compute compute,
                 unsigned seed) {
  const index_t H = 8, KH = 2;
  INFO(type_name<T>() << " head_dim " << d << " q " << ql << " kv " << kvl << " page " << ps << (hnd ? " HND" : " NHD")
                      << " compute " << compute_name(compute));
  TwoCaches<T> c(KH, kvl, d, ps, hnd, seed);
  const auto q = test::random_vector(std::size_t(H * ql * d), seed + 3);
  const auto qv = HeadsView<const float>::contiguous(q.data(), H, ql, d);
  AttentionOptions opt;
  opt.compute = compute;
  std::vector<float> ref(q.size()), got(q.size()), got2(q.size()), got3(q.size()), got4(q.size());
  Workspace ws;
  attention(qv, HeadsView<const T>(c.contiguous(false)), HeadsView<const T>(c.contiguous(true)), mask,
            HeadsView<float>::contiguous(ref.data(), H, ql, d), opt, ws);
  attention(qv, PagedHeadsView<const T>(c.paged(false)), PagedHeadsView<const T>(c.paged(true)), mask,
            HeadsView<float>::contiguous(got.data(), H, ql, d), opt, ws);
  attention(qv, PagedHeadsView<const T>(c.paged(false)), PagedHeadsView<const T>(c.paged(true)), mask,
            HeadsView<float>::contiguous(got2.data(), H, ql, d), opt, ws, test::two_threads());
  // Token-major contiguous K/V (split decode interleaves the kv heads there too).
  attention(qv, HeadsView<const T>(c.token_major(false)), HeadsView<const T>(c.token_major(true)), mask,
            HeadsView<float>::contiguous(got3.data(), H, ql, d), opt, ws);
  attention(qv, HeadsView<const T>(c.token_major(false)), HeadsView<const T>(c.token_major(true)), mask,
            HeadsView<float>::contiguous(got4.data(), H, ql, d), opt, ws, test::two_threads());
  CHECK(same_bits(got, ref));
  CHECK(same_bits(got2, ref));
  CHECK(same_bits(got3, ref));
  CHECK(same_bits(got4, ref));
}
}  // namespace

TEST_CASE("paged attention equals contiguous attention bit for bit", "[paged][attention][threads]") {
  unsigned seed = 1;
  for (index_t ps : {16, 5, 64, 100})
    for (bool hnd : {false, true}) {
      // decode (split-K past 512 keys), a few rows (GQA decode), prefill (many rows)
      check_paged<fp16>(128, 1, 1100, ps, hnd, Causal(1099), Compute::fp32, seed++);
      check_paged<float>(80, 3, 700, ps, hnd, Causal(697), Compute::fp32, seed++);
      check_paged<bf16>(64, 150, 300, ps, hnd, Causal(150), Compute::fp32, seed++);
      check_paged<qint8>(96, 1, 650, ps, hnd, Causal(649), Compute::fp32, seed++);
      check_paged<fp16>(72, 2, 900, ps, hnd, Causal(898), Compute::fp32, seed++);  // padded V rows
      check_paged<qint8>(64, 40, 130, ps, hnd, CrossWithCausalTail(90), Compute::fp32, seed++);
      check_paged<fp16>(128, 100, 100, ps, hnd, Causal(0), Compute::bf16, seed++);
    }
  // The structured masks of the compressors.
  const index_t anchors[] = {2, 9, 33, 60, 61};
  check_paged<fp16>(64, 70, 70, 16, false, AnchorBidirectional{anchors, 5, 0}, Compute::fp32, 50);
  std::vector<TokenRole> roles(200);
  for (index_t i = 20; i < 40; ++i) roles[std::size_t(i)] = {i == 20 ? SpanRole::Open : i == 39 ? SpanRole::Close : SpanRole::Inner, 0};
  for (index_t i = 120; i < 131; ++i) roles[std::size_t(i)] = {i == 120 ? SpanRole::Open : i == 130 ? SpanRole::Close : SpanRole::Inner, 1};
  check_paged<bf16>(64, 1, 200, 16, true, SentinelSpans{roles.data(), 200, 199, nullptr}, Compute::fp32, 51);
  check_paged<bf16>(64, 60, 200, 16, true, SentinelSpans{roles.data(), 200, 140, nullptr}, Compute::fp32, 52);
  // Split decode over token-major K/V and pages (NHD and HND) runs every kv head per tile
  // (interleaved, run by run), with Mixed tiles from spans: still the contiguous bits.
  std::vector<TokenRole> long_roles(1300);
  for (index_t s = 0, i = 30; i + 20 < 1300; i += 97, ++s)
    for (index_t j = i; j < i + 20; ++j)
      long_roles[std::size_t(j)] = {j == i ? SpanRole::Open : j == i + 19 ? SpanRole::Close : SpanRole::Inner, std::int32_t(s)};
  for (bool hnd : {false, true}) {
    check_paged<fp16>(128, 1, 1300, 16, hnd, SentinelSpans{long_roles.data(), 1300, 1299, nullptr}, Compute::fp32, 53);
    check_paged<qint8>(64, 2, 1300, 7, hnd, SentinelSpans{long_roles.data(), 1300, 1298, nullptr}, Compute::fp32, 54);
  }
}

TEST_CASE("paged views and page tables with bad contents are refused by name", "[paged][errors]") {
  TwoCaches<fp16> c(2, 40, 64, 16, false, 9);
  const auto q = test::random_vector(std::size_t(4 * 1 * 64), 1);
  std::vector<float> out(q.size(), 7.f);
  Workspace ws;
  auto run = [&](PagedHeadsView<fp16> k) {
    attention(HeadsView<const float>::contiguous(q.data(), 4, 1, 64), PagedHeadsView<const fp16>(k),
              PagedHeadsView<const fp16>(c.paged(true)), Causal(39), HeadsView<float>::contiguous(out.data(), 4, 1, 64),
              {}, ws);
  };
  auto k = c.paged(false);
  c.table[1] = c.pool_pages;  // past the pool
  CHECK_THROWS_WITH(run(k), Contains("page 1 is pool page 6, outside the pool [0, 6)"));
  c.table[1] = -1;
  CHECK_THROWS_WITH(run(k), Contains("outside the pool"));
  c.table[1] = 3;
  auto bad = k;
  bad.page_size = 0;
  CHECK_THROWS_WITH(run(bad), Contains("page_size (0) must be positive"));
  bad = k, bad.pages = nullptr;
  CHECK_THROWS_WITH(run(bad), Contains("null pool or page table"));
  bad = k, bad.token_stride = 32;
  CHECK_THROWS_WITH(run(bad), Contains("rows would overlap"));
  bad = k, bad.tokens = 41;  // more tokens than the value view
  CHECK_THROWS_WITH(run(bad), Contains("v is"));
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.f; }));

  // CSR page tables: two sequences sharing a pool of 6 pages of 4 tokens.
  const index_t indptr[] = {0, 2, 5}, indices[] = {4, 0, 1, 5, 2}, last[] = {3, 4};
  const PageTable t{indptr, indices, last, 2, 4};
  CHECK_NOTHROW(t.check(6));
  CHECK(t.tokens(0) == 7);
  CHECK(t.tokens(1) == 12);
  CHECK(t.sequence(1, k).pages == indices + 2);
  CHECK(t.sequence(1, k).tokens == 12);
  CHECK_THROWS_WITH(t.check(5), Contains("sequence 1 page 1 is pool page 5, outside the pool [0, 5)"));
  const index_t twice[] = {4, 0, 1, 4, 2};
  CHECK_THROWS_WITH((PageTable{indptr, twice, last, 2, 4}.check(6)), Contains("pool page 4 appears twice"));
  const index_t long_last[] = {3, 5};
  CHECK_THROWS_WITH((PageTable{indptr, indices, long_last, 2, 4}.check(6)),
                    Contains("sequence 1 last_page_len (5) is outside [1, 4]"));
  const index_t down[] = {0, 3, 2};
  CHECK_THROWS_WITH((PageTable{down, indices, last, 2, 4}.check(6)), Contains("indptr decreases at sequence 1"));
}

// ---- cells with holes (kv/cells.hpp) ------------------------------------------------------------

TEST_CASE("attention over a cell cache with holes and two sequences matches the reference", "[cells][attention][threads]") {
  // 300 cells, token-major [cells x kv_heads*head_dim] as llama.cpp keeps them; sequence 0 and 1
  // interleaved in runs, spans of both freed (as folding leaves them), some cells never used.
  const index_t cells_n = 300, KH = 2, H = 4, d = 64;
  std::vector<std::int64_t> pos(std::size_t(cells_n), -1);
  std::vector<std::int32_t> seq(std::size_t(cells_n), 0);
  std::int64_t next[2] = {0, 0};
  for (index_t c = 0; c < 280; ++c) {
    const std::int32_t s = (c / 37) % 2;
    seq[std::size_t(c)] = s, pos[std::size_t(c)] = next[s]++;
  }
  const CellMeta meta{pos.data(), seq.data(), cells_n};
  cells::free_range(meta, 10, 25);
  cells::free_range(meta, 64, 128);  // a whole tile
  cells::free_range(meta, 150, 157);
  const auto k = test::random_vector(std::size_t(cells_n * KH * d), 3, -2.f, 2.f);
  const auto v = test::random_vector(std::size_t(cells_n * KH * d), 4);
  const auto K = HeadsView<const float>::token_major(k.data(), cells_n, KH, d);
  const auto V = HeadsView<const float>::token_major(v.data(), cells_n, KH, d);
  for (index_t ql : {1, 9}) {
    INFO("query rows " << ql);
    // New tokens of sequence 0 at the next positions (their own cells are visible to them
    // only if written; here the queries see the cached tokens at or before their positions).
    std::vector<std::int64_t> qp(static_cast<std::size_t>(ql), 0);
    for (index_t i = 0; i < ql; ++i) qp[std::size_t(i)] = next[0] - 3 + i;
    const CellCausal mask{meta, qp.data(), ql, 0};
    const auto q = test::random_vector(std::size_t(H * ql * d), 5);
    const auto Q = HeadsView<const float>::contiguous(q.data(), H, ql, d);
    std::vector<float> expect(q.size()), got(q.size()), got2(q.size());
    reference::attention(Q, K, V, mask, HeadsView<float>::contiguous(expect.data(), H, ql, d));
    Workspace ws;
    attention(Q, K, V, mask, HeadsView<float>::contiguous(got.data(), H, ql, d), {}, ws);
    attention(Q, K, V, mask, HeadsView<float>::contiguous(got2.data(), H, ql, d), {}, ws, test::two_threads());
    CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
    CHECK(same_bits(got, got2));

    // The same tokens compacted (live cells of sequence 0 in cell order) give the same result.
    std::vector<float> kc, vc;
    std::vector<std::int64_t> pc;
    for (index_t c = 0; c < cells_n; ++c)
      if (mask.live(c)) {
        kc.insert(kc.end(), k.begin() + c * KH * d, k.begin() + (c + 1) * KH * d);
        vc.insert(vc.end(), v.begin() + c * KH * d, v.begin() + (c + 1) * KH * d);
        pc.push_back(pos[std::size_t(c)]);
      }
    const index_t n = index_t(pc.size());
    const CellCausal compact_mask{CellMeta{pc.data(), nullptr, n}, qp.data(), ql, 0};
    std::vector<float> compacted(q.size());
    attention(Q, HeadsView<const float>::token_major(kc.data(), n, KH, d), HeadsView<const float>::token_major(vc.data(), n, KH, d),
              compact_mask, HeadsView<float>::contiguous(compacted.data(), H, ql, d), {}, ws);
    CHECK(test::relative_error(got.data(), compacted.data(), got.size()) <= 1e-5);
  }
  // Tiles: the freed tile and the never-used tail are skipped; a tile of live cells of
  // sequence 0 only (cells 0..36 are sequence 0, 10..24 freed) is Mixed.
  std::int64_t late = 1000;
  const CellCausal m{meta, &late, 1, 0};
  CHECK(m.tile(0, 1, 64, 128) == TileVisibility::None);
  CHECK(m.tile(0, 1, 280, 300) == TileVisibility::None);
  CHECK(m.tile(0, 1, 0, 10) == TileVisibility::All);
  CHECK(m.tile(0, 1, 0, 64) == TileVisibility::Mixed);
}

namespace {
/// Decode and prefill over a cell cache whose free and never-written cells hold NaN and Inf
/// (for qint8: NaN scales), as memory the host never wrote or a freed cell may: the output is
/// bit for bit the output with zeros there (a P V that turned non-finite is redone without the
/// keys no row sees), finite, and within the fp32 bound of the double reference; 1 and 2
/// threads alike.
template <class T>
void garbage_in_free_cells(index_t d, index_t q_len, unsigned seed) {
  const index_t cells_n = 1100, KH = 2, H = 4;  // > 512 cells: decode splits the keys
  std::vector<std::int64_t> pos(std::size_t(cells_n), -1);
  for (index_t c = 0; c < 1050; ++c) pos[std::size_t(c)] = c;  // cells 1050.. never written
  const CellMeta meta{pos.data(), nullptr, cells_n};
  cells::free_range(meta, 10, 25);
  cells::free_range(meta, 130, 131);
  cells::free_range(meta, 600, 700);  // whole tiles and parts of tiles
  const auto kf = test::random_vector(std::size_t(cells_n * KH * d), seed, -2.f, 2.f);
  const auto vf = test::random_vector(kf.size(), seed + 1);
  const auto q = test::random_vector(std::size_t(H * q_len * d), seed + 2);
  std::vector<std::int64_t> qp(static_cast<std::size_t>(q_len));
  for (index_t i = 0; i < q_len; ++i) qp[std::size_t(i)] = 1050 - q_len + i;  // sees cells at or before it
  const CellCausal mask{meta, qp.data(), q_len, 0};
  auto run = [&](bool garbage, const auto& exec) {
    std::vector<T> k(kf.size()), v(vf.size());
    std::vector<float> ks(std::size_t(cells_n * KH)), vs(ks.size());
    auto view = [&](std::vector<T>& x, std::vector<float>& sc) {
      auto r = HeadsView<T>::token_major(x.data(), cells_n, KH, d);
      if constexpr (is_quantized_v<T>) r.scales = sc.data(), r.scale_head_stride = 1, r.scale_token_stride = KH;
      else (void)sc;
      return r;
    };
    const float bad[2] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
    std::vector<float> row(static_cast<std::size_t>(d));
    for (index_t c = 0; c < cells_n; ++c)
      for (index_t h = 0; h < KH; ++h) {
        const bool hidden = !mask.live(c);
        for (int which = 0; which < 2; ++which) {
          const float* src = (which ? vf : kf).data() + (c * KH + h) * d;
          for (index_t t = 0; t < d; ++t) row[std::size_t(t)] = hidden ? (garbage ? bad[(c + t + which) % 2] : 0.f) : src[t];
          store_row(which ? view(v, vs) : view(k, ks), h, c, row.data());
        }
      }
    std::vector<float> out(q.size(), 7.f);
    Workspace ws;
    attention(HeadsView<const float>::contiguous(q.data(), H, q_len, d), HeadsView<const T>(view(k, ks)),
              HeadsView<const T>(view(v, vs)), mask, HeadsView<float>::contiguous(out.data(), H, q_len, d), {}, ws, exec);
    std::vector<float> expect(q.size());
    reference::attention(HeadsView<const float>::contiguous(q.data(), H, q_len, d), HeadsView<const T>(view(k, ks)),
                         HeadsView<const T>(view(v, vs)), mask, HeadsView<float>::contiguous(expect.data(), H, q_len, d));
    return std::make_pair(out, expect);
  };
  INFO(type_name<T>() << " head_dim " << d << " query rows " << q_len);
  const auto clean = run(false, SerialExecutor{});
  const auto dirty = run(true, SerialExecutor{});
  const auto dirty2 = run(true, test::two_threads());
  CHECK(same_bits(dirty.first, clean.first));
  CHECK(same_bits(dirty2.first, clean.first));
  CHECK(std::all_of(dirty.first.begin(), dirty.first.end(), [](float x) { return std::isfinite(x); }));
  CHECK(same_bits(dirty.second, clean.second));  // the reference ignores hidden keys too
  CHECK(test::relative_error(dirty.first.data(), dirty.second.data(), dirty.first.size()) <= 1e-5);
}
}  // namespace

TEST_CASE("free cells may hold anything: NaN and Inf there never reach the output", "[cells][attention][threads]") {
  unsigned seed = 700;
  for (index_t d : {64, 72})  // 72: V rows widened into padded rows
    for (index_t q_len : {1, 3, 40}) {  // decode (split, every head per run), few rows, many rows
      garbage_in_free_cells<float>(d, q_len, seed++);
      garbage_in_free_cells<fp16>(d, q_len, seed++);
      garbage_in_free_cells<qint8>(d, q_len, seed++);
    }
}

}  // namespace test_attention_paged_cells
