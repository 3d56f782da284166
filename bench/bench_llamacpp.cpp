// Stock llama.cpp beside ctxcomp (built with CTXCOMP_LLAMACPP: the llamacpp preset), on the
// Llama-3.2-1B-shaped model of sac/llama32_1b: the same random weights, written as a checkpoint
// directory and converted once into a bf16 GGUF by io::convert_to_gguf (a temporary file, removed
// at exit). llama.cpp runs with an f16 cache (its default), flash attention off and the same
// thread counts as the ctxcomp benchmarks (CTXCOMP_BENCH_THREADS):
// - llamacpp/prefill/2040: llama.cpp's own prefill of the 2040-token context that
//   sac/llama32_1b/compress_2040_r5 compresses (one batch of 2040, llama.cpp's default micro-batch
//   of 512), in context tokens/s; next_token_ms: one decode step after it.
// - llamacpp/load_state/sac_r5: writing ctxcomp's SAC cache of that context (ratio 5: 408 anchors,
//   bf16 K/V, compressed once before timing) into a llama_context as sequence state
//   (engines::llamacpp::encode_state + load_state, bf16 -> f16), in ms per load.
// - llamacpp/decode/{full,sac_r5,sentinel_half}_16384: one llama.cpp decode step (every layer
//   and the lm head) over the cache of a 16384-token context: every token, SAC's anchors at ratio
//   5 (chunks of 510), or half the tokens (what sentinel folding keeps when spans cover half the
//   stream). The caches hold synthetic K/V written through the state blob instead of a
//   16384-token prefill; kv_cache_bytes: what their cells hold.
// CTXCOMP_BENCH_SMOKE=1 shrinks the model (synthetic_llama.hpp) and the decode context (512).
#include <ctxcomp/engines/llamacpp.hpp>
#include <ctxcomp/io/gguf.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "../examples/sac_driver.hpp"
#include "synthetic_llama.hpp"

using namespace ctxcomp;
namespace lc = ctxcomp::engines::llamacpp;

namespace {

using bench::kPaperChunk;
using bench::kPaperRatio;
using bench::kPaperTokens;

/// The synthetic Llama-3.2-1B as a bf16 GGUF loaded by llama.cpp, built on first use.
class LlamaCppModel {
 public:
  static LlamaCppModel& get() {
    static LlamaCppModel m;
    return m;
  }
  llama_model* model() const { return model_; }
  index_t vocab() const { return llama_vocab_n_tokens(llama_model_get_vocab(model_)); }

  /// A context of `n_ctx` cells, one sequence, f16 cache, flash attention off, `threads` threads.
  std::unique_ptr<llama_context, void (*)(llama_context*)> context(std::uint32_t n_ctx, int threads,
                                                                   llama_context_params& p) const {
    p = llama_context_default_params();
    p.n_ctx = n_ctx, p.n_batch = n_ctx, p.n_seq_max = 1;
    p.n_threads = p.n_threads_batch = threads;
    p.type_k = p.type_v = GGML_TYPE_F16;
    p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context* c = llama_init_from_model(model_, p);
    if (!c) fail("llama.cpp could not create a context of ", n_ctx, " cells");
    return {c, llama_free};
  }
  ~LlamaCppModel() {
    if (model_) llama_model_free(model_);
    llama_backend_free();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

 private:
  LlamaCppModel() {
    llama_backend_init();
    llama_log_set([](ggml_log_level level, const char* text, void*) {
      if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
    }, nullptr);
    dir_ = (std::filesystem::temp_directory_path() / ("ctxcomp_bench_llama32_1b_" + std::to_string(::getpid()))).string();
    const std::string ckpt = dir_ + "/checkpoint", gguf = dir_ + "/llama32_1b_bf16.gguf";
    bench::llama32_1b().write_checkpoint(ckpt);
    io::convert_to_gguf(ckpt, gguf, io::GgmlType::bf16);
    std::filesystem::remove_all(ckpt);
    model_ = llama_model_load_from_file(gguf.c_str(), llama_model_default_params());
    if (!model_) fail("llama.cpp could not load '", gguf, "'");
  }
  std::string dir_;
  llama_model* model_ = nullptr;
};

void decode_or_fail(llama_context* ctx, llama_batch b) {
  if (llama_decode(ctx, b) != 0) fail("llama_decode failed");
  llama_synchronize(ctx);
}

/// llama.cpp's prefill of the paper's context; next_token_ms: one decode step after it.
void prefill(benchmark::State& st, int threads) {
  auto& m = LlamaCppModel::get();
  llama_context_params p;
  auto ctx = m.context(2048, threads, p);
  const auto ids = bench::paper_ids(m.vocab());
  std::vector<llama_token> tok(ids.begin(), ids.end());
  llama_token warm = 42;  // one step before timing: the weights and compute buffers are touched once
  decode_or_fail(ctx.get(), llama_batch_get_one(&warm, 1));
  double next_s = 0;
  for (auto _ : st) {
    llama_memory_clear(llama_get_memory(ctx.get()), true);
    decode_or_fail(ctx.get(), llama_batch_get_one(tok.data(), std::int32_t(tok.size())));
    st.PauseTiming();
    llama_token next = 42;
    const auto t0 = std::chrono::steady_clock::now();
    decode_or_fail(ctx.get(), llama_batch_get_one(&next, 1));
    next_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st.ResumeTiming();
  }
  st.counters["context_tokens_per_s"] = bench::rate(double(kPaperTokens));
  st.counters["next_token_ms"] = 1e3 * next_s / double(st.iterations());
}

/// ctxcomp's SAC cache of the paper's context (fp32 compute, bf16 K/V), compressed once.
const KvCache<bf16>& sac_cache() {
  static const KvCache<bf16> cache = [] {
    const auto& llama = bench::llama32_1b();
    const auto& c = llama.model.config;
    host::LlamaHost<bf16, bf16> h(llama.model);
    const auto plan = anchor::AnchorPlan::uniform(kPaperTokens, kPaperChunk, kPaperRatio);
    const auto roles = bench::random_buffer(std::size_t(plan.max_anchors_per_chunk() * c.hidden), 5, 0.02f);
    auto kc = h.make_cache(plan.anchor_count());
    host::sac_compress(h, plan, bench::paper_ids(c.vocab).data(),
                       matrix_view<const float>(roles.data(), plan.max_anchors_per_chunk(), c.hidden),
                       anchor::ChunkMask::Full, kc);
    return kc;
  }();
  return cache;
}

/// Writing the SAC cache into llama.cpp as one sequence's state.
void load_state(benchmark::State& st) {
  auto& m = LlamaCppModel::get();
  const auto& cache = sac_cache();
  const auto plan = anchor::AnchorPlan::uniform(kPaperTokens, kPaperChunk, kPaperRatio);
  llama_context_params p;
  auto ctx = m.context(2048, 1, p);
  const auto fmt = lc::cache_format(ctx.get(), p);
  std::vector<std::int64_t> pos;
  for (index_t s : kv::logical_order(cache)) pos.push_back(cache.positions()[s]);
  pos = lc::decode_positions(pos, plan.decode_position());
  std::size_t bytes = 0;
  for (auto _ : st) {
    const auto blob = lc::encode_state(cache, pos, 0, fmt);
    lc::load_state(ctx.get(), 0, blob, fmt);
    bytes = blob.size();
  }
  st.counters["cells"] = double(cache.size());
  st.counters["blob_bytes"] = double(bytes);
  st.counters["GBps"] = bench::rate(double(bytes) * 1e-9);
}

enum class Cache { Full, Sac, SentinelHalf };

/// One llama.cpp decode step over a cache of a 16384-token context filled through the state blob.
void decode(benchmark::State& st, Cache kind, int threads) {
  auto& m = LlamaCppModel::get();
  const index_t n = bench::smoke() ? 512 : 16384;
  std::vector<std::int64_t> pos;
  if (kind == Cache::Full) {
    for (index_t i = 0; i < n; ++i) pos.push_back(i);
  } else if (kind == Cache::Sac) {
    const auto plan = anchor::AnchorPlan::uniform(n, kPaperChunk, kPaperRatio);
    for (index_t a : plan.anchors()) pos.push_back(a);
  } else {
    for (index_t i = 1; i < n; i += 2) pos.push_back(i);
  }
  llama_context_params p;
  auto ctx = m.context(std::uint32_t(n + 1), threads, p);
  const auto fmt = lc::cache_format(ctx.get(), p);
  const index_t cells = index_t(pos.size());
  {
    lc::SequenceState s;
    s.positions = lc::decode_positions(pos, n);
    const auto kv = bench::random_buffer(std::size_t(cells * fmt.kv_heads * fmt.head_dim), 11, 1.f);
    s.keys.assign(std::size_t(fmt.layers), kv);
    s.values.assign(std::size_t(fmt.layers), kv);
    lc::load_state(ctx.get(), 0, lc::encode_state(s, 0, fmt), fmt);
  }
  auto* mem = llama_get_memory(ctx.get());
  llama_token next = 42;
  llama_pos at = llama_pos(n);
  llama_batch b = llama_batch_init(1, 0, 1);
  b.n_tokens = 1, b.token[0] = next, b.pos[0] = at, b.n_seq_id[0] = 1, b.seq_id[0][0] = 0, b.logits[0] = 1;
  decode_or_fail(ctx.get(), b);  // one step before timing (weights, compute buffers)
  llama_memory_seq_rm(mem, 0, at, -1);
  for (auto _ : st) {
    decode_or_fail(ctx.get(), b);
    llama_memory_seq_rm(mem, 0, at, -1);  // back to the filled cache for the next step
  }
  llama_batch_free(b);
  st.counters["tokens_per_s"] = bench::rate(1.0);
  st.counters["cache_cells"] = double(cells);
  st.counters["kv_cache_bytes"] = 2.0 * double(cells * fmt.layers * fmt.kv_heads * fmt.head_dim) * sizeof(fp16);
}

const bool registered = [] {
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int t : bench::thread_counts())
    ms(benchmark::RegisterBenchmark(("llamacpp/prefill/2040" + bench::thread_suffix(t)).c_str(), prefill, t));
  ms(benchmark::RegisterBenchmark("llamacpp/load_state/sac_r5", load_state));
  const std::string ctx = bench::smoke() ? "_512" : "_16384";
  for (int t : bench::thread_counts()) {
    const std::string ts = bench::thread_suffix(t);
    ms(benchmark::RegisterBenchmark(("llamacpp/decode/full" + ctx + ts).c_str(), decode, Cache::Full, t));
    ms(benchmark::RegisterBenchmark(("llamacpp/decode/sac_r5" + ctx + ts).c_str(), decode, Cache::Sac, t));
    ms(benchmark::RegisterBenchmark(("llamacpp/decode/sentinel_half" + ctx + ts).c_str(), decode, Cache::SentinelHalf, t));
  }
  return true;
}();

}  // namespace
