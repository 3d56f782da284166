// SAC anchor compression: the uniform anchor rule against a literal transcription of the
// official loop, every sac fixture through the API and the CLI (anchor positions exactly; K/V
// and decode logits vs float64), separate compressing weights (the official LoRA'd copy), the
// anchor mask's split kernel against the reference, and errors that leave the cache unchanged.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_anchor_sac {

using namespace ctxcomp;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

using test::layer_kv;
using namespace ctxcomp::test::sac;

namespace {
/// The official anchor loop, transcribed literally (1-based positions, Python's range and //).
std::vector<std::int64_t> official_anchor_positions(std::int64_t n, std::int64_t chunk, std::int64_t r) {
  std::vector<std::int64_t> out;
  for (std::int64_t s = 0; s < n; s += chunk) {
    const std::int64_t e = std::min(n, s + chunk);
    std::int64_t start = s + 1 + (r - 1) / 2;
    if (start >= e + 1) start = s + 1;
    for (std::int64_t p = start; p < e + 1; p += r) out.push_back(p);
  }
  return out;
}

}  // namespace

TEST_CASE("uniform anchors follow the official rule", "[sac]") {
  for (const char* c : kCases) {
    INFO(c);
    Fixture f(c);
    const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
    CHECK(plan.anchor_position_ids() == f.st.read<std::int64_t>("anchor_position_ids"));
    CHECK(plan.decode_position() == std::stoll(f.st.meta("end_idx")));
  }
  for (index_t n : {1, 2, 7, 24, 25, 61, 100, 513})
    for (index_t chunk : {1, 3, 24, 64, 512})
      for (index_t r : {1, 2, 4, 5, 8, 32, 100}) {
        INFO("n " << n << " chunk " << chunk << " ratio " << r);
        const auto plan = anchor::AnchorPlan::uniform(n, chunk, r);
        REQUIRE(plan.anchor_position_ids() == official_anchor_positions(n, chunk, r));
        index_t total = 0;
        for (index_t k = 0; k < plan.chunks(); ++k) {
          const auto [a0, a1] = plan.chunk_anchors(k);
          const auto [s, e] = plan.chunk(k);
          CHECK(a1 > a0);  // the uniform rule gives every chunk an anchor
          for (index_t a = a0; a < a1; ++a) CHECK((plan.anchors()[std::size_t(a)] >= s && plan.anchors()[std::size_t(a)] < e));
          total += a1 - a0;
        }
        CHECK(total == plan.anchor_count());
      }
}

TEST_CASE("anchor plans reject bad input with named errors", "[sac][errors]") {
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(10, 4, 0), Contains("compression ratio (0) must be positive"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(10, 0, 4), Contains("chunk_size (0) must be positive"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(0, 4, 4), Contains("the context is empty"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::from_tokens(10, 4, {1, 1}), Contains("strictly increasing"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::from_tokens(10, 4, {3, 10}), Contains("outside the context [0, 10)"));
  const auto p = anchor::AnchorPlan::from_tokens(10, 4, {1, 2, 9});
  CHECK(p.chunks() == 3);
  CHECK((p.chunk_anchors(0).begin == 0 && p.chunk_anchors(0).end == 2));
  CHECK(p.chunk_anchors(1).begin == p.chunk_anchors(1).end);  // a chunk without anchors
  CHECK((p.chunk_anchors(2).begin == 2 && p.chunk_anchors(2).end == 3));
  CHECK(p.anchor_position_ids() == std::vector<std::int64_t>{2, 3, 10});
}

TEST_CASE("every sac fixture through the host", "[sac][fixtures]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  for (const char* c : kCases) {
    INFO(c);
    Fixture f(c);
    host::LlamaHost<float> h(model);
    const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
    auto cache = h.make_cache(plan.anchor_count() + index_t(f.targets.size()) + 1);
    const index_t kept = host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache);
    REQUIRE(kept == plan.anchor_count());
    REQUIRE(cache.size() == kept);
    CHECK(std::vector<std::int64_t>(cache.positions(), cache.positions() + kept) ==
          f.st.read<std::int64_t>("anchor_position_ids"));
    for (index_t i = 0; i < kept; ++i) CHECK(cache.token_index()[i] == plan.anchors()[std::size_t(i)]);
    f.check_cache(cache, model.config.layers);
    const auto logits =
        host::sac_decode(h, plan, cache, f.special.data() + 64, f.targets.data(), index_t(f.targets.size()));
    const auto expect = f.st.read<double>("decode_logits");
    REQUIRE(logits.size() == expect.size());
    const double err = test::relative_error(logits.data(), expect.data(), logits.size());
    CHECK(err <= 1e-5);
    UNSCOPED_INFO(c << ": decode logits relative error vs float64 " << err << " (official fp32 run "
           << test::relative_error(f.st.read<float>("decode_logits_f32run").data(), expect.data(), expect.size())
           << ")");
    CHECK(cache.size() == kept);  // decoding leaves the compressed cache as it was
  }
}

TEST_CASE("a position offset shifts every SAC position and keeps the fixture's logits", "[sac][fixtures]") {
  // A document after `offset` cached positions: RoPE sees only position differences inside a
  // chunk and between the decoded inputs and the anchors, so the decode logits stay the
  // official ones (within the fixtures' 1e-5; RoPE's angles are evaluated in double); layer 0's
  // V does not see positions at all (bit for bit), its K is rotated further.
  const auto model = host::LlamaModel<float>::load(llama_dir());
  for (const char* c : kCases) {
    INFO(c);
    Fixture f(c);
    host::LlamaHost<float> h(model);
    const auto base = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
    auto shifted = base;
    const std::int64_t offset = 1000;
    shifted.set_position_offset(offset);
    CHECK(shifted.decode_position() == base.decode_position() + offset);
    KvCache<float> ca = h.make_cache(base.anchor_count() + index_t(f.targets.size()) + 1), cb = h.make_cache(ca.capacity());
    host::sac_compress(h, base, f.ids.data(), f.role_view(), f.mask, ca);
    host::sac_compress(h, shifted, f.ids.data(), f.role_view(), f.mask, cb);
    REQUIRE(cb.size() == ca.size());
    const auto expect_pos = shifted.anchor_position_ids();
    for (index_t i = 0; i < cb.size(); ++i) {
      CHECK(cb.positions()[i] == ca.positions()[i] + offset);
      CHECK(cb.positions()[i] == expect_pos[std::size_t(i)]);
    }
    const auto va = ca.values(0), vb = cb.values(0), ka = ca.keys(0), kb = cb.keys(0);
    bool v_same = true, k_differs = false;
    for (index_t hh = 0; hh < va.heads; ++hh)
      for (index_t t = 0; t < ca.size(); ++t) {
        v_same &= std::equal(va.row(hh, t), va.row(hh, t) + va.head_dim, vb.row(hh, t));
        k_differs |= !std::equal(ka.row(hh, t), ka.row(hh, t) + ka.head_dim, kb.row(hh, t));
      }
    CHECK(v_same);
    CHECK(k_differs);
    const auto logits =
        host::sac_decode(h, shifted, cb, f.special.data() + 64, f.targets.data(), index_t(f.targets.size()));
    const auto expect = f.st.read<double>("decode_logits");
    REQUIRE(logits.size() == expect.size());
    CHECK(test::relative_error(logits.data(), expect.data(), logits.size()) <= 1e-5);
  }
  auto p = anchor::AnchorPlan::uniform(8, 4, 2);
  CHECK_THROWS_WITH(p.set_position_offset(-1), Contains("offset (-1) must be >= 0"));
  CHECK(p.position_offset() == 0);
}

TEST_CASE("sac compresses with its own weights and decodes with the host's", "[sac]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  Fixture f("sac_multichunk");
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  const auto& c = model.config;
  // A LoRA on q_proj / v_proj merged into copies: W + B A.
  auto merged = [&](const WeightView<float>& w, float scale, unsigned seed) {
    const index_t rank = 4;
    const auto A = test::random_vector(std::size_t(rank * w.in_features), seed);
    const auto B = test::random_vector(std::size_t(w.out_features * rank), seed + 1);
    std::vector<float> out(w.data, w.data + w.out_features * w.in_features);
    for (index_t o = 0; o < w.out_features; ++o)
      for (index_t i = 0; i < w.in_features; ++i)
        for (index_t r = 0; r < rank; ++r)
          out[std::size_t(o * w.in_features + i)] += scale * B[std::size_t(o * rank + r)] * A[std::size_t(r * w.in_features + i)];
    return out;
  };
  for (float scale : {0.f, 0.05f}) {
    INFO("LoRA scale " << scale);
    std::vector<std::vector<float>> owned;
    auto layers = model.layers;
    for (index_t l = 0; l < c.layers; ++l) {
      owned.push_back(merged(layers[std::size_t(l)].q, scale, 10 + unsigned(l)));
      layers[std::size_t(l)].q.data = owned.back().data();
      owned.push_back(merged(layers[std::size_t(l)].v, scale, 20 + unsigned(l)));
      layers[std::size_t(l)].v.data = owned.back().data();
    }
    host::LlamaHost<float> h(model);
    auto cache = h.make_cache(64);
    host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache, SerialExecutor{}, &layers);
    if (scale == 0.f) {  // a zero product is the fixtures' case: same cache, same decoding
      f.check_cache(cache, c.layers);
      const auto logits = host::sac_decode(h, plan, cache, f.special.data() + 64, f.targets.data(), 6);
      const auto expect = f.st.read<double>("decode_logits");
      CHECK(test::relative_error(logits.data(), expect.data(), logits.size()) <= 1e-5);
    } else {
      // Layer 0's keys do not depend on q/v weights; its values and all of layer 1 do.
      const auto k0 = layer_kv(cache, 0, false), v0 = layer_kv(cache, 0, true), k1 = layer_kv(cache, 1, false);
      const auto ek0 = f.st.read<double>("layer0_k"), ev0 = f.st.read<double>("layer0_v"), ek1 = f.st.read<double>("layer1_k");
      CHECK(test::relative_error(k0.data(), ek0.data(), k0.size()) <= 1e-5);
      CHECK(test::relative_error(v0.data(), ev0.data(), v0.size()) > 1e-3);
      CHECK(test::relative_error(k1.data(), ek1.data(), k1.size()) > 1e-3);
    }
  }
}

TEST_CASE("sac results do not depend on the thread count", "[sac][threads]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  Fixture f("sac_anchor_bidir_multichunk");
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  host::LlamaHost<float> a(model), b(model);
  auto ca = a.make_cache(32), cb = b.make_cache(32);
  host::sac_compress(a, plan, f.ids.data(), f.role_view(), f.mask, ca);
  host::sac_compress(b, plan, f.ids.data(), f.role_view(), f.mask, cb, test::two_threads());
  for (index_t l = 0; l < 2; ++l) {
    CHECK(layer_kv(ca, l, false) == layer_kv(cb, l, false));
    CHECK(layer_kv(ca, l, true) == layer_kv(cb, l, true));
  }
}

TEST_CASE("sac errors are named and leave the cache unchanged", "[sac][errors]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  Fixture f("sac_basic");
  host::LlamaHost<float> h(model);
  auto cache = h.make_cache(64);
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache);
  const index_t size = cache.size();
  const auto k0 = layer_kv(cache, 0, false);
  // 24 tokens at ratio 1: 24 anchors in one chunk, 16 role embeddings.
  const auto dense = anchor::AnchorPlan::uniform(f.n(), f.chunk, 1);
  CHECK_THROWS_WITH(host::sac_compress(h, dense, f.ids.data(), f.role_view(), f.mask, cache),
                    Contains("a chunk has 24 anchors but there are only 16 role (anchor) embeddings"));
  // A bad token id in the second chunk fails after the first chunk was kept: rolled back.
  auto ids = f.ids;
  ids.insert(ids.end(), f.ids.begin(), f.ids.end());
  ids[30] = 500;
  const auto two = anchor::AnchorPlan::uniform(index_t(ids.size()), f.chunk, f.ratio);
  CHECK_THROWS_WITH(host::sac_compress(h, two, ids.data(), f.role_view(), f.mask, cache),
                    Contains("chunk 1 (tokens [24, 48)): LlamaHost::embed: token id 500 at index 6 is outside the vocabulary"));
  auto small = h.make_cache(3);
  CHECK_THROWS_WITH(host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, small),
                    Contains("6 anchors do not fit in the output cache"));
  CHECK(small.size() == 0);
  CHECK_THROWS_WITH(host::sac_compress(h, plan, f.ids.data(), matrix_view<const float>(f.roles.data(), 16, 32), f.mask, cache),
                    Contains("role embeddings have 32 features, the hidden size is 64"));
  CHECK(cache.size() == size);
  CHECK(layer_kv(cache, 0, false) == k0);
}

using test::tmp;
using Run = test::CliRun;



TEST_CASE("sac in bf16 compute: every fixture within the bf16 budget; the host keeps its setting",
          "[sac][bf16][fixtures]") {
  const auto model = host::LlamaModel<float>::load(llama_dir());
  for (const char* c : kCases) {
    INFO(c);
    Fixture f(c);
    host::LlamaHost<float> h(model);
    const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
    auto cache = h.make_cache(plan.anchor_count() + index_t(f.targets.size()) + 1);
    REQUIRE(h.compute() == Compute::fp32);
    host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache, SerialExecutor{}, nullptr, Compute::bf16);
    CHECK(h.compute() == Compute::fp32);  // decoding below runs in fp32
    double worst = 0;
    for (index_t l = 0; l < model.config.layers; ++l)
      for (bool value : {false, true}) {
        const auto got = layer_kv(cache, l, value);
        const auto expect = f.st.read<double>("layer" + std::to_string(l) + (value ? "_v" : "_k"));
        REQUIRE(got.size() == expect.size());
        worst = std::max(worst, test::relative_error(got.data(), expect.data(), got.size()));
      }
    const auto logits =
        host::sac_decode(h, plan, cache, f.special.data() + 64, f.targets.data(), index_t(f.targets.size()));
    const auto expect = f.st.read<double>("decode_logits");
    const double err = test::relative_error(logits.data(), expect.data(), logits.size());
    // The budget for bf16-rounded operands through the host (docs/bf16.md).
    CHECK(worst < 5e-2);
    CHECK(worst > 1e-6);  // really computed in bf16
    CHECK(err < 5e-2);
    UNSCOPED_INFO(c << ": bf16 compute, anchors' K/V relative error vs float64 " << worst << ", decode logits " << err);
  }
}

}  // namespace test_anchor_sac
