// The `ctxcomp` tool end to end: fixtures through the CLI, and its errors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <thread>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "demo.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_cli_cli {

using namespace ctxcomp;
namespace fs = std::filesystem;

using test::run_cli;
using test::tmp;
using Run = test::CliRun;
using Catch::Matchers::Contains;
using test::layer_kv;
using namespace ctxcomp::test::checkpoints;
using namespace ctxcomp::test::sac;

TEST_CASE("ctxcomp demo runs every method and its JSON is consistent", "[cli][demo]") {
  const Run r = run_cli("demo --tokens 256 --threads 2 --json");
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto j = nlohmann::json::parse(r.out);
  // The tool and this test are built with the same flags: the same kernels for Compute::bf16.
  CHECK(j.at("bf16_compute").get<std::string>() == simd::bf16_compute_kernels());
  CHECK(j.at("bf16_compute").get<std::string>() ==
        (amx::enabled() ? "amx" : simd::Bf16Dot<simd::Vec>::native ? "avx512-bf16" : "emulated"));
  bool disturbed = false;
  for (const auto& row : j.at("rows"))
    disturbed = disturbed || row.at("decode_spread_full").get<double>() > 1.5 ||
                row.at("decode_spread_compressed").get<double>() > 1.5;
  CHECK(j.at("timings_disturbed").get<bool>() == disturbed);
  CHECK_THAT(j.at("note").get<std::string>(), Contains("digest embeddings") && Contains("anchor embeddings"));
  // The seeded host: 4 layers, 2 kv heads of 64, fp32 cache.
  const demo::SeededLlama seeded;
  const auto& c = seeded.model.config;
  auto kv_bytes = [&](index_t entries) { return std::size_t(2 * c.layers * c.kv_heads * entries * c.head_dim) * sizeof(float); };
  std::vector<std::string> methods;
  for (const auto& row : j.at("rows")) {
    const std::string m = row.at("method");
    INFO(m);
    methods.push_back(m);
    const index_t tokens = row.at("context_tokens"), entries = row.at("compressed_entries");
    CHECK(tokens == 256);
    CHECK(entries > 0);
    CHECK(entries < tokens);
    CHECK(row.at("compression_ratio").get<double>() == double(tokens) / double(entries));  // r: tokens per entry
    CHECK(row.at("kv_bytes_before").get<std::size_t>() == kv_bytes(tokens));
    CHECK(row.at("kv_bytes_after").get<std::size_t>() == kv_bytes(entries));
    // the spread of the timed decode steps (max / min), which flags disturbed timings
    CHECK(row.at("decode_spread_full").get<double>() >= 1.0);
    CHECK(row.at("decode_spread_compressed").get<double>() >= 1.0);
    for (const char* f : {"compress_seconds", "compress_tokens_per_s", "decode_ms_full", "decode_ms_compressed",
                          "logits_max_abs", "logits_kl"}) {
      INFO(f);
      REQUIRE(row.at(f).is_number());
      CHECK(std::isfinite(row.at(f).get<double>()));
      CHECK(row.at(f).get<double>() >= 0);
    }
    if (m == "sentinel") {
      // The same stream through the API: folding leaves the same entries.
      const auto context = demo::builtin_context(256, c.vocab);
      const auto stream = demo::sentinel_stream(context, c.vocab);
      host::LlamaHost<float> h(seeded.model);
      auto cache = h.make_cache(index_t(stream.size()));
      fold::SpanTracker spans(c.vocab - 2, c.vocab - 1, c.vocab);
      host::run_with_folding(h, stream.data(), index_t(stream.size()), spans, cache, host::FoldSchedule::EverySpan);
      CHECK(entries == cache.size());
      CHECK(row.at("kv_bytes_after").get<std::size_t>() == cache.bytes_used());
      CHECK(spans.closed_spans() == 5);  // 256 tokens: spans at 0, 48, ..., 192
    }
    if (m == "sac_r4") CHECK(entries == anchor::AnchorPlan::uniform(256, 256, 4).anchor_count());
    if (m == "icformer") CHECK(entries == 32);  // one chunk of 256 tokens, 32 digests
  }
  CHECK(methods == std::vector<std::string>{"icformer", "sentinel", "sac_r4", "sac_r16"});
  // The table form runs too, and names the caveat of random weights.
  const Run t = run_cli("demo --tokens 128");
  CHECK(t.status == 0);
  CHECK(t.out.find("sac_r16") != std::string::npos);
  CHECK(t.out.find("random") != std::string::npos);
  CHECK(run_cli("demo --tokens 10").status != 0);
}

TEST_CASE("ctxcomp icformer reproduces every IC-Former fixture", "[cli][icformer][fixtures]") {
  for (const char* c : {"icformer_basic", "icformer_chunked", "icformer_gqa_selfattn"}) {
    INFO(c);
    const std::string dir = test::fixtures_dir() + "/icformer/" + c;
    auto cs = io::SafeTensors::open(dir + "/case.safetensors");
    const std::string out = tmp(std::string("ctxcomp_cli_") + c + ".safetensors");
    const std::string args = "icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
                             "/case.safetensors --output " + out + " --max-chunk-len " + cs.meta("max_chunk_len") +
                             (cs.meta("use_chunk") == "True" ? "" : " --no-chunk") + " --threads 2";
    const Run r = run_cli(args);
    INFO(r.err);
    REQUIRE(r.status == 0);
    // stderr is a file here: no carriage-return progress, only the closing line
    CHECK(r.err.find('\r') == std::string::npos);
    CHECK(r.err.find("chunk 1/") == std::string::npos);
    auto os = io::SafeTensors::open(out);
    const auto got = os.read<float>("soft_prompt", cs.info("soft_prompt").shape);
    const auto expect = cs.read<double>("soft_prompt");
    CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
    std::remove(out.c_str());
  }
}

TEST_CASE("ctxcomp icformer --compute bf16 writes what the API computes", "[cli][icformer][bf16]") {
  const std::string dir = test::fixtures_dir() + "/icformer/icformer_chunked";
  auto cs = io::SafeTensors::open(dir + "/case.safetensors");
  auto ckpt = io::IcformerCheckpoint<float>::load(dir + "/model");
  const auto ctx = cs.read<float>("context_embeds"), dig = cs.read<float>("digest_embeds");
  const index_t d = ckpt.config().hidden, n = index_t(ctx.size()) / d, k = index_t(dig.size()) / d;
  const index_t max_len = std::stoll(cs.meta("max_chunk_len")), rows = digest::Chunking::of(n, max_len).count * k;
  digest::IcformerOptions bf;
  bf.compute = Compute::bf16;
  auto enc = ckpt.encoder();
  enc.set_options(bf);
  std::vector<float> api(std::size_t(rows * d));
  enc.compress_chunked(matrix_view<const float>(ctx.data(), n, d), matrix_view<const float>(dig.data(), k, d), max_len,
                       matrix_view(api.data(), rows, d));
  const std::string out = tmp("ctxcomp_cli_icformer_bf16.safetensors");
  const Run r = run_cli("icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
                        "/case.safetensors --output " + out + " --max-chunk-len " + cs.meta("max_chunk_len") +
                        " --threads 2 --compute bf16");
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.err, Contains(std::string("bf16 compute (") + simd::bf16_compute_kernels() + " kernels)"));
  auto os = io::SafeTensors::open(out);
  CHECK(os.meta("compute") == "bf16");
  CHECK(os.read<float>("soft_prompt") == api);
  std::remove(out.c_str());
  const Run bad = run_cli("icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
                          "/case.safetensors --output " + out + " --compute half");
  CHECK(bad.status != 0);
  CHECK(bad.err.find("--compute") != std::string::npos);
  CHECK(!fs::exists(out));
}

TEST_CASE("ctxcomp fold reproduces every sentinel fixture", "[cli][fold][fixtures]") {
  for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"})
    for (const char* schedule : {"--fold-every-span", "--fold-at-end"}) {
      INFO(c << " " << schedule);
      const std::string in = test::fixtures_dir() + "/sentinel/" + c + ".safetensors";
      const std::string out = tmp(std::string("ctxcomp_cli_") + c + ".safetensors");
      const Run r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + in + " --output " + out +
                            " --cl 126 --cr 127 --threads 2 " + schedule);
      INFO(r.err);
      REQUIRE(r.status == 0);
      test::check_fold_output(out, in);
      std::remove(out.c_str());
    }
}

TEST_CASE("ctxcomp fold takes <CL> / <CR> from the checkpoint's tokenizer files and never guesses", "[cli][fold]") {
  const std::string fx = test::fixtures_dir();
  const std::string in = fx + "/sentinel/sentinel_three_spans.safetensors";
  const std::string out = tmp("ctxcomp_cli_fold_tok.safetensors");
  std::remove(out.c_str());
  // The fixture model has no tokenizer files: without --cl / --cr nothing runs.
  Run r = run_cli("fold --model " + fx + "/models/llama --input " + in + " --output " + out);
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("no id for <CL>: --cl is not given") && Contains("holds no tokenizer files"));
  CHECK(!fs::exists(out));
  // The same model with the added tokens a training script saves: the ids come from there.
  const fs::path model = tmp("ctxcomp_cli_fold_tok_model");
  fs::remove_all(model);
  fs::create_directories(model);
  for (const auto& e : fs::directory_iterator(fx + "/models/llama")) fs::copy_file(e.path(), model / e.path().filename());
  std::ofstream(model / "tokenizer_config.json")
      << R"({"added_tokens_decoder": {"126": {"content": "<CL>"}, "127": {"content": "<CR>"}}})";
  r = run_cli("fold --model " + model.string() + " --input " + in + " --output " + out);
  INFO(r.err);
  REQUIRE(r.status == 0);
  test::check_fold_output(out, in);
  CHECK(io::SafeTensors::open(out).meta("cl_id") == "126");
  CHECK(io::SafeTensors::open(out).meta("cr_id") == "127");
  std::remove(out.c_str());
  // An input that ends inside a span is reported, and nothing is written.
  auto ids = io::SafeTensors::open(in).read<std::int64_t>("input_ids");
  ids.push_back(126);
  ids.push_back(5);
  const std::string open_in = tmp("ctxcomp_cli_fold_open_span.safetensors");
  io::write_safetensors(open_in, {io::TensorOut::of("input_ids", {index_t(ids.size())}, ids.data())});
  r = run_cli("fold --model " + model.string() + " --input " + open_in + " --output " + out);
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("input_ids ends inside a span: the <CL> (id 126) at token " +
                             std::to_string(ids.size() - 2) + " has no <CR>"));
  CHECK(!fs::exists(out));
  std::remove(open_in.c_str());
  fs::remove_all(model);
}

TEST_CASE("ctxcomp reports bad arguments and files", "[cli][errors]") {
  const std::string dir = test::fixtures_dir() + "/icformer/icformer_basic";
  Run r = run_cli("icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
                  "/model/model.safetensors --output " + tmp("x.safetensors"));
  CHECK(r.status != 0);
  CHECK(r.err.find("no tensor named 'context_embeds'") != std::string::npos);
  r = run_cli("icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
              "/model/config.json --output " + tmp("x.safetensors"));
  CHECK(r.status != 0);
  CHECK(r.err.find("safetensors") != std::string::npos);
  r = run_cli("icformer --checkpoint " + dir + "/model --digests " + dir + "/case.safetensors --input " + dir +
              "/case.safetensors --output " + tmp("x.safetensors") + " --max-chunk-len 0");
  CHECK(r.status != 0);
  CHECK(r.err.find("max-chunk-len") != std::string::npos);
  r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + dir + "/case.safetensors --output " +
              tmp("x.safetensors") + " --cl 126 --cr 127");
  CHECK(r.status != 0);
  CHECK(r.err.find("no tensor named 'input_ids'") != std::string::npos);
  r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + test::fixtures_dir() +
              "/sentinel/sentinel_one_span.safetensors --output " + tmp("x.safetensors") + " --fold-at-end --fold-every-span");
  CHECK(r.status != 0);
  r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + test::fixtures_dir() +
              "/sentinel/sentinel_one_span.safetensors --output " + tmp("x.safetensors") + " --cl 500 --cr 127");
  CHECK(r.status != 0);
  CHECK(r.err.find("outside the vocabulary") != std::string::npos);
  r = run_cli("icformer --help");
  CHECK(r.status == 0);
  CHECK(!fs::exists(tmp("x.safetensors")));
}


TEST_CASE("the CLI names unknown subcommands and options, its version and exit codes, and the flag at fault",
          "[cli][errors]") {
  Run r = run_cli("--version");
  CHECK(r.status == 0);
  CHECK(r.out.find("ctxcomp " + std::to_string(CTXCOMP_VERSION_MAJOR) + "." + std::to_string(CTXCOMP_VERSION_MINOR) +
                   "." + std::to_string(CTXCOMP_VERSION_PATCH)) != std::string::npos);
  // an unknown subcommand: named, with the closest one, exit 109 (CLI11's code for extras)
  r = run_cli("fodl --model x");
  CHECK(r.status == 109 << 8);
  CHECK_THAT(r.err, Contains("'fodl' is not a ctxcomp subcommand (did you mean 'fold'?)"));
  r = run_cli("frobnicate");
  CHECK(r.status == 109 << 8);
  CHECK_THAT(r.err, Contains("'frobnicate' is not a ctxcomp subcommand; the subcommands are"));
  // a mistyped option is reported as such, not as the required option it was meant to be
  const std::string fx = test::fixtures_dir();
  r = run_cli("fold --model " + fx + "/models/llama --inptu x --output " + tmp("x.safetensors"));
  CHECK(r.status == 109 << 8);
  CHECK_THAT(r.err, Contains("ctxcomp fold: unknown option '--inptu' (did you mean '--input'?)"));
  r = run_cli("sac --model=" + fx + "/models/llama --chunk-sise=4");
  CHECK(r.status == 109 << 8);
  CHECK_THAT(r.err, Contains("unknown option '--chunk-sise' (did you mean '--chunk-size'?)"));
  // a required option really missing: CLI11's 106
  r = run_cli("fold --model " + fx + "/models/llama --output " + tmp("x.safetensors"));
  CHECK(r.status == 106 << 8);
  CHECK_THAT(r.err, Contains("--input"));
  // a file of the wrong kind names its flag
  r = run_cli("fold --model " + fx + "/models/llama --input " + fx + "/models/llama/config.json --output " +
              tmp("x.safetensors") + " --cl 126 --cr 127");
  CHECK(r.status == 1 << 8);
  CHECK_THAT(r.err, Contains("--input '") && Contains("config.json' is not a readable safetensors file"));
  // --help lists the exit codes and the thread default
  r = run_cli("fold --help");
  CHECK(r.status == 0);
  CHECK_THAT(r.out, Contains("Exit codes: 0 success; 1 an error while running") && Contains("109 an unknown subcommand"));
  CHECK_THAT(r.out, Contains("default: all " + std::to_string(std::clamp(int(std::thread::hardware_concurrency()), 1, 64)) +
                             " cores here"));
  CHECK(!fs::exists(tmp("x.safetensors")));
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


TEST_CASE("--engine llama.cpp in a build without llama.cpp is a named error", "[cli][errors]") {
#ifndef CTXCOMP_WITH_LLAMACPP
  const std::string out = test::tmp("ctxcomp_cli_engine.safetensors");
  std::remove(out.c_str());
  const std::string in = test::fixtures_dir() + "/sentinel/sentinel_one_span.safetensors";
  const auto r = test::run_cli("fold --engine llama.cpp --model " + test::fixtures_dir() + "/models/llama --input " + in +
                               " --output " + out + " --cl 126 --cr 127");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("--engine llama.cpp needs a ctxcomp built with llama.cpp"));
  CHECK(!fs::exists(out));
  const auto rb = test::run_cli("fold --engine vllm --model " + test::fixtures_dir() + "/models/llama --input " + in +
                                " --output " + out + " --cl 126 --cr 127");
  CHECK(rb.status != 0);
  CHECK(!fs::exists(out));
#endif
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


TEST_CASE("ctxcomp fold and sac give the fixtures' outputs in every --kv-layout", "[layouts][cli]") {
  const std::string fx = test::fixtures_dir();
  for (const char* layout : {"contiguous", "cells", "paged"}) {
    for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"}) {
      INFO(c << " --kv-layout " << layout);
      const std::string in = fx + "/sentinel/" + c + ".safetensors";
      const std::string out = test::tmp(std::string("layout_fold_") + layout + ".safetensors");
      REQUIRE(test::run_cli("fold --model " + fx + "/models/llama --input " + in + " --output " + out + " --kv-layout " +
                            layout + " --block-size 5 --cl 126 --cr 127")
                  .status == 0);
      test::check_fold_output(out, in);
      CHECK(io::SafeTensors::open(out).meta("kv_layout") == layout);
    }
    for (const char* c : {"sac_basic", "sac_multichunk", "sac_ratio5", "sac_anchor_bidir_multichunk"}) {
      INFO(c << " --kv-layout " << layout);
      const std::string in = fx + "/sac/" + c + ".safetensors";
      const std::string out = test::tmp(std::string("layout_sac_") + layout + ".safetensors");
      auto es = io::SafeTensors::open(in);
      REQUIRE(test::run_cli("sac --model " + fx + "/models/llama --anchor-embeds " + in + " --input " + in +
                            " --output " + out + " --chunk-size " + es.meta("chunk_size") + " --ratio " +
                            es.meta("compress_ratio") + " --mask " + es.meta("mask") + " --kv-layout " + layout +
                            " --block-size 3")
                  .status == 0);
      auto os = io::SafeTensors::open(out);
      CHECK(os.meta("kv_layout") == layout);
      CHECK(os.read<std::int64_t>("anchor_position_ids") == es.read<std::int64_t>("anchor_position_ids"));
      for (const char* t : {"decode_logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"}) {
        INFO(t);
        const auto got = os.read<float>(t, es.info(t).shape);
        const auto expect = es.read<double>(t);
        CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
      }
    }
  }
  const auto bad = test::run_cli("fold --model " + fx + "/models/llama --input " + fx +
                                 "/sentinel/sentinel_one_span.safetensors --output " + test::tmp("bad.safetensors") +
                                 " --kv-layout ring");
  CHECK(bad.status != 0);
  CHECK_THAT(bad.err, Contains("--kv-layout"));
  CHECK(test::run_cli("sac --model " + fx + "/models/llama --anchor-embeds " + fx + "/sac/sac_basic.safetensors --input " +
                      fx + "/sac/sac_basic.safetensors --output " + test::tmp("bad.safetensors") +
                      " --chunk-size 8 --ratio 4 --kv-layout paged --block-size 0")
            .status != 0);
}


TEST_CASE("fold and sac --kv-type fp16 / bf16 / int8 stay within the documented bounds, in every layout",
          "[cli][fold][sac][kv_types]") {
  // docs/integration.md ("K/V storage types"): logits and kept K/V within 4 unit roundoffs u of
  // the storage type (fp16 2^-11, bf16 2^-8; int8: half a quantisation step of a row, 1/254 of
  // its largest magnitude), relative to the tensor's largest magnitude, of the official float64
  // outputs.
  struct Type {
    const char* name;
    double u;
  };
  const std::string fx = test::fixtures_dir();
  // Each output tensor against the fixture's float64 one, and the type recorded in the metadata.
  auto check_outputs = [](io::SafeTensors& es, io::SafeTensors& os, const Type& ty, std::initializer_list<const char*> names) {
    const double bound = 4 * ty.u;
    CHECK(os.meta("kv_type") == ty.name);
    for (const char* t : names) {
      const auto got = os.read<float>(t, es.info(t).shape);
      const auto expect = es.read<double>(t);
      const double err = test::relative_error(got.data(), expect.data(), got.size());
      INFO(t << ": " << err << " (bound " << bound << ")");
      CHECK(err <= bound);
    }
  };
  for (const Type ty : {Type{"fp16", std::ldexp(1.0, -11)}, Type{"bf16", std::ldexp(1.0, -8)}, Type{"int8", 1.0 / 254}}) {
    for (const char* layout : {"contiguous", "cells", "paged"}) {
      for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"}) {
        INFO(c << " --kv-type " << ty.name << " --kv-layout " << layout);
        const std::string in = fx + "/sentinel/" + c + ".safetensors";
        const std::string out = test::tmp(std::string("kvtype_fold_") + ty.name + ".safetensors");
        const auto r = test::run_cli("fold --model " + fx + "/models/llama --input " + in + " --output " + out +
                                     " --kv-type " + ty.name + " --kv-layout " + layout + " --block-size 5 --cl 126 --cr 127");
        INFO(r.err);
        REQUIRE(r.status == 0);
        auto es = io::SafeTensors::open(in);
        auto os = io::SafeTensors::open(out);
        CHECK(os.read<std::int64_t>("kept_index") == es.read<std::int64_t>("kept_index"));
        check_outputs(es, os, ty, {"logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"});
      }
      for (const char* c : {"sac_basic", "sac_multichunk", "sac_ratio5", "sac_anchor_bidir_multichunk"}) {
        INFO(c << " --kv-type " << ty.name << " --kv-layout " << layout);
        const std::string in = fx + "/sac/" + c + ".safetensors";
        const std::string out = test::tmp(std::string("kvtype_sac_") + ty.name + ".safetensors");
        auto es = io::SafeTensors::open(in);
        const auto r = test::run_cli("sac --model " + fx + "/models/llama --anchor-embeds " + in + " --input " + in +
                                     " --output " + out + " --chunk-size " + es.meta("chunk_size") + " --ratio " +
                                     es.meta("compress_ratio") + " --mask " + es.meta("mask") + " --kv-type " + ty.name +
                                     " --kv-layout " + layout + " --block-size 3");
        INFO(r.err);
        REQUIRE(r.status == 0);
        auto os = io::SafeTensors::open(out);
        check_outputs(es, os, ty, {"decode_logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"});
      }
    }
  }
  // Another name, or --kv-type with llama.cpp's cache, is refused by name.
  auto r = test::run_cli("fold --model " + fx + "/models/llama --input " + fx + "/sentinel/sentinel_one_span.safetensors" +
                         " --output " + test::tmp("bad.safetensors") + " --cl 126 --cr 127 --kv-type fp8");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("--kv-type"));
  r = test::run_cli("sac --model " + fx + "/models/llama --anchor-embeds " + fx + "/sac/sac_basic.safetensors --input " + fx +
                    "/sac/sac_basic.safetensors --output " + test::tmp("bad.safetensors") +
                    " --chunk-size 8 --ratio 4 --kv-type int8 --engine llama.cpp");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("--kv-type") || Contains("needs a ctxcomp built with llama.cpp"));
}

TEST_CASE("ctxcomp sac reproduces every sac fixture", "[cli][sac][fixtures]") {
  for (const char* c : kCases) {
    INFO(c);
    Fixture f(c);
    const std::string out = tmp(std::string("ctxcomp_cli_") + c + ".safetensors");
    const Run r = run_cli("sac --model " + llama_dir() + " --anchor-embeds " + case_path(c) + " --input " + case_path(c) +
                          " --output " + out + " --chunk-size " + std::to_string(f.chunk) + " --ratio " +
                          std::to_string(f.ratio) + " --mask " + f.st.meta("mask") + " --threads 2");
    INFO(r.err);
    REQUIRE(r.status == 0);
    auto os = io::SafeTensors::open(out);
    CHECK(os.read<std::int64_t>("anchor_position_ids") == f.st.read<std::int64_t>("anchor_position_ids"));
    for (const char* t : {"decode_logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"}) {
      INFO(t);
      const auto got = os.read<float>(t, f.st.info(t).shape);
      const auto expect = f.st.read<double>(t);
      CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
    }
    std::remove(out.c_str());
  }
}


TEST_CASE("ctxcomp sac reports bad arguments", "[cli][sac][errors]") {
  const std::string base = "sac --model " + llama_dir() + " --anchor-embeds " + case_path("sac_basic") + " --output " +
                           tmp("sac_x.safetensors") + " --input ";
  const std::string in = case_path("sac_basic");
  Run r = run_cli(base + in + " --chunk-size 24 --ratio 0");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("compression ratio (0) must be positive"));
  r = run_cli(base + in + " --chunk-size 0 --ratio 4");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("chunk_size (0) must be positive"));
  r = run_cli(base + in + " --chunk-size 24 --ratio 1");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("24 anchors but there are only 16 role (anchor) embeddings"));
  const std::string empty = tmp("sac_empty.safetensors");
  const std::vector<std::int64_t> none;
  io::write_safetensors(empty, {io::TensorOut::of("input_ids", {0}, none.data())}, {});
  r = run_cli(base + empty + " --chunk-size 24 --ratio 4");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("input_ids is empty"));
  r = run_cli(base + in + " --chunk-size 24 --ratio 4 --mask causal");
  CHECK(r.status != 0);
  r = run_cli("sac --model " + llama_dir() + " --anchor-embeds " + llama_dir() + "/model.safetensors --output " +
              tmp("sac_x.safetensors") + " --input " + in + " --chunk-size 24 --ratio 4");
  CHECK(r.status != 0);
  CHECK_THAT(r.err, Contains("no tensor named 'role_tokens'"));
  CHECK(!fs::exists(tmp("sac_x.safetensors")));
  std::remove(empty.c_str());
}


TEST_CASE("ctxcomp sac --compute bf16 writes what the API computes", "[cli][sac][bf16]") {
  const char* c = "sac_multichunk";
  Fixture f(c);
  const auto model = host::LlamaModel<float>::load(llama_dir());
  host::LlamaHost<float> h(model);
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  auto cache = h.make_cache(plan.anchor_count() + index_t(f.targets.size()) + 2);
  host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache, SerialExecutor{}, nullptr, Compute::bf16);
  const auto logits =
      host::sac_decode(h, plan, cache, f.special.data() + 64, f.targets.data(), index_t(f.targets.size()));
  const std::string out = tmp("ctxcomp_cli_sac_bf16.safetensors");
  const Run r = run_cli("sac --model " + llama_dir() + " --anchor-embeds " + case_path(c) + " --input " + case_path(c) +
                        " --output " + out + " --chunk-size " + std::to_string(f.chunk) + " --ratio " +
                        std::to_string(f.ratio) + " --mask " + f.st.meta("mask") + " --threads 2 --compute bf16");
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.err, Contains(std::string("bf16 compute (") + simd::bf16_compute_kernels() + " kernels)"));
  auto os = io::SafeTensors::open(out);
  CHECK(os.meta("compute") == "bf16");
  CHECK(os.read<float>("decode_logits") == logits);
  for (index_t l = 0; l < 2; ++l) {
    CHECK(os.read<float>("layer" + std::to_string(l) + "_k") == layer_kv(cache, l, false));
    CHECK(os.read<float>("layer" + std::to_string(l) + "_v") == layer_kv(cache, l, true));
  }
  const Run bad = run_cli("sac --model " + llama_dir() + " --anchor-embeds " + case_path(c) + " --input " +
                          case_path(c) + " --output " + out + " --chunk-size 8 --ratio 4 --compute fp16");
  CHECK(bad.status != 0);
  CHECK_THAT(bad.err, Contains("--compute"));
  std::remove(out.c_str());
}

}  // namespace test_cli_cli
