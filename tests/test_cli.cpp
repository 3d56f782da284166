// The `ctxcomp` tool end to end: fixtures through the CLI, and its errors.
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "cli_runner.hpp"
#include "common.hpp"

using namespace ctxcomp;
namespace fs = std::filesystem;

using test::run_cli;
using test::tmp;
using Run = test::CliRun;

TEST_CASE("ctxcomp demo runs", "[cli]") { CHECK(run_cli("demo").status == 0); }

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
      auto es = io::SafeTensors::open(in);
      auto os = io::SafeTensors::open(out);
      CHECK(os.read<std::int64_t>("kept_index") == es.read<std::int64_t>("kept_index"));
      for (const char* t : {"logits", "layer0_k", "layer0_v", "layer1_k", "layer1_v"}) {
        INFO(t);
        const auto got = os.read<float>(t, es.info(t).shape);
        const auto expect = es.read<double>(t);
        CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
      }
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
