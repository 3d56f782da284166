// PEFT LoRA adapters (io/lora.hpp) on the llama fixture model: an adapter directory and the
// LoRA-injected checkpoint layout give the logits of a checkpoint whose weights were merged
// here in double precision (W + scale B A, rounded once), bit for bit; use_rslora's scale;
// resized embeddings from the adapter; every refused adapter is a named error; the CLI's
// --adapter writes what a merged checkpoint writes.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <ctxcomp/io/lora.hpp>
#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "fold_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_io_lora {

using namespace ctxcomp;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;
using test::checkpoints::read_json_file;
using test::checkpoints::write_json_file;

namespace {
std::string base_dir() { return test::fixtures_dir() + "/models/llama"; }

/// One LoRA pair: A [r x in], B [out x r], random non-zero.
struct Pair {
  std::string module;  // e.g. model.layers.0.self_attn.q_proj
  std::int64_t out, in;
  std::vector<float> A, B;
};

/// Random pairs for q_proj and v_proj of every layer of the fixture model (hidden 64, 4 heads,
/// 2 kv heads of 16).
std::vector<Pair> make_pairs(index_t r, unsigned seed) {
  std::vector<Pair> ps;
  for (int l = 0; l < 2; ++l)
    for (auto [name, out] : {std::pair{"q_proj", 64}, {"v_proj", 32}}) {
      Pair p{"model.layers." + std::to_string(l) + ".self_attn." + name, out, 64, {}, {}};
      p.A = test::random_vector(std::size_t(r * p.in), seed++, -0.5f, 0.5f);
      p.B = test::random_vector(std::size_t(p.out * r), seed++, -0.5f, 0.5f);
      ps.push_back(std::move(p));
    }
  return ps;
}

nlohmann::json adapter_config(index_t r, double alpha, const nlohmann::json& targets) {
  return {{"peft_type", "LORA"}, {"r", r}, {"lora_alpha", alpha}, {"target_modules", targets}, {"bias", "none"},
          {"use_rslora", false}, {"use_dora", false}, {"fan_in_fan_out", false}, {"lora_dropout", 0.05},
          {"base_model_name_or_path", "fixture/llama"}, {"task_type", "CAUSAL_LM"}};
}

/// Writes a PEFT adapter directory (keys base_model.model.<module>.lora_A.weight / lora_B.weight),
/// plus `extra` tensors.
std::string write_adapter(const std::string& name, const nlohmann::json& cfg, const std::vector<Pair>& ps, index_t r,
                          std::vector<io::TensorOut> extra = {}) {
  const fs::path d = fs::temp_directory_path() / ("ctxcomp_lora_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  write_json_file((d / "adapter_config.json").string(), cfg);
  std::vector<io::TensorOut> outs = std::move(extra);
  for (const auto& p : ps) {
    outs.push_back(io::TensorOut::of("base_model.model." + p.module + ".lora_A.weight", {r, p.in}, p.A.data()));
    outs.push_back(io::TensorOut::of("base_model.model." + p.module + ".lora_B.weight", {p.out, r}, p.B.data()));
  }
  io::write_safetensors((d / "adapter_model.safetensors").string(), outs, {});
  return d.string();
}

/// The fixture model with the pairs merged here: W + scale * B A, in double, rounded once.
/// `injected`: the LoRA-injected layout instead (base_layer / lora_A.default / lora_B.default
/// and adapter_config.json beside config.json), for the loader to merge.
std::string write_merged(const std::string& name, const std::vector<Pair>& ps, index_t r, double scale, bool injected,
                         const nlohmann::json& cfg = {}) {
  const std::string d = test::checkpoints::scratch_copy(base_dir(), "lora_" + name);
  auto st = io::SafeTensors::open(base_dir() + "/model.safetensors", io::SafeTensors::Mode::Read);
  std::map<std::string, std::vector<float>> merged;
  for (const auto& p : ps) {
    auto w = st.read<float>(p.module + ".weight");
    if (!injected)
      for (std::int64_t o = 0; o < p.out; ++o)
        for (std::int64_t i = 0; i < p.in; ++i) {
          double delta = 0;
          for (index_t k = 0; k < r; ++k) delta += double(p.B[std::size_t(o * r + k)]) * double(p.A[std::size_t(k * p.in + i)]);
          w[std::size_t(o * p.in + i)] = float(double(w[std::size_t(o * p.in + i)]) + scale * delta);
        }
    merged[p.module + ".weight"] = std::move(w);
  }
  std::vector<io::TensorOut> outs;
  for (const auto& t : st.tensors()) {
    auto it = merged.find(t.name);
    if (it == merged.end()) {
      outs.push_back({t.name, t.dtype, t.shape, st.raw(t)});
      continue;
    }
    const auto& p = *std::find_if(ps.begin(), ps.end(), [&](const Pair& q) { return q.module + ".weight" == t.name; });
    if (!injected) {
      outs.push_back(io::TensorOut::of(t.name, t.shape, it->second.data()));
    } else {
      outs.push_back(io::TensorOut::of(p.module + ".base_layer.weight", t.shape, it->second.data()));
      outs.push_back(io::TensorOut::of(p.module + ".lora_A.default.weight", {r, p.in}, p.A.data()));
      outs.push_back(io::TensorOut::of(p.module + ".lora_B.default.weight", {p.out, r}, p.B.data()));
    }
  }
  io::write_safetensors(d + "/model.safetensors", outs, st.metadata());
  if (injected) write_json_file(d + "/adapter_config.json", cfg);
  return d;
}

std::vector<std::int64_t> some_ids(index_t vocab) {
  std::vector<std::int64_t> ids;
  for (index_t i = 0; i < 40; ++i) ids.push_back((i * 37 + 5) % (vocab - 2));
  return ids;
}

/// Prefill logits [n x vocab] of `model` over ids (no sentinel in them).
std::vector<float> logits_of(const host::LlamaModel<float>& model, const std::vector<std::int64_t>& ids) {
  host::LlamaHost<float> h(model);
  const auto& c = model.config;
  KvCache<float> cache(c.layers, c.kv_heads, c.head_dim, index_t(ids.size()));
  fold::SpanTracker spans(126, 127, c.vocab);  // ids never hold them (some_ids stays below 126)
  return host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, host::FoldSchedule::EverySpan);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

using test::checkpoints::load_error;
}  // namespace

TEST_CASE("a PEFT LoRA adapter merges into the weights: the logits of the merged checkpoint, bit for bit",
          "[lora][checkpoints]") {
  const index_t r = 4;
  const auto ps = make_pairs(r, 11);
  const auto ids = some_ids(128);
  const auto base = host::LlamaModel<float>::load(base_dir());
  const auto plain = logits_of(base, ids);

  SECTION("adapter directory, target_modules as a list and as a regular expression") {
    for (const nlohmann::json& targets : {nlohmann::json{"q_proj", "v_proj"}, nlohmann::json(R"(.*\.(q|v)_proj)")}) {
      INFO("target_modules " << targets.dump());
      const std::string ad = write_adapter("dir", adapter_config(r, 8, targets), ps, r);
      const auto with = host::LlamaModel<float>::load(base_dir(), ad);
      REQUIRE(with.lora);
      CHECK(with.lora->pairs() == ps.size());
      CHECK(with.lora->config().scale() == 2.0);
      const auto merged = host::LlamaModel<float>::load(write_merged("dir", ps, r, 2.0, false));
      const auto got = logits_of(with, ids);
      CHECK(same_bits(got, logits_of(merged, ids)));
      CHECK(!same_bits(got, plain));  // the adapter changed the model
      CHECK(with.lora->warnings().empty());  // the checkpoint names no base model: nothing to compare
    }
    // A checkpoint that names another base model: loaded, with a warning naming both.
    const std::string other = test::checkpoints::scratch_copy(base_dir(), "lora_other_base");
    auto j = read_json_file(other + "/config.json");
    j["_name_or_path"] = "someone/else";
    write_json_file(other + "/config.json", j);
    const auto warned = host::LlamaModel<float>::load(other, write_adapter("warn", adapter_config(r, 8, {"q_proj"}), {ps[0], ps[2]}, r));
    REQUIRE(warned.lora->warnings().size() == 1);
    CHECK_THAT(warned.lora->warnings()[0], Contains("fixture/llama") && Contains("someone/else"));
  }
  SECTION("use_rslora: scale alpha / sqrt(r)") {
    auto cfg = adapter_config(r, 8, {"q_proj", "v_proj"});
    cfg["use_rslora"] = true;
    const auto with = host::LlamaModel<float>::load(base_dir(), write_adapter("rslora", cfg, ps, r));
    CHECK(with.lora->config().scale() == 4.0);
    const auto merged = host::LlamaModel<float>::load(write_merged("rslora", ps, r, 4.0, false));
    CHECK(same_bits(logits_of(with, ids), logits_of(merged, ids)));
  }
  SECTION("a checkpoint in the LoRA-injected layout loads directly") {
    const std::string inj = write_merged("injected", ps, r, 0, true, adapter_config(r, 8, {"q_proj", "v_proj"}));
    const auto with = host::LlamaModel<float>::load(inj);
    REQUIRE(with.lora);
    CHECK(with.lora->is_injected());
    const auto merged = host::LlamaModel<float>::load(write_merged("injected_ref", ps, r, 2.0, false));
    CHECK(same_bits(logits_of(with, ids), logits_of(merged, ids)));
    // bf16 weights: the merge happens in fp32 first, then one rounding to bf16
    const auto w16 = host::LlamaModel<bf16>::load(inj);
    const auto m16 = host::LlamaModel<bf16>::load(write_merged("injected_ref16", ps, r, 2.0, false));
    const auto& q = w16.layers[0].q;
    const auto& q_ref = m16.layers[0].q;
    CHECK(std::memcmp(q.data, q_ref.data, std::size_t(q.out_features * q.in_features) * sizeof(bf16)) == 0);
  }
  SECTION("an adapter trained with added tokens brings the resized embeddings and output layer") {
    auto st = io::SafeTensors::open(base_dir() + "/model.safetensors", io::SafeTensors::Mode::Read);
    auto emb = st.read<float>("model.embed_tokens.weight"), head = st.read<float>("lm_head.weight");
    const auto extra_rows = test::random_vector(2 * 64, 99);
    emb.insert(emb.end(), extra_rows.begin(), extra_rows.end());
    head.insert(head.end(), extra_rows.begin(), extra_rows.end());
    const std::string ad = write_adapter(
        "resized", adapter_config(r, 8, {"q_proj", "v_proj"}), ps, r,
        {io::TensorOut::of("base_model.model.model.embed_tokens.weight", {130, 64}, emb.data()),
         io::TensorOut::of("base_model.model.lm_head.weight", {130, 64}, head.data())});
    const auto with = host::LlamaModel<float>::load(base_dir(), ad);
    CHECK(with.config.vocab == 130);
    auto ids2 = ids;
    ids2[5] = 128, ids2[9] = 129;  // added tokens
    const auto got = logits_of(with, ids2);
    CHECK(got.size() == ids2.size() * 130);
    // the first 128 columns of the first 5 rows are those of the adapter without resizing
    const auto unresized = host::LlamaModel<float>::load(base_dir(), write_adapter("unresized", adapter_config(r, 8, {"q_proj", "v_proj"}), ps, r));
    const auto ref = logits_of(unresized, ids);
    for (int t = 0; t < 5; ++t)
      CHECK(std::memcmp(got.data() + t * 130, ref.data() + t * 128, 128 * sizeof(float)) == 0);
  }
}

TEST_CASE("LoRA adapters that cannot be merged are named errors", "[lora][checkpoints][errors]") {
  const index_t r = 4;
  const auto ps = make_pairs(r, 21);
  auto err = [&](const std::string& name, const nlohmann::json& cfg, std::vector<Pair> pairs = {}, index_t rr = 4) {
    return load_error(base_dir(), write_adapter(name, cfg, pairs.empty() ? ps : pairs, rr));
  };
  auto cfg = adapter_config(r, 8, {"q_proj", "v_proj"});
  {
    auto c = cfg;
    c["use_dora"] = true;
    CHECK_THAT(err("dora", c), Contains("DoRA"));
  }
  {
    auto c = cfg;
    c["peft_type"] = "PREFIX_TUNING";
    CHECK_THAT(err("prefix", c), Contains("peft_type 'PREFIX_TUNING' is not supported"));
  }
  {
    auto c = cfg;
    c["target_modules"] = {"q_proj", "v_proj", "query_key_value"};  // GPT-NeoX's, on a Llama
    CHECK_THAT(err("notarget", c), Contains("target_modules entry 'query_key_value' matches no module"));
  }
  {
    auto c = cfg;
    c["target_modules"] = {"q_proj"};  // v_proj pairs outside the targets
    CHECK_THAT(err("outside", c), Contains("which target_modules does not name"));
  }
  {
    auto bad = ps;
    bad[1].A.resize(std::size_t(3 * 64));  // rank 3 in A, 4 in B
    const fs::path d = fs::temp_directory_path() / "ctxcomp_lora_rank";
    fs::remove_all(d);
    fs::create_directories(d);
    write_json_file((d / "adapter_config.json").string(), cfg);
    std::vector<io::TensorOut> outs;
    for (std::size_t i = 0; i < bad.size(); ++i) {
      const index_t ra = i == 1 ? 3 : r;
      outs.push_back(io::TensorOut::of("base_model.model." + bad[i].module + ".lora_A.weight", {ra, 64}, bad[i].A.data()));
      outs.push_back(io::TensorOut::of("base_model.model." + bad[i].module + ".lora_B.weight", {bad[i].out, r}, bad[i].B.data()));
    }
    io::write_safetensors((d / "adapter_model.safetensors").string(), outs, {});
    CHECK_THAT(load_error(base_dir(), d.string()), Contains("the rank differs between A [3, 64] and B [32, 4]"));
  }
  {
    auto bad = ps;
    bad[0].out = 32, bad[0].B.resize(std::size_t(32 * r));  // q_proj is 64 x 64
    CHECK_THAT(err("shape", cfg, bad), Contains("does not fit the weight [64, 64]"));
  }
  {
    CHECK_THAT(err("rankcfg", adapter_config(8, 16, {"q_proj", "v_proj"})), Contains("has rank 4, adapter_config.json says r = 8"));
  }
  {
    const std::string d = write_adapter("bin", cfg, ps, r);
    fs::rename(d + "/adapter_model.safetensors", d + "/adapter_model.bin");
    CHECK_THAT(load_error(base_dir(), d), Contains("adapter_model.bin (a pickle) is not read; convert it"));
  }
  {
    auto c = cfg;
    c["bias"] = "lora_only";
    CHECK_THAT(err("bias", c), Contains("bias"));
  }
  {
    // injected layout without adapter_config.json; and an injected checkpoint given a second adapter
    const std::string inj = write_merged("inj_nocfg", ps, r, 0, true, cfg);
    CHECK_THAT(load_error(inj, write_adapter("second", cfg, ps, r)), Contains("already holds a LoRA"));
    fs::remove(inj + "/adapter_config.json");
    CHECK_THAT(load_error(inj), Contains("no 'adapter_config.json', so the LoRA scale"));
  }
}

TEST_CASE("ctxcomp fold --adapter writes what the merged checkpoint writes", "[lora][cli]") {
  const index_t r = 4;
  const auto ps = make_pairs(r, 31);
  const std::string ad = write_adapter("cli", adapter_config(r, 8, {"q_proj", "v_proj"}), ps, r);
  const std::string merged = write_merged("cli", ps, r, 2.0, false);
  const auto ids = some_ids(128);
  const std::string in = test::tmp("ctxcomp_lora_ids.safetensors");
  io::write_safetensors(in, {io::TensorOut::of("input_ids", {std::int64_t(ids.size())}, ids.data())}, {});
  const std::string a = test::tmp("ctxcomp_lora_a.safetensors"), b = test::tmp("ctxcomp_lora_b.safetensors");
  const auto ra = test::run_cli("fold --model " + base_dir() + " --adapter " + ad + " --input " + in + " --output " + a + " --cl 126 --cr 127");
  INFO(ra.err);
  REQUIRE(ra.status == 0);
  CHECK_THAT(ra.err, Contains("merged LoRA adapter"));
  const auto rb = test::run_cli("fold --model " + merged + " --input " + in + " --output " + b + " --cl 126 --cr 127");
  REQUIRE(rb.status == 0);
  auto sa = io::SafeTensors::open(a), sb = io::SafeTensors::open(b);
  for (const char* t : {"logits", "layer0_k", "layer1_v"}) {
    INFO(t);
    CHECK(sa.read<float>(t) == sb.read<float>(t));
  }
  const auto bad = test::run_cli("fold --model " + base_dir() + " --adapter " + base_dir() + " --input " + in +
                                 " --output " + a + " --cl 126 --cr 127");
  CHECK(bad.status != 0);
  CHECK_THAT(bad.err, Contains("adapter_config.json"));
}

}  // namespace test_io_lora
