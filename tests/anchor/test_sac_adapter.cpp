// SAC's compressing LoRA (issue 33 item 3): examples/convert_sac_adapter.py turns a torch-written
// adapter.pt (tests/data/sac_adapter, made by make_adapter_pt.py with PyTorch) into exactly the
// tensors PyTorch holds; `ctxcomp sac --sac-adapter` compresses with the LoRA merged (here in
// double: W + 2 (A B)^T) and decodes with the base weights, bit for bit the API run with those
// compressing layers; a PEFT adapter directory works for the compressing pass too; adapters of
// another model are named errors.
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include <ctxcomp/io/lora.hpp>
#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_anchor_sac_adapter {

using namespace ctxcomp;
using Catch::Matchers::Contains;
using namespace ctxcomp::test::sac;

namespace {
std::string data_dir() { return test::fixtures_dir() + "/../sac_adapter"; }
std::string source_dir() { return test::fixtures_dir() + "/../../.."; }

/// Converts the committed adapter.pt with the repository's converter; returns the output path.
std::string converted() {
  const std::string out = test::tmp("ctxcomp_sac_adapter.safetensors");
  const std::string cmd = "python3 " + source_dir() + "/examples/convert_sac_adapter.py " + data_dir() +
                          "/adapter.pt " + out + " > " + test::tmp("ctxcomp_sac_adapter.log") + " 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  return out;
}

/// The model's layers with q_proj / v_proj merged from the expected (PyTorch's) values, in
/// double: W + 2 (A B)^T, A [in x r], B [r x out], rounded once.
struct Merged {
  std::vector<host::LlamaLayerWeights<float>> layers;
  std::deque<std::vector<float>> owned;
};
Merged merge_reference(const host::LlamaModel<float>& model) {
  auto ex = io::SafeTensors::open(data_dir() + "/adapter_expected.safetensors");
  Merged m;
  m.layers = model.layers;
  for (index_t l = 0; l < model.config.layers; ++l)
    for (const char* proj : {"q_proj", "v_proj"}) {
      auto& wv = std::string(proj) == "q_proj" ? m.layers[std::size_t(l)].q : m.layers[std::size_t(l)].v;
      const std::int64_t out = wv.out_features, in = wv.in_features;
      const std::string p = "layers." + std::to_string(l) + "." + proj + ".lora_";
      const auto A = ex.read<float>(p + "A"), B = ex.read<float>(p + "B");
      const std::int64_t r = std::int64_t(A.size()) / in;
      std::vector<float> w(wv.data, wv.data + out * in);
      for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t i = 0; i < in; ++i) {
          double d = 0;
          for (std::int64_t k = 0; k < r; ++k) d += double(A[std::size_t(i * r + k)]) * double(B[std::size_t(k * out + o)]);
          w[std::size_t(o * in + i)] = float(double(w[std::size_t(o * in + i)]) + 2.0 * d);
        }
      m.owned.push_back(std::move(w));
      wv.data = m.owned.back().data();
    }
  return m;
}

std::string sac_error(const std::string& args) {
  const auto r = test::run_cli("sac --model " + llama_dir() + " --input " + case_path("sac_basic") + " --output " +
                               test::tmp("ctxcomp_sac_adapter_bad.safetensors") + " --chunk-size 24 --ratio 4 " + args);
  return r.status == 0 ? std::string("(exit 0)") : r.err;
}
}  // namespace

TEST_CASE("convert_sac_adapter.py writes PyTorch's own tensors from adapter.pt", "[sac][lora][cli]") {
  auto got = io::SafeTensors::open(converted());
  auto ex = io::SafeTensors::open(data_dir() + "/adapter_expected.safetensors");
  REQUIRE(got.tensors().size() == ex.tensors().size());
  for (const auto& t : ex.tensors()) {
    INFO(t.name);
    REQUIRE(got.contains(t.name));
    CHECK(got.info(t.name).shape == t.shape);
    CHECK(got.read<float>(t.name) == ex.read<float>(t.name));  // bf16 -> f32 is exact
  }
  CHECK(got.info("layers.0.q_proj.lora_A").dtype == io::DType::BF16);  // stored dtype kept
}

TEST_CASE("ctxcomp sac --sac-adapter compresses with the LoRA and decodes with the base weights", "[sac][lora][cli]") {
  const std::string adapter = converted();
  const Fixture f("sac_basic");
  const auto model = host::LlamaModel<float>::load(llama_dir());
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  auto ex = io::SafeTensors::open(data_dir() + "/adapter_expected.safetensors");
  const auto roles = ex.read<float>("role_tokens"), special = ex.read<float>("special_tokens");

  // The API with compressing layers merged here in double; the embeddings from the adapter.
  const Merged ref = merge_reference(model);
  host::LlamaHost<float> h(model);
  auto cache = h.make_cache(plan.anchor_count() + f.n() + 2);
  host::sac_compress(h, plan, f.ids.data(), matrix_view<const float>(roles.data(), 16, 64), f.mask, cache,
                     SerialExecutor{}, &ref.layers);
  const auto logits = host::sac_decode(h, plan, cache, special.data() + 64, f.targets.data(), index_t(f.targets.size()));

  // The library's own merge gives the same compressing layers.
  const auto sw = host::SacCompressingWeights<float>::load(model, adapter);
  for (index_t l = 0; l < 2; ++l) {
    const auto& a = sw.layers()[std::size_t(l)].q;
    CHECK(std::memcmp(a.data, ref.layers[std::size_t(l)].q.data, std::size_t(64 * 64) * sizeof(float)) == 0);
    CHECK(std::memcmp(sw.layers()[std::size_t(l)].v.data, ref.layers[std::size_t(l)].v.data, std::size_t(32 * 64) * sizeof(float)) == 0);
    CHECK(sw.layers()[std::size_t(l)].k.data == model.layers[std::size_t(l)].k.data);  // untouched: shared
  }

  // The CLI: no --anchor-embeds (the adapter has them).
  const std::string out = test::tmp("ctxcomp_sac_adapter_out.safetensors");
  const auto r = test::run_cli("sac --model " + llama_dir() + " --sac-adapter " + adapter + " --input " +
                               case_path("sac_basic") + " --output " + out + " --chunk-size 24 --ratio 4");
  INFO(r.err);
  REQUIRE(r.status == 0);
  auto so = io::SafeTensors::open(out);
  CHECK(so.read<float>("decode_logits") == logits);
  for (index_t l = 0; l < 2; ++l) {
    CHECK(so.read<float>("layer" + std::to_string(l) + "_k") == test::layer_kv(cache, l, false));
    CHECK(so.read<float>("layer" + std::to_string(l) + "_v") == test::layer_kv(cache, l, true));
  }
  // ... and the compressing LoRA changed the compressed cache (the base run is the fixture's)
  auto base = h.make_cache(plan.anchor_count() + f.n() + 2);
  host::sac_compress(h, plan, f.ids.data(), matrix_view<const float>(roles.data(), 16, 64), f.mask, base);
  CHECK(test::layer_kv(base, 1, false) != test::layer_kv(cache, 1, false));
}

TEST_CASE("a compressing LoRA in either format gives transformers' SAC outputs", "[sac][lora][cli][fixtures]") {
  // sac_lora_case.safetensors: transformers' LlamaForCausalLM in float64, q_proj / v_proj of the
  // compressing copy merged with adapter.pt's LoRA (y = x W^T + 2 x A B), decoding with the base
  // (make_sac_lora_cases.py). peft/ is the same LoRA as a PEFT directory (alpha / r = 2).
  const std::string in = data_dir() + "/sac_lora_case.safetensors";
  const std::string out = test::tmp("ctxcomp_sac_lora_case.safetensors");
  for (const std::string& adapter : {converted(), data_dir() + "/peft"}) {
    INFO(adapter);
    std::remove(out.c_str());
    // The converted adapter.pt brings role_tokens / special_tokens; the PEFT directory does not.
    const std::string embeds = adapter == converted() ? "" : " --anchor-embeds " + in;
    const auto r = test::run_cli("sac --model " + llama_dir() + " --sac-adapter " + adapter + embeds + " --input " + in +
                                 " --output " + out + " --chunk-size 24 --ratio 4 --threads 2");
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_sac_output(out, in);
  }
  std::remove(out.c_str());
}

TEST_CASE("a PEFT adapter directory as the compressing LoRA", "[sac][lora][cli]") {
  // One PEFT pair on layer 0's q_proj (r 2, alpha 4): the compressing layers are the model
  // loaded with that adapter; decoding uses the base.
  namespace fs = std::filesystem;
  const fs::path d = fs::temp_directory_path() / "ctxcomp_sac_peft";
  fs::remove_all(d);
  fs::create_directories(d);
  test::checkpoints::write_json_file((d / "adapter_config.json").string(),
                                     {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj"}},
                                      {"bias", "none"}});
  const auto A = test::random_vector(2 * 64, 5), B = test::random_vector(64 * 2, 6);
  io::write_safetensors((d / "adapter_model.safetensors").string(),
                        {io::TensorOut::of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", {2, 64}, A.data()),
                         io::TensorOut::of("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", {64, 2}, B.data())},
                        {});
  const Fixture f("sac_basic");
  const auto model = host::LlamaModel<float>::load(llama_dir());
  const auto with = host::LlamaModel<float>::load(llama_dir(), d.string());
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  host::LlamaHost<float> h(model);
  auto cache = h.make_cache(plan.anchor_count() + f.n() + 2);
  host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache, SerialExecutor{}, &with.layers);
  const auto logits = host::sac_decode(h, plan, cache, f.special.data() + 64, f.targets.data(), index_t(f.targets.size()));
  const std::string out = test::tmp("ctxcomp_sac_peft_out.safetensors");
  const auto r = test::run_cli("sac --model " + llama_dir() + " --sac-adapter " + d.string() + " --anchor-embeds " +
                               case_path("sac_basic") + " --input " + case_path("sac_basic") + " --output " + out +
                               " --chunk-size 24 --ratio 4");
  INFO(r.err);
  REQUIRE(r.status == 0);
  auto so = io::SafeTensors::open(out);
  CHECK(so.read<float>("decode_logits") == logits);
  CHECK(so.read<float>("layer0_k") == test::layer_kv(cache, 0, false));
  // a PEFT compressing adapter needs --anchor-embeds
  CHECK_THAT(sac_error("--sac-adapter " + d.string()), Contains("--anchor-embeds is required"));
}

TEST_CASE("SAC adapters of another model or malformed are named errors", "[sac][lora][cli][errors]") {
  auto write = [](const std::string& name, std::vector<io::TensorOut> ts) {
    const std::string p = test::tmp("ctxcomp_sac_bad_" + name + ".safetensors");
    io::write_safetensors(p, ts, {});
    return p;
  };
  const auto big = test::random_vector(128 * 4, 1), b4 = test::random_vector(4 * 64, 2), b3 = test::random_vector(3 * 64, 3);
  CHECK_THAT(sac_error("--anchor-embeds " + case_path("sac_basic") + " --sac-adapter " +
                       write("shape", {io::TensorOut::of("layers.0.q_proj.lora_A", {128, 4}, big.data()),
                                       io::TensorOut::of("layers.0.q_proj.lora_B", {4, 64}, b4.data())})),
             Contains("do not fit the model's q_proj [64 x 64]"));
  CHECK_THAT(sac_error("--anchor-embeds " + case_path("sac_basic") + " --sac-adapter " +
                       write("layer", {io::TensorOut::of("layers.5.q_proj.lora_A", {64, 4}, big.data()),
                                       io::TensorOut::of("layers.5.q_proj.lora_B", {4, 64}, b4.data())})),
             Contains("holds a LoRA for layer 5, the model has 2 layers"));
  CHECK_THAT(sac_error("--anchor-embeds " + case_path("sac_basic") + " --sac-adapter " +
                       write("rank", {io::TensorOut::of("layers.0.q_proj.lora_A", {64, 4}, big.data()),
                                      io::TensorOut::of("layers.0.q_proj.lora_B", {3, 64}, b3.data())})),
             Contains("the rank differs"));
  CHECK_THAT(sac_error("--anchor-embeds " + case_path("sac_basic") + " --sac-adapter " +
                       write("name", {io::TensorOut::of("model.layers.0.q_proj.weight", {64, 4}, big.data())})),
             Contains("is not one convert_sac_adapter.py writes"));
  CHECK_THAT(sac_error("--sac-adapter " + write("noemb", {io::TensorOut::of("layers.0.q_proj.lora_A", {64, 4}, big.data()),
                                                          io::TensorOut::of("layers.0.q_proj.lora_B", {4, 64}, b4.data())})),
             Contains("--anchor-embeds is required"));
  // the converter refuses a file that is not a torch.save archive
  const std::string bad = test::tmp("ctxcomp_sac_not_a_zip.pt");
  { std::ofstream(bad) << "not a zip"; }
  const std::string cmd = "python3 " + source_dir() + "/examples/convert_sac_adapter.py " + bad + " " +
                          test::tmp("ctxcomp_sac_x.safetensors") + " > " + test::tmp("ctxcomp_sac_conv.log") + " 2>&1";
  CHECK(std::system(cmd.c_str()) != 0);
}

}  // namespace test_anchor_sac_adapter
