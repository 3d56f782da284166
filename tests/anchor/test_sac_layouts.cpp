// SAC in every KV layout: every sac fixture through the host in contiguous, cell and paged caches.
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <ctxcomp/io/safetensors.hpp>

#include "common.hpp"
#include "kv_storage.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_anchor_sac_layouts {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using test::kLayouts;
using test::layer_kv;

TEST_CASE("every sac fixture through the host in every KV layout", "[layouts][sac][fixtures]") {
  const auto model = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
  const auto& c = model.config;
  for (const char* name : {"sac_basic", "sac_multichunk", "sac_ratio5", "sac_anchor_bidir_multichunk"})
    for (auto layout : kLayouts) {
      INFO(name << " in " << host::kv_layout_name(layout));
      auto st = io::SafeTensors::open(test::fixtures_dir() + "/sac/" + name + ".safetensors");
      const auto ids = st.read<std::int64_t>("input_ids"), targets = st.read<std::int64_t>("lm_target_ids");
      const auto roles = st.read<float>("role_tokens"), special = st.read<float>("special_tokens");
      const auto plan = anchor::AnchorPlan::uniform(index_t(ids.size()), std::stoll(st.meta("chunk_size")),
                                                    std::stoll(st.meta("compress_ratio")));
      const auto mask = st.meta("mask") == "anchor" ? anchor::ChunkMask::Anchor : anchor::ChunkMask::Full;
      host::LlamaHost<float> h(model);
      const index_t t = index_t(targets.size());
      host::with_kv_layout<float>(layout, KvShape{c.layers, c.kv_heads, c.head_dim}, plan.anchor_count() + t + 1, 4,
                                  [&](auto& cache) {
        const auto rv = matrix_view<const float>(roles.data(), index_t(roles.size()) / c.hidden, c.hidden);
        REQUIRE(host::sac_compress(h, plan, ids.data(), rv, mask, cache) == plan.anchor_count());
        std::vector<std::int64_t> pos;
        for (index_t s : kv::logical_order(cache)) pos.push_back(cache.positions()[s]);
        CHECK(pos == st.read<std::int64_t>("anchor_position_ids"));
        for (index_t l = 0; l < c.layers; ++l) {
          const auto k = test::layer_kv(cache, l, false), v = test::layer_kv(cache, l, true);
          const auto ek = st.read<double>("layer" + std::to_string(l) + "_k");
          const auto ev = st.read<double>("layer" + std::to_string(l) + "_v");
          REQUIRE(k.size() == ek.size());
          CHECK(test::relative_error(k.data(), ek.data(), k.size()) <= 1e-5);
          CHECK(test::relative_error(v.data(), ev.data(), v.size()) <= 1e-5);
        }
        const auto logits = host::sac_decode(h, plan, cache, special.data() + c.hidden, targets.data(), t);
        const auto expect = st.read<double>("decode_logits");
        REQUIRE(logits.size() == expect.size());
        CHECK(test::relative_error(logits.data(), expect.data(), logits.size()) <= 1e-5);
        CHECK(cache.size() == plan.anchor_count());  // the decoded tokens were dropped again
      });
    }
}

}  // namespace test_anchor_sac_layouts
