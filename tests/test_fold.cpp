// Sentinel-token folding: KvCache eviction against a naive copy, every sentinel fixture through
// the reference host (positions exactly; logits and folded K/V vs float64), batch vs per-span
// folding, decoding from the folded cache vs the unfolded cache under the sentinel mask, and
// errors that leave the cache unchanged.
#include <cstring>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "fixture_checks.hpp"
#include "threads.hpp"

using namespace ctxcomp;
using Catch::Matchers::Contains;
using test::layer_kv;

namespace {
const char* kCases[] = {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"};
std::string llama_dir() { return test::fixtures_dir() + "/models/llama"; }

}  // namespace

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

TEST_CASE("span tracker positions and errors", "[fold]") {
  fold::SpanTracker spans(126, 127, 128);
  for (const char* c : kCases) {
    INFO(c);
    auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/" + c + ".safetensors");
    const auto ids = st.read<std::int64_t>("input_ids");
    fold::SpanTracker tr(std::stoll(st.meta("cl_id")), std::stoll(st.meta("cr_id")), 128);
    std::vector<std::int64_t> pos(ids.size());
    tr.push(ids.data(), index_t(ids.size()), pos.data());
    CHECK(pos == st.read<std::int64_t>("position_ids"));
  }
  std::vector<std::int64_t> p(8);
  std::vector<std::int64_t> cr_first{5, 127, 6};
  CHECK_THROWS_WITH(spans.push(cr_first.data(), 3, p.data()), Contains("<CR> at index 1 closes no open span"));
  std::vector<std::int64_t> nested{126, 5, 126};
  CHECK_THROWS_WITH(spans.push(nested.data(), 3, p.data()), Contains("<CL> at index 2"));
  std::vector<std::int64_t> oov{5, 300};
  CHECK_THROWS_WITH(spans.push(oov.data(), 2, p.data()), Contains("token id 300 at index 1 is outside the vocabulary"));
  CHECK(spans.size() == 0);  // nothing appended by failed pushes
  std::vector<std::int64_t> untouched(8, -7);
  std::vector<std::int64_t> late_error{5, 6, 7, 127};  // valid tokens, then a <CR> that closes nothing
  CHECK_THROWS_WITH(spans.push(late_error.data(), 4, untouched.data()), Contains("<CR> at index 3"));
  CHECK(untouched == std::vector<std::int64_t>(8, -7));  // positions are written only after validation
  CHECK(spans.size() == 0);
  CHECK_THROWS_WITH(fold::SpanTracker(3, 3), Contains("both 3"));
}

TEST_CASE("every sentinel fixture through the host with folding", "[fold][fixtures]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  for (const char* c : kCases)
    for (auto schedule : {host::FoldSchedule::EverySpan, host::FoldSchedule::AtEnd}) {
      INFO(c << (schedule == host::FoldSchedule::EverySpan ? ": fold after every span" : ": fold at the end"));
      const double err = test::check_fold_case(model, test::fixtures_dir() + "/sentinel/" + c + ".safetensors", schedule);
      if (schedule == host::FoldSchedule::EverySpan) UNSCOPED_INFO(c << ": logits relative error vs float64 " << err);
    }
}

TEST_CASE("decoding from the folded cache equals decoding from the full cache under the sentinel mask", "[fold]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors");
  auto ids = st.read<std::int64_t>("input_ids");
  const std::vector<std::int64_t> more{5, 126, 17, 18, 127, 40, 41};  // continues with one more span
  host::LlamaHost<float> a(model), b(model);
  auto folded = a.make_cache(64), full = b.make_cache(64);
  fold::SpanTracker sa(126, 127, 128), sb(126, 127, 128);
  host::run_with_folding(a, ids.data(), index_t(ids.size()), sa, folded, host::FoldSchedule::EverySpan);
  // The unfolded run: same segments, never evicted (the mask alone hides the spans).
  std::vector<std::int64_t> pos(ids.size());
  sb.push(ids.data(), index_t(ids.size()), pos.data());
  std::vector<index_t> tix(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) tix[i] = index_t(i);
  std::vector<float> x(ids.size() * 64);
  b.embed(ids.data(), index_t(ids.size()), matrix_view(x.data(), index_t(ids.size()), 64));
  b.forward(matrix_view(x.data(), index_t(ids.size()), 64), pos.data(), tix.data(), sb.mask(0, full), full);
  CHECK(folded.size() < full.size());
  // Decode token by token from both.
  for (std::size_t i = 0; i < more.size(); ++i) {
    std::vector<float> la(128), lb(128), xa(64), xb(64);
    std::int64_t pa, pb;
    sa.push(&more[i], 1, &pa);
    sb.push(&more[i], 1, &pb);
    REQUIRE(pa == pb);
    const index_t t = sa.size() - 1;
    a.embed(&more[i], 1, matrix_view(xa.data(), 1, 64));
    b.embed(&more[i], 1, matrix_view(xb.data(), 1, 64));
    a.forward(matrix_view(xa.data(), 1, 64), &pa, &t, sa.mask(t, folded), folded);
    b.forward(matrix_view(xb.data(), 1, 64), &pb, &t, sb.mask(t, full), full);
    a.logits(matrix_view<const float>(xa.data(), 1, 64), matrix_view(la.data(), 1, 128));
    b.logits(matrix_view<const float>(xb.data(), 1, 64), matrix_view(lb.data(), 1, 128));
    INFO("decode step " << i);
    CHECK(test::relative_error(la.data(), lb.data(), la.size()) <= 1e-5);
    fold::fold(folded, sa);
  }
  CHECK(folded.size() < full.size());
}

TEST_CASE("folding errors leave the cache unchanged", "[fold][errors]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  host::LlamaHost<float> h(model);
  auto cache = h.make_cache(64);
  fold::SpanTracker spans(126, 127, 128);
  const std::vector<std::int64_t> good{1, 2, 126, 3, 127, 4};
  host::run_with_folding(h, good.data(), 6, spans, cache, host::FoldSchedule::EverySpan);
  const index_t size = cache.size();
  const auto k0 = layer_kv(cache, 0, false);
  const std::vector<std::int64_t> bad{5, 127};
  CHECK_THROWS_WITH(host::run_with_folding(h, bad.data(), 2, spans, cache, host::FoldSchedule::EverySpan),
                    Contains("<CR> at index 7 closes no open span"));
  const std::vector<std::int64_t> oov{5, 128};
  CHECK_THROWS_WITH(host::run_with_folding(h, oov.data(), 2, spans, cache, host::FoldSchedule::EverySpan),
                    Contains("outside the vocabulary"));
  CHECK(cache.size() == size);
  CHECK(layer_kv(cache, 0, false) == k0);
  CHECK(spans.size() == 6);
  auto small = h.make_cache(4);
  fold::SpanTracker s2(126, 127, 128);
  CHECK_THROWS_WITH(host::run_with_folding(h, good.data(), 6, s2, small, host::FoldSchedule::AtEnd), Contains("do not fit"));
  CHECK(small.size() == 0);
}

TEST_CASE("folding while streaming is bit-identical on 1 and 2 threads", "[fold][threads]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors");
  const auto ids = st.read<std::int64_t>("input_ids");
  host::LlamaHost<float> a(model), b(model);
  auto ca = a.make_cache(64), cb = b.make_cache(64);
  fold::SpanTracker sa(126, 127, 128), sb(126, 127, 128);
  const auto la = host::run_with_folding(a, ids.data(), index_t(ids.size()), sa, ca, host::FoldSchedule::EverySpan);
  const auto lb = host::run_with_folding(b, ids.data(), index_t(ids.size()), sb, cb, host::FoldSchedule::EverySpan,
                                         test::two_threads());
  CHECK(la == lb);
  REQUIRE(ca.size() == cb.size());
  for (index_t l = 0; l < ca.layers(); ++l) {
    CHECK(layer_kv(ca, l, false) == layer_kv(cb, l, false));
    CHECK(layer_kv(ca, l, true) == layer_kv(cb, l, true));
  }
}
