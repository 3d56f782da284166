// `ctxcomp demo`: the three compressors end to end on one built-in context, with small
// deterministic models built in memory (or real checkpoints). Every figure is measured in the
// run: compression time, cache sizes, decode time per token over the full and the compressed
// cache, and how far the next-token logits moved from the uncompressed run.
//   IC-Former: context embeddings -> digests (soft prompt) per chunk; the host decodes after
//              the soft prompt instead of the context.
//   sentinel:  the stream with <CL> ... <CR> spans every 48 context tokens, folded while
//              streaming (fold after each span's <CR>).
//   SAC:       anchors every r tokens of each 512-token chunk (two ratios), their K/V kept.
#pragma once
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ctxcomp/io/icformer_checkpoint.hpp>

#include "fold_driver.hpp"
#include "sac_driver.hpp"

namespace ctxcomp::demo {

/// One row of the demo table.
struct Row {
  std::string method;                  ///< "icformer", "sentinel", "sac_r4", ...
  index_t context_tokens = 0;          ///< tokens of the context (without sentinels)
  index_t compressed_entries = 0;      ///< cache entries (or digests) left after compression
  double compression_ratio = 0;        ///< context_tokens / compressed_entries: r, tokens per kept entry (as --ratio)
  double compress_seconds = 0;         ///< wall time of the compression
  double compress_tokens_per_s = 0;    ///< context_tokens / compress_seconds
  std::size_t kv_bytes_before = 0;     ///< host KV cache bytes of the uncompressed context
  std::size_t kv_bytes_after = 0;      ///< host KV cache bytes after compression
  double decode_ms_full = 0;           ///< one decode step over the full cache (median)
  double decode_ms_compressed = 0;     ///< one decode step over the compressed cache (median)
  double decode_spread_full = 0;       ///< slowest / fastest of the middle 3 of 5 timed full-cache steps (1: steady)
  double decode_spread_compressed = 0; ///< the same for the compressed-cache steps
  double logits_max_abs = 0;           ///< max |logits_compressed - logits_full| of the next token
  double logits_kl = 0;                ///< KL(softmax(full) || softmax(compressed))
};

/// Seeded deterministic weights, owned here.
struct SeededWeights {
  std::vector<std::vector<float>> storage;
  std::uint32_t seed = 17;

  /// n values in [offset - scale, offset + scale).
  float* add(index_t n, float scale, float offset) {
    storage.emplace_back(static_cast<std::size_t>(n));
    std::uint32_t s = (seed + std::uint32_t(storage.size())) * 2654435761u;
    for (auto& x : storage.back()) {
      s = s * 1664525u + 1013904223u;
      x = offset + scale * (float(s >> 8) / float(1 << 23) - 1.f);
    }
    return storage.back().data();
  }
  /// A [out x in] weight scaled like a PyTorch Linear initialisation.
  WeightView<float> weight(index_t out, index_t in) { return {add(out * in, 1.f / std::sqrt(float(in)), 0.f), out, in}; }
};

/// A Llama-architecture host model with seeded random weights: hidden 256, 4 heads over 2 kv
/// heads of 64, 4 layers, intermediate 688, vocabulary 512.
struct SeededLlama {
  host::LlamaModel<float> model;
  SeededWeights w;

  SeededLlama() {
    auto& c = model.config;
    c.hidden = 256, c.heads = 4, c.kv_heads = 2, c.head_dim = 64, c.intermediate = 688, c.layers = 4, c.vocab = 512;
    const index_t d = c.hidden, kd = c.kv_heads * c.head_dim, in = c.intermediate;
    for (index_t l = 0; l < c.layers; ++l) {
      host::LlamaLayerWeights<float> lw;
      lw.input_norm = w.add(d, 0.1f, 1.f);
      lw.post_attention_norm = w.add(d, 0.1f, 1.f);
      lw.q = w.weight(d, d), lw.k = w.weight(kd, d), lw.v = w.weight(kd, d), lw.o = w.weight(d, d);
      lw.mlp = {w.weight(in, d), w.weight(in, d), w.weight(d, in)};
      model.layers.push_back(lw);
    }
    model.final_norm = w.add(d, 0.1f, 1.f);
    model.embed = w.add(c.vocab * d, 1.f, 0.f);
    model.lm_head = w.weight(c.vocab, d);
  }
};

/// An IC-Former encoder with seeded weights for a host of hidden size `hidden`: 2 cross-attention
/// layers, 4 heads, 32 digests.
struct SeededIcformer {
  digest::IcformerConfig config;
  digest::IcformerWeights<float> weights;
  SeededWeights w{{}, 101};

  explicit SeededIcformer(index_t hidden) {
    config.hidden = hidden, config.heads = 4, config.kv_heads = 4, config.head_dim = hidden / 4;
    config.intermediate = 2 * hidden + 176, config.layers = 2, config.num_digests = 32;
    const index_t d = hidden, in = config.intermediate;
    for (index_t l = 0; l < config.layers; ++l) {
      digest::IcformerLayerWeights<float> lw;
      lw.query_norm = w.add(d, 0.1f, 1.f);
      lw.context_norm = w.add(d, 0.1f, 1.f);
      lw.post_attention_norm = w.add(d, 0.1f, 1.f);
      lw.q = w.weight(d, d), lw.k = w.weight(d, d), lw.v = w.weight(d, d), lw.o = w.weight(d, d);
      lw.mlp = {w.weight(in, d), w.weight(in, d), w.weight(d, in)};
      weights.layers.push_back(lw);
    }
    weights.final_norm = w.add(d, 0.1f, 1.f);
  }
};

/// n token ids (i * 37 + seed) mod vocab: a deterministic stand-in for tokenized text.
inline std::vector<std::int64_t> seeded_ids(index_t n, index_t vocab, index_t seed) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ids[std::size_t(i)] = (i * 37 + seed) % vocab;
  return ids;
}

/// The id of the largest of `vocab` logits (the first, on a tie): a greedy decoding step.
inline std::int64_t argmax(const float* logits, index_t vocab) {
  std::int64_t best = 0;
  for (index_t v = 1; v < vocab; ++v)
    if (logits[v] > logits[best]) best = v;
  return best;
}

/// The built-in context: a paragraph about context compression, byte-tokenised (id = byte
/// value mod (vocab - 2); the last two ids are <CL> and <CR>), repeated to `n` tokens.
inline std::vector<std::int64_t> builtin_context(index_t n, index_t vocab) {
  static const char* text =
      "Long prompts make language model inference slow and the key-value cache large. Context "
      "compression keeps what the model needs: a few digest tokens that cross-attend to the whole "
      "context, a sentinel pair that folds a finished span into one entry, or anchor tokens whose "
      "keys and values stand for their chunk. ";
  const std::string t(text);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    ids[std::size_t(i)] = std::int64_t(static_cast<unsigned char>(t[std::size_t(i) % t.size()])) % (vocab - 2);
  return ids;
}

/// The sentinel stream of a context: every 48 context tokens, the first 32 are wrapped in
/// <CL> ... <CR> (ids vocab-2, vocab-1). The demo folds this stream while it arrives.
inline std::vector<std::int64_t> sentinel_stream(const std::vector<std::int64_t>& context, index_t vocab) {
  std::vector<std::int64_t> s;
  bool open = false;
  for (std::size_t i = 0; i < context.size(); ++i) {
    if (i % 48 == 0 && i + 32 <= context.size()) s.push_back(vocab - 2), open = true;  // <CL>
    s.push_back(context[i]);
    if (open && i % 48 == 31) s.push_back(vocab - 1), open = false;  // <CR>
  }
  return s;
}

/// softmax(a) vs softmax(b): max |a - b| and KL(softmax(a) || softmax(b)), in double.
inline void logit_distance(const float* a, const float* b, index_t n, double& max_abs, double& kl) {
  double ma = -INFINITY, mb = -INFINITY, sa = 0, sb = 0;
  max_abs = 0;
  for (index_t i = 0; i < n; ++i) ma = std::max(ma, double(a[i])), mb = std::max(mb, double(b[i]));
  for (index_t i = 0; i < n; ++i) sa += std::exp(a[i] - ma), sb += std::exp(b[i] - mb);
  kl = 0;
  for (index_t i = 0; i < n; ++i) {
    max_abs = std::max(max_abs, std::abs(double(a[i]) - double(b[i])));
    const double la = a[i] - ma - std::log(sa), lb = b[i] - mb - std::log(sb);
    kl += std::exp(la) * (la - lb);
  }
}

struct Options {
  index_t tokens = 2048;
  int threads = 1;
  std::string model_dir, checkpoint_dir;
  std::function<void(const std::string& stage, int done, int total)> progress;
};

/// Runs every method and returns the rows (icformer, sentinel, sac_r4, sac_r16).
template <class Exec>
std::vector<Row> run(const Options& o, const Exec& exec) {
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  CTXCOMP_CHECK(o.tokens >= 64, "demo: --tokens (", o.tokens, ") must be at least 64");
  std::unique_ptr<SeededLlama> seeded;
  host::LlamaModel<float> loaded;
  if (o.model_dir.empty()) seeded = std::make_unique<SeededLlama>();
  else loaded = host::LlamaModel<float>::load(o.model_dir);
  const host::LlamaModel<float>& model = seeded ? seeded->model : loaded;
  const auto& c = model.config;
  const index_t n = o.tokens, vocab = c.vocab;
  const auto context = builtin_context(n, vocab);
  const std::int64_t next_token = context[std::size_t(n - 1)] % (vocab - 2);
  int stage = 0;
  const int stages = 5;
  auto progress = [&](const char* what) {
    if (o.progress) o.progress(what, stage, stages);
    ++stage;
  };

  host::LlamaHost<float> h(model);
  std::vector<float> x, logits_full(static_cast<std::size_t>(vocab)), logits(static_cast<std::size_t>(vocab));
  // One decode step of `token` at `position` over `cache` (appended, then truncated back):
  // logits into `out`; returns the median time of 5 steps (after an untimed one) in ms, and in
  // `spread` the slowest / fastest of the middle three.
  double spread = 1;
  auto decode = [&](KvCache<float>& cache, std::int64_t position, index_t token_index, std::vector<float>& out) {
    const index_t m = cache.size();
    std::vector<double> times;
    std::vector<float> xv(std::size_t(c.hidden));
    for (int r = -1; r < 5; ++r) {  // step -1 warms the caches up and is not timed
      const auto t0 = clock::now();
      h.embed(&next_token, 1, matrix_view(xv.data(), 1, c.hidden));
      h.forward(matrix_view(xv.data(), 1, c.hidden), &position, &token_index, Causal(m), cache, exec);
      h.logits(matrix_view<const float>(xv.data(), 1, c.hidden), matrix_view(out.data(), 1, vocab), exec);
      cache.truncate(m);
      if (r >= 0) times.push_back(secs(t0) * 1e3);
    }
    std::sort(times.begin(), times.end());
    // The spread without the fastest and the slowest step: one stray step (a timer tick, a
    // page fault) is noise at this scale; another process on the cores slows several.
    spread = times[1] > 0 ? times[3] / times[1] : 1;
    return times[2];
  };
  auto prefill = [&](KvCache<float>& cache, const std::int64_t* ids, index_t count) {
    std::vector<std::int64_t> pos(static_cast<std::size_t>(count));
    std::vector<index_t> idx(static_cast<std::size_t>(count));
    for (index_t i = 0; i < count; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
    x.resize(std::size_t(count * c.hidden));
    h.embed(ids, count, matrix_view(x.data(), count, c.hidden));
    h.forward(matrix_view(x.data(), count, c.hidden), pos.data(), idx.data(), Causal(0), cache, exec);
  };
  double spread_full = 1;  // of the full-cache decode, measured once below
  auto finish = [&](Row& r, const KvCache<float>& full, double decode_full_ms) {
    r.context_tokens = n;
    r.compression_ratio = double(n) / double(r.compressed_entries);
    r.compress_tokens_per_s = double(n) / r.compress_seconds;
    r.kv_bytes_before = full.bytes_used();
    r.decode_ms_full = decode_full_ms;
    r.decode_spread_full = spread_full;
    logit_distance(logits_full.data(), logits.data(), vocab, r.logits_max_abs, r.logits_kl);
  };

  // The uncompressed run: causal prefill of the context, then the next token at position n.
  progress("uncompressed prefill");
  auto full = h.make_cache(n + 1);
  prefill(full, context.data(), n);
  const double decode_full_ms = decode(full, n, n, logits_full);
  spread_full = spread;
  std::vector<Row> rows;

  // IC-Former: context embeddings -> digests per chunk of 512; the host then sees the soft
  // prompt (one cache entry per digest) in place of the context.
  progress("icformer");
  {
    std::unique_ptr<SeededIcformer> seeded_enc;
    std::unique_ptr<io::IcformerCheckpoint<float>> ckpt;
    digest::IcformerConfig cfg;
    std::unique_ptr<digest::IcformerEncoder<float>> enc;
    if (o.checkpoint_dir.empty()) {
      seeded_enc = std::make_unique<SeededIcformer>(c.hidden);
      cfg = seeded_enc->config;
      enc = std::make_unique<digest::IcformerEncoder<float>>(cfg, seeded_enc->weights);
    } else {
      ckpt = std::make_unique<io::IcformerCheckpoint<float>>(io::IcformerCheckpoint<float>::load(o.checkpoint_dir));
      cfg = ckpt->config();
      enc = std::make_unique<digest::IcformerEncoder<float>>(ckpt->encoder());
    }
    CTXCOMP_CHECK(cfg.hidden == c.hidden, "demo: the IC-Former hidden size (", cfg.hidden,
                  ") differs from the host model's (", c.hidden, ")");
    const index_t k = cfg.num_digests > 0 ? cfg.num_digests : 32, max_chunk = 512;
    SeededWeights digest_store{{}, 202};
    const float* digests = digest_store.add(k * c.hidden, 1.f, 0.f);
    std::vector<float> ctx(std::size_t(n * c.hidden));
    h.embed(context.data(), n, matrix_view(ctx.data(), n, c.hidden));
    const index_t chunks = digest::Chunking::of(n, max_chunk).count;
    std::vector<float> soft(std::size_t(chunks * k * c.hidden));
    const auto t0 = clock::now();
    enc->compress_chunked(matrix_view<const float>(ctx.data(), n, c.hidden), matrix_view<const float>(digests, k, c.hidden),
                          max_chunk, matrix_view(soft.data(), chunks * k, c.hidden), exec);
    Row r;
    r.method = "icformer";
    r.compress_seconds = secs(t0);
    r.compressed_entries = chunks * k;
    // The host's cache of the soft prompt (what it decodes from).
    auto cache = h.make_cache(chunks * k + 1);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(chunks * k));
    std::vector<index_t> idx(pos.size());
    for (index_t i = 0; i < chunks * k; ++i) pos[std::size_t(i)] = i, idx[std::size_t(i)] = i;
    h.forward(matrix_view(soft.data(), chunks * k, c.hidden), pos.data(), idx.data(), Causal(0), cache, exec);
    r.kv_bytes_after = cache.bytes_used();
    r.decode_ms_compressed = decode(cache, chunks * k, chunks * k, logits);
    r.decode_spread_compressed = spread;
    finish(r, full, decode_full_ms);
    rows.push_back(r);
  }

  // Sentinel folding while streaming.
  progress("sentinel folding");
  {
    const auto stream = sentinel_stream(context, vocab);
    const index_t sn = index_t(stream.size());
    auto cache = h.make_cache(sn + 1);
    fold::SpanTracker spans(vocab - 2, vocab - 1, vocab);
    const auto t0 = clock::now();
    host::run_with_folding(h, stream.data(), sn, spans, cache, host::FoldSchedule::EverySpan, exec);
    Row r;
    r.method = "sentinel";
    r.compress_seconds = secs(t0);
    r.compressed_entries = cache.size();
    r.kv_bytes_after = cache.bytes_used();
    // The next ordinary token: its position continues the ordinary count; it sees every kept entry.
    std::int64_t position;
    spans.push(&next_token, 1, &position);
    r.decode_ms_compressed = decode(cache, position, sn, logits);
    r.decode_spread_compressed = spread;
    finish(r, full, decode_full_ms);
    rows.push_back(r);
  }

  // SAC at two ratios, full mask, chunks of 512.
  for (index_t ratio : {index_t(4), index_t(16)}) {
    progress(ratio == 4 ? "sac r4" : "sac r16");
    const auto plan = anchor::AnchorPlan::uniform(n, std::min<index_t>(512, n), ratio);
    SeededWeights role_store{{}, std::uint32_t(300 + ratio)};
    const float* roles = role_store.add(plan.max_anchors_per_chunk() * c.hidden, 0.02f, 0.f);
    auto cache = h.make_cache(plan.anchor_count() + 1);
    const auto t0 = clock::now();
    host::sac_compress(h, plan, context.data(), matrix_view<const float>(roles, plan.max_anchors_per_chunk(), c.hidden),
                       anchor::ChunkMask::Full, cache, exec);
    Row r;
    r.method = "sac_r" + std::to_string(ratio);
    r.compress_seconds = secs(t0);
    r.compressed_entries = cache.size();
    r.kv_bytes_after = cache.bytes_used();
    r.decode_ms_compressed = decode(cache, plan.decode_position(), n, logits);
    r.decode_spread_compressed = spread;
    finish(r, full, decode_full_ms);
    rows.push_back(r);
  }
  if (o.progress) o.progress("done", stages, stages);
  return rows;
}

}  // namespace ctxcomp::demo
