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

TEST_CASE("span tracker rollback equals replaying the stream without the rolled-back tokens", "[fold]") {
  // A stream with spans; checkpoints at every point (ordinary token, inside a span, right
  // after <CL> and after <CR>); draft tokens pushed (including sentinels), then rolled back, then
  // other tokens: everything the tracker reports equals a tracker that saw only the kept ones.
  const std::vector<std::int64_t> stream{5, 6, 126, 7, 8, 127, 9, 126, 10, 11, 127, 12, 13};
  const std::vector<std::int64_t> draft{126, 20, 21}, draft2{22, 127, 23}, after{30, 126, 31, 127, 32};
  for (std::size_t cut = 0; cut <= stream.size(); ++cut) {
    INFO("checkpoint after " << cut << " tokens");
    fold::SpanTracker tr(126, 127, 128), replay(126, 127, 128);
    std::vector<std::int64_t> pos(64), rpos(64);
    tr.push(stream.data(), index_t(cut), pos.data());
    const auto cp = tr.checkpoint();
    const bool open = tr.span_open();
    // draft tokens that keep the stream valid: inside an open span only ordinary and <CR>
    const auto& d = open ? draft2 : draft;
    tr.push(d.data(), index_t(d.size()), pos.data());
    tr.rollback(cp);
    CHECK(tr.size() == index_t(cut));
    const auto& cont = open ? std::vector<std::int64_t>{40, 127, 41} : after;
    tr.push(cont.data(), index_t(cont.size()), pos.data());
    std::vector<std::int64_t> kept(stream.begin(), stream.begin() + std::ptrdiff_t(cut));
    kept.insert(kept.end(), cont.begin(), cont.end());
    std::vector<std::int64_t> all_pos(kept.size());
    replay.push(kept.data(), index_t(kept.size()), all_pos.data());
    CHECK(std::equal(pos.begin(), pos.begin() + std::ptrdiff_t(cont.size()), all_pos.end() - std::ptrdiff_t(cont.size())));
    REQUIRE(tr.size() == replay.size());
    for (index_t t = 0; t < tr.size(); ++t) {
      CHECK(tr.roles()[std::size_t(t)].role == replay.roles()[std::size_t(t)].role);
      CHECK(tr.roles()[std::size_t(t)].span == replay.roles()[std::size_t(t)].span);
      CHECK(tr.evictable(t) == replay.evictable(t));
    }
    CHECK(tr.closed_spans() == replay.closed_spans());
    CHECK(tr.span_open() == replay.span_open());
    for (std::int32_t j = 0; j < replay.closed_spans(); ++j) CHECK(tr.span_begin(j) == replay.span_begin(j));
  }
  // A checkpoint past the stream, or of another stream: named, and nothing changes.
  fold::SpanTracker a(126, 127, 128), b(126, 127, 128);
  std::vector<std::int64_t> p(16);
  a.push(stream.data(), 4, p.data());
  b.push(stream.data(), 9, p.data());
  CHECK_THROWS_WITH(a.rollback(b.checkpoint()), Contains("the checkpoint is at token 9, the tracker holds 4"));
  fold::SpanTracker c(126, 127, 128);
  const std::vector<std::int64_t> other{5, 6, 7, 8};
  c.push(other.data(), 4, p.data());
  auto cp = c.checkpoint();
  CHECK_THROWS_WITH(b.rollback(cp), Contains("does not describe this stream at token 4"));
  CHECK(b.size() == 9);
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
