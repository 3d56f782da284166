// GGUF files as checkpoints (io/gguf.hpp): what convert_to_gguf writes reads back to the same
// weights (q/k rows un-permuted, F16 / BF16 as stored) and the same logits, bit for bit, through
// the API and `ctxcomp fold --model FILE.gguf` (Llama 3 RoPE comes back as llama.cpp's
// per-frequency factors: the fixture's logits within its tolerance); Q8_0 tensors dequantise as llama.cpp defines
// them; malformed files, unknown keys and tensors, missing or mis-shaped tensors and unsupported
// architectures are named errors.
#include <cstdio>
#include <fstream>

#include <ctxcomp/io/gguf.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "fold_driver.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_io_gguf {

using namespace ctxcomp;
using Catch::Matchers::Contains;

namespace {
using test::checkpoints::load_error;

/// A tiny llama GGUF written here (hidden 8, 2 heads of 4, 1 layer, ff 32, vocab 10): `meta_edit`
/// is applied to the writer before the tensors, `keep` selects them, `v_shape` is attn_v's.
std::string tiny(const std::string& name, const std::function<void(io::GgufWriter&)>& meta_edit,
                 const std::function<bool(const std::string&)>& keep = [](const std::string&) { return true; },
                 std::vector<std::int64_t> v_shape = {8, 8}) {
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.embedding_length", 8);
  w.add_u32("llama.block_count", 1);
  w.add_u32("llama.feed_forward_length", 32);
  w.add_u32("llama.attention.head_count", 2);
  w.add_u32("llama.attention.head_count_kv", 2);
  w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  meta_edit(w);
  auto add = [&](const std::string& n, std::vector<std::int64_t> shape) {
    if (!keep(n)) return;
    std::int64_t k = 1;
    for (auto e : shape) k *= e;
    const auto v = test::random_vector(std::size_t(k), unsigned(k), -0.5f, 0.5f);
    w.add_tensor(n, shape, v.data(), io::GgmlType::f32);
  };
  add("token_embd.weight", {10, 8});
  add("output_norm.weight", {8});
  add("blk.0.attn_norm.weight", {8});
  add("blk.0.ffn_norm.weight", {8});
  add("blk.0.attn_q.weight", {8, 8});
  add("blk.0.attn_k.weight", {8, 8});
  add("blk.0.attn_v.weight", v_shape);
  add("blk.0.attn_output.weight", {8, 8});
  add("blk.0.ffn_gate.weight", {32, 8});
  add("blk.0.ffn_up.weight", {32, 8});
  add("blk.0.ffn_down.weight", {8, 32});
  const std::string p = test::tmp("ctxcomp_gguf_" + name + ".gguf");
  w.write(p);
  return p;
}
}  // namespace

TEST_CASE("a converted GGUF reads back to the checkpoint's weights and logits, bit for bit", "[gguf][checkpoints]") {
  struct Case {
    std::string dir, type;
    std::int64_t cl, cr;
    std::string case_file;
    bool llama3 = false;  // Llama 3 RoPE: read back as llama.cpp's per-frequency factors
  };
  const std::vector<Case> cases{
      {test::fixtures_dir() + "/models/llama", "f32", 126, 127, test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors"},
      {test::checkpoints::case_dir("qwen2_bias_fp16") + "/model", "f16", 158, 159,
       test::checkpoints::case_dir("qwen2_bias_fp16") + "/case.safetensors"},
      {test::checkpoints::case_dir("qwen3_qknorm_bf16") + "/model", "bf16", 158, 159,
       test::checkpoints::case_dir("qwen3_qknorm_bf16") + "/case.safetensors"},
      {test::checkpoints::case_dir("llama3_tied_sharded_bf16") + "/model", "bf16", 158, 159,
       test::checkpoints::case_dir("llama3_tied_sharded_bf16") + "/case.safetensors", true}};
  for (const auto& c : cases) {
    INFO(c.dir << " as " << c.type);
    const std::string g = test::tmp("ctxcomp_gguf_roundtrip.gguf");
    io::convert_to_gguf(c.dir, g, io::parse_gguf_weight_type(c.type));
    const auto a = host::LlamaModel<float>::load(c.dir);
    const auto b = host::LlamaModel<float>::load(g);
    CHECK(b.config.arch.name == a.config.arch.name);
    CHECK((b.config.hidden == a.config.hidden && b.config.heads == a.config.heads && b.config.kv_heads == a.config.kv_heads &&
           b.config.head_dim == a.config.head_dim && b.config.vocab == a.config.vocab && b.config.rms_eps == a.config.rms_eps &&
           b.config.rope.theta == static_cast<double>(static_cast<float>(a.config.rope.theta))));
    for (index_t l = 0; l < a.config.layers; ++l) {
      const auto &la = a.layers[std::size_t(l)], &lb = b.layers[std::size_t(l)];
      for (auto [x, y] : {std::pair{la.q, lb.q}, {la.k, lb.k}, {la.v, lb.v}, {la.o, lb.o}})
        REQUIRE(std::equal(x.data, x.data + x.out_features * x.in_features, y.data));
    }
    if (c.llama3) {
      // The file holds the rule as divisors (rope_freqs), as llama.cpp reads it: the same
      // frequencies up to fp32 rounding, so the logits are checked against the fixture below.
      REQUIRE(a.config.rope.llama3.enabled());
      CHECK(!b.config.rope.llama3.enabled());
      CHECK(b.config.rope.freq_factors == llama3_freq_factors(a.config.rope, a.config.head_dim));
      const auto fa = Rope(a.config.rope, a.config.head_dim).inv_freq(), fb = Rope(b.config.rope, b.config.head_dim).inv_freq();
      REQUIRE(fa.size() == fb.size());
      for (std::size_t i = 0; i < fa.size(); ++i) CHECK(std::abs(fa[i] - fb[i]) <= 1e-6 * fa[i]);
    } else {
      auto st = io::SafeTensors::open(c.case_file);
      const auto ids = st.read<std::int64_t>("input_ids");
      std::vector<float> logits[2];
      for (int i = 0; i < 2; ++i) {
        host::LlamaHost<float> h(i ? b : a);
        auto cache = h.make_cache(index_t(ids.size()));
        fold::SpanTracker spans(c.cl, c.cr, a.config.vocab);
        logits[i] = host::run_with_folding(h, ids.data(), index_t(ids.size()), spans, cache, host::FoldSchedule::EverySpan);
      }
      CHECK(logits[0] == logits[1]);
    }
    // The CLI takes the file where it takes a directory.
    const std::string out = test::tmp("ctxcomp_gguf_fold.safetensors");
    std::remove(out.c_str());
    const auto r = test::run_cli("fold --model " + g + " --input " + c.case_file + " --output " + out + " --cl " +
                                 std::to_string(c.cl) + " --cr " + std::to_string(c.cr));
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_fold_output(out, c.case_file);
    std::remove(out.c_str());
    std::remove(g.c_str());
  }
}

TEST_CASE("Q8_0 tensors dequantise as llama.cpp defines them", "[gguf]") {
  // blk.0.ffn_down.weight [8 x 32] as Q8_0: per block of 32 values d = max|x| / 127, q = round(x / d).
  const auto v = test::random_vector(8 * 32, 77, -2.f, 2.f);
  std::vector<char> q;
  std::vector<float> expect;
  for (int blk = 0; blk < 8; ++blk) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(v[std::size_t(blk * 32 + i)]));
    const fp16 d = from_float<fp16>(amax / 127.f);
    const char* dp = reinterpret_cast<const char*>(&d);
    q.insert(q.end(), dp, dp + 2);
    for (int i = 0; i < 32; ++i) {
      const auto qi = static_cast<std::int8_t>(std::lround(v[std::size_t(blk * 32 + i)] / to_float(d)));
      q.push_back(static_cast<char>(qi));
      expect.push_back(to_float(d) * float(qi));
    }
  }
  const std::string p = tiny("q8", [](io::GgufWriter&) {}, [](const std::string& n) { return n != "blk.0.ffn_down.weight"; });
  const std::string p2 = tiny("q8b", [&](io::GgufWriter& w) { w.add_raw_tensor("blk.0.ffn_down.weight", {8, 32}, io::GgmlType::q8_0, q); },
                              [](const std::string& n) { return n != "blk.0.ffn_down.weight"; });
  const auto g = io::GgufCheckpoint::open(p2);
  CHECK(g.tensors().read<float>("model.layers.0.mlp.down_proj.weight") == expect);
  const auto m = host::LlamaModel<float>::load(p2);
  CHECK(std::equal(expect.begin(), expect.end(), m.layers[0].mlp.down.data));
  CHECK_THAT(load_error(p), Contains("missing tensor 'model.layers.0.mlp.down_proj.weight'"));
}

TEST_CASE("malformed or unsupported GGUF files are named errors", "[gguf][errors]") {
  CHECK(load_error(tiny("ok", [](io::GgufWriter&) {})) == "(loaded without error)");
  CHECK_THAT(load_error(tiny("key", [](io::GgufWriter& w) { w.add_u32("llama.attention.sliding_window", 4096); })),
             Contains("GGUF key 'llama.attention.sliding_window' is not one this reader implements"));
  CHECK_THAT(load_error(tiny("arch", [](io::GgufWriter& w) { w.add_string("general.architecture", "gemma3"); })),
             Contains("GGUF architecture"));
  CHECK_THAT(load_error(tiny("rot", [](io::GgufWriter& w) { w.add_u32("llama.rope.dimension_count", 2); })),
             Contains("rope.dimension_count (2) is not the head size 4"));
  // An odd head size (found by fuzz_gguf: the K-row permutation divided by head_size / 2 = 0).
  for (std::uint32_t hd : {1u, 3u})
    CHECK_THAT(load_error(tiny("odd", [hd](io::GgufWriter& w) {
                 w.add_u32("llama.attention.key_length", hd);
                 w.add_u32("llama.attention.value_length", hd);
                 w.add_u32("llama.rope.dimension_count", hd);
               })),
               Contains("head size " + std::to_string(hd) + " is not a positive even number"));
  CHECK_THAT(load_error(tiny("shape", [](io::GgufWriter&) {}, [](const std::string&) { return true; }, {6, 8})),
             Contains("tensor 'model.layers.0.self_attn.v_proj.weight' has shape [6, 8], expected [8, 8]"));
  CHECK_THAT(load_error(tiny("unknown", [](io::GgufWriter& w) {
               const std::vector<float> z(8, 0.f);
               w.add_tensor("blk.0.attn_sinks.weight", {8}, z.data(), io::GgmlType::f32);
             })),
             Contains("tensor 'blk.0.attn_sinks.weight' is not one this reader maps"));
  // Llama 3 RoPE factors: half the head size (4 here), positive.
  auto freqs = [](std::vector<float> f) {
    return tiny("freqs", [f](io::GgufWriter& w) {
      w.add_tensor("rope_freqs.weight", {std::int64_t(f.size())}, f.data(), io::GgmlType::f32);
    });
  };
  CHECK(load_error(freqs({1.f, 8.f})) == "(loaded without error)");
  CHECK(host::LlamaModel<float>::load(freqs({1.f, 8.f})).config.rope.freq_factors == std::vector<float>{1.f, 8.f});
  CHECK_THAT(load_error(freqs({1.f, 8.f, 8.f})), Contains("tensor 'rope_freqs.weight' must hold 2 F32 values"));
  CHECK_THAT(load_error(freqs({1.f, 0.f})), Contains("rope_freqs.weight[1] (0) is not a positive factor"));
  // Truncated anywhere: in the header, in the tensor infos, in the data.
  const std::string ok = tiny("trunc", [](io::GgufWriter&) {});
  std::ifstream f(ok, std::ios::binary);
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  for (std::size_t cut : {std::size_t(3), std::size_t(20), std::size_t(300), bytes.size() - 5}) {
    INFO("cut at " << cut);
    try {
      io::GgufCheckpoint::from_bytes(std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + std::ptrdiff_t(cut)), "cut");
      FAIL("parsed a truncated file");
    } catch (const Error& e) {
      CHECK_THAT(std::string(e.what()), Contains("cut: ") && (Contains("ends inside") || Contains("lies outside the file") ||
                                                              Contains("does not fit in the file")));
    }
  }
  std::vector<std::uint8_t> magic = bytes;
  magic[0] = 'X';
  CHECK_THROWS_WITH(io::GgufCheckpoint::from_bytes(magic, "m"), Contains("m: not a GGUF file"));
  // GPT-NeoX is not converted (llama.cpp's gptneox architecture is not written).
  CHECK_THROWS_WITH(io::convert_to_gguf(test::fixtures_dir() + "/../neox/neox_sequential_rot100_injected/model",
                                        test::tmp("ctxcomp_gguf_neox.gguf"), io::GgmlType::f32),
                    Contains("is not converted to GGUF"));
}

}  // namespace test_io_gguf
