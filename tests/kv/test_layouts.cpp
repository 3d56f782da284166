// The KV-layout layer (kv/layout.hpp): contiguous (any strides), cells with holes and paged
// caches over caller memory. Eviction in every layout against a naive copy of the kept tokens,
// cells freeing without moving and compact(), cell appends, bad input (page tables, pools,
// strides, metadata) leaving the cache unchanged, and KvCache's K/V in 2 MB aligned memory
// advised for huge pages. Folding and SAC in every layout: tests/fold, tests/anchor.
#include <cstdint>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "kv_storage.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_kv_layouts {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using test::kLayouts;

namespace {


/// The value a test writes at (layer, head, token, i): distinct for every element.
float value_of(index_t l, index_t h, index_t tok, index_t i, bool v) {
  return float((v ? -1 : 1) * (l * 1000 + h * 100 + tok) + i) * 0.25f;
}

/// Appends tokens [0, n) (positions 100 + t, token indices 3 t) with value_of data.
template <class Kv>
void fill(Kv& kv, index_t n) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n)), slots(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) pos[std::size_t(t)] = 100 + t, idx[std::size_t(t)] = 3 * t;
  kv.append(n, pos.data(), idx.data(), slots.data());
  std::vector<float> row(std::size_t(kv.head_dim()));
  for (index_t l = 0; l < kv.layers(); ++l)
    for (bool v : {false, true})
      for (index_t h = 0; h < kv.kv_heads(); ++h)
        for (index_t t = 0; t < n; ++t) {
          for (index_t i = 0; i < kv.head_dim(); ++i) row[std::size_t(i)] = value_of(l, h, t, i, v);
          store_row(v ? kv.values(l) : kv.keys(l), h, slots[std::size_t(t)], row.data());
        }
}

/// Checks that `kv` holds exactly the tokens `kept` (of fill's numbering) in logical order:
/// metadata and every element (as stored: the storage type's rounding of value_of).
template <class Kv>
void check_holds(const Kv& kv, const std::vector<index_t>& kept) {
  using C = std::remove_const_t<typename decltype(kv.keys(0))::element_type>;
  const auto order = kv::logical_order(kv);
  REQUIRE(order.size() == kept.size());
  REQUIRE(kv.size() == index_t(kept.size()));
  std::vector<float> row(std::size_t(kv.head_dim()));
  std::vector<C> q(std::size_t(kv.head_dim()));
  for (std::size_t j = 0; j < kept.size(); ++j) {
    const index_t s = order[j], t = kept[j];
    CHECK(kv.positions()[s] == 100 + t);
    CHECK(kv.token_index()[s] == 3 * t);
    for (index_t l = 0; l < kv.layers(); ++l)
      for (bool v : {false, true})
        for (index_t h = 0; h < kv.kv_heads(); ++h) {
          // The expected row: value_of stored through a one-row view of the same type.
          for (index_t i = 0; i < kv.head_dim(); ++i) row[std::size_t(i)] = value_of(l, h, t, i, v);
          float scale = 0;
          HeadsView<C> one{q.data(), 1, 1, kv.head_dim(), kv.head_dim(), kv.head_dim()};
          if constexpr (is_quantized_v<C>) one.scales = &scale;
          store_row(one, 0, 0, row.data());
          const auto view = v ? kv.values(l) : kv.keys(l);
          for (index_t i = 0; i < kv.head_dim(); ++i) {
            INFO("layer " << l << (v ? " V" : " K") << " head " << h << " token " << t << " element " << i);
            REQUIRE(element_value(view, h, s, i) == element_value(HeadsView<const C>(one), 0, 0, i));
          }
        }
  }
}

std::vector<index_t> kept_after(index_t n, const std::vector<TokenRange>& drop) {
  std::vector<index_t> kept;
  for (index_t t = 0; t < n; ++t) {
    bool gone = false;
    for (const auto& r : drop) gone |= t >= r.begin && t < r.end;
    if (!gone) kept.push_back(t);
  }
  return kept;
}

template <class C>
void evict_in_every_layout() {
  const KvShape s{2, 3, 8};
  const index_t n = 30;
  const std::vector<TokenRange> drop{{0, 2}, {5, 9}, {9, 10}, {17, 23}, {29, 30}};
  const auto kept = kept_after(n, drop);
  SECTION("contiguous, head-major (KvCache)") {
    KvCache<C> cache(s.layers, s.kv_heads, s.head_dim, 40);
    fill(cache, n);
    const auto st = cache.evict(drop);
    CHECK(st.tokens == n - index_t(kept.size()));
    check_holds(cache, kept);
  }
  SECTION("contiguous, token-major over caller memory") {
    std::vector<C> k(std::size_t(s.layers * 40 * s.kv_heads * s.head_dim)), v(k.size());
    std::vector<float> ks(std::size_t(s.layers * 40 * s.kv_heads)), vs(ks.size());
    std::vector<std::int64_t> pos(40);
    std::vector<index_t> idx(40);
    ContiguousKv<C> kv(s, KvBuffers<C>::token_major(k.data(), v.data(), s, 40, ks.data(), vs.data()), 40, pos.data(),
                       idx.data());
    fill(kv, n);
    const auto st = kv.evict(drop);
    // Bytes moved: every kept token after the first removed range, all heads, K and V, 2 layers.
    std::size_t moved = 0;
    for (index_t t : kept) moved += t > 0 ? 1 : 0;
    CHECK(st.bytes_moved ==
          moved * std::size_t(2 * s.layers * s.kv_heads) * (std::size_t(s.head_dim) * sizeof(C) + (is_quantized_v<C> ? 4 : 0)));
    check_holds(kv, kept);
  }
  // Engines that allocate each layer on its own, with V in another layout than K (llama.cpp,
  // vLLM): a pointer per layer and the values' own strides.
  const index_t cap = 40, hd = s.head_dim, kh = s.kv_heads;
  std::vector<std::vector<C>> lk, lv;  // one allocation per layer and side
  std::vector<std::vector<float>> lks, lvs;
  std::vector<C*> pk, pv;
  std::vector<float*> pks, pvs;
  for (index_t l = 0; l < s.layers; ++l) {
    lk.emplace_back(static_cast<std::size_t>(cap * kh * hd + 3 * l)), lv.emplace_back(static_cast<std::size_t>(cap * kh * hd + 5));
    lks.emplace_back(static_cast<std::size_t>(cap * kh)), lvs.emplace_back(static_cast<std::size_t>(cap * kh));
  }
  for (index_t l = 0; l < s.layers; ++l) {
    pk.push_back(lk[std::size_t(l)].data() + 3 * l), pv.push_back(lv[std::size_t(l)].data() + 5);
    pks.push_back(lks[std::size_t(l)].data()), pvs.push_back(lvs[std::size_t(l)].data());
  }
  KvBuffers<C> per_layer;
  per_layer.layer_keys = pk.data(), per_layer.layer_values = pv.data();
  per_layer.head_stride = cap * hd, per_layer.token_stride = hd;             // K head-major
  per_layer.value_head_stride = hd, per_layer.value_token_stride = kh * hd;  // V token-major
  per_layer.layer_key_scales = pks.data(), per_layer.layer_value_scales = pvs.data();
  per_layer.scale_head_stride = cap, per_layer.scale_token_stride = 1;
  per_layer.value_scale_head_stride = 1, per_layer.value_scale_token_stride = kh;
  SECTION("contiguous, a buffer per layer, V token-major beside K head-major") {
    std::vector<std::int64_t> pos(static_cast<std::size_t>(cap));
    std::vector<index_t> idx(static_cast<std::size_t>(cap));
    ContiguousKv<C> kv(s, per_layer, cap, pos.data(), idx.data());
    fill(kv, n);
    kv.evict(drop);
    check_holds(kv, kept);
  }
  SECTION("cells, a buffer per layer, V token-major beside K head-major; compact()") {
    std::vector<std::int64_t> pos(static_cast<std::size_t>(cap), -1);
    std::vector<index_t> idx(static_cast<std::size_t>(cap), 0);
    CellKv<C> kv(s, per_layer, cap, pos.data(), idx.data());
    fill(kv, n);
    kv.evict(drop);
    check_holds(kv, kept);
    kv.compact();
    check_holds(kv, kept);
  }
  SECTION("paged, a pool per layer, V pages NHD beside K pages HND") {
    const index_t page = 4, pool_pages = cap / page;
    PagedBuffers<C> b;
    b.layer_keys = pk.data(), b.layer_values = pv.data(), b.pool_pages = pool_pages, b.page_size = page;
    b.page_stride = page * kh * hd, b.head_stride = page * hd, b.token_stride = hd;  // K: HND
    b.value_head_stride = hd, b.value_token_stride = kh * hd;                         // V: NHD
    b.layer_key_scales = pks.data(), b.layer_value_scales = pvs.data();
    b.scale_page_stride = page * kh, b.scale_head_stride = page, b.scale_token_stride = 1;
    b.value_scale_head_stride = 1, b.value_scale_token_stride = kh;
    std::vector<index_t> free_pages(static_cast<std::size_t>(pool_pages)), pages(static_cast<std::size_t>(pool_pages)), idx(static_cast<std::size_t>(cap));
    for (index_t i = 0; i < pool_pages; ++i) free_pages[std::size_t(i)] = (i * 7) % pool_pages;  // scattered
    std::vector<std::int64_t> pos(static_cast<std::size_t>(cap));
    PagePool pool{free_pages.data(), pool_pages, pool_pages};
    PagedKv<C> kv(s, b, &pool, pages.data(), pool_pages, pos.data(), idx.data());
    fill(kv, n);
    kv.evict(drop);
    check_holds(kv, kept);
  }
  SECTION("cells: eviction frees cells, moves nothing; appends fill the holes; compact()") {
    host::CellStorage<C> st(s, 40);
    fill(st.kv, n);
    const auto before = st.keys;
    const auto es = st.kv.evict(drop);
    CHECK(es.bytes_moved == 0);
    CHECK(es.tokens == n - index_t(kept.size()));
    CHECK(std::memcmp(st.keys.data(), before.data(), before.size() * sizeof(C)) == 0);  // no K/V moved
    check_holds(st.kv, kept);
    CHECK(st.kv.slots() == 29);  // the last cell was freed
    // A new token takes the first free cell (cell 0).
    const std::int64_t p = 500;
    const index_t ti = 1000;
    index_t slot = -1;
    st.kv.append(1, &p, &ti, &slot);
    CHECK(slot == 0);
    st.kv.unappend(&slot, 1);
    check_holds(st.kv, kept);
    const auto cs = st.kv.compact();
    CHECK(st.kv.slots() == index_t(kept.size()));  // dense again
    CHECK(cs.bytes_moved > 0);
    check_holds(st.kv, kept);
  }
  for (bool hnd : {false, true})
    SECTION(std::string("paged ") + (hnd ? "HND" : "NHD") + ", pages of 4, scattered") {
      host::PagedStorage<C> st(s, 40, 4, hnd);
      fill(st.kv, n);
      const index_t free_before = st.pool.free_count;
      CHECK(st.kv.page_count() == 8);
      const auto es = st.kv.evict(drop);
      check_holds(st.kv, kept);
      CHECK(st.kv.page_count() == (index_t(kept.size()) + 3) / 4);
      CHECK(es.pages_freed == 8 - st.kv.page_count());
      CHECK(st.pool.free_count == free_before + es.pages_freed);
      // The freed pages are the ones the table no longer lists, and every pool page is owned once.
      std::vector<int> owner(std::size_t(st.pool.pool_pages), 0);
      for (index_t i = 0; i < st.kv.page_count(); ++i) ++owner[std::size_t(st.kv.pages()[i])];
      for (index_t i = 0; i < st.pool.free_count; ++i) ++owner[std::size_t(st.pool.free_pages[i])];
      CHECK(std::all_of(owner.begin(), owner.end(), [](int o) { return o == 1; }));
      st.kv.gather({0, 3});
      check_holds(st.kv, {kept[0], kept[3]});
      st.kv.clear();
      CHECK(st.pool.free_count == st.pool.pool_pages);
    }
}

}  // namespace

TEST_CASE("every KV layout evicts like a naive copy: float", "[layouts]") { evict_in_every_layout<float>(); }
TEST_CASE("every KV layout evicts like a naive copy: fp16", "[layouts]") { evict_in_every_layout<fp16>(); }
TEST_CASE("every KV layout evicts like a naive copy: qint8", "[layouts]") { evict_in_every_layout<qint8>(); }





TEST_CASE("RangeCollector merges neighbouring slots, in its buffer or past it", "[layouts]") {
  for (index_t runs : {0, 1, 31, 32, 33, 200}) {
    RangeCollector c;
    std::vector<TokenRange> naive;
    for (index_t r = 0; r < runs; ++r) {
      const index_t b = 10 * r + r % 3, n = 1 + r % 4;  // runs of 1-4 slots with gaps
      for (index_t s = b; s < b + n; ++s) c.add(s);
      naive.push_back({b, b + n});
    }
    const TokenRanges got = c.ranges();
    REQUIRE(got.size() == runs);
    for (index_t r = 0; r < runs; ++r) {
      CHECK(got.begin()[r].begin == naive[std::size_t(r)].begin);
      CHECK(got.begin()[r].end == naive[std::size_t(r)].end);
    }
  }
}

TEST_CASE("cell appends take the first free cells without scanning the cache", "[layouts][cells]") {
  // A brute-force model of the metadata (first free cells counted from cell 0, counts recounted
  // from scratch) against CellKv over random appends, evictions, truncations, rollbacks and
  // compactions; the handle's remembered lowest free cell must never change which cells it takes.
  const KvShape s{1, 2, 8};
  const index_t cells_n = 300;
  std::vector<float> k(std::size_t(cells_n * s.kv_heads * s.head_dim)), v(k.size());
  std::vector<std::int64_t> pos(std::size_t(cells_n), -1);
  std::vector<index_t> idx(std::size_t(cells_n), 0);
  CellKv<float> kv(s, KvBuffers<float>::token_major(k.data(), v.data(), s, cells_n), cells_n, pos.data(), idx.data());
  std::mt19937 rng(11);
  index_t next = 0;
  auto free_cells = [&](index_t count) {
    std::vector<index_t> r;
    for (index_t c = 0; c < cells_n && index_t(r.size()) < count; ++c)
      if (pos[std::size_t(c)] < 0) r.push_back(c);
    return r;
  };
  for (int step = 0; step < 3000; ++step) {
    const int op = int(rng() % 10);
    if (op < 6) {  // append 1-12 tokens
      const index_t count = 1 + index_t(rng() % 12);
      const auto expect = free_cells(count);
      std::vector<std::int64_t> p(static_cast<std::size_t>(count));
      std::vector<index_t> t(static_cast<std::size_t>(count)), slots(static_cast<std::size_t>(count), -1);
      for (index_t i = 0; i < count; ++i) p[std::size_t(i)] = next + i, t[std::size_t(i)] = next + i;
      if (index_t(expect.size()) < count) {
        const auto before = pos;
        CHECK_THROWS_WITH(kv.append(count, p.data(), t.data(), slots.data()), Contains("do not fit"));
        CHECK(pos == before);
        continue;
      }
      kv.append(count, p.data(), t.data(), slots.data());
      REQUIRE(slots == expect);
      next += count;
      if (op == 5) kv.unappend(slots.data(), count);  // roll it back
    } else if (op < 9 && kv.slots() > 0) {  // evict a random range of cells
      const index_t a = index_t(rng() % std::uint32_t(kv.slots())), b = std::min(kv.slots(), a + 1 + index_t(rng() % 25));
      kv.evict({{a, b}});
    } else if (kv.slots() > 0) {
      if (rng() % 2) kv.truncate(index_t(rng() % std::uint32_t(kv.slots())));
      else kv.compact();
    }
    index_t live = 0, used = 0, last = -1;
    for (index_t c = 0; c < cells_n; ++c)
      if (pos[std::size_t(c)] >= 0) ++live, used = c + 1, last = std::max(last, idx[std::size_t(c)]);
    REQUIRE(kv.size() == live);
    REQUIRE(kv.room() == cells_n - live);
    REQUIRE(kv.slots() == used);
    REQUIRE(kv.last_token_index() == last);
  }

  // Two sequences over the same cells: a handle made before the other sequence freed cells
  // below its own still finds room (it scans again from cell 0 before giving up).
  std::vector<std::int64_t> p2(std::size_t(cells_n), -1);
  std::vector<index_t> i2(std::size_t(cells_n), 0);
  std::vector<std::int32_t> seq(std::size_t(cells_n), 0);
  CellKv<float> b(s, KvBuffers<float>::token_major(k.data(), v.data(), s, cells_n), cells_n, p2.data(), i2.data(), seq.data(), 1);
  std::vector<std::int64_t> pp(static_cast<std::size_t>(cells_n));
  std::vector<index_t> ti(static_cast<std::size_t>(cells_n)), slots(static_cast<std::size_t>(cells_n));
  std::iota(pp.begin(), pp.end(), 0);
  std::iota(ti.begin(), ti.end(), 0);
  b.append(100, pp.data(), ti.data(), slots.data());  // cells 0-99: sequence 1
  CHECK(slots[99] == 99);
  CellKv<float> a2(s, KvBuffers<float>::token_major(k.data(), v.data(), s, cells_n), cells_n, p2.data(), i2.data(), seq.data(), 0);
  a2.append(200, pp.data(), ti.data(), slots.data());  // cells 100-299: sequence 0, none left
  CHECK((slots[0] == 100 && slots[199] == 299));
  b.evict({{0, 40}});  // sequence 1 frees cells 0-39 behind a2's back
  a2.append(40, pp.data() + 200, ti.data() + 200, slots.data());
  CHECK((slots[0] == 0 && slots[39] == 39));
  CHECK(std::count(seq.begin(), seq.begin() + 40, 0) == 40);
}



TEST_CASE("KV layouts reject bad page tables, pools, strides and metadata, unchanged", "[layouts][errors]") {
  const KvShape s{1, 2, 8};
  std::vector<float> k(std::size_t(4 * 4 * 2 * 8)), v(k.size());
  const auto buf = PagedBuffers<float>::nhd(k.data(), v.data(), s, 4, 4);
  std::vector<index_t> free_list{0, 1, 2, 3}, pages(4), idx(16);
  std::vector<std::int64_t> pos(16);
  SECTION("page tables: out of the pool, repeated, or also on the free list") {
    PagePool pool{free_list.data(), 2, 4};  // pages 0, 1 free
    pages = {2, 7};
    CHECK_THROWS_WITH(PagedKv<float>(s, buf, &pool, pages.data(), 4, pos.data(), idx.data(), 8),
                      Contains("pool page 7, outside the pool [0, 4)"));
    pages = {2, 2};
    CHECK_THROWS_WITH(PagedKv<float>(s, buf, &pool, pages.data(), 4, pos.data(), idx.data(), 8),
                      Contains("pool page 2 appears twice"));
    pages = {2, 1};
    CHECK_THROWS_WITH(PagedKv<float>(s, buf, &pool, pages.data(), 4, pos.data(), idx.data(), 8),
                      Contains("free page 1 is outside the pool or already in use"));
  }
  SECTION("a pool too small for an append leaves the cache unchanged") {
    PagePool pool{free_list.data(), 2, 4};
    PagedKv<float> kv(s, buf, &pool, pages.data(), 4, pos.data(), idx.data());
    std::vector<std::int64_t> p(12, 0);
    std::vector<index_t> ti(12);
    std::iota(ti.begin(), ti.end(), 0);
    kv.append(5, p.data(), ti.data());
    CHECK(pool.free_count == 0);
    CHECK_THROWS_WITH(kv.append(4, p.data(), ti.data() + 5), Contains("the pool is too small: 1 more pages needed, 0 free"));
    CHECK(kv.size() == 5);
    CHECK(kv.room() == 3);
    CHECK_THROWS_WITH(kv.append(1, p.data(), ti.data()), Contains("token indices must increase"));
  }
  SECTION("strides that overlap") {
    std::vector<std::int64_t> p(4);
    std::vector<index_t> ti(4);
    KvBuffers<float> b{k.data(), v.data(), 64, 8, 4};  // token stride 4 < head_dim 8
    CHECK_THROWS_WITH(ContiguousKv<float>(s, b, 4, p.data(), ti.data()), Contains("strides overlap"));
    b = {k.data(), v.data(), 64, 16, 8};  // heads 16 apart, 4 tokens 8 apart: head 1 overlaps head 0's tokens
    CHECK_THROWS_WITH(ContiguousKv<float>(s, b, 4, p.data(), ti.data()), Contains("strides overlap"));
    auto bad = buf;
    bad.token_stride = 4;
    PagePool pool{free_list.data(), 4, 4};
    CHECK_THROWS_WITH(PagedKv<float>(s, bad, &pool, pages.data(), 4, pos.data(), idx.data()), Contains("strides overlap"));
    // The values' own strides are checked on their own; so are per-layer pointers.
    b = KvBuffers<float>::head_major(k.data(), v.data(), s, 4);
    b.value_token_stride = 4;
    CHECK_THROWS_WITH(ContiguousKv<float>(s, b, 4, p.data(), ti.data()), Contains("V buffer strides overlap"));
    bad = buf;
    bad.value_head_stride = 4;
    CHECK_THROWS_WITH(PagedKv<float>(s, bad, &pool, pages.data(), 4, pos.data(), idx.data()),
                      Contains("value page pool strides overlap"));
    float* layer_k[1] = {k.data()};
    float* layer_v[1] = {nullptr};
    b = KvBuffers<float>::head_major(nullptr, nullptr, s, 4);
    b.layer_keys = layer_k;
    CHECK_THROWS_WITH(ContiguousKv<float>(s, b, 4, p.data(), ti.data()),
                      Contains("per-layer buffers need both layer_keys and layer_values"));
    b.layer_values = layer_v;
    CHECK_THROWS_WITH(CellKv<float>(s, b, 4, p.data(), ti.data()), Contains("layer 0 has a null key or value buffer"));
    bad = buf;
    bad.layer_keys = layer_k, bad.layer_values = layer_v;
    CHECK_THROWS_WITH(PagedKv<float>(s, bad, &pool, pages.data(), 4, pos.data(), idx.data()),
                      Contains("layer 0 has a null key or value pool"));
  }
  SECTION("a live cell without a token index") {
    std::vector<float> ck(64), cv(64);
    std::vector<std::int64_t> p{0, 5, -1, -1};
    std::vector<index_t> ti{0, -1, 0, 0};
    CHECK_THROWS_WITH(CellKv<float>(s, KvBuffers<float>::token_major(ck.data(), cv.data(), s, 4), 4, p.data(), ti.data()),
                      Contains("cell 1 is live (position 5) but has no token index (-1)"));
  }
  SECTION("cell metadata shorter than the cache, a full cell cache") {
    host::CellStorage<float> st(s, 4);
    std::vector<std::int64_t> p{0, 1, 2, 3, 4};
    std::vector<index_t> ti{0, 1, 2, 3, 4}, slots(5);
    st.kv.append(4, p.data(), ti.data(), slots.data());
    CHECK_THROWS_WITH(st.kv.append(1, p.data() + 4, ti.data() + 4, slots.data()), Contains("do not fit"));
    CHECK(st.kv.size() == 4);
    std::vector<TokenRole> roles(5);
    CellSentinel m{roles.data(), 5, 4, CellMeta{st.pos.data(), st.seq.data(), 3}, st.token_index.data(), 0};
    CHECK_THROWS_WITH(m.check(1, 4, "attention"), Contains("covers 3 cells but the cache has 4"));
    CHECK_THROWS_WITH(st.kv.evict({{2, 1}}), Contains("out of"));
    CHECK(st.kv.size() == 4);
  }
}

namespace {
/// The VmFlags line of the mapping in /proc/self/smaps that holds address p ("" if none).
std::string vm_flags_of(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') inside = lo <= a && a < hi;
    else if (inside && line.rfind("VmFlags:", 0) == 0) return line + " ";
  }
  return "";
}
}  // namespace

TEST_CASE("KvCache's K/V buffers are 2 MB aligned and advised for huge pages", "[layouts][memory]") {
  constexpr std::size_t huge = HugePageAllocator<float>::huge_page;
  HugePageAllocator<float> alloc;
  const std::size_t n = huge / sizeof(float) * 2 + 100;  // two whole huge pages and a bit
  float* big = alloc.allocate(n);
  float* small = alloc.allocate(1000);
  float* none = alloc.allocate(0);  // a valid pointer, as std::allocator gives
  CHECK(none != nullptr);
  alloc.deallocate(none, 0);
  CHECK(reinterpret_cast<std::uintptr_t>(big) % huge == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(small) % HugePageAllocator<float>::alignment == 0);
  std::fill(big, big + n, 1.5f);  // all of it is usable
  CHECK(std::accumulate(big, big + n, 0.0) == 1.5 * double(n));

  // 2 layers x 8 heads x 1024 tokens x 128 dims of fp16: 4 MB of keys.
  KvCache<fp16> cache(2, 8, 128, 1024);
  const fp16* keys = cache.keys(0).data;
  CHECK(reinterpret_cast<std::uintptr_t>(keys) % huge == 0);
  // Where the kernel has transparent huge pages, the advice shows as "hg" in the mapping's flags
  // (whether the pages are huge depends on the THP mode and free memory; the advice does not).
  const bool thp = std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled").good();
  const std::string big_flags = vm_flags_of(big), cache_flags = vm_flags_of(keys);
  INFO("big: " << big_flags << "\ncache: " << cache_flags);
  if (thp) {
    CHECK(big_flags.find(" hg ") != std::string::npos);
    CHECK(cache_flags.find(" hg ") != std::string::npos);
  }
  alloc.deallocate(small, 1000);
  alloc.deallocate(big, n);
}

}  // namespace test_kv_layouts
