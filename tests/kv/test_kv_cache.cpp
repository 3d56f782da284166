// KvCache, the owning contiguous cache: eviction and gathering compact in place like a naive
// copy (every storage type, scales included).
#include <cstring>
#include <vector>

#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_kv_kv_cache {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using ctxcomp::test::random_vector;


TEST_CASE("KvCache eviction compacts in place like a naive copy", "[kv]") {
  KvCache<float> cache(2, 3, 5, 40);
  std::vector<std::int64_t> pos(30);
  std::vector<index_t> idx(30);
  for (index_t i = 0; i < 30; ++i) pos[std::size_t(i)] = 100 + i, idx[std::size_t(i)] = 2 * i;
  cache.append(30, pos.data(), idx.data());
  for (index_t l = 0; l < 2; ++l)
    for (index_t h = 0; h < 3; ++h)
      for (index_t t = 0; t < 30; ++t)
        for (index_t i = 0; i < 5; ++i) cache.keys(l)(h, t, i) = float(l * 1000 + h * 100 + t), cache.values(l)(h, t, i) = -float(t);
  const auto* before = cache.keys(0).data;
  cache.evict({{0, 2}, {5, 9}, {9, 10}, {29, 30}});
  REQUIRE(cache.size() == 30 - 2 - 4 - 1 - 1);
  CHECK(cache.keys(0).data == before);  // no reallocation
  std::vector<index_t> kept;
  for (index_t t = 0; t < 30; ++t)
    if (!(t < 2 || (t >= 5 && t < 10) || t == 29)) kept.push_back(t);
  for (std::size_t s = 0; s < kept.size(); ++s) {
    CHECK(cache.positions()[s] == 100 + kept[s]);
    CHECK(cache.token_index()[s] == 2 * kept[s]);
    for (index_t l = 0; l < 2; ++l)
      for (index_t h = 0; h < 3; ++h) {
        CHECK(cache.keys(l)(h, index_t(s), 4) == float(l * 1000 + h * 100 + kept[s]));
        CHECK(cache.values(l)(h, index_t(s), 0) == -float(kept[s]));
      }
  }
  const index_t size = cache.size();
  CHECK_THROWS_WITH(cache.evict({{3, 5}, {4, 6}}), Contains("overlaps"));
  CHECK_THROWS_WITH(cache.evict({{0, size + 1}}), Contains("out of"));
  std::vector<std::int64_t> many_pos(100, 0);
  std::vector<index_t> many_idx(100);
  for (index_t i = 0; i < 100; ++i) many_idx[std::size_t(i)] = 1000 + i;
  CHECK_THROWS_WITH(cache.append(100, many_pos.data(), many_idx.data()), Contains("do not fit"));
  CHECK(cache.size() == size);
  cache.gather({0, 3});
  CHECK(cache.size() == 2);
  CHECK(cache.token_index()[1] == 2 * kept[3]);
}


TEST_CASE("KvCache eviction of large runs (whole Llama-sized heads) equals a naive copy", "[kv]") {
  for (bool fp16_storage : {false, true}) {
    INFO((fp16_storage ? "fp16" : "float"));
    const index_t n = 1500, hd = 128, heads = 2;
    KvCache<float> cf(2, heads, hd, n);
    KvCache<fp16> ch(2, heads, hd, n);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::vector<index_t> idx(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
    auto value = [](index_t l, index_t h, index_t t, index_t i) { return float((l * 7 + h * 3 + t * 5 + i) % 1021) - 510.f; };
    auto run = [&](auto& cache) {
      using T = std::decay_t<decltype(cache.keys(0)(0, 0, 0))>;
      cache.append(n, pos.data(), idx.data());
      for (index_t l = 0; l < 2; ++l)
        for (index_t h = 0; h < heads; ++h)
          for (index_t t = 0; t < n; ++t)
            for (index_t i = 0; i < hd; ++i) {
              cache.keys(l)(h, t, i) = from_float<T>(value(l, h, t, i));
              cache.values(l)(h, t, i) = from_float<T>(-value(l, h, t, i));
            }
      const std::vector<TokenRange> drop{{3, 20}, {100, 101}, {400, 777}, {1490, 1500}};
      cache.evict(drop);
      std::vector<index_t> kept;
      for (index_t t = 0; t < n; ++t) {
        bool gone = false;
        for (const auto& r : drop) gone = gone || (t >= r.begin && t < r.end);
        if (!gone) kept.push_back(t);
      }
      REQUIRE(cache.size() == index_t(kept.size()));
      bool same = true;
      for (std::size_t s = 0; s < kept.size(); ++s) {
        same = same && cache.positions()[s] == kept[s] && cache.token_index()[s] == kept[s];
        for (index_t l = 0; l < 2; ++l)
          for (index_t h = 0; h < heads; ++h)
            for (index_t i = 0; i < hd; ++i)
              same = same && to_float(cache.keys(l)(h, index_t(s), i)) == value(l, h, kept[s], i) &&
                     to_float(cache.values(l)(h, index_t(s), i)) == -value(l, h, kept[s], i);
      }
      CHECK(same);
    };
    if (fp16_storage) run(ch);
    else run(cf);
  }
}


TEST_CASE("KvCache<qint8> evicts and gathers data and scales like a naive copy", "[kv][kv_types]") {
  const index_t n = 300, hd = 96, heads = 2;
  KvCache<qint8> cache(2, heads, hd, n);
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  cache.append(n, pos.data(), idx.data());
  auto row = [&](index_t l, index_t h, index_t t, bool v) {
    std::vector<float> r(static_cast<std::size_t>(hd));
    for (index_t i = 0; i < hd; ++i) r[std::size_t(i)] = float((l * 7 + h * 3 + t * 5 + i) % 23) - 11.f + (v ? 0.5f : 0.f);
    return r;
  };
  for (index_t l = 0; l < 2; ++l)
    for (index_t h = 0; h < heads; ++h)
      for (index_t t = 0; t < n; ++t) {
        store_row(cache.keys(l), h, t, row(l, h, t, false).data());
        store_row(cache.values(l), h, t, row(l, h, t, true).data());
      }
  CHECK(cache.bytes_used() == std::size_t(2 * 2 * heads * n) * (hd + sizeof(float)));
  cache.evict({{0, 3}, {50, 120}, {299, 300}});
  std::vector<index_t> kept;
  for (index_t t = 0; t < n; ++t)
    if (!(t < 3 || (t >= 50 && t < 120) || t == 299)) kept.push_back(t);
  REQUIRE(cache.size() == index_t(kept.size()));
  bool same = true;
  for (std::size_t s = 0; s < kept.size(); ++s)
    for (index_t l = 0; l < 2; ++l)
      for (index_t h = 0; h < heads; ++h)
        for (bool v : {false, true}) {
          const auto want = row(l, h, kept[s], v);
          std::vector<qint8> qq(static_cast<std::size_t>(hd));
          const float sc = kernels::quantize_row(want.data(), qq.data(), hd);
          const auto view = v ? cache.values(l) : cache.keys(l);
          same = same && view.scale(h, index_t(s)) == sc && cache.token_index()[s] == kept[s];
          for (index_t i = 0; i < hd; ++i) same = same && view(h, index_t(s), i).v == qq[std::size_t(i)].v;
        }
  CHECK(same);
  const float s5 = cache.keys(1).scale(1, 5);
  cache.gather({5, 9});
  CHECK(cache.size() == 2);
  CHECK(cache.keys(1).scale(1, 0) == s5);
}


TEST_CASE("cell caches: free cells are reused first; bad metadata is refused by name", "[cells][errors]") {
  std::vector<std::int64_t> pos{0, 1, -1, 3, -1, -1};
  const CellMeta meta{pos.data(), nullptr, 6};
  index_t slots[3] = {-7, -7, -7};
  CHECK(cells::find_free(meta, 3, slots));
  CHECK((slots[0] == 2 && slots[1] == 4 && slots[2] == 5));
  index_t more[4] = {-7, -7, -7, -7};
  CHECK_FALSE(cells::find_free(meta, 4, more));
  CHECK(more[0] == -7);
  CHECK(cells::find_free(meta, 2, more, 3));  // from cell 3 on
  CHECK((more[0] == 4 && more[1] == 5 && more[2] == -7));
  CHECK_FALSE(cells::find_free(meta, 3, more, 3));
  CHECK_THROWS_WITH(cells::find_free(meta, 1, more, 7), Contains("start cell 7 is outside [0, 6]"));
  CHECK_THROWS_WITH(cells::free_range(meta, 4, 7), Contains("[4, 7) is outside the 6 cells"));
  CHECK(pos == std::vector<std::int64_t>{0, 1, -1, 3, -1, -1});

  // Metadata shorter than the cache: a named error, output untouched.
  const auto k = test::random_vector(8 * 64, 1);
  const auto q = test::random_vector(2 * 64, 2);
  std::vector<float> out(q.size(), 7.f);
  std::int64_t qp = 10;
  Workspace ws;
  CHECK_THROWS_WITH(attention(HeadsView<const float>::contiguous(q.data(), 2, 1, 64),
                              HeadsView<const float>::token_major(k.data(), 8, 1, 64),
                              HeadsView<const float>::token_major(k.data(), 8, 1, 64), CellCausal{meta, &qp, 1, 0},
                              HeadsView<float>::contiguous(out.data(), 2, 1, 64), {}, ws),
                    Contains("the cell metadata covers 6 cells but the cache has 8"));
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.f; }));
}

}  // namespace test_kv_kv_cache
