// The loop an engine runs with sentinel folding, written once against the KV-layout interface
// (kv/layout.hpp) so that engine_cells.cpp and engine_paged.cpp differ only in how the engine
// owns its cache. Text streams in in pieces; each piece goes through the model with the
// sentinel mask against the cache as it is; after a piece that closes a span, the span is
// folded (its <CL> and inner tokens leave every layer's cache); then a few tokens are decoded
// greedily from the folded cache.
#pragma once
#include <cstdio>
#include <vector>

#include <ctxcomp/fold/spans.hpp>

#include "demo.hpp"

namespace ctxcomp::example {

/// The stream: `n` tokens of the demo text with a <CL> ... <CR> span (a 12-token span, as a
/// retrieved passage or tool output an engine wants to fold) every 40 tokens. <CL> and <CR>
/// are the model's last two ids.
inline std::vector<std::int64_t> stream_with_spans(index_t n, index_t vocab) {
  std::vector<std::int64_t> ids;
  const std::int64_t cl = vocab - 2, cr = vocab - 1;
  for (index_t i = 0; index_t(ids.size()) < n; ++i) {
    if (i % 40 == 20) ids.push_back(cl);
    ids.push_back(std::int64_t((i * 37 + 11) % (vocab - 2)));
    if (i % 40 == 31) ids.push_back(cr);
  }
  ids.resize(std::size_t(n));
  if (ids.back() == cl) ids.back() = 5;  // do not end on an unclosed <CL>
  return ids;
}

/// What the loop reports.
struct LoopResult {
  std::vector<std::int64_t> decoded;  ///< greedily decoded tokens
  std::vector<float> last_logits;     ///< logits of the last decode step
  index_t cache_tokens = 0;           ///< tokens in the cache at the end
  index_t folded = 0;                 ///< tokens folded away
};

/// Streams `ids` through `host` into `cache` (any KV layout), `piece` tokens at a time, folding
/// each span as soon as its <CR> has been processed, then decodes `steps` tokens.
template <class T, class C, class Kv>
LoopResult stream_fold_decode(host::LlamaHost<T, C>& host, Kv& cache, const std::vector<std::int64_t>& ids,
                              index_t piece, index_t steps, bool verbose) {
  const auto& c = host.config();
  fold::SpanTracker spans(c.vocab - 2, c.vocab - 1, c.vocab);
  LoopResult r;
  std::vector<float> x, logits(std::size_t(c.vocab));
  std::vector<std::int64_t> pos;
  std::vector<index_t> idx;
  std::int32_t unfolded = 0;  // spans before this one are folded
  std::vector<index_t> cell_of;  // a cell cache: the cell of each stream token (the host's appends)
  auto run = [&](const std::int64_t* tok, index_t t, bool want_logits) {
    // [guide:fold-step]
    // One piece of t new tokens `tok` (prompt, streamed text or one decoded token). Every token
    // the cache holds went through `spans` first, the system prompt included.
    const index_t first = spans.size();  // the stream index of tok[0]: tokens the tracker has seen
    pos.resize(std::size_t(t)), idx.resize(std::size_t(t)), x.resize(std::size_t(t * c.hidden));
    spans.push(tok, t, pos.data());  // 1. roles and position ids (a sentinel repeats a position)
    for (index_t i = 0; i < t; ++i) idx[std::size_t(i)] = first + i;  // token_index = stream index
    auto xv = matrix_view(x.data(), t, c.hidden);
    host.embed(tok, t, xv);
    // 2. the layers: append(t, pos, idx, slots) reserves the rows, spans.mask(first, cache) is
    // checked against them, K/V are stored at the slots, attention runs under that mask
    host.forward(xv, pos.data(), idx.data(), spans.mask(first, cache), cache);
    if constexpr (Kv::has_holes) cell_of.insert(cell_of.end(), host.last_slots().begin(), host.last_slots().end());
    if (want_logits) host.logits(matrix_view<const float>(x.data() + (t - 1) * c.hidden, 1, c.hidden),
                                 matrix_view(logits.data(), 1, c.vocab));
    if (spans.closed_spans() > unfolded) {  // 3. a span closed in this piece: fold it now
      EvictStats st;
      if constexpr (Kv::has_holes) {  // the cells written since the span's <CL>: no scan of the cache
        const index_t since = spans.span_begin(unfolded);
        r.folded += fold::fold(cache, spans, unfolded, cell_of.data() + since, index_t(cell_of.size()) - since, &st);
      } else {
        r.folded += fold::fold(cache, spans, unfolded, &st);
      }
      if (verbose)
        std::printf("  after token %td: folded %d span(s), %td tokens evicted, %zu bytes moved, %td pages freed; "
                    "cache %td tokens\n",
                    first + t, int(spans.closed_spans() - unfolded), st.tokens, st.bytes_moved, st.pages_freed,
                    cache.size());
      unfolded = spans.closed_spans();
    }
    // [guide:end]
  };
  const index_t n = index_t(ids.size());
  for (index_t s = 0; s < n; s += piece) run(ids.data() + s, std::min(piece, n - s), s + piece >= n);
  for (index_t k = 0; k < steps; ++k) {  // greedy decode, one token per step
    std::int64_t next = 0;
    for (index_t v = 1; v < c.vocab - 2; ++v)
      if (logits[std::size_t(v)] > logits[std::size_t(next)]) next = v;
    r.decoded.push_back(next);
    run(&next, 1, true);
  }
  r.last_logits = logits;
  r.cache_tokens = cache.size();
  return r;
}

/// Runs the same stream over an owning, contiguous KvCache (the reference) and prints how far
/// the engine's run is from it.
template <class C>
int compare_with_contiguous(const host::LlamaModel<float>& model, const std::vector<std::int64_t>& ids, index_t piece,
                            index_t steps, const LoopResult& mine) {
  const auto& c = model.config;
  host::LlamaHost<float, C> h(model);
  KvCache<C> ref(c.layers, c.kv_heads, c.head_dim, index_t(ids.size()) + steps);
  const LoopResult r = stream_fold_decode(h, ref, ids, piece, steps, false);
  double diff = 0;
  for (std::size_t i = 0; i < r.last_logits.size(); ++i)
    diff = std::max(diff, double(std::abs(r.last_logits[i] - mine.last_logits[i])));
  std::printf("decoded:");
  for (auto t : mine.decoded) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\nreference (contiguous KvCache): same tokens %s, cache %td tokens, max |logit difference| %.3g\n",
              r.decoded == mine.decoded ? "yes" : "NO", r.cache_tokens, diff);
  return r.decoded == mine.decoded && r.cache_tokens == mine.cache_tokens && diff <= 1e-3 ? 0 : 1;
}

}  // namespace ctxcomp::example
