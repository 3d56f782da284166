// `ctxcomp fold` and `ctxcomp sac` with `--engine llama.cpp`: ctxcomp does the compressing (span
// tracking and eviction; the SAC anchor cache) and stock llama.cpp runs the model, through
// engines/llamacpp.hpp. The model comes from a GGUF file (`--gguf`) or is converted from the
// checkpoint directory into a temporary one. The outputs are those of the ctxcomp engine: logits
// from llama.cpp, and the layers' K/V read back from llama.cpp's own cache.
#pragma once
#include <ctxcomp/engines/llamacpp.hpp>
#include <ctxcomp/io/gguf.hpp>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "sac_driver.hpp"

namespace ctxcomp::host::llamacpp {

namespace lc = ctxcomp::engines::llamacpp;

/// How llama.cpp runs: the GGUF, the cache type, flash attention and threads.
struct EngineOptions {
  std::string gguf;           ///< a GGUF file, or empty: convert `model_dir` (with `adapter_dir`)
  std::string model_dir;      ///< the checkpoint directory
  std::string adapter_dir;    ///< a PEFT adapter merged before converting
  std::string cache_type = "f32";  ///< f32, f16, bf16 or q8_0 (q8_0 is refused by the bridge)
  bool flash_attn = false;    ///< flash attention (this release's CPU path casts K/V to f16)
  int threads = 1;            ///< llama.cpp's threads
};

inline ggml_type parse_cache_type(const std::string& s) {
  if (s == "f32") return GGML_TYPE_F32;
  if (s == "f16") return GGML_TYPE_F16;
  if (s == "bf16") return GGML_TYPE_BF16;
  if (s == "q8_0") return GGML_TYPE_Q8_0;
  fail("--cache-type '", s, "' is not one of f32, f16, bf16, q8_0");
}

/// A loaded llama.cpp model (from the GGUF, or a temporary conversion deleted on destruction).
class Engine {
 public:
  explicit Engine(const EngineOptions& o) : o_(o) {
    llama_backend_init();
    llama_log_set([](ggml_log_level level, const char* text, void*) {
      if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
    }, nullptr);
    std::string path = o.gguf;
    if (path.empty()) {
      tmp_ = (std::filesystem::temp_directory_path() /
              ("ctxcomp_engine_" + std::to_string(reinterpret_cast<std::uintptr_t>(this)) + ".gguf")).string();
      io::convert_to_gguf(o.model_dir, tmp_, io::GgmlType::f32, o.adapter_dir);
      path = tmp_;
    }
    auto mp = llama_model_default_params();
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) fail("llama.cpp could not load '", path, "' (see its log)");
  }
  ~Engine() {
    if (model_) llama_model_free(model_);
    if (!tmp_.empty()) std::remove(tmp_.c_str());
    llama_backend_free();
  }
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// A context of `n_ctx` cells (rounded up by llama.cpp), `seqs` sequences, unified when asked.
  std::unique_ptr<llama_context, void (*)(llama_context*)> context(std::uint32_t n_ctx, std::uint32_t seqs,
                                                                   bool unified, llama_context_params& p) const {
    p = llama_context_default_params();
    p.n_ctx = n_ctx, p.n_batch = n_ctx, p.n_ubatch = n_ctx, p.n_seq_max = seqs, p.kv_unified = unified;
    p.n_threads = p.n_threads_batch = o_.threads;
    p.type_k = p.type_v = parse_cache_type(o_.cache_type);
    p.flash_attn_type = o_.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    (void)lc::detail::type_size(p.type_k, "--cache-type");  // q8_0: named before llama.cpp allocates
    llama_context* c = llama_init_from_model(model_, p);
    if (!c) fail("llama.cpp could not create a context of ", n_ctx, " cells (see its log)");
    return {c, llama_free};
  }
  /// The model's vocabulary size.
  index_t vocab() const { return llama_vocab_n_tokens(llama_model_get_vocab(model_)); }

 private:
  EngineOptions o_;
  std::string tmp_;
  llama_model* model_ = nullptr;
};

/// A sequence's state as the ctxcomp engine writes its cache tensors: cells sorted by position,
/// per layer [kv_heads x cells x head_dim].
inline void sorted_tensors(const lc::SequenceState& s, const lc::CacheFormat& f, std::vector<std::vector<float>>& kv,
                           std::vector<std::int64_t>* positions = nullptr) {
  std::vector<std::size_t> order(s.positions.size());
  for (std::size_t c = 0; c < order.size(); ++c) order[c] = c;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return s.positions[a] < s.positions[b]; });
  const index_t m = s.cells(), hd = f.head_dim;
  kv.clear();
  for (index_t l = 0; l < f.layers; ++l)
    for (int which = 0; which < 2; ++which) {
      const auto& x = (which ? s.values : s.keys)[std::size_t(l)];
      std::vector<float> out;
      for (index_t h = 0; h < f.kv_heads; ++h)
        for (auto c : order) out.insert(out.end(), x.begin() + (h * m + index_t(c)) * hd, x.begin() + (h * m + index_t(c) + 1) * hd);
      kv.push_back(std::move(out));
    }
  if (positions) {
    positions->clear();
    for (auto c : order) positions->push_back(s.positions[c]);
  }
}

/// Sentinel folding of ids[0, n) over llama.cpp: logits [n x vocab], the kept token indices and
/// the kept K/V (kv[2l], kv[2l + 1]: layer l's K and V) read back from llama.cpp.
inline void fold(const EngineOptions& o, const std::vector<std::int64_t>& ids, std::int64_t cl, std::int64_t cr,
                 std::vector<float>& logits, std::vector<std::int64_t>& kept, std::vector<std::vector<float>>& kv) {
  Engine engine(o);
  const index_t n = index_t(ids.size());
  llama_context_params p;
  auto ctx = engine.context(std::uint32_t(std::max<index_t>(n + 2, 16)), 3, true, p);
  lc::SentinelFolder folder(ctx.get(), p, cl, cr);
  logits.assign(std::size_t(n * engine.vocab()), 0.f);
  folder.push(ids.data(), n, logits.data());
  kept.clear();
  for (index_t i = 0; i < n; ++i) {
    const SpanRole r = folder.tracker().roles()[std::size_t(i)].role;
    if (r == SpanRole::Ordinary || r == SpanRole::Close) kept.push_back(i);
  }
  const auto st = lc::read_state(ctx.get(), 0, folder.format());
  CTXCOMP_CHECK(st.cells() == index_t(kept.size()), "fold --engine llama.cpp: llama.cpp holds ", st.cells(),
                " cells, ", kept.size(), " tokens are kept");
  sorted_tensors(st, folder.format(), kv);
}

/// SAC decoding in llama.cpp from ctxcomp's compressed `cache` of `plan`: special_tokens[1] (the
/// `first_embed` row) at plan.decode_position(), then `targets`; returns decode_logits
/// [t + 1 x vocab] and (kv) the compressed cache as llama.cpp holds it.
template <class Kv>
std::vector<float> sac_decode(const EngineOptions& o, const anchor::AnchorPlan& plan, const Kv& cache,
                              const float* first_embed, const std::vector<std::int64_t>& targets,
                              std::vector<std::vector<float>>& kv) {
  Engine engine(o);
  const index_t t = index_t(targets.size());
  llama_context_params p;
  auto ctx = engine.context(std::uint32_t(cache.size() + t + 2), 1, false, p);
  const auto fmt = lc::cache_format(ctx.get(), p);
  std::vector<std::int64_t> pos;
  for (index_t s : kv::logical_order(cache)) pos.push_back(cache.positions()[s]);
  const std::int64_t next = plan.decode_position();
  lc::load_state(ctx.get(), 0, lc::encode_state(cache, lc::decode_positions(pos, next), 0, fmt), fmt);
  // What llama.cpp holds, in ctxcomp's (logical) cell order: the state keeps the cells in order.
  const auto st = lc::read_state(ctx.get(), 0, fmt);
  kv.clear();
  for (index_t l = 0; l < fmt.layers; ++l) kv.push_back(st.keys[std::size_t(l)]), kv.push_back(st.values[std::size_t(l)]);
  const index_t vocab = engine.vocab();
  std::vector<float> logits(std::size_t((t + 1) * vocab));
  lc::decode(ctx.get(), 0, nullptr, first_embed, 1, &next, logits.data());
  if (t > 0) {
    std::vector<std::int64_t> tp;
    for (index_t i = 0; i < t; ++i) tp.push_back(next + 1 + i);
    const std::vector<llama_token> tok(targets.begin(), targets.end());
    lc::decode(ctx.get(), 0, tok.data(), nullptr, t, tp.data(), logits.data() + vocab);
  }
  return logits;
}

}  // namespace ctxcomp::host::llamacpp
