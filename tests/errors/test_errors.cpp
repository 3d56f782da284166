// The table of docs/errors.md, row by row: each public entry point given a bad argument reports
// a ctxcomp::Error naming the problem and leaves its outputs and caches as they were. Also the
// regression inputs the fuzzers found (tests/fuzz), and a small file truncated at every offset.
#include <cstring>
#include <fstream>
#include <iterator>

#include <ctxcomp/io/checkpoint.hpp>
#include <ctxcomp/io/icformer_checkpoint.hpp>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_errors_errors {

using namespace ctxcomp;
using Catch::Matchers::Contains;

namespace {
/// A 2-layer fp16 cache of 6 tokens with distinct contents, and a byte copy to compare with.
struct FilledCache {
  KvCache<fp16> cache{2, 2, 8, 16};
  FilledCache() {
    std::vector<std::int64_t> pos = {0, 1, 2, 3, 4, 5};
    std::vector<index_t> idx = {0, 1, 2, 3, 4, 5};
    cache.append(6, pos.data(), idx.data());
    for (index_t l = 0; l < 2; ++l)
      for (index_t h = 0; h < 2; ++h)
        for (index_t t = 0; t < 6; ++t)
          for (index_t i = 0; i < 8; ++i) {
            cache.keys(l).row(h, t)[i] = fp16(float(l * 1000 + h * 100 + t * 10 + i));
            cache.values(l).row(h, t)[i] = fp16(-float(l * 1000 + h * 100 + t * 10 + i));
          }
  }
  std::vector<float> snapshot() const {
    std::vector<float> s;
    for (index_t l = 0; l < 2; ++l)
      for (index_t h = 0; h < 2; ++h)
        for (index_t t = 0; t < cache.size(); ++t)
          for (index_t i = 0; i < 8; ++i)
            s.push_back(float(cache.keys(l).row(h, t)[i])), s.push_back(float(cache.values(l).row(h, t)[i]));
    for (index_t t = 0; t < cache.size(); ++t) s.push_back(float(cache.positions()[t])), s.push_back(float(cache.token_index()[t]));
    return s;
  }
};

void attention_error(index_t heads, index_t kv_heads, index_t q_len, index_t kv_len, index_t d, index_t kv_d,
                     index_t out_heads, const char* message) {
  std::vector<float> q(std::size_t(heads * q_len * d), 0.5f), k(std::size_t(kv_heads * kv_len * kv_d), 0.25f);
  std::vector<float> out(std::size_t(out_heads * q_len * d), 7.f);
  Workspace ws;
  CHECK_THROWS_WITH(attention(HeadsView<const float>::contiguous(q.data(), heads, q_len, d),
                              HeadsView<const float>::contiguous(k.data(), kv_heads, kv_len, kv_d),
                              HeadsView<const float>::contiguous(k.data(), kv_heads, kv_len, kv_d), Causal(kv_len - q_len),
                              HeadsView<float>::contiguous(out.data(), out_heads, q_len, d), {}, ws),
                    Contains(message));
  CHECK(out == std::vector<float>(out.size(), 7.f));
}
}  // namespace

TEST_CASE("errors table: attention shapes", "[errors]") {
  attention_error(6, 4, 3, 3, 8, 8, 6, "is not a multiple of kv_heads");    // kv_heads not dividing heads
  attention_error(4, 2, 3, 3, 8, 16, 4, "head_dim");                        // mismatched head_dim
  attention_error(4, 2, 3, 3, 8, 8, 2, "out is [2 x 3 x 8] but q is [4 x 3 x 8]");  // output heads differ
  attention_error(4, 2, 5, 3, 8, 8, 4, "Causal q_offset (-2) is negative");  // more queries than keys
  attention_error(4, 2, 0, 3, 8, 8, 4, "q is empty");                       // an empty query
  attention_error(4, 2, 3, 3, 8, 16, 4, "k head_dim (16) differs from q head_dim (8)");
}

TEST_CASE("errors table: KV cache", "[errors][kv]") {
  FilledCache f;
  const auto saved = f.snapshot();
  std::vector<std::int64_t> pos(20, 9);
  std::vector<index_t> idx(20), stale(20, 3);  // increasing after the cache's 5; all 3 (not increasing)
  for (index_t i = 0; i < 20; ++i) idx[std::size_t(i)] = 10 + i;
  CHECK_THROWS_WITH(f.cache.append(11, pos.data(), idx.data()), Contains("do not fit"));
  CHECK_THROWS_WITH(f.cache.append(1, pos.data(), stale.data()), Contains("token indices must increase"));
  const index_t* volatile no_idx = nullptr;  // opaque: GCC would warn about the unreachable copy
  CHECK_THROWS_WITH(f.cache.append(1, pos.data(), no_idx), Contains("one is null"));  // was a null dereference
  CHECK_THROWS_WITH(f.cache.evict({{2, 4}, {3, 5}}), Contains("overlaps"));             // overlapping spans
  CHECK_THROWS_WITH(f.cache.evict({{4, 9}}), Contains("is out of [0, 6)"));              // out of range
  CHECK_THROWS_WITH(f.cache.evict({{4, 2}}), Contains("KvCache::evict"));                // reversed
  CHECK_THROWS_WITH(f.cache.gather({1, 1}), Contains("KvCache::gather"));                // repeated slot
  CHECK_THROWS_WITH(f.cache.truncate(7), Contains("outside [0, 6]"));
  CHECK_THROWS_WITH(KvCache<float>(1, 0, 8, 4), Contains("KvCache"));                   // zero kv heads
  CHECK(f.cache.size() == 6);
  CHECK(f.snapshot() == saved);
}

TEST_CASE("errors table: sentinel spans", "[errors][fold]") {
  fold::SpanTracker t(1, 2, 100);
  std::vector<std::int64_t> ok = {5, 1, 6, 2, 7}, pos(5), out(4, -7);
  t.push(ok.data(), 5, pos.data());
  const auto roles = t.roles();
  const std::vector<std::int64_t> none(4, -7);
  std::vector<std::int64_t> unterminated_then_nested = {1, 8, 1, 9};  // <CL> inside an open span
  std::vector<std::int64_t> stray_close = {8, 2, 9, 9};               // <CR> with no open span
  std::vector<std::int64_t> outside = {8, 100, 9, 9};                 // id outside the vocabulary
  CHECK_THROWS_WITH(t.push(unterminated_then_nested.data(), 4, out.data()), Contains("nested spans"));
  CHECK_THROWS_WITH(t.push(stray_close.data(), 4, out.data()), Contains("closes no open span"));
  CHECK_THROWS_WITH(t.push(outside.data(), 4, out.data()), Contains("outside the vocabulary"));
  CHECK(out == none);
  CHECK(t.size() == 5);
  CHECK(t.closed_spans() == 1);
  CHECK_FALSE(t.span_open());
  CHECK_THROWS_WITH(fold::SpanTracker(3, 3), Contains("both 3"));
  // A sentinel mask that does not cover the queries.
  std::vector<float> q(2 * 3 * 8, 0.5f), out_a(q.size(), 7.f);
  Workspace ws;
  CHECK_THROWS_WITH(attention(HeadsView<const float>::contiguous(q.data(), 2, 3, 8),
                              HeadsView<const float>::contiguous(q.data(), 2, 3, 8),
                              HeadsView<const float>::contiguous(q.data(), 2, 3, 8),
                              SentinelSpans{t.roles().data(), t.size(), 4, nullptr},
                              HeadsView<float>::contiguous(out_a.data(), 2, 3, 8), {}, ws),
                    Contains("SentinelSpans covers 5 tokens"));
  CHECK(out_a == std::vector<float>(out_a.size(), 7.f));
}

TEST_CASE("errors table: anchor plans", "[errors][sac]") {
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(0, 8, 2), Contains("the context is empty"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(10, 0, 2), Contains("chunk_size (0) must be positive"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::uniform(10, 4, 0), Contains("must be positive"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::from_tokens(10, 4, {3, 3}), Contains("strictly increasing"));
  CHECK_THROWS_WITH(anchor::AnchorPlan::from_tokens(10, 4, {10}), Contains("outside the context"));
  // A 1-token context is valid: one chunk, its one token the anchor.
  const auto p = anchor::AnchorPlan::uniform(1, 8, 4);
  CHECK(p.anchors() == std::vector<index_t>{0});
}

TEST_CASE("errors table: config values (fuzz_config regressions)", "[errors][checkpoints]") {
  const std::string f = "config.json";
  // Found by fuzz_config: rope_theta 1e57 was accepted and every fp32 frequency but the first became 0.
  for (double theta : {1e57, 1.0, 0.5, -3.0})
    CHECK_THROWS_WITH(io::rope_from_config(nlohmann::json{{"rope_theta", theta}}, f),
                      Contains("rope_theta") && Contains("must be above 1"));
  // Found by fuzz_config: a RoPE scaling factor of 3e100 was accepted and made frequencies 0.
  const nlohmann::json llama3 = {{"rope_scaling",
                                  {{"rope_type", "llama3"}, {"factor", 3e100}, {"low_freq_factor", 2.0},
                                   {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 28}}}};
  CHECK_THROWS_WITH(io::rope_from_config(llama3, f), Contains("llama3 factor") && Contains("must be in [1, 2^16]"));
  for (double factor : {3e100, 1e-300, 0.0})
    CHECK_THROWS_WITH(io::rope_from_config(nlohmann::json{{"rope_scaling", {{"type", "linear"}, {"factor", factor}}}}, f),
                      Contains("linear factor") && Contains("must be in [2^-16, 2^16]"));
  CHECK(io::rope_from_config(nlohmann::json{{"rope_scaling", {{"type", "linear"}, {"factor", 4.0}}}}, f).linear_scaling ==
        4.0f);
  nlohmann::json j = {{"hidden_size", 64}, {"num_attention_heads", 4}, {"num_key_value_heads", 3},
                      {"intermediate_size", 128}, {"num_hidden_layers", 2}};
  CHECK_THROWS_WITH(io::transformer_dims(j, f), Contains("not a multiple of num_key_value_heads"));
  j["num_key_value_heads"] = 2;
  j["num_hidden_layers"] = -1;
  CHECK_THROWS_WITH(io::transformer_dims(j, f), Contains("num_hidden_layers (-1) must be positive"));
  j["num_hidden_layers"] = 2;
  j["head_dim"] = 0;
  CHECK_THROWS_WITH(io::transformer_dims(j, f), Contains("head_dim (0) must be positive"));
  j.erase("head_dim");
  j["rms_norm_eps"] = -1.0;
  CHECK_THROWS_WITH(io::transformer_dims(j, f), Contains("rms_norm_eps"));
  j["rms_norm_eps"] = 1e-6;
  CHECK(io::transformer_dims(j, f).head_dim == 16);
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::config_from_json(j, f), Contains("architecture") || Contains("model_type"));
}

TEST_CASE("errors table: a safetensors file truncated at every offset", "[errors][safetensors]") {
  const std::string path = test::fixtures_dir() + "/sac/sac_basic.safetensors";
  std::ifstream in(path, std::ios::binary);
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() > 8);
  const auto whole = io::SafeTensors::from_bytes(bytes);
  REQUIRE(!whole.tensors().empty());
  // Past the header every cut loses the last tensor's bytes; within it the JSON or its length.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    INFO("truncated to " << n << " of " << bytes.size() << " bytes");
    CHECK_THROWS_AS(io::SafeTensors::from_bytes(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + std::ptrdiff_t(n))),
                    Error);
  }
}

TEST_CASE("errors table: tensors of the wrong dtype or shape", "[errors][safetensors]") {
  const auto st = io::SafeTensors::open(test::fixtures_dir() + "/sac/sac_basic.safetensors");
  CHECK_THROWS_WITH(st.read<std::int64_t>("role_tokens"), Contains("role_tokens"));       // F32 read as integers
  CHECK_THROWS_WITH(st.read<float>("role_tokens", {16, 32}), Contains("[16, 64]"));      // wrong shape
  CHECK_THROWS_WITH(st.read<float>("no_such_tensor"), Contains("no tensor named 'no_such_tensor'"));
}

TEST_CASE("errors table: RoPE, linear, RMSNorm", "[errors][nn]") {
  Rope rope(RopeConfig{}, 8);
  std::vector<float> x(2 * 3 * 8, 0.5f);
  const auto saved = x;
  const auto xv = HeadsView<float>::contiguous(x.data(), 2, 3, 8);
  const std::int64_t past[] = {0, 1, std::int64_t(Rope::kMaxPosition)}, negative[] = {0, -1, 2};
  CHECK_THROWS_WITH(rope.apply(xv, past), Contains("position ids must be in [0, 4194304)"));
  CHECK_THROWS_WITH(rope.apply(xv, negative), Contains("token 1 has -1"));
  CHECK_THROWS_WITH(rope.apply(HeadsView<float>::contiguous(x.data(), 2, 6, 4), negative), Contains("head_dim 4"));
  CHECK(x == saved);
  RopeConfig odd;
  odd.rotary_dim = 5;
  CHECK_THROWS_WITH(Rope(odd, 8), Contains("must be even"));

  std::vector<float> w(6 * 8, 0.1f), y(3 * 6, 7.f);
  Workspace ws;
  const WeightView<float> wv{w.data(), 6, 8};
  CHECK_THROWS_WITH(linear(matrix_view<const float>(x.data(), 3, 7), wv, matrix_view(y.data(), 3, 6), ws),
                    Contains("x has 7 features"));
  CHECK_THROWS_WITH(linear(matrix_view<const float>(x.data(), 3, 8), wv, matrix_view(y.data(), 2, 6), ws),
                    Contains("linear: y is 2 x 6"));
  CHECK(y == std::vector<float>(y.size(), 7.f));
  CHECK_THROWS_WITH(rmsnorm(matrix_view<const float>(x.data(), 3, 8), w.data(), 7, 1e-6f, matrix_view(y.data(), 3, 6)),
                    Contains("rmsnorm: weight has 7"));
  CHECK_THROWS_WITH(rmsnorm(matrix_view<const float>(x.data(), 3, 8), w.data(), 8, -1.f, matrix_view(y.data(), 3, 8)),
                    Contains("eps (-1) must be finite"));
  CHECK(y == std::vector<float>(y.size(), 7.f));
}

TEST_CASE("errors table: IC-Former chunking", "[errors][icformer]") {
  CHECK_THROWS_WITH(digest::Chunking::of(0, 512), Contains("empty context"));
  CHECK_THROWS_WITH(digest::Chunking::of(100, 0), Contains("max_chunk_len (0) must be positive"));
  const auto one = digest::Chunking::of(1, 512);  // a 1-token context is one chunk of one token
  CHECK(one.count == 1);
  CHECK(one.size == 1);
  digest::IcformerConfig bad;
  bad.hidden = 32, bad.heads = 4, bad.kv_heads = 3, bad.head_dim = 8, bad.intermediate = 64, bad.layers = 1;
  CHECK_THROWS_WITH(bad.validate(), Contains("heads (4) is not a multiple of kv_heads (3)"));
}

}  // namespace test_errors_errors
