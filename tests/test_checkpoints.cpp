// Checkpoints as the hub ships them: every checkpoints/ fixture (sharded files, Llama 3 RoPE,
// tied embeddings, Qwen2 biases, Qwen3 q/k norm) through the API and the CLI; the Llama 3 RoPE
// rule against a double-precision transcription; linear bias and per-head RMSNorm against
// double references; and strict loading: malformed indexes, missing shards, unused tensors,
// unsupported architectures and RoPE types are errors naming the problem, with no output.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <ctxcomp/io/icformer_checkpoint.hpp>
#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "cli_runner.hpp"
#include "common.hpp"
#include "fixture_checks.hpp"
#include "sac_driver.hpp"

using namespace ctxcomp;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

using test::layer_kv;

namespace {
const char* kCheckpointCases[] = {"llama3_tied_sharded_bf16", "qwen2_bias_fp16", "qwen3_qknorm_bf16"};
std::string case_dir(const std::string& c) { return test::fixtures_dir() + "/checkpoints/" + c; }

/// A scratch copy of a fixture directory that a test may modify.
std::string scratch_copy(const std::string& from, const std::string& name) {
  const fs::path to = fs::temp_directory_path() / ("ctxcomp_ckpt_" + name);
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(to))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return to.string();
}

nlohmann::json read_json_file(const std::string& p) { return io::read_json(p); }
void write_json_file(const std::string& p, const nlohmann::json& j) { std::ofstream(p) << j.dump(2); }

/// Rewrites a safetensors file keeping every tensor whose name `keep` accepts, plus `extra`.
void rewrite(const std::string& path, const std::function<bool(const std::string&)>& keep,
             const std::vector<io::TensorOut>& extra = {}) {
  auto st = io::SafeTensors::open(path, io::SafeTensors::Mode::Read);
  std::vector<io::TensorOut> outs;
  for (const auto& t : st.tensors())
    if (keep(t.name)) outs.push_back({t.name, t.dtype, t.shape, st.raw(t)});
  outs.insert(outs.end(), extra.begin(), extra.end());
  io::write_safetensors(path, outs, st.metadata());
}

/// Rewrites a scratch directory's config to name another architecture.
void set_arch(const std::string& dir, const std::string& arch, const std::string& model_type) {
  auto j = read_json_file(dir + "/config.json");
  j["architectures"] = {arch};
  j["model_type"] = model_type;
  write_json_file(dir + "/config.json", j);
}

std::string load_error(const std::string& dir) {
  try {
    host::LlamaModel<float>::load(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "(loaded without error)";
}

/// The Llama 3 rule in double precision, transcribed from the fixtures README.
std::vector<double> llama3_inv_freq_double(double theta, index_t dim, double factor, double low, double high,
                                           double original_max) {
  const double pi = 3.14159265358979323846;
  std::vector<double> f;
  for (index_t i = 0; i < dim / 2; ++i) {
    const double inv = 1.0 / std::pow(theta, double(2 * i) / double(dim));
    const double wavelen = 2 * pi / inv;
    const double low_wavelen = original_max / low, high_wavelen = original_max / high;
    if (wavelen > low_wavelen) f.push_back(inv / factor);
    else if (wavelen < high_wavelen) f.push_back(inv);
    else {
      const double smooth = (original_max / wavelen - low) / (high - low);
      f.push_back((1 - smooth) * inv / factor + smooth * inv);
    }
  }
  return f;
}
}  // namespace

TEST_CASE("llama3 RoPE frequencies match a double-precision transcription of the rule", "[rope][checkpoints]") {
  struct Case {
    double theta;
    index_t dim;
    double factor, low, high, original;
  };
  // The fixture's setting (all three bands at head_dim 16) and Llama-3.2-1B's (head_dim 64).
  for (const Case c : {Case{500000, 16, 8, 1, 4, 64}, Case{500000, 64, 32, 1, 4, 8192}, Case{500000, 128, 8, 1, 4, 8192}}) {
    INFO("head_dim " << c.dim << " factor " << c.factor);
    RopeConfig cfg;
    cfg.theta = c.theta;
    cfg.llama3 = {c.factor, c.low, c.high, c.original};
    Rope rope(cfg, c.dim);
    const auto expect = llama3_inv_freq_double(c.theta, c.dim, c.factor, c.low, c.high, c.original);
    REQUIRE(rope.inv_freq().size() == expect.size());
    int scaled = 0, kept = 0, blended = 0;
    for (std::size_t i = 0; i < expect.size(); ++i) {
      const double plain = 1.0 / std::pow(c.theta, double(2 * i) / double(c.dim));
      // fp32 evaluation of a handful of operations: within 1e-6 relative of the exact rule.
      CHECK(std::abs(rope.inv_freq()[i] - expect[i]) <= 1e-6 * expect[i]);
      if (std::abs(expect[i] - plain / c.factor) <= 1e-12 * plain) ++scaled;
      else if (std::abs(expect[i] - plain) <= 1e-12 * plain) ++kept;
      else ++blended;
    }
    if (c.dim == 16) CHECK((scaled > 0 && kept > 0 && blended > 0));
  }
  // Both config layouts give the same rule; other types are named in the error.
  nlohmann::json old_layout = {{"rope_theta", 500000.0},
                               {"rope_scaling",
                                {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                                 {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}}}};
  nlohmann::json v5 = {{"rope_parameters",
                        {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}}}};
  const auto a = io::rope_from_config(old_layout, "a.json"), b = io::rope_from_config(v5, "b.json");
  CHECK(Rope(a, 16).inv_freq() == Rope(b, 16).inv_freq());
  CHECK(a.llama3.factor == 8.0);
  CHECK(b.theta == 500000.0);
  auto yarn = v5;
  yarn["rope_parameters"]["rope_type"] = "yarn";
  CHECK_THROWS_WITH(io::rope_from_config(yarn, "c.json"), Contains("unsupported RoPE scaling type 'yarn'"));
  auto missing = old_layout;
  missing["rope_scaling"].erase("low_freq_factor");
  CHECK_THROWS_WITH(io::rope_from_config(missing, "d.json"), Contains("needs a number 'low_freq_factor'"));
}

TEST_CASE("linear bias and per-head RMSNorm match double references", "[nn][checkpoints]") {
  const index_t out_f = 37, in_f = 29;
  const auto w = test::random_vector(std::size_t(out_f * in_f), 1), b = test::random_vector(std::size_t(out_f), 2);
  for (index_t rows : {1, 5}) {
    INFO("rows " << rows);
    const auto x = test::random_vector(std::size_t(rows * in_f), 3);
    std::vector<float> y(std::size_t(rows * out_f));
    Workspace ws;
    linear(matrix_view<const float>(x.data(), rows, in_f), WeightView<float>{w.data(), out_f, in_f, b.data()},
           matrix_view(y.data(), rows, out_f), ws);
    std::vector<double> ref(y.size());
    for (index_t t = 0; t < rows; ++t)
      for (index_t o = 0; o < out_f; ++o) {
        double s = b[std::size_t(o)], mag = std::abs(b[std::size_t(o)]);
        for (index_t i = 0; i < in_f; ++i) {
          s += double(x[std::size_t(t * in_f + i)]) * w[std::size_t(o * in_f + i)];
          mag += std::abs(double(x[std::size_t(t * in_f + i)]) * w[std::size_t(o * in_f + i)]);
        }
        ref[std::size_t(t * out_f + o)] = s;
        // A priori: (in_f + 1) roundings of fp32 accumulation, gamma_n * sum |terms|.
        const double u = std::ldexp(1.0, -24), gamma = (in_f + 1) * u / (1 - (in_f + 1) * u);
        CHECK(std::abs(y[std::size_t(t * out_f + o)] - s) <= gamma * mag);
      }
  }
  // rmsnorm_heads: each head vector normalised on its own, weight [head_dim].
  const index_t tokens = 3, heads = 4, hd = 8;
  auto x = test::random_vector(std::size_t(tokens * heads * hd), 4);
  const auto orig = x;
  const auto g = test::random_vector(std::size_t(hd), 5, 0.5f, 1.5f);
  rmsnorm_heads(HeadsView<float>::token_major(x.data(), tokens, heads, hd), g.data(), hd, 1e-6f);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t h = 0; h < heads; ++h) {
      const float* r = orig.data() + t * heads * hd + h * hd;
      double ms = 0;
      for (index_t i = 0; i < hd; ++i) ms += double(r[i]) * r[i];
      const double inv = 1 / std::sqrt(ms / hd + 1e-6);
      for (index_t i = 0; i < hd; ++i)
        CHECK(std::abs(x[std::size_t(t * heads * hd + h * hd + i)] - g[std::size_t(i)] * r[i] * inv) <=
              1e-6 * std::abs(g[std::size_t(i)] * r[i] * inv) + 1e-7);
    }
  CHECK_THROWS_WITH(rmsnorm_heads(HeadsView<float>::token_major(x.data(), tokens, heads, hd), g.data(), hd - 1, 1e-6f),
                    Contains("head_dim 8"));
}

TEST_CASE("every checkpoints fixture through the host with folding", "[checkpoints][fold][fixtures]") {
  for (const char* c : kCheckpointCases)
    for (auto schedule : {host::FoldSchedule::EverySpan, host::FoldSchedule::AtEnd}) {
      INFO(c << (schedule == host::FoldSchedule::EverySpan ? ": fold after every span" : ": fold at the end"));
      const auto model = host::LlamaModel<float>::load(case_dir(c) + "/model");
      const double err = test::check_fold_case(model, case_dir(c) + "/case.safetensors", schedule);
      // The tracker's position ids are the fixture's.
      auto st = io::SafeTensors::open(case_dir(c) + "/case.safetensors");
      const auto ids = st.read<std::int64_t>("input_ids");
      std::vector<std::int64_t> pos(ids.size());
      fold::SpanTracker(std::stoll(st.meta("cl_id")), std::stoll(st.meta("cr_id")), model.config.vocab)
          .push(ids.data(), index_t(ids.size()), pos.data());
      CHECK(pos == st.read<std::int64_t>("position_ids"));
      if (schedule == host::FoldSchedule::EverySpan) UNSCOPED_INFO(c << ": logits relative error vs float64 " << err);
    }
}

TEST_CASE("checkpoint families load what their configs say", "[checkpoints]") {
  const auto l3 = host::LlamaModel<float>::load(case_dir("llama3_tied_sharded_bf16") + "/model");
  CHECK(l3.config.arch.tied_embeddings);
  CHECK(l3.lm_head.data == l3.embed);
  CHECK(l3.config.rope.llama3.factor == 8.0);
  CHECK(l3.config.rope.llama3.original_max_position_embeddings == 64.0);
  const auto q2 = host::LlamaModel<float>::load(case_dir("qwen2_bias_fp16") + "/model");
  CHECK(q2.config.arch.name == "Qwen2ForCausalLM");
  CHECK((q2.layers[0].q.bias && q2.layers[0].k.bias && q2.layers[0].v.bias && !q2.layers[0].o.bias));
  CHECK(q2.lm_head.data != q2.embed);
  const auto q3 = host::LlamaModel<float>::load(case_dir("qwen3_qknorm_bf16") + "/model");
  CHECK(q3.config.head_dim == 32);
  CHECK(q3.config.hidden / q3.config.heads == 16);  // head_dim differs from hidden / heads
  CHECK((q3.layers[1].q_norm && q3.layers[1].k_norm && !q3.layers[1].q.bias));
  // bf16 storage of bf16 weights is exact: the same logits as the fp32 copy.
  const auto q3b = host::LlamaModel<bf16>::load(case_dir("qwen3_qknorm_bf16") + "/model");
  auto st = io::SafeTensors::open(case_dir("qwen3_qknorm_bf16") + "/case.safetensors");
  const auto ids = st.read<std::int64_t>("input_ids");
  std::vector<float> la, lb;
  {
    host::LlamaHost<float> h(q3);
    auto cache = h.make_cache(index_t(ids.size()));
    fold::SpanTracker spans(158, 159, 160);
    la = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, host::FoldSchedule::EverySpan);
  }
  {
    host::LlamaHost<bf16> h(q3b);
    auto cache = h.make_cache(index_t(ids.size()));
    fold::SpanTracker spans(158, 159, 160);
    lb = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, host::FoldSchedule::EverySpan);
  }
  CHECK(la == lb);
}

TEST_CASE("MistralForCausalLM without a sliding window is the Llama block", "[checkpoints]") {
  // The fixture Llama saved as a Mistral config: the same logits; a sliding window is refused.
  const auto d = scratch_copy(test::fixtures_dir() + "/models/llama", "as_mistral");
  auto j = read_json_file(d + "/config.json");
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = nullptr;
  write_json_file(d + "/config.json", j);
  const auto llama = host::LlamaModel<float>::load(test::fixtures_dir() + "/models/llama");
  const auto mistral = host::LlamaModel<float>::load(d);
  CHECK(mistral.config.arch.name == "MistralForCausalLM");
  auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_one_span.safetensors");
  const auto ids = st.read<std::int64_t>("input_ids");
  std::vector<float> la, lb;
  for (const auto* m : {&llama, &mistral}) {
    host::LlamaHost<float> h(*m);
    auto cache = h.make_cache(index_t(ids.size()));
    fold::SpanTracker spans(126, 127, 128);
    (m == &llama ? la : lb) = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, host::FoldSchedule::EverySpan);
  }
  CHECK(la == lb);
  j["sliding_window"] = 4096;
  write_json_file(d + "/config.json", j);
  CHECK_THAT(load_error(d), Contains("MistralForCausalLM with a sliding window (sliding_window 4096) is not supported"));
}

TEST_CASE("ctxcomp fold and sac run on every checkpoints fixture", "[cli][checkpoints][fixtures]") {
  for (const char* c : kCheckpointCases) {
    INFO(c);
    const std::string in = case_dir(c) + "/case.safetensors";
    const std::string out = test::tmp(std::string("ctxcomp_cli_ckpt_") + c + ".safetensors");
    const auto r = test::run_cli("fold --model " + case_dir(c) + "/model --input " + in + " --output " + out +
                                 " --cl 158 --cr 159 --threads 2");
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_fold_output(out, in);
    std::remove(out.c_str());
    // SAC on the same directory (anchor embeddings of a SAC fixture: hidden 64 as here); no
    // official output exists for these models, so the CLI must equal the API.
    const std::string sac_in = test::fixtures_dir() + "/sac/sac_multichunk.safetensors";
    const auto rs = test::run_cli("sac --model " + case_dir(c) + "/model --anchor-embeds " + sac_in + " --input " +
                                  sac_in + " --output " + out + " --chunk-size 24 --ratio 4 --threads 2");
    INFO(rs.err);
    REQUIRE(rs.status == 0);
    const auto model = host::LlamaModel<float>::load(case_dir(c) + "/model");
    host::LlamaHost<float> h(model);
    auto ss = io::SafeTensors::open(sac_in);
    const auto ids = ss.read<std::int64_t>("input_ids"), targets = ss.read<std::int64_t>("lm_target_ids");
    const auto roles = ss.read<float>("role_tokens"), special = ss.read<float>("special_tokens");
    const auto plan = anchor::AnchorPlan::uniform(index_t(ids.size()), 24, 4);
    auto cache = h.make_cache(plan.anchor_count() + index_t(targets.size()) + 2);
    host::sac_compress(h, plan, ids.data(), matrix_view<const float>(roles.data(), index_t(roles.size()) / 64, 64),
                       anchor::ChunkMask::Full, cache);
    const auto logits = host::sac_decode(h, plan, cache, special.data() + 64, targets.data(), index_t(targets.size()));
    auto so = io::SafeTensors::open(out);
    CHECK(so.read<float>("decode_logits") == logits);
    CHECK(so.read<float>("layer1_v") == layer_kv(cache, 1, true));
    std::remove(out.c_str());
  }
}

TEST_CASE("malformed sharded checkpoints are named errors", "[checkpoints][errors]") {
  const std::string src = case_dir("llama3_tied_sharded_bf16") + "/model";
  const std::string index = "/model.safetensors.index.json";
  {
    const auto d = scratch_copy(src, "missing_shard");
    fs::remove(d + "/model-00004-of-00006.safetensors");
    CHECK_THAT(load_error(d), Contains("missing shard 'model-00004-of-00006.safetensors'"));
  }
  {
    const auto d = scratch_copy(src, "outside");
    auto j = read_json_file(d + index);
    j["weight_map"]["model.norm.weight"] = "../model-00006-of-00006.safetensors";
    write_json_file(d + index, j);
    CHECK_THAT(load_error(d), Contains("tensor 'model.norm.weight' is mapped to '../model-00006-of-00006.safetensors', "
                                       "which is not a file in the checkpoint directory"));
  }
  {
    const auto d = scratch_copy(src, "unlisted");
    auto j = read_json_file(d + index);
    j["weight_map"].erase("model.layers.1.mlp.up_proj.weight");
    write_json_file(d + index, j);
    CHECK_THAT(load_error(d), Contains("tensor 'model.layers.1.mlp.up_proj.weight' is stored in shard "
                                       "'model-00005-of-00006.safetensors' but the index lists it in no shard"));
  }
  {
    const auto d = scratch_copy(src, "twice");
    // A second copy of the embedding in shard 2: stored in two shards.
    auto s1 = io::SafeTensors::open(d + "/model-00001-of-00006.safetensors", io::SafeTensors::Mode::Read);
    const auto& emb = s1.info("model.embed_tokens.weight");
    rewrite(d + "/model-00002-of-00006.safetensors", [](const std::string&) { return true; },
            {{emb.name, emb.dtype, emb.shape, s1.raw(emb)}});
    CHECK_THAT(load_error(d), Contains("tensor 'model.embed_tokens.weight' is listed in shard "
                                       "'model-00001-of-00006.safetensors' but stored in 'model-00002-of-00006.safetensors'"));
  }
  {
    const auto d = scratch_copy(src, "not_held");
    auto j = read_json_file(d + index);
    j["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00002-of-00006.safetensors";
    write_json_file(d + index, j);
    CHECK_THAT(load_error(d), Contains("'model.layers.0.self_attn.q_proj.weight'"));
  }
  {
    const auto d = scratch_copy(src, "no_weights");
    fs::remove(d + index);
    CHECK_THAT(load_error(d), Contains("no 'model.safetensors' and no 'model.safetensors.index.json'"));
  }
}

TEST_CASE("loading is strict: unused tensors, unsupported architectures and RoPE types", "[checkpoints][errors]") {
  // The bug this exists for: Qwen2 / Qwen3 weights read as plain Llama dropped biases and norms.
  {
    const auto d = scratch_copy(case_dir("qwen2_bias_fp16") + "/model", "qwen2_as_llama");
    set_arch(d, "LlamaForCausalLM", "llama");
    CHECK_THAT(load_error(d), Contains("'model.layers.0.self_attn.k_proj.bias'") &&
                                  Contains("not used by the LlamaForCausalLM loader"));
  }
  {
    const auto d = scratch_copy(case_dir("qwen3_qknorm_bf16") + "/model", "qwen3_as_qwen2");
    set_arch(d, "Qwen2ForCausalLM", "qwen2");
    // Qwen2 expects q/k/v biases the Qwen3 checkpoint does not have.
    CHECK_THAT(load_error(d), Contains("missing tensor 'model.layers.0.self_attn.q_proj.bias'"));
    set_arch(d, "LlamaForCausalLM", "llama");
    CHECK_THAT(load_error(d), Contains("'model.layers.0.self_attn.k_norm.weight'"));
  }
  {
    const auto d = scratch_copy(case_dir("qwen2_bias_fp16") + "/model", "layers_past");
    auto j = read_json_file(d + "/config.json");
    j["num_hidden_layers"] = 1;
    j["layer_types"] = {"full_attention"};
    write_json_file(d + "/config.json", j);
    CHECK_THAT(load_error(d), Contains("'model.layers.1."));
  }
  {
    const auto d = scratch_copy(case_dir("qwen2_bias_fp16") + "/model", "unsupported");
    set_arch(d, "GPT2LMHeadModel", "gpt2");
    CHECK_THAT(load_error(d), Contains("unsupported architecture 'GPT2LMHeadModel'"));
    set_arch(d, "Qwen2ForCausalLM", "llama");
    auto j = read_json_file(d + "/config.json");
    CHECK_THAT(load_error(d), Contains("unsupported architecture 'Qwen2ForCausalLM' (model_type 'llama'"));
    j["model_type"] = "qwen2";
    j["use_sliding_window"] = true;
    write_json_file(d + "/config.json", j);
    CHECK_THAT(load_error(d), Contains("use_sliding_window"));
    j["use_sliding_window"] = false;
    j["hidden_act"] = "gelu";
    write_json_file(d + "/config.json", j);
    CHECK_THAT(load_error(d), Contains("hidden_act \"gelu\""));
    j["hidden_act"] = "silu";
    j["rope_parameters"]["rope_type"] = "dynamic";
    write_json_file(d + "/config.json", j);
    CHECK_THAT(load_error(d), Contains("unsupported RoPE scaling type 'dynamic'"));
  }
  {
    // A tied model with a stored lm_head that is not the embedding: refused; an extra
    // rotary_emb.inv_freq buffer (older transformers) is harmless and accepted.
    const auto d = scratch_copy(case_dir("qwen3_qknorm_bf16") + "/model", "tied_extra");
    auto st = io::SafeTensors::open(d + "/model.safetensors", io::SafeTensors::Mode::Read);
    std::vector<float> inv(16, 1.f);
    rewrite(d + "/model.safetensors", [](const std::string&) { return true; },
            {io::TensorOut::of("model.layers.0.self_attn.rotary_emb.inv_freq", {16}, inv.data())});
    CHECK(load_error(d) == "(loaded without error)");
    std::vector<bf16> head(160 * 64, bf16(0.5f));
    rewrite(d + "/model.safetensors", [](const std::string&) { return true; },
            {io::TensorOut::of("lm_head.weight", {160, 64}, head.data())});
    CHECK_THAT(load_error(d), Contains("lm_head.weight differs from model.embed_tokens.weight"));
  }
  {
    // The IC-Former loader is strict too.
    const auto d = scratch_copy(test::fixtures_dir() + "/icformer/icformer_basic/model", "icformer_extra");
    std::vector<float> b(64, 0.f);
    rewrite(d + "/model.safetensors", [](const std::string&) { return true; },
            {io::TensorOut::of("encoder.layers.0.cross_attn.q_proj.bias", {64}, b.data())});
    CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(d),
                      Contains("'encoder.layers.0.cross_attn.q_proj.bias' is not used by the ICFormerModel loader"));
    const auto d2 = scratch_copy(test::fixtures_dir() + "/icformer/icformer_basic/model", "icformer_arch");
    auto j = read_json_file(d2 + "/config.json");
    j["architectures"] = {"LlamaForCausalLM"};
    write_json_file(d2 + "/config.json", j);
    CHECK_THROWS_WITH(io::IcformerCheckpoint<float>::load(d2), Contains("unsupported architecture 'LlamaForCausalLM'"));
  }
}

TEST_CASE("the CLI reports malformed checkpoints and writes no output", "[cli][checkpoints][errors]") {
  const std::string src = case_dir("llama3_tied_sharded_bf16") + "/model";
  const std::string in = case_dir("llama3_tied_sharded_bf16") + "/case.safetensors";
  const std::string out = test::tmp("ctxcomp_cli_ckpt_bad.safetensors");
  std::remove(out.c_str());
  auto expect_error = [&](const std::string& dir, const std::string& what) {
    for (const char* cmd : {"fold", "sac"}) {
      const std::string args = std::string(cmd) == "fold"
                                   ? "fold --model " + dir + " --input " + in + " --output " + out + " --cl 158 --cr 159"
                                   : "sac --model " + dir + " --anchor-embeds " + test::fixtures_dir() +
                                         "/sac/sac_basic.safetensors --input " + test::fixtures_dir() +
                                         "/sac/sac_basic.safetensors --output " + out + " --chunk-size 24 --ratio 4";
      const auto r = test::run_cli(args);
      INFO(cmd << ": " << r.err);
      CHECK(r.status != 0);
      CHECK(r.err.find(what) != std::string::npos);
      CHECK(!fs::exists(out));
    }
  };
  {
    const auto d = scratch_copy(src, "cli_missing_shard");
    fs::remove(d + "/model-00002-of-00006.safetensors");
    expect_error(d, "missing shard 'model-00002-of-00006.safetensors'");
  }
  {
    const auto d = scratch_copy(src, "cli_bad_index");
    std::ofstream(d + "/model.safetensors.index.json") << "{\"weight_map\": [1, 2]}";
    expect_error(d, "no 'weight_map' object");
  }
  {
    const auto d = scratch_copy(src, "cli_extra_tensor");
    std::vector<bf16> extra(64, bf16(1.f));
    rewrite(d + "/model-00006-of-00006.safetensors", [](const std::string&) { return true; },
            {io::TensorOut::of("model.layers.2.input_layernorm.weight", {64}, extra.data())});
    auto j = read_json_file(d + "/model.safetensors.index.json");
    j["weight_map"]["model.layers.2.input_layernorm.weight"] = "model-00006-of-00006.safetensors";
    write_json_file(d + "/model.safetensors.index.json", j);
    expect_error(d, "'model.layers.2.input_layernorm.weight' is not used by the LlamaForCausalLM loader");
  }
  {
    const auto d = scratch_copy(src, "cli_arch");
    set_arch(d, "FalconForCausalLM", "falcon");
    expect_error(d, "unsupported architecture 'FalconForCausalLM'");
  }
  {
    const auto d = scratch_copy(src, "cli_rope");
    auto j = read_json_file(d + "/config.json");
    j["rope_scaling"]["rope_type"] = "longrope";
    write_json_file(d + "/config.json", j);
    expect_error(d, "unsupported RoPE scaling type 'longrope'");
  }
}
