// The llama.cpp bridge (engines/llamacpp.hpp, io/gguf.hpp) against stock llama.cpp v0.4.0:
// a GGUF that ctxcomp writes (the fixture llama and every checkpoints fixture: Llama 3 RoPE,
// tied embeddings, Qwen2 biases, Qwen3 q/k norm) loads in llama.cpp and gives the host's logits; every SAC fixture,
// compressed by ctxcomp and written into a llama_context as a sequence state, decodes in
// llama.cpp to the official logits (f32 cache, flash attention off: 1e-5); every sentinel and
// checkpoints fixture folds over a llama_context (SentinelFolder) to the official logits and kept
// K/V; f16 caches and flash attention within 2e-3 with the same argmax; IC-Former digests as
// input embeddings give the host's logits; state blobs round-trip
// bit for bit in f32 / f16 / bf16 with both V layouts; blobs that do not fit the context are named
// errors and leave the sequence as it was.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>

#include <ctxcomp/engines/llamacpp.hpp>
#include <ctxcomp/io/gguf.hpp>

#include "catch.hpp"
#include "common.hpp"
#include "sac_driver.hpp"

namespace test_engines_llamacpp {

using namespace ctxcomp;
namespace lc = ctxcomp::engines::llamacpp;
using Catch::Matchers::Contains;
using test::sac::Fixture;

namespace {
struct Backend {
  Backend() {
    llama_backend_init();
    llama_log_set([](ggml_log_level level, const char* text, void*) {
      if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
    }, nullptr);
  }
  ~Backend() { llama_backend_free(); }
};
const Backend& backend() {
  static Backend b;
  return b;
}

/// The fixture llama model as an f32 GGUF (written once per run).
const std::string& llama_gguf() {
  static const std::string path = [] {
    const std::string p = test::tmp("ctxcomp_llamacpp_llama_f32.gguf");
    io::convert_to_gguf(test::sac::llama_dir(), p, io::GgmlType::f32);
    return p;
  }();
  return path;
}

struct Model {
  llama_model* m = nullptr;
  explicit Model(const std::string& path) {
    (void)backend();
    auto p = llama_model_default_params();
    m = llama_model_load_from_file(path.c_str(), p);
    REQUIRE(m != nullptr);
  }
  ~Model() { llama_model_free(m); }
};

struct Context {
  llama_context* c = nullptr;
  llama_context_params params;
  Context(const Model& model, ggml_type type, bool flash, std::uint32_t n_ctx = 256, std::uint32_t seqs = 1,
          bool unified = false) {
    params = llama_context_default_params();
    params.n_ctx = n_ctx, params.n_batch = n_ctx, params.n_ubatch = n_ctx, params.n_seq_max = seqs;
    params.kv_unified = unified;
    params.n_threads = params.n_threads_batch = 2;
    params.type_k = params.type_v = type;
    params.flash_attn_type = flash ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    c = llama_init_from_model(model.m, params);
    REQUIRE(c != nullptr);
  }
  ~Context() { llama_free(c); }
};

template <class Kv>
std::vector<std::int64_t> logical_positions(const Kv& cache) {
  std::vector<std::int64_t> p;
  for (index_t s : kv::logical_order(cache)) p.push_back(cache.positions()[s]);
  return p;
}
}  // namespace

TEST_CASE("a GGUF ctxcomp writes loads in llama.cpp and gives the host's logits", "[llamacpp][gguf]") {
  const Model model(llama_gguf());
  Context ctx(model, GGML_TYPE_F32, false);
  const auto hm = host::LlamaModel<float>::load(test::sac::llama_dir());
  host::LlamaHost<float> h(hm);
  const Fixture f("sac_multichunk");  // any token ids of this vocabulary
  const index_t n = f.n();
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  auto cache = h.make_cache(n);
  std::vector<float> x(static_cast<std::size_t>(n * 64)), expect(std::size_t(n * 128)), got(std::size_t(n * 128));
  h.embed(f.ids.data(), n, matrix_view(x.data(), n, 64));
  h.forward(matrix_view(x.data(), n, 64), pos.data(), idx.data(), Causal(0), cache);
  h.logits(matrix_view<const float>(x.data(), n, 64), matrix_view(expect.data(), n, 128));
  std::vector<llama_token> ids(f.ids.begin(), f.ids.end());
  lc::decode(ctx.c, 0, ids.data(), nullptr, n, pos.data(), got.data());
  CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
  // llama.cpp's cache holds the host's keys (permuted per head: the llama architecture) and values.
  const auto fmt = lc::cache_format(ctx.c, ctx.params);
  CHECK(fmt.permute_k);
  const auto st = lc::read_state(ctx.c, 0, fmt);
  REQUIRE(st.cells() == n);
  for (index_t l = 0; l < 2; ++l) {
    const auto k = test::layer_kv(cache, l, false), v = test::layer_kv(cache, l, true);
    CHECK(test::relative_error(st.keys[std::size_t(l)].data(), k.data(), k.size()) <= 1e-5);
    CHECK(test::relative_error(st.values[std::size_t(l)].data(), v.data(), v.size()) <= 1e-5);
  }
}

TEST_CASE("every checkpoints fixture converts to a GGUF that gives the host's logits in llama.cpp", "[llamacpp][gguf][checkpoints]") {
  // Llama 3 RoPE (rope_freqs), tied embeddings, bf16 shards; Qwen2 biases; Qwen3 q/k norm. The
  // first through `ctxcomp convert`, the others through the API.
  for (const char* c : test::checkpoints::kCheckpointCases) {
    INFO(c);
    const std::string dir = test::checkpoints::case_dir(c) + "/model";
    const std::string gguf = test::tmp(std::string("ctxcomp_llamacpp_") + c + ".gguf");
    if (c == std::string(test::checkpoints::kCheckpointCases[0])) {
      const auto r = test::run_cli("convert --model " + dir + " --output " + gguf);
      INFO(r.err);
      REQUIRE(r.status == 0);
    } else {
      io::convert_to_gguf(dir, gguf, io::GgmlType::f32);
    }
    const Model model(gguf);
    Context ctx(model, GGML_TYPE_F32, false);
    const auto hm = host::LlamaModel<float>::load(dir);
    host::LlamaHost<float> h(hm);
    const auto& cfg = hm.config;
    auto st = io::SafeTensors::open(test::checkpoints::case_dir(c) + "/case.safetensors");
    const auto ids64 = st.read<std::int64_t>("input_ids");
    const index_t n = index_t(ids64.size());
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::vector<index_t> idx(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
    auto cache = h.make_cache(n);
    std::vector<float> x(static_cast<std::size_t>(n * cfg.hidden)), expect(static_cast<std::size_t>(n * cfg.vocab)),
        got(static_cast<std::size_t>(n * cfg.vocab));
    h.embed(ids64.data(), n, matrix_view(x.data(), n, cfg.hidden));
    h.forward(matrix_view(x.data(), n, cfg.hidden), pos.data(), idx.data(), Causal(0), cache);
    h.logits(matrix_view<const float>(x.data(), n, cfg.hidden), matrix_view(expect.data(), n, cfg.vocab));
    const std::vector<llama_token> ids(ids64.begin(), ids64.end());
    lc::decode(ctx.c, 0, ids.data(), nullptr, n, pos.data(), got.data());
    const double err = test::relative_error(got.data(), expect.data(), got.size());
    UNSCOPED_INFO(c << ": llama.cpp logits vs the host, relative " << err);
    CHECK(err <= 1e-5);
    const auto fmt = lc::cache_format(ctx.c, ctx.params);
    CHECK(fmt.permute_k == (c == std::string("llama3_tied_sharded_bf16")));
    const auto kv = lc::read_state(ctx.c, 0, fmt);
    const auto k1 = test::layer_kv(cache, 1, false);
    CHECK(test::relative_error(kv.keys[1].data(), k1.data(), k1.size()) <= 1e-5);
    std::remove(gguf.c_str());
  }
}

namespace {
/// SAC case `f` compressed by ctxcomp's fp32 host into `cache`, written into a llama.cpp context of
/// `type` / `flash`, then decoded there: special_tokens[1] as an embedding at position n, the
/// targets at n+1, ...; returns the decode logits and (`held`) llama.cpp's state after loading.
std::vector<float> sac_through_llamacpp(const Model& model, const host::LlamaModel<float>& hm, const Fixture& f,
                                        ggml_type type, bool flash, KvCache<float>& cache, lc::SequenceState& held) {
  host::LlamaHost<float> h(hm);
  const auto plan = anchor::AnchorPlan::uniform(f.n(), f.chunk, f.ratio);
  cache = h.make_cache(plan.anchor_count());
  host::sac_compress(h, plan, f.ids.data(), f.role_view(), f.mask, cache);
  Context ctx(model, type, flash);
  const auto fmt = lc::cache_format(ctx.c, ctx.params);
  const std::int64_t next = plan.decode_position();
  lc::load_state(ctx.c, 0, lc::encode_state(cache, lc::decode_positions(logical_positions(cache), next), 0, fmt), fmt);
  held = lc::read_state(ctx.c, 0, fmt);
  const index_t t = index_t(f.targets.size());
  std::vector<float> logits(static_cast<std::size_t>((t + 1) * 128));
  lc::decode(ctx.c, 0, nullptr, f.special.data() + 64, 1, &next, logits.data());
  std::vector<std::int64_t> pos;
  for (index_t i = 0; i < t; ++i) pos.push_back(next + 1 + i);
  const std::vector<llama_token> ids(f.targets.begin(), f.targets.end());
  lc::decode(ctx.c, 0, ids.data(), nullptr, t, pos.data(), logits.data() + 128);
  return logits;
}
}  // namespace

TEST_CASE("every SAC fixture decodes in llama.cpp from ctxcomp's compressed cache", "[llamacpp][sac][fixtures]") {
  const Model model(llama_gguf());
  const auto hm = host::LlamaModel<float>::load(test::sac::llama_dir());
  for (const char* c : test::sac::kCases) {
    INFO(c);
    const Fixture f(c);
    KvCache<float> cache(1, 1, 2, 1);
    lc::SequenceState st;
    const auto logits = sac_through_llamacpp(model, hm, f, GGML_TYPE_F32, false, cache, st);
    // What llama.cpp holds is the compressed cache, bit for bit (f32), in the official K/V.
    for (index_t l = 0; l < 2; ++l) {
      CHECK(st.keys[std::size_t(l)] == test::layer_kv(cache, l, false));
      CHECK(st.values[std::size_t(l)] == test::layer_kv(cache, l, true));
      const auto ek = f.st.read<double>("layer" + std::to_string(l) + "_k");
      CHECK(test::relative_error(st.keys[std::size_t(l)].data(), ek.data(), ek.size()) <= 1e-5);
    }
    const auto expect = f.st.read<double>("decode_logits");
    const double err = test::relative_error(logits.data(), expect.data(), logits.size());
    UNSCOPED_INFO(c << ": llama.cpp decode logits, relative error vs float64 " << err);
    CHECK(err <= 1e-5);
  }
}

namespace {
/// Runs a sentinel case through SentinelFolder on `gguf` and checks the logits and the kept K/V
/// against the case's float64 tensors (1e-5).
void check_fold_over_llamacpp(const std::string& gguf, const std::string& case_file) {
  const Model model(gguf);
  auto st = io::SafeTensors::open(case_file);
  const auto ids = st.read<std::int64_t>("input_ids");
  const index_t n = index_t(ids.size());
  const index_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(model.m));
  Context ctx(model, GGML_TYPE_F32, false, 256, 3, true);
  lc::SentinelFolder folder(ctx.c, ctx.params, std::stoll(st.meta("cl_id")), std::stoll(st.meta("cr_id")));
  std::vector<float> logits(static_cast<std::size_t>(n * vocab));
  // In two pieces, the cut inside a span: the fold state carries across calls.
  const index_t cut = n / 2;
  folder.push(ids.data(), cut, logits.data());
  folder.push(ids.data() + cut, n - cut, logits.data() + cut * vocab);
  const auto expect = st.read<double>("logits");
  const double err = test::relative_error(logits.data(), expect.data(), logits.size());
  UNSCOPED_INFO(case_file << ": llama.cpp folding logits, relative error vs float64 " << err);
  CHECK(err <= 1e-5);
  // llama.cpp's main sequence holds exactly the kept tokens (by position), with the official K/V.
  const auto kept = lc::read_state(ctx.c, 0, folder.format());
  const auto kept_index = st.read<std::int64_t>("kept_index");
  const auto positions = st.read<std::int64_t>("position_ids");
  std::vector<std::int64_t> expect_pos;
  for (auto k : kept_index) expect_pos.push_back(positions[std::size_t(k)]);
  std::vector<std::size_t> order(kept.positions.size());
  for (std::size_t c = 0; c < order.size(); ++c) order[c] = c;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return kept.positions[a] < kept.positions[b]; });
  std::vector<std::int64_t> got_pos;
  for (auto c : order) got_pos.push_back(kept.positions[c]);
  REQUIRE(got_pos == expect_pos);
  const index_t m = kept.cells(), hd = folder.format().head_dim, kvh = folder.format().kv_heads;
  for (index_t l = 0; l < folder.format().layers; ++l)
    for (int which = 0; which < 2; ++which) {
      const auto& x = (which ? kept.values : kept.keys)[std::size_t(l)];
      std::vector<float> sorted;
      for (index_t h = 0; h < kvh; ++h)
        for (auto c : order) sorted.insert(sorted.end(), x.begin() + (h * m + index_t(c)) * hd, x.begin() + (h * m + index_t(c) + 1) * hd);
      const auto e = st.read<double>("layer" + std::to_string(l) + (which ? "_v" : "_k"));
      INFO("layer " << l << (which ? " V" : " K"));
      CHECK(test::relative_error(sorted.data(), e.data(), e.size()) <= 1e-5);
    }
}
}  // namespace

TEST_CASE("every sentinel and checkpoints fixture folds over a llama_context to the official outputs",
          "[llamacpp][fold][fixtures]") {
  for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"}) {
    INFO(c);
    check_fold_over_llamacpp(llama_gguf(), test::fixtures_dir() + "/sentinel/" + c + ".safetensors");
  }
  for (const char* c : test::checkpoints::kCheckpointCases) {
    INFO(c);
    const std::string gguf = test::tmp(std::string("ctxcomp_llamacpp_fold_") + c + ".gguf");
    io::convert_to_gguf(test::checkpoints::case_dir(c) + "/model", gguf, io::GgmlType::f32);
    check_fold_over_llamacpp(gguf, test::checkpoints::case_dir(c) + "/case.safetensors");
    std::remove(gguf.c_str());
  }
}

TEST_CASE("f16 caches and flash attention in llama.cpp: within 2e-3 of the official outputs, the same argmax",
          "[llamacpp][fixtures]") {
  // This release's CPU flash path casts K/V to f16, so both variants carry f16 rounding.
  const Model model(llama_gguf());
  const auto hm = host::LlamaModel<float>::load(test::sac::llama_dir());
  auto argmax_rows = [](const float* x, index_t rows, index_t cols) {
    std::vector<index_t> a;
    for (index_t r = 0; r < rows; ++r) a.push_back(index_t(std::max_element(x + r * cols, x + (r + 1) * cols) - (x + r * cols)));
    return a;
  };
  auto argmax_rows_d = [](const std::vector<double>& x, index_t rows, index_t cols) {
    std::vector<index_t> a;
    for (index_t r = 0; r < rows; ++r)
      a.push_back(index_t(std::max_element(x.begin() + r * cols, x.begin() + (r + 1) * cols) - (x.begin() + r * cols)));
    return a;
  };
  for (auto [type, flash] : {std::pair{GGML_TYPE_F16, false}, std::pair{GGML_TYPE_F32, true}, std::pair{GGML_TYPE_F16, true}}) {
    INFO(ggml_type_name(type) << " cache, flash attention " << (flash ? "on" : "off"));
    {  // SAC
      const Fixture f("sac_multichunk");
      const index_t t = index_t(f.targets.size());
      KvCache<float> cache(1, 1, 2, 1);
      lc::SequenceState held;
      const auto logits = sac_through_llamacpp(model, hm, f, type, flash, cache, held);
      const auto expect = f.st.read<double>("decode_logits");
      const double err = test::relative_error(logits.data(), expect.data(), logits.size());
      UNSCOPED_INFO("SAC: relative error " << err);
      CHECK(err <= 2e-3);
      CHECK(argmax_rows(logits.data(), t + 1, 128) == argmax_rows_d(expect, t + 1, 128));
    }
    {  // folding
      auto st = io::SafeTensors::open(test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors");
      const auto ids = st.read<std::int64_t>("input_ids");
      const index_t n = index_t(ids.size());
      Context ctx(model, type, flash, 256, 3, true);
      lc::SentinelFolder folder(ctx.c, ctx.params, 126, 127);
      std::vector<float> logits(static_cast<std::size_t>(n * 128));
      folder.push(ids.data(), n, logits.data());
      const auto expect = st.read<double>("logits");
      const double err = test::relative_error(logits.data(), expect.data(), logits.size());
      UNSCOPED_INFO("folding: relative error " << err);
      CHECK(err <= 2e-3);
      CHECK(argmax_rows(logits.data(), n, 128) == argmax_rows_d(expect, n, 128));
    }
  }
}

TEST_CASE("IC-Former digests as llama.cpp input embeddings, then the prompt: the host's logits", "[llamacpp][icformer]") {
  // The official soft prompt of icformer_chunked (32 digests of hidden 64), then a prompt.
  auto ic = io::SafeTensors::open(test::fixtures_dir() + "/icformer/icformer_chunked/case.safetensors");
  const auto digests = ic.read<float>("soft_prompt");
  const index_t k = 32, d = 64;
  const Fixture f("sac_basic");
  const index_t t = f.n(), n = k + t;
  const Model model(llama_gguf());
  Context ctx(model, GGML_TYPE_F32, false);
  std::vector<float> got(static_cast<std::size_t>(n * 128)), expect(static_cast<std::size_t>(n * 128));
  const std::int64_t next = lc::feed_digests(ctx.c, 0, digests.data(), k, 0, got.data());
  CHECK(next == k);
  std::vector<std::int64_t> pos;
  for (index_t i = 0; i < t; ++i) pos.push_back(next + i);
  const std::vector<llama_token> ids(f.ids.begin(), f.ids.end());
  lc::decode(ctx.c, 0, ids.data(), nullptr, t, pos.data(), got.data() + k * 128);
  // The host over [digests ; embed(prompt)] at positions 0 .. n-1, causal.
  const auto hm = host::LlamaModel<float>::load(test::sac::llama_dir());
  host::LlamaHost<float> h(hm);
  auto cache = h.make_cache(n);
  std::vector<float> x(static_cast<std::size_t>(n * d));
  std::copy(digests.begin(), digests.end(), x.begin());
  h.embed(f.ids.data(), t, matrix_view(x.data() + k * d, t, d));
  std::vector<std::int64_t> all(static_cast<std::size_t>(n));
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) all[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  h.forward(matrix_view(x.data(), n, d), all.data(), idx.data(), Causal(0), cache);
  h.logits(matrix_view<const float>(x.data(), n, d), matrix_view(expect.data(), n, 128));
  CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 1e-5);
}

TEST_CASE("ctxcomp fold and sac --engine llama.cpp reproduce every fixture", "[llamacpp][cli][fixtures]") {
  const std::string out = test::tmp("ctxcomp_llamacpp_cli.safetensors");
  for (const char* c : {"sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"}) {
    INFO(c);
    std::remove(out.c_str());
    const std::string in = test::fixtures_dir() + "/sentinel/" + c + ".safetensors";
    const auto r = test::run_cli("fold --engine llama.cpp --model " + test::sac::llama_dir() + " --input " + in +
                                 " --output " + out + " --cl 126 --cr 127 --threads 2");
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_fold_output(out, in);
  }
  for (const char* c : test::checkpoints::kCheckpointCases) {
    INFO(c);
    std::remove(out.c_str());
    const std::string in = test::checkpoints::case_dir(c) + "/case.safetensors";
    const auto r = test::run_cli("fold --engine llama.cpp --model " + test::checkpoints::case_dir(c) + "/model --input " +
                                 in + " --output " + out + " --cl 158 --cr 159");
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_fold_output(out, in);
  }
  for (const char* c : test::sac::kCases) {
    INFO(c);
    std::remove(out.c_str());
    const Fixture f(c);
    const std::string in = test::sac::case_path(c);
    const auto r = test::run_cli("sac --engine llama.cpp --model " + test::sac::llama_dir() + " --anchor-embeds " + in +
                                 " --input " + in + " --output " + out + " --chunk-size " + std::to_string(f.chunk) +
                                 " --ratio " + std::to_string(f.ratio) + " --mask " + f.st.meta("mask"));
    INFO(r.err);
    REQUIRE(r.status == 0);
    test::check_sac_output(out, in);
  }
  {  // --gguf instead of a conversion, an f16 cache: within 2e-3
    std::remove(out.c_str());
    const std::string in = test::fixtures_dir() + "/sentinel/sentinel_three_spans.safetensors";
    const auto r = test::run_cli("fold --engine llama.cpp --gguf " + llama_gguf() + " --cache-type f16 --model " +
                                 test::sac::llama_dir() + " --input " + in + " --output " + out + " --cl 126 --cr 127");
    INFO(r.err);
    REQUIRE(r.status == 0);
    auto es = io::SafeTensors::open(in);
    const auto got = io::SafeTensors::open(out).read<float>("logits", es.info("logits").shape);
    const auto expect = es.read<double>("logits");
    CHECK(test::relative_error(got.data(), expect.data(), got.size()) <= 2e-3);
  }
  {  // q8_0 is refused by name, and nothing is written
    std::remove(out.c_str());
    const std::string in = test::fixtures_dir() + "/sentinel/sentinel_one_span.safetensors";
    const auto r = test::run_cli("fold --engine llama.cpp --cache-type q8_0 --model " + test::sac::llama_dir() +
                                 " --input " + in + " --output " + out + " --cl 126 --cr 127");
    CHECK(r.status != 0);
    CHECK_THAT(r.err, Contains("q8_0 is not supported"));
    CHECK(!std::filesystem::exists(out));
  }
  std::remove(out.c_str());
}

TEST_CASE("state blobs round-trip bit for bit in f32, f16 and bf16, with both V layouts", "[llamacpp][state]") {
  const Model model(llama_gguf());
  auto check = [&](auto tag, ggml_type type, bool flash) {
    using C = decltype(tag);
    INFO(ggml_type_name(type) << (flash ? ", flash attention (V rows)" : ", V transposed"));
    Context ctx(model, type, flash);
    const auto fmt = lc::cache_format(ctx.c, ctx.params);
    CHECK(fmt.v_trans == !flash);
    KvCache<C> cache(2, 2, 16, 40);
    const index_t n = 37;
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::vector<index_t> idx(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) pos[std::size_t(i)] = 3 * i, idx[std::size_t(i)] = i;
    cache.append(n, pos.data(), idx.data());
    for (index_t l = 0; l < 2; ++l)
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < n; ++i) {
          const auto kr = test::random_vector(16, unsigned(1000 + 100 * l + 10 * h + i), -3.f, 3.f);
          const auto vr = test::random_vector(16, unsigned(5000 + 100 * l + 10 * h + i), -3.f, 3.f);
          store_row(cache.keys(l), h, i, kr.data());
          store_row(cache.values(l), h, i, vr.data());
        }
    const auto blob = lc::encode_state(cache, pos, 0, fmt);
    lc::load_state(ctx.c, 0, blob, fmt);
    std::vector<std::uint8_t> back(llama_state_seq_get_size(ctx.c, 0));
    back.resize(llama_state_seq_get_data(ctx.c, back.data(), back.size(), 0));
    CHECK(back == blob);  // llama.cpp gives back exactly what it was given
    const auto st = lc::decode_state(back.data(), back.size(), fmt);
    CHECK(st.positions == pos);
    for (index_t l = 0; l < 2; ++l) {
      CHECK(st.keys[std::size_t(l)] == test::layer_kv(cache, l, false));
      CHECK(st.values[std::size_t(l)] == test::layer_kv(cache, l, true));
    }
  };
  for (bool flash : {false, true}) {
    check(float{}, GGML_TYPE_F32, flash);
    check(fp16{}, GGML_TYPE_F16, flash);
    check(bf16{}, GGML_TYPE_BF16, flash);
  }
}

TEST_CASE("blobs that do not fit the context are named errors and leave the sequence as it was", "[llamacpp][state][errors]") {
  const Model model(llama_gguf());
  Context ctx(model, GGML_TYPE_F32, false, 256);
  const auto fmt = lc::cache_format(ctx.c, ctx.params);
  KvCache<float> cache(2, 2, 16, 300);
  std::vector<std::int64_t> pos(300);
  std::vector<index_t> idx(300);
  for (index_t i = 0; i < 300; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  cache.append(10, pos.data(), idx.data());
  const auto good = lc::encode_state(cache, std::vector<std::int64_t>(pos.begin(), pos.begin() + 10), 0, fmt);
  lc::load_state(ctx.c, 0, good, fmt);
  auto state_bytes = [&] {
    std::vector<std::uint8_t> b(llama_state_seq_get_size(ctx.c, 0));
    b.resize(llama_state_seq_get_data(ctx.c, b.data(), b.size(), 0));
    return b;
  };
  const auto before = state_bytes();
  auto expect_error = [&](const std::vector<std::uint8_t>& blob, const std::string& what) {
    try {
      lc::load_state(ctx.c, 0, blob, fmt);
      FAIL("loaded without error: " << what);
    } catch (const Error& e) {
      CHECK_THAT(std::string(e.what()), Contains(what));
    }
    CHECK(state_bytes() == before);
  };
  {
    KvCache<float> three(3, 2, 16, 10);
    three.append(10, pos.data(), idx.data());
    auto b = good;
    b[std::size_t(4 + 4 + 4 + 4 + 10 * 12 + 4)] = 3;  // n_layer field
    expect_error(b, "3 layers, the model has 2");
    CHECK_THROWS_WITH(lc::encode_state(three, std::vector<std::int64_t>(pos.begin(), pos.begin() + 10), 0, fmt),
                      Contains("the cache has 3 layers, the model 2"));
  }
  {
    KvCache<float> wide(2, 2, 32, 10);
    wide.append(10, pos.data(), idx.data());
    CHECK_THROWS_WITH(lc::encode_state(wide, std::vector<std::int64_t>(pos.begin(), pos.begin() + 10), 0, fmt),
                      Contains("the cache has 2 kv heads of 32, the model 2 of 16"));
  }
  {
    auto b = good;
    b[0] ^= 1;
    expect_error(b, "magic");
    auto t = good;
    t.resize(t.size() - 3);
    expect_error(t, "the blob ends inside the values");
  }
  {
    auto f16fmt = fmt;
    f16fmt.type_k = GGML_TYPE_F16;
    expect_error(lc::encode_state(cache, std::vector<std::int64_t>(pos.begin(), pos.begin() + 10), 0, f16fmt),
                 "layer 0 K type f16, the context's is f32");
  }
  {
    cache.append(290, pos.data() + 10, idx.data() + 10);
    CHECK_THROWS_WITH(lc::encode_state(cache, pos, 0, fmt), Contains("300 cells exceed the context's 256 cells per sequence"));
  }
  {
    auto p = llama_context_default_params();
    p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
    CHECK_THROWS_WITH(lc::cache_format(ctx.c, p), Contains("flash_attn_type is AUTO"));
    p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    p.type_k = GGML_TYPE_Q8_0;
    CHECK_THROWS_WITH(lc::cache_format(ctx.c, p), Contains("type_k type q8_0 is not supported"));
  }
}

}  // namespace test_engines_llamacpp
