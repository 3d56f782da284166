// SAC anchor compression on a Llama-2-7B-shaped layer (random weights), chunk 512:
// - sac/compress_layer: context tokens/s of compressing one chunk through one layer with the
//   full and the anchor mask at ratios 4, 8, 16, 32, beside plain causal prefill of the chunk;
//   anchor_r8_bf16dot: the anchor mask at ratio 8 on the bf16 compute path (bf16 weights);
// - sac/attention: the attention of that layer alone, with its visible (query, key) pairs, so
//   the cost of each mask can be set against its pairs (pairs_vs_causal);
// - sac/decode: one decode step's attention over the anchors-only cache of a 4096-token context
//   vs the uncompressed cache (fp16), with the compressed cache's bytes per context token.
// - sac/llama32_1b: the SAC paper's configuration at full size (Llama-3.2-1B shape, bf16 weights,
//   llama3 RoPE): compressing a 2040-token context in chunks of 510 at ratio 5 (full mask), with
//   fp32 and (_bf16dot) bf16 compute, beside the plain causal prefill of the same context, and one decode step (16 layers and the lm head)
//   over the compressed vs the full cache (bf16 K/V).
// CTXCOMP_BENCH_SMOKE=1 shrinks every shape.
#include "../examples/sac_driver.hpp"
#include "synthetic_llama.hpp"

using namespace ctxcomp;

namespace {

using bench::smoke;
index_t chunk() { return smoke() ? 64 : 512; }
const index_t kRatios[] = {4, 8, 16, 32};

enum class Kind { Causal, Full, Anchor };

double pairs_of(Kind kind, const anchor::AnchorPlan& plan, index_t n) {
  if (kind == Kind::Causal) return double(count_visible(Causal(0), n, n));
  if (kind == Kind::Full) return double(count_visible(FullBidirectional{}, n, n));
  return double(count_visible(AnchorBidirectional{plan.anchors().data(), plan.anchor_count(), 0}, n, n));
}

/// One layer over one chunk: SAC compression (embed, anchor embeddings, layer, keep anchors) or
/// the causal prefill baseline (embed, layer).
template <class T = float>
void compress_layer(benchmark::State& st, Kind kind, index_t ratio, int threads, Compute compute = Compute::fp32) {
  const index_t n = chunk();
  static const bench::SyntheticLlama<T> llama(1, 512);
  const auto& c = llama.model.config;
  host::LlamaHost<T> h(llama.model);
  h.set_compute(compute);
  const auto plan = anchor::AnchorPlan::uniform(n, n, ratio);
  const auto roles = bench::random_buffer(std::size_t(plan.anchor_count() * c.hidden), 5, 0.1f);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n)), pos(ids.size());
  std::vector<index_t> idx(ids.size());
  for (index_t i = 0; i < n; ++i) ids[std::size_t(i)] = i % 512, pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  anchor::Compressor<float> comp(c.layers, c.kv_heads, c.head_dim, c.hidden, n);
  auto out = h.make_cache(plan.anchor_count());
  auto scratch = h.make_cache(n);
  std::vector<float> x(std::size_t(n * c.hidden));
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) {
      if (kind == Kind::Causal) {
        scratch.clear();
        h.embed(ids.data(), n, matrix_view(x.data(), n, c.hidden));
        h.forward(matrix_view(x.data(), n, c.hidden), pos.data(), idx.data(), Causal(0), scratch, exec);
      } else {
        out.clear();
        comp.compress(
            plan, ids.data(), matrix_view<const float>(roles.data(), plan.anchor_count(), c.hidden),
            kind == Kind::Full ? anchor::ChunkMask::Full : anchor::ChunkMask::Anchor,
            [&](const std::int64_t* p, index_t cnt, MatrixView<float> xv) { h.embed(p, cnt, xv); },
            [&](MatrixView<float> xv, const std::int64_t* ps, const index_t* ix, const auto& mask, KvCache<float>& cache) {
              h.forward(xv, ps, ix, mask, cache, exec);
            },
            out);
      }
      benchmark::ClobberMemory();
    }
  });
  const double pairs = pairs_of(kind, plan, n), causal = pairs_of(Kind::Causal, plan, n);
  st.counters["tokens_per_s"] = bench::rate(double(n));
  st.counters["GFLOPS"] = bench::rate(llama.layer_flops(double(n), pairs) * 1e-9);
  st.counters["flops_vs_causal"] = llama.layer_flops(double(n), pairs) / llama.layer_flops(double(n), causal);
  st.counters["compute_bf16"] = compute == Compute::bf16 ? 1 : 0;
  if (kind != Kind::Causal) st.counters["anchors"] = double(plan.anchor_count());
}

/// The attention of one such layer over the chunk (32 heads of 128), by mask.
void chunk_attention(benchmark::State& st, Kind kind, index_t ratio) {
  const index_t n = chunk(), heads = smoke() ? 4 : 32, d = smoke() ? 64 : 128;
  const auto plan = anchor::AnchorPlan::uniform(n, n, ratio);
  const auto q = bench::random_buffer(std::size_t(heads * n * d), 1), k = bench::random_buffer(q.size(), 2),
             v = bench::random_buffer(q.size(), 3);
  std::vector<float> o(q.size());
  const auto qv = HeadsView<const float>::contiguous(q.data(), heads, n, d);
  const auto kv = HeadsView<const float>::contiguous(k.data(), heads, n, d);
  const auto vv = HeadsView<const float>::contiguous(v.data(), heads, n, d);
  const auto ov = HeadsView<float>::contiguous(o.data(), heads, n, d);
  const AnchorBidirectional am{plan.anchors().data(), plan.anchor_count(), 0};
  Workspace ws;
  for (auto _ : st) {
    if (kind == Kind::Causal) attention(qv, kv, vv, Causal(0), ov, {}, ws);
    else if (kind == Kind::Full) attention(qv, kv, vv, FullBidirectional{}, ov, {}, ws);
    else attention(qv, kv, vv, am, ov, {}, ws);
    benchmark::DoNotOptimize(o.data());
  }
  const double pairs = pairs_of(kind, plan, n);
  st.counters["visible_pairs"] = pairs;
  st.counters["pairs_vs_causal"] = pairs / pairs_of(Kind::Causal, plan, n);
  st.counters["GFLOPS"] = bench::rate(4.0 * double(heads * d) * pairs * 1e-9);
}

/// One decode step's attention (32 query heads) over one layer's cache of a 4096-token context:
/// all tokens (ratio 1) or the SAC anchors of 512-token chunks at `ratio`. fp16 cache.
void decode(benchmark::State& st, index_t ratio) {
  const index_t n = smoke() ? 512 : 4096, heads = smoke() ? 4 : 32, d = smoke() ? 64 : 128;
  const index_t m = ratio == 1 ? n : anchor::AnchorPlan::uniform(n, chunk(), ratio).anchor_count();
  const auto kf = bench::random_buffer(std::size_t(heads * m * d), 7), vf = bench::random_buffer(kf.size(), 8);
  std::vector<fp16> k(kf.size()), v(vf.size());
  kernels::convert(kf.data(), k.data(), index_t(k.size()));
  kernels::convert(vf.data(), v.data(), index_t(v.size()));
  const auto q = bench::random_buffer(std::size_t(heads * d), 9);
  std::vector<float> o(q.size());
  Workspace ws;
  for (auto _ : st) {
    attention(HeadsView<const float>::contiguous(q.data(), heads, 1, d), HeadsView<const fp16>::contiguous(k.data(), heads, m, d),
              HeadsView<const fp16>::contiguous(v.data(), heads, m, d), Causal(m - 1),
              HeadsView<float>::contiguous(o.data(), heads, 1, d), {}, ws);
    benchmark::DoNotOptimize(o.data());
  }
  const double layer_bytes = 2.0 * double(heads * m * d) * sizeof(fp16);
  st.counters["cache_tokens"] = double(m);
  // All 32 layers of Llama-2-7B (32 kv heads of 128, fp16): bytes kept per context token.
  st.counters["bytes_per_context_token_32_layers"] = 32 * 2.0 * double(m) * 32 * 128 * 2 / double(n);
  st.counters["GBps"] = bench::rate(layer_bytes * 1e-9);
}

using bench::kPaperChunk;
using bench::kPaperRatio;
using bench::kPaperTokens;
using bench::llama32_1b;
using bench::paper_ids;

double cache_bytes(const KvCache<bf16>& c) {
  return 2.0 * double(c.layers() * c.kv_heads() * c.size() * c.head_dim()) * sizeof(bf16);
}

/// SAC compression of the whole context (compress = true) or its plain causal prefill, with
/// `compute` arithmetic in the projections (fp32: bf16 weights widened; bf16: bf16 pair dots).
void paper_context(benchmark::State& st, bool compress, int threads, Compute compute) {
  const auto& llama = llama32_1b();
  const auto& c = llama.model.config;
  host::LlamaHost<bf16, bf16> h(llama.model);
  h.set_compute(compute);
  const auto ids = paper_ids(c.vocab);
  const auto plan = anchor::AnchorPlan::uniform(kPaperTokens, kPaperChunk, kPaperRatio);
  const auto roles = bench::random_buffer(std::size_t(plan.max_anchors_per_chunk() * c.hidden), 5, 0.02f);
  anchor::Compressor<bf16> comp(c.layers, c.kv_heads, c.head_dim, c.hidden, kPaperChunk);
  auto cache = h.make_cache(compress ? plan.anchor_count() : kPaperTokens);
  std::vector<float> x(compress ? 0 : std::size_t(kPaperTokens * c.hidden));
  std::vector<std::int64_t> pos(ids.size());
  std::vector<index_t> idx(ids.size());
  for (index_t i = 0; i < kPaperTokens; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
  bench::with_executor(threads, [&](const auto& exec) {
    for (auto _ : st) {
      cache.clear();
      if (compress) {
        comp.compress(
            plan, ids.data(), matrix_view<const float>(roles.data(), plan.max_anchors_per_chunk(), c.hidden),
            anchor::ChunkMask::Full,
            [&](const std::int64_t* p, index_t cnt, MatrixView<float> xv) { h.embed(p, cnt, xv); },
            [&](MatrixView<float> xv, const std::int64_t* ps, const index_t* ix, const auto& mask, KvCache<bf16>& kc) {
              h.forward(xv, ps, ix, mask, kc, exec);
            },
            cache);
      } else {
        h.embed(ids.data(), kPaperTokens, matrix_view(x.data(), kPaperTokens, c.hidden));
        h.forward(matrix_view(x.data(), kPaperTokens, c.hidden), pos.data(), idx.data(), Causal(0), cache, exec);
      }
      benchmark::ClobberMemory();
    }
  });
  st.counters["context_tokens_per_s"] = bench::rate(double(kPaperTokens));
  st.counters["cache_entries"] = double(cache.size());
  st.counters["cache_bytes"] = cache_bytes(cache);
  st.counters["compression_ratio"] = double(kPaperTokens) / double(cache.size());
}

/// One decode step (every layer and the lm head) over the compressed or the full cache.
void paper_decode(benchmark::State& st, bool compressed) {
  const auto& llama = llama32_1b();
  const auto& c = llama.model.config;
  host::LlamaHost<bf16, bf16> h(llama.model);
  const auto ids = paper_ids(c.vocab);
  const auto plan = anchor::AnchorPlan::uniform(kPaperTokens, kPaperChunk, kPaperRatio);
  auto cache = h.make_cache((compressed ? plan.anchor_count() : kPaperTokens) + 1);
  if (compressed) {
    const auto roles = bench::random_buffer(std::size_t(plan.max_anchors_per_chunk() * c.hidden), 5, 0.02f);
    host::sac_compress(h, plan, ids.data(),
                       matrix_view<const float>(roles.data(), plan.max_anchors_per_chunk(), c.hidden),
                       anchor::ChunkMask::Full, cache);
  } else {
    std::vector<float> x(std::size_t(kPaperTokens * c.hidden));
    std::vector<std::int64_t> pos(ids.size());
    std::vector<index_t> idx(ids.size());
    for (index_t i = 0; i < kPaperTokens; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
    h.embed(ids.data(), kPaperTokens, matrix_view(x.data(), kPaperTokens, c.hidden));
    h.forward(matrix_view(x.data(), kPaperTokens, c.hidden), pos.data(), idx.data(), Causal(0), cache);
  }
  const index_t m = cache.size();
  std::vector<float> x(std::size_t(c.hidden)), logits(std::size_t(c.vocab));
  const std::int64_t next = 42, position = kPaperTokens;
  const index_t token = kPaperTokens;
  for (auto _ : st) {
    h.embed(&next, 1, matrix_view(x.data(), 1, c.hidden));
    h.forward(matrix_view(x.data(), 1, c.hidden), &position, &token, Causal(m), cache);
    h.logits(matrix_view<const float>(x.data(), 1, c.hidden), matrix_view(logits.data(), 1, c.vocab));
    cache.truncate(m);
    benchmark::DoNotOptimize(logits.data());
  }
  st.counters["tokens_per_s"] = bench::rate(1.0);
  st.counters["cache_entries"] = double(m);
  st.counters["cache_bytes"] = cache_bytes(cache);
  // K/V read per step (bf16), as a bandwidth figure beside the weights the step also reads.
  st.counters["kv_GBps"] = bench::rate(cache_bytes(cache) * 1e-9);
}

const bool registered = [] {
  auto ms = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  const std::string c = "chunk" + std::to_string(chunk());
  for (int t : bench::thread_counts()) {
    const std::string ts = bench::thread_suffix(t);
    ms(benchmark::RegisterBenchmark(("sac/compress_layer/" + c + "/causal_prefill" + ts).c_str(),
                                    compress_layer<float>, Kind::Causal, index_t(1), t, Compute::fp32));
    for (index_t r : kRatios)
      for (Kind k : {Kind::Full, Kind::Anchor})
        ms(benchmark::RegisterBenchmark(
            ("sac/compress_layer/" + c + (k == Kind::Full ? "/full_r" : "/anchor_r") + std::to_string(r) + ts).c_str(),
            compress_layer<float>, k, r, t, Compute::fp32));
    // The bf16 compute path (bf16 weights read in place, bf16 operands, fp32 accumulation).
    ms(benchmark::RegisterBenchmark(("sac/compress_layer/" + c + "/anchor_r8_bf16dot" + ts).c_str(),
                                    compress_layer<bf16>, Kind::Anchor, index_t(8), t, Compute::bf16));
  }
  ms(benchmark::RegisterBenchmark(("sac/attention/" + c + "/causal").c_str(), chunk_attention, Kind::Causal, index_t(1)));
  ms(benchmark::RegisterBenchmark(("sac/attention/" + c + "/full").c_str(), chunk_attention, Kind::Full, index_t(1)));
  for (index_t r : kRatios)
    ms(benchmark::RegisterBenchmark(("sac/attention/" + c + "/anchor_r" + std::to_string(r)).c_str(), chunk_attention,
                                    Kind::Anchor, r));
  const std::string ctx = smoke() ? "ctx512" : "ctx4096";
  ms(benchmark::RegisterBenchmark(("sac/decode/" + ctx + "_uncompressed").c_str(), decode, index_t(1)));
  for (index_t r : kRatios)
    ms(benchmark::RegisterBenchmark(("sac/decode/" + ctx + "_r" + std::to_string(r)).c_str(), decode, r));
  // Seconds per iteration: Google Benchmark stops after the first one.
  auto paper = [](benchmark::internal::Benchmark* b) { b->UseRealTime()->Unit(benchmark::kMillisecond); };
  for (int t : bench::thread_counts()) {
    const std::string ts = bench::thread_suffix(t);
    paper(benchmark::RegisterBenchmark(("sac/llama32_1b/compress_2040_r5" + ts).c_str(), paper_context, true, t,
                                       Compute::fp32));
    paper(benchmark::RegisterBenchmark(("sac/llama32_1b/compress_2040_r5_bf16dot" + ts).c_str(), paper_context, true,
                                       t, Compute::bf16));
    paper(benchmark::RegisterBenchmark(("sac/llama32_1b/prefill_2040" + ts).c_str(), paper_context, false, t,
                                       Compute::fp32));
  }
  ms(benchmark::RegisterBenchmark("sac/llama32_1b/decode_compressed", paper_decode, true));
  ms(benchmark::RegisterBenchmark("sac/llama32_1b/decode_full", paper_decode, false));
  return true;
}();

}  // namespace
