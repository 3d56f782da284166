// The `ctxcomp` tool end to end: fixtures through the CLI, and its errors.
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "cli_runner.hpp"
#include "common.hpp"
#include "demo.hpp"
#include "fixture_checks.hpp"

using namespace ctxcomp;
namespace fs = std::filesystem;

using test::run_cli;
using test::tmp;
using Run = test::CliRun;

TEST_CASE("ctxcomp demo runs every method and its JSON is consistent", "[cli][demo]") {
  const Run r = run_cli("demo --tokens 256 --threads 2 --json");
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto j = nlohmann::json::parse(r.out);
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
    CHECK(row.at("compression_ratio").get<double>() == double(entries) / double(tokens));
    CHECK(row.at("kv_bytes_before").get<std::size_t>() == kv_bytes(tokens));
    CHECK(row.at("kv_bytes_after").get<std::size_t>() == kv_bytes(entries));
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
    if (cs.meta("use_chunk") == "True") CHECK(r.err.find("chunk 4/4") != std::string::npos);
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
              tmp("x.safetensors"));
  CHECK(r.status != 0);
  CHECK(r.err.find("no tensor named 'input_ids'") != std::string::npos);
  r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + test::fixtures_dir() +
              "/sentinel/sentinel_one_span.safetensors --output " + tmp("x.safetensors") + " --fold-at-end --fold-every-span");
  CHECK(r.status != 0);
  r = run_cli("fold --model " + test::fixtures_dir() + "/models/llama --input " + test::fixtures_dir() +
              "/sentinel/sentinel_one_span.safetensors --output " + tmp("x.safetensors") + " --cl 500");
  CHECK(r.status != 0);
  CHECK(r.err.find("outside the vocabulary") != std::string::npos);
  r = run_cli("icformer --help");
  CHECK(r.status == 0);
  CHECK(!fs::exists(tmp("x.safetensors")));
}
