// Sentinel-token folding: KvCache eviction against a naive copy, every sentinel fixture through
// the reference host (positions exactly; logits and folded K/V vs float64), batch vs per-span
// folding, decoding from the folded cache vs the unfolded cache under the sentinel mask, and
// errors that leave the cache unchanged.
#include <cstring>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_fold_fold {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using test::layer_kv;

namespace {
const char* kCases[] = {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"};
std::string llama_dir() { return test::fixtures_dir() + "/models/llama"; }

}  // namespace



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

}  // namespace test_fold_fold
