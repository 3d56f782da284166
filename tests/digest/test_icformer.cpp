// IC-Former against the official fixtures (per layer and whole, plain and chunked), thread-count
// determinism, and the checkpoint loader's errors for malformed checkpoints.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <ctxcomp/digest/prompt.hpp>
#include <ctxcomp/io/icformer_checkpoint.hpp>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_digest_icformer {

using namespace ctxcomp;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {
std::string case_dir(const std::string& c) { return test::fixtures_dir() + "/icformer/" + c; }
}  // namespace

TEST_CASE("IC-Former reproduces the official fixtures layer by layer", "[icformer][fixtures]") {
  for (const char* c : {"icformer_basic", "icformer_gqa_selfattn"}) {
    INFO(c);
    auto ckpt = io::IcformerCheckpoint<float>::load(case_dir(c) + "/model");
    auto st = io::SafeTensors::open(case_dir(c) + "/case.safetensors");
    const auto& cfg = ckpt.config();
    const auto ctx = st.read<float>("context_embeds");
    const auto dig = st.read<float>("digest_embeds");
    const index_t n = index_t(ctx.size()) / cfg.hidden, k = index_t(dig.size()) / cfg.hidden;
    auto enc = ckpt.encoder();
    std::vector<float> h = dig;
    auto hv = matrix_view(h.data(), k, cfg.hidden);
    auto cv = matrix_view<const float>(ctx.data(), n, cfg.hidden);
    auto dv = matrix_view<const float>(dig.data(), k, cfg.hidden);
    // layer{i}_hidden: the states entering layer i; the last one is the output after the final norm.
    for (index_t i = 0; i <= cfg.layers; ++i) {
      if (i == cfg.layers) enc.final_norm(hv);
      const auto expect = st.read<double>("layer" + std::to_string(i) + "_hidden");
      INFO("entering layer " << i);
      CHECK(test::relative_error(h.data(), expect.data(), h.size()) <= 1e-5);
      if (i < cfg.layers) enc.layer(i, cv, dv, hv);
    }
    const auto soft = st.read<double>("soft_prompt");
    CHECK(test::relative_error(h.data(), soft.data(), h.size()) <= 1e-5);

    std::vector<float> out(h.size());
    enc.compress(cv, matrix_view<const float>(dig.data(), k, cfg.hidden), matrix_view(out.data(), k, cfg.hidden));
    const double err = test::relative_error(out.data(), soft.data(), out.size());
    CHECK(err <= 1e-5);
    UNSCOPED_INFO(c << ": relative error vs float64 " << err);
  }
}

TEST_CASE("IC-Former chunked compression reproduces the official fixture", "[icformer][fixtures][threads]") {
  auto ckpt = io::IcformerCheckpoint<float>::load(case_dir("icformer_chunked") + "/model");
  auto st = io::SafeTensors::open(case_dir("icformer_chunked") + "/case.safetensors");
  const auto& cfg = ckpt.config();
  const auto ctx = st.read<float>("context_embeds");
  const auto dig = st.read<float>("digest_embeds");
  const auto soft = st.read<double>("soft_prompt");
  const index_t n = index_t(ctx.size()) / cfg.hidden, k = index_t(dig.size()) / cfg.hidden;
  const index_t max_len = std::stoll(st.meta("max_chunk_len"));
  const auto ch = digest::Chunking::of(n, max_len);
  CHECK(ch.count == 4);
  CHECK(ch.size == 25);
  std::vector<float> out(std::size_t(ch.count * k * cfg.hidden)), out2(out.size());
  auto enc = ckpt.encoder();
  std::vector<index_t> seen;
  enc.compress_chunked(matrix_view<const float>(ctx.data(), n, cfg.hidden), matrix_view<const float>(dig.data(), k, cfg.hidden),
                       max_len, matrix_view(out.data(), ch.count * k, cfg.hidden), SerialExecutor{},
                       [&](index_t done, index_t) { seen.push_back(done); });
  const double err = test::relative_error(out.data(), soft.data(), out.size());
  CHECK(err <= 1e-5);
  UNSCOPED_INFO("icformer_chunked: relative error vs float64 " << err);
  CHECK(seen == std::vector<index_t>{1, 2, 3, 4});
  enc.compress_chunked(matrix_view<const float>(ctx.data(), n, cfg.hidden), matrix_view<const float>(dig.data(), k, cfg.hidden),
                       max_len, matrix_view(out2.data(), ch.count * k, cfg.hidden), test::two_threads());
  CHECK(std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) == 0);
  using Catch::Matchers::Contains;
  std::vector<float> wrong(std::size_t(3 * k * cfg.hidden), 7.f);
  CHECK_THROWS_WITH(enc.compress_chunked(matrix_view<const float>(ctx.data(), n, cfg.hidden),
                                         matrix_view<const float>(dig.data(), k, cfg.hidden), max_len,
                                         matrix_view(wrong.data(), 3 * k, cfg.hidden)),
                    Contains("expected 32 x 64 (4 chunks of 8 digests)"));
  CHECK(std::all_of(wrong.begin(), wrong.end(), [](float x) { return x == 7.f; }));
  CHECK_THROWS_WITH(digest::Chunking::of(n, 0), Contains("max_chunk_len (0) must be positive"));
}

TEST_CASE("IC-Former with bf16 weights stays close to the float64 expectation", "[icformer]") {
  auto f32 = io::IcformerCheckpoint<float>::load(case_dir("icformer_basic") + "/model");
  auto b16 = io::IcformerCheckpoint<bf16>::load(case_dir("icformer_basic") + "/model");
  auto st = io::SafeTensors::open(case_dir("icformer_basic") + "/case.safetensors");
  const auto ctx = st.read<float>("context_embeds");
  const auto dig = st.read<float>("digest_embeds");
  const auto soft = st.read<double>("soft_prompt");
  const index_t d = 64, n = index_t(ctx.size()) / d, k = index_t(dig.size()) / d;
  std::vector<float> a(dig.size()), b(dig.size());
  f32.encoder().compress(matrix_view<const float>(ctx.data(), n, d), matrix_view<const float>(dig.data(), k, d), matrix_view(a.data(), k, d));
  b16.encoder().compress(matrix_view<const float>(ctx.data(), n, d), matrix_view<const float>(dig.data(), k, d), matrix_view(b.data(), k, d));
  // bf16 weights carry ~2^-9 relative rounding; the output stays close, not equal.
  const double err = test::relative_error(b.data(), soft.data(), b.size());
  CHECK(err < 5e-2);
  CHECK(err > 1e-6);  // really used bf16 weights
  // Exactly: the fp32 encoder over the same bf16-rounded weights widened to float.
  std::vector<std::vector<float>> owned;
  owned.reserve(64);
  auto widen = [&](const bf16* w, index_t count) {
    owned.emplace_back(std::size_t(count));
    for (index_t i = 0; i < count; ++i) owned.back()[std::size_t(i)] = to_float(w[i]);
    return owned.back().data();
  };
  auto widen_w = [&](const WeightView<bf16>& w) {
    return WeightView<float>{widen(w.data, w.out_features * w.in_features), w.out_features, w.in_features};
  };
  const auto& cfg = b16.config();
  digest::IcformerWeights<float> wf;
  for (const auto& l : b16.weights().layers) {
    digest::IcformerLayerWeights<float> x;
    x.query_norm = widen(l.query_norm, d);
    x.context_norm = l.context_norm ? widen(l.context_norm, d) : nullptr;
    x.post_attention_norm = widen(l.post_attention_norm, d);
    x.q = widen_w(l.q), x.k = widen_w(l.k), x.v = widen_w(l.v), x.o = widen_w(l.o);
    x.mlp = {widen_w(l.mlp.gate), widen_w(l.mlp.up), widen_w(l.mlp.down)};
    wf.layers.push_back(x);
  }
  wf.final_norm = widen(b16.weights().final_norm, d);
  std::vector<float> c(dig.size());
  digest::IcformerEncoder<float>(cfg, wf).compress(matrix_view<const float>(ctx.data(), n, d),
                                                  matrix_view<const float>(dig.data(), k, d), matrix_view(c.data(), k, d));
  CHECK(test::relative_error(b.data(), c.data(), b.size()) <= 1e-6);
}

TEST_CASE("IC-Former checkpoint loader names what is wrong", "[icformer][io][errors]") {
  const fs::path tmp = fs::temp_directory_path() / "ctxcomp_bad_icformer";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const std::string src = case_dir("icformer_basic") + "/model";
  auto st = io::SafeTensors::open(src + "/model.safetensors");
  auto write_variant = [&](const std::string& drop, const std::string& reshape) {
    std::vector<std::vector<float>> keep;
    std::vector<io::TensorOut> outs;
    for (const auto& t : st.tensors()) {
      if (t.name == drop) continue;
      keep.push_back(st.read<float>(t.name));
      auto shape = t.shape;
      if (t.name == reshape) shape = {t.numel()};
      outs.push_back(io::TensorOut::of(t.name, shape, keep.back().data()));
    }
    io::write_safetensors((tmp / "model.safetensors").string(), outs);
  };
  fs::copy_file(src + "/config.json", tmp / "config.json");
  write_variant("encoder.layers.1.cross_attn.v_proj.weight", "");
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()),
                    Contains("missing tensor 'encoder.layers.1.cross_attn.v_proj.weight'"));
  write_variant("", "encoder.layers.2.mlp.up_proj.weight");
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()),
                    Contains("tensor 'encoder.layers.2.mlp.up_proj.weight' has shape [10240], expected [160, 64]"));
  {
    std::ofstream f(tmp / "config.json");
    f << R"({"model_type": "icformer", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3, "intermediate_size": 160, "num_hidden_layers": 3})";
  }
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()), Contains("num_attention_heads (4) is not a multiple of num_key_value_heads (3)"));
  {
    std::ofstream f(tmp / "config.json");
    f << R"({"architectures": ["ICFormerModel"], "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 160, "num_hidden_layers": 3, "rope_scaling": {"type": "yarn", "factor": 4}})";
  }
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()), Contains("unsupported RoPE scaling type 'yarn'"));
  {
    std::ofstream f(tmp / "config.json");
    f << R"({"model_type": "icformer", "num_attention_heads": 4})";
  }
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()), Contains("missing integer 'hidden_size'"));
  {
    std::ofstream f(tmp / "config.json");
    f << R"({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 160, "num_hidden_layers": 3})";
  }
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()),
                    Contains("neither 'architectures' nor 'model_type' names the model (supported: ICFormerModel)"));
  {
    std::ofstream f(tmp / "config.json");
    f << "{ not json";
  }
  CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(tmp.string()), Contains("not valid JSON"));
  fs::remove_all(tmp);
}

TEST_CASE("IC-Former in bf16 compute: every fixture within the bf16 budget, any thread count",
          "[icformer][bf16][fixtures][threads]") {
  for (const char* c : {"icformer_basic", "icformer_chunked", "icformer_gqa_selfattn"}) {
    INFO(c);
    auto ckpt = io::IcformerCheckpoint<float>::load(case_dir(c) + "/model");
    auto ckpt16 = io::IcformerCheckpoint<bf16>::load(case_dir(c) + "/model");
    auto st = io::SafeTensors::open(case_dir(c) + "/case.safetensors");
    const auto& cfg = ckpt.config();
    const auto ctx = st.read<float>("context_embeds");
    const auto dig = st.read<float>("digest_embeds");
    const auto soft = st.read<double>("soft_prompt");
    const index_t n = index_t(ctx.size()) / cfg.hidden, k = index_t(dig.size()) / cfg.hidden;
    const index_t max_len = st.meta("use_chunk") == "True" ? std::stoll(st.meta("max_chunk_len")) : n;
    const index_t rows = digest::Chunking::of(n, max_len).count * k;
    const auto cv = matrix_view<const float>(ctx.data(), n, cfg.hidden);
    const auto dv = matrix_view<const float>(dig.data(), k, cfg.hidden);
    digest::IcformerOptions bf;
    bf.compute = Compute::bf16;
    auto enc = ckpt.encoder();
    CHECK(enc.options().compute == Compute::fp32);  // opt-in
    enc.set_options(bf);
    auto enc16 = digest::IcformerEncoder<bf16>(ckpt16.config(), ckpt16.weights(), bf);
    std::vector<float> a(std::size_t(rows * cfg.hidden)), a2(a.size()), b(a.size());
    enc.compress_chunked(cv, dv, max_len, matrix_view(a.data(), rows, cfg.hidden));
    enc.compress_chunked(cv, dv, max_len, matrix_view(a2.data(), rows, cfg.hidden), test::two_threads());
    enc16.compress_chunked(cv, dv, max_len, matrix_view(b.data(), rows, cfg.hidden));
    CHECK(std::memcmp(a.data(), a2.data(), a.size() * sizeof(float)) == 0);
    // The budget for bf16-rounded operands through a whole encoder (docs/bf16.md; the kernels'
    // own a-priori bounds are checked in test_bf16.cpp), as for bf16 weights above.
    const double err = test::relative_error(a.data(), soft.data(), a.size());
    const double err16 = test::relative_error(b.data(), soft.data(), b.size());
    CHECK(err < 5e-2);
    CHECK(err > 1e-6);  // really computed in bf16
    CHECK(err16 < 5e-2);
    UNSCOPED_INFO(c << ": bf16 compute, relative error vs float64 " << err << " (fp32 weights), " << err16 << " (bf16 weights)");
  }
}

TEST_CASE("PromptLayout: the official decoder input, one row and one position each, from the offset", "[icformer]") {
  // [pre ; soft ; FT ; prompt ; post] after 5 cached positions: rows 3 + 8 + 1 + 2 + 1.
  digest::PromptLayout lay;
  lay.offset = 5, lay.pre = 3, lay.soft = 8, lay.marker = 1, lay.prompt = 2, lay.post = 1;
  REQUIRE_NOTHROW(lay.validate());
  // The parts in order, enumerated row by row.
  std::vector<int> part;
  for (int p = 0, counts[] = {3, 8, 1, 2, 1}; p < 5; ++p) part.insert(part.end(), std::size_t(counts[p]), p);
  REQUIRE(lay.rows() == index_t(part.size()));
  const index_t firsts[] = {0, lay.soft_row(), lay.marker_row(), lay.prompt_row(), lay.post_row()};
  for (int p = 0; p < 5; ++p) CHECK(part[std::size_t(firsts[p])] == p);
  for (int p = 1; p < 5; ++p) CHECK(part[std::size_t(firsts[p] - 1)] == p - 1);
  for (index_t r = 0; r < lay.rows(); ++r) CHECK(lay.position(r) == 5 + r);
  CHECK(lay.decode_position() == 5 + index_t(part.size()));
  lay.marker = 0;  // no marker: the prompt follows the soft prompt
  CHECK(lay.prompt_row() == lay.soft_row() + lay.soft);

  auto error = [](digest::PromptLayout l) {
    try {
      l.validate();
      return std::string("(valid)");
    } catch (const Error& e) {
      return std::string(e.what());
    }
  };
  digest::PromptLayout ok;
  ok.soft = 4;
  CHECK(error(ok) == "(valid)");
  auto bad = ok;
  bad.soft = 0;
  CHECK_THAT(error(bad), Contains("the soft prompt is empty"));
  bad = ok, bad.marker = 2;
  CHECK_THAT(error(bad), Contains("marker must be 0 or 1 (2)"));
  bad = ok, bad.offset = -1;
  CHECK_THAT(error(bad), Contains("negative count (offset -1"));
  bad = ok, bad.prompt = -3;
  CHECK_THAT(error(bad), Contains("prompt -3"));
}

}  // namespace test_digest_icformer
