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
#include "common.hpp"
#include "sac_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_io_checkpoints {

using namespace ctxcomp;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

using test::layer_kv;
using namespace ctxcomp::test::checkpoints;

namespace {
using test::checkpoints::load_error;

}  // namespace



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

}  // namespace test_io_checkpoints
